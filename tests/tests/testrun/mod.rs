//! What the BPF_PROG_TEST_RUN suites (ebpf_programs.rs, ebpf_trust.rs, ebpf_ipv6.rs) share: the
//! addresses of the made-up node and its peer, the node settings the programs are configured
//! with, and how a program's cost per packet is measured.
#![allow(dead_code)] // each suite uses its own subset

use std::net::Ipv4Addr;

use weft::{
    datapath::{Datapath, NodeSettings, ProgramKind, SkbContext, TestRunOutput},
    lease::MacAddr,
};
use weft_tests::netns::sh;
use weft_tests::packet::verdict::{TC_ACT_OK, TC_ACT_REDIRECT};
use weft_tests::packet::{VNI, VXLAN_PORT};

pub const OUR_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 15, 21);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 15, 22);
pub const OUR_VTEP_MAC: [u8; 6] = [0x0a, 0x11, 0x11, 0x11, 0x11, 0x11];
pub const PEER_VTEP_MAC: [u8; 6] = [0x0a, 0x22, 0x22, 0x22, 0x22, 0x22];
pub const UNDERLAY_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x15, 0x21];
pub const PEER_NIC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x15, 0x22];
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x10, 0x01];
pub const CONTAINER_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x01, 0x0a, 0x05];

/// This node (10.1.10.0/24 behind OUR_IP) with underlay `ul0` and bridge `br0`, as the agent
/// configures it: TTL decremented, outer TTL 64 (`ttl auto`), outer UDP checksum on.
pub fn node_settings(ul0: u32, br0: u32) -> NodeSettings {
    NodeSettings {
        vni: VNI,
        port: VXLAN_PORT,
        vtep_ip: OUR_IP,
        vtep_mac: MacAddr(OUR_VTEP_MAC),
        underlay_ifindex: ul0,
        underlay_mac: MacAddr(UNDERLAY_MAC),
        underlay_mtu: 1500,
        bridge_ifindex: br0,
        bridge_down: false,
        decrement_ttl: true,
        outer_ttl: 64,
        udp_csum: true,
        subnet: Some("10.1.10.0/24".parse().unwrap()),
    }
}

/// One program run whose time is measured: a name, the program, the frame, the interface it
/// arrives on and the action the program must return for it.
pub type CostCase = (&'static str, ProgramKind, Vec<u8>, u32, u32);

/// Runs every case 20001 times (one BPF_PROG_TEST_RUN each, as a packet arrives alone) and
/// prints each one's median, 10th and 90th percentile in ns. Fails when a run returns
/// another action or a median exceeds 2 µs (an order of magnitude off, not a target).
pub fn per_packet_cost(dp: &Datapath, cases: &[CostCase]) {
    const RUNS: usize = 20_001;
    let mut report = Vec::new();
    for (name, kind, frame, ifindex, action) in cases {
        let skb = SkbContext {
            ifindex: *ifindex,
            ..Default::default()
        };
        let mut ns: Vec<u128> = (0..RUNS)
            .map(|_| {
                let (out, took) = dp.test_run_timed(*kind, frame, skb).expect("test run");
                assert_eq!(out.action, *action, "{name}: action");
                took.as_nanos()
            })
            .collect();
        ns.sort_unstable();
        let (p10, median, p90) = (ns[RUNS / 10], ns[RUNS / 2], ns[RUNS * 9 / 10]);
        report.push(format!("{name}: median {median} ns (p10 {p10}, p90 {p90})"));
        assert!(median < 2_000, "{name}: {median} ns per packet");
    }
    eprintln!(
        "per-packet cost, {RUNS} runs each:\n  {}",
        report.join("\n  ")
    );
}

/// What the next-hop cache tests of both families check: `encap` (encapsulation of one packet
/// to the peer) sends to the peer's NIC; after `ip <family> neigh replace <peer> lladdr ...`
/// it sends to the new MAC within a second, and after a blackhole route to the peer it hands
/// the packet to the kernel within a second (the cache keeps an answer 10 ms).
pub fn encap_follows_underlay_changes(family: &str, peer: &str, encap: impl Fn() -> TestRunOutput) {
    let out = encap();
    assert_eq!(
        (out.action, &out.packet[0..6]),
        (TC_ACT_REDIRECT, &PEER_NIC_MAC[..])
    );
    let moved = [0x02, 0x00, 0x00, 0x00, 0x15, 0x99];
    let lladdr = moved.map(|b| format!("{b:02x}")).join(":");
    sh(&[
        "ip",
        family,
        "neigh",
        "replace",
        peer,
        "lladdr",
        &lladdr,
        "dev",
        "ul0",
        "nud",
        "permanent",
    ]);
    weft_tests::poll::until_blocking(
        "encapsulation to use the peer's new MAC",
        std::time::Duration::from_secs(1),
        || {
            let out = encap();
            weft_tests::poll::check(out.packet[0..6] == moved, &out.packet[0..6]).map(|_| ())
        },
    );
    let host_route = format!("{peer}/{}", if family == "-6" { 128 } else { 32 });
    sh(&["ip", family, "route", "add", "blackhole", &host_route]);
    weft_tests::poll::until_blocking(
        "encapsulation to hand packets to the kernel once the peer's route is a blackhole",
        std::time::Duration::from_secs(1),
        || {
            let out = encap();
            weft_tests::poll::check(out.action == TC_ACT_OK, out.action)
        },
    );
}
