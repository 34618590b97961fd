//! `outbox-bench report`: the recorded results (`BENCH_RESULTS`) as
//! Markdown tables, written into docs/BENCHMARKS.md between
//! `<!-- bench:PART -->` and `<!-- /bench:PART -->`, and as SVG charts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Args)]
pub struct ReportArgs {
    /// The results, one JSON object a line.
    #[arg(long, env = "BENCH_RESULTS")]
    results: PathBuf,
    /// The Markdown document whose marked sections are replaced.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    doc: PathBuf,
    /// Where the SVG charts go.
    #[arg(long, default_value = "docs/images")]
    charts: PathBuf,
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".to_owned();
    }
    let n = x.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".to_owned()
    }
}

fn mib(v: &Value, key: &str) -> String {
    v[key]
        .as_f64()
        .map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0} MiB"))
}

/// The last record of each configuration, in first-seen order.
fn latest(records: &[Value], part: &str, key: impl Fn(&Value) -> String) -> Vec<Value> {
    let mut order = Vec::new();
    let mut by_key: BTreeMap<String, Value> = BTreeMap::new();
    for r in records.iter().filter(|r| r["part"] == part) {
        let k = key(r);
        if !by_key.contains_key(&k) {
            order.push(k.clone());
        }
        by_key.insert(k, r.clone());
    }
    order
        .into_iter()
        .filter_map(|k| by_key.remove(&k))
        .collect()
}

fn writer_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| items/batch | clients | batches | writer items/s | p50 ms | p95 ms | p99 ms | raw items/s | raw p50 | raw p95 | writer/raw | writer peak RSS |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.2} | {} |\n",
            thousands(f(r, "items")),
            r["clients"],
            r["batches"],
            thousands(f(r, "writer_items_s")),
            f(r, "p50"),
            f(r, "p95"),
            f(r, "p99"),
            thousands(f(r, "raw_items_s")),
            f(r, "raw_p50"),
            f(r, "raw_p95"),
            f(r, "writer_items_s") / f(r, "raw_items_s"),
            mib(r, "writer_rss_mib"),
        );
    }
    t
}

fn relay_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| backlog items | batch size | ordering key | raw publish items/s | raw marking items/s | relay items/s | relay/min(ceilings) | fenced marking items/s | relay/fenced marking | relay peak RSS |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | `{}` | {} | {} | {} | {:.2} | {} | {} | {} |\n",
            thousands(f(r, "items")),
            thousands(f(r, "batch_size")),
            r["ordering"].as_str().unwrap_or("?"),
            thousands(f(r, "publish_ceiling")),
            thousands(f(r, "mark_ceiling")),
            thousands(f(r, "relay_items_s")),
            f(r, "relay_items_s") / f(r, "publish_ceiling").min(f(r, "mark_ceiling")),
            thousands(f(r, "fenced_marking")),
            ratio(f(r, "relay_items_s") / f(r, "fenced_marking")),
            mib(r, "relay_rss_mib"),
        );
    }
    t
}

fn latency_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| rate items/s | batches | wake-up | p50 ms | p95 ms | p99 ms | writer peak RSS | relay peak RSS |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            thousands(f(r, "rate")),
            r["batches"],
            r["wake"].as_str().unwrap_or("?"),
            thousands(f(r, "p50")),
            thousands(f(r, "p95")),
            thousands(f(r, "p99")),
            mib(r, "writer_rss_mib"),
            mib(r, "relay_rss_mib"),
        );
    }
    t
}

fn conflicts_table(rows: &[Value]) -> String {
    let mut t = String::from(
        "| items/batch | writers | counter incremented | conflicts per stored batch | item writes lost per stored batch | batches/s (model) |\n\
         |---:|---:|---|---:|---:|---:|\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} | {} | {:.2} | {} | {} |\n",
            thousands(f(r, "items")),
            r["writers"],
            r["counter"].as_str().unwrap_or("?"),
            f(r, "conflicts_per_batch"),
            thousands(f(r, "lost_per_batch")),
            thousands(f(r, "batches_s")),
        );
    }
    t
}

/// Replaces the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`.
fn splice(doc: &str, name: &str, body: &str) -> anyhow::Result<String> {
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let start = doc
        .find(&open)
        .with_context(|| format!("no {open} in the document"))?
        + open.len();
    let end = doc[start..]
        .find(&close)
        .with_context(|| format!("no {close} after {open}"))?
        + start;
    Ok(format!("{}\n{body}{}", &doc[..start], &doc[end..]))
}

/// The end-to-end goal of issue 11, drawn on the latency chart.
const GOAL_MS: f64 = 250.0;

type Chart<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e}")
}

const SERIES: [RGBColor; 4] = [
    RGBColor(5, 80, 174),
    RGBColor(207, 34, 46),
    RGBColor(17, 99, 41),
    RGBColor(125, 78, 0),
];

/// End-to-end latency percentiles against the submitted rate.
fn latency_chart(path: &Path, rows: &[Value]) -> anyhow::Result<()> {
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
fn relay_chart(path: &Path, title: &str, rows: &[(String, &Value)]) -> anyhow::Result<()> {
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

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("reading {}", args.results.display()))?;
    let records: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let writer = latest(&records, "writer", |r| {
        format!("{}-{}", r["items"], r["clients"])
    });
    let relay = latest(&records, "relay", |r| {
        format!("{}-{}", r["items"], r["ordering"])
    });
    let latency = latest(&records, "latency", |r| r["rate"].to_string());
    let conflicts = latest(&records, "conflicts", |r| {
        format!("{}-{}-{}", r["items"], r["writers"], r["counter"])
    });

    let mut doc = std::fs::read_to_string(&args.doc)
        .with_context(|| format!("reading {}", args.doc.display()))?;
    for (name, rows, table) in [
        ("writer", &writer, writer_table as fn(&[Value]) -> String),
        ("relay", &relay, relay_table),
        ("latency", &latency, latency_table),
        ("conflicts", &conflicts, conflicts_table),
    ] {
        if !rows.is_empty() {
            doc = splice(&doc, name, &table(rows))?;
            println!("{}", table(rows));
        }
    }
    std::fs::write(&args.doc, doc)?;

    std::fs::create_dir_all(&args.charts)?;
    if !latency.is_empty() {
        latency_chart(&args.charts.join("bench-latency.svg"), &latency)?;
    }
    let per_mode: Vec<(String, &Value)> = relay
        .iter()
        .filter(|r| f(r, "items") == 100_000.0)
        .map(|r| (r["ordering"].as_str().unwrap_or("?").to_owned(), r))
        .collect();
    if !per_mode.is_empty() {
        relay_chart(
            &args.charts.join("bench-relay-modes.svg"),
            "Relay drain per ordering key (100,000 items)",
            &per_mode,
        )?;
    }
    let mut backlog: Vec<&Value> = relay.iter().filter(|r| r["ordering"] == "global").collect();
    backlog.sort_by(|a, b| f(a, "items").total_cmp(&f(b, "items")));
    let backlog: Vec<(String, &Value)> = backlog
        .into_iter()
        .map(|r| (format!("{} items", thousands(f(r, "items"))), r))
        .collect();
    if backlog.len() > 1 {
        relay_chart(
            &args.charts.join("bench-relay-backlog.svg"),
            "Relay drain against the backlog (ordering key global)",
            &backlog,
        )?;
    }
    println!(
        "tables written into {}, charts into {}",
        args.doc.display(),
        args.charts.display()
    );
    Ok(())
}
