//! What the eBPF programs refuse to trust, run through BPF_PROG_TEST_RUN (and
//! one real veth where the kernel's test run cannot set the skb's VLAN
//! metadata): VLAN tags, RFC 6040 on decapsulation, the outer TTL and UDP
//! checksum, GSO segment sizes, forged sources on both sides, IPv4 options.
//!
//! Each test runs in a private network namespace of its own thread and pins
//! under a private bpffs instance, both gone when the test ends.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use weft::{
    datapath::{Datapath, LocalEntry, NodeSettings, ProgramKind, SkbContext, TestRunOutput},
    lease::MacAddr,
};
use weft_common::counter;
use weft_tests::netns::sh;
use weft_tests::packet::verdict::*;
use weft_tests::packet::{ipv4_checksum as checksum, ICMP, TCP, UDP, VNI, VXLAN_PORT};

mod testrun;
use testrun::*;

const PEER2_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 15, 23);
const OTHER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x01, 0x0a, 0x06];
/// Bound to port `c0` with `CONTAINER_MAC`.
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 1, 10, 5);
/// In PEER_IP's subnet 10.1.54.0/24.
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 1, 54, 3);
/// In PEER2_IP's subnet 10.1.55.0/24.
const REMOTE2: Ipv4Addr = Ipv4Addr::new(10, 1, 55, 3);

// ---- environment -------------------------------------------------------------

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// A loaded datapath in this thread's private namespace: underlay `ul0`
/// (peers reachable through permanent neighbours), bridge `br0` with ports
/// `c0` and `c1` (veths whose other ends `c0p`/`c1p` play the containers).
struct Env {
    dp: Datapath,
    pin_dir: PathBuf,
    ul0: u32,
    br0: u32,
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

fn env() -> Env {
    // SAFETY: affects only this thread's network namespace.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let batch = format!(
        "link set lo up
link add ul0 address {ul} type veth peer name ul0-wire
link set ul0-wire up
addr add 172.16.15.21/24 dev ul0
link set ul0 up
neigh replace 172.16.15.22 lladdr {peer} dev ul0 nud permanent
neigh replace 172.16.15.23 lladdr {peer} dev ul0 nud permanent
link add br0 address {br} type bridge
addr add 10.1.10.1/24 dev br0
link set br0 up
link add c0 type veth peer name c0p
link add c1 type veth peer name c1p
link set c0 master br0 up
link set c1 master br0 up
link set c0p address {ct} up
link set c1p up
",
        ul = mac_text(UNDERLAY_MAC),
        peer = mac_text(PEER_NIC_MAC),
        br = mac_text(BRIDGE_MAC),
        ct = mac_text(CONTAINER_MAC),
    );
    let file = tempfile::NamedTempFile::new().expect("batch file");
    std::fs::write(file.path(), batch).expect("write batch");
    sh(&["ip", "-batch", &file.path().to_string_lossy()]);
    sh(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);

    let bpffs = tempfile::Builder::new()
        .prefix("weft-bpffs-trust-")
        .tempdir()
        .expect("tempdir");
    sh(&["mount", "-t", "bpf", "bpf", &bpffs.path().to_string_lossy()]);
    let pin_dir = bpffs.path().join("weft");
    let mut dp = Datapath::load(&pin_dir).expect("load the eBPF object");
    let e = |name| ifindex(name);
    let (ul0, br0, c0, c1) = (e("ul0"), e("br0"), e("c0"), e("c1"));
    dp.configure(&node_settings(ul0, br0)).expect("configure");
    for (subnet, vtep) in [("10.1.54.0/24", PEER_IP), ("10.1.55.0/24", PEER2_IP)] {
        dp.upsert_peer(subnet.parse().unwrap(), vtep, MacAddr(PEER_VTEP_MAC))
            .expect("peer");
        dp.add_vtep(vtep).expect("vtep");
    }
    dp.upsert_local(&LocalEntry {
        ip: LOCAL,
        host_ifindex: c0,
        mac: MacAddr(CONTAINER_MAC),
        gateway_mac: MacAddr(BRIDGE_MAC),
    })
    .expect("bind");
    Env {
        dp,
        pin_dir,
        ul0,
        br0,
        c0,
        c1,
        bpffs,
    }
}

impl Env {
    fn run(&self, kind: ProgramKind, packet: &[u8], ifindex: u32) -> TestRunOutput {
        self.run_skb(
            kind,
            packet,
            SkbContext {
                ifindex,
                ..Default::default()
            },
        )
    }

    fn run_skb(&self, kind: ProgramKind, packet: &[u8], skb: SkbContext) -> TestRunOutput {
        self.dp
            .test_run_skb(kind, packet, skb)
            .unwrap_or_else(|e| panic!("test run of {kind:?} on {packet:02x?}: {e}"))
    }

    fn count(&mut self, index: u32) -> u64 {
        self.dp.counters().expect("counters").get(index)
    }

    /// Runs `kind` and checks it counted exactly `reason` once and returned `action`.
    fn expect(
        &mut self,
        what: &str,
        kind: ProgramKind,
        packet: &[u8],
        ifindex: u32,
        action: u32,
        reason: u32,
    ) -> TestRunOutput {
        let before = self.dp.counters().expect("counters");
        let out = self.run(kind, packet, ifindex);
        let after = self.dp.counters().expect("counters");
        assert_eq!(out.action, action, "{what}: action");
        let changed: Vec<_> = after
            .values
            .iter()
            .zip(&before.values)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        assert!(
            changed.contains(&(counter::name(reason).unwrap(), 1)),
            "{what}: expected one count of {:?}, counters changed: {changed:?}",
            counter::name(reason).unwrap()
        );
        if action == TC_ACT_OK && kind == ProgramKind::TcEncap {
            assert_eq!(out.packet, packet, "{what}: handed to the kernel untouched");
        }
        out
    }
}

// ---- packets -------------------------------------------------------------------

/// One's-complement sum of big-endian words, folded, not complemented.
fn sum(bytes: &[u8]) -> u32 {
    let mut s: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> Vec<u8> {
    let mut p = src.to_vec();
    p.extend_from_slice(dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// An IPv4 packet: header (with `options`), then `l4`.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    tos: u8,
    ttl: u8,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let hlen = 20 + options.len();
    let mut h = vec![0x40 | (hlen / 4) as u8, tos];
    h.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// How an L4 checksum is left in a test packet.
#[derive(Clone, Copy, Debug, PartialEq)]
enum L4Sum {
    /// Correct.
    Complete,
    /// CHECKSUM_PARTIAL as a local stack hands it to the device: the
    /// pseudo-header sum, to be completed later.
    Partial,
    /// Zero ("no checksum", UDP only).
    Zero,
}

/// A TCP (`proto` 6) or UDP (17) segment from `src` to `dst` carrying `payload`.
fn l4(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], how: L4Sum) -> Vec<u8> {
    let (mut seg, at) = if proto == TCP {
        let mut t = vec![
            0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
        ];
        t.extend_from_slice(&[0, 0, 0, 0]);
        (t, 16)
    } else {
        let len = (8 + payload.len()) as u16;
        let mut u = vec![0x9c, 0x40, 0x13, 0x89];
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        (u, 6)
    };
    seg.extend_from_slice(payload);
    let p = pseudo(&src.octets(), &dst.octets(), proto, seg.len());
    let value = match how {
        L4Sum::Complete => {
            let mut all = p.clone();
            all.extend_from_slice(&seg);
            match checksum(&all) {
                0 if proto == UDP => 0xffff,
                c => c,
            }
        }
        L4Sum::Partial => sum(&p) as u16,
        L4Sum::Zero => 0,
    };
    seg[at..at + 2].copy_from_slice(&value.to_be_bytes());
    seg
}

fn icmp_echo(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A container's frame to the gateway: ICMP echo from `src` to `dst`.
fn from_container(src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let ip = ipv4(src, dst, ICMP, 0, 64, &[], &icmp_echo(b"weft trust"));
    ether(BRIDGE_MAC, src_mac, 0x0800, &ip)
}

/// VXLAN from `vtep` (outer TOS `outer_tos`, outer IP `options`) carrying `inner_ip`.
fn vxlan(vtep: Ipv4Addr, outer_tos: u8, options: &[u8], inner_ip: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x9c, 0x40];
    payload.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    payload.extend_from_slice(&((16 + 14 + inner_ip.len()) as u16).to_be_bytes());
    payload.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    payload.extend_from_slice(&VNI.to_be_bytes()[1..]);
    payload.push(0);
    payload.extend(ether(OUR_VTEP_MAC, PEER_VTEP_MAC, 0x0800, inner_ip));
    let mut ip = ipv4(vtep, OUR_IP, UDP, outer_tos, 64, options, &payload);
    ip[6] = 0; // DF clear, as flannel.1 sends
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20 + options.len()]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ether(UNDERLAY_MAC, PEER_NIC_MAC, 0x0800, &ip)
}

/// An ICMP echo from `src` to our local container, as a peer's flannel.1 carries it.
fn inner_to_local(src: Ipv4Addr, tos: u8) -> Vec<u8> {
    ipv4(
        src,
        LOCAL,
        ICMP,
        tos,
        63,
        &[],
        &icmp_echo(b"to the container"),
    )
}

/// Whether the outer UDP checksum of the VXLAN frame `p` is right for the
/// bytes as they will be on the wire: an inner TCP/UDP checksum left partial
/// is completed first, as the kernel completes it before the packet leaves.
fn outer_udp_checksum_ok(p: &[u8]) -> bool {
    let mut p = p.to_vec();
    let inner = 64;
    let ihl = usize::from(p[inner] & 0xf) * 4;
    let proto = p[inner + 9];
    let l4 = inner + ihl;
    let at = match proto {
        TCP => Some(l4 + 16),
        UDP if p[l4 + 6..l4 + 8] != [0, 0] => Some(l4 + 6),
        _ => None,
    };
    // The inner L4 bytes with their pseudo-header: 0 when the checksum is complete.
    let inner_sum = |p: &[u8]| {
        let mut all = pseudo(
            &p[inner + 12..inner + 16],
            &p[inner + 16..inner + 20],
            proto,
            p.len() - l4,
        );
        all.extend_from_slice(&p[l4..]);
        checksum(&all)
    };
    if let Some(at) = at {
        if inner_sum(&p) != 0 {
            // Partial: the field holds the pseudo-header sum; complete it.
            p[at..at + 2].copy_from_slice(&[0, 0]);
            let c = inner_sum(&p);
            p[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    let mut all = pseudo(&p[26..30], &p[30..34], UDP, p.len() - 34);
    all.extend_from_slice(&p[34..]);
    checksum(&all) == 0
}

// ---- VLAN ----------------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn inline_vlan_tags_are_handed_to_the_kernel_untouched() {
    let mut e = env();
    let ip = ipv4(LOCAL, REMOTE, ICMP, 0, 64, &[], &icmp_echo(b"vlan"));
    for tpid in [0x8100u16, 0x88a8] {
        let mut tagged = tpid.to_be_bytes().to_vec();
        tagged.extend_from_slice(&[0x00, 0x05, 0x08, 0x00]);
        tagged.extend_from_slice(&ip);
        // ether() appends its own ethertype: build the tag in place of it.
        let mut frame = BRIDGE_MAC.to_vec();
        frame.extend_from_slice(&CONTAINER_MAC);
        frame.extend_from_slice(&tagged);
        let c0 = e.c0;
        e.expect(
            &format!("tag {tpid:#06x}"),
            ProgramKind::TcEncap,
            &frame,
            c0,
            TC_ACT_OK,
            counter::PASS_VLAN,
        );
    }
    assert_eq!(e.count(counter::ENCAPSULATED), 0);
}

/// Sends `frame` out of `ifname` through a packet socket.
fn send_raw(ifname: &str, frame: &[u8]) {
    // SAFETY: plain socket calls on buffers that outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex(ifname) as i32;
        sll.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n, frame.len() as isize, "send on {ifname}: {err}");
    }
}

fn wait_for_count(e: &mut Env, index: u32, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = e.count(index);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// veth receive moves an 802.1Q tag into skb metadata before TC runs (the
/// frame then looks like plain IPv4); bpf_redirect would keep the tag and the
/// underlay would emit it. BPF_PROG_TEST_RUN cannot set that metadata, so a
/// real frame crosses a real veth here.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn vlan_tag_in_skb_metadata_is_never_tunnelled() {
    let mut e = env();
    e.dp.attach_encap("c0").expect("attach encap to c0");
    // The same packet untagged is encapsulated: the program runs and would tunnel it.
    send_raw("c0p", &from_container(CONTAINER_MAC, LOCAL, REMOTE));
    let encapsulated = wait_for_count(&mut e, counter::ENCAPSULATED, 1);
    assert_eq!(
        encapsulated, 1,
        "the untagged control frame was encapsulated once"
    );

    let ip = ipv4(LOCAL, REMOTE, ICMP, 0, 64, &[], &icmp_echo(b"vlan 5"));
    let mut frame = BRIDGE_MAC.to_vec();
    frame.extend_from_slice(&CONTAINER_MAC);
    frame.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x08, 0x00]);
    frame.extend_from_slice(&ip);
    send_raw("c0p", &frame);
    assert_eq!(
        wait_for_count(&mut e, counter::PASS_VLAN, 1),
        1,
        "the tagged frame reached the program and was handed to the kernel"
    );
    assert_eq!(
        e.count(counter::ENCAPSULATED),
        1,
        "the tagged frame was not encapsulated"
    );
}

// ---- RFC 6040 ------------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn decap_applies_rfc6040_like_the_kernel() {
    let mut e = env();
    const NOT_ECT: u8 = 0;
    const ECT1: u8 = 1;
    const ECT0: u8 = 2;
    const CE: u8 = 3;
    // (outer ECN, inner ECN, inner ECN after decapsulation; None = dropped)
    let cases = [
        (CE, NOT_ECT, None),
        (CE, ECT0, Some(CE)),
        (CE, ECT1, Some(CE)),
        (CE, CE, Some(CE)),
        (ECT0, NOT_ECT, Some(NOT_ECT)),
        (ECT0, ECT1, Some(ECT1)),
        (NOT_ECT, ECT0, Some(ECT0)),
        (NOT_ECT, NOT_ECT, Some(NOT_ECT)),
    ];
    for kind in [ProgramKind::XdpDecap, ProgramKind::TcDecap] {
        let (ok, drop) = if kind == ProgramKind::XdpDecap {
            (XDP_PASS, XDP_DROP)
        } else {
            (TC_ACT_REDIRECT, TC_ACT_SHOT)
        };
        for (outer, inner, want) in cases {
            let what = format!("{kind:?} outer {outer} inner {inner}");
            let frame = vxlan(
                PEER_IP,
                0x10 | outer,
                &[],
                &inner_to_local(REMOTE, 0x20 | inner),
            );
            let ul0 = e.ul0;
            let marked = e.count(counter::ECN_CE_SET);
            let Some(want) = want else {
                e.expect(&what, kind, &frame, ul0, drop, counter::DROP_ECN);
                continue;
            };
            let out = e.expect(&what, kind, &frame, ul0, ok, counter::DECAPSULATED);
            let ip = &out.packet[14..34];
            assert_eq!(ip[1], 0x20 | want, "{what}: inner TOS");
            assert_eq!(checksum(ip), 0, "{what}: inner header checksum");
            let set = u64::from(outer == CE && inner != CE);
            assert_eq!(
                e.count(counter::ECN_CE_SET),
                marked + set,
                "{what}: counted CE"
            );
        }
    }
}

// ---- outer TTL and UDP checksum ------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn outer_ttl_is_the_namespace_default_not_the_inner_ttl() {
    let mut e = env();
    sh(&["sysctl", "-qw", "net.ipv4.ip_default_ttl=77"]);
    assert_eq!(
        weft::datapath::default_ttl(),
        77,
        "read from this namespace"
    );
    let (ul0, br0) = (e.ul0, e.br0);
    e.dp.configure(&NodeSettings {
        outer_ttl: weft::datapath::default_ttl(),
        ..node_settings(ul0, br0)
    })
    .expect("configure");
    for inner_ttl in [2u8, 64, 255] {
        let ip = ipv4(LOCAL, REMOTE, ICMP, 0, inner_ttl, &[], &icmp_echo(b"ttl"));
        let frame = ether(BRIDGE_MAC, CONTAINER_MAC, 0x0800, &ip);
        let c0 = e.c0;
        let out = e.expect(
            &format!("inner ttl {inner_ttl}"),
            ProgramKind::TcEncap,
            &frame,
            c0,
            TC_ACT_REDIRECT,
            counter::ENCAPSULATED,
        );
        assert_eq!(out.packet[22], 77, "outer TTL: ip_default_ttl (ttl auto)");
        assert_eq!(out.packet[64 + 8], inner_ttl - 1, "inner TTL: routed once");
        assert_eq!(checksum(&out.packet[14..34]), 0, "outer header checksum");
        assert_eq!(checksum(&out.packet[64..84]), 0, "inner header checksum");
    }
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn outer_udp_checksum_is_right_for_every_inner_packet() {
    let mut e = env();
    let payload: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
    let cases: Vec<(String, Vec<u8>)> = [TCP, UDP]
        .into_iter()
        .flat_map(|proto| {
            [L4Sum::Complete, L4Sum::Partial].map(|how| {
                let seg = l4(proto, LOCAL, REMOTE, &payload, how);
                (
                    format!("proto {proto} {how:?}"),
                    ipv4(LOCAL, REMOTE, proto, 0, 64, &[], &seg),
                )
            })
        })
        .chain([
            (
                "icmp".to_string(),
                ipv4(LOCAL, REMOTE, ICMP, 0, 64, &[], &icmp_echo(&payload)),
            ),
            (
                "odd-length udp".to_string(),
                ipv4(
                    LOCAL,
                    REMOTE,
                    UDP,
                    0,
                    64,
                    &[],
                    &l4(UDP, LOCAL, REMOTE, b"odd", L4Sum::Complete),
                ),
            ),
        ])
        .collect();
    for (what, ip) in &cases {
        let frame = ether(BRIDGE_MAC, CONTAINER_MAC, 0x0800, ip);
        let c0 = e.c0;
        let out = e.expect(
            what,
            ProgramKind::TcEncap,
            &frame,
            c0,
            TC_ACT_REDIRECT,
            counter::ENCAPSULATED,
        );
        assert_ne!(&out.packet[40..42], &[0, 0], "{what}: checksum filled");
        let mut broken = out.packet.clone();
        broken[41] ^= 1;
        assert!(!outer_udp_checksum_ok(&broken), "the check can fail");
        assert!(
            outer_udp_checksum_ok(&out.packet),
            "{what}: outer UDP checksum wrong: {:02x?}",
            out.packet
        );
    }

    // What cannot be derived from the headers goes to the kernel path, which sums it.
    let zero = ipv4(
        LOCAL,
        REMOTE,
        UDP,
        0,
        64,
        &[],
        &l4(UDP, LOCAL, REMOTE, &payload, L4Sum::Zero),
    );
    let gre = ipv4(LOCAL, REMOTE, 47, 0, 64, &[], &[0, 0, 0x08, 0x00]);
    let mut fragment = ipv4(LOCAL, REMOTE, UDP, 0, 64, &[], &payload[..800]);
    fragment[6] = 0x20; // MF, offset 0
    fragment[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&fragment[..20]);
    fragment[10..12].copy_from_slice(&c.to_be_bytes());
    for (what, ip, reason) in [
        ("udp without checksum", zero, counter::PASS_CHECKSUM),
        ("gre", gre, counter::PASS_CHECKSUM),
        ("fragment", fragment, counter::PASS_FRAGMENT),
    ] {
        let c0 = e.c0;
        let frame = ether(BRIDGE_MAC, CONTAINER_MAC, 0x0800, &ip);
        e.expect(what, ProgramKind::TcEncap, &frame, c0, TC_ACT_OK, reason);
    }

    // Switched off: every packet leaves with 0, as before.
    let (ul0, br0) = (e.ul0, e.br0);
    e.dp.configure(&NodeSettings {
        udp_csum: false,
        ..node_settings(ul0, br0)
    })
    .expect("configure");
    let frame = ether(BRIDGE_MAC, CONTAINER_MAC, 0x0800, &cases[0].1);
    let c0 = e.c0;
    let out = e.expect(
        "checksum off",
        ProgramKind::TcEncap,
        &frame,
        c0,
        TC_ACT_REDIRECT,
        counter::ENCAPSULATED,
    );
    assert_eq!(&out.packet[40..42], &[0, 0]);
}

// ---- MTU -----------------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn gso_packets_whose_segments_would_not_fit_go_to_the_kernel() {
    let mut e = env();
    // Two segments' worth of TCP payload; what counts is gso_size.
    let payload = vec![0x5a; 2 * 1420];
    let seg = l4(TCP, LOCAL, REMOTE, &payload, L4Sum::Partial);
    let frame = ether(
        BRIDGE_MAC,
        CONTAINER_MAC,
        0x0800,
        &ipv4(LOCAL, REMOTE, TCP, 0, 64, &[], &seg),
    );
    // 20 + 20 + 1420 + 50 = 1510 bytes on a 1500-byte underlay.
    let too_big = SkbContext {
        ifindex: e.c0,
        gso_size: 1420,
        gso_segs: 2,
    };
    let before = e.count(counter::PASS_GSO_TOO_BIG);
    let out = e.run_skb(ProgramKind::TcEncap, &frame, too_big);
    assert_eq!(
        (out.action, &out.packet),
        (TC_ACT_OK, &frame),
        "to the kernel, untouched"
    );
    assert_eq!(e.count(counter::PASS_GSO_TOO_BIG), before + 1);
    // 20 + 20 + 1410 + 50 = 1500: fits; whatever happens next, it is not "too big".
    let fits = SkbContext {
        gso_size: 1410,
        ..too_big
    };
    let out = e.run_skb(ProgramKind::TcEncap, &frame, fits);
    assert_ne!(out.action, TC_ACT_SHOT);
    assert_eq!(
        e.count(counter::PASS_GSO_TOO_BIG),
        before + 1,
        "a fitting GSO packet is not too big"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn decap_hands_packets_too_big_for_the_container_to_the_stack() {
    let mut e = env();
    sh(&["ip", "link", "set", "c0", "mtu", "1400"]);
    let big = ipv4(
        REMOTE,
        LOCAL,
        ICMP,
        0,
        63,
        &[],
        &icmp_echo(&vec![7u8; 1420]),
    );
    let frame = vxlan(PEER_IP, 0, &[], &big);
    let ul0 = e.ul0;
    let delivered = e.count(counter::DELIVERED_TO_CONTAINER);
    let out = e.expect(
        "1448 bytes for a 1400-byte port",
        ProgramKind::TcDecap,
        &frame,
        ul0,
        TC_ACT_OK,
        counter::DECAP_TOO_BIG,
    );
    assert_eq!(
        &out.packet[14..],
        &big[..],
        "decapsulated, left to the stack (which sends frag-needed)"
    );
    assert_eq!(e.count(counter::DELIVERED_TO_CONTAINER), delivered);
    // A packet that fits is still delivered straight to the container.
    let small = vxlan(PEER_IP, 0, &[], &inner_to_local(REMOTE, 0));
    e.expect(
        "small",
        ProgramKind::TcDecap,
        &small,
        ul0,
        TC_ACT_REDIRECT,
        counter::DELIVERED_TO_CONTAINER,
    );
}

// ---- forged sources ------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn encap_accepts_a_source_only_from_the_port_and_mac_bound_to_it() {
    let mut e = env();
    let bindings = e.dp.locals().expect("list");
    let (c0, c1, br0) = (e.c0, e.c1, e.br0);
    let cases = [
        (
            "bound source on its port",
            CONTAINER_MAC,
            LOCAL,
            c0,
            TC_ACT_REDIRECT,
            counter::ENCAPSULATED,
        ),
        (
            "bound source from another port",
            OTHER_MAC,
            LOCAL,
            c1,
            TC_ACT_SHOT,
            counter::DROP_SOURCE_OTHER_PORT,
        ),
        (
            "bound source with the binding's MAC from another port",
            CONTAINER_MAC,
            LOCAL,
            c1,
            TC_ACT_SHOT,
            counter::DROP_SOURCE_OTHER_PORT,
        ),
        (
            "bound source, another MAC, its port",
            OTHER_MAC,
            LOCAL,
            c0,
            TC_ACT_OK,
            counter::PASS_SOURCE_UNBOUND,
        ),
        (
            "unbound source in our subnet",
            OTHER_MAC,
            Ipv4Addr::new(10, 1, 10, 77),
            c1,
            TC_ACT_OK,
            counter::PASS_SOURCE_UNBOUND,
        ),
        (
            "another host's subnet",
            OTHER_MAC,
            REMOTE2,
            c1,
            TC_ACT_SHOT,
            counter::DROP_SOURCE_OUTSIDE,
        ),
        (
            "this host's underlay address",
            OTHER_MAC,
            OUR_IP,
            c1,
            TC_ACT_SHOT,
            counter::DROP_SOURCE_OUTSIDE,
        ),
        (
            "an address outside the cluster",
            OTHER_MAC,
            Ipv4Addr::new(192, 0, 2, 9),
            c0,
            TC_ACT_SHOT,
            counter::DROP_SOURCE_OUTSIDE,
        ),
        // On the bridge the port is no longer known: the MAC must match.
        (
            "bound source and MAC on the bridge",
            CONTAINER_MAC,
            LOCAL,
            br0,
            TC_ACT_REDIRECT,
            counter::ENCAPSULATED,
        ),
        (
            "bound source, another MAC, on the bridge",
            OTHER_MAC,
            LOCAL,
            br0,
            TC_ACT_OK,
            counter::PASS_SOURCE_UNBOUND,
        ),
    ];
    for (what, mac, src, port, action, reason) in cases {
        let frame = from_container(mac, src, REMOTE);
        e.expect(what, ProgramKind::TcEncap, &frame, port, action, reason);
    }
    assert_eq!(
        e.dp.locals().expect("list"),
        bindings,
        "nothing learned from what was sent"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn decap_drops_inner_sources_the_sending_vtep_did_not_lease() {
    let mut e = env();
    for kind in [ProgramKind::XdpDecap, ProgramKind::TcDecap] {
        let (ok, drop) = if kind == ProgramKind::XdpDecap {
            (XDP_PASS, XDP_DROP)
        } else {
            (TC_ACT_REDIRECT, TC_ACT_SHOT)
        };
        let ul0 = e.ul0;
        for (what, vtep, src, action, reason) in [
            (
                "peer for its own subnet",
                PEER_IP,
                REMOTE,
                ok,
                counter::DECAPSULATED,
            ),
            (
                "second peer for its own subnet",
                PEER2_IP,
                REMOTE2,
                ok,
                counter::DECAPSULATED,
            ),
            (
                "peer for another peer's subnet",
                PEER_IP,
                REMOTE2,
                drop,
                counter::DROP_INNER_SOURCE,
            ),
            (
                "peer for our subnet",
                PEER_IP,
                Ipv4Addr::new(10, 1, 10, 9),
                drop,
                counter::DROP_INNER_SOURCE,
            ),
            (
                "peer for an outside address",
                PEER_IP,
                Ipv4Addr::new(192, 0, 2, 7),
                drop,
                counter::DROP_INNER_SOURCE,
            ),
        ] {
            let frame = vxlan(vtep, 0, &[], &inner_to_local(src, 0));
            e.expect(
                &format!("{kind:?} {what}"),
                kind,
                &frame,
                ul0,
                action,
                reason,
            );
        }
    }
}

// ---- IPv4 options --------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn ipv4_options_are_valid_packets_not_malformed_ones() {
    let mut e = env();
    let nops = [1u8, 1, 1, 1];
    let ul0 = e.ul0;
    // Outer options: flannel.1 decapsulates them.
    let frame = vxlan(PEER_IP, 0, &nops, &inner_to_local(REMOTE, 0));
    let out = e.expect(
        "outer options, xdp",
        ProgramKind::XdpDecap,
        &frame,
        ul0,
        XDP_PASS,
        counter::PASS_IP_OPTIONS,
    );
    assert_eq!(out.packet, frame, "untouched");
    let out = e.expect(
        "outer options, tc",
        ProgramKind::TcDecap,
        &frame,
        ul0,
        TC_ACT_OK,
        counter::PASS_IP_OPTIONS,
    );
    assert_eq!(out.packet, frame, "untouched");
    // Inner options: decapsulated like any inner packet.
    let inner = ipv4(REMOTE, LOCAL, ICMP, 0, 63, &nops, &icmp_echo(b"options"));
    let frame = vxlan(PEER_IP, 0, &[], &inner);
    let out = e.expect(
        "inner options, xdp",
        ProgramKind::XdpDecap,
        &frame,
        ul0,
        XDP_PASS,
        counter::DECAPSULATED,
    );
    assert_eq!(&out.packet[14..], &inner[..]);
    e.expect(
        "inner options, tc",
        ProgramKind::TcDecap,
        &frame,
        ul0,
        TC_ACT_REDIRECT,
        counter::DELIVERED_TO_CONTAINER,
    );
    // Options on a container's packet: the kernel path forwards it.
    let ip = ipv4(LOCAL, REMOTE, ICMP, 0, 64, &nops, &icmp_echo(b"options"));
    let frame = ether(BRIDGE_MAC, CONTAINER_MAC, 0x0800, &ip);
    let c0 = e.c0;
    e.expect(
        "encap, inner options",
        ProgramKind::TcEncap,
        &frame,
        c0,
        TC_ACT_OK,
        counter::PASS_IP_OPTIONS,
    );
}

/// docker0 down, as the agent mirrors it into the node configuration: encapsulation hands a
/// bound container's frame to the kernel (whose bridge drops what its disabled ports receive) and
/// decapsulation delivers into no container (the FIB or the stack decides, as on the kernel path);
/// up again, both resume. And a frame a port's program handed to the kernel reaches the bridge's
/// program next: counted once, on the port.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_down_bridge_stops_the_fast_path_and_a_passed_frame_counts_once() {
    let mut e = env();
    let (ul0, br0, c0) = (e.ul0, e.br0, e.c0);
    let outgoing = from_container(CONTAINER_MAC, LOCAL, REMOTE);
    let incoming = vxlan(PEER_IP, 0, &[], &inner_to_local(REMOTE, 0));
    let down = NodeSettings {
        bridge_down: true,
        ..node_settings(ul0, br0)
    };
    e.dp.configure(&down).expect("configure");
    e.expect(
        "bound source, bridge down",
        ProgramKind::TcEncap,
        &outgoing,
        c0,
        TC_ACT_OK,
        counter::PASS_BRIDGE_DOWN,
    );
    let delivered = e.count(counter::DELIVERED_TO_CONTAINER);
    e.expect(
        "VXLAN for a bound container, bridge down",
        ProgramKind::TcDecap,
        &incoming,
        ul0,
        TC_ACT_OK,
        counter::DECAPSULATED,
    );
    assert_eq!(
        e.count(counter::DELIVERED_TO_CONTAINER),
        delivered,
        "delivered into a container of a down bridge"
    );
    e.dp.configure(&node_settings(ul0, br0)).expect("configure");
    e.expect(
        "bound source, bridge up",
        ProgramKind::TcEncap,
        &outgoing,
        c0,
        TC_ACT_REDIRECT,
        counter::ENCAPSULATED,
    );
    e.expect(
        "VXLAN for a bound container, bridge up",
        ProgramKind::TcDecap,
        &incoming,
        ul0,
        TC_ACT_REDIRECT,
        counter::DELIVERED_TO_CONTAINER,
    );

    // The port passes a frame from another MAC; the bridge then sees that same frame once. The
    // programs link the two through a per-CPU slot, as both hooks run in one softirq: one CPU here.
    pin_to_this_cpu();
    let unbound = from_container(OTHER_MAC, LOCAL, REMOTE);
    e.expect(
        "another MAC on the port",
        ProgramKind::TcEncap,
        &unbound,
        c0,
        TC_ACT_OK,
        counter::PASS_SOURCE_UNBOUND,
    );
    let before = e.dp.counters().expect("counters");
    let out = e.run(ProgramKind::TcEncap, &unbound, br0);
    assert_eq!(
        (out.action, &out.packet),
        (TC_ACT_OK, &unbound),
        "handed on untouched"
    );
    assert_eq!(
        e.dp.counters().expect("counters"),
        before,
        "the bridge's program counted the frame the port's program had passed"
    );
    // Only that once: the same frame again on the bridge (from a port without a program) is judged.
    e.expect(
        "the frame again, on the bridge",
        ProgramKind::TcEncap,
        &unbound,
        br0,
        TC_ACT_OK,
        counter::PASS_SOURCE_UNBOUND,
    );
}

/// Keeps this thread on the CPU it runs on (each test run is one syscall, and per-CPU state
/// links a port's run to the bridge's).
fn pin_to_this_cpu() {
    // SAFETY: plain syscalls on this thread with a local cpu_set_t.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}
