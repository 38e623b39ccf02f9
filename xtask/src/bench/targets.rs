//! report.json's `comparison`: every mode as a ratio to `bare` and to `kernel-vxlan` (ebpf also to
//! host-gw, and to ebpf-base when the baseline build ran), each the median of the per-round ratios
//! with its 95 % interval, and the issues' targets judged by those intervals: met only when the
//! whole interval clears the target, not met only when the whole interval misses it, otherwise
//! inconclusive.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::bench::stats::{
    bootstrap, gap_closed, metric_by_key, paired, ratio_interval, seed_for, Interval, Metric,
    Modes, METRICS,
};
use crate::bench::topology::Family;

/// Below this many paired rounds no verdict: a percentile bootstrap of a median over fewer rounds
/// covers the truth well below 95 % of the time (with 5, its interval is about the rounds' range,
/// which holds the median with 94 % probability).
pub const MIN_ROUNDS_FOR_VERDICT: usize = 5;

pub const BARE: &str = "bare";
pub const HOST_GW: &str = "host-gw";
pub const KERNEL_VXLAN: &str = "kernel-vxlan";
pub const EBPF: &str = "ebpf";
/// The eBPF datapath of an earlier build (`--baseline`), measured in the same rounds.
pub const EBPF_BASE: &str = "ebpf-base";
/// ebpf/ebpf-base where higher is better, and where lower is: the 3 % of ebpf-base's standing
/// against kernel-vxlan that ebpf may give up (issues 12 and 15: "every ebpf/kernel-vxlan ratio
/// within 3 % of the last table or better").
pub const BASELINE_AT_LEAST: f64 = 0.97;
pub const BASELINE_AT_MOST: f64 = 1.03;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "met")]
    Met,
    #[serde(rename = "not met")]
    NotMet,
    #[serde(rename = "inconclusive")]
    Inconclusive,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

/// Which side of a threshold the statistic must be on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

/// What a target constrains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Statistic {
    /// ebpf / `against`, the median of the per-round ratios.
    Ratio { against: &'static str },
    /// The share of the gap from kernel-vxlan to host-gw that ebpf closes, in percent.
    GapClosed,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub metric: &'static str,
    pub statistic: Statistic,
    pub goal: Goal,
    /// The issue that set it.
    pub issue: u32,
}

impl Target {
    pub fn describe(&self) -> String {
        let (op, t) = match self.goal {
            Goal::AtLeast(t) => (">=", t),
            Goal::AtMost(t) => ("<=", t),
        };
        match self.statistic {
            Statistic::Ratio { against } => format!("ebpf/{against} {op} {t:.2}"),
            Statistic::GapClosed => format!("gap to host-gw closed {op} {t:.0} %"),
        }
    }
}

/// The verdict an interval gives on a goal.
pub fn verdict(goal: Goal, i: &Interval) -> Verdict {
    if i.rounds < MIN_ROUNDS_FOR_VERDICT || !i.has_spread() {
        return Verdict::Inconclusive;
    }
    let (clears, misses) = match goal {
        Goal::AtLeast(t) => (i.lo >= t, i.hi < t),
        Goal::AtMost(t) => (i.hi <= t, i.lo > t),
    };
    if clears {
        Verdict::Met
    } else if misses {
        Verdict::NotMet
    } else {
        Verdict::Inconclusive
    }
}

/// The targets of one underlay variant in `family`: IPv4's below, IPv6's from issue 14 (ebpf
/// better than kernel-vxlan over IPv6 on TCP 1 stream, RR p50 and 64-byte UDP, in both variants).
pub fn targets(family: Family, offload_on: bool) -> Vec<Target> {
    match family {
        Family::V4 => targets_v4(offload_on),
        Family::V6 => ["tcp1_gbps", "rr_p50_us", "udp64_pps"]
            .into_iter()
            .filter_map(metric_by_key)
            .map(|m| Target {
                metric: m.key,
                statistic: Statistic::Ratio {
                    against: KERNEL_VXLAN,
                },
                goal: better(m, 1.0),
                issue: 14,
            })
            .collect(),
    }
}

/// Issues 12 and 15 (filed as 12): ebpf/kernel-vxlan within 3 % of ebpf-base/kernel-vxlan or
/// better on every metric. Both are measured in the same round against the same kernel-vxlan, so
/// their quotient is ebpf/ebpf-base round by round: at least 0.97 where higher is better, at most
/// 1.03 where lower is. Added by the caller only when ebpf-base is measured.
pub fn baseline_targets() -> Vec<Target> {
    METRICS
        .iter()
        .map(|m| Target {
            metric: m.key,
            statistic: Statistic::Ratio { against: EBPF_BASE },
            goal: if m.higher_is_better {
                Goal::AtLeast(BASELINE_AT_LEAST)
            } else {
                Goal::AtMost(BASELINE_AT_MOST)
            },
            issue: 12,
        })
        .collect()
}

/// `by` times better than the reference in the metric's direction.
fn better(m: &Metric, by: f64) -> Goal {
    if m.higher_is_better {
        Goal::AtLeast(by)
    } else {
        Goal::AtMost(1.0 / by)
    }
}

/// The IPv4 targets of one underlay variant.
///
/// - issue 6 (both variants): ebpf better than kernel-vxlan on every metric, 1.3x on 64-byte UDP,
///   and at least 80 % of the gap to host-gw closed where no issue-16 host-gw target applies (at or
///   above host-gw implies more than 100 %);
/// - issue 16, offloads on: ebpf within 10 % of bare and at or above host-gw on TCP 1 and 4
///   streams, RR p50 and 64-byte UDP;
/// - issue 16, offloads off: ebpf at or above host-gw on every metric.
fn targets_v4(offload_on: bool) -> Vec<Target> {
    let container_metrics = &METRICS[..7];
    let mut out = Vec::new();
    let near_bare = ["tcp1_gbps", "tcp4_gbps", "rr_p50_us", "udp64_pps"];
    let at_host_gw = |m: &Metric| !offload_on || near_bare.contains(&m.key);
    for m in container_metrics {
        let udp = m.key == "udp64_pps";
        out.push(Target {
            metric: m.key,
            statistic: Statistic::Ratio {
                against: KERNEL_VXLAN,
            },
            goal: better(m, if udp { 1.3 } else { 1.0 }),
            issue: 6,
        });
        if !at_host_gw(m) {
            out.push(Target {
                metric: m.key,
                statistic: Statistic::GapClosed,
                goal: Goal::AtLeast(80.0),
                issue: 6,
            });
        }
        if offload_on && near_bare.contains(&m.key) {
            out.push(Target {
                metric: m.key,
                statistic: Statistic::Ratio { against: BARE },
                goal: if m.higher_is_better {
                    Goal::AtLeast(0.9)
                } else {
                    Goal::AtMost(1.1)
                },
                issue: 16,
            });
        }
        if at_host_gw(m) {
            out.push(Target {
                metric: m.key,
                statistic: Statistic::Ratio { against: HOST_GW },
                goal: better(m, 1.0),
                issue: 16,
            });
        }
    }
    out
}

/// A mode's ratios on one metric.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_bare: Option<Interval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_kernel_vxlan: Option<Interval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_host_gw: Option<Interval>,
    /// This build's eBPF mode against the baseline build's (`ebpf-base`), when both ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_ebpf_base: Option<Interval>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricComparison {
    /// By mode (every mode but the reference itself).
    pub ratios: BTreeMap<String, Ratios>,
    /// ebpf's share of the kernel-vxlan -> host-gw gap, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_closed_pct: Option<Interval>,
}

/// A target with the interval that judged it.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    pub metric: &'static str,
    pub target: String,
    pub issue: u32,
    pub interval: Interval,
    pub verdict: Verdict,
}

/// One variant's comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison {
    pub metrics: BTreeMap<&'static str, MetricComparison>,
    pub targets: Vec<Judged>,
}

impl Comparison {
    /// Targets without a verdict yet (what more rounds could settle).
    pub fn inconclusive(&self) -> usize {
        self.targets
            .iter()
            .filter(|t| t.verdict == Verdict::Inconclusive)
            .count()
    }
}

/// `mode / against` on `metric`, paired by round; `None` when either mode did not run.
fn ratio(
    modes: &Modes,
    metric: &Metric,
    mode: &str,
    against: &str,
    seed: &str,
) -> Option<Interval> {
    let rows = paired(&[modes.get(mode)?, modes.get(against)?], metric);
    (!rows.is_empty()).then(|| {
        ratio_interval(
            &rows,
            seed_for(&format!("{seed} {} {mode}/{against}", metric.key)),
        )
    })
}

fn gap(modes: &Modes, metric: &Metric, seed: &str) -> Option<Interval> {
    let rows = paired(
        &[
            modes.get(EBPF)?,
            modes.get(KERNEL_VXLAN)?,
            modes.get(HOST_GW)?,
        ],
        metric,
    );
    let hib = metric.higher_is_better;
    // Resamples in which host-gw happens not to beat kernel-vxlan have no gap and drop out of the
    // interval; when that is most of them the estimate itself is NaN and there is no gap target.
    let i = bootstrap(
        &rows,
        seed_for(&format!("{seed} {} gap", metric.key)),
        |pick| gap_closed(pick, hib),
    );
    (!rows.is_empty() && i.estimate.is_finite()).then_some(i)
}

/// Every ratio, and `targets` judged (see [`targets()`]), of one variant. `seed` (the variant's
/// name) keeps the intervals of the two variants independent and each reproducible.
pub fn compare(modes: &Modes, targets: Vec<Target>, seed: &str) -> Comparison {
    let mut metrics = BTreeMap::new();
    for m in &METRICS {
        let mut mc = MetricComparison::default();
        for mode in modes.keys().filter(|k| k.as_str() != BARE) {
            let vs_host_gw = if mode.starts_with(EBPF) {
                ratio(modes, m, mode, HOST_GW, seed)
            } else {
                None
            };
            let vs_ebpf_base = if mode.starts_with(EBPF) && mode != EBPF_BASE {
                ratio(modes, m, mode, EBPF_BASE, seed)
            } else {
                None
            };
            let r = Ratios {
                vs_bare: ratio(modes, m, mode, BARE, seed),
                vs_kernel_vxlan: (mode != KERNEL_VXLAN)
                    .then(|| ratio(modes, m, mode, KERNEL_VXLAN, seed))
                    .flatten(),
                vs_host_gw,
                vs_ebpf_base,
            };
            mc.ratios.insert(mode.clone(), r);
        }
        mc.gap_closed_pct = gap(modes, m, seed);
        metrics.insert(m.key, mc);
    }
    let targets = targets
        .into_iter()
        .filter_map(|t| {
            let mc = metrics.get(t.metric)?;
            let interval = match t.statistic {
                Statistic::Ratio { against } => {
                    let r = mc.ratios.get(EBPF)?;
                    match against {
                        BARE => r.vs_bare,
                        KERNEL_VXLAN => r.vs_kernel_vxlan,
                        EBPF_BASE => r.vs_ebpf_base,
                        _ => r.vs_host_gw,
                    }?
                }
                Statistic::GapClosed => mc.gap_closed_pct?,
            };
            Some(Judged {
                metric: t.metric,
                target: t.describe(),
                issue: t.issue,
                verdict: verdict(t.goal, &interval),
                interval,
            })
        })
        .collect();
    Comparison { metrics, targets }
}

/// The metric's label for a judged target.
pub fn label(j: &Judged) -> &'static str {
    metric_by_key(j.metric).map_or(j.metric, |m| m.label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{ModeSummary, Sample};

    fn interval(lo: f64, hi: f64, rounds: usize) -> Interval {
        Interval {
            estimate: (lo + hi) / 2.0,
            lo,
            hi,
            rounds,
        }
    }

    #[test]
    fn a_target_is_met_only_when_the_whole_interval_clears_it() {
        let at_least = Goal::AtLeast(0.9);
        assert_eq!(verdict(at_least, &interval(0.91, 0.97, 5)), Verdict::Met);
        assert_eq!(
            verdict(at_least, &interval(0.85, 0.95, 5)),
            Verdict::Inconclusive
        );
        assert_eq!(verdict(at_least, &interval(0.80, 0.89, 5)), Verdict::NotMet);
        let at_most = Goal::AtMost(1.1);
        assert_eq!(verdict(at_most, &interval(1.0, 1.09, 6)), Verdict::Met);
        assert_eq!(verdict(at_most, &interval(1.11, 1.3, 6)), Verdict::NotMet);
        // Too few rounds: no verdict, however tight.
        assert_eq!(
            verdict(at_least, &interval(0.95, 0.96, 4)),
            Verdict::Inconclusive
        );
        assert_eq!(
            verdict(at_least, &interval(f64::NAN, f64::NAN, 9)),
            Verdict::Inconclusive
        );
    }

    #[test]
    fn targets_follow_the_issues() {
        let on = targets(Family::V4, true);
        let has = |ts: &[Target], metric: &str, s: Statistic, g: Goal| {
            ts.iter()
                .any(|t| t.metric == metric && t.statistic == s && t.goal == g)
        };
        let bare = Statistic::Ratio { against: BARE };
        let hg = Statistic::Ratio { against: HOST_GW };
        let kv = Statistic::Ratio {
            against: KERNEL_VXLAN,
        };
        assert!(has(&on, "tcp1_gbps", bare, Goal::AtLeast(0.9)));
        assert!(has(&on, "rr_p50_us", bare, Goal::AtMost(1.1)));
        assert!(has(&on, "udp64_pps", hg, Goal::AtLeast(1.0)));
        assert!(has(&on, "udp64_pps", kv, Goal::AtLeast(1.3)));
        assert!(has(
            &on,
            "rr_p99_us",
            Statistic::GapClosed,
            Goal::AtLeast(80.0)
        ));
        assert!(!has(&on, "rr_p99_us", hg, Goal::AtMost(1.0)));
        let off = targets(Family::V4, false);
        for m in &METRICS[..7] {
            let g = if m.higher_is_better {
                Goal::AtLeast(1.0)
            } else {
                Goal::AtMost(1.0)
            };
            assert!(has(&off, m.key, hg, g), "{}", m.key);
        }
        assert!(!off.iter().any(|t| t.statistic == bare));
        assert!(!off.iter().any(|t| t.statistic == Statistic::GapClosed));
    }

    fn summary(values: &[f64]) -> ModeSummary {
        ModeSummary::of(
            values
                .iter()
                .enumerate()
                .map(|(i, &x)| Sample {
                    round: i + 1,
                    tcp1_gbps: x,
                    tcp4_gbps: x,
                    rr_p50_us: 100.0 / x,
                    rr_p99_us: 200.0 / x,
                    rr_tps: 1000.0 * x,
                    udp64_pps: 10_000.0 * x,
                    cpu_s_per_gb: 1.0 / x,
                    host_tcp1_gbps: x,
                    host_rr_p50_us: 100.0 / x,
                })
                .collect(),
        )
    }

    #[test]
    fn compare_judges_paired_rounds() {
        // A machine whose speed swings by 2x from round to round; ebpf is always 0.95x bare and
        // 1.05x host-gw. Paired by round, the verdicts are clear despite the swings.
        let speed = [10.0, 20.0, 12.0, 18.0, 15.0, 11.0];
        let scaled = |f: f64| summary(&speed.map(|s| s * f));
        let modes: Modes = [
            (BARE, scaled(1.0)),
            (HOST_GW, scaled(0.95 / 1.05)),
            (KERNEL_VXLAN, scaled(0.5)),
            (EBPF, scaled(0.95)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let c = compare(&modes, targets(Family::V4, true), "offload");
        let tcp1 = &c.metrics["tcp1_gbps"].ratios[EBPF];
        let vs_bare = tcp1.vs_bare.unwrap();
        assert!((vs_bare.estimate - 0.95).abs() < 1e-9, "{vs_bare:?}");
        assert!((vs_bare.hi - vs_bare.lo).abs() < 1e-9);
        assert!(c.metrics["tcp1_gbps"].ratios[HOST_GW].vs_host_gw.is_none());
        assert!(c.metrics["tcp1_gbps"].ratios[HOST_GW].vs_bare.is_some());
        assert_eq!(c.inconclusive(), 0, "{:#?}", c.targets);
        assert!(
            c.targets.iter().all(|t| t.verdict == Verdict::Met),
            "{:#?}",
            c.targets
        );
        // Only four rounds: the same figures decide nothing.
        let few: Modes = modes
            .iter()
            .map(|(k, v)| (k.clone(), ModeSummary::of(v.samples[..4].to_vec())))
            .collect();
        let c = compare(&few, targets(Family::V4, true), "offload");
        assert_eq!(c.inconclusive(), c.targets.len());
        // And a run identical to the first gives identical intervals (seeded).
        let again = compare(&modes, targets(Family::V4, true), "offload");
        assert_eq!(
            serde_json::to_string(&again).unwrap(),
            serde_json::to_string(&compare(&modes, targets(Family::V4, true), "offload")).unwrap()
        );
    }

    #[test]
    fn baseline_targets_allow_three_percent_in_each_metric_s_direction() {
        let ts = baseline_targets();
        assert_eq!(ts.len(), METRICS.len(), "one per metric, host rows too");
        for (t, m) in ts.iter().zip(&METRICS) {
            assert_eq!(t.metric, m.key);
            assert_eq!(t.statistic, Statistic::Ratio { against: EBPF_BASE });
            let want = if m.higher_is_better {
                Goal::AtLeast(0.97)
            } else {
                Goal::AtMost(1.03)
            };
            assert_eq!(t.goal, want, "{}", m.key);
        }
        let describe = |key: &str| {
            ts.iter()
                .find(|t| t.metric == key)
                .map(Target::describe)
                .unwrap()
        };
        assert_eq!(describe("tcp1_gbps"), "ebpf/ebpf-base >= 0.97");
        assert_eq!(describe("rr_p99_us"), "ebpf/ebpf-base <= 1.03");
        assert_eq!(describe("cpu_s_per_gb"), "ebpf/ebpf-base <= 1.03");
        // Not part of the issues' own targets: only a run with ebpf-base adds them.
        for family in [Family::V4, Family::V6] {
            assert!(!targets(family, true)
                .iter()
                .any(|t| t.statistic == Statistic::Ratio { against: EBPF_BASE }));
        }
    }

    /// Six rounds on a machine whose speed swings 2x; kernel-vxlan at 0.8, ebpf-base at 1.0 and
    /// ebpf at `ebpf[i]` times the round's speed (throughput; latency and CPU the inverse).
    fn against_baseline(ebpf: [f64; 6]) -> Comparison {
        let speed = [10.0, 20.0, 12.0, 18.0, 15.0, 11.0];
        let ebpf_speed: [f64; 6] = std::array::from_fn(|i| speed[i] * ebpf[i]);
        let modes: Modes = [
            (KERNEL_VXLAN, summary(&speed.map(|s| s * 0.8))),
            (EBPF_BASE, summary(&speed)),
            (EBPF, summary(&ebpf_speed)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        compare(&modes, baseline_targets(), "offload")
    }

    fn verdicts(c: &Comparison) -> Vec<Verdict> {
        c.targets.iter().map(|t| t.verdict).collect()
    }

    #[test]
    fn ebpf_is_judged_against_the_baseline_build_round_by_round() {
        // 1 % slower in every round, whatever the machine did: within 3 %, met on every
        // metric (latency and CPU 1/0.99 = 1.01x, at most 1.03).
        let c = against_baseline([0.99; 6]);
        assert_eq!(c.targets.len(), METRICS.len());
        assert_eq!(verdicts(&c), vec![Verdict::Met; METRICS.len()], "{c:#?}");
        let r = &c.metrics["tcp1_gbps"].ratios;
        let i = r[EBPF].vs_ebpf_base.unwrap();
        assert!((i.estimate - 0.99).abs() < 1e-9, "{i:?}");
        let p50 = c.metrics["rr_p50_us"].ratios[EBPF].vs_ebpf_base.unwrap();
        assert!((p50.estimate - 1.0 / 0.99).abs() < 1e-9, "{p50:?}");
        // The baseline gets its own ratio to kernel-vxlan and none to itself.
        assert!((r[EBPF_BASE].vs_kernel_vxlan.unwrap().estimate - 1.25).abs() < 1e-9);
        assert!(r[EBPF_BASE].vs_ebpf_base.is_none());
        assert!(r[KERNEL_VXLAN].vs_ebpf_base.is_none());

        // 10 % slower: not met on every metric, throughput and latency alike.
        let c = against_baseline([0.90; 6]);
        assert_eq!(verdicts(&c), vec![Verdict::NotMet; METRICS.len()], "{c:#?}");

        // Rounds on both sides of 0.97: no verdict, so the bench adds rounds.
        let c = against_baseline([0.93, 1.01, 0.95, 1.0, 0.96, 0.99]);
        let tcp1 = c.targets.iter().find(|t| t.metric == "tcp1_gbps").unwrap();
        assert_eq!(tcp1.verdict, Verdict::Inconclusive, "{tcp1:?}");
        assert!(c.inconclusive() > 0);
    }

    #[test]
    fn without_the_baseline_build_there_is_no_baseline_comparison() {
        let speed = [10.0, 20.0, 12.0, 18.0, 15.0, 11.0];
        let modes: Modes = [
            (KERNEL_VXLAN, summary(&speed.map(|s| s * 0.8))),
            (EBPF, summary(&speed)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let c = compare(&modes, baseline_targets(), "offload");
        assert!(c.targets.is_empty(), "{:#?}", c.targets);
        assert!(c.metrics["tcp1_gbps"].ratios[EBPF].vs_ebpf_base.is_none());
    }

    #[test]
    fn ipv6_targets_are_issue_14_s_three_against_kernel_vxlan() {
        let kv = Statistic::Ratio {
            against: KERNEL_VXLAN,
        };
        for offload_on in [true, false] {
            let got: Vec<(&str, Statistic, Goal, u32)> = targets(Family::V6, offload_on)
                .iter()
                .map(|t| (t.metric, t.statistic, t.goal, t.issue))
                .collect();
            assert_eq!(
                got,
                [
                    ("tcp1_gbps", kv, Goal::AtLeast(1.0), 14),
                    ("rr_p50_us", kv, Goal::AtMost(1.0), 14),
                    ("udp64_pps", kv, Goal::AtLeast(1.0), 14),
                ]
            );
        }
        // Judged by interval as IPv4's: ebpf 1.1x kernel-vxlan (latency 1/1.1) in every round
        // meets all three; ebpf ahead in half the rounds and behind in the others decides nothing.
        let speed = [10.0, 20.0, 12.0, 18.0, 15.0, 11.0];
        let modes = |ebpf: [f64; 6]| -> Modes {
            [
                (KERNEL_VXLAN, summary(&speed)),
                (
                    EBPF,
                    summary(&std::array::from_fn::<f64, 6, _>(|i| speed[i] * ebpf[i])),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
        };
        let c = compare(&modes([1.1; 6]), targets(Family::V6, true), "offload");
        assert_eq!(c.targets.len(), 3);
        assert!(
            c.targets.iter().all(|t| t.verdict == Verdict::Met),
            "{:#?}",
            c.targets
        );
        let mixed = [1.2, 0.9, 1.2, 0.9, 1.2, 0.9];
        let c = compare(&modes(mixed), targets(Family::V6, true), "offload");
        assert_eq!(c.inconclusive(), 3, "{:#?}", c.targets);
        let c = compare(&modes([0.8; 6]), targets(Family::V6, false), "no-offload");
        assert!(c.targets.iter().all(|t| t.verdict == Verdict::NotMet));
    }

    #[test]
    fn a_miss_outside_the_interval_is_not_met() {
        let speed = [10.0, 11.0, 9.5, 10.5, 10.2];
        let modes: Modes = [
            (BARE, summary(&speed)),
            (HOST_GW, summary(&speed.map(|s| s * 0.9))),
            (KERNEL_VXLAN, summary(&speed.map(|s| s * 0.7))),
            (EBPF, summary(&speed.map(|s| s * 0.8))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let c = compare(&modes, targets(Family::V4, true), "offload");
        let t = c
            .targets
            .iter()
            .find(|t| t.metric == "tcp1_gbps" && t.target == "ebpf/bare >= 0.90")
            .unwrap();
        assert_eq!(t.verdict, Verdict::NotMet, "{t:?}");
    }
}
