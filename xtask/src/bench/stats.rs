//! What one round measures, medians over rounds, and intervals over rounds: a ratio between two
//! modes is taken round by round (both measured in the same round, so slow minutes on this shared
//! machine hit both) and its 95 % interval comes from a seeded bootstrap over those rounds.

use std::collections::BTreeMap;

use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

/// One round's figures for one mode (one entry of `samples` in report.json).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// From 1; 0 only in [`ModeSummary`]'s medians, which no round measured (and JSON leaves out).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: usize,
    // NaN: the test did not run (`--tests`); JSON writes it as null.
    #[serde(deserialize_with = "nan_if_null")]
    pub tcp1_gbps: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub tcp4_gbps: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub rr_p50_us: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub rr_p99_us: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub rr_tps: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub udp64_pps: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub cpu_s_per_gb: f64,
    /// From host 1's own namespace (not a container) to the container on host 2. In `bare`, where
    /// the client already is host 1, this is the main test's figure.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub host_tcp1_gbps: f64,
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub host_rr_p50_us: f64,
}

fn nan() -> f64 {
    f64::NAN
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A metric of [`Sample`]: its JSON key, how the table and chart name it, and which way is better.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
    pub get: fn(&Sample) -> f64,
}

/// Every metric, in report order.
#[rustfmt::skip] // a table: one metric a line
pub const METRICS: [Metric; 9] = [
    metric("tcp1_gbps", "TCP 1 stream, Gbit/s", HIGHER, |s| s.tcp1_gbps),
    metric("tcp4_gbps", "TCP 4 streams, Gbit/s", HIGHER, |s| s.tcp4_gbps),
    metric("rr_p50_us", "TCP RR p50 RTT, µs", LOWER, |s| s.rr_p50_us),
    metric("rr_p99_us", "TCP RR p99 RTT, µs", LOWER, |s| s.rr_p99_us),
    metric("rr_tps", "TCP RR transactions/s", HIGHER, |s| s.rr_tps),
    metric("udp64_pps", "UDP 64 B received, pkt/s", HIGHER, |s| s.udp64_pps),
    metric("cpu_s_per_gb", "CPU s per GB (TCP 1 stream)", LOWER, |s| s.cpu_s_per_gb),
    metric("host_tcp1_gbps", "host → container TCP 1 stream, Gbit/s", HIGHER, |s| s.host_tcp1_gbps),
    metric("host_rr_p50_us", "host → container RR p50, µs", LOWER, |s| s.host_rr_p50_us),
];

const HIGHER: bool = true;
const LOWER: bool = false;

/// One row of [`METRICS`]; `higher_is_better` is [`HIGHER`] or [`LOWER`].
const fn metric(
    key: &'static str,
    label: &'static str,
    higher_is_better: bool,
    get: fn(&Sample) -> f64,
) -> Metric {
    Metric {
        key,
        label,
        higher_is_better,
        get,
    }
}

/// The metric named `key`.
pub fn metric_by_key(key: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.key == key)
}

/// The median; the mean of the middle two for an even count; `NaN` for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// A mode's medians plus every round (the `M` of report.json): the medians' fields at the top
/// level, as a [`Sample`] without a round, then `samples`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeSummary {
    #[serde(flatten)]
    medians: Sample,
    pub samples: Vec<Sample>,
}

impl ModeSummary {
    pub fn of(samples: Vec<Sample>) -> ModeSummary {
        let med = |m: &Metric| median(&samples.iter().map(m.get).collect::<Vec<_>>());
        let [tcp1, tcp4, p50, p99, tps, udp, cpu, host_tcp1, host_p50] = METRICS.map(|m| med(&m));
        ModeSummary {
            medians: Sample {
                round: 0,
                tcp1_gbps: tcp1,
                tcp4_gbps: tcp4,
                rr_p50_us: p50,
                rr_p99_us: p99,
                rr_tps: tps,
                udp64_pps: udp,
                cpu_s_per_gb: cpu,
                host_tcp1_gbps: host_tcp1,
                host_rr_p50_us: host_p50,
            },
            samples,
        }
    }

    /// The medians as a [`Sample`] (round 0), so [`Metric::get`] reads them.
    pub fn medians(&self) -> Sample {
        self.medians
    }

    /// Smallest and largest round value of a metric (the chart's whiskers).
    pub fn range(&self, metric: &Metric) -> (f64, f64) {
        self.samples
            .iter()
            .map(metric.get)
            .filter(|v| !v.is_nan())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    }
}

/// Resamples per interval: enough that the 2.5 % and 97.5 % points move by less than the
/// figures' last printed digit from one seed to another.
pub const BOOTSTRAP_RESAMPLES: usize = 4000;

/// An estimate with its 95 % interval over `rounds` paired rounds. `lo`/`hi` are `NaN` (null in
/// JSON) when there are fewer than 2 rounds: one round says nothing about the spread.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
    pub rounds: usize,
}

impl Interval {
    pub fn has_spread(&self) -> bool {
        self.rounds >= 2 && self.lo.is_finite() && self.hi.is_finite()
    }
}

/// The values of `metric` of the rounds every one of `modes` measured, round by round: `[i][j]`
/// is mode j in the i-th common round. Rounds where any of them is not a number are left out.
pub fn paired(modes: &[&ModeSummary], metric: &Metric) -> Vec<Vec<f64>> {
    let Some(first) = modes.first() else {
        return Vec::new();
    };
    first
        .samples
        .iter()
        .filter_map(|s| {
            modes
                .iter()
                .map(|m| {
                    m.samples
                        .iter()
                        .find(|o| o.round == s.round)
                        .map(metric.get)
                        .filter(|v| v.is_finite())
                })
                .collect::<Option<Vec<f64>>>()
        })
        .collect()
}

/// `stat` over the rows, with a 95 % percentile-bootstrap interval: rows (rounds) are drawn with
/// replacement, so a round's values stay together. `seed` makes the interval reproducible.
pub fn bootstrap(rows: &[Vec<f64>], seed: u64, stat: impl Fn(&[&Vec<f64>]) -> f64) -> Interval {
    let all: Vec<&Vec<f64>> = rows.iter().collect();
    let estimate = stat(&all);
    let n = rows.len();
    if n < 2 {
        return Interval {
            estimate,
            lo: f64::NAN,
            hi: f64::NAN,
            rounds: n,
        };
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draws: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let pick: Vec<&Vec<f64>> = (0..n).map(|_| &rows[rng.random_range(0..n)]).collect();
            stat(&pick)
        })
        .filter(|v| v.is_finite())
        .collect();
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| {
        draws
            .get(((draws.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Interval {
        estimate,
        lo: at(0.025),
        hi: at(0.975),
        rounds: n,
    }
}

/// The median of the per-round ratios `row[0] / row[1]`, with its interval.
pub fn ratio_interval(rows: &[Vec<f64>], seed: u64) -> Interval {
    bootstrap(rows, seed, |pick| {
        median(&pick.iter().map(|r| r[0] / r[1]).collect::<Vec<_>>())
    })
}

/// (ebpf - kernel-vxlan) / (host-gw - kernel-vxlan) in percent from the medians of the rows
/// `[ebpf, kernel-vxlan, host-gw]`: the share of the overlay's cost ebpf recovers (100 = as good
/// as host-gw). `NaN` where host-gw is not better than kernel-vxlan by 2 % in the metric's
/// direction: then there is no overlay cost to recover and the share would only magnify noise.
pub fn gap_closed(pick: &[&Vec<f64>], higher_is_better: bool) -> f64 {
    let col = |j: usize| median(&pick.iter().map(|r| r[j]).collect::<Vec<_>>());
    let (e, k, h) = (col(0), col(1), col(2));
    let gap = h - k;
    let host_gw_better = if higher_is_better {
        gap > 0.0
    } else {
        gap < 0.0
    };
    if host_gw_better && gap.abs() > 0.02 * k.abs() {
        (e - k) / gap * 100.0
    } else {
        f64::NAN
    }
}

/// A stable seed per interval (FNV-1a of its name): the same samples give the same report.
pub fn seed_for(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Modes by name, for the comparisons.
pub type Modes = BTreeMap<String, ModeSummary>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: usize, x: f64) -> Sample {
        Sample {
            round,
            tcp1_gbps: x,
            tcp4_gbps: 2.0 * x,
            rr_p50_us: 10.0 / x,
            rr_p99_us: 20.0 / x,
            rr_tps: 1000.0 * x,
            udp64_pps: 100.0 * x,
            cpu_s_per_gb: 1.0 / x,
            host_tcp1_gbps: x,
            host_rr_p50_us: f64::NAN,
        }
    }

    #[test]
    fn median_of_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn summary_takes_medians_per_metric() {
        let s = ModeSummary::of(vec![sample(1, 1.0), sample(2, 4.0), sample(3, 2.0)]);
        let m = s.medians();
        assert_eq!(m.tcp1_gbps, 2.0);
        assert_eq!(m.tcp4_gbps, 4.0);
        assert_eq!(m.rr_p50_us, 5.0);
        assert!(m.host_rr_p50_us.is_nan());
        assert_eq!(s.samples.len(), 3);
        assert_eq!(s.range(&METRICS[0]), (1.0, 4.0));
    }

    #[test]
    fn summary_json_keeps_medians_at_the_top_and_rounds_in_samples() {
        let s = ModeSummary::of(vec![sample(1, 1.0), sample(2, 3.0)]);
        let v = serde_json::to_value(&s).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want: Vec<&str> = METRICS.iter().map(|m| m.key).collect();
        want.push("samples");
        want.sort();
        assert_eq!(keys, want, "no `round` beside the medians");
        assert_eq!(v["tcp1_gbps"], 2.0);
        assert_eq!(v["samples"][1]["round"], 2);
        let back: ModeSummary = serde_json::from_value(
            serde_json::json!({"tcp1_gbps": 2, "tcp4_gbps": 4, "rr_p50_us": 5, "rr_p99_us": 6,
                "rr_tps": 7, "udp64_pps": 8, "cpu_s_per_gb": 9,
                "samples": [Sample { host_rr_p50_us: 3.0, ..sample(1, 1.0) }]}),
        )
        .unwrap();
        assert_eq!(back.medians().tcp1_gbps, 2.0);
        assert!(back.medians().host_tcp1_gbps.is_nan());
        assert_eq!((back.samples[0].round, back.samples[0].tcp1_gbps), (1, 1.0));
    }

    #[test]
    fn old_reports_without_host_rows_still_load() {
        let json = r#"{"round":1,"tcp1_gbps":1,"tcp4_gbps":2,"rr_p50_us":3,"rr_p99_us":4,
            "rr_tps":5,"udp64_pps":6,"cpu_s_per_gb":7}"#;
        let s: Sample = serde_json::from_str(json).unwrap();
        assert!(s.host_tcp1_gbps.is_nan());
    }

    #[test]
    fn pairs_by_round_number_not_position() {
        let a = ModeSummary::of(vec![sample(1, 1.0), sample(2, 2.0), sample(3, 3.0)]);
        // b lacks round 2 and lists its rounds in another order.
        let b = ModeSummary::of(vec![sample(3, 30.0), sample(1, 10.0)]);
        let rows = paired(&[&a, &b], &METRICS[0]);
        assert_eq!(rows, vec![vec![1.0, 10.0], vec![3.0, 30.0]]);
        // NaN rounds (host rows of a report without them) drop out.
        assert!(paired(&[&a, &b], &METRICS[8]).is_empty());
    }

    #[test]
    fn bootstrap_is_reproducible_and_brackets_the_median() {
        let rows: Vec<Vec<f64>> = [1.00, 1.10, 0.95, 1.05, 1.02, 0.98, 1.07]
            .iter()
            .map(|r| vec![*r, 1.0])
            .collect();
        let a = ratio_interval(&rows, 7);
        let b = ratio_interval(&rows, 7);
        assert_eq!(a, b, "same seed, same interval");
        assert_eq!(a.estimate, 1.02);
        assert_eq!(a.rounds, 7);
        assert!(a.lo <= a.estimate && a.estimate <= a.hi, "{a:?}");
        assert!(a.lo >= 0.95 && a.hi <= 1.10, "inside the data: {a:?}");
        assert!(a.hi - a.lo > 0.0);
    }

    #[test]
    fn bootstrap_keeps_rounds_paired() {
        // Both modes swing together from round to round (a noisy machine), their ratio does not:
        // paired, the interval is a point; unpaired it would be wide.
        let rows: Vec<Vec<f64>> = [5.0, 9.0, 6.5, 12.0, 7.0]
            .iter()
            .map(|x| vec![0.9 * x, *x])
            .collect();
        let i = ratio_interval(&rows, 1);
        assert!(
            (i.lo - 0.9).abs() < 1e-12 && (i.hi - 0.9).abs() < 1e-12,
            "{i:?}"
        );
    }

    #[test]
    fn one_round_has_no_interval() {
        let i = ratio_interval(&[vec![2.0, 1.0]], 1);
        assert_eq!(i.estimate, 2.0);
        assert!(!i.has_spread());
        assert!(!ratio_interval(&[vec![2.0, 1.0], vec![3.0, 1.0]], 1)
            .lo
            .is_nan());
    }

    #[test]
    fn gap_closed_works_both_ways() {
        let rows = |e: f64, k: f64, h: f64| vec![vec![e, k, h]];
        let g = |r: Vec<Vec<f64>>, hib: bool| gap_closed(&r.iter().collect::<Vec<_>>(), hib);
        // Throughput: kv 20, hg 30, ebpf 28 -> 80 %.
        assert_eq!(g(rows(28.0, 20.0, 30.0), true), 80.0);
        // Latency: kv 15, hg 12, ebpf 12.6 -> 80 %.
        assert!((g(rows(12.6, 15.0, 12.0), false) - 80.0).abs() < 1e-9);
        assert!(g(rows(11.0, 15.0, 12.0), false) > 100.0);
        assert!(
            g(rows(1.0, 10.0, 10.1), true).is_nan(),
            "a 1 % gap is noise"
        );
        // host-gw worse than kernel-vxlan on a throughput metric: no gap to close.
        assert!(g(rows(4.6, 11.4, 11.0), true).is_nan());
    }

    #[test]
    fn seeds_differ_per_name() {
        assert_ne!(seed_for("tcp1 ebpf/bare"), seed_for("tcp4 ebpf/bare"));
        assert_eq!(seed_for("x"), seed_for("x"));
    }
}
