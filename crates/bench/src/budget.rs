//! `outbox-bench budget`: the MongoDB commands (round trips) the relay
//! sends per 1,000 items drained, per ordering mode and batch size, and the
//! writer per stored batch, counted with the driver's command monitoring.
//! The relay's drain loop runs in this process (the same code as the
//! binary) against the test MongoDB and the Pub/Sub emulator. A count does
//! not depend on the machine: it is what carries over to a real replica
//! set, where the stand-in's speed does not.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mongodb::bson::{Document, doc};
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::model::Idempotency;
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::BatchStore;
use outbox_core::stream::{PoisonPolicy, StreamDefinition, StreamName};
use outbox_mongo::monitor::{Command, CommandLog};
use outbox_mongo::{MongoConfig, MongoStore};
use relay::drain::{DrainSettings, OnePublisher};
use relay::lease::LeaseSettings;
use relay::pubsub::{self, PubSubPublisher};
use relay::runner::{Runner, RunnerSettings};
use relay::status::StatusBoard;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Env;
use crate::writer::sample_items;

#[derive(Args)]
pub struct BudgetArgs {
    #[command(flatten)]
    env: Env,
    /// Ordering key modes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "global,batch,field:/vendor_name"
    )]
    modes: Vec<OrderingKeyMode>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    sizes: Vec<usize>,
    /// Items in each backlog (the counts are given per 1,000).
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// Items per page (the relay's OUTBOX_BATCH_SIZE).
    #[arg(long, default_value_t = 1000)]
    page_size: u32,
}

/// Commands of one drain, by kind.
#[derive(Debug, Default)]
struct Counts {
    item_reads: usize,
    batch_reads: usize,
    writes: usize,
    statements: usize,
    other: usize,
}

impl Counts {
    /// The drain's own round trips: reads of batches and items, fenced
    /// writes (their statements and commits).
    fn drain(&self) -> usize {
        self.item_reads + self.batch_reads + self.writes + self.statements
    }
}

fn count(commands: &[Command]) -> Counts {
    let named = |name: &str, collection: &str| {
        commands
            .iter()
            .filter(|c| {
                c.name == name && c.collection.as_deref() == Some(collection) && !c.in_transaction
            })
            .count()
    };
    let item_reads = named("find", "batch_items");
    let batch_reads = named("find", "batches");
    let writes = commands
        .iter()
        .filter(|c| c.name == "commitTransaction")
        .count();
    let statements = commands
        .iter()
        .filter(|c| c.in_transaction && c.name != "commitTransaction")
        .count();
    Counts {
        item_reads,
        batch_reads,
        writes,
        statements,
        other: commands.len() - item_reads - batch_reads - writes - statements,
    }
}

pub async fn run(args: BudgetArgs) -> anyhow::Result<()> {
    println!(
        "command budget: MongoDB commands per 1,000 items of a {}-item backlog drained in pages of {} (the drain loop in this process); upkeep = lease renewals, pause checks, the once-a-second backlog reading, start-up",
        args.items, args.page_size
    );
    println!(
        "{:>20} {:>6} {:>11} {:>11} {:>7} {:>11} {:>7} {:>8}",
        "mode", "batch", "item reads", "batch reads", "writes", "statements", "drain", "upkeep"
    );
    for mode in &args.modes {
        for &size in &args.sizes {
            let counts = drain(&args.env, mode, size, args.items, args.page_size).await?;
            let per = |n: usize| n as f64 * 1000.0 / args.items as f64;
            println!(
                "{:>20} {size:>6} {:>11.1} {:>11.1} {:>7.1} {:>11.1} {:>7.1} {:>8.1}",
                mode.to_string(),
                per(counts.item_reads),
                per(counts.batch_reads),
                per(counts.writes),
                per(counts.statements),
                per(counts.drain()),
                per(counts.other),
            );
            crate::results::record(serde_json::json!({
                "part": "budget",
                "mode": mode.to_string(),
                "batch_size": size,
                "items": args.items,
                "item_reads": per(counts.item_reads),
                "batch_reads": per(counts.batch_reads),
                "writes": per(counts.writes),
                "statements": per(counts.statements),
                "drain": per(counts.drain()),
                "upkeep": per(counts.other),
            }));
        }
    }
    println!();
    writer(&args.env).await
}

/// Drains `items` items in batches of `size` with one runner; the commands
/// from its start to the last commit.
async fn drain(
    env: &Env,
    mode: &OrderingKeyMode,
    size: usize,
    items: usize,
    page_size: u32,
) -> anyhow::Result<Counts> {
    let database = format!("bench_budget_{}", uuid::Uuid::new_v4().simple());
    let log = CommandLog::new();
    let mut config = MongoConfig::new(&env.mongodb_url, &database);
    config.command_log = Some(log.clone());
    config.kill_on_blocked_lease_read = !env.change_stream();
    let store = MongoStore::connect(config).await?;
    store.ensure_schema().await?;
    let batches = (items / size).max(1);
    let values = sample_items(size, "budget");
    for _ in 0..batches {
        let batch = build_batch(
            values.clone(),
            &IngestRules::default(),
            None,
            chrono::Utc::now(),
        )?;
        store
            .insert_batch(&batch, Instant::now() + Duration::from_secs(60))
            .await?;
    }
    let topic = format!("bench-budget-{}", uuid::Uuid::new_v4().simple());
    let config = crate::relay_drain::pubsub_config(env, &topic);
    pubsub::ensure_topic(&config).await?;
    let publisher = Arc::new(PubSubPublisher::connect(&config).await?);
    let definition = StreamDefinition {
        name: StreamName::default_stream(),
        topic,
        ordering: mode.clone(),
        on_poison: PoisonPolicy::Halt,
        schema: None,
        writers: None,
        created_at: None,
        updated_at: None,
        claim_check: None,
    };
    let settings = RunnerSettings {
        lease: LeaseSettings {
            stream: definition.name.clone(),
            holder: "bench-budget".to_owned(),
            ttl: Duration::from_secs(10),
            standby_poll: Duration::from_secs(1),
        },
        // Polls far apart: an idle stream's reads stay out of the count.
        poll_interval: Duration::from_secs(30),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(10),
        drain: DrainSettings::fixed(page_size, definition),
    };
    log.take();
    let runner = Runner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        Arc::new(OnePublisher(publisher)),
        settings,
        Arc::new(StatusBoard::default()),
        Arc::new(Notify::new()),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner.run(stop.clone()));
    let collection = store.database().collection::<Document>("batches");
    crate::process::wait_for(Duration::from_secs(300), "the backlog to drain", || {
        let count = collection.count_documents(doc! { "status": "committed" });
        async move { count.await.is_ok_and(|n| n == batches as u64) }
    })
    .await?;
    // The bench's own reads go through another client: not in the log.
    let counts = count(&log.take());
    stop.cancel();
    let _ = task.await;
    store.drop_database().await?;
    Ok(counts)
}

/// The writer's store: commands per stored batch, with and without an
/// idempotency key.
async fn writer(env: &Env) -> anyhow::Result<()> {
    let database = format!("bench_budget_w_{}", uuid::Uuid::new_v4().simple());
    let log = CommandLog::new();
    let mut config = MongoConfig::new(&env.mongodb_url, &database);
    config.command_log = Some(log.clone());
    let store = MongoStore::connect(config).await?;
    store.ensure_schema().await?;
    println!("writer: commands per stored batch");
    for (label, keyed, size) in [
        ("batch of 100", false, 100),
        ("batch of 100 with an idempotency key", true, 100),
        ("batch of 10,000 (staged)", false, 10_000),
    ] {
        let mut batch = build_batch(
            sample_items(size, label),
            &IngestRules::default(),
            None,
            chrono::Utc::now(),
        )?;
        if keyed {
            batch.idempotency = Some(Idempotency {
                key: format!("budget-{}", uuid::Uuid::new_v4().simple()),
                request_hash: "0".repeat(64),
            });
        }
        log.take();
        store
            .insert_batch(&batch, Instant::now() + Duration::from_secs(120))
            .await?;
        let commands = log.take();
        let names: Vec<&str> = commands.iter().map(|c| c.name.as_str()).collect();
        println!("  {label}: {} ({})", commands.len(), names.join(", "));
        crate::results::record(serde_json::json!({
            "part": "budget-writer", "batch": label, "commands": commands.len(), "names": names,
        }));
    }
    store.drop_database().await?;
    Ok(())
}
