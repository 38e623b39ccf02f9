//! The soak's samples, its verdict against issue 17's criteria, report.json and report.svg.
//!
//! The criteria, for a run of T minutes (T = 30 in the issue):
//! - flat: per host, RSS, open fds, pinned objects, forwarding entries (eBPF map entries, or
//!   flannel.1's routes/neighbours/fdb) and iptables/nft rule counts, taken as the median over
//!   windows of w = min(1 min, T/10), stay within 5 % of the window that ends at T/3 (the 10th
//!   minute) in every window of the last T/3 minutes of churn (the last 10 minutes, ending
//!   where the fake peers stop joining);
//! - etcd: at the end (fake peers drained) the keys under `<prefix>/subnets/` are exactly the
//!   live leases, one per host and each the subnet its agent wrote;
//! - pings: none lost outside the flap windows (0.5 s before to 5 s after a docker0 flap of the
//!   sending or the receiving host);
//! - no agent exited on its own, every agent runs at the end.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use plotters::prelude::*;
use serde::Serialize;

use super::{PingStream, Schedule, FLAP_AFTER, FLAP_BEFORE};

#[derive(Debug, Clone, Serialize)]
pub struct HostSample {
    pub pid: Option<u32>,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    pub pinned: Option<u64>,
    pub forwarding_entries: Option<u64>,
    pub iptables_rules: Option<u64>,
    pub nft_rules: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EtcdSample {
    /// Keys under the prefix (config + leases).
    pub keys: u64,
    pub subnet_keys: u64,
    pub revision: u64,
    pub db_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the churn started.
    pub t: f64,
    pub hosts: Vec<HostSample>,
    pub etcd: EtcdSample,
    /// Fake peers the harness believes alive.
    pub live_fakes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndState {
    pub subnet_keys: usize,
    pub live_fakes: usize,
    /// Hosts whose subnet file's subnet is a key in etcd.
    pub own_leases: usize,
    pub agents_alive: usize,
}

pub struct Report {
    pub hosts: usize,
    pub datapath: String,
    pub schedule: Schedule,
    pub started_unix: f64,
    pub samples: Vec<Sample>,
    pub pings: Vec<PingStream>,
    pub flaps: Vec<(usize, f64, f64)>,
    pub restarts: Vec<(usize, f64, &'static str)>,
    pub fakes_joined: u64,
    pub end: EndState,
    pub errors: Vec<String>,
}

/// A per-host series the verdict judges and the chart draws.
struct HostSeries {
    name: &'static str,
    label: &'static str,
    get: fn(&HostSample) -> Option<u64>,
}

const fn series(
    name: &'static str,
    label: &'static str,
    get: fn(&HostSample) -> Option<u64>,
) -> HostSeries {
    HostSeries { name, label, get }
}

const HOST_SERIES: [HostSeries; 6] = [
    series("rss_kib", "agent RSS (KiB)", |h| h.rss_kib),
    series("fds", "agent open fds", |h| h.fds),
    series("pinned", "pinned objects", |h| h.pinned),
    series("forwarding_entries", "forwarding entries", |h| {
        h.forwarding_entries
    }),
    series("iptables_rules", "iptables rules", |h| h.iptables_rules),
    series("nft_rules", "nft rules", |h| h.nft_rules),
];

/// Flatness tolerance: 5 %.
const TOLERANCE: f64 = 0.05;

pub struct Verdict {
    pub pass: bool,
    pub text: String,
    pub lost_in_flaps: u64,
    pub lost_outside_flaps: Vec<(usize, usize, u32, f64)>,
    pub flat: Vec<serde_json::Value>,
}

impl Report {
    fn total(&self) -> f64 {
        self.schedule.total.as_secs_f64()
    }

    /// The window length and the reference and judged ranges, in seconds since the start.
    fn windows(&self) -> (f64, (f64, f64), (f64, f64)) {
        let total = self.total();
        let w = (total / 10.0).min(60.0);
        let reference = total / 3.0;
        let churn_end = total - self.schedule.drain.as_secs_f64();
        (
            w,
            (reference - w, reference),
            (churn_end - total / 3.0, churn_end),
        )
    }

    fn median_in(&self, host: usize, s: &HostSeries, from: f64, to: f64) -> Option<f64> {
        let mut v: Vec<u64> = self
            .samples
            .iter()
            .filter(|x| x.t > from && x.t <= to)
            .filter_map(|x| x.hosts.get(host).and_then(|h| (s.get)(h)))
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[v.len() / 2] as f64)
    }

    pub fn verdict(&self) -> Verdict {
        let mut lines = Vec::new();
        let mut pass = true;
        let (w, (r0, r1), (l0, l1)) = self.windows();
        lines.push(format!(
            "==> verdict ({} hosts, --datapath {}, {:.0} min; reference window {:.0}-{:.0} s, judged {:.0}-{:.0} s in {:.0} s windows, tolerance 5 %)",
            self.hosts, self.datapath, self.total() / 60.0, r0, r1, l0, l1, w
        ));
        let mut flat = Vec::new();
        for s in &HOST_SERIES {
            for host in 0..self.hosts {
                let reference = self.median_in(host, s, r0, r1);
                let mut worst: Option<f64> = None;
                let mut t = l0;
                while t + w <= l1 + 1e-6 {
                    if let (Some(r), Some(m)) = (reference, self.median_in(host, s, t, t + w)) {
                        let dev = if r == 0.0 {
                            if m == 0.0 {
                                0.0
                            } else {
                                f64::INFINITY
                            }
                        } else {
                            (m - r).abs() / r
                        };
                        worst = Some(worst.map_or(dev, |x: f64| x.max(dev)));
                    }
                    t += w;
                }
                let ok = worst.is_some_and(|d| d <= TOLERANCE);
                pass &= ok;
                lines.push(format!(
                    "    {} {:<20} host{}: reference {:>9} worst deviation {}",
                    if ok { "ok  " } else { "FAIL" },
                    s.name,
                    host + 1,
                    reference.map_or("n/a".into(), |r| format!("{r:.0}")),
                    worst.map_or("n/a (no samples)".into(), |d| format!("{:.1} %", d * 100.0)),
                ));
                flat.push(serde_json::json!({
                    "series": s.name, "host": host + 1, "reference": reference,
                    "worst_deviation": worst.filter(|d| d.is_finite()), "ok": ok,
                }));
            }
        }

        let e = &self.end;
        let etcd_ok =
            e.subnet_keys == self.hosts && e.own_leases == self.hosts && e.live_fakes == 0;
        pass &= etcd_ok;
        lines.push(format!(
            "    {} etcd at the end: {} keys under subnets/, live leases {} (one per host, {} found as their agents wrote them), fake peers alive {}",
            if etcd_ok { "ok  " } else { "FAIL" },
            e.subnet_keys, self.hosts, e.own_leases, e.live_fakes
        ));

        let agents_ok = e.agents_alive == self.hosts
            && !self.errors.iter().any(|x| x.contains("exited on its own"));
        pass &= agents_ok;
        lines.push(format!(
            "    {} agents: {}/{} running at the end, {} restarts by the harness, none exited on its own",
            if agents_ok { "ok  " } else { "FAIL" },
            e.agents_alive, self.hosts, self.restarts.len()
        ));

        let mut lost_in_flaps = 0;
        let mut lost_outside = Vec::new();
        for p in &self.pings {
            for &(seq, at) in &p.lost {
                let in_flap = self.flaps.iter().any(|&(h, s, e)| {
                    (h == p.from_host || h == p.to_host)
                        && at >= s - FLAP_BEFORE
                        && at <= e + FLAP_AFTER
                });
                if in_flap {
                    lost_in_flaps += 1;
                } else {
                    lost_outside.push((p.from_host, p.to_host, seq, at - self.started_unix));
                }
            }
        }
        let (sent, received): (u64, u64) = self.pings.iter().fold((0, 0), |(s, r), p| {
            (s + u64::from(p.sent), r + u64::from(p.received))
        });
        let pings_ok = lost_outside.is_empty();
        pass &= pings_ok;
        lines.push(format!(
            "    {} pings: {received}/{sent} answered; {lost_in_flaps} lost during {} docker0 flaps, {} lost outside them{}",
            if pings_ok { "ok  " } else { "FAIL" },
            self.flaps.len(),
            lost_outside.len(),
            if lost_outside.is_empty() {
                String::new()
            } else {
                format!(
                    " (host->host icmp_seq at s: {})",
                    lost_outside
                        .iter()
                        .take(20)
                        .map(|(f, t, q, at)| format!("{}->{} #{q} @{at:.1}", f + 1, t + 1))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ));

        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let minutes = ((last.t - first.t) / 60.0).max(1.0 / 60.0);
            lines.push(format!(
                "    info etcd revision {} -> {} ({:.0}/min, {} fake peers joined), db {} -> {} bytes",
                first.etcd.revision,
                last.etcd.revision,
                (last.etcd.revision - first.etcd.revision) as f64 / minutes,
                self.fakes_joined,
                first.etcd.db_bytes,
                last.etcd.db_bytes
            ));
        }
        if !self.errors.is_empty() {
            lines.push(format!(
                "    info {} harness errors (first: {})",
                self.errors.len(),
                self.errors[0]
            ));
        }
        lines.push(format!(
            "==> soak {}",
            if pass { "PASSED" } else { "FAILED" }
        ));
        Verdict {
            pass,
            text: lines.join("\n"),
            lost_in_flaps,
            lost_outside_flaps: lost_outside,
            flat,
        }
    }

    pub fn to_json(&self, v: &Verdict) -> serde_json::Value {
        serde_json::json!({
            "hosts": self.hosts,
            "datapath": self.datapath,
            "minutes": self.total() / 60.0,
            "schedule_s": {
                "sample": self.schedule.sample.as_secs_f64(),
                "compact": self.schedule.compact.as_secs_f64(),
                "restart_per_host": self.schedule.restart.as_secs_f64(),
                "flap": self.schedule.flap.as_secs_f64(),
                "drain": self.schedule.drain.as_secs_f64(),
            },
            "started_unix": self.started_unix,
            "verdict": {
                "pass": v.pass,
                "text": v.text,
                "flat": v.flat,
                "lost_in_flaps": v.lost_in_flaps,
                "lost_outside_flaps": v.lost_outside_flaps,
            },
            "end": self.end,
            "pings": self.pings,
            "flaps": self.flaps,
            "restarts": self.restarts,
            "fakes_joined": self.fakes_joined,
            "errors": self.errors,
            "samples": self.samples,
        })
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(30, 100, 200),
    RGBColor(225, 130, 20),
    RGBColor(40, 160, 60),
    RGBColor(200, 40, 40),
    RGBColor(130, 80, 180),
    RGBColor(110, 110, 110),
];

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("draw the soak chart: {e}")
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
/// One named line of (minutes, value) points.
type Line = (String, Vec<(f64, f64)>);

/// report.svg: one panel per series over time (minutes), a line per host.
pub fn draw(path: &Path, r: &Report) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1800, 1050)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (head, body) = root.split_vertically(50);
    head.draw(&Text::new(
        format!(
            "weft soak: {} hosts, --datapath {}, {:.0} min ({} docker0 flaps: grey marks; {} agent restarts: red marks; {} fake peers)",
            r.hosts,
            r.datapath,
            r.total() / 60.0,
            r.flaps.len(),
            r.restarts.len(),
            r.fakes_joined
        ),
        (20, 15),
        ("sans-serif", 22).into_font().style(FontStyle::Bold),
    ))
    .map_err(plot_err)?;
    let minute = |unix: f64| (unix - r.started_unix) / 60.0;
    let marks: Vec<(f64, RGBColor)> = r
        .restarts
        .iter()
        .map(|&(_, at, _)| (minute(at), RESTART_MARK))
        .chain(r.flaps.iter().map(|&(_, at, _)| (minute(at), FLAP_MARK)))
        .collect();
    let panels = body.split_evenly((3, 3));
    for (panel, s) in panels.iter().zip(HOST_SERIES.iter()) {
        let lines: Vec<Line> = (0..r.hosts)
            .map(|h| {
                let pts = r
                    .samples
                    .iter()
                    .filter_map(|x| {
                        x.hosts
                            .get(h)
                            .and_then(|hs| (s.get)(hs))
                            .map(|v| (x.t / 60.0, v as f64))
                    })
                    .collect();
                (format!("host{}", h + 1), pts)
            })
            .collect();
        draw_panel(panel, s.label, r.total() / 60.0, &lines, &marks)?;
    }
    let etcd = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        r.samples.iter().map(|x| (x.t / 60.0, f(x))).collect()
    };
    let etcd_panels: [(&str, Vec<Line>); 3] = [
        (
            "etcd keys under subnets/",
            vec![
                ("in etcd".into(), etcd(|x| x.etcd.subnet_keys as f64)),
                (
                    "live leases (hosts + fake peers)".into(),
                    etcd(|x| (x.live_fakes + x.hosts.len()) as f64),
                ),
            ],
        ),
        (
            "etcd revision",
            vec![("revision".into(), etcd(|x| x.etcd.revision as f64))],
        ),
        (
            "etcd db size (bytes)",
            vec![("db".into(), etcd(|x| x.etcd.db_bytes as f64))],
        ),
    ];
    for (panel, (label, lines)) in panels
        .iter()
        .skip(HOST_SERIES.len())
        .zip(etcd_panels.iter())
    {
        draw_panel(panel, label, r.total() / 60.0, lines, &marks)?;
    }
    root.present()
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// Vertical marks: agent restarts (red) and docker0 flaps (grey), in minutes.
const RESTART_MARK: RGBColor = RGBColor(230, 150, 150);
const FLAP_MARK: RGBColor = RGBColor(180, 180, 180);

fn draw_panel(
    area: &Area<'_>,
    label: &str,
    minutes: f64,
    lines: &[Line],
    marks: &[(f64, RGBColor)],
) -> anyhow::Result<()> {
    let top = lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(label, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..minutes.max(0.1), 0.0..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("minutes")
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(
            marks
                .iter()
                .map(|&(x, color)| PathElement::new(vec![(x, 0.0), (x, top)], color)),
        )
        .map_err(plot_err)?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn host(rss: u64) -> HostSample {
        HostSample {
            pid: Some(1),
            rss_kib: Some(rss),
            fds: Some(20),
            pinned: Some(10),
            forwarding_entries: Some(50),
            iptables_rules: Some(3),
            nft_rules: Some(4),
        }
    }

    /// A 30-minute report sampled every 10 s, RSS given by `rss(t)`, one flap of host 1 at 300 s.
    fn report(rss: fn(f64) -> u64, lost: Vec<(u32, f64)>) -> Report {
        let samples = (0..=180)
            .map(|k| {
                let t = k as f64 * 10.0;
                Sample {
                    t,
                    hosts: vec![host(rss(t)), host(rss(t))],
                    etcd: EtcdSample {
                        keys: 3,
                        subnet_keys: 2,
                        revision: 10 + k,
                        db_bytes: 20480,
                    },
                    live_fakes: 0,
                }
            })
            .collect();
        Report {
            hosts: 2,
            datapath: "ebpf".into(),
            schedule: super::super::Schedule::new(30),
            started_unix: 1000.0,
            samples,
            pings: vec![PingStream {
                from_host: 0,
                to_host: 1,
                sent: 18000,
                received: 18000 - lost.len() as u32,
                lost,
            }],
            flaps: vec![(0, 1300.0, 1303.0)],
            restarts: vec![],
            fakes_joined: 1450,
            end: EndState {
                subnet_keys: 2,
                live_fakes: 0,
                own_leases: 2,
                agents_alive: 2,
            },
            errors: vec![],
        }
    }

    #[test]
    fn flat_series_and_flap_losses_pass() {
        let r = report(
            |t| 20000 + (t as u64 % 7) * 10,
            vec![(3001, 1301.0), (3002, 1305.5)],
        );
        let v = r.verdict();
        assert!(v.pass, "{}", v.text);
        assert_eq!(v.lost_in_flaps, 2);
        assert_eq!(r.schedule.drain, Duration::from_secs(50));
    }

    #[test]
    fn growth_after_the_tenth_minute_fails() {
        // 10 % more RSS over the last 10 minutes than at the 10th.
        let r = report(|t| if t > 1300.0 { 22000 } else { 20000 }, vec![]);
        let v = r.verdict();
        assert!(!v.pass);
        assert!(v.text.contains("FAIL rss_kib"), "{}", v.text);
    }

    #[test]
    fn a_loss_outside_the_flaps_fails() {
        let r = report(|_| 20000, vec![(7, 1200.0)]);
        let v = r.verdict();
        assert!(!v.pass);
        assert_eq!(v.lost_outside_flaps, vec![(0, 1, 7, 200.0)]);
    }

    #[test]
    fn the_chart_has_a_panel_per_series() {
        let path = std::env::temp_dir().join(format!("weft-soak-chart-{}.svg", std::process::id()));
        draw(&path, &report(|_| 20000, vec![])).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for s in &HOST_SERIES {
            assert!(svg.contains(s.label), "no panel {}", s.label);
        }
        assert!(svg.contains("etcd revision") && svg.contains("<polyline"));
    }

    #[test]
    fn a_leftover_key_fails() {
        let mut r = report(|_| 20000, vec![]);
        r.end.subnet_keys = 3;
        assert!(!r.verdict().pass);
    }
}
