//! `outbox-bench streams`: the aggregate drain rate of one backlog spread
//! over 1, 2, 4 and 8 streams (each on its own topic) with 1, 2 and 3 relay
//! replicas sharing them; and the writer with its clients on one stream or
//! on one stream each, on the services and on the in-memory model of
//! MongoDB's transactions.
//!
//! The drain: the relays start first and see each other; the streams are
//! defined paused, the backlog is stored, and the clock starts when every
//! stream is resumed at once. It stops when the last batch is committed.

use std::time::Duration;

use anyhow::ensure;
use clap::Args;
use mongodb::bson::{Document, doc};
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::memory::{CounterStep, TransactionModel};
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::{BatchStore, OutboxStore, StreamStore};
use outbox_core::stream::{PoisonPolicy, StreamDefinition, StreamName};
use outbox_mongo::{MongoConfig, MongoStore};
use relay::pubsub;
use tokio::process::Child;
use tokio::time::Instant;

use crate::Env;
use crate::stats::per_second;
use crate::writer::sample_items;

#[derive(Args)]
pub struct StreamArgs {
    #[command(flatten)]
    env: Env,
    /// Streams the backlog is spread over (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    streams: Vec<usize>,
    /// Relay replicas sharing the streams (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    relays: Vec<usize>,
    /// Items in the backlog of each run.
    #[arg(long, default_value_t = 8_000)]
    items: usize,
    /// Items per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Writer part: concurrent clients, on one stream or one stream each.
    #[arg(long, default_value_t = 4)]
    writer_clients: usize,
    /// Writer part: items stored per measurement.
    #[arg(long, default_value_t = 20_000)]
    writer_items: usize,
    /// Skip the parts that need services (the model part runs alone).
    #[arg(long)]
    model_only: bool,
}

pub async fn run(args: StreamArgs) -> anyhow::Result<()> {
    if !args.model_only {
        println!(
            "streams benchmark: a backlog of {} items in batches of {}, spread evenly over the streams; one topic per stream, `global` ordering key (each stream's own)",
            args.items, args.batch_size
        );
        println!(
            "{:>8} {:>7} {:>12} {:>10} {:>18}",
            "streams", "relays", "items/s", "seconds", "÷ 1 stream 1 relay"
        );
        let mut single = None;
        for &relays in &args.relays {
            for &streams in &args.streams {
                let rate = drain(&args.env, streams, relays, args.items, args.batch_size).await?;
                let base = *single.get_or_insert(rate.0);
                println!(
                    "{streams:>8} {relays:>7} {:>12.0} {:>10.1} {:>18.2}",
                    rate.0,
                    rate.1,
                    rate.0 / base
                );
                crate::results::record(serde_json::json!({
                    "part": "streams",
                    "streams": streams,
                    "relays": relays,
                    "items": args.items,
                    "batch_size": args.batch_size,
                    "items_s": rate.0,
                }));
            }
        }
        println!();
        writer(&args.env, args.writer_clients, args.writer_items).await?;
    }
    println!();
    // The model runs in a runtime of its own, with the paused clock.
    let clients = args.writer_clients;
    tokio::task::spawn_blocking(move || model(clients)).await?;
    Ok(())
}

/// Starts a relay replica named `id` against `database`; returns it and its
/// admin URL once it answers.
async fn replica(
    env: &Env,
    database: &str,
    id: &str,
    http: &reqwest::Client,
) -> anyhow::Result<(Child, String)> {
    let port = crate::process::free_port()?;
    let child = crate::process::spawn_logged(
        &env.bin_dir,
        "outbox-relay",
        id,
        &[
            ("MONGODB_URL", env.mongodb_url.clone()),
            ("MONGODB_DATABASE", database.to_owned()),
            ("PUBSUB_EMULATOR_HOST", env.pubsub_emulator_host.clone()),
            ("PUBSUB_PROJECT_ID", crate::relay_drain::PROJECT.to_owned()),
            ("PUBSUB_TOPIC", format!("{database}-default")),
            ("RELAY_ID", id.to_owned()),
            ("RELAY_ADMIN_BIND", format!("127.0.0.1:{port}")),
            ("OUTBOX_CHANGE_STREAM", env.change_stream().to_string()),
            (
                "LEASE_KILL_ON_BLOCKED_READ",
                (!env.change_stream()).to_string(),
            ),
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.05".to_owned()),
            ("LEASE_TTL_SECONDS", "3".to_owned()),
        ],
    )?;
    let admin = format!("http://127.0.0.1:{port}");
    let live = format!("{admin}/health/live");
    crate::process::wait_for(
        Duration::from_secs(120),
        "a relay replica to answer",
        || {
            let request = http.get(&live).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        },
    )
    .await?;
    Ok((child, admin))
}

/// How many streams each replica leads, as `admin` sees the cluster.
async fn leads(http: &reqwest::Client, admin: &str) -> Vec<usize> {
    let Ok(response) = http.get(format!("{admin}/api/v1/cluster")).send().await else {
        return Vec::new();
    };
    let Ok(cluster) = response.json::<serde_json::Value>().await else {
        return Vec::new();
    };
    cluster["replicas"]
        .as_array()
        .map(|replicas| {
            replicas
                .iter()
                .map(|r| r["leads"].as_array().map_or(0, Vec::len))
                .collect()
        })
        .unwrap_or_default()
}

/// One run: returns (items/s, seconds).
async fn drain(
    env: &Env,
    streams: usize,
    relays: usize,
    items: usize,
    batch_size: usize,
) -> anyhow::Result<(f64, f64)> {
    let http = reqwest::Client::new();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("bench_streams_{suffix}");
    let store = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
    store.ensure_schema().await?;
    let batches = items / batch_size;
    ensure!(
        batches >= streams,
        "--items must give every stream at least one batch"
    );
    let items = batches * batch_size;

    let names: Vec<StreamName> = (1..=streams)
        .map(|n| format!("s{n}").parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for name in &names {
        let topic = format!("{database}-{name}");
        pubsub::ensure_topic(&crate::relay_drain::pubsub_config(env, &topic)).await?;
        store
            .put_stream(&StreamDefinition {
                name: name.clone(),
                topic,
                ordering: OrderingKeyMode::Global,
                on_poison: PoisonPolicy::Halt,
                schema: None,
                writers: None,
                created_at: None,
                updated_at: None,
                claim_check: None,
            })
            .await?;
        store.set_paused(name, true).await?;
    }

    let mut children = Vec::new();
    let mut admins = Vec::new();
    for n in 0..relays {
        let (child, admin) = replica(env, &database, &format!("bench-relay-{n}"), &http).await?;
        children.push(child);
        admins.push(admin);
    }
    // Every replica sees the others and the streams are shared (the default
    // stream, empty, is one more).
    let total = streams + 1;
    let ceiling = total.div_ceil(relays);
    crate::process::wait_for(Duration::from_secs(120), "the streams shared", || {
        let (http, admin) = (&http, &admins[0]);
        async move {
            let leads = leads(http, admin).await;
            leads.len() == relays
                && leads.iter().sum::<usize>() == total
                && leads.iter().all(|&n| n <= ceiling)
        }
    })
    .await?;

    let values = sample_items(batch_size, "streams");
    for n in 0..batches {
        let mut batch = build_batch(
            values.clone(),
            &IngestRules::default(),
            None,
            chrono::Utc::now(),
        )?;
        batch.stream = names[n % streams].clone();
        store
            .insert_batch(&batch, Instant::now() + Duration::from_secs(60))
            .await?;
    }

    let batches_collection = mongodb::Client::with_uri_str(&env.mongodb_url)
        .await?
        .database(&database)
        .collection::<Document>("batches");
    let started = Instant::now();
    for name in &names {
        store.set_paused(name, false).await?;
    }
    crate::process::wait_for(Duration::from_secs(3600), "the backlog to drain", || {
        let count = batches_collection.count_documents(doc! { "status": "committed" });
        async move { count.await.is_ok_and(|n| n == batches as u64) }
    })
    .await?;
    let took = started.elapsed();
    drop(children);
    store.drop_database().await?;
    Ok((per_second(items, took), took.as_secs_f64()))
}

/// The writer with `clients` clients of 100-item batches, all on one
/// stream, then each on its own.
async fn writer(env: &Env, clients: usize, items: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let database = format!("bench_streams_w_{}", uuid::Uuid::new_v4().simple());
    let store = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
    store.ensure_schema().await?;
    for n in 0..clients {
        let name: StreamName = format!("w{n}")
            .parse()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        store
            .put_stream(&StreamDefinition {
                name,
                topic: format!("{database}-w{n}"),
                ordering: OrderingKeyMode::Global,
                on_poison: PoisonPolicy::Halt,
                schema: None,
                writers: None,
                created_at: None,
                updated_at: None,
                claim_check: None,
            })
            .await?;
    }
    let (mut process, url) = crate::process::writer(env, &database, &http).await?;
    println!("writer, {clients} clients of 100-item batches, {items} items a row:");
    println!(
        "{:<26} {:>12} {:>8} {:>8}",
        "", "items/s", "p50 ms", "p95 ms"
    );
    for spread in [1, clients] {
        let cell =
            crate::writer::stream_cell(&http, &url, 100, clients, items / 100, spread).await?;
        let label = if spread == 1 {
            "one stream".to_owned()
        } else {
            format!("{spread} streams (one each)")
        };
        println!(
            "{label:<26} {:>12.0} {:>8.1} {:>8.1}",
            cell.items_per_second(),
            cell.latency.p50,
            cell.latency.p95
        );
        crate::results::record(serde_json::json!({
            "part": "streams-writer",
            "streams": spread,
            "clients": clients,
            "items_s": cell.items_per_second(),
            "p50_ms": cell.latency.p50,
            "p95_ms": cell.latency.p95,
        }));
    }
    let _ = process.kill().await;
    store.drop_database().await?;
    Ok(())
}

/// The same comparison on the in-memory model of MongoDB's transactions,
/// where transactions on different streams run side by side as they do
/// on a replica set.
fn model(clients: usize) {
    println!(
        "in-memory model of MongoDB's transactions (statement 1 ms, 5 us an item, 50 batches of 100 a client, virtual time):"
    );
    println!("{:<26} {:>12} {:>16}", "", "batches/s", "conflicts/batch");
    for spread in [1, clients] {
        let model = TransactionModel {
            counter: CounterStep::First,
            statement: Duration::from_millis(1),
            per_item: Duration::from_micros(5),
            staged_above_items: None,
        };
        let outcome = crate::conflicts::measure_on(model, clients, 50, 100, spread);
        let label = if spread == 1 {
            "one stream".to_owned()
        } else {
            format!("{spread} streams (one each)")
        };
        let rate = outcome.stored as f64 / outcome.virtual_seconds;
        let conflicts = outcome.conflicts as f64 / outcome.stored as f64;
        println!("{label:<26} {rate:>12.0} {conflicts:>16.2}");
        crate::results::record(serde_json::json!({
            "part": "streams-model",
            "streams": spread,
            "clients": clients,
            "batches_s": rate,
            "conflicts_per_batch": conflicts,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the model, writers on their own streams never conflict; on one
    /// stream they do (the counter is one document).
    #[test]
    fn writers_on_their_own_streams_never_conflict() {
        let model = TransactionModel {
            counter: CounterStep::First,
            statement: Duration::from_millis(1),
            per_item: Duration::from_micros(5),
            staged_above_items: None,
        };
        let shared = crate::conflicts::measure_on(model, 4, 5, 10, 1);
        let apart = crate::conflicts::measure_on(model, 4, 5, 10, 4);
        assert!(shared.conflicts > 0);
        assert_eq!(apart.conflicts, 0);
        assert!(apart.virtual_seconds < shared.virtual_seconds);
    }
}
