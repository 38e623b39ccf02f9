//! The adversarial suite: what an attacker inside a container (or on a peer host) can make the
//! overlay do, tried on both datapaths. Each attack is one scenario, run concurrently on a cluster
//! of `--datapath kernel` hosts (flannel.1, the reference) and on identical clusters of `--datapath
//! ebpf` hosts, one per decapsulation hook (TC and XDP); each records where its packets landed
//! (caught with packet sockets inside the namespaces) and the test then requires, case by case,
//! that each eBPF cluster lands no more than the kernel's (or exactly what it does, for legitimate
//! traffic and headers).
//! After every attack, every container still reaches every other one. The one deliberate
//! exception, netfilter (the fast path skips FORWARD), must never be silent: the agent warns.
//!
//! Root only: `cargo xtask test --skip-ebpf -- adversarial --include-ignored`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use weft_tests::attack::{
    self, arp_reply, counter, ecn_case, ethernet, fence_arrived, find, ipv4_at,
    landed_before_fence, mac, marker, neighbour, note_counters, on_every_datapath, send_frames,
    send_udp, status, vlan_frame, vtep_mac, vxlan, Capture, Datapath, Observed, Rule, Udp4,
    UdpOpts, UdpSink, ARRIVAL, CE, ECT0, ECT1, ETH_P_IPV4, NOT_ECT, PORT, PROBES, SETTLE,
    VXLAN_PORT,
};
use weft_tests::{Cluster, Container, Host};

fn copies(payload: &[u8], n: usize) -> Vec<Vec<u8>> {
    vec![payload.to_vec(); n]
}

fn any_port(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 0)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// `n` copies of `payload` as UDP datagrams from container `from` (its own address) to `to`.
async fn udp_from(from: &Container, to: SocketAddrV4, payload: &[u8], n: usize) {
    let src = any_port(from.ip());
    send_udp(
        from.netns(),
        src,
        to,
        copies(payload, n),
        UdpOpts::default(),
    )
    .await;
}

/// `n` copies of a VXLAN payload sent from `from`'s VTEP address to `to`'s VXLAN port, with the
/// outer TOS `opts` gives: what a peer's flannel.1 (or someone holding its address) sends.
async fn vxlan_from(from: &Host, to: &Host, frame: &[u8], n: usize, opts: UdpOpts) {
    let (src, dst) = (any_port(from.ens32_ip()), at(to.ens32_ip(), VXLAN_PORT));
    send_udp(from.name(), src, dst, copies(frame, n), opts).await;
}

/// An IPv4 frame from container `from` to its gateway (docker0), as it would leave `from`'s eth0.
async fn from_container(from: &Container, host: &Host, packet: &[u8]) -> Vec<u8> {
    let gw = mac(host.name(), "docker0").await;
    ethernet(gw, mac(from.netns(), "eth0").await, ETH_P_IPV4, packet)
}

/// Sets rp_filter on every interface of `host` (all, default and docker0: the kernel uses the
/// maximum of `all` and the interface's).
async fn rp_filter(host: &Host, value: &str) {
    for scope in ["all", "default", "docker0", "ens32"] {
        host.netns()
            .sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), value)
            .await
            .unwrap();
    }
}

// ---- 1. hijacking a neighbour's address ------------------------------------------------------------

/// Container B sends ONE packet with its neighbour A's source address to a remote subnet; then a
/// remote container sends to A. Then B claims an address nobody uses yet, a new container C gets
/// it, and the remote container sends to C.
async fn hijack(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 2, &[]).await;
    let (h1, a, b, remote) = (c.host(0), c.container(0), c.container(1), c.container(2));

    // Both of B's forged packets carry this prefix, so one capture sees them pass through.
    let seen = Capture::start(remote.netns(), "eth0", &marker("hijack-by-b")).await;
    let spoof = marker("hijack-by-b-spoof");
    let packet = Udp4::new(a.ip(), remote.ip(), PORT, &spoof).packet();
    send_frames(
        b.netns(),
        "eth0",
        vec![from_container(&b, h1, &packet).await],
    )
    .await;

    let (in_a, in_b) = where_it_lands(&remote, &a, &b, "to-a").await;
    o.set("A's traffic: landed in A", in_a);
    o.set("A's traffic: landed in B", in_b);

    // Again while host 1 has no neighbour entry for A (flushed, as after it aged out): whatever
    // answers for A now is what the kernel resolves, not what B claimed.
    h1.netns()
        .ip(&["neigh", "flush", "dev", "docker0"])
        .await
        .unwrap();
    let spoof = marker("hijack-by-b-again");
    let packet = Udp4::new(a.ip(), remote.ip(), PORT, &spoof).packet();
    let frame = from_container(&b, h1, &packet).await;
    send_frames(b.netns(), "eth0", vec![frame]).await;
    let (in_a, in_b) = where_it_lands(&remote, &a, &b, "to-a-no-neighbour").await;
    o.set("A's traffic, no neighbour entry: landed in A", in_a);
    o.set("A's traffic, no neighbour entry: landed in B", in_b);

    // An address not yet in use: the one the harness gives the next container on host 1.
    let env = h1.subnet().expect("host 1's subnet");
    let next = Ipv4Addr::from(u32::from(env.subnet.network()) + 2 + h1.containers().len() as u32);
    let claim = marker("hijack-by-b-claim");
    let packet = Udp4::new(next, remote.ip(), PORT, &claim).packet();
    send_frames(
        b.netns(),
        "eth0",
        vec![from_container(&b, h1, &packet).await],
    )
    .await;
    let passed = seen.wait(3, ARRIVAL, |f| !f.outgoing).await;
    o.note(format!(
        "of B's 3 forged packets (A's address twice, then {next}), {passed} reached the remote \
         container"
    ));
    let c3 = h1.add_container().await.unwrap();
    assert_eq!(
        c3.ip(),
        next,
        "the harness gave the new container another address"
    );
    if dp.is_ebpf() {
        attack::wait_ebpf_ready(h1, 1).await;
    }
    let (in_c, in_b) = where_it_lands(&remote, &c3, &b, "to-c").await;
    o.set("claimed address: landed in its new owner C", in_c);
    o.set("claimed address: landed in B", in_b);

    attack::legit_traffic_flows(&c, dp, "after the hijack").await;
    o
}

/// `from` sends probes to `owner`'s address: how many landed in `owner` and how many in `attacker`
/// (caught on its eth0).
async fn where_it_lands(
    from: &Container,
    owner: &Container,
    attacker: &Container,
    what: &str,
) -> (u64, u64) {
    let probe = marker(what);
    let in_owner = UdpSink::bind(owner, PORT).await;
    let n = 3 * PROBES;
    let send = udp_from(from, at(owner.ip(), PORT), &probe, n);
    attack::where_it_lands(&in_owner, attacker, &probe, n, send).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_hijack_one_spoofed_packet_steals_no_traffic() {
    on_every_datapath(hijack, &attack::HIJACK_RULES).await;
}

// ---- 1b. ARP poisoning, then its end ---------------------------------------------------------------

/// How long the agent may take to follow a neighbour change: its default reconcile interval.
const DEFAULT_RECONCILE: Duration = Duration::from_secs(10);

/// Container B poisons host 1's neighbour entry for A ("A is at B's MAC"): the kernel path then
/// delivers A's traffic to B too, so the eBPF path may do the same, no more. Then A answers for
/// itself, the kernel delivers to A again, and so must the eBPF path once the agent has followed
/// (within one reconcile interval): a binding must not outlive what the kernel says.
async fn arp_poisoning(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 2, &[]).await;
    let (h1, a, b, remote) = (c.host(0), c.container(0), c.container(1), c.container(2));
    let (gw_ip, gw) = (a.gateway(), mac(h1.name(), "docker0").await);
    let (a_mac, b_mac) = (mac(a.netns(), "eth0").await, mac(b.netns(), "eth0").await);

    // The kernel ignores a new address for an entry updated within the last second (locktime):
    // repeat until the entry shows the claimed one.
    let claim = async |from: &Container, claimed: [u8; 6]| {
        let deadline = Instant::now() + ARRIVAL;
        while neighbour(h1.name(), "docker0", a.ip()).await != Some(claimed) {
            assert!(
                Instant::now() < deadline,
                "{dp}: host 1 never took {claimed:02x?} for {}",
                a.ip()
            );
            let reply = arp_reply(claimed, a.ip(), gw, gw_ip);
            send_frames(from.netns(), "eth0", vec![reply]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    claim(&b, b_mac).await;
    let (in_a, in_b) = where_it_lands(&remote, &a, &b, "poisoned").await;
    o.set("poisoned: A's traffic landed in B", in_b);
    o.note(format!("poisoned: A's traffic landed in A: {in_a}"));

    claim(&a, a_mac).await;
    binding_follows(&mut o, dp, h1, &a).await;
    let (in_a, in_b) = where_it_lands(&remote, &a, &b, "recovered").await;
    o.set("recovered: A's traffic landed in A", in_a);
    o.set("recovered: A's traffic landed in B", in_b);
    attack::legit_traffic_flows(&c, dp, "after the ARP poisoning").await;
    o
}

/// Once the kernel says A is A again: on eBPF, waits (one reconcile interval at most) until the
/// binding for A names only A's port and MAC, or is gone (the bridge path then), and records
/// whether it got there.
async fn binding_follows(o: &mut Observed, dp: Datapath, host: &Host, a: &Container) {
    if !dp.is_ebpf() {
        return;
    }
    let since = Instant::now();
    let a_mac = mac(a.netns(), "eth0").await;
    let a_port: u32 = host
        .exec_ok(&["cat", &format!("/sys/class/net/{}/ifindex", a.host_veth())])
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let follows = || {
        attack::local_map(host)
            .expect("read the local map")
            .iter()
            .filter(|(ip, _)| *ip == a.ip())
            .all(|(_, ep)| ep.host_ifindex_ne == a_port && ep.mac == a_mac)
    };
    while !follows() && since.elapsed() < DEFAULT_RECONCILE {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    o.note(format!(
        "binding for A follows the kernel: {}, after {:?}",
        follows(),
        since.elapsed()
    ));
    o.set(
        "binding for A follows the kernel within one reconcile",
        u64::from(follows()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_arp_poisoning_lands_no_more_than_on_the_kernel_path_and_ends_with_it() {
    let n = 3 * PROBES as u64;
    on_every_datapath(
        arp_poisoning,
        &[
            ("poisoned: A's traffic landed in B", Rule::NoMoreThanKernel),
            (
                "binding for A follows the kernel within one reconcile",
                Rule::EbpfExactly(1),
            ),
            ("recovered: A's traffic landed in A", Rule::Exactly(n)),
            ("recovered: A's traffic landed in B", Rule::Exactly(0)),
        ],
    )
    .await;
}

/// Container B sends a frame with A's MAC as source: the bridge then places A's MAC on B's port, and
/// the kernel path may deliver A's traffic to B. (Not an IPv4 frame: one with A's address too is
/// dropped at B's port by the eBPF path, see the hijack; this one reaches the bridge on every
/// datapath.) Then A sends a frame of its own, the bridge moves its MAC back, and A's traffic must
/// land in A on every datapath: on eBPF once the agent has followed, within one reconcile interval,
/// a binding must not keep A's address on B's port.
async fn mac_impersonation(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 2, &[]).await;
    let (h1, a, b, remote) = (c.host(0), c.container(0), c.container(1), c.container(2));
    let gw = mac(h1.name(), "docker0").await;
    let a_mac = mac(a.netns(), "eth0").await;
    // IEEE 802 local experimental ethertype: nothing on the way interprets it.
    let as_a = |body: &[u8]| ethernet(gw, a_mac, 0x88b5, body);
    let port_of_a = async || attack::fdb_port(h1, a_mac).await;
    let moved_to = async |from: &Container, port: &str, what: &str| {
        let deadline = Instant::now() + ARRIVAL;
        while port_of_a().await.as_deref() != Some(port) {
            assert!(
                Instant::now() < deadline,
                "{dp}: the bridge never moved A's MAC to {port}"
            );
            send_frames(from.netns(), "eth0", vec![as_a(&marker(what))]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    moved_to(&b, b.host_veth(), "impersonation").await;
    // Not compared: on the kernel path it depends on the neighbour entry's state (a REACHABLE one
    // sends to the MAC the bridge now places on B's port; a STALE one probes, and A's answer
    // moves the MAC back mid-burst), so the split differs from run to run on every datapath.
    let (in_a, in_b) = where_it_lands(&remote, &a, &b, "impersonated").await;
    o.note(format!(
        "while impersonated, A's traffic landed in A: {in_a}, in B: {in_b}"
    ));

    moved_to(&a, a.host_veth(), "a-again").await;
    binding_follows(&mut o, dp, h1, &a).await;
    let (in_a, in_b) = where_it_lands(&remote, &a, &b, "a-again").await;
    o.set("A again: A's traffic landed in A", in_a);
    o.set("A again: A's traffic landed in B", in_b);
    attack::legit_traffic_flows(&c, dp, "after the MAC impersonation").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_mac_impersonation_ends_with_the_bridges_on_every_datapath() {
    let n = 3 * PROBES as u64;
    on_every_datapath(
        mac_impersonation,
        &[
            (
                "binding for A follows the kernel within one reconcile",
                Rule::EbpfExactly(1),
            ),
            ("A again: A's traffic landed in A", Rule::Exactly(n)),
            ("A again: A's traffic landed in B", Rule::Exactly(0)),
        ],
    )
    .await;
}

// ---- 2. flooding the local-container map -----------------------------------------------------------

/// More forged sources than the local map (4096 entries) holds.
const FLOOD: usize = 4200;
/// The flood scenario's `--reconcile-interval`.
const RECONCILE: Duration = Duration::from_secs(2);

/// Container B sends 4200 packets, each from another forged source, to a remote subnet; then a
/// new container D appears and must get the fast path (eBPF) within one reconcile interval, and the
/// map must hold only what the agent bound.
async fn flood(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let interval = format!("{}s", RECONCILE.as_secs());
    let c = attack::start(dp, 2, 2, &["--reconcile-interval", &interval]).await;
    let (h1, b, remote) = (c.host(0), c.container(1), c.container(2));
    let (gw, b_mac) = (
        mac(h1.name(), "docker0").await,
        mac(b.netns(), "eth0").await,
    );
    let payload = marker("flood");
    let frames = (0..FLOOD)
        .map(|i| {
            let src = Ipv4Addr::new(192, 168, (i / 250) as u8, (i % 250) as u8 + 1);
            ethernet(
                gw,
                b_mac,
                ETH_P_IPV4,
                &Udp4::new(src, remote.ip(), PORT, &payload).packet(),
            )
        })
        .collect();
    let before = attack::counters(h1).await;
    send_frames(b.netns(), "eth0", frames).await;
    if dp.is_ebpf() {
        let entries = attack::local_map(h1).expect("read the local map").len();
        let moved = attack::counters_since(&attack::counters(h1).await, &before);
        o.note(format!(
            "right after the flood: {entries} local map entries; host 1 counters moved {moved:?}"
        ));
    }

    let d = h1.add_container().await.unwrap();
    if dp.is_ebpf() {
        attack::wait_ebpf_ready(h1, 1).await;
    }
    let reachable = d.ping_until(remote.ip(), Duration::from_secs(10)).await;
    // From here the kernel knows D (its neighbour and fdb entries): the agent binds it from
    // those within one reconcile interval at the latest.
    let known = Instant::now();
    o.set(
        "new container reaches the remote one",
        u64::from(reachable.is_ok()),
    );
    if let Err(e) = reachable {
        o.note(format!("{e:#}"));
    }
    if dp.is_ebpf() {
        // On TC, direct delivery: decapsulated packets for D go straight into its namespace. XDP
        // hands every decapsulated packet to the stack, so there the program decapsulating them
        // is the fast path. The only traffic to host 1 meanwhile is these probes.
        let fast = match dp {
            Datapath::EbpfXdp => "decapsulated",
            _ => "decapsulated: delivered to container",
        };
        let probe = marker("to-new");
        let sink = UdpSink::bind(&d, PORT).await;
        // The slack pays for the `weft status` runs of this loop.
        let deadline = known + RECONCILE + Duration::from_secs(1);
        let mut direct = false;
        let mut sent = 0;
        while !direct && Instant::now() < deadline {
            let before = counter(&status(h1).await, fast);
            udp_from(&remote, at(d.ip(), PORT), &probe, 1).await;
            sent += 1;
            let arrived = sink.wait(&probe, sent, Duration::from_millis(500)).await >= sent;
            let after = counter(&status(h1).await, fast);
            direct = arrived && after > before;
        }
        o.note(format!(
            "\"{fast}\" for the new container: {direct}, {:?} after its first ping ({sent} probes)",
            known.elapsed()
        ));
        o.set(
            "new container gets the fast path within one reconcile",
            u64::from(direct),
        );
        let (entries, unbound) = unbound_entries(&c, h1).await;
        o.note(format!(
            "local map after the new container: {entries} entries"
        ));
        for e in unbound.iter().take(5) {
            o.note(format!("unbound entry: {e}"));
        }
        o.set(
            "local map entries the agent did not bind",
            unbound.len() as u64,
        );
    }
    attack::legit_traffic_flows(&c, dp, "after the flood").await;
    o
}

/// Entries of host's local map that are not (a container's address -> its own port and MAC).
async fn unbound_entries(c: &Cluster, host: &Host) -> (usize, Vec<String>) {
    let mut bound = Vec::new();
    for ct in c.host(host.index()).containers() {
        let index = host
            .exec_ok(&["cat", &format!("/sys/class/net/{}/ifindex", ct.host_veth())])
            .await
            .unwrap();
        bound.push((
            ct.ip(),
            index.trim().parse::<u32>().unwrap(),
            mac(ct.netns(), "eth0").await,
        ));
    }
    let entries = attack::local_map(host).expect("read the local map");
    let unbound = entries
        .iter()
        .filter(|(ip, ep)| {
            !bound.iter().any(|(b_ip, b_if, b_mac)| {
                b_ip == ip && *b_if == ep.host_ifindex_ne && *b_mac == ep.mac
            })
        })
        .map(|(ip, ep)| format!("{ip} -> {ep:?}"))
        .collect();
    (entries.len(), unbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_flood_leaves_the_map_clean_and_new_containers_fast() {
    on_every_datapath(
        flood,
        &[
            ("new container reaches the remote one", Rule::Exactly(1)),
            (
                "new container gets the fast path within one reconcile",
                Rule::EbpfExactly(1),
            ),
            (
                "local map entries the agent did not bind",
                Rule::EbpfExactly(0),
            ),
        ],
    )
    .await;
}

// ---- 3. forged sources: containers and peers -------------------------------------------------------

/// A container on host 2 sends with a source inside host 3's subnet to host 1's container (host 2's
/// rp_filter at 1, then 0), and with host 2's own addresses (docker0, ens32) as source; host 2's
/// VTEP sends VXLAN whose inner source lies in host 3's subnet. Each case ends with a legitimate
/// fence on the same path.
async fn forged_sources(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 3, 1, &[]).await;
    let (h1, h2, h3) = (c.host(0), c.host(1), c.host(2));
    let (a, s) = (c.container(0), c.container(1));
    let in_h3 = Ipv4Addr::from(u32::from(h3.subnet().unwrap().subnet.network()) + 200);
    let sink = UdpSink::bind(&a, PORT).await;
    let (before1, before2) = (attack::counters(h1).await, attack::counters(h2).await);
    let h2_docker0 = h2.subnet().unwrap().subnet.addr();

    let mut container_forges = async |case: &str, src: Ipv4Addr, rp: &str| {
        rp_filter(h2, rp).await;
        let (bad, fence) = (
            marker(&format!("{case}-bad")),
            marker(&format!("{case}-fence")),
        );
        let frame = from_container(&s, h2, &Udp4::new(src, a.ip(), PORT, &bad).packet()).await;
        send_frames(s.netns(), "eth0", vec![frame; PROBES]).await;
        udp_from(&s, at(a.ip(), PORT), &fence, 1).await;
        let n = landed_before_fence(dp, &sink, &bad, &fence, case).await;
        o.set(case, n);
    };
    container_forges(
        "host 2 rp_filter=1: source in host 3's subnet reached host 1's container",
        in_h3,
        "1",
    )
    .await;
    container_forges(
        "host 2 rp_filter=0: source in host 3's subnet reached host 1's container",
        in_h3,
        "0",
    )
    .await;
    container_forges(
        "source = host 2's docker0 address reached host 1's container",
        h2_docker0,
        "0",
    )
    .await;
    container_forges(
        "source = host 2's ens32 address reached host 1's container",
        h2.ens32_ip(),
        "0",
    )
    .await;

    // Host 2's VTEP (a leased peer) forging host 3's containers.
    let (bad, fence) = (marker("vtep-forges-bad"), marker("vtep-forges-fence"));
    let (to_mac, from_mac) = (vtep_mac(&c, h1).await, vtep_mac(&c, h2).await);
    let inner = |src: Ipv4Addr, body: &[u8]| {
        vxlan(
            1,
            &ethernet(
                to_mac,
                from_mac,
                ETH_P_IPV4,
                &Udp4::new(src, a.ip(), PORT, body).packet(),
            ),
        )
    };
    vxlan_from(h2, h1, &inner(in_h3, &bad), PROBES, UdpOpts::default()).await;
    vxlan_from(h2, h1, &inner(s.ip(), &fence), 1, UdpOpts::default()).await;
    let case = "host 2's VTEP with inner source in host 3's subnet reached host 1's container";
    let n = landed_before_fence(dp, &sink, &bad, &fence, case).await;
    o.set(case, n);
    note_counters(&mut o, h1, &before1).await;
    note_counters(&mut o, h2, &before2).await;
    rp_filter(h2, "0").await;
    drop(sink);
    attack::legit_traffic_flows(&c, dp, "after the forged sources").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_forged_sources_reach_no_more_than_on_the_kernel_path() {
    on_every_datapath(
        forged_sources,
        &[
            (
                "host 2 rp_filter=1: source in host 3's subnet reached host 1's container",
                Rule::Exactly(0),
            ),
            (
                "host 2 rp_filter=0: source in host 3's subnet reached host 1's container",
                Rule::NoMoreThanKernel,
            ),
            (
                "source = host 2's docker0 address reached host 1's container",
                Rule::NoMoreThanKernel,
            ),
            (
                "source = host 2's ens32 address reached host 1's container",
                Rule::NoMoreThanKernel,
            ),
            (
                "host 2's VTEP with inner source in host 3's subnet reached host 1's container",
                Rule::NoMoreThanKernel,
            ),
        ],
    )
    .await;
}

// ---- 4. VLAN hopping -------------------------------------------------------------------------------

/// Container A sends 802.1Q frames (VLAN 5) carrying UDP to the remote container.
async fn vlan_hopping(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, a, remote) = (c.host(0), c.container(0), c.container(1));
    let (bad, fence) = (marker("vlan-bad"), marker("vlan-fence"));
    let wire = Capture::start(h1.name(), "ens32", &bad).await;
    let there = Capture::start(remote.netns(), "eth0", &bad).await;
    let sink = UdpSink::bind(&remote, PORT).await;
    let (gw, a_mac) = (
        mac(h1.name(), "docker0").await,
        mac(a.netns(), "eth0").await,
    );
    let packet = Udp4::new(a.ip(), remote.ip(), PORT, &bad).packet();
    let before = attack::counters(h1).await;
    send_frames(
        a.netns(),
        "eth0",
        vec![vlan_frame(gw, a_mac, 5, ETH_P_IPV4, &packet); PROBES],
    )
    .await;
    udp_from(&a, at(remote.ip(), PORT), &fence, 1).await;
    fence_arrived(dp, &sink, &fence, "VLAN").await;
    note_counters(&mut o, h1, &before).await;
    attack::record_vlan(&mut o, h1, (&wire, &there), &before).await;
    drop((wire, there, sink));
    attack::legit_traffic_flows(&c, dp, "after VLAN hopping").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_vlan_tagged_frames_never_leave_tagged_or_arrive() {
    on_every_datapath(vlan_hopping, &attack::VLAN_RULES).await;
}

// ---- 5. ECN on decapsulation -----------------------------------------------------------------------

/// (outer, inner) ECN pairs sent as VXLAN from host 2's VTEP address to host 1's container.
const ECN_CASES: [(u8, u8); 6] = [
    (CE, ECT0),
    (CE, NOT_ECT),
    (CE, ECT1),
    (CE, CE),
    (NOT_ECT, ECT0),
    (ECT0, NOT_ECT),
];

async fn ecn(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, h2, a, remote) = (c.host(0), c.host(1), c.container(0), c.container(1));
    let (to_mac, from_mac) = (vtep_mac(&c, h1).await, vtep_mac(&c, h2).await);
    let all = marker("ecn");
    let caught = Capture::start(a.netns(), "eth0", &all).await;
    let before = attack::counters(h1).await;
    for (outer, inner) in ECN_CASES {
        let mut body = all.clone();
        body.extend(format!("-{outer}{inner}").bytes());
        let mut udp = Udp4::new(remote.ip(), a.ip(), PORT, &body);
        udp.tos = inner;
        let frame = vxlan(1, &ethernet(to_mac, from_mac, ETH_P_IPV4, &udp.packet()));
        let opts = UdpOpts {
            tos: Some(outer),
            ..UdpOpts::default()
        };
        vxlan_from(h2, h1, &frame, PROBES, opts).await;
    }
    // Every case but the one that must be dropped delivers PROBES frames.
    caught
        .wait((ECN_CASES.len() - 1) * PROBES, ARRIVAL, |f| !f.outgoing)
        .await;
    tokio::time::sleep(SETTLE).await;
    note_counters(&mut o, h1, &before).await;
    let frames: Vec<_> = caught
        .caught()
        .into_iter()
        .filter(|f| !f.outgoing)
        .collect();
    for (outer, inner) in ECN_CASES {
        let tag = format!("-{outer}{inner}");
        let mut body = all.clone();
        body.extend(tag.bytes());
        let ecns: Vec<u8> = frames
            .iter()
            .filter(|f| find(&f.data, &body).is_some())
            .filter_map(|f| ipv4_at(&f.data).map(|(ip, _)| f.data[ip + 1] & 3))
            .collect();
        attack::record_ecn(&mut o, &ecn_case(outer, inner), &ecns);
    }
    drop(caught);
    attack::legit_traffic_flows(&c, dp, "after the ECN probes").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_ecn_decapsulation_follows_rfc6040_like_the_kernel() {
    let n = PROBES as u64;
    let mut rules = Vec::new();
    let names: Vec<(String, String)> = ECN_CASES
        .iter()
        .map(|(o, i)| {
            (
                format!("{}: delivered", ecn_case(*o, *i)),
                format!("{}: ECN on arrival", ecn_case(*o, *i)),
            )
        })
        .collect();
    for ((outer, inner), (delivered, arrived)) in ECN_CASES.iter().zip(&names) {
        let (d, e) = match (*outer, *inner) {
            // RFC 6040: the congestion mark survives decapsulation...
            (CE, ECT0 | ECT1 | CE) => (Rule::Exactly(n), Rule::Exactly(u64::from(CE))),
            // ...and a CE mark on a flow that cannot carry it drops the packet.
            (CE, NOT_ECT) => (Rule::Exactly(0), Rule::Exactly(99)),
            _ => (Rule::Exactly(n), Rule::SameAsKernel),
        };
        rules.push((delivered.as_str(), d));
        rules.push((arrived.as_str(), e));
    }
    on_every_datapath(ecn, &rules).await;
}

// ---- 6. MTU with segmentation before the wire ------------------------------------------------------

/// Containers with MTU 1500 (more than the overlay's 1450, as a misconfigured container would) and
/// TSO/GSO off on host 1's ens32, so GSO packets are segmented before the wire: a TCP transfer must
/// complete without the wire dropping frames too big for it.
async fn mtu(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, h2, a, b) = (c.host(0), c.host(1), c.container(0), c.container(1));
    attack::oversize_mtu_without_offloads([(h1, &a), (h2, &b)], h1).await;
    let drops = async || attack::underlay_drops(h1, h2).await;
    let retrans = async || {
        let snmp = a.exec_ok(&["cat", "/proc/net/snmp"]).await.unwrap();
        let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let at = tcp[0]
            .split_whitespace()
            .position(|f| f == "RetransSegs")
            .unwrap();
        tcp[1]
            .split_whitespace()
            .nth(at)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let (before, r0, counted) = (drops().await, retrans().await, attack::counters(h1).await);
    let t = a.tcp_transfer(&b, 8 << 20).await;
    let (after, r1) = (drops().await, retrans().await);
    o.set("8 MiB transfer completed", u64::from(t.is_ok()));
    match &t {
        Ok(t) => o.note(format!("transfer took {:?}", t.elapsed)),
        Err(e) => o.note(format!("transfer failed: {e:#}")),
    }
    o.note(format!("TCP retransmissions: {}", r1 - r0));
    o.set("host 1 ens32 tx dropped", after.0 - before.0);
    o.set("host 2 ens32 rx dropped + errors", after.1 - before.1);
    note_counters(&mut o, h1, &counted).await;
    attack::legit_traffic_flows(&c, dp, "after the MTU transfer").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_mtu_segmentation_before_the_wire_drops_nothing() {
    on_every_datapath(
        mtu,
        &[
            ("8 MiB transfer completed", Rule::Exactly(1)),
            ("host 1 ens32 tx dropped", Rule::Exactly(0)),
            ("host 2 ens32 rx dropped + errors", Rule::Exactly(0)),
        ],
    )
    .await;
}

// ---- 7. outer headers ------------------------------------------------------------------------------

/// Whether a frame is VXLAN: IPv4, UDP to port 8472.
fn is_vxlan(frame: &[u8]) -> bool {
    ipv4_at(frame).is_some_and(|(ip, hlen)| {
        frame[ip + 9] == 17
            && frame.len() >= ip + hlen + 8
            && frame[ip + hlen + 2..ip + hlen + 4] == VXLAN_PORT.to_be_bytes()
    })
}

/// Offsets of the outer and the inner IPv4 header of a VXLAN frame.
fn outer_and_inner(frame: &[u8]) -> Option<(usize, usize)> {
    let (outer, hlen) = ipv4_at(frame)?;
    // After the outer UDP (8) and VXLAN (8) headers comes the inner Ethernet frame.
    let inner_frame = outer + hlen + 16;
    let (inner, _) = ipv4_at(frame.get(inner_frame..)?)?;
    Some((outer, inner_frame + inner))
}

/// The outer UDP checksum of the VXLAN frame whose outer IPv4 header is at `ip` is non-zero and
/// right (pseudo-header, UDP header and payload sum to zero).
fn outer_udp_checksum_ok(frame: &[u8], ip: usize) -> bool {
    let udp = ip + usize::from(frame[ip] & 0x0f) * 4;
    let len = usize::from(u16::from_be_bytes([frame[udp + 4], frame[udp + 5]]));
    let Some(datagram) = frame.get(udp..udp + len) else {
        return false;
    };
    let mut pseudo = frame[ip + 12..ip + 20].to_vec();
    pseudo.extend([0, 17]);
    pseudo.extend((len as u16).to_be_bytes());
    pseudo.extend(datagram);
    datagram[6..8] != [0, 0] && attack::checksum(&pseudo) == 0
}

/// From host 1's container to host 2's, caught on host 1's ens32: `ping -t 2` (outer and inner
/// TTL), then UDP and a short TCP exchange (the outer UDP checksum of every frame).
async fn outer_header(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, a, remote) = (c.host(0), c.container(0), c.container(1));
    // With transmit checksumming off the stack completes every checksum before the frame reaches
    // the packet socket: what is caught is what the wire carries.
    h1.exec_ok(&["ethtool", "-K", "ens32", "tx", "off"])
        .await
        .unwrap();
    let pattern = "7765667474746c32"; // "wefttl2"
    let filled: Vec<u8> = (0..8)
        .map(|i| u8::from_str_radix(&pattern[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let wire = Capture::matching(h1.name(), "ens32", is_vxlan).await;
    let before = attack::counters(h1).await;
    let out = a
        .exec(&[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-t",
            "2",
            "-p",
            pattern,
            &remote.ip().to_string(),
        ])
        .await;
    o.note(format!(
        "ping -t 2: {}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_default()
    ));
    let pinged = |f: &attack::Caught| f.outgoing && find(&f.data, &filled).is_some();
    wire.wait(3, ARRIVAL, pinged).await;
    let frames: Vec<_> = wire.caught().into_iter().filter(pinged).collect();
    o.set(
        "VXLAN frames of the ping on host 1's ens32",
        frames.len() as u64,
    );
    let (mut outer_ttls, mut inner_ttls) = (Vec::new(), Vec::new());
    for f in &frames {
        let Some((outer, inner)) = outer_and_inner(&f.data) else {
            continue;
        };
        outer_ttls.push(f.data[outer + 8]);
        inner_ttls.push(f.data[inner + 8]);
    }
    let uniform = |v: &[u8]| match v.first() {
        Some(x) if v.iter().all(|y| y == x) => u64::from(*x),
        _ => 999,
    };
    o.note(format!(
        "ping: outer TTLs {outer_ttls:?}, inner TTLs {inner_ttls:?}"
    ));
    o.set("outer TTL", uniform(&outer_ttls));
    o.set("inner TTL", uniform(&inner_ttls));

    // UDP and a short TCP exchange (every segment smaller than the MTU, so none is GSO): their
    // inner checksums are still pending (CHECKSUM_PARTIAL) when encapsulation sees them.
    let datagram = marker("outer-checksum-udp");
    let sink = UdpSink::bind(&remote, PORT).await;
    udp_from(&a, at(remote.ip(), PORT), &datagram, 3).await;
    assert_eq!(sink.wait(&datagram, 3, ARRIVAL).await, 3, "{dp}: UDP lost");
    a.tcp_transfer(&remote, 1000).await.unwrap();
    note_counters(&mut o, h1, &before).await;
    let mut checked = BTreeMap::<&str, (usize, usize)>::new();
    for f in wire.caught().iter().filter(|f| f.outgoing) {
        let Some((outer, inner)) = outer_and_inner(&f.data) else {
            continue;
        };
        let protocol = match f.data[inner + 9] {
            1 => "icmp",
            6 => "tcp",
            17 => "udp",
            _ => "other",
        };
        let entry = checked.entry(protocol).or_default();
        entry.0 += 1;
        entry.1 += usize::from(!outer_udp_checksum_ok(&f.data, outer) || f.csum_not_ready);
    }
    o.note(format!(
        "VXLAN frames on host 1's ens32 by inner protocol, (all, zero or invalid outer checksum): \
         {checked:?}"
    ));
    o.set(
        "frames with a zero or invalid outer UDP checksum",
        checked.values().map(|c| c.1 as u64).sum(),
    );
    for protocol in ["icmp", "udp", "tcp"] {
        let seen = checked.get(protocol).map_or(0, |c| c.0);
        o.set(&format!("{protocol} frames checked"), u64::from(seen > 0));
    }
    let default_ttl = h1
        .exec_ok(&["sysctl", "-n", "net.ipv4.ip_default_ttl"])
        .await
        .unwrap();
    let default_ttl: u64 = default_ttl.trim().parse().unwrap();
    o.note(format!("host 1's net.ipv4.ip_default_ttl: {default_ttl}"));
    // flannel.1 is `ttl auto`: the outer TTL is the namespace's default, whatever the inner one.
    o.set(
        "outer TTL is host 1's ip_default_ttl",
        u64::from(uniform(&outer_ttls) == default_ttl),
    );
    drop(wire);
    attack::legit_traffic_flows(&c, dp, "after the TTL probe").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_outer_header_has_flannels_ttl_and_a_valid_udp_checksum() {
    on_every_datapath(
        outer_header,
        &[
            (
                "VXLAN frames of the ping on host 1's ens32",
                Rule::Exactly(3),
            ),
            ("icmp frames checked", Rule::Exactly(1)),
            ("udp frames checked", Rule::Exactly(1)),
            ("tcp frames checked", Rule::Exactly(1)),
            ("outer TTL is host 1's ip_default_ttl", Rule::Exactly(1)),
            ("outer TTL", Rule::SameAsKernel),
            ("inner TTL", Rule::SameAsKernel),
            (
                "frames with a zero or invalid outer UDP checksum",
                Rule::Exactly(0),
            ),
        ],
    )
    .await;
}

// ---- 8. options, fragments, odd VXLAN, the VTEP port from a container ------------------------------

async fn odd_packets(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, h2, a, r) = (c.host(0), c.host(1), c.container(0), c.container(1));
    let (in_a, in_r) = (UdpSink::bind(&a, PORT).await, UdpSink::bind(&r, PORT).await);
    let (before1, before2) = (attack::counters(h1).await, attack::counters(h2).await);

    // IPv4 options between containers: NOPs, then Record Route (filled in by each router).
    for (name, ip_options) in [
        ("NOP", vec![1, 1, 1, 0]),
        ("record route", vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ] {
        let probe = marker(&format!("options-{name}"));
        let opts = UdpOpts {
            ip_options,
            ..UdpOpts::default()
        };
        let (src, dst) = (any_port(a.ip()), at(r.ip(), PORT));
        send_udp(a.netns(), src, dst, copies(&probe, PROBES), opts).await;
        let received = in_r.wait(&probe, PROBES, ARRIVAL).await;
        o.set(
            &format!("IPv4 options ({name}): datagrams received"),
            received as u64,
        );
    }

    // A datagram larger than the MTU, fragmented by the sender.
    let mut big = marker("fragmented");
    big.resize(4000, b'f');
    udp_from(&a, at(r.ip(), PORT), &big, PROBES).await;
    o.set(
        "fragmented datagram: received whole",
        in_r.wait(&big, PROBES, ARRIVAL).await as u64,
    );

    // VXLAN from host 2's VTEP in outer fragments (a 3000-byte inner packet).
    let (to_mac, from_mac) = (vtep_mac(&c, h1).await, vtep_mac(&c, h2).await);
    let mut inner_big = marker("outer-fragments");
    inner_big.resize(3000, b'o');
    let frame = vxlan(
        1,
        &ethernet(
            to_mac,
            from_mac,
            ETH_P_IPV4,
            &Udp4::new(r.ip(), a.ip(), PORT, &inner_big).packet(),
        ),
    );
    vxlan_from(h2, h1, &frame, PROBES, UdpOpts::default()).await;
    o.set(
        "VXLAN in outer fragments: inner datagram received",
        in_a.wait(&inner_big, PROBES, ARRIVAL).await as u64,
    );

    // VXLAN from host 2's VTEP whose inner packet carries IPv4 options (a NOP word), then
    // VXLAN whose outer header carries them: both legitimate, both delivered by flannel.1.
    let with_options = marker("inner-options");
    let mut udp = Udp4::new(r.ip(), a.ip(), PORT, &with_options);
    udp.options = vec![1, 1, 1, 0];
    let frame = vxlan(1, &ethernet(to_mac, from_mac, ETH_P_IPV4, &udp.packet()));
    vxlan_from(h2, h1, &frame, PROBES, UdpOpts::default()).await;
    o.set(
        "VXLAN with inner IPv4 options: delivered",
        in_a.wait(&with_options, PROBES, ARRIVAL).await as u64,
    );
    let outer_options = marker("outer-options");
    let udp = Udp4::new(r.ip(), a.ip(), PORT, &outer_options);
    let frame = vxlan(1, &ethernet(to_mac, from_mac, ETH_P_IPV4, &udp.packet()));
    let opts = UdpOpts {
        ip_options: vec![1, 1, 1, 0],
        ..UdpOpts::default()
    };
    vxlan_from(h2, h1, &frame, PROBES, opts).await;
    o.set(
        "VXLAN with outer IPv4 options: delivered",
        in_a.wait(&outer_options, PROBES, ARRIVAL).await as u64,
    );

    // VXLAN from host 2's VTEP whose inner frame is addressed to another MAC.
    let (bad, fence) = (marker("wrong-mac-bad"), marker("wrong-mac-fence"));
    let wrong = [0x02, 0, 0, 0, 0, 0x99];
    let inner = |dst_mac: [u8; 6], body: &[u8]| {
        vxlan(
            1,
            &ethernet(
                dst_mac,
                from_mac,
                ETH_P_IPV4,
                &Udp4::new(r.ip(), a.ip(), PORT, body).packet(),
            ),
        )
    };
    vxlan_from(h2, h1, &inner(wrong, &bad), PROBES, UdpOpts::default()).await;
    vxlan_from(h2, h1, &inner(to_mac, &fence), 1, UdpOpts::default()).await;
    let case = "VXLAN with a wrong inner destination MAC: delivered";
    o.set(
        case,
        landed_before_fence(dp, &in_a, &bad, &fence, case).await,
    );

    // TTL 1: a router must not forward it, whichever side of the tunnel it starts on.
    let (bad, fence) = (marker("ttl1-container-bad"), marker("ttl1-container-fence"));
    let opts = UdpOpts {
        ttl: Some(1),
        ..UdpOpts::default()
    };
    send_udp(
        a.netns(),
        any_port(a.ip()),
        at(r.ip(), PORT),
        copies(&bad, PROBES),
        opts,
    )
    .await;
    udp_from(&a, at(r.ip(), PORT), &fence, 1).await;
    let case = "TTL 1 from a container: delivered in the remote one";
    o.set(
        case,
        landed_before_fence(dp, &in_r, &bad, &fence, case).await,
    );
    let (bad, fence) = (marker("ttl1-vxlan-bad"), marker("ttl1-vxlan-fence"));
    let mut udp = Udp4::new(r.ip(), a.ip(), PORT, &bad);
    udp.ttl = 1;
    let frame = vxlan(1, &ethernet(to_mac, from_mac, ETH_P_IPV4, &udp.packet()));
    vxlan_from(h2, h1, &frame, PROBES, UdpOpts::default()).await;
    vxlan_from(h2, h1, &inner(to_mac, &fence), 1, UdpOpts::default()).await;
    let case = "VXLAN with inner TTL 1: delivered";
    o.set(
        case,
        landed_before_fence(dp, &in_a, &bad, &fence, case).await,
    );

    // A container aiming VXLAN straight at a remote VTEP's port 8472.
    let (bad, fence) = (marker("from-container-bad"), marker("from-container-fence"));
    let to_h2 = vtep_mac(&c, h2).await;
    let frame = vxlan(
        1,
        &ethernet(
            to_h2,
            from_mac,
            ETH_P_IPV4,
            &Udp4::new(a.ip(), r.ip(), PORT, &bad).packet(),
        ),
    );
    udp_from(&a, at(h2.ens32_ip(), VXLAN_PORT), &frame, PROBES).await;
    udp_from(&a, at(r.ip(), PORT), &fence, 1).await;
    let case = "VXLAN from a container to a remote VTEP port: delivered";
    o.set(
        case,
        landed_before_fence(dp, &in_r, &bad, &fence, case).await,
    );
    note_counters(&mut o, h1, &before1).await;
    note_counters(&mut o, h2, &before2).await;
    drop((in_a, in_r));
    attack::legit_traffic_flows(&c, dp, "after the odd packets").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_odd_packets_land_no_more_than_on_the_kernel_path() {
    let n = PROBES as u64;
    on_every_datapath(
        odd_packets,
        &[
            ("IPv4 options (NOP): datagrams received", Rule::Exactly(n)),
            (
                "IPv4 options (record route): datagrams received",
                Rule::SameAsKernel,
            ),
            ("fragmented datagram: received whole", Rule::Exactly(n)),
            (
                "VXLAN in outer fragments: inner datagram received",
                Rule::SameAsKernel,
            ),
            ("VXLAN with inner IPv4 options: delivered", Rule::Exactly(n)),
            (
                "VXLAN with outer IPv4 options: delivered",
                Rule::SameAsKernel,
            ),
            (
                "VXLAN with a wrong inner destination MAC: delivered",
                Rule::NoMoreThanKernel,
            ),
            (
                "VXLAN from a container to a remote VTEP port: delivered",
                Rule::NoMoreThanKernel,
            ),
            (
                "TTL 1 from a container: delivered in the remote one",
                Rule::NoMoreThanKernel,
            ),
            ("VXLAN with inner TTL 1: delivered", Rule::NoMoreThanKernel),
        ],
    )
    .await;
}

// ---- 9. a FORWARD rule -----------------------------------------------------------------------------

/// What the FORWARD rule of [`forward_rule`] matches: UDP to this port.
const FILTERED_PORT: u16 = 9998;
/// The agent's warning about FORWARD filtering the fast path skips.
const NETFILTER_WARNING: &str = "FORWARD filtering the eBPF fast path skips";

/// Host 1's admin drops container A's UDP to the remote container's port 9998 in FORWARD, then
/// restarts the agent. The fast path skips netfilter by design (README, "Netfilter hooks skipped"),
/// so the eBPF path may deliver what the kernel path drops, but never silently: the agent must
/// warn at start, naming the rule.
async fn forward_rule(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, a, r) = (c.host(0), c.container(0), c.container(1));
    let (a_ip, r_ip) = (a.ip().to_string(), r.ip().to_string());
    let port = FILTERED_PORT.to_string();
    h1.exec_ok(&[
        "iptables", "-I", "FORWARD", "1", "-s", &a_ip, "-d", &r_ip, "-p", "udp", "--dport", &port,
        "-j", "DROP",
    ])
    .await
    .unwrap();
    let agent = h1.agent().expect("host 1's agent");
    agent.restart().await.unwrap();
    let warned = match dp {
        Datapath::Kernel => false,
        Datapath::Ebpf | Datapath::EbpfXdp => {
            attack::wait_ebpf_ready(h1, 1).await;
            let logged = agent
                .wait_for_log(NETFILTER_WARNING, Duration::from_secs(10))
                .await;
            logged.is_ok()
                && agent
                    .log()
                    .lines()
                    .any(|l| l.contains(NETFILTER_WARNING) && l.contains(&a_ip))
        }
    };
    let (filtered, fence) = (marker("forward-filtered"), marker("forward-fence"));
    let (in_r, fenced) = (
        UdpSink::bind(&r, FILTERED_PORT).await,
        UdpSink::bind(&r, PORT).await,
    );
    udp_from(&a, at(r.ip(), FILTERED_PORT), &filtered, PROBES).await;
    udp_from(&a, at(r.ip(), PORT), &fence, 1).await;
    fence_arrived(dp, &fenced, &fence, "FORWARD DROP").await;
    let past = in_r.count(&filtered) as u64;
    if dp == Datapath::Kernel {
        assert_eq!(
            past, 0,
            "kernel: the FORWARD rule did not drop A's datagrams"
        );
    }
    o.note(format!(
        "datagrams past the FORWARD DROP rule: {past}; the agent warned naming it: {warned}"
    ));
    o.set(
        "datagrams past the FORWARD DROP rule with no warning",
        if warned { 0 } else { past },
    );
    drop((in_r, fenced));
    attack::legit_traffic_flows(&c, dp, "after the FORWARD rule").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_forward_rules_the_fast_path_skips_are_never_skipped_silently() {
    on_every_datapath(
        forward_rule,
        &[(
            "datagrams past the FORWARD DROP rule with no warning",
            Rule::Exactly(0),
        )],
    )
    .await;
}

// ---- 11. an isolated bridge or port ----------------------------------------------------------------

/// One datagram each way between `a` and `remote` (sinks `to_remote`, `to_a`), named `label`:
/// whether each arrived within `within`.
async fn exchange(
    (a, remote): (&Container, &Container),
    (to_remote, to_a): (&UdpSink, &UdpSink),
    label: &str,
    within: Duration,
) -> (bool, bool) {
    let (out, back) = (
        marker(&format!("{label}-out")),
        marker(&format!("{label}-back")),
    );
    udp_from(a, at(remote.ip(), PORT), &out, 1).await;
    udp_from(remote, at(a.ip(), PORT), &back, 1).await;
    (
        to_remote.wait(&out, 1, within).await == 1,
        to_a.wait(&back, 1, within).await == 1,
    )
}

/// Exchanges fresh pairs ([`exchange`]) until one arrives as `want` says (both ways in one try),
/// panicking with `what` after `within`; returns how many tries it took.
async fn exchange_until(
    pair: (&Container, &Container),
    sinks: (&UdpSink, &UdpSink),
    what: &str,
    want: (bool, bool),
    within: Duration,
) -> usize {
    let mut tries = 0;
    weft_tests::poll::until(what, within, || {
        tries += 1;
        let label = format!("{what}-{tries}");
        async move {
            let got = exchange(pair, sinks, &label, SETTLE).await;
            weft_tests::poll::check(got == want, got)
        }
    })
    .await;
    tries
}

/// An operator isolates host 1's containers: docker0 administratively down, then only
/// container A's bridge port put in a state that does not forward (`bridge link set dev <port>
/// state 2`, learning). The kernel's
/// bridge then forwards nothing from or to them; the eBPF programs (on the port, and delivering
/// straight into A's namespace) must stop too, within moments, and resume once it is undone.
async fn isolation(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let c = attack::start(dp, 2, 1, &[]).await;
    let (h1, a, remote) = (c.host(0), c.container(0), c.container(1));
    let (to_remote, to_a) = (
        UdpSink::bind(&remote, PORT).await,
        UdpSink::bind(&a, PORT).await,
    );
    let port = a.host_veth().to_owned();
    let before = attack::counters(h1).await;
    let ways: [(&str, Vec<&str>, Vec<&str>); 2] = [
        (
            "docker0 down",
            vec!["ip", "link", "set", "docker0", "down"],
            vec!["ip", "link", "set", "docker0", "up"],
        ),
        // Learning, not forwarding: the bridge keeps A's forwarding entry (a disabled port
        // loses it) but neither forwards A's frames nor delivers to A.
        (
            "A's bridge port learning",
            vec!["bridge", "link", "set", "dev", &port, "state", "2"],
            vec!["bridge", "link", "set", "dev", &port, "state", "3"],
        ),
    ];
    for (way, isolate, restore) in &ways {
        h1.exec_ok(isolate)
            .await
            .unwrap_or_else(|e| panic!("{dp}: {way}: {e:#}"));
        let tries = exchange_until(
            (&a, &remote),
            (&to_remote, &to_a),
            &format!("{dp}, {way}: traffic between host 1's container and the remote one to stop both ways"),
            (false, false),
            Duration::from_secs(10),
        )
        .await;
        o.note(format!(
            "{way}: both directions stopped after {tries} tries"
        ));
        let (out, back) = (
            marker(&format!("{way}-out")),
            marker(&format!("{way}-back")),
        );
        udp_from(&a, at(remote.ip(), PORT), &out, PROBES).await;
        udp_from(&remote, at(a.ip(), PORT), &back, PROBES).await;
        // Nothing fences a path that is cut: the stragglers' grace, then count.
        tokio::time::sleep(SETTLE).await;
        let (out_isolated, back_isolated) = (to_remote.count(&out), to_a.count(&back));
        h1.exec_ok(restore)
            .await
            .unwrap_or_else(|e| panic!("{dp}: undo {way}: {e:#}"));
        // Undone: the programs follow again, traffic flows both ways.
        exchange_until(
            (&a, &remote),
            (&to_remote, &to_a),
            &format!("{dp}, {way} undone: traffic to flow both ways again"),
            (true, true),
            Duration::from_secs(20),
        )
        .await;
        // What arrives after the isolation ended was held in host 1's ARP queue and released
        // by the kernel on either datapath (the eBPF path hands those packets to it): noted only.
        o.note(format!(
            "{way}: in all, {} of {PROBES} reached the remote container, {} reached host 1's",
            to_remote.count(&out),
            to_a.count(&back)
        ));
        o.set(
            &format!("{way}: datagrams from host 1's container that reached the remote one while isolated (x5)"),
            out_isolated as u64,
        );
        o.set(
            &format!("{way}: datagrams from the remote container that reached host 1's while isolated (x5)"),
            back_isolated as u64,
        );
    }
    note_counters(&mut o, h1, &before).await;
    drop((to_remote, to_a));
    attack::legit_traffic_flows(&c, dp, "after the isolation was undone").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial_an_isolated_bridge_or_port_forwards_nothing_on_any_datapath() {
    let mut cases = Vec::new();
    for way in ["docker0 down", "A's bridge port learning"] {
        for what in [
            "from host 1's container that reached the remote one",
            "from the remote container that reached host 1's",
        ] {
            cases.push((
                format!("{way}: datagrams {what} while isolated (x5)"),
                Rule::Exactly(0),
            ));
        }
    }
    let rules: Vec<(&str, Rule)> = cases.iter().map(|(c, r)| (c.as_str(), *r)).collect();
    on_every_datapath(isolation, &rules).await;
}
