//! `outbox-bench report`: the recorded results (`BENCH_RESULTS`) as
//! Markdown tables, written into docs/BENCHMARKS.md between
//! `<!-- bench:PART -->` and `<!-- /bench:PART -->`, and as SVG charts.

mod charts;
mod tables;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
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

pub(crate) fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

pub(crate) fn thousands(x: f64) -> String {
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

pub(crate) fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".to_owned()
    }
}

pub(crate) fn mib(v: &Value, key: &str) -> String {
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
    let streams = latest(&records, "streams", |r| {
        format!("{}-{}", r["streams"], r["relays"])
    });
    let streams_writer = latest(&records, "streams-writer", |r| {
        format!("{}-{}", r["streams"], r["clients"])
    });
    let streams_model = latest(&records, "streams-model", |r| {
        format!("{}-{}", r["streams"], r["clients"])
    });
    let rtt = latest(&records, "rtt", |r| {
        format!(
            "{}-{}-{}-{}",
            r["side"], r["rtt_ms"], r["mode"], r["batch_size"]
        )
    });
    let rtt_writer = latest(&records, "rtt-writer", |r| r["rtt_ms"].to_string());
    let seed = latest(&records, "seed", |r| r["rtt_ms"].to_string());
    let budget = latest(&records, "budget", |r| {
        format!("{}-{}", r["mode"], r["batch_size"])
    });
    let budget_writer = latest(&records, "budget-writer", |r| r["batch"].to_string());
    let big_batch = latest(&records, "big-batch", |r| {
        format!("{}-{}-{}", r["store"], r["design"], r["items"])
    });

    let mut doc = std::fs::read_to_string(&args.doc)
        .with_context(|| format!("reading {}", args.doc.display()))?;
    for (name, rows, table) in [
        (
            "writer",
            &writer,
            tables::writer_table as fn(&[Value]) -> String,
        ),
        ("relay", &relay, tables::relay_table),
        ("relay-profile", &relay, tables::relay_profile_table),
        ("latency", &latency, tables::latency_table),
        ("conflicts", &conflicts, tables::conflicts_table),
        ("streams", &streams, tables::streams_table),
        ("big-batch", &big_batch, tables::big_batch_table),
        ("rtt", &rtt, tables::rtt_table),
        ("rtt-writer", &rtt_writer, tables::rtt_writer_table),
        ("seed", &seed, tables::seed_table),
    ] {
        if !rows.is_empty() {
            doc = splice(&doc, name, &table(rows))?;
            println!("{}", table(rows));
        }
    }
    if !budget.is_empty() {
        let table = tables::budget_table(&budget, &budget_writer);
        doc = splice(&doc, "budget", &table)?;
        println!("{table}");
    }
    if !streams_writer.is_empty() {
        let table = tables::streams_writer_table(&streams_writer, &streams_model);
        doc = splice(&doc, "streams-writer", &table)?;
        println!("{table}");
    }
    std::fs::write(&args.doc, doc)?;

    std::fs::create_dir_all(&args.charts)?;
    if !latency.is_empty() {
        charts::latency_chart(&args.charts.join("bench-latency.svg"), &latency)?;
    }
    if !rtt.is_empty() {
        charts::rtt_chart(&args.charts.join("bench-rtt.svg"), &rtt)?;
    }
    let per_mode: Vec<(String, &Value)> = relay
        .iter()
        .filter(|r| f(r, "items") == 100_000.0)
        .map(|r| (r["ordering"].as_str().unwrap_or("?").to_owned(), r))
        .collect();
    if !per_mode.is_empty() {
        charts::relay_chart(
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
        charts::relay_chart(
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
