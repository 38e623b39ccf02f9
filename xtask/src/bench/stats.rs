//! What one round measures, medians over rounds, and the comparisons the issue asks for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One round's figures for one mode (one entry of `samples` in report.json).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub tcp1_gbps: f64,
    pub tcp4_gbps: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub rr_tps: f64,
    pub udp64_pps: f64,
    pub cpu_s_per_gb: f64,
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
pub const METRICS: [Metric; 7] = [
    metric("tcp1_gbps", "TCP 1 stream, Gbit/s", HIGHER, |s| s.tcp1_gbps),
    metric("tcp4_gbps", "TCP 4 streams, Gbit/s", HIGHER, |s| s.tcp4_gbps),
    metric("rr_p50_us", "TCP RR p50 RTT, µs", LOWER, |s| s.rr_p50_us),
    metric("rr_p99_us", "TCP RR p99 RTT, µs", LOWER, |s| s.rr_p99_us),
    metric("rr_tps", "TCP RR transactions/s", HIGHER, |s| s.rr_tps),
    metric("udp64_pps", "UDP 64 B received, pkt/s", HIGHER, |s| s.udp64_pps),
    metric("cpu_s_per_gb", "CPU s per GB (TCP 1 stream)", LOWER, |s| s.cpu_s_per_gb),
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

/// A mode's medians plus every round (the `M` of report.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeSummary {
    pub tcp1_gbps: f64,
    pub tcp4_gbps: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub rr_tps: f64,
    pub udp64_pps: f64,
    pub cpu_s_per_gb: f64,
    pub samples: Vec<Sample>,
}

impl ModeSummary {
    pub fn of(samples: Vec<Sample>) -> ModeSummary {
        let med = |m: &Metric| median(&samples.iter().map(m.get).collect::<Vec<_>>());
        let [tcp1, tcp4, p50, p99, tps, udp, cpu] = METRICS.map(|m| med(&m));
        ModeSummary {
            tcp1_gbps: tcp1,
            tcp4_gbps: tcp4,
            rr_p50_us: p50,
            rr_p99_us: p99,
            rr_tps: tps,
            udp64_pps: udp,
            cpu_s_per_gb: cpu,
            samples,
        }
    }

    /// The medians as a [`Sample`] (round 0), so [`Metric::get`] reads them.
    pub fn medians(&self) -> Sample {
        Sample {
            round: 0,
            tcp1_gbps: self.tcp1_gbps,
            tcp4_gbps: self.tcp4_gbps,
            rr_p50_us: self.rr_p50_us,
            rr_p99_us: self.rr_p99_us,
            rr_tps: self.rr_tps,
            udp64_pps: self.udp64_pps,
            cpu_s_per_gb: self.cpu_s_per_gb,
        }
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

/// How ebpf compares on one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Comparison {
    /// ebpf / kernel-vxlan.
    pub vs_kernel_vxlan: Option<f64>,
    /// ebpf / host-gw.
    pub vs_host_gw: Option<f64>,
    /// (ebpf - kernel-vxlan) / (host-gw - kernel-vxlan) in percent: the share of the overlay's cost
    /// that ebpf recovers (100 = as good as host-gw, above 100 = better than host-gw).
    pub gap_closed_pct: Option<f64>,
    /// Whether the issue's target for this metric is met.
    pub target_met: Option<bool>,
}

pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// `None` when host-gw is not better than kernel-vxlan by at least 2 % (in the metric's direction):
/// then there is no overlay cost to recover and the percentage would only magnify noise.
pub fn gap_closed(ebpf: f64, kernel_vxlan: f64, host_gw: f64) -> Option<f64> {
    let gap = host_gw - kernel_vxlan;
    (gap.abs() > 0.02 * kernel_vxlan.abs() && ebpf.is_finite())
        .then(|| (ebpf - kernel_vxlan) / gap * 100.0)
}

/// [`gap_closed`] for a metric, `None` also when host-gw is worse than kernel-vxlan.
pub fn gap_closed_for(metric: &Metric, ebpf: f64, kernel_vxlan: f64, host_gw: f64) -> Option<f64> {
    let host_gw_better = if metric.higher_is_better {
        host_gw > kernel_vxlan
    } else {
        host_gw < kernel_vxlan
    };
    gap_closed(ebpf, kernel_vxlan, host_gw).filter(|_| host_gw_better)
}

/// The issue's targets: ebpf better than kernel-vxlan on every metric (1.3x on 64-byte UDP), and at
/// least 80 % of the gap to host-gw closed.
pub fn target_met(metric: &Metric, ebpf: f64, kernel_vxlan: f64, host_gw: f64) -> Option<bool> {
    let better = if metric.key == "udp64_pps" {
        ebpf >= 1.3 * kernel_vxlan
    } else if metric.higher_is_better {
        ebpf > kernel_vxlan
    } else {
        ebpf < kernel_vxlan
    };
    // When kernel-vxlan already matches host-gw there is no gap to close: only "better" counts.
    let closed = gap_closed_for(metric, ebpf, kernel_vxlan, host_gw).is_none_or(|pct| pct >= 80.0);
    (ebpf.is_finite() && kernel_vxlan.is_finite()).then_some(better && closed)
}

/// ebpf against the other two modes on every metric; empty unless all three modes ran.
pub fn compare(modes: &BTreeMap<String, ModeSummary>) -> BTreeMap<&'static str, Comparison> {
    let (Some(hg), Some(kv), Some(eb)) = (
        modes.get("host-gw"),
        modes.get("kernel-vxlan"),
        modes.get("ebpf"),
    ) else {
        return BTreeMap::new();
    };
    let (hg, kv, eb) = (hg.medians(), kv.medians(), eb.medians());
    METRICS
        .iter()
        .map(|m| {
            let (h, k, e) = ((m.get)(&hg), (m.get)(&kv), (m.get)(&eb));
            let c = Comparison {
                vs_kernel_vxlan: ratio(e, k),
                vs_host_gw: ratio(e, h),
                gap_closed_pct: gap_closed_for(m, e, k, h),
                target_met: target_met(m, e, k, h),
            };
            (m.key, c)
        })
        .collect()
}

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
        assert_eq!(s.tcp1_gbps, 2.0);
        assert_eq!(s.tcp4_gbps, 4.0);
        assert_eq!(s.rr_p50_us, 5.0);
        assert_eq!(s.samples.len(), 3);
        assert_eq!(s.range(&METRICS[0]), (1.0, 4.0));
    }

    #[test]
    fn gap_closed_works_both_ways() {
        // Throughput: kv 20, hg 30, ebpf 28 -> 80 %.
        assert_eq!(gap_closed(28.0, 20.0, 30.0), Some(80.0));
        // Latency: kv 15, hg 12, ebpf 12.6 -> 80 %.
        let pct = gap_closed(12.6, 15.0, 12.0).unwrap();
        assert!((pct - 80.0).abs() < 1e-9);
        // Better than host-gw: above 100.
        assert!(gap_closed(11.0, 15.0, 12.0).unwrap() > 100.0);
        assert_eq!(gap_closed(1.0, 2.0, 2.0), None);
        assert_eq!(gap_closed(1.0, 10.0, 10.1), None, "a 1 % gap is noise");
        // host-gw worse than kernel-vxlan on a throughput metric: no gap to close.
        assert_eq!(gap_closed_for(&METRICS[0], 4.6, 11.4, 11.0), None);
    }

    #[test]
    fn targets_follow_the_issue() {
        let udp = &METRICS[5];
        assert_eq!(target_met(udp, 129.0 * 1.29, 129.0, 186.0), Some(false));
        assert_eq!(target_met(udp, 190.0, 129.0, 186.0), Some(true));
        let p50 = &METRICS[2];
        assert_eq!(target_met(p50, 14.0, 14.6, 12.5), Some(false)); // better, but 29 % of the gap
        assert_eq!(target_met(p50, 12.0, 14.6, 12.5), Some(true));
    }

    #[test]
    fn compare_needs_all_three_modes() {
        let mut modes = BTreeMap::new();
        modes.insert("host-gw".to_owned(), ModeSummary::of(vec![sample(1, 3.0)]));
        modes.insert(
            "kernel-vxlan".to_owned(),
            ModeSummary::of(vec![sample(1, 2.0)]),
        );
        assert!(compare(&modes).is_empty());
        modes.insert("ebpf".to_owned(), ModeSummary::of(vec![sample(1, 2.9)]));
        let c = compare(&modes);
        let tcp1 = c["tcp1_gbps"];
        assert!((tcp1.vs_kernel_vxlan.unwrap() - 1.45).abs() < 1e-9);
        assert!((tcp1.gap_closed_pct.unwrap() - 90.0).abs() < 1e-9);
        assert_eq!(tcp1.target_met, Some(true));
    }
}
