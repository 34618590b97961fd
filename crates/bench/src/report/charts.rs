//! The SVG charts, drawn with `plotters`.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{f, thousands};

/// The end-to-end goal of issue 11, drawn on the latency chart.
const GOAL_MS: f64 = 250.0;

type Chart<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

const SERIES: [RGBColor; 6] = [
    RGBColor(5, 80, 174),
    RGBColor(207, 34, 46),
    RGBColor(17, 99, 41),
    RGBColor(125, 78, 0),
    RGBColor(130, 80, 223),
    RGBColor(27, 124, 131),
];

/// End-to-end latency percentiles against the submitted rate.
pub fn latency_chart(path: &Path, rows: &[Value]) -> anyhow::Result<()> {
    let root: Chart = SVGBackend::new(path, (720, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max_rate = rows.iter().map(|r| f(r, "rate")).fold(0.0, f64::max) * 1.1;
    let max_ms = rows.iter().map(|r| f(r, "p99")).fold(GOAL_MS, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "End to end: writer commit to batch acknowledged",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_rate, (1.0..max_ms).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("submitted items/s (batches of 100)")
        .y_desc("latency ms (log)")
        .x_label_formatter(&|x| thousands(*x))
        .y_label_formatter(&|y| thousands(*y))
        .draw()
        .map_err(plot_err)?;
    let goal = RGBColor(110, 119, 129);
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, GOAL_MS), (max_rate, GOAL_MS)],
            goal.stroke_width(1),
        ))
        .map_err(plot_err)?
        .label("goal: p95 under 250 ms at 1,000 items/s")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], goal.stroke_width(1)));
    for (i, (key, name)) in [("p50", "p50"), ("p95", "p95"), ("p99", "p99")]
        .into_iter()
        .enumerate()
    {
        let color = SERIES[i];
        let points: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (f(r, "rate"), f(r, key).max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Grouped bars: per configuration, the relay beside its two ceilings.
pub fn relay_chart(path: &Path, title: &str, rows: &[(String, &Value)]) -> anyhow::Result<()> {
    let root: Chart = SVGBackend::new(path, (720, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let bars = [
        ("relay", "relay_items_s"),
        ("raw publish (ceiling)", "publish_ceiling"),
        ("raw marking (ceiling)", "mark_ceiling"),
        ("fenced transactional marking", "fenced_marking"),
    ];
    let top = rows
        .iter()
        .flat_map(|(_, r)| bars.iter().map(|(_, k)| f(r, k)))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..rows.len() as f64, (100.0..top * 8.0).log_scale())
        .map_err(plot_err)?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("items/s (log)")
        .y_label_formatter(&|y| thousands(*y))
        .draw()
        .map_err(plot_err)?;
    for (b, (name, key)) in bars.iter().enumerate() {
        let color = SERIES[b];
        let width = 0.8 / bars.len() as f64;
        chart
            .draw_series(
                rows.iter()
                    .enumerate()
                    .filter(|(_, (_, r))| f(r, key).is_finite())
                    .map(|(i, (_, r))| {
                        let x0 = i as f64 + 0.1 + b as f64 * width;
                        Rectangle::new([(x0, 100.0), (x0 + width * 0.9, f(r, key))], color.filled())
                    }),
            )
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Drain rate against the added round trip (both sides delayed), one line
/// per batch size and ordering key mode.
pub fn rtt_chart(path: &Path, rows: &[Value]) -> anyhow::Result<()> {
    let root: Chart = SVGBackend::new(path, (720, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let both: Vec<&Value> = rows.iter().filter(|r| r["side"] == "both").collect();
    let max_rtt = both.iter().map(|r| f(r, "rtt_ms")).fold(1.0, f64::max);
    let top = both
        .iter()
        .map(|r| f(r, "items_s"))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Drain rate against round-trip time (MongoDB and Pub/Sub)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_rtt * 1.05, (10.0..top * 2.0).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("added round trip, ms")
        .y_desc("items/s (log)")
        .y_label_formatter(&|y| thousands(*y))
        .draw()
        .map_err(plot_err)?;
    let mut lines: Vec<(String, u64)> = Vec::new();
    for r in &both {
        let key = (
            r["mode"].as_str().unwrap_or("?").to_owned(),
            r["batch_size"].as_u64().unwrap_or(0),
        );
        if !lines.contains(&key) {
            lines.push(key);
        }
    }
    for (i, (mode, size)) in lines.iter().enumerate() {
        let color = SERIES[i % SERIES.len()];
        let width = if mode == "global" { 2 } else { 1 };
        let mut points: Vec<(f64, f64)> = both
            .iter()
            .filter(|r| r["mode"] == mode.as_str() && r["batch_size"] == *size)
            .map(|r| (f(r, "rtt_ms"), f(r, "items_s")))
            .filter(|(_, y)| y.is_finite())
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(width)))
            .map_err(plot_err)?
            .label(format!("{mode}, batches of {}", thousands(*size as f64)))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(width))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
