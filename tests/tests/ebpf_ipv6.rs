//! The IPv6 datapath through BPF_PROG_TEST_RUN (as root): container IPv6 in VXLAN over IPv6, as
//! flanneld's `flannel-v6.<VNI>` sends and receives it. Hand-built packets in, action, bytes
//! and counters out, compared with RFC 8200/7348/6040 and with what a kernel vxlan device
//! configured as flannel-v6.1 emits.
//!
//! Each test runs in a private network namespace of its own thread: underlay `ul0` (IPv6,
//! peers behind permanent neighbours), bridge `br0` with ports `c0`/`c1` whose other ends play
//! the containers.

use std::{
    net::{Ipv6Addr, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use weft::{
    datapath::{Datapath, LocalEntry6, NodeSettings6, ProgramKind, SkbContext, TestRunOutput},
    lease::MacAddr,
};
use weft_common::{counter, counter6};
use weft_tests::netns::sh;
use weft_tests::packet::verdict::*;
use weft_tests::packet::{
    eth, icmpv6_echo, ipv4_checksum, ipv4_header, ipv6_packet, l4_checksum6, tcp6, udp6,
    vxlan6_frame, ETH_P_IPV6, ICMPV6, TCP, UDP, VNI, VXLAN_PORT,
};

mod testrun;
use testrun::*;

const OUR_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x15, 0, 0, 0, 0, 0, 0x21);
const PEER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x15, 0, 0, 0, 0, 0, 0x22);
const PEER2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x15, 0, 0, 0, 0, 0, 0x23);
const STRANGER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x15, 0, 0, 0, 0, 0, 0x99);
/// A container on c0, in our subnet fc00:0:0:10::/64.
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0x10, 0, 0, 0, 5);
/// A container behind PEER_IP6 (fc00:0:0:54::/64).
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0x54, 0, 0, 0, 3);
/// A container behind PEER2_IP6 (fc00:0:0:55::/64).
const REMOTE2_6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0x55, 0, 0, 0, 3);
/// flannel-v6.1's MAC here and on the peers (not flannel.1's).
const OUR_VTEP6_MAC: [u8; 6] = [0x0a, 0x66, 0x11, 0x11, 0x11, 0x11];
const PEER_VTEP6_MAC: [u8; 6] = [0x0a, 0x66, 0x22, 0x22, 0x22, 0x22];

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// A loaded datapath configured for IPv4 (as in the other suites) and IPv6.
struct Env {
    dp: Datapath,
    pin_dir: PathBuf,
    ul0: u32,
    c0: u32,
    c1: u32,
    bpffs: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Datapath::detach_and_unpin(&self.pin_dir);
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.bpffs.path())
            .status();
    }
}

fn settings6(underlay_keeps_gso: bool) -> NodeSettings6 {
    NodeSettings6 {
        vtep_ip: OUR_IP6,
        vtep_mac: MacAddr(OUR_VTEP6_MAC),
        subnet: Some("fc00:0:0:10::/64".parse().unwrap()),
        outer_hop_limit: 64,
        underlay_keeps_gso,
    }
}

fn env() -> Env {
    // SAFETY: affects only this thread's network namespace.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    // nodad: a tentative address is no source for FIB lookups.
    let batch = format!(
        "link set lo up
link add ul0 address {ul} type veth peer name ul0-wire
link set ul0-wire up
addr add {ours}/64 dev ul0 nodad
link set ul0 up
neigh replace {peer} lladdr {nic} dev ul0 nud permanent
neigh replace {peer2} lladdr {nic} dev ul0 nud permanent
link add br0 address {br} type bridge
addr add fc00:0:0:10::1/64 dev br0 nodad
link set br0 up
link add c0 type veth peer name c0p
link add c1 type veth peer name c1p
link set c0 master br0 up
link set c1 master br0 up
link set c0p address {ct} up
link set c1p up
neigh replace {local} lladdr {ct} dev br0 nud permanent
",
        ul = mac_text(UNDERLAY_MAC),
        ours = OUR_IP6,
        peer = PEER_IP6,
        peer2 = PEER2_IP6,
        nic = mac_text(PEER_NIC_MAC),
        br = mac_text(BRIDGE_MAC),
        ct = mac_text(CONTAINER_MAC),
        local = LOCAL6,
    );
    let file = tempfile::NamedTempFile::new().expect("batch file");
    std::fs::write(file.path(), batch).expect("write batch");
    sh(&["ip", "-batch", &file.path().to_string_lossy()]);
    sh(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

    let bpffs = tempfile::Builder::new()
        .prefix("weft-bpffs-ipv6-")
        .tempdir()
        .expect("tempdir");
    sh(&["mount", "-t", "bpf", "bpf", &bpffs.path().to_string_lossy()]);
    let pin_dir = bpffs.path().join("weft");
    let mut dp = Datapath::load(&pin_dir).expect("load the eBPF object");
    let (ul0, br0, c0, c1) = (ifindex("ul0"), ifindex("br0"), ifindex("c0"), ifindex("c1"));
    dp.configure(&node_settings(ul0, br0)).expect("configure");
    dp.configure6(&settings6(true)).expect("configure IPv6");
    for (subnet, vtep) in [
        ("fc00:0:0:54::/64", PEER_IP6),
        ("fc00:0:0:55::/64", PEER2_IP6),
    ] {
        dp.upsert_peer(subnet.parse().unwrap(), vtep, MacAddr(PEER_VTEP6_MAC))
            .expect("peer");
        dp.add_vtep(vtep).expect("vtep");
    }
    dp.upsert_local(&LocalEntry6 {
        ip: LOCAL6,
        host_ifindex: c0,
        mac: MacAddr(CONTAINER_MAC),
        gateway_mac: MacAddr(BRIDGE_MAC),
    })
    .expect("bind");
    Env {
        dp,
        pin_dir,
        ul0,
        c0,
        c1,
        bpffs,
    }
}

impl Env {
    fn run_skb(&self, kind: ProgramKind, packet: &[u8], skb: SkbContext) -> TestRunOutput {
        self.dp
            .test_run_skb(kind, packet, skb)
            .unwrap_or_else(|e| panic!("test run of {kind:?} on {packet:02x?}: {e}"))
    }

    fn run(&self, kind: ProgramKind, packet: &[u8], ifindex: u32) -> TestRunOutput {
        let skb = SkbContext {
            ifindex,
            ..Default::default()
        };
        self.run_skb(kind, packet, skb)
    }

    fn count(&mut self, index: u32) -> u64 {
        self.dp.counters().expect("counters").get(index)
    }

    /// Runs `kind` and checks that it returned `action` and counted exactly `reason`, once;
    /// a packet handed to the kernel must leave untouched.
    fn expect(
        &mut self,
        what: &str,
        kind: ProgramKind,
        packet: &[u8],
        skb: SkbContext,
        (action, reason): (u32, u32),
    ) -> TestRunOutput {
        let before = self.dp.counters().expect("counters");
        let out = self.run_skb(kind, packet, skb);
        let after = self.dp.counters().expect("counters");
        let changed: Vec<_> = after
            .values
            .iter()
            .zip(&before.values)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        let name = counter::name(reason).unwrap();
        // One reason, plus what the `decapsulated: ...` counters say about a decapsulation.
        assert!(
            out.action == action
                && changed.contains(&(name, 1))
                && changed
                    .iter()
                    .all(|(n, d)| *d == 1 && (*n == name || n.starts_with("ipv6: decapsulated: "))),
            "{what}: expected action {action} and one count of {name:?}; got action {} and counts {changed:?}",
            out.action
        );
        if action == TC_ACT_OK || action == XDP_PASS && reason != counter6::DECAPSULATED {
            assert_eq!(out.packet, packet, "{what}: handed to the kernel untouched");
        }
        out
    }
}

/// What a test case sends, on which port, and the (action, counter) it expects.
type Case = (&'static str, Vec<u8>, SkbContext, (u32, u32));

fn on(ifindex: u32) -> SkbContext {
    SkbContext {
        ifindex,
        ..Default::default()
    }
}

// ---- packets -------------------------------------------------------------------------------------

/// A frame from the container on c0: its MAC to the bridge's, IPv6 with traffic class `tc`.
fn from_container(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, tc: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = eth(BRIDGE_MAC, CONTAINER_MAC, ETH_P_IPV6);
    f.extend(ipv6_packet(src, dst, nh, 64, tc, l4));
    f
}

fn udp_from_local(body: &[u8]) -> Vec<u8> {
    from_container(
        LOCAL6,
        REMOTE6,
        UDP,
        0,
        &udp6(LOCAL6, REMOTE6, 5000, 53, body),
    )
}

/// The inner frame a peer's flannel-v6.1 sends our local container: `src` with traffic class
/// `tc`, an ICMPv6 echo.
fn inner_to_local(src: Ipv6Addr, tc: u8) -> Vec<u8> {
    let mut f = eth(OUR_VTEP6_MAC, PEER_VTEP6_MAC, ETH_P_IPV6);
    f.extend(ipv6_packet(
        src,
        LOCAL6,
        ICMPV6,
        63,
        tc,
        &icmpv6_echo(src, LOCAL6, b"hi"),
    ));
    f
}

/// VXLAN over IPv6 from `vtep` to us carrying `inner`.
fn vxlan6(vtep: Ipv6Addr, outer_tc: u8, inner: &[u8]) -> Vec<u8> {
    vxlan6_frame(
        (UNDERLAY_MAC, PEER_NIC_MAC),
        vtep,
        OUR_IP6,
        outer_tc,
        VXLAN_PORT,
        0x08,
        VNI,
        inner,
    )
}

/// Whether the outer UDP checksum of VXLAN-over-IPv6 frame `p` is right (and not 0).
fn outer_checksum_ok(p: &[u8]) -> bool {
    let (src, dst) = (addr(&p[22..38]), addr(&p[38..54]));
    p[60..62] != [0, 0] && l4_checksum6(src, dst, UDP, &p[54..]) == 0
}

fn addr(b: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))
}

/// ECN bits of the IPv6 header starting at `ip`.
fn ecn(ip: &[u8]) -> u8 {
    (ip[1] >> 4) & 3
}

// ---- encapsulation -------------------------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn encap_wraps_container_ipv6_in_vxlan_over_ipv6_with_a_valid_udp_checksum() {
    let mut e = env();
    let cases = [
        (
            "udp",
            UDP,
            udp6(LOCAL6, REMOTE6, 5000, 53, b"weft over ipv6"),
        ),
        (
            "tcp",
            TCP,
            tcp6(LOCAL6, REMOTE6, 40000, 80, b"GET / HTTP/1.1\r\n\r\n"),
        ),
        ("icmpv6", ICMPV6, icmpv6_echo(LOCAL6, REMOTE6, &[0xa5; 56])),
    ];
    for (what, nh, l4) in &cases {
        let input = from_container(LOCAL6, REMOTE6, *nh, 0, l4);
        let out = e.expect(
            what,
            ProgramKind::TcEncap,
            &input,
            on(e.c0),
            (TC_ACT_REDIRECT, counter6::ENCAPSULATED),
        );
        let p = &out.packet;
        assert_eq!(p.len(), input.len() + 70, "{what}: 70 bytes of headers");
        // Outer Ethernet from the FIB: peer NIC <- our NIC, IPv6.
        assert_eq!(
            (&p[0..6], &p[6..12], &p[12..14]),
            (&PEER_NIC_MAC[..], &UNDERLAY_MAC[..], &[0x86, 0xdd][..])
        );
        // Outer IPv6: traffic class 0 (inner Not-ECT), flow label 0, as flannel-v6.1.
        assert_eq!(
            &p[14..18],
            &[0x60, 0, 0, 0],
            "{what}: version, traffic class, flow label"
        );
        assert_eq!(
            u16::from_be_bytes([p[18], p[19]]) as usize,
            p.len() - 54,
            "{what}: payload length"
        );
        assert_eq!(
            (p[20], p[21]),
            (UDP, 64),
            "{what}: UDP, hop limit of `ttl auto`"
        );
        assert_eq!((addr(&p[22..38]), addr(&p[38..54])), (OUR_IP6, PEER_IP6));
        // UDP: entropy source port, 8472, length, a checksum that validates.
        let sport = u16::from_be_bytes([p[54], p[55]]);
        assert!(
            (32768..61000).contains(&sport),
            "{what}: source port {sport}"
        );
        assert_eq!(u16::from_be_bytes([p[56], p[57]]), VXLAN_PORT);
        assert_eq!(u16::from_be_bytes([p[58], p[59]]) as usize, p.len() - 54);
        assert!(
            outer_checksum_ok(p),
            "{what}: outer UDP checksum {:02x?}",
            &p[60..62]
        );
        // VXLAN, inner Ethernet: peer's flannel-v6 MAC <- ours.
        assert_eq!(&p[62..70], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(
            (&p[70..76], &p[76..82], &p[82..84]),
            (&PEER_VTEP6_MAC[..], &OUR_VTEP6_MAC[..], &[0x86, 0xdd][..])
        );
        // The inner packet as sent, hop limit decremented like a router.
        let mut expected = input[14..].to_vec();
        expected[7] -= 1;
        assert_eq!(&p[84..], &expected[..], "{what}: inner packet");
        // The same flow always gets the same source port.
        let again = e.run(ProgramKind::TcEncap, &input, e.c0);
        assert_eq!(
            &again.packet[54..56],
            &p[54..56],
            "{what}: flow entropy, not randomness"
        );
    }
    assert_eq!(
        e.count(counter::ENCAPSULATED),
        0,
        "IPv6 is not counted as IPv4"
    );
    // `weft status` reads it all from the pinned maps: both families' counters, the IPv6 side.
    let st = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(weft::status::collect(&e.pin_dir))
        .expect("status");
    assert_eq!(st.counter("ipv6: encapsulated"), 2 * cases.len() as u64);
    let v6 = st.ipv6.clone().expect("the IPv6 side in the status");
    assert_eq!(
        (v6.vtep_ip, v6.subnet),
        (OUR_IP6, Some("fc00:0:0:10::/64".parse().unwrap()))
    );
    assert_eq!(
        v6.peers[0].0,
        "fc00:0:0:54::/64".parse::<ipnet::Ipv6Net>().unwrap()
    );
    assert_eq!(v6.known_vteps, vec![PEER_IP6, PEER2_IP6]);
    assert_eq!(
        v6.local_bindings,
        vec![(LOCAL6, e.c0, mac_text(CONTAINER_MAC))]
    );
    let text = st.to_string();
    assert!(
        text.contains("fc00:0:0:54::/64") && text.contains("ipv6: encapsulated"),
        "{text}"
    );
}

/// RFC 6040 on encapsulation, as the kernel's `ip_tunnel_ecn_encap`: ECT copied, CE sent as
/// ECT(0), DSCP not copied; the checksum stays right.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn encap_copies_ecn_as_the_kernel_vxlan_does() {
    let e = env();
    for (inner_tc, outer_ecn) in [(0x01, 1), (0x02, 2), (0x03, 2), (0xb8, 0), (0xbb, 2)] {
        let input = from_container(
            LOCAL6,
            REMOTE6,
            UDP,
            inner_tc,
            &udp6(LOCAL6, REMOTE6, 5000, 53, b"ecn"),
        );
        let out = e.run(ProgramKind::TcEncap, &input, e.c0);
        assert_eq!(out.action, TC_ACT_REDIRECT);
        let tc = ((out.packet[14] & 0x0f) << 4) | (out.packet[15] >> 4);
        assert_eq!(tc, outer_ecn, "inner traffic class {inner_tc:#04x}");
        assert!(outer_checksum_ok(&out.packet));
    }
}

/// What the kernel path must judge, and what is forged.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn encap_hands_to_the_kernel_what_it_must_judge_and_drops_forged_sources() {
    let mut e = env();
    let c0 = on(e.c0);
    let good = udp_from_local(b"x");
    let mut hop1 = good.clone();
    hop1[21] = 1;
    let mut vlan = good[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&good[12..]);
    // A hop-by-hop options header (PadN) before the UDP datagram.
    let udp = udp6(LOCAL6, REMOTE6, 5000, 53, b"x");
    let mut hbh = vec![UDP, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&udp);
    let ext = from_container(LOCAL6, REMOTE6, 0, 0, &hbh);
    let mut no_sum = udp.clone();
    no_sum[6..8].copy_from_slice(&[0, 0]);
    let big = udp_from_local(&vec![0u8; 1500 - 40 - 8 - 70 + 1]);
    let fits = udp_from_local(&vec![0u8; 1500 - 40 - 8 - 70]);
    let unbound = from_container(
        "fc00:0:0:10::9".parse().unwrap(),
        REMOTE6,
        ICMPV6,
        0,
        &icmpv6_echo("fc00:0:0:10::9".parse().unwrap(), REMOTE6, b"x"),
    );
    let outside: Ipv6Addr = "fc00:0:0:99::9".parse().unwrap();
    let link_local: Ipv6Addr = "fe80::42:aff:fe01:a05".parse().unwrap();
    let cases: Vec<Case> = vec![
        (
            "not a remote subnet",
            from_container(
                LOCAL6,
                "2001:db8::1".parse().unwrap(),
                ICMPV6,
                0,
                &icmpv6_echo(LOCAL6, "2001:db8::1".parse().unwrap(), b"x"),
            ),
            c0,
            (TC_ACT_OK, counter6::PASS_NOT_REMOTE),
        ),
        (
            "hop limit 1",
            hop1,
            c0,
            (TC_ACT_OK, counter6::PASS_HOP_LIMIT),
        ),
        ("vlan tag", vlan, c0, (TC_ACT_OK, counter::PASS_VLAN)),
        (
            "extension header",
            ext,
            c0,
            (TC_ACT_OK, counter6::PASS_EXT_HEADERS),
        ),
        (
            "udp without checksum",
            from_container(LOCAL6, REMOTE6, UDP, 0, &no_sum),
            c0,
            (TC_ACT_OK, counter6::PASS_CHECKSUM),
        ),
        (
            "too big for the underlay",
            big,
            c0,
            (TC_ACT_OK, counter6::PASS_TOO_BIG),
        ),
        (
            "just fits",
            fits,
            c0,
            (TC_ACT_REDIRECT, counter6::ENCAPSULATED),
        ),
        (
            "truncated",
            good[..60].to_vec(),
            c0,
            (TC_ACT_OK, counter6::PASS_MALFORMED),
        ),
        (
            "unbound source in our subnet",
            unbound,
            c0,
            (TC_ACT_OK, counter6::PASS_SOURCE_UNBOUND),
        ),
        (
            "bound source from another port",
            good.clone(),
            on(e.c1),
            (TC_ACT_SHOT, counter6::DROP_SOURCE_OTHER_PORT),
        ),
        (
            "source outside our subnet",
            from_container(
                outside,
                REMOTE6,
                ICMPV6,
                0,
                &icmpv6_echo(outside, REMOTE6, b"x"),
            ),
            c0,
            (TC_ACT_SHOT, counter6::DROP_SOURCE_OUTSIDE),
        ),
        (
            "link-local source",
            from_container(
                link_local,
                REMOTE6,
                ICMPV6,
                0,
                &icmpv6_echo(link_local, REMOTE6, b"x"),
            ),
            c0,
            (TC_ACT_SHOT, counter6::DROP_SOURCE_OUTSIDE),
        ),
    ];
    for (what, packet, skb, expected) in &cases {
        e.expect(what, ProgramKind::TcEncap, packet, *skb, *expected);
    }

    // GSO: judged by segment; without an underlay that keeps GSO packets whole, the kernel
    // path carries them (only it can checksum every segment).
    let tcp = from_container(
        LOCAL6,
        REMOTE6,
        TCP,
        0,
        &tcp6(LOCAL6, REMOTE6, 40000, 80, &[0x5a; 2 * 1400]),
    );
    let c0_index = e.c0;
    let gso = |gso_size| SkbContext {
        ifindex: c0_index,
        gso_size,
        gso_segs: 2,
    };
    // 40 + 20 + 1400 + 70 = 1530 > 1500.
    e.expect(
        "gso segments too big",
        ProgramKind::TcEncap,
        &tcp,
        gso(1400),
        (TC_ACT_OK, counter6::PASS_GSO_TOO_BIG),
    );
    e.dp.configure6(&settings6(false)).unwrap();
    e.expect(
        "gso on an underlay that segments",
        ProgramKind::TcEncap,
        &tcp,
        gso(1370),
        (TC_ACT_OK, counter6::PASS_GSO_CHECKSUM),
    );
    e.dp.configure6(&settings6(true)).unwrap();
    let before = e.count(counter6::PASS_GSO_CHECKSUM);
    e.run_skb(ProgramKind::TcEncap, &tcp, gso(1370));
    assert_eq!(
        e.count(counter6::PASS_GSO_CHECKSUM),
        before,
        "an underlay that keeps GSO whole takes it"
    );

    // IPv6 not configured (an IPv4-only network): every IPv6 frame passes.
    e.dp.configure6(&NodeSettings6 {
        vtep_ip: Ipv6Addr::UNSPECIFIED,
        ..settings6(true)
    })
    .unwrap();
    e.expect(
        "not configured",
        ProgramKind::TcEncap,
        &udp_from_local(b"x"),
        c0,
        (TC_ACT_OK, counter6::PASS_NOT_CONFIGURED),
    );
    // And IPv4 still goes its own way: its own checks, its own counters.
    e.dp.upsert_peer(
        "10.1.54.0/24".parse().unwrap(),
        PEER_IP,
        MacAddr(PEER_VTEP_MAC),
    )
    .unwrap();
    let mut v4 = eth(BRIDGE_MAC, CONTAINER_MAC, 0x0800);
    let icmp = [8u8, 0, 0xf7, 0xfe, 0, 1, 0, 0];
    v4.extend(ipv4_header(
        "10.1.10.9".parse().unwrap(),
        "10.1.54.3".parse().unwrap(),
        1,
        64,
        icmp.len(),
        0,
    ));
    v4.extend_from_slice(&icmp);
    assert_eq!(ipv4_checksum(&v4[14..34]), 0);
    e.expect(
        "ipv4 unbound",
        ProgramKind::TcEncap,
        &v4,
        c0,
        (TC_ACT_OK, counter::PASS_SOURCE_UNBOUND),
    );
}

/// Our bytes against what a kernel vxlan device configured as flanneld configures
/// flannel-v6.1 sends for the same inner packet: everything but the UDP source port (flow
/// entropy) and the checksum that covers it, which must be the kernel's adjusted for our port.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn encap_matches_a_kernel_flannel_v6_device() {
    matches_a_kernel_flannel_v6_device(ProgramKind::TcEncap);
}

/// The same for the host program: the frame the kernel hands to flannel-v6.1 (its
/// neighbour's MAC, the device's own) leaves as the device itself would send it.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn host_encap_matches_a_kernel_flannel_v6_device() {
    matches_a_kernel_flannel_v6_device(ProgramKind::TcHostEncap);
}

fn matches_a_kernel_flannel_v6_device(kind: ProgramKind) {
    let mut e = env();
    let src: Ipv6Addr = "fc00:0:0:10::".parse().unwrap();
    e.dp.upsert_local(&LocalEntry6 {
        ip: src,
        host_ifindex: e.c0,
        mac: MacAddr(CONTAINER_MAC),
        gateway_mac: MacAddr(BRIDGE_MAC),
    })
    .unwrap();
    let batch = format!(
        "link add flannel-v6.1 address {mac} type vxlan id 1 local {ours} dev ul0 dstport 8472 nolearning ttl auto
addr add {src}/128 dev flannel-v6.1 nodad
link set flannel-v6.1 up
neigh replace fc00:0:0:54:: dev flannel-v6.1 lladdr {peer_mac} nud permanent
route replace fc00:0:0:54::/64 via fc00:0:0:54:: dev flannel-v6.1 onlink
",
        mac = mac_text(OUR_VTEP6_MAC),
        ours = OUR_IP6,
        peer_mac = mac_text(PEER_VTEP6_MAC),
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), batch).unwrap();
    sh(&["ip", "-batch", &file.path().to_string_lossy()]);
    sh(&[
        "bridge",
        "fdb",
        "replace",
        &mac_text(PEER_VTEP6_MAC),
        "dev",
        "flannel-v6.1",
        "dst",
        &PEER_IP6.to_string(),
        "self",
        "permanent",
    ]);

    let kernel = capture_vxlan6_on(e.ul0, || {
        let s = UdpSocket::bind((src, 0)).expect("bind");
        s.send_to(b"weft wire compatibility over ipv6", (REMOTE6, 9999))
            .expect("send");
    });
    let input = if kind == ProgramKind::TcHostEncap {
        // The kernel's inner packet as it entered flannel-v6.1's egress.
        let mut input = eth(PEER_VTEP6_MAC, OUR_VTEP6_MAC, ETH_P_IPV6);
        input.extend_from_slice(&kernel[84..]);
        input
    } else {
        // As it would have left a container one hop earlier.
        let mut input = eth(BRIDGE_MAC, CONTAINER_MAC, ETH_P_IPV6);
        input.extend_from_slice(&kernel[84..]);
        input[21] += 1;
        input
    };
    let ours = e.run(kind, &input, e.c0);
    assert_eq!(ours.action, TC_ACT_REDIRECT);
    let ours = ours.packet;
    assert_eq!(ours.len(), kernel.len(), "same length");
    for i in (0..kernel.len()).filter(|i| !(54..56).contains(i) && !(60..62).contains(i)) {
        assert_eq!(
            ours[i], kernel[i],
            "byte {i} differs\nkernel {kernel:02x?}\nours   {ours:02x?}"
        );
    }
    // (Captured before the veth "completes" it, the kernel's inner UDP checksum may still be
    // the pending pseudo-header sum: both outer checksums assume the completed one.)
    let (k, o) = (
        u16::from_be_bytes([kernel[54], kernel[55]]),
        u16::from_be_bytes([ours[54], ours[55]]),
    );
    let adjusted = {
        let kernel_sum = u16::from_be_bytes([kernel[60], kernel[61]]);
        let mut sum = u32::from(!kernel_sum) + u32::from(!k) + u32::from(o);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    };
    assert_eq!(
        u16::from_be_bytes([ours[60], ours[61]]),
        adjusted,
        "the kernel's checksum, for our source port"
    );
}

/// Runs `send` and returns the first VXLAN-over-IPv6 frame leaving `ifindex`.
fn capture_vxlan6_on(ifindex: u32, send: impl FnOnce()) -> Vec<u8> {
    const ETH_P_ALL: u16 = 0x0003;
    // SAFETY: plain socket calls with buffers that outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, ETH_P_ALL.to_be() as i32);
        assert!(fd >= 0, "AF_PACKET socket");
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of_val(&sll) as u32;
        assert_eq!(
            libc::bind(fd, &sll as *const _ as *const libc::sockaddr, len),
            0
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        let tv_len = std::mem::size_of_val(&tv) as u32;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            tv_len,
        );
        send();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            if n > 62
                && buf[12..14] == [0x86, 0xdd]
                && buf[20] == UDP
                && u16::from_be_bytes([buf[56], buf[57]]) == VXLAN_PORT
            {
                libc::close(fd);
                return buf[..n as usize].to_vec();
            }
        }
        libc::close(fd);
        panic!("the kernel vxlan device sent nothing on ul0");
    }
}

// ---- decapsulation -------------------------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn decap_delivers_to_the_local_container_and_passes_to_the_stack_on_xdp() {
    let mut e = env();
    let frame = vxlan6(PEER_IP6, 0, &inner_to_local(REMOTE6, 0));
    let out = e.expect(
        "tc",
        ProgramKind::TcDecap,
        &frame,
        on(e.ul0),
        (TC_ACT_REDIRECT, counter6::DECAPSULATED),
    );
    // Straight into the container on c0: its MAC from the bridge's, hop limit - 1.
    assert_eq!(
        (&out.packet[0..6], &out.packet[6..12], &out.packet[12..14]),
        (&CONTAINER_MAC[..], &BRIDGE_MAC[..], &[0x86, 0xdd][..])
    );
    let mut inner = frame[84..].to_vec();
    inner[7] -= 1;
    assert_eq!(&out.packet[14..], &inner[..]);
    assert_eq!(e.count(counter6::DELIVERED_TO_CONTAINER), 1);

    // XDP: the inner frame goes up the stack, addressed to our NIC.
    let out = e.expect(
        "xdp",
        ProgramKind::XdpDecap,
        &frame,
        SkbContext::default(),
        (XDP_PASS, counter6::DECAPSULATED),
    );
    let mut expected = frame[70..].to_vec();
    expected[0..6].copy_from_slice(&UNDERLAY_MAC);
    expected[6..12].copy_from_slice(&PEER_NIC_MAC);
    assert_eq!(out.packet, expected);

    // Too big for the container's link: decapsulated, but the stack answers "packet too big".
    sh(&["ip", "link", "set", "c0", "mtu", "1280"]);
    let big = {
        let mut f = eth(OUR_VTEP6_MAC, PEER_VTEP6_MAC, ETH_P_IPV6);
        f.extend(ipv6_packet(
            REMOTE6,
            LOCAL6,
            ICMPV6,
            63,
            0,
            &icmpv6_echo(REMOTE6, LOCAL6, &[7; 1300]),
        ));
        vxlan6(PEER_IP6, 0, &f)
    };
    let out = e.run(ProgramKind::TcDecap, &big, e.ul0);
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(e.count(counter6::DECAP_TOO_BIG), 1);
}

/// Frames that must not be decapsulated, on both hooks, with the verdict and counter the
/// kernel path's behaviour calls for.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn decap_refuses_what_flannel_v6_would_refuse() {
    let mut e = env();
    let inner = inner_to_local(REMOTE6, 0);
    let good = vxlan6(PEER_IP6, 0, &inner);
    let mut zero_sum = good.clone();
    zero_sum[60..62].copy_from_slice(&[0, 0]);
    let mut inner_v4 = eth(OUR_VTEP6_MAC, PEER_VTEP6_MAC, 0x0800);
    inner_v4.extend(ipv4_header(
        "10.1.54.3".parse().unwrap(),
        "10.1.10.5".parse().unwrap(),
        1,
        63,
        8,
        0,
    ));
    inner_v4.extend_from_slice(&[0, 0, 0xff, 0xfe, 0, 1, 0, 0]);
    let mut not_our_mac = inner.clone();
    not_our_mac[0..6].copy_from_slice(&PEER_VTEP6_MAC);
    let mut inner_ext = eth(OUR_VTEP6_MAC, PEER_VTEP6_MAC, ETH_P_IPV6);
    let mut hbh = vec![ICMPV6, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend(icmpv6_echo(REMOTE6, LOCAL6, b"x"));
    inner_ext.extend(ipv6_packet(REMOTE6, LOCAL6, 0, 63, 0, &hbh));
    // The outer datagram behind a fragment header (first and only fragment).
    let mut outer_frag = good[..54].to_vec();
    outer_frag[20] = 44;
    let plen = u16::from_be_bytes([outer_frag[18], outer_frag[19]]) + 8;
    outer_frag[18..20].copy_from_slice(&plen.to_be_bytes());
    outer_frag.extend_from_slice(&[UDP, 0, 0, 0, 0, 0, 0, 1]);
    outer_frag.extend_from_slice(&good[54..]);
    let vx = |vtep, port, flags, vni, inner: &[u8]| {
        vxlan6_frame(
            (UNDERLAY_MAC, PEER_NIC_MAC),
            vtep,
            OUR_IP6,
            0,
            port,
            flags,
            vni,
            inner,
        )
    };
    let mut other_host = vx(PEER_IP6, VXLAN_PORT, 0x08, VNI, &inner);
    other_host[53] = 0x42;
    use counter6::*;
    let cases: Vec<(&str, Vec<u8>, bool, u32)> = vec![
        // (what, frame, dropped, counter)
        (
            "another port",
            vx(PEER_IP6, 4789, 0x08, VNI, &inner),
            false,
            PASS_NOT_VXLAN,
        ),
        ("for another address", other_host, false, PASS_NOT_VXLAN),
        (
            "outer extension header",
            outer_frag,
            false,
            PASS_EXT_HEADERS,
        ),
        (
            "truncated outer",
            good[..60].to_vec(),
            false,
            PASS_MALFORMED,
        ),
        ("zero udp checksum", zero_sum, true, DROP_ZERO_CHECKSUM),
        (
            "unknown vtep",
            vx(STRANGER_IP6, VXLAN_PORT, 0x08, VNI, &inner),
            true,
            DROP_UNKNOWN_SOURCE,
        ),
        (
            // Refused as a sender without a lease, whatever else is wrong with its frame.
            "unknown vtep, wrong vni",
            vx(STRANGER_IP6, VXLAN_PORT, 0x08, 7, &inner),
            true,
            DROP_UNKNOWN_SOURCE,
        ),
        (
            "unknown vtep, inner source of another vtep",
            vxlan6(STRANGER_IP6, 0, &inner_to_local(REMOTE2_6, 0)),
            true,
            DROP_UNKNOWN_SOURCE,
        ),
        (
            "wrong vni",
            vx(PEER_IP6, VXLAN_PORT, 0x08, 7, &inner),
            true,
            DROP_WRONG_VNI,
        ),
        (
            "no I flag",
            vx(PEER_IP6, VXLAN_PORT, 0x00, VNI, &inner),
            true,
            DROP_MALFORMED,
        ),
        (
            "truncated inner",
            good[..100].to_vec(),
            true,
            DROP_MALFORMED,
        ),
        (
            "inner source of another vtep",
            vxlan6(PEER_IP6, 0, &inner_to_local(REMOTE2_6, 0)),
            true,
            DROP_INNER_SOURCE,
        ),
        (
            "inner source nobody leased",
            vxlan6(
                PEER_IP6,
                0,
                &inner_to_local("fc00:0:0:99::3".parse().unwrap(), 0),
            ),
            true,
            DROP_INNER_SOURCE,
        ),
        (
            "inner ipv4",
            vxlan6(PEER_IP6, 0, &inner_v4),
            false,
            PASS_INNER_NOT_OURS,
        ),
        (
            "inner not our vtep mac",
            vxlan6(PEER_IP6, 0, &not_our_mac),
            false,
            PASS_INNER_NOT_OURS,
        ),
        (
            "inner extension header",
            vxlan6(PEER_IP6, 0, &inner_ext),
            false,
            PASS_EXT_HEADERS,
        ),
    ];
    for (what, frame, dropped, reason) in &cases {
        let (tc, xdp) = if *dropped {
            (TC_ACT_SHOT, XDP_DROP)
        } else {
            (TC_ACT_OK, XDP_PASS)
        };
        e.expect(what, ProgramKind::TcDecap, frame, on(e.ul0), (tc, *reason));
        e.expect(
            what,
            ProgramKind::XdpDecap,
            frame,
            SkbContext::default(),
            (xdp, *reason),
        );
    }
    // The frame they were made from is fine, so each case failed for its own reason.
    e.expect(
        "good",
        ProgramKind::XdpDecap,
        &good,
        SkbContext::default(),
        (XDP_PASS, DECAPSULATED),
    );
    // IPv4 VXLAN still goes its own way.
    e.expect(
        "ipv4 frame",
        ProgramKind::XdpDecap,
        &eth(UNDERLAY_MAC, PEER_NIC_MAC, 0x0806)
            .into_iter()
            .chain([0u8; 28])
            .collect::<Vec<_>>(),
        SkbContext::default(),
        (XDP_PASS, counter::PASS_NOT_IPV4),
    );
}

/// RFC 6040 for every combination of outer and inner ECN, as the kernel's
/// `IP6_ECN_decapsulate`: outer CE marks an ECT inner packet, drops a Not-ECT one, and
/// nothing else changes the inner header.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn decap_applies_rfc6040_in_every_combination() {
    let mut e = env();
    for outer in 0..4u8 {
        for inner in 0..4u8 {
            // DSCP bits on both, to see they are left alone.
            let frame = vxlan6(
                PEER_IP6,
                0x28 | outer,
                &inner_to_local(REMOTE6, 0xa0 | inner),
            );
            let what = format!("outer ecn {outer}, inner ecn {inner}");
            if (outer, inner) == (3, 0) {
                e.expect(
                    &what,
                    ProgramKind::XdpDecap,
                    &frame,
                    SkbContext::default(),
                    (XDP_DROP, counter6::DROP_ECN),
                );
                e.expect(
                    &what,
                    ProgramKind::TcDecap,
                    &frame,
                    on(e.ul0),
                    (TC_ACT_SHOT, counter6::DROP_ECN),
                );
                continue;
            }
            let set_ce = outer == 3 && inner != 3;
            let out = e.run(ProgramKind::XdpDecap, &frame, 0);
            assert_eq!(out.action, XDP_PASS, "{what}");
            let ip = &out.packet[14..];
            assert_eq!(ecn(ip), if set_ce { 3 } else { inner }, "{what}");
            assert_eq!(
                (ip[0], ip[1] & 0xcf),
                (0x6a, 0x00),
                "{what}: DSCP and flow label unchanged"
            );
            assert_eq!(&ip[2..], &frame[86..], "{what}: nothing else changed");
            let out = e.run(ProgramKind::TcDecap, &frame, e.ul0);
            assert_eq!(out.action, TC_ACT_REDIRECT, "{what}");
            assert_eq!(
                ecn(&out.packet[14..]),
                if set_ce { 3 } else { inner },
                "{what} (tc)"
            );
        }
    }
    // Two CE marks each on XDP and TC (outer CE over ECT(1) and over ECT(0)).
    assert_eq!(e.count(counter6::ECN_CE_SET), 4);
}

/// IPv6's cost per packet, as ebpf_programs.rs measures IPv4's: a container's UDP packet
/// encapsulated on its port, a peer's packet decapsulated for the local container.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn per_packet_cost_of_ipv6_encapsulation_and_decapsulation() {
    let e = env();
    let to_local = vxlan6(PEER_IP6, 0, &inner_to_local(REMOTE6, 0));
    let cases = [
        (
            "ipv6 encap, container port",
            ProgramKind::TcEncap,
            udp_from_local(&[0; 18]),
            e.c0,
            TC_ACT_REDIRECT,
        ),
        (
            "ipv6 decap, tc",
            ProgramKind::TcDecap,
            to_local.clone(),
            e.ul0,
            TC_ACT_REDIRECT,
        ),
        (
            "ipv6 decap, xdp",
            ProgramKind::XdpDecap,
            to_local,
            e.ul0,
            XDP_PASS,
        ),
    ];
    per_packet_cost(&e.dp, &cases);
}

/// Encapsulation reuses the FIB's answer for an IPv6 VTEP for a few milliseconds (per CPU), as
/// for IPv4: a changed underlay neighbour, then a blackholed route, reach it within a second.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn encap_follows_underlay_neighbour_and_route_changes_over_ipv6() {
    let e = env();
    let input = udp_from_local(b"cached");
    encap_follows_underlay_changes("-6", &PEER_IP6.to_string(), || {
        e.run(ProgramKind::TcEncap, &input, e.c0)
    });
}
