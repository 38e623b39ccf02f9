//! target/bench/report.svg: one panel per metric, a pair of bars per mode (underlay offloads on,
//! solid; off, light), whiskers from the smallest to the largest round.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use plotters::prelude::*;

use crate::bench::report::fmt_value;
use crate::bench::stats::{ModeSummary, METRICS};

const MODES: [(&str, RGBColor); 7] = [
    ("bare", RGBColor(40, 160, 90)),
    ("veth-floor", RGBColor(150, 200, 120)),
    ("host-gw", RGBColor(110, 110, 110)),
    ("kernel-vxlan", RGBColor(225, 130, 20)),
    ("ebpf", RGBColor(30, 100, 200)),
    ("ebpf-base", RGBColor(140, 80, 180)),
    ("ebpf-nocsum", RGBColor(120, 170, 230)),
];

/// One variant's medians, named ("offload", "no-offload").
pub struct Series<'a> {
    pub name: &'a str,
    pub modes: &'a BTreeMap<String, ModeSummary>,
}

pub fn draw(path: &Path, title: &str, series: &[Series<'_>]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let root = SVGBackend::new(path, (1600, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (head, body) = root.split_vertically(50);
    head.draw(&Text::new(
        title.to_owned(),
        (20, 15),
        ("sans-serif", 22).into_font().style(FontStyle::Bold),
    ))
    .map_err(plot_err)?;
    let panels = body.split_evenly((2, 5));
    for (panel, metric) in panels.iter().zip(METRICS.iter()) {
        draw_panel(panel, metric, series)?;
    }
    if let Some(legend) = panels.get(METRICS.len()) {
        draw_legend(legend, series)?;
    }
    root.present()
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    metric: &crate::bench::stats::Metric,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    let modes: Vec<(usize, &str, RGBColor)> = MODES
        .iter()
        .filter(|(m, _)| series.iter().any(|s| s.modes.contains_key(*m)))
        .enumerate()
        .map(|(i, (m, c))| (i, *m, *c))
        .collect();
    // Scaled to the medians: one stalled round (a p99 of milliseconds) must not flatten the bars;
    // whiskers beyond the top are clipped at it.
    let top = series
        .iter()
        .flat_map(|s| s.modes.values())
        .map(|summary| (metric.get)(&summary.medians()))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.5 } else { 1.0 };
    let better = if metric.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let n = modes.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{} ({better})", metric.label), ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(58)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)
        .map_err(plot_err)?;
    let names: Vec<&str> = modes.iter().map(|(_, m, _)| *m).collect();
    let x_label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).copied().unwrap_or("").to_owned()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(modes.len() * 2 + 1)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| fmt_value(*y))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    let k = series.len().max(1) as f64;
    let width = 0.7 / k;
    for (si, s) in series.iter().enumerate() {
        for (i, mode, color) in &modes {
            let Some(summary) = s.modes.get(*mode) else {
                continue;
            };
            let value = (metric.get)(&summary.medians());
            if !value.is_finite() {
                continue;
            }
            let x0 = *i as f64 - 0.35 + si as f64 * width;
            let (x1, xc) = (x0 + width * 0.92, x0 + width * 0.46);
            let fill = if si == 0 { *color } else { lighten(*color) };
            chart
                .draw_series([
                    Rectangle::new([(x0, 0.0), (x1, value)], fill.filled()),
                    Rectangle::new([(x0, 0.0), (x1, value)], color.stroke_width(1)),
                ])
                .map_err(plot_err)?;
            let (lo, hi) = summary.range(metric);
            if lo.is_finite() && hi > lo {
                chart
                    .draw_series([PathElement::new(vec![(xc, lo), (xc, hi.min(top))], BLACK)])
                    .map_err(plot_err)?;
            }
            // The ratio to bare of the same variant (medians), under the value.
            let vs_bare = s
                .modes
                .get("bare")
                .filter(|_| *mode != "bare")
                .map(|b| value / (metric.get)(&b.medians()))
                .filter(|r| r.is_finite())
                .map_or(String::new(), |r| format!(" ({r:.2}x)"));
            // Upright labels of five modes by two variants would run into each other: written
            // upwards from the bar's top, each stays within its bar's width.
            chart
                .draw_series([Text::new(
                    format!("{}{vs_bare}", fmt_value(value)),
                    (xc - width * 0.2, value + top * 0.015),
                    ("sans-serif", 11)
                        .into_font()
                        .transform(FontTransform::Rotate270),
                )])
                .map_err(plot_err)?;
        }
    }
    Ok(())
}

fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    let font = ("sans-serif", 15).into_font();
    let mut y = 30;
    for (mode, color) in MODES {
        area.draw(&Rectangle::new([(20, y), (44, y + 16)], color.filled()))
            .map_err(plot_err)?;
        area.draw(&Text::new(mode, (54, y), font.clone()))
            .map_err(plot_err)?;
        y += 26;
    }
    y += 10;
    for (i, s) in series.iter().enumerate() {
        let what = match (i, s.name) {
            (_, "no-offload") => "light bars: TSO/GSO off on the underlay",
            _ => "solid bars: underlay offloads on (veth defaults)",
        };
        area.draw(&Text::new(what, (20, y), font.clone()))
            .map_err(plot_err)?;
        y += 24;
    }
    for line in [
        "bar = median over rounds; whisker = min..max (clipped)",
        "label: median (its ratio to bare, same underlay)",
        "2 hosts in netns, 1 container each, MTU 1450",
    ] {
        area.draw(&Text::new(line, (20, y), font.clone()))
            .map_err(plot_err)?;
        y += 24;
    }
    Ok(())
}

fn lighten(c: RGBColor) -> RGBColor {
    let mix = |v: u8| ((u16::from(v) + 2 * 255) / 3) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("draw the chart: {e:?}")
}
