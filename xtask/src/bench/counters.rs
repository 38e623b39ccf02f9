//! The eBPF datapath's own counters, read with `weft status --json` in a host namespace, and the
//! check that an `ebpf` round really went through eBPF.
//!
//! A round counts as eBPF only when, on the sending host, the encap program encapsulated and, on
//! the receiving host, the decap program decapsulated at least 90 % of the 64-byte UDP packets the
//! receiver got in that round. A silent fallback to flannel.1 fails that check, loudly. With
//! `--family 6` the IPv6 counters (`ipv6: encapsulated`, `ipv6: decapsulated`) and flannel-v6.1
//! take their places.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context as _};
use serde::Serialize;
use weft_tests::Host;

/// Numeric leaves of `weft status --json`, by dotted path (`counters.encapsulated`, ...).
pub type Counters = BTreeMap<String, f64>;

/// Counter names (common::counter::NAMES) the check needs.
pub const ENCAPSULATED: &str = "encapsulated";
pub const DECAPSULATED: &str = "decapsulated";
/// Share of the received UDP packets the eBPF programs must have handled.
pub const MIN_SHARE: f64 = 0.9;

/// What shows one address family's packets on the eBPF path: its counters (common::counter and
/// counter6 NAMES) and the kernel device that carries what the programs hand back.
#[derive(Debug)]
pub struct PathCounters {
    pub encapsulated: &'static str,
    pub decapsulated: &'static str,
    /// What the host program (on the fallback device's egress) encapsulated of the host's own
    /// traffic; builds before it have no such counter.
    pub host_encapsulated: &'static str,
    pub fallback_device: &'static str,
}

pub const IPV4_PATH: PathCounters = PathCounters {
    encapsulated: ENCAPSULATED,
    decapsulated: DECAPSULATED,
    host_encapsulated: "host: encapsulated",
    fallback_device: "flannel.1",
};

pub const IPV6_PATH: PathCounters = PathCounters {
    encapsulated: "ipv6: encapsulated",
    decapsulated: "ipv6: decapsulated",
    host_encapsulated: "ipv6: host: encapsulated",
    fallback_device: "flannel-v6.1",
};

/// Run `weft status --json` of build `weft` (the one whose agent runs there: a build refuses
/// another build's map layout) in `host`'s namespace and flatten its counters. Fails, naming what
/// is missing, when the command fails or reports no encapsulated/decapsulated counters of `path`:
/// without them nothing proves the eBPF path carried the traffic. The baseline build (96d6bbb)
/// names its IPv4 counters as this one does.
pub async fn read_ebpf_counters(
    host: &Host,
    path: &PathCounters,
    weft: &Path,
) -> anyhow::Result<Counters> {
    let json = status_json_of(host, weft).await?;
    let counters = flatten(&json);
    for name in [path.encapsulated, path.decapsulated] {
        if find(&counters, name).is_none() {
            bail!(
                "`weft status --json` in {} has no `{name}` counter (numeric fields: {:?}); the ebpf \
                 rounds cannot be verified",
                host.name(),
                counters.keys().collect::<Vec<_>>()
            );
        }
    }
    Ok(counters)
}

/// `weft status --json` of the harness's weft in `host`'s namespace, parsed.
pub async fn status_json(host: &Host) -> anyhow::Result<serde_json::Value> {
    status_json_of(host, &weft_tests::weft_bin()?).await
}

/// `weft status --json` of build `weft` in `host`'s namespace, parsed.
pub async fn status_json_of(host: &Host, weft: &Path) -> anyhow::Result<serde_json::Value> {
    let bin = weft.to_string_lossy().into_owned();
    let pin_dir = host.bpf_pin_dir().display().to_string();
    let out = host
        .exec(&[&bin, "status", "--json", "--bpf-pin-dir", &pin_dir])
        .await;
    if !out.status.success() {
        bail!(
            "`{bin} status --json --bpf-pin-dir {pin_dir}` in {} failed ({}): {}{}\nThe ebpf rounds cannot be verified without the \
             datapath counters; they are not reported as eBPF.",
            host.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parse `weft status --json` from {}", host.name()))
}

/// Every numeric leaf by dotted path. Array elements that name themselves (`{"name": "x", "value": 3}`)
/// are keyed by that name, others by index; per-CPU arrays of plain numbers are summed.
pub fn flatten(v: &serde_json::Value) -> Counters {
    let mut out = Counters::new();
    walk(v, String::new(), &mut out);
    out
}

fn walk(v: &serde_json::Value, path: String, out: &mut Counters) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.insert(path, x);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                walk(v, join(k), out);
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            out.insert(path, items.iter().filter_map(Value::as_f64).sum());
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let value = ["value", "count", "packets", "total"]
                    .iter()
                    .find_map(|k| item.get(*k).and_then(Value::as_f64));
                match (name, value) {
                    (Some(name), Some(value)) => {
                        out.insert(join(name), value);
                    }
                    (Some(name), None) => walk(item, join(name), out),
                    _ => walk(item, join(&i.to_string()), out),
                }
            }
        }
        _ => {}
    }
}

/// The sum of every counter whose last path component is `name` (several programs or interfaces
/// may each report one).
pub fn find(counters: &Counters, name: &str) -> Option<f64> {
    let hits: Vec<f64> = counters
        .iter()
        .filter(|(path, _)| path.rsplit('.').next() == Some(name))
        .map(|(_, v)| *v)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

/// `after - before` for every counter present in both.
pub fn delta(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .filter_map(|(k, a)| before.get(k).map(|b| (k.clone(), a - b)))
        .collect()
}

/// The verdict on one round of an eBPF mode.
#[derive(Debug, Clone, Serialize)]
pub struct RoundCheck {
    /// The mode (`ebpf`, `ebpf-base`, ...); set by the caller.
    pub mode: &'static str,
    pub round: usize,
    pub variant: &'static str,
    /// UDP packets the receiving container got in this round's 64-byte test (0: not run).
    pub udp_received: u64,
    /// Packets the sending host's encap program encapsulated during the round.
    pub sender_encapsulated: f64,
    /// Packets the receiving host's decap program decapsulated during the round.
    pub receiver_decapsulated: f64,
    /// flannel.1 tx packets (`--family 6`: flannel-v6.1's) on the sending host during the round,
    /// when the device exists: traffic that took the kernel path.
    pub sender_flannel1_tx: Option<u64>,
    pub through_ebpf: bool,
    /// The host-originated tests (TCP and ping-pong from host 1 to the remote container): which
    /// path they took. Not part of `through_ebpf`: host traffic may use flannel.1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_tests: Option<HostPath>,
    /// `--family 6`: packets the fallback device sent during the container tests (the round's
    /// minus the host tests'). See [`RoundCheck::judge_container_tests`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_tests_fallback_tx: Option<u64>,
    /// Every counter's change on the sending and the receiving host.
    pub sender_delta: Counters,
    pub receiver_delta: Counters,
}

impl RoundCheck {
    pub fn new(
        path: &PathCounters,
        round: usize,
        variant: &'static str,
        udp_received: Option<u64>,
        sender_delta: Counters,
        receiver_delta: Counters,
        sender_flannel1_tx: Option<u64>,
    ) -> RoundCheck {
        let sender_encapsulated = find(&sender_delta, path.encapsulated).unwrap_or(0.0);
        let receiver_decapsulated = find(&receiver_delta, path.decapsulated).unwrap_or(0.0);
        // Without the UDP test (`--tests`) nothing says how many packets to expect: both programs
        // must have carried some, and [`RoundCheck::judge_container_tests`] must find the
        // fallback device quiet.
        let through_ebpf = match udp_received {
            Some(n) => {
                let need = MIN_SHARE * n as f64;
                n > 0 && sender_encapsulated >= need && receiver_decapsulated >= need
            }
            None => sender_encapsulated > 0.0 && receiver_decapsulated > 0.0,
        };
        RoundCheck {
            mode: "",
            round,
            variant,
            udp_received: udp_received.unwrap_or(0),
            sender_encapsulated,
            receiver_decapsulated,
            sender_flannel1_tx,
            through_ebpf,
            host_tests: None,
            container_tests_fallback_tx: None,
            sender_delta,
            receiver_delta,
        }
    }
}

impl RoundCheck {
    /// `--family 6`: the container tests must have gone through eBPF too, not only the UDP test.
    /// weft can lose a container's IPv6 binding between two reconciles (seen: `ipv6: passed:
    /// source not bound to this port` on both hosts for part of a round); flannel-v6.1 then carries
    /// TCP while the UDP test may still pass. The round fails when the fallback device sent more
    /// than the 10 % of the sender's encapsulations that [`MIN_SHARE`] allows during the container
    /// tests. Needs [`RoundCheck::host_tests`] set (the host tests may use the fallback device).
    pub fn judge_container_tests(&mut self) {
        let host = self.host_tests.as_ref().and_then(|h| h.flannel1_tx);
        let (Some(all), Some(host)) = (self.sender_flannel1_tx, host) else {
            return;
        };
        let fallback = all.saturating_sub(host);
        self.container_tests_fallback_tx = Some(fallback);
        if fallback as f64 > (1.0 - MIN_SHARE) * self.sender_encapsulated {
            self.through_ebpf = false;
        }
    }
}

/// Packets host 1's encapsulation program handled and flannel.1 (or flannel-v6.1) sent during the
/// host-originated tests.
#[derive(Debug, Clone, Serialize)]
pub struct HostPath {
    /// By the container path's program and the host program together.
    pub encapsulated: f64,
    pub flannel1_tx: Option<u64>,
}

/// The tx packet count of `path`'s fallback device (flannel.1, flannel-v6.1) in `host`, `None`
/// when there is no such device.
pub async fn fallback_tx_packets(host: &Host, path: &PathCounters) -> Option<u64> {
    let file = format!(
        "/sys/class/net/{}/statistics/tx_packets",
        path.fallback_device
    );
    let text = host.exec_ok(&["cat", &file]).await.ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_named_and_per_cpu_counters() {
        let json = serde_json::json!({
            "datapath": "ebpf",
            "counters": [
                {"name": "encapsulated", "value": 10},
                {"name": "decapsulated", "value": 7},
                {"name": "passed: not ipv4", "value": 1}
            ],
            "percpu": {"encapsulated": [1, 2, 3]},
            "peers": 1
        });
        let c = flatten(&json);
        assert_eq!(c["counters.encapsulated"], 10.0);
        assert_eq!(c["percpu.encapsulated"], 6.0);
        assert_eq!(c["peers"], 1.0);
        assert_eq!(find(&c, ENCAPSULATED), Some(16.0));
        assert_eq!(find(&c, DECAPSULATED), Some(7.0));
        assert_eq!(find(&c, "missing"), None);
    }

    #[test]
    fn reads_weft_status_json() {
        // The shape of agent/src/status.rs's `Status` as `weft status --json` prints it.
        let json = serde_json::json!({
            "mode": "ebpf",
            "pin_dir": "/sys/fs/bpf/weft/flannel.1",
            "programs": [{"program": "weft_tc_encap", "interface": "docker0", "hook": "tcx ingress",
                          "state": "attached", "link_id": 7, "prog_id": 42}],
            "node": {"configured": true, "vni": 1, "port": 8472, "vtep_ip": "172.16.15.21"},
            "peers": [{"subnet": "10.1.2.0/24", "vtep_ip": "172.16.15.22", "vtep_mac": "aa:bb:cc:dd:ee:ff"}],
            "known_vteps": ["172.16.15.22"],
            "counters": [{"name": "encapsulated", "value": 1234}, {"name": "decapsulated", "value": 987},
                         {"name": "passed: not ipv4", "value": 3}]
        });
        let c = flatten(&json);
        assert_eq!(find(&c, ENCAPSULATED), Some(1234.0));
        assert_eq!(find(&c, DECAPSULATED), Some(987.0));
        assert_eq!(c["counters.passed: not ipv4"], 3.0);
    }

    #[test]
    fn a_fallback_round_is_not_ebpf() {
        let counters = |enc: f64, dec: f64| -> Counters {
            [
                ("c.encapsulated".to_owned(), enc),
                ("c.decapsulated".to_owned(), dec),
            ]
            .into()
        };
        let before = counters(100.0, 100.0);
        let ok = RoundCheck::new(
            &IPV4_PATH,
            1,
            "offload",
            Some(1000),
            delta(&before, &counters(1200.0, 150.0)),
            delta(&before, &counters(130.0, 1100.0)),
            Some(0),
        );
        assert!(ok.through_ebpf);
        let fallback = RoundCheck::new(
            &IPV4_PATH,
            1,
            "offload",
            Some(1000),
            delta(&before, &counters(120.0, 100.0)),
            delta(&before, &counters(100.0, 1100.0)),
            Some(1000),
        );
        assert!(!fallback.through_ebpf);
        let nothing = RoundCheck::new(
            &IPV4_PATH,
            1,
            "offload",
            Some(0),
            Counters::new(),
            Counters::new(),
            None,
        );
        assert!(!nothing.through_ebpf);
    }

    #[test]
    fn a_round_without_the_udp_test_is_judged_by_the_fallback_device() {
        // `--tests tcp4,rr`: no UDP count to compare with; flannel.1 must have stayed quiet.
        let counters = |n: f64| -> Counters {
            [
                ("c.encapsulated".to_owned(), n),
                ("c.decapsulated".to_owned(), n),
            ]
            .into()
        };
        let judged = |enc: f64, flannel1_tx: u64| {
            let mut check = RoundCheck::new(
                &IPV4_PATH,
                1,
                "offload",
                None,
                counters(enc),
                counters(enc),
                Some(flannel1_tx),
            );
            check.host_tests = Some(HostPath {
                encapsulated: 0.0,
                flannel1_tx: Some(0),
            });
            check.judge_container_tests();
            check
        };
        assert!(judged(50_000.0, 12).through_ebpf);
        assert!(
            !judged(50_000.0, 40_000).through_ebpf,
            "flannel.1 carried the tests"
        );
        assert!(
            !judged(0.0, 0).through_ebpf,
            "nothing went through the programs"
        );
    }

    #[test]
    fn an_ipv6_round_whose_tcp_took_flannel_v6_is_not_ebpf() {
        // Rounds 3 and 4 of a --family 6 run: in round 3 both containers lost their binding
        // for a while and flannel-v6.1 carried 321903 container packets, yet the UDP test passed.
        let round = |enc: f64, all_tx: u64, host_tx: u64| {
            let counters = |n: f64| -> Counters {
                [
                    ("c.ipv6: encapsulated".to_owned(), n),
                    ("c.ipv6: decapsulated".to_owned(), n),
                ]
                .into()
            };
            let mut check = RoundCheck::new(
                &IPV6_PATH,
                3,
                "offload",
                Some(335_787),
                counters(enc),
                counters(1_346_512.0),
                Some(all_tx),
            );
            check.host_tests = Some(HostPath {
                encapsulated: 0.0,
                flannel1_tx: Some(host_tx),
            });
            let udp_only = check.through_ebpf;
            check.judge_container_tests();
            (udp_only, check)
        };
        let (udp_only, lost) = round(588_211.0, 758_301, 436_398);
        assert!(udp_only, "the UDP share alone passes");
        assert!(!lost.through_ebpf);
        assert_eq!(lost.container_tests_fallback_tx, Some(321_903));
        let (_, fine) = round(1_129_568.0, 430_245, 430_245);
        assert!(fine.through_ebpf);
        assert_eq!(fine.container_tests_fallback_tx, Some(0));
    }

    #[test]
    fn ipv6_rounds_are_judged_by_the_ipv6_counters() {
        // `weft status --json` lists both families' counters side by side.
        let status = |enc: u64, dec: u64, enc6: u64, dec6: u64| {
            flatten(&serde_json::json!({"counters": [
                {"name": "encapsulated", "value": enc}, {"name": "decapsulated", "value": dec},
                {"name": "ipv6: encapsulated", "value": enc6},
                {"name": "ipv6: decapsulated", "value": dec6},
                {"name": "ipv6: decapsulated: delivered to container", "value": dec6}]}))
        };
        let before = status(0, 0, 0, 0);
        // IPv4 counters moving (ARP-free pings, another test) prove nothing about IPv6.
        let v4_only = status(5000, 5000, 3, 2);
        let check = |path: &PathCounters, after: &Counters| {
            RoundCheck::new(
                path,
                1,
                "offload",
                Some(1000),
                delta(&before, after),
                delta(&before, after),
                None,
            )
        };
        assert!(!check(&IPV6_PATH, &v4_only).through_ebpf);
        assert!(check(&IPV4_PATH, &v4_only).through_ebpf);
        let v6 = check(&IPV6_PATH, &status(0, 0, 1000, 990));
        assert!(v6.through_ebpf, "{v6:?}");
        assert_eq!(
            (v6.sender_encapsulated, v6.receiver_decapsulated),
            (1000.0, 990.0),
            "`ipv6: decapsulated: delivered to container` is not `ipv6: decapsulated`"
        );
    }
}
