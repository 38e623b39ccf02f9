//! report.json and the terminal table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::bench::counters::{Counters, RoundCheck};
use crate::bench::stats::{compare, Comparison, ModeSummary, METRICS};

/// target/bench/report.json. The first three keys are the shape; `modes` holds the
/// variant named in `variant` (the default underlay offloads when that variant ran).
#[derive(Debug, Serialize)]
pub struct Report {
    pub rounds: usize,
    pub modes: BTreeMap<String, ModeSummary>,
    pub ebpf_counters: EbpfCounters,
    pub variant: &'static str,
    pub comparison: BTreeMap<&'static str, Comparison>,
    /// The same measurements with TSO/GSO off on the underlay, when that variant ran too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_offload: Option<VariantReport>,
    pub settings: Settings,
}

#[derive(Debug, Serialize)]
pub struct VariantReport {
    pub modes: BTreeMap<String, ModeSummary>,
    pub comparison: BTreeMap<&'static str, Comparison>,
}

impl VariantReport {
    pub fn new(modes: BTreeMap<String, ModeSummary>) -> VariantReport {
        VariantReport {
            comparison: compare(&modes),
            modes,
        }
    }
}

/// The eBPF datapath's counters: each host's at the start and the end of the run, and every ebpf
/// round's check (see `counters`).
#[derive(Debug, Default, Serialize)]
pub struct EbpfCounters {
    /// How they were read.
    pub source: &'static str,
    pub before: BTreeMap<String, Counters>,
    pub after: BTreeMap<String, Counters>,
    pub rounds: Vec<RoundCheck>,
    /// Whether every ebpf round went through eBPF (false also when no ebpf round ran).
    pub all_rounds_through_ebpf: bool,
}

/// How the run was made, so a reader can reproduce it.
#[derive(Debug, Serialize)]
pub struct Settings {
    pub command: String,
    pub seconds_per_test: u64,
    pub container_mtu: u32,
    pub routing: &'static str,
    pub rr_tool: String,
    pub udp_tool: String,
    pub cpu_method: String,
    /// `ethtool -k` (tso/gso/gro) of the underlay per mode and variant, as measured.
    pub offloads: BTreeMap<String, String>,
    pub kernel: String,
    pub cpus: usize,
    /// /proc/loadavg when the run started and ended: other work on the machine adds noise.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

impl Report {
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("encode report.json")?;
        std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))
    }
}

/// The medians of one variant, ebpf's ratios, the share of the gap closed, and whether the
/// issue's target is met.
pub fn table(title: &str, rounds: usize, modes: &BTreeMap<String, ModeSummary>) -> String {
    let cmp = compare(&modes.clone());
    let order = ["host-gw", "kernel-vxlan", "ebpf", "ebpf-nocsum"];
    let present: Vec<&str> = order
        .iter()
        .copied()
        .filter(|m| modes.contains_key(*m))
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "\n{title} (medians of {rounds} rounds)");
    let mut header = format!("{:<28}", "metric");
    for m in &present {
        let _ = write!(header, "{m:>14}");
    }
    if !cmp.is_empty() {
        let _ = write!(
            header,
            "{:>10}{:>10}{:>12}{:>8}",
            "ebpf/kv", "ebpf/hg", "gap closed", "target"
        );
    }
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{}", "-".repeat(header.chars().count()));
    for metric in &METRICS {
        let mut line = format!("{:<28}", metric.label);
        for m in &present {
            let v = (metric.get)(&modes[*m].medians());
            let _ = write!(line, "{:>14}", fmt_value(v));
        }
        if let Some(c) = cmp.get(metric.key) {
            let opt = |v: Option<f64>, f: fn(f64) -> String| v.map_or("-".to_owned(), f);
            let _ = write!(
                line,
                "{:>10}{:>10}{:>12}{:>8}",
                opt(c.vs_kernel_vxlan, |r| format!("{r:.2}x")),
                opt(c.vs_host_gw, |r| format!("{r:.2}x")),
                opt(c.gap_closed_pct, |p| format!("{p:.0} %")),
                match c.target_met {
                    Some(true) => "met",
                    Some(false) => "not met",
                    None => "-",
                }
            );
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

/// Four significant figures, thousands as k.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "-".to_owned()
    } else if v.abs() >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The same table as Markdown, for README.
pub fn markdown(rounds: usize, modes: &BTreeMap<String, ModeSummary>) -> String {
    let cmp = compare(modes);
    let order: Vec<&str> = ["host-gw", "kernel-vxlan", "ebpf", "ebpf-nocsum"]
        .into_iter()
        .filter(|m| modes.contains_key(*m))
        .collect();
    let mut out = format!("| metric (median of {rounds} rounds) |");
    for m in &order {
        let _ = write!(out, " {m} |");
    }
    if !cmp.is_empty() {
        out.push_str(" ebpf/kernel-vxlan | ebpf/host-gw | gap closed | target |");
    }
    out.push('\n');
    let cols = order.len() + 1 + if cmp.is_empty() { 0 } else { 4 };
    out.push_str(&"|---".repeat(cols));
    out.push_str("|\n");
    for metric in &METRICS {
        let _ = write!(out, "| {} |", metric.label);
        for m in &order {
            let _ = write!(out, " {} |", fmt_value((metric.get)(&modes[*m].medians())));
        }
        if let Some(c) = cmp.get(metric.key) {
            let r = |v: Option<f64>| v.map_or("-".to_owned(), |r| format!("{r:.2}x"));
            let _ = write!(
                out,
                " {} | {} | {} | {} |",
                r(c.vs_kernel_vxlan),
                r(c.vs_host_gw),
                c.gap_closed_pct
                    .map_or("-".to_owned(), |p| format!("{p:.0} %")),
                match c.target_met {
                    Some(true) => "met",
                    Some(false) => "not met",
                    None => "-",
                }
            );
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Sample;

    fn modes() -> BTreeMap<String, ModeSummary> {
        let s = |x: f64| Sample {
            round: 1,
            tcp1_gbps: x,
            tcp4_gbps: x,
            rr_p50_us: 30.0 - x,
            rr_p99_us: 60.0 - x,
            rr_tps: 1000.0 * x,
            udp64_pps: 10_000.0 * x,
            cpu_s_per_gb: 1.0 / x,
        };
        [("host-gw", 26.5), ("kernel-vxlan", 24.5), ("ebpf", 26.4)]
            .into_iter()
            .map(|(m, x)| (m.to_owned(), ModeSummary::of(vec![s(x)])))
            .collect()
    }

    #[test]
    fn table_shows_ratios_and_gap() {
        let t = table("offload", 1, &modes());
        assert!(t.contains("ebpf/kv"), "{t}");
        let tcp1 = t.lines().find(|l| l.starts_with("TCP 1 stream")).unwrap();
        assert!(tcp1.contains("1.08x"), "{tcp1}");
        assert!(tcp1.contains("95 %"), "{tcp1}");
        assert!(tcp1.contains("met"), "{tcp1}");
    }

    #[test]
    fn markdown_has_a_row_per_metric() {
        let md = markdown(1, &modes());
        assert_eq!(md.lines().count(), 2 + METRICS.len());
        assert!(md.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
    }

    #[test]
    fn values_are_short() {
        assert_eq!(fmt_value(186_000.0), "186.0k");
        assert_eq!(fmt_value(26.53), "26.5");
        assert_eq!(fmt_value(0.123), "0.12");
        assert_eq!(fmt_value(f64::NAN), "-");
    }
}
