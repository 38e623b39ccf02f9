//! Reading `weft status --json`: the counters and whether the eBPF datapath is fully attached.

use serde_json::Value;

/// A counter of a `weft status --json` document by its display name, 0 when absent.
pub fn counter(st: &Value, name: &str) -> u64 {
    st["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["value"].as_u64())
        .unwrap_or(0)
}

/// Decapsulation on ens32 and encapsulation on docker0 (and on every bridge port) attached, and
/// `peers` remote subnets in the map.
pub fn ebpf_ready(st: &Value, peers: usize) -> bool {
    ebpf_ready_on(st, peers, &[])
}

/// [`ebpf_ready`], and encapsulation attached on each of `ports` too (container veths the test
/// made, which the status lists only once the agent has seen them).
pub fn ebpf_ready_on(st: &Value, peers: usize, ports: &[&str]) -> bool {
    let programs = st["programs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let on = |prog: &str, iface: &str| {
        programs.iter().any(|p| {
            p["program"].as_str().is_some_and(|n| n.contains(prog)) && p["interface"] == iface
        })
    };
    st["mode"] == "ebpf"
        && on("decap", "ens32")
        && on("encap", "docker0")
        && ports.iter().all(|port| on("encap", port))
        && programs.iter().all(|p| p["state"] == "attached")
        && st["peers"].as_array().map_or(0, Vec::len) == peers
}
