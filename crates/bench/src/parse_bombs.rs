//! `outbox-bench parse-bombs`: the writer's peak memory and CPU time under
//! bodies built to make a parser work hard (issue 24, point 4): a CSV header
//! of millions of unique names, a CSV of empty cells, JSON of many small
//! values, more items than a batch may hold, a body sent slowly, and large
//! bodies in parallel. Each case gets a fresh writer, so its peak resident
//! memory (`VmHWM`) is the case's own; CPU is the writer's user + system
//! time from `/proc`. Run it against two builds (`--bin-dir`) to compare.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use tokio::time::Instant;

use crate::Env;
use crate::process::{peak_rss_mib, writer_with};

#[derive(Args, Debug)]
pub struct ParseBombArgs {
    #[command(flatten)]
    env: Env,
    /// How long one case may take before it is reported as unanswered.
    #[arg(long, default_value_t = 60)]
    case_timeout_seconds: u64,
    /// The cases to run (all by default): csv-header, csv-cells,
    /// json-values, json-items, slow-body, parallel.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
}

const MAX_BODY: usize = 32 * 1024 * 1024;

/// A body and how it is sent.
struct Case {
    name: &'static str,
    what: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// Copies sent at once.
    parallel: usize,
    /// Bytes per second, when the body is trickled.
    trickle: Option<usize>,
}

fn csv_header() -> Vec<u8> {
    let mut body = Vec::with_capacity(MAX_BODY);
    let mut n = 0u64;
    while body.len() + 16 < MAX_BODY - 8 {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!("{n:x}").as_bytes());
        n += 1;
    }
    body.extend_from_slice(b"\n1\n");
    body
}

fn csv_cells() -> Vec<u8> {
    let columns = 300;
    let header: Vec<String> = (0..columns).map(|c| format!("c{c}")).collect();
    let mut body = header.join(",").into_bytes();
    body.push(b'\n');
    let row = format!("{}\n", ",".repeat(columns - 1));
    while body.len() + row.len() <= MAX_BODY - 1024 {
        body.extend_from_slice(row.as_bytes());
    }
    body
}

/// 10,001 items (one past the default limit) of 1,600 zeros each.
fn json_values() -> Vec<u8> {
    let item = format!("{{\"n\":[{}0]}}", "0,".repeat(1_599));
    let items = vec![item; 10_001];
    format!("[{}]", items.join(",")).into_bytes()
}

/// Empty objects to the body limit: over a thousand times the item limit.
fn json_items() -> Vec<u8> {
    let mut body = Vec::with_capacity(MAX_BODY);
    body.push(b'[');
    while body.len() + 4 < MAX_BODY {
        body.extend_from_slice(b"{},");
    }
    body.extend_from_slice(b"{}]");
    body
}

/// 6,000 items of 330 zeros: about 4 MB, 2 million values, each.
fn json_medium() -> Vec<u8> {
    let item = format!("{{\"n\":[{}0]}}", "0,".repeat(329));
    format!("[{}]", vec![item; 6_000].join(",")).into_bytes()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "csv-header",
            what: "32 MiB CSV header of unique names, one row",
            content_type: "text/csv",
            body: csv_header(),
            parallel: 1,
            trickle: None,
        },
        Case {
            name: "csv-cells",
            what: "32 MiB CSV: 300 empty columns x 110k rows",
            content_type: "text/csv",
            body: csv_cells(),
            parallel: 1,
            trickle: None,
        },
        Case {
            name: "json-values",
            what: "32 MiB JSON: 10,001 items of 1,600 zeros",
            content_type: "application/json",
            body: json_values(),
            parallel: 1,
            trickle: None,
        },
        Case {
            name: "json-items",
            what: "32 MiB JSON: 11 million empty objects",
            content_type: "application/json",
            body: json_items(),
            parallel: 1,
            trickle: None,
        },
        Case {
            name: "slow-body",
            what: "1 MiB body sent at 1 KiB/s",
            content_type: "application/json",
            body: vec![b' '; 1 << 20],
            parallel: 1,
            trickle: Some(1024),
        },
        Case {
            name: "parallel",
            what: "4 x 4 MB JSON of 2 million zeros at once",
            content_type: "application/json",
            body: json_medium(),
            parallel: 4,
            trickle: None,
        },
    ]
}

/// The writer's CPU time so far (user + system), from `/proc/PID/stat`.
fn cpu_seconds(child: &Child) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()?)).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Sends `case.body` over a plain connection (so that it can be trickled)
/// and returns the status line's code, or why there was none.
async fn send(addr: &str, case: &Case, limit: Duration) -> String {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST /api/v1/batch/process HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            case.content_type,
            case.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        match case.trickle {
            None => stream.write_all(&case.body).await?,
            Some(rate) => {
                for chunk in case.body.chunks(rate) {
                    if stream.write_all(chunk).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        let text = String::from_utf8_lossy(&answer);
        let status = text.split_whitespace().nth(1).unwrap_or("?").to_owned();
        let code = text
            .split("\"code\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("")
            .to_owned();
        Ok::<_, std::io::Error>(format!("{status} {code}"))
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => format!("connection: {error}"),
        Err(_) => format!("no answer in {} s", limit.as_secs()),
    }
}

pub async fn run(args: ParseBombArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let limit = Duration::from_secs(args.case_timeout_seconds);
    println!(
        "writer: {} (body limit 32 MiB; defaults otherwise, BODY_READ_TIMEOUT_SECONDS=10)",
        args.env.bin_dir.join("outbox-writer").display()
    );
    println!(
        "{:<12} {:<44} {:<30} {:>9} {:>10} {:>10}",
        "case", "body", "answer", "seconds", "CPU s", "peak RSS"
    );
    for case in cases() {
        if !args.cases.is_empty() && !args.cases.iter().any(|c| c == case.name) {
            continue;
        }
        let database = format!(
            "bench_bombs_{}_{}",
            case.name.replace('-', "_"),
            std::process::id()
        );
        let (child, url) = writer_with(
            &args.env,
            &database,
            &http,
            &[("BODY_READ_TIMEOUT_SECONDS", "10".to_owned())],
        )
        .await
        .context("starting the writer")?;
        let addr = url.trim_start_matches("http://").to_owned();
        let cpu_before = cpu_seconds(&child).unwrap_or(0.0);
        let started = Instant::now();
        let case = std::sync::Arc::new(case);
        let sends: Vec<_> = (0..case.parallel)
            .map(|_| {
                let case = std::sync::Arc::clone(&case);
                let addr = addr.clone();
                tokio::spawn(async move { send(&addr, &case, limit).await })
            })
            .collect();
        let mut answers = Vec::new();
        for send in sends {
            answers.push(send.await?);
        }
        answers.dedup();
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(&child).map(|c| c - cpu_before);
        let rss = peak_rss_mib(&child);
        println!(
            "{:<12} {:<44} {:<30} {:>9.1} {:>10} {:>10}",
            case.name,
            case.what,
            answers.join(" / "),
            elapsed,
            cpu.map_or_else(|| "n/a".to_owned(), |c| format!("{c:.1}")),
            rss.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.0} MiB")),
        );
        drop(child);
    }
    Ok(())
}
