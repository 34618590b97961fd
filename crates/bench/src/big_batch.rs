//! `outbox-bench big-batch`: a batch at the writer's limits (10,000 items,
//! about 30 MiB) stored while four clients submit small batches, in three
//! designs:
//!
//! - `one transaction`: the batch, its items and the sequence in one
//!   transaction, all within the request deadline (before the change);
//! - `one transaction, deadline bounds waiting`: the same transaction given
//!   as long as its work takes (only waiting is bounded);
//! - `staged`: the items stored before the transaction, a chunk at a time,
//!   then a short transaction that takes the sequence (what the writer does).
//!
//! On the in-memory model of MongoDB's transactions (virtual time, the
//! conflicts MongoDB would raise) for the three, and with the real writer on
//! the test MongoDB for the first and the last.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::memory::{CounterStep, MemoryStore, TransactionModel};
use outbox_core::model::{BatchId, NewBatch};
use outbox_core::store::BatchStore;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::Env;
use crate::stats::Percentiles;

#[derive(Args)]
pub struct BigBatchArgs {
    #[command(flatten)]
    env: Env,
    /// Items of the big batch.
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// Bytes of JSON per item of the big batch (10,000 x 3,000: about 30 MiB).
    #[arg(long, default_value_t = 3_000)]
    item_bytes: usize,
    /// Clients submitting small batches meanwhile.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Items per small batch.
    #[arg(long, default_value_t = 10)]
    small: usize,
    /// Skip the part with the real writer (the model needs no services).
    #[arg(long)]
    model_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Design {
    OneTransaction,
    WaitingOnly,
    Staged,
}

impl Design {
    fn name(self) -> &'static str {
        match self {
            Self::OneTransaction => "one transaction",
            Self::WaitingOnly => "one transaction, deadline bounds waiting",
            Self::Staged => "staged",
        }
    }
}

/// What one run measured.
struct Outcome {
    big_stored: bool,
    big_seconds: f64,
    small_stored: usize,
    small_failed: usize,
    small: Percentiles,
}

fn sample_batch(items: usize, item_bytes: usize) -> NewBatch {
    let values: Vec<Value> = (0..items)
        .map(|i| json!({"request_id": format!("big-{i}"), "vendor_name": "acme", "blob": "x".repeat(item_bytes.saturating_sub(60))}))
        .collect();
    build_batch(values, &IngestRules::default(), None, chrono::Utc::now())
        .unwrap_or_else(|e| panic!("the sample batch is valid: {e:?}"))
}

/// The model: statement 1 ms, `per_item_us` per item inserted, deadline 2 s.
fn model_run(design: Design, per_item_us: u64, args: &BigBatchArgs) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("a runtime: {e}"));
    let big = sample_batch(args.items, 10);
    let small = sample_batch(args.small, 10);
    let clients = args.clients;
    runtime.block_on(async move {
        let store = MemoryStore::with_model(TransactionModel {
            counter: CounterStep::First,
            statement: Duration::from_millis(1),
            per_item: Duration::from_micros(per_item_us),
            staged_above_items: (design == Design::Staged).then_some(1000),
        });
        let deadline = Duration::from_secs(2);
        let started = Instant::now();
        let big_deadline = match design {
            // Waiting is bounded, the work is not: as long as the work takes.
            Design::WaitingOnly => {
                started + deadline + Duration::from_micros(per_item_us) * args.items as u32
            }
            _ => started + deadline,
        };
        let done = Arc::new(AtomicBool::new(false));
        let big_task = {
            let (store, done) = (store.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let result = store.insert_batch(&big, big_deadline).await;
                let took = started.elapsed();
                done.store(true, Ordering::SeqCst);
                (result.is_ok(), took)
            })
        };
        let small_tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (store, done, small) = (store.clone(), Arc::clone(&done), small.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    // Small batches for as long as the big one takes, and a
                    // second more.
                    let mut after = None;
                    loop {
                        if done.load(Ordering::SeqCst) {
                            let end = *after
                                .get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                            if Instant::now() >= end {
                                return outcomes;
                            }
                        }
                        let mut next = small.clone();
                        next.batch_id = BatchId::random();
                        let at = Instant::now();
                        let ok = store.insert_batch(&next, at + deadline).await.is_ok();
                        outcomes.push((ok, at.elapsed()));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        let (big_stored, big_took) = big_task.await.unwrap_or((false, Duration::ZERO));
        let mut latencies = Vec::new();
        let (mut stored, mut failed) = (0, 0);
        for task in small_tasks {
            for (ok, latency) in task.await.unwrap_or_default() {
                if ok {
                    stored += 1;
                    latencies.push(latency);
                } else {
                    failed += 1;
                }
            }
        }
        Outcome {
            big_stored,
            big_seconds: big_took.as_secs_f64(),
            small_stored: stored,
            small_failed: failed,
            small: Percentiles::of(latencies),
        }
    })
}

/// The real writer on the test MongoDB: `STAGE_ABOVE_ITEMS` decides the design.
async fn writer_run(design: Design, args: &BigBatchArgs) -> anyhow::Result<(Outcome, f64)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let database = format!("bench_big_{}", uuid::Uuid::new_v4().simple());
    let stage = match design {
        Design::Staged => outbox_mongo::config::DEFAULT_STAGE_ABOVE_ITEMS.to_string(),
        _ => usize::MAX.to_string(),
    };
    let (mut writer, url) = crate::process::writer_with(
        &args.env,
        &database,
        &http,
        &[
            ("STAGE_ABOVE_ITEMS", stage.clone()),
            ("STAGE_ABOVE_BYTES", stage),
        ],
    )
    .await?;
    let big: Vec<Value> = (0..args.items)
        .map(|i| json!({"request_id": format!("big-{i}"), "vendor_name": "acme", "blob": "x".repeat(args.item_bytes.saturating_sub(60))}))
        .collect();
    let body = serde_json::to_vec(&big)?;
    let mib = body.len() as f64 / (1024.0 * 1024.0);
    let small = Arc::new(serde_json::to_vec(&crate::writer::sample_items(
        args.small, "s",
    ))?);
    let endpoint = format!("{url}/api/v1/batch/process");
    let done = Arc::new(AtomicBool::new(false));
    let small_tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let (http, endpoint, small, done) = (
                http.clone(),
                endpoint.clone(),
                Arc::clone(&small),
                Arc::clone(&done),
            );
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut after = None;
                loop {
                    if done.load(Ordering::SeqCst) {
                        let end =
                            *after.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                        if Instant::now() >= end {
                            return outcomes;
                        }
                    }
                    let at = Instant::now();
                    let response = http
                        .post(&endpoint)
                        .header("content-type", "application/json")
                        .body(small.as_ref().clone())
                        .send()
                        .await;
                    let ok = response.is_ok_and(|r| r.status() == 201);
                    outcomes.push((ok, at.elapsed()));
                }
            })
        })
        .collect();
    // The small batches are flowing before the big one starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let response = http
        .post(&endpoint)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let big_stored = response.status() == 201;
    let big_seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let mut latencies = Vec::new();
    let (mut stored, mut failed) = (0, 0);
    for task in small_tasks {
        for (ok, latency) in task.await.unwrap_or_default() {
            if ok {
                stored += 1;
                latencies.push(latency);
            } else {
                failed += 1;
            }
        }
    }
    let _ = writer.kill().await;
    Ok((
        Outcome {
            big_stored,
            big_seconds,
            small_stored: stored,
            small_failed: failed,
            small: Percentiles::of(latencies),
        },
        mib,
    ))
}

fn print_row(store: &str, design: Design, outcome: &Outcome) {
    println!(
        "| {store} | {} | {} in {:.2} s | {} | {} | {:.0} | {:.0} |",
        design.name(),
        if outcome.big_stored {
            "stored"
        } else {
            "refused (503)"
        },
        outcome.big_seconds,
        outcome.small_stored,
        outcome.small_failed,
        outcome.small.p50,
        outcome.small.p99,
    );
}

pub async fn run(args: BigBatchArgs) -> anyhow::Result<()> {
    println!(
        "a batch of {} items beside {} clients submitting {}-item batches (request deadline 2 s)",
        args.items, args.clients, args.small
    );
    println!();
    println!(
        "| store | design | big batch | small stored | small failed | small p50 ms | small p99 ms |"
    );
    println!("|---|---|---|---:|---:|---:|---:|");
    let args = Arc::new(args);
    for per_item_us in [100, 250] {
        for design in [Design::OneTransaction, Design::WaitingOnly, Design::Staged] {
            let run_args = Arc::clone(&args);
            let outcome =
                tokio::task::spawn_blocking(move || model_run(design, per_item_us, &run_args))
                    .await?;
            let store = format!("model, {per_item_us} us/item");
            crate::results::record(json!({
                "part": "big-batch", "store": store, "design": design.name(),
                "items": args.items, "big_stored": outcome.big_stored, "big_seconds": outcome.big_seconds,
                "small_stored": outcome.small_stored, "small_failed": outcome.small_failed,
                "small_p50_ms": outcome.small.p50, "small_p99_ms": outcome.small.p99,
            }));
            print_row(&store, design, &outcome);
        }
    }
    if args.model_only {
        return Ok(());
    }
    for design in [Design::OneTransaction, Design::Staged] {
        let (outcome, mib) = writer_run(design, &args).await?;
        let store = format!("writer on {}, {mib:.1} MiB", args.env.mongodb_flavor);
        crate::results::record(json!({
            "part": "big-batch", "store": store, "design": design.name(),
            "items": args.items, "mib": mib, "big_stored": outcome.big_stored, "big_seconds": outcome.big_seconds,
            "small_stored": outcome.small_stored, "small_failed": outcome.small_failed,
            "small_p50_ms": outcome.small.p50, "small_p99_ms": outcome.small.p99,
        }));
        print_row(&store, design, &outcome);
    }
    Ok(())
}
