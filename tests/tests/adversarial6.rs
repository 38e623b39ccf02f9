//! The adversarial suite over IPv6: what an attacker inside a container (or holding a peer's IPv6
//! VTEP address) can make a dual-stack overlay do, tried on both datapaths. As in
//! `adversarial.rs`, each scenario runs at once on a cluster of `--datapath kernel` hosts
//! (flannel-v6.1, the reference) and on identical clusters of `--datapath ebpf` hosts with each
//! decapsulation hook; the eBPF clusters must land no more than the kernel's (or exactly what it
//! does, for legitimate traffic and for what the fast path hands back to the kernel), and every
//! container still reaches every other one over both families afterwards.
//!
//! Then what only the eBPF datapath has: an IPv6-only network on the fast path, a deleted
//! dual-stack lease leaving both families' peer maps, and a new container's IPv6 address bound
//! from the bridge's neighbour events, long before the next reconcile.
//!
//! Root only: `cargo xtask test --skip-ebpf -- adversarial6 --include-ignored`.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use weft_tests::attack::{
    self, ecn6, ecn_case, ethernet, find, hop_limit6, icmpv6, landed_before_fence, mac, marker,
    note_counters, on_every_datapath, send_frames, send_udp6, vlan_frame, vtep_mac6, vxlan,
    Capture, Datapath, DualStack, Observed, Rule, Udp6Opts, UdpSink, ARRIVAL, CE, ECT0, ETH_P_IPV6,
    NOT_ECT, PORT, PROBES, SETTLE, VXLAN_PORT,
};
use weft_tests::packet::{ipv6_packet, ipv6_with_options, udp6, DEST_OPTIONS, HOP_BY_HOP, UDP};
use weft_tests::{poll, Container, Host};

/// ICMPv6 types (RFC 4443).
const PACKET_TOO_BIG: u8 = 2;
const TIME_EXCEEDED: u8 = 3;

fn at(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// `n` copies of `payload` as UDP datagrams from `from` (its IPv6 address `src`) to `to`.
async fn udp6_from(from: &Container, src: Ipv6Addr, to: SocketAddrV6, payload: &[u8], n: usize) {
    udp6_with(from, src, to, payload, n, Udp6Opts::default()).await;
}

async fn udp6_with(
    from: &Container,
    src: Ipv6Addr,
    to: SocketAddrV6,
    payload: &[u8],
    n: usize,
    opts: Udp6Opts,
) {
    send_udp6(
        from.netns(),
        at(src, 0),
        to,
        vec![payload.to_vec(); n],
        opts,
    )
    .await;
}

/// An IPv6/UDP frame `src -> dst:PORT` carrying `body`, from container `from` to its gateway
/// (docker0), as it would leave `from`'s eth0.
async fn frame_from(
    from: &Container,
    host: &Host,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    body: &[u8],
) -> Vec<u8> {
    let packet = ipv6_packet(src, dst, UDP, 64, 0, &udp6(src, dst, 40000, PORT, body));
    ethernet(
        mac(host.name(), "docker0").await,
        mac(from.netns(), "eth0").await,
        ETH_P_IPV6,
        &packet,
    )
}

/// ONE frame from container `from` on `host` with source `src` (not its own) to `dst`.
async fn forge_once(from: &Container, host: &Host, src: Ipv6Addr, dst: Ipv6Addr, what: &str) {
    let frame = frame_from(from, host, src, dst, &marker(what)).await;
    send_frames(from.netns(), "eth0", vec![frame]).await;
}

/// VXLAN over IPv6 from `from`'s VTEP address (its ens32 IPv6 address) to `to`'s, carrying an
/// inner IPv6/UDP packet `src -> dst:PORT` with traffic class `inner_tc`, outer traffic class
/// `outer_tc`: what a peer's flannel-v6.1 (or someone holding its address) sends.
#[allow(clippy::too_many_arguments)]
async fn vxlan6_from(
    d: &DualStack,
    from: &Host,
    to: &Host,
    (src, dst): (Ipv6Addr, Ipv6Addr),
    body: &[u8],
    (outer_tc, inner_tc): (u8, u8),
    n: usize,
) {
    let inner = ipv6_packet(
        src,
        dst,
        UDP,
        64,
        inner_tc,
        &udp6(src, dst, 40000, PORT, body),
    );
    let (to_mac, from_mac) = (vtep_mac6(&d.c, to).await, vtep_mac6(&d.c, from).await);
    let frame = vxlan(1, &ethernet(to_mac, from_mac, ETH_P_IPV6, &inner));
    send_udp6(
        from.name(),
        at(from.ens32_ipv6(), 0),
        at(to.ens32_ipv6(), VXLAN_PORT),
        vec![frame; n],
        Udp6Opts {
            tclass: Some(outer_tc),
            hops: None,
        },
    )
    .await;
}

// ---- sources: hijack, forged sources, VLAN ----------------------------------------------------

/// On three hosts with two dual-stack containers each: (a) container B sends ONE packet with its
/// neighbour A's IPv6 source to a remote subnet, then a remote container sends to A (also after
/// host 1 forgot its neighbour entry for A), and B claims an IPv6 address a new container C gets
/// next; (b) a container on host 2 sends with a source inside
/// host 3's IPv6 subnet to host 1's container, and host 2's VTEP address sends VXLAN whose inner
/// source lies in host 3's subnet; (c) container A sends 802.1Q-tagged frames carrying IPv6.
async fn sources(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let d = attack::start_dual(dp, 3, 2, &[]).await;
    let (h1, h2, h3) = (d.c.host(0), d.c.host(1), d.c.host(2));
    let (a, b, s) = (d.c.container(0), d.c.container(1), d.c.container(2));
    let (a6, b6, s6) = (d.v6(0), d.v6(1), d.v6(2));
    let before = [attack::counters(h1).await, attack::counters(h2).await];

    // (a) B forges A's source once, then the remote container S sends to A.
    forge_once(&b, h1, a6, s6, "hijack-spoof").await;
    let (in_a, in_b) = where_it_lands(&s, s6, (&a, a6), &b, "to-a").await;
    o.set("A's traffic: landed in A", in_a);
    o.set("A's traffic: landed in B", in_b);
    h1.netns()
        .ip(&["-6", "neigh", "flush", "dev", "docker0"])
        .await
        .unwrap();
    forge_once(&b, h1, a6, s6, "hijack-spoof-again").await;
    let (in_a, in_b) = where_it_lands(&s, s6, (&a, a6), &b, "to-a-no-neighbour").await;
    o.set("A's traffic, no neighbour entry: landed in A", in_a);
    o.set("A's traffic, no neighbour entry: landed in B", in_b);
    // An IPv6 address nobody uses yet, claimed by B before a new container C gets it.
    let own6 = attack::ipv6_subnet(h1).await;
    let next = Ipv6Addr::from(u128::from(own6.network()) + 2 + h1.containers().len() as u128);
    forge_once(&b, h1, next, s6, "hijack-claim").await;
    let c3 = h1.add_container().await.unwrap();
    c3.add_ipv6(next, own6.prefix_len(), own6.addr())
        .await
        .unwrap();
    let (in_c, in_b) = where_it_lands(&s, s6, (&c3, next), &b, "to-c").await;
    o.set("claimed address: landed in its new owner C", in_c);
    o.set("claimed address: landed in B", in_b);

    // (b) Forged sources towards A: from a container on host 2, then from host 2's VTEP.
    let in_h3 = Ipv6Addr::from(u128::from(attack::ipv6_subnet(h3).await.network()) + 200);
    let sink = UdpSink::bind_at(a.netns(), at(a6, PORT).into()).await;
    let (bad, fence) = (marker("container-forges"), marker("container-forges-fence"));
    let frame = frame_from(&s, h2, in_h3, a6, &bad).await;
    send_frames(s.netns(), "eth0", vec![frame; PROBES]).await;
    udp6_from(&s, s6, at(a6, PORT), &fence, 1).await;
    let case =
        "container on host 2 with a source in host 3's IPv6 subnet reached host 1's container";
    o.set(
        case,
        landed_before_fence(dp, &sink, &bad, &fence, case).await,
    );
    // ... and with its host's addresses: docker0's (inside host 2's subnet, bound to no
    // container) and ens32's (the underlay's).
    let h2_docker0 = attack::ipv6_subnet(h2).await.addr();
    for (case, src) in [
        (
            "container on host 2 with host 2's docker0 IPv6 address reached host 1's container",
            h2_docker0,
        ),
        (
            "container on host 2 with host 2's ens32 IPv6 address reached host 1's container",
            h2.ens32_ipv6(),
        ),
    ] {
        let (bad, fence) = (
            marker(&format!("{src}-forged")),
            marker(&format!("{src}-fence")),
        );
        let frame = frame_from(&s, h2, src, a6, &bad).await;
        send_frames(s.netns(), "eth0", vec![frame; PROBES]).await;
        udp6_from(&s, s6, at(a6, PORT), &fence, 1).await;
        o.set(
            case,
            landed_before_fence(dp, &sink, &bad, &fence, case).await,
        );
    }

    let (bad, fence) = (marker("vtep-forges"), marker("vtep-forges-fence"));
    vxlan6_from(&d, h2, h1, (in_h3, a6), &bad, (0, 0), PROBES).await;
    vxlan6_from(&d, h2, h1, (s6, a6), &fence, (0, 0), 1).await;
    let case =
        "host 2's VTEP with an inner source in host 3's IPv6 subnet reached host 1's container";
    o.set(
        case,
        landed_before_fence(dp, &sink, &bad, &fence, case).await,
    );
    drop(sink);

    // (c) VLAN-tagged IPv6 from A to S.
    let (bad, fence) = (marker("vlan-tagged"), marker("vlan-fence"));
    let wire = Capture::start(h1.name(), "ens32", &bad).await;
    let there = Capture::start(s.netns(), "eth0", &bad).await;
    let sink = UdpSink::bind_at(s.netns(), at(s6, PORT).into()).await;
    let (gw, a_mac) = (
        mac(h1.name(), "docker0").await,
        mac(a.netns(), "eth0").await,
    );
    let packet = ipv6_packet(a6, s6, UDP, 64, 0, &udp6(a6, s6, 40000, PORT, &bad));
    let vlan_before = attack::counters(h1).await;
    send_frames(
        a.netns(),
        "eth0",
        vec![vlan_frame(gw, a_mac, 5, ETH_P_IPV6, &packet); PROBES],
    )
    .await;
    udp6_from(&a, a6, at(s6, PORT), &fence, 1).await;
    landed_before_fence(dp, &sink, &bad, &fence, "VLAN").await;
    attack::record_vlan(&mut o, h1, (&wire, &there), &vlan_before).await;
    drop((wire, there, sink));

    note_counters(&mut o, h1, &before[0]).await;
    note_counters(&mut o, h2, &before[1]).await;
    // B's own address still works from B (its binding was never moved).
    udp6_from(&b, b6, at(s6, PORT), b"b-still-b", 1).await;
    attack::legit_traffic_flows6(&d, dp, "after the IPv6 source attacks").await;
    o
}

/// `from` (IPv6 `src`) sends probes to `owner`'s IPv6 address: how many landed in `owner` and
/// how many in `attacker` (caught on its eth0).
async fn where_it_lands(
    from: &Container,
    src: Ipv6Addr,
    (owner, owner6): (&Container, Ipv6Addr),
    attacker: &Container,
    what: &str,
) -> (u64, u64) {
    let probe = marker(what);
    let in_owner = UdpSink::bind_at(owner.netns(), at(owner6, PORT).into()).await;
    let n = 3 * PROBES;
    let send = udp6_from(from, src, at(owner6, PORT), &probe, n);
    attack::where_it_lands(&in_owner, attacker, &probe, n, send).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial6_forged_ipv6_sources_and_vlan_tags_get_no_further_than_on_the_kernel_path() {
    let forged = [
        (
            "container on host 2 with a source in host 3's IPv6 subnet reached host 1's container",
            Rule::NoMoreThanKernel,
        ),
        (
            "container on host 2 with host 2's docker0 IPv6 address reached host 1's container",
            Rule::NoMoreThanKernel,
        ),
        (
            "container on host 2 with host 2's ens32 IPv6 address reached host 1's container",
            Rule::NoMoreThanKernel,
        ),
        // IPv6 has no rp_filter: flannel-v6.1 delivers these; the fast path checks the
        // inner source against the subnet the sending VTEP leased.
        (
            "host 2's VTEP with an inner source in host 3's IPv6 subnet reached host 1's container",
            Rule::EbpfExactly(0),
        ),
    ];
    let rules = [&attack::HIJACK_RULES[..], &forged, &attack::VLAN_RULES].concat();
    on_every_datapath(sources, &rules).await;
}

// ---- forwarding: ECN, MTU, hop limit, extension headers ----------------------------------------

/// (outer, inner) ECN pairs sent as VXLAN over IPv6 from host 2's VTEP to host 1's container.
const ECN_CASES: [(u8, u8); 5] = [
    (CE, ECT0),
    (CE, NOT_ECT),
    (CE, CE),
    (NOT_ECT, ECT0),
    (ECT0, NOT_ECT),
];

/// Hop limits container A sends with to the remote container.
const HOPS: [u8; 3] = [1, 2, 3];

/// On two hosts with one dual-stack container each (A on host 1, R on host 2): (d) RFC 6040 on
/// decapsulation over IPv6; (e) an IPv6 datagram too big for the underlay: Packet Too Big comes
/// back and a resend arrives; (f) small hop limits and option headers, which the fast path hands
/// back to the kernel: the same outcome as flannel-v6.1's.
async fn forwarding(dp: Datapath) -> Observed {
    let mut o = Observed::default();
    let d = attack::start_dual(dp, 2, 1, &[]).await;
    let (h1, h2) = (d.c.host(0), d.c.host(1));
    let (a, r) = (d.c.container(0), d.c.container(1));
    let (a6, r6) = (d.v6(0), d.v6(1));
    let before = [attack::counters(h1).await, attack::counters(h2).await];

    // (d) ECN.
    let all = marker("ecn");
    let caught = Capture::start(a.netns(), "eth0", &all).await;
    for (outer, inner) in ECN_CASES {
        let mut body = all.clone();
        body.extend(format!("-{outer}{inner}").bytes());
        vxlan6_from(&d, h2, h1, (r6, a6), &body, (outer, inner), PROBES).await;
    }
    caught
        .wait((ECN_CASES.len() - 1) * PROBES, ARRIVAL, |f| !f.outgoing)
        .await;
    tokio::time::sleep(SETTLE).await;
    let frames: Vec<_> = caught
        .caught()
        .into_iter()
        .filter(|f| !f.outgoing)
        .collect();
    for (outer, inner) in ECN_CASES {
        let mut body = all.clone();
        body.extend(format!("-{outer}{inner}").bytes());
        let ecns: Vec<u8> = frames
            .iter()
            .filter(|f| find(&f.data, &body).is_some())
            .filter_map(|f| ecn6(&f.data))
            .collect();
        attack::record_ecn(&mut o, &ecn_case(outer, inner), &ecns);
    }
    drop(caught);

    // (e) One datagram whose IPv6 packet (1450 bytes, the containers' MTU) leaves no room for
    // the 70 bytes of VXLAN over IPv6 on a 1500-byte underlay.
    let big = {
        let mut b = marker("too-big");
        b.resize(1450 - 40 - 8, b'x');
        b
    };
    let errors = Capture::matching(a.netns(), "eth0", |f| {
        icmpv6(f).is_some_and(|(t, _)| t == PACKET_TOO_BIG)
    })
    .await;
    let sink = UdpSink::bind_at(r.netns(), at(r6, PORT).into()).await;
    udp6_from(&a, a6, at(r6, PORT), &big, 1).await;
    let ptb = errors.wait(1, ARRIVAL, |f| !f.outgoing).await;
    o.set(
        "too big: Packet Too Big reached the sender",
        u64::from(ptb > 0),
    );
    let mtus: Vec<u32> = errors
        .caught()
        .iter()
        .filter_map(|f| icmpv6(&f.data).map(|(_, mtu)| mtu))
        .collect();
    o.set(
        "too big: MTU the Packet Too Big announced",
        mtus.first().copied().map_or(0, u64::from),
    );
    // Having learnt the path MTU, the sender fragments the resend: it must arrive.
    let resent = poll::try_until("the too-big datagram, resent, in R", ARRIVAL, || async {
        udp6_from(&a, a6, at(r6, PORT), &big, 1).await;
        let got = sink.wait(&big, 1, Duration::from_millis(500)).await;
        poll::check(got > 0, got)
    })
    .await;
    o.set("too big: a resend arrived", u64::from(resent.is_ok()));
    drop((errors, sink));

    // (f) Hop limits 1, 2, 3 from A to R: each router on the way (host 1, host 2) takes one.
    let hops = marker("hops");
    let in_r = Capture::start(r.netns(), "eth0", &hops).await;
    let back = Capture::matching(a.netns(), "eth0", |f| {
        icmpv6(f).is_some_and(|(t, _)| t == TIME_EXCEEDED)
    })
    .await;
    let wire = Capture::start(h1.name(), "ens32", &hops).await;
    for hop in HOPS {
        let mut body = hops.clone();
        body.extend(format!("-hop{hop}").bytes());
        let opts = Udp6Opts {
            hops: Some(hop),
            ..Udp6Opts::default()
        };
        udp6_with(&a, a6, at(r6, PORT), &body, PROBES, opts).await;
    }
    in_r.wait(PROBES, ARRIVAL, |f| !f.outgoing).await;
    back.wait(2 * PROBES, ARRIVAL, |f| !f.outgoing).await;
    tokio::time::sleep(SETTLE).await;
    for hop in HOPS {
        let mut body = hops.clone();
        body.extend(format!("-hop{hop}").bytes());
        let arrived: Vec<u8> = in_r
            .caught()
            .iter()
            .filter(|f| !f.outgoing && find(&f.data, &body).is_some())
            .filter_map(|f| hop_limit6(&f.data))
            .collect();
        o.set(&format!("hop limit {hop}: delivered"), arrived.len() as u64);
        o.set(
            &format!("hop limit {hop}: hop limit on arrival"),
            arrived.first().copied().map_or(0, u64::from),
        );
        let expired = back.count(|f| !f.outgoing && find(&f.data, &body).is_some());
        o.set(
            &format!("hop limit {hop}: time exceeded back to A"),
            expired as u64,
        );
    }
    // Where the errors come from: a source outside host 2's subnet is refused by host 1's
    // fast path (the kernel path's come from flannel-v6.1's address).
    let sources: Vec<Ipv6Addr> = wire
        .caught()
        .iter()
        .filter(|f| !f.outgoing)
        .filter_map(|f| inner_icmpv6_source(&f.data))
        .collect();
    o.note(format!(
        "ICMPv6 in VXLAN arriving on host 1's ens32 (not seen under XDP), inner sources: {sources:?}"
    ));
    drop((in_r, back, wire));

    // (f) Option headers from A to R (A's own, bound source).
    for (ext, name) in [(HOP_BY_HOP, "hop-by-hop"), (DEST_OPTIONS, "destination")] {
        let body = marker(&format!("options-{name}"));
        let there = Capture::start(r.netns(), "eth0", &body).await;
        let l4 = udp6(a6, r6, 40000, PORT, &body);
        let frame = ethernet(
            mac(h1.name(), "docker0").await,
            mac(a.netns(), "eth0").await,
            ETH_P_IPV6,
            &ipv6_with_options(a6, r6, ext, 64, UDP, &l4),
        );
        send_frames(a.netns(), "eth0", vec![frame; PROBES]).await;
        there.wait(PROBES, ARRIVAL, |f| !f.outgoing).await;
        tokio::time::sleep(SETTLE).await;
        o.set(
            &format!("{name} options header: delivered"),
            there.count(|f| !f.outgoing) as u64,
        );
    }

    // (e) TCP with segmentation before the wire: containers at MTU 1500 (more than the
    // overlay's, as a misconfigured container would be), TSO/GSO off on host 1's ens32.
    attack::oversize_mtu_without_offloads([(h1, &a), (h2, &r)], h1).await;
    let drops = async || {
        let (tx, rx) = attack::underlay_drops(h1, h2).await;
        tx + rx
    };
    let dropped = drops().await;
    let t = attack::tcp6_transfer(&a, &r, r6, 8 << 20).await;
    o.set(
        "TCP over IPv6, 8 MiB, no TSO on the wire: completed",
        u64::from(t.is_ok()),
    );
    o.note(format!("TCP over IPv6 transfer: {t:?}"));
    o.set(
        "TCP over IPv6, 8 MiB, no TSO on the wire: dropped by the underlay",
        drops().await - dropped,
    );

    note_counters(&mut o, h1, &before[0]).await;
    note_counters(&mut o, h2, &before[1]).await;
    attack::legit_traffic_flows6(&d, dp, "after the IPv6 forwarding probes").await;
    o
}

/// The inner source of a VXLAN-over-IPv6 frame carrying ICMPv6 (outer Ethernet, IPv6, UDP, VXLAN,
/// inner Ethernet: the inner IPv6 header at byte 84).
fn inner_icmpv6_source(frame: &[u8]) -> Option<Ipv6Addr> {
    const INNER: usize = 14 + 40 + 8 + 8 + 14;
    let ip = frame.get(INNER..INNER + 40)?;
    let src: [u8; 16] = ip[8..24].try_into().ok()?;
    (ip[0] >> 4 == 6 && ip[6] == weft_tests::packet::ICMPV6).then(|| src.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial6_ecn_mtu_hop_limit_and_options_over_ipv6_end_as_on_flannel_v6() {
    let n = PROBES as u64;
    let mut names = Vec::new();
    for (outer, inner) in ECN_CASES {
        let case = ecn_case(outer, inner);
        let (delivered, arrived) = match (outer, inner) {
            // RFC 6040: the congestion mark survives decapsulation...
            (CE, ECT0 | CE) => (Rule::Exactly(n), Rule::Exactly(u64::from(CE))),
            // ...and a CE mark on a flow that cannot carry it drops the packet.
            (CE, NOT_ECT) => (Rule::Exactly(0), Rule::Exactly(99)),
            _ => (Rule::Exactly(n), Rule::SameAsKernel),
        };
        names.push((format!("{case}: delivered"), delivered));
        names.push((format!("{case}: ECN on arrival"), arrived));
    }
    for hop in HOPS {
        for what in [
            "delivered",
            "hop limit on arrival",
            "time exceeded back to A",
        ] {
            names.push((format!("hop limit {hop}: {what}"), Rule::SameAsKernel));
        }
    }
    let mut rules: Vec<(&str, Rule)> = names.iter().map(|(c, r)| (c.as_str(), *r)).collect();
    rules.extend([
        (
            "too big: Packet Too Big reached the sender",
            Rule::Exactly(1),
        ),
        (
            "too big: MTU the Packet Too Big announced",
            Rule::SameAsKernel,
        ),
        ("too big: a resend arrived", Rule::Exactly(1)),
        ("hop-by-hop options header: delivered", Rule::SameAsKernel),
        ("destination options header: delivered", Rule::SameAsKernel),
        (
            "TCP over IPv6, 8 MiB, no TSO on the wire: completed",
            Rule::Exactly(1),
        ),
        (
            "TCP over IPv6, 8 MiB, no TSO on the wire: dropped by the underlay",
            Rule::Exactly(0),
        ),
    ]);
    on_every_datapath(forwarding, &rules).await;
}

// ---- what only the eBPF datapath has -----------------------------------------------------------

/// How long a host may take from agent start to its programs attached with every peer.
const READY: Duration = Duration::from_secs(30);

/// The ifindex of `dev` in namespace `ns`.
async fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = weft_tests::netns::run("ip", &["-n", ns, "-j", "link", "show", dev])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    v[0]["ifindex"].as_u64().expect("an ifindex") as u32
}

/// `EnableIPv4: false` on the eBPF datapath: the programs attach, the IPv6 side is configured
/// with the peer, and IPv6 between containers on two hosts rides the fast path (the sender's
/// `ipv6: encapsulated` and the receiver's `ipv6: decapsulated` grow by every ping).
async fn ipv6_only(dp: Datapath) {
    const PINGS: u64 = 20;
    let c = weft_tests::Cluster::start(weft_tests::ClusterOptions::new(2))
        .await
        .unwrap_or_else(|e| panic!("build a 2-host cluster for {dp}: {e:#}"));
    c.write_config(attack::CONFIG_IPV6_ONLY).await;
    c.start_agents(dp.args())
        .unwrap_or_else(|e| panic!("start the {dp} agents: {e:#}"));
    let (h1, h2) = (c.host(0), c.host(1));
    let (x, _) = attack::ipv6_only_container(h1, 0).await;
    let (y, y6) = attack::ipv6_only_container(h2, 0).await;
    for (h, ct) in [(h1, &x), (h2, &y)] {
        poll::until(
            &format!("{dp}: {}'s programs attached with one IPv6 peer", h.name()),
            READY,
            || async {
                let st = attack::status(h).await;
                let peers6 = st["ipv6"]["peers"].as_array().map_or(0, Vec::len);
                let ready = weft_tests::status::ebpf_ready_on(&st, 0, &[ct.host_veth()]);
                poll::check(ready && peers6 == 1, st)
            },
        )
        .await;
    }
    x.ping_until(y6, READY)
        .await
        .unwrap_or_else(|e| panic!("{dp}: IPv6-only {} -> {y6}: {e:#}", x.netns()));
    let fast = async || {
        let (s1, s2) = (attack::status(h1).await, attack::status(h2).await);
        (
            attack::counter(&s1, "ipv6: encapsulated"),
            attack::counter(&s2, "ipv6: decapsulated"),
        )
    };
    // Until both containers are bound (at once, from the bridges' neighbour events) the kernel
    // path may carry a ping.
    poll::until(
        &format!("{dp}: an IPv6-only ping encapsulated and decapsulated by the programs"),
        Duration::from_secs(15),
        || async {
            let before = fast().await;
            x.ping(y6).await.map_err(|e| e.to_string())?;
            let after = fast().await;
            poll::check(after.0 > before.0 && after.1 > before.1, (before, after))
        },
    )
    .await;
    let before = fast().await;
    x.ping_burst(y6, PINGS as u32)
        .await
        .unwrap_or_else(|e| panic!("{dp}: {e:#}"));
    let after = fast().await;
    assert!(
        after.0 - before.0 >= PINGS && after.1 - before.1 >= PINGS,
        "{dp}: {PINGS} IPv6-only pings: ipv6: encapsulated on {} grew by {}, ipv6: decapsulated \
         on {} by {}: the fast path did not carry them",
        h1.name(),
        after.0 - before.0,
        h2.name(),
        after.1 - before.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial6_ipv6_only_network_rides_the_fast_path_on_both_hooks() {
    let [tc, xdp] = Datapath::EBPF;
    tokio::join!(ipv6_only(tc), ipv6_only(xdp));
}

/// Deleting a dual-stack peer's lease from etcd removes its IPv4 and its IPv6 entries (remote
/// subnet and known VTEP) from the other host's pinned maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial6_a_deleted_dual_stack_lease_leaves_both_families_maps() {
    let d = attack::start_dual(Datapath::Ebpf, 2, 1, &[]).await;
    let (h1, h2) = (d.c.host(0), d.c.host(1));
    let gone = [
        h2.subnet()
            .expect("host 2's subnet")
            .subnet
            .trunc()
            .to_string(),
        h2.ens32_ip().to_string(),
        attack::ipv6_subnet(h2).await.trunc().to_string(),
        h2.ens32_ipv6().to_string(),
    ];
    let maps = attack::peer_maps(h1).unwrap();
    for entry in &gone {
        assert!(
            maps.mentions(entry),
            "host 1's maps lack {entry} before the deletion: {maps:?}"
        );
    }
    // Host 2 stops renewing; its lease is deleted as an operator (or expiry) would.
    h2.agent().expect("host 2's agent").kill();
    let prefix = format!("{}/subnets/", d.c.prefix());
    let key =
        d.c.etcd()
            .get_prefix(&prefix)
            .await
            .into_iter()
            .find(|(_, v)| v.contains(&format!("\"{}\"", h2.ens32_ipv6())))
            .map(|(k, _)| k)
            .expect("host 2's lease in etcd");
    assert_eq!(d.c.etcd().delete(&key).await, 1, "delete {key}");
    poll::until(
        "host 1's maps without host 2's IPv4 and IPv6 subnets and VTEPs",
        Duration::from_secs(10),
        || async {
            let maps = attack::peer_maps(h1).map_err(|e| format!("{e:#}"))?;
            let left: Vec<&String> = gone.iter().filter(|e| maps.mentions(e)).collect();
            poll::check(left.is_empty(), (left, maps.clone()))
        },
    )
    .await;
}

/// What host's bridge knows: neighbours, forwarding entries and port states, for failure messages.
async fn tables(h: &Host) -> String {
    let mut out = String::new();
    for argv in [
        &["ip", "neigh", "show", "dev", "docker0"][..],
        &["ip", "-6", "neigh", "show", "dev", "docker0"],
        &["bridge", "fdb", "show", "br", "docker0"],
        &["bridge", "link", "show"],
        &["ip", "link", "show", "docker0"],
    ] {
        let o = h.exec(argv).await;
        out.push_str(&format!(
            "$ {}\n{}",
            argv.join(" "),
            String::from_utf8_lossy(&o.stdout)
        ));
    }
    out
}

/// A new container's IPv6 address is bound to its port from the bridge's neighbour events, long
/// before the next reconcile (120 s here): its IPv6 traffic is encapsulated by its port's program
/// and the replies are delivered straight into it within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn adversarial6_a_new_containers_ipv6_is_bound_before_the_next_reconcile() {
    const RECONCILE: Duration = Duration::from_secs(120);
    const PROMPTLY: Duration = Duration::from_secs(15);
    let d = attack::start_dual(Datapath::Ebpf, 2, 1, &["--reconcile-interval", "120s"]).await;
    let (h1, remote6) = (d.c.host(0), d.v6(1));
    let fresh = h1.add_container().await.unwrap();
    // IPv4 first, until its binding exists: the port, its fdb entry and the IPv4 neighbour are
    // then old news, and only the IPv6 neighbour entry can tell the agent what follows.
    // (Cluster::container counts host 1's containers first: the fresh one is 1 now.)
    let remote4 = d.v6[1].0.ip();
    let bound4 = poll::try_until("the fresh container's IPv4 binding", PROMPTLY, || async {
        fresh.ping(remote4).await.map_err(|e| e.to_string())?;
        let bound = attack::local_map(h1).map_err(|e| format!("{e:#}"))?;
        poll::check(bound.iter().any(|(ip, _)| *ip == fresh.ip()), bound.len())
    })
    .await;
    if let Err(e) = bound4 {
        panic!("{e}; host 1's tables:\n{}", tables(h1).await);
    }
    let subnet = attack::ipv6_subnet(h1).await;
    let ip = Ipv6Addr::from(u128::from(subnet.network()) + 2 + 1);
    fresh
        .add_ipv6(ip, subnet.prefix_len(), subnet.addr())
        .await
        .unwrap();
    let port = ifindex(h1.name(), fresh.host_veth()).await;
    let started = Instant::now();
    let counts = async || {
        let st = attack::status(h1).await;
        (
            attack::counter(&st, "ipv6: encapsulated"),
            attack::counter(&st, "ipv6: decapsulated: delivered to container"),
        )
    };
    poll::until(
        "the fresh container's IPv6 bound to its port, its pings encapsulated and their replies \
         delivered by the programs",
        PROMPTLY,
        || async {
            let before = counts().await;
            fresh.ping(remote6).await.map_err(|e| e.to_string())?;
            let after = counts().await;
            let bound = attack::local_map6(h1).map_err(|e| format!("{e:#}"))?;
            let ours = bound
                .iter()
                .any(|(a, e)| *a == ip && e.host_ifindex_ne == port);
            poll::check(
                ours && after.0 > before.0 && after.1 > before.1,
                (ours, before, after),
            )
        },
    )
    .await;
    assert!(started.elapsed() < RECONCILE);
}
