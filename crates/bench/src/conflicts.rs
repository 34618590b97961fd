//! `outbox-bench conflicts`: where an ingest transaction should take the
//! sequence, measured on the in-memory model of MongoDB's transactions
//! (`outbox_core::memory::TransactionModel`) in virtual time: conflicts and
//! lost item writes per stored batch, and batches per second, with the
//! counter incremented first or after the items.

use std::time::Duration;

use clap::Args;
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::memory::{CounterStep, MemoryStore, TransactionModel};
use outbox_core::model::NewBatch;
use outbox_core::store::BatchStore;

#[derive(Args, Debug)]
pub struct ConflictArgs {
    /// Concurrent writers (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    writers: Vec<usize>,
    /// Items per batch (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    items: Vec<usize>,
    /// Batches each writer stores.
    #[arg(long, default_value_t = 50)]
    batches: usize,
    /// One statement's round trip, in microseconds.
    #[arg(long, default_value_t = 1000)]
    statement_us: u64,
    /// Insert cost per item, in microseconds.
    #[arg(long, default_value_t = 5)]
    item_us: u64,
}

/// What one configuration measured.
pub struct Outcome {
    pub stored: u64,
    pub conflicts: u64,
    pub wasted_items: u64,
    pub virtual_seconds: f64,
}

fn batch(items: usize) -> NewBatch {
    let values: Vec<serde_json::Value> = (0..items)
        .map(|i| serde_json::json!({"request_id": format!("r{i}"), "vendor_name": "acme", "amount": i}))
        .collect();
    build_batch(values, &IngestRules::default(), None, chrono::Utc::now())
        .unwrap_or_else(|e| panic!("the sample batch is valid: {e:?}"))
}

/// Runs `writers` tasks storing `batches` batches each, in a runtime of
/// its own with tokio's paused clock, so the model's costs are virtual
/// time and the run takes as long as the computing does.
pub fn measure(model: TransactionModel, writers: usize, batches: usize, items: usize) -> Outcome {
    measure_on(model, writers, batches, items, 1)
}

/// [`measure`] with writer `w` storing into stream `w{w % streams}` (one
/// stream: the default one).
pub fn measure_on(
    model: TransactionModel,
    writers: usize,
    batches: usize,
    items: usize,
    streams: usize,
) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("a runtime: {e}"));
    runtime.block_on(async {
        let store = MemoryStore::with_model(model);
        let started = tokio::time::Instant::now();
        let far = started + Duration::from_secs(24 * 3600);
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let store = store.clone();
                let mut sample = batch(items);
                if streams > 1 {
                    sample.stream = format!("w{}", w % streams)
                        .parse()
                        .unwrap_or_else(|e| panic!("a stream name: {e}"));
                }
                tokio::spawn(async move {
                    for _ in 0..batches {
                        let mut next = sample.clone();
                        next.batch_id = outbox_core::model::BatchId::random();
                        store
                            .insert_batch(&next, far)
                            .await
                            .unwrap_or_else(|e| panic!("stored: {e}"));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap_or_else(|e| panic!("writer: {e}"));
        }
        Outcome {
            stored: (writers * batches) as u64,
            conflicts: store.conflicts(),
            wasted_items: store.wasted_item_writes(),
            virtual_seconds: started.elapsed().as_secs_f64(),
        }
    })
}

pub fn run(args: ConflictArgs) {
    println!(
        "in-memory model of MongoDB's transactions: statement {} us, {} us per item, {} batches a writer",
        args.statement_us, args.item_us, args.batches
    );
    println!();
    println!(
        "| items/batch | writers | counter | conflicts/batch | lost item writes/batch | batches/s (model) |"
    );
    println!("|---:|---:|---|---:|---:|---:|");
    for &items in &args.items {
        for &writers in &args.writers {
            for counter in [CounterStep::First, CounterStep::AfterItems] {
                let model = TransactionModel {
                    counter,
                    statement: Duration::from_micros(args.statement_us),
                    per_item: Duration::from_micros(args.item_us),
                    staged_above_items: None,
                };
                let outcome = measure(model, writers, args.batches, items);
                let per_batch = |n: u64| n as f64 / outcome.stored as f64;
                let name = match counter {
                    CounterStep::First => "first",
                    CounterStep::AfterItems => "after the items",
                };
                crate::results::record(serde_json::json!({
                    "part": "conflicts",
                    "items": items,
                    "writers": writers,
                    "counter": name,
                    "conflicts_per_batch": per_batch(outcome.conflicts),
                    "lost_per_batch": per_batch(outcome.wasted_items),
                    "batches_s": outcome.stored as f64 / outcome.virtual_seconds,
                }));
                println!(
                    "| {items} | {writers} | {} | {:.2} | {:.0} | {:.0} |",
                    name,
                    per_batch(outcome.conflicts),
                    per_batch(outcome.wasted_items),
                    outcome.stored as f64 / outcome.virtual_seconds
                );
            }
        }
    }
}
