//! Relay drain rate for a stored backlog, beside its two ceilings measured
//! in the same run: pipelined publishing of the same messages with the same
//! client and ordering mode, and bulk marking of the same items in MongoDB.

use std::time::Duration;

use anyhow::ensure;
use clap::Args;
use mongodb::bson::{Document, doc};
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::model::{BatchId, BatchStatus, ItemSequence};
use outbox_core::publish::{OrderingKeyMode, OutboxMessage, Publisher};
use outbox_core::store::{BatchStore, LeaseStore, OutboxStore, PendingBatch, SentMark};
use outbox_mongo::{MongoConfig, MongoStore};
use relay::pubsub::{self, PubSubConfig, PubSubPublisher};
use tokio::time::Instant;

use crate::Env;
use crate::stats::per_second;
use crate::writer::sample_items;

pub const PROJECT: &str = "bench-project";

#[derive(Args)]
pub struct RelayArgs {
    #[command(flatten)]
    env: Env,
    /// Items in the backlog (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    items: Vec<usize>,
    /// Items per batch.
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Ordering key modes of the relay and of the raw publisher
    /// (comma-separated: one run each).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "global,batch,field:/vendor_name"
    )]
    ordering: Vec<OrderingKeyMode>,
}

pub fn pubsub_config(env: &Env, topic: &str) -> PubSubConfig {
    PubSubConfig {
        project_id: PROJECT.to_owned(),
        topic: topic.to_owned(),
        emulator_host: Some(env.pubsub_emulator_host.clone()),
        endpoint: None,
        publish_retry_limit: Duration::from_secs(30),
        // The relay's default (PUBLISH_BATCH_DELAY_MS).
        batch_delay: Duration::from_millis(1),
    }
}

pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    for &items in &args.items {
        for ordering in &args.ordering {
            run_one(&args.env, items, args.batch_size, ordering).await?;
        }
    }
    Ok(())
}

async fn run_one(
    env: &Env,
    items: usize,
    batch_size: usize,
    ordering: &OrderingKeyMode,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("bench_relay_{suffix}");
    let store = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
    store.ensure_schema().await?;
    let batches = items / batch_size;
    ensure!(batches > 0, "--items must be at least --batch-size");
    let items = batches * batch_size;

    // The backlog, stored through the writer's store code.
    let started = Instant::now();
    let mut ids: Vec<BatchId> = Vec::with_capacity(batches);
    for b in 0..batches {
        // Every item's request_id is its own (`relay<b>-<i>`): with
        // `field:/request_id` there are as many ordering keys as items,
        // the publisher's worst case for memory.
        let batch = build_batch(
            sample_items(batch_size, &format!("relay{b}")),
            &IngestRules::default(),
            None,
            chrono::Utc::now(),
        )?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        ids.push(store.insert_batch(&batch, deadline).await?.batch_id);
    }
    let load = started.elapsed();
    println!(
        "relay benchmark: backlog of {items} items in {batches} batches of {} (stored in {:.1} s, {:.0} items/s), ordering key {}",
        batch_size,
        load.as_secs_f64(),
        per_second(items, load),
        ordering
    );

    // Ceiling 1: the same messages, pipelined through the same client.
    let mut messages = Vec::with_capacity(items);
    let mut item_ids: Vec<Vec<String>> = Vec::with_capacity(batches);
    let mut marks: Vec<Vec<SentMark>> = Vec::with_capacity(batches);
    for id in &ids {
        let page = store
            .unsent_items(id, ItemSequence(0), u32::try_from(batch_size)?)
            .await?;
        let Some(first) = page.first() else { continue };
        let batch = PendingBatch {
            stream: outbox_core::stream::StreamName::default(),
            batch_id: id.clone(),
            batch_sequence: first.batch_sequence,
            status: BatchStatus::Pending,
            total_items: page.len() as u64,
            created_at: chrono::Utc::now(),
            last_error: None,
            traceparent: None,
        };
        item_ids.push(page.iter().map(|item| item.item_id.to_string()).collect());
        marks.push(
            page.iter()
                .map(|item| SentMark {
                    item_id: item.item_id,
                    item_sequence: item.item_sequence,
                    publish_id: format!("fenced-{}", item.item_id),
                })
                .collect(),
        );
        messages.extend(
            page.iter()
                .map(|item| OutboxMessage::for_item(item, &batch, ordering)),
        );
    }
    let raw_topic = format!("bench-raw-{suffix}");
    let raw_config = pubsub_config(env, &raw_topic);
    pubsub::ensure_topic(&raw_config).await?;
    let publisher = PubSubPublisher::connect(&raw_config).await?;
    let started = Instant::now();
    let pending: Vec<_> = messages.into_iter().map(|m| publisher.publish(m)).collect();
    for result in futures::future::join_all(pending).await {
        result.map_err(|e| anyhow::anyhow!("raw publish: {e:?}"))?;
    }
    let publish_ceiling = per_second(items, started.elapsed());

    // The relay itself, from the moment it leads until every batch is committed.
    let topic = format!("bench-relay-{suffix}");
    pubsub::ensure_topic(&pubsub_config(env, &topic)).await?;
    let spawned = Instant::now();
    let (relay, admin) =
        crate::process::relay(env, &database, &topic, &ordering.to_string(), &http).await?;
    let leading = Instant::now();
    let batches_collection = mongodb::Client::with_uri_str(&env.mongodb_url)
        .await?
        .database(&database)
        .collection::<Document>("batches");
    crate::process::wait_for(Duration::from_secs(3600), "the backlog to drain", || {
        let count = batches_collection.count_documents(doc! { "status": "committed" });
        async move { count.await.is_ok_and(|n| n == batches as u64) }
    })
    .await?;
    let drained = leading.elapsed();
    let waits = drain_waits(&http, &admin).await.unwrap_or_default();
    let rss_mib = crate::process::peak_rss_mib(&relay);
    let rss = crate::process::peak_rss(&relay);
    drop(relay);
    let relay_rate = per_second(items, drained);

    // Ceiling 2: the same marks, one `update` command per page, no transaction.
    let db = mongodb::Client::with_uri_str(&env.mongodb_url)
        .await?
        .database(&database);
    let started = Instant::now();
    let mut n = 0_u64;
    for (id, item_ids) in ids.iter().zip(&item_ids) {
        let updates: Vec<Document> = item_ids
            .iter()
            .map(|item_id| {
                n += 1;
                doc! {
                    "q": { "_id": item_id, "batch_id": id.as_str() },
                    "u": { "$set": {
                        "status": "sent", "sent": true, "publish_id": format!("raw-{n}"),
                        "sent_at": mongodb::bson::DateTime::now(),
                    } },
                }
            })
            .collect();
        db.run_command(doc! { "update": "batch_items", "updates": updates, "ordered": true })
            .await?;
    }
    let mark_ceiling = per_second(items, started.elapsed());

    // For reference, not a ceiling: the relay's own store writes without
    // its reads or publishing. Each batch's marks and commit in one fenced
    // transaction (`finish_batch`, under the lease the relay held), as the
    // relay writes a 1,000-item page that ends a batch.
    // Untimed: every item pending again, so that the marks write.
    db.collection::<Document>("batch_items")
        .update_many(
            doc! {},
            doc! { "$set": { "status": "pending", "sent": false } },
        )
        .await?;
    db.collection::<Document>("batches")
        .update_many(
            doc! {},
            doc! { "$set": { "status": "processing", "sent_items": 0_i64 } },
        )
        .await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let stream = outbox_core::stream::StreamName::default();
    // The relay held the lease as its instance (`RELAY_ID#suffix`):
    // renewed as that holder, under the epoch it wrote with.
    let holder = store
        .current(&stream)
        .await?
        .map_or_else(|| crate::process::RELAY_ID.to_owned(), |lease| lease.holder);
    let fence = store
        .acquire_or_renew(&stream, &holder, now_ms, 3_600_000)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the relay's lease could not be renewed"))?
        .fence();
    let started = Instant::now();
    for (n, (id, marks)) in ids.iter().zip(&marks).enumerate() {
        let sequence = outbox_core::model::Sequence(n as u64 + 1);
        store.finish_batch(&fence, id, sequence, marks).await?;
    }
    let fenced_marking = per_second(items, started.elapsed());
    store.drop_database().await?;

    let ceiling = publish_ceiling.min(mark_ceiling);
    println!("{:<34} {:>12}", "", "items/s");
    println!(
        "{:<34} {:>12.0}",
        "raw pipelined publish (ceiling)", publish_ceiling
    );
    println!(
        "{:<34} {:>12.0}",
        "raw bulk marking (ceiling)", mark_ceiling
    );
    println!(
        "{:<34} {:>12.0}",
        "fenced transactional marking", fenced_marking
    );
    println!(
        "{:<34} {:>12.0}   ({:.1} s to drain; {:.1} s from start to leading)",
        "relay drain",
        relay_rate,
        drained.as_secs_f64(),
        (leading - spawned).as_secs_f64()
    );
    println!(
        "relay/min(ceilings) = {:.2}; relay peak RSS {rss}",
        relay_rate / ceiling
    );
    let share = |phase: &str| waits.get(phase).copied().unwrap_or(0.0);
    let own = (drained.as_secs_f64() - share("read") - share("publish") - share("write")).max(0.0);
    println!(
        "where the drain's {:.1} s went: waiting on reads {:.1} s, on Pub/Sub {:.1} s, on writes {:.1} s; its own work {:.1} s",
        drained.as_secs_f64(),
        share("read"),
        share("publish"),
        share("write"),
        own
    );
    crate::results::record(serde_json::json!({
        "part": "relay",
        "items": items,
        "batch_size": batch_size,
        "ordering": ordering.to_string(),
        "publish_ceiling": publish_ceiling,
        "mark_ceiling": mark_ceiling,
        "fenced_marking": fenced_marking,
        "relay_items_s": relay_rate,
        "relay_rss_mib": rss_mib,
        "store_items_s": per_second(items, load),
        "drain_s": drained.as_secs_f64(),
        "wait_read_s": share("read"),
        "wait_publish_s": share("publish"),
        "wait_write_s": share("write"),
    }));
    Ok(())
}

/// What the relay's drain loop waited on, by phase, in seconds
/// (`outbox_relay_drain_wait_microseconds_total` on its admin port).
async fn drain_waits(
    http: &reqwest::Client,
    admin: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut waits = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("outbox_relay_drain_wait_microseconds_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(phase) = labels
            .split("phase=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let micros: f64 = value.parse().unwrap_or(0.0);
        *waits.entry(phase.to_owned()).or_default() += micros / 1e6;
    }
    Ok(waits)
}
