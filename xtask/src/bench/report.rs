//! report.json, the terminal tables and report.md: the same grids, rendered twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::bench::counters::{Counters, RoundCheck};
use crate::bench::programs::Programs;
use crate::bench::stats::{Interval, Modes, METRICS};
use crate::bench::targets::{self, Comparison, BARE, EBPF, EBPF_BASE, HOST_GW, KERNEL_VXLAN};

/// target/bench/report.json. `modes` holds the variant named in `variant` (the default underlay
/// offloads when that variant ran).
#[derive(Debug, Serialize)]
pub struct Report {
    /// 4, or 6 for `--family 6` (IPv6 containers over the IPv6 underlay).
    pub family: u8,
    pub rounds: usize,
    pub modes: Modes,
    pub ebpf_counters: EbpfCounters,
    pub variant: &'static str,
    pub comparison: Comparison,
    /// The same measurements with TSO/GSO off on the underlay, when that variant ran too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_offload: Option<VariantReport>,
    /// `--programs`: the eBPF programs' own run time per packet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programs: Option<Programs>,
    pub settings: Settings,
}

#[derive(Debug, Serialize)]
pub struct VariantReport {
    pub modes: Modes,
    pub comparison: Comparison,
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
    /// Rounds asked for, and the cap on rounds added while targets were inconclusive.
    pub min_rounds: usize,
    pub max_rounds: usize,
    pub interval_method: String,
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
    /// The build `ebpf-base` ran (`--baseline` or WEFT_BASE_BIN, and the binary), when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// `kernel.bpf_stats_enabled` when the run started (`None`: unreadable). On, every eBPF
    /// program ran with its clock reads in every test, not only in `--programs`' timing runs.
    pub bpf_stats_enabled: Option<bool>,
    /// The TCP congestion control each mode's test sockets used (`--congestion-control`).
    pub tcp_congestion_control: BTreeMap<String, String>,
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

/// A table before rendering: a header and rows of cells.
pub struct Grid {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Grid {
    /// Columns padded to their widest cell, the first left-aligned.
    pub fn text(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let mut out = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i == 0 {
                    let _ = write!(out, "{c:<w$}");
                } else {
                    let _ = write!(out, "  {c:>w$}");
                }
            }
            out
        };
        let head = line(&self.header);
        let mut out = format!("{head}\n{}\n", "-".repeat(head.chars().count()));
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let row = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = row(&self.header);
        out.push_str(&"|---".repeat(self.header.len()));
        out.push_str("|\n");
        for r in &self.rows {
            out.push_str(&row(r));
        }
        out
    }
}

/// Modes in report order, those that ran.
fn present(modes: &Modes) -> Vec<&'static str> {
    [
        BARE,
        "veth-floor",
        HOST_GW,
        KERNEL_VXLAN,
        EBPF,
        EBPF_BASE,
        "ebpf-nocsum",
    ]
    .into_iter()
    .filter(|m| modes.contains_key(*m))
    .collect()
}

/// A ratio with its interval: `0.93x (0.90-0.95)`, or `0.93x` without a spread.
pub fn fmt_ratio(i: &Interval) -> String {
    if !i.estimate.is_finite() {
        "-".to_owned()
    } else if i.has_spread() {
        format!("{:.2}x ({:.2}–{:.2})", i.estimate, i.lo, i.hi)
    } else {
        format!("{:.2}x", i.estimate)
    }
}

fn fmt_pct(i: &Interval) -> String {
    if i.has_spread() {
        format!("{:.0} % ({:.0}–{:.0})", i.estimate, i.lo, i.hi)
    } else {
        format!("{:.0} %", i.estimate)
    }
}

/// Per metric: every mode's median, every mode's ratio to bare, the overlays' ratios to
/// kernel-vxlan, ebpf's to host-gw and the share of the gap it closes.
pub fn values_grid(rounds: usize, modes: &Modes, cmp: &Comparison) -> Grid {
    let order = present(modes);
    let mut header = vec![format!("metric (median of {rounds} rounds)")];
    header.extend(order.iter().map(|m| (*m).to_owned()));
    type Column = (String, Box<dyn Fn(&targets::MetricComparison) -> String>);
    let mut columns: Vec<Column> = Vec::new();
    let pick = |mode: &'static str, f: fn(&targets::Ratios) -> Option<Interval>| {
        Box::new(move |mc: &targets::MetricComparison| {
            mc.ratios
                .get(mode)
                .and_then(f)
                .map_or("-".to_owned(), |i| fmt_ratio(&i))
        }) as Box<dyn Fn(&targets::MetricComparison) -> String>
    };
    if modes.contains_key(BARE) {
        for m in order.iter().filter(|m| **m != BARE) {
            columns.push((format!("{m}/bare"), pick(m, |r| r.vs_bare)));
        }
    }
    if modes.contains_key(KERNEL_VXLAN) {
        for m in order.iter().filter(|m| ![BARE, KERNEL_VXLAN].contains(*m)) {
            columns.push((format!("{m}/kernel-vxlan"), pick(m, |r| r.vs_kernel_vxlan)));
        }
    }
    if modes.contains_key(EBPF) && modes.contains_key(HOST_GW) {
        columns.push(("ebpf/host-gw".to_owned(), pick(EBPF, |r| r.vs_host_gw)));
        columns.push((
            "gap closed".to_owned(),
            Box::new(|mc: &targets::MetricComparison| {
                mc.gap_closed_pct.as_ref().map_or("-".to_owned(), fmt_pct)
            }),
        ));
    }
    header.extend(columns.iter().map(|(h, _)| h.clone()));
    let rows = METRICS
        .iter()
        .map(|metric| {
            let mut row = vec![metric.label.to_owned()];
            row.extend(
                order
                    .iter()
                    .map(|m| fmt_value((metric.get)(&modes[*m].medians()))),
            );
            let mc = cmp.metrics.get(metric.key).cloned().unwrap_or_default();
            row.extend(columns.iter().map(|(_, f)| f(&mc)));
            row
        })
        .collect();
    Grid { header, rows }
}

/// One row per target: the interval that judged it and the verdict.
pub fn targets_grid(cmp: &Comparison) -> Grid {
    let header = [
        "metric",
        "target",
        "issue",
        "estimate (95 % interval)",
        "rounds",
        "verdict",
    ]
    .map(str::to_owned)
    .to_vec();
    let rows = cmp
        .targets
        .iter()
        .map(|t| {
            let value = if t.target.starts_with("gap") {
                fmt_pct(&t.interval)
            } else {
                fmt_ratio(&t.interval)
            };
            vec![
                targets::label(t).to_owned(),
                t.target.clone(),
                t.issue.to_string(),
                value,
                t.interval.rounds.to_string(),
                t.verdict.to_string(),
            ]
        })
        .collect();
    Grid { header, rows }
}

/// With `ebpf-base` measured: per metric both eBPF builds' medians, their ratios to
/// kernel-vxlan, ebpf/ebpf-base (the per-round ratio, the same as the ratio of the two
/// kernel-vxlan ratios round by round) and its target's verdict. `None` without both modes.
pub fn baseline_grid(modes: &Modes, cmp: &Comparison) -> Option<Grid> {
    if !(modes.contains_key(EBPF) && modes.contains_key(EBPF_BASE)) {
        return None;
    }
    let kv = modes.contains_key(KERNEL_VXLAN);
    let mut header = vec!["metric".to_owned(), EBPF.to_owned(), EBPF_BASE.to_owned()];
    if kv {
        header.push(format!("{EBPF}/{KERNEL_VXLAN}"));
        header.push(format!("{EBPF_BASE}/{KERNEL_VXLAN}"));
    }
    header.push(format!("{EBPF}/{EBPF_BASE}"));
    header.extend(["target", "verdict"].map(str::to_owned));
    let ratio = |i: Option<Interval>| i.map_or("-".to_owned(), |i| fmt_ratio(&i));
    let rows = METRICS
        .iter()
        .map(|metric| {
            let value = |mode: &str| fmt_value((metric.get)(&modes[mode].medians()));
            let mc = cmp.metrics.get(metric.key).cloned().unwrap_or_default();
            let of = |mode: &str| mc.ratios.get(mode).cloned().unwrap_or_default();
            let mut row = vec![metric.label.to_owned(), value(EBPF), value(EBPF_BASE)];
            if kv {
                row.push(ratio(of(EBPF).vs_kernel_vxlan));
                row.push(ratio(of(EBPF_BASE).vs_kernel_vxlan));
            }
            row.push(ratio(of(EBPF).vs_ebpf_base));
            let judged = cmp
                .targets
                .iter()
                .find(|t| t.metric == metric.key && t.target.starts_with("ebpf/ebpf-base"));
            row.push(judged.map_or("-".to_owned(), |t| t.target.clone()));
            row.push(judged.map_or("-".to_owned(), |t| t.verdict.to_string()));
            row
        })
        .collect();
    Some(Grid { header, rows })
}

/// The terminal's tables for one variant.
pub fn table(title: &str, rounds: usize, modes: &Modes, cmp: &Comparison) -> String {
    let mut out = format!("\n{title}\n{}", values_grid(rounds, modes, cmp).text());
    if let Some(g) = baseline_grid(modes, cmp) {
        let _ = write!(
            out,
            "\nebpf against the baseline build (ebpf-base)\n{}",
            g.text()
        );
    }
    if !cmp.targets.is_empty() {
        let _ = write!(out, "\ntargets\n{}", targets_grid(cmp).text());
    }
    out
}

/// The same tables as Markdown, for README.
pub fn markdown(rounds: usize, modes: &Modes, cmp: &Comparison) -> String {
    let mut out = values_grid(rounds, modes, cmp).markdown();
    if let Some(g) = baseline_grid(modes, cmp) {
        let _ = write!(out, "\n{}", g.markdown());
    }
    if !cmp.targets.is_empty() {
        let _ = write!(out, "\n{}", targets_grid(cmp).markdown());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{ModeSummary, Sample};
    use crate::bench::topology::Family;

    fn modes(rounds: usize) -> Modes {
        let s = |round: usize, x: f64| Sample {
            round,
            tcp1_gbps: x,
            tcp4_gbps: x,
            rr_p50_us: 30.0 - x,
            rr_p99_us: 60.0 - x,
            rr_tps: 1000.0 * x,
            udp64_pps: 10_000.0 * x,
            cpu_s_per_gb: 1.0 / x,
            host_tcp1_gbps: x,
            host_rr_p50_us: 30.0 - x,
        };
        [
            ("bare", 27.0),
            ("host-gw", 26.5),
            ("kernel-vxlan", 24.5),
            ("ebpf", 26.4),
        ]
        .into_iter()
        .map(|(m, x)| {
            let samples = (1..=rounds)
                .map(|r| s(r, x * (1.0 + 0.01 * r as f64)))
                .collect();
            (m.to_owned(), ModeSummary::of(samples))
        })
        .collect()
    }

    #[test]
    fn table_shows_ratios_to_bare_and_kernel_vxlan_with_intervals() {
        let m = modes(3);
        let cmp = targets::compare(&m, targets::targets(Family::V4, true), "offload");
        let t = table("offload", 3, &m, &cmp);
        assert!(t.contains("ebpf/bare") && t.contains("host-gw/bare"), "{t}");
        assert!(
            t.contains("ebpf/kernel-vxlan") && t.contains("ebpf/host-gw"),
            "{t}"
        );
        let tcp1 = t.lines().find(|l| l.starts_with("TCP 1 stream")).unwrap();
        // 26.4 / 27.0, the same in every round: an interval of one point.
        assert!(tcp1.contains("0.98x (0.98–0.98)"), "{tcp1}");
        assert!(tcp1.contains("1.08x"), "{tcp1}");
        // Three rounds: every target inconclusive.
        assert!(t.contains("inconclusive") && !t.contains(" met"), "{t}");
    }

    #[test]
    fn markdown_has_a_row_per_metric_and_per_target() {
        let m = modes(5);
        let cmp = targets::compare(&m, targets::targets(Family::V4, true), "offload");
        let md = markdown(5, &m, &cmp);
        let (values, targets) = md.split_once("\n\n").unwrap();
        assert_eq!(values.lines().count(), 2 + METRICS.len());
        assert_eq!(targets.lines().count(), 2 + cmp.targets.len());
        assert!(md
            .lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('|') && l.ends_with('|')));
        assert!(targets.contains("| met |"), "{targets}");
    }

    #[test]
    fn a_run_with_the_baseline_build_has_a_table_for_ebpf_against_it() {
        let mut m = modes(5);
        assert!(baseline_grid(&m, &Comparison::default()).is_none());
        let base: Vec<Sample> = m["ebpf"]
            .samples
            .iter()
            .map(|s| Sample {
                tcp1_gbps: s.tcp1_gbps / 0.99,
                ..*s
            })
            .collect();
        m.insert(EBPF_BASE.to_owned(), ModeSummary::of(base));
        let mut ts = targets::targets(Family::V4, true);
        ts.extend(targets::baseline_targets());
        let cmp = targets::compare(&m, ts, "offload");
        let md = markdown(5, &m, &cmp);
        assert!(md.contains("| metric | ebpf | ebpf-base | ebpf/kernel-vxlan | ebpf-base/kernel-vxlan | ebpf/ebpf-base | target | verdict |"), "{md}");
        let tcp1 = md
            .lines()
            .find(|l| l.starts_with("| TCP 1 stream") && l.contains("ebpf/ebpf-base >="))
            .unwrap();
        assert!(
            tcp1.contains("| 0.99x (0.99–0.99) | ebpf/ebpf-base >= 0.97 | met |"),
            "{tcp1}"
        );
        let t = table("offload", 5, &m, &cmp);
        assert!(
            t.contains("ebpf against the baseline build (ebpf-base)"),
            "{t}"
        );
        assert!(t.contains("ebpf-base/bare"), "{t}");
    }

    #[test]
    fn one_round_shows_no_interval() {
        let i = Interval {
            estimate: 0.931,
            lo: f64::NAN,
            hi: f64::NAN,
            rounds: 1,
        };
        assert_eq!(fmt_ratio(&i), "0.93x");
    }

    #[test]
    fn values_are_short() {
        assert_eq!(fmt_value(186_000.0), "186.0k");
        assert_eq!(fmt_value(26.53), "26.5");
        assert_eq!(fmt_value(0.123), "0.12");
        assert_eq!(fmt_value(f64::NAN), "-");
    }
}
