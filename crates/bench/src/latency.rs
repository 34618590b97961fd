//! End-to-end latency at a steady rate: from the writer's commit (its 201
//! answer) to the relay committing the batch, which it does right after
//! Pub/Sub acknowledged the batch's last item and the marks were written.
//! Both instants are wall-clock times on this machine; the relay stores its
//! own as `committed_at` (millisecond precision).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use chrono::{DateTime, Utc};
use clap::Args;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use outbox_mongo::documents::get_opt_datetime;
use outbox_mongo::{MongoConfig, MongoStore};
use relay::pubsub;
use serde_json::Value;

use crate::Env;
use crate::stats::Percentiles;
use crate::writer::sample_items;

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    env: Env,
    /// Items per second submitted (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_value = "200,500,1000")]
    rate: Vec<usize>,
    /// Items per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// How long to submit for.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

pub async fn run(args: LatencyArgs) -> anyhow::Result<()> {
    for &rate in &args.rate {
        run_one(&args, rate).await?;
    }
    Ok(())
}

async fn run_one(args: &LatencyArgs, rate: usize) -> anyhow::Result<()> {
    let env = &args.env;
    let http = reqwest::Client::new();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("bench_latency_{suffix}");
    let topic = format!("bench-latency-{suffix}");
    pubsub::ensure_topic(&crate::relay_drain::pubsub_config(env, &topic)).await?;
    let (writer, url) = crate::process::writer(env, &database, &http).await?;
    let (relay, _admin) = crate::process::relay(env, &database, &topic, "global", &http).await?;

    let batches_per_second = (rate / args.batch_size).max(1);
    let period = Duration::from_secs_f64(1.0 / batches_per_second as f64);
    let total = batches_per_second * usize::try_from(args.seconds)?;
    let body = Arc::new(serde_json::to_vec(&sample_items(args.batch_size, "lat"))?);
    let endpoint = Arc::new(format!("{url}/api/v1/batch/process"));
    let answered: Arc<Mutex<HashMap<String, DateTime<Utc>>>> = Arc::default();
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = Vec::with_capacity(total);
    for _ in 0..total {
        ticks.tick().await;
        let (http, body, endpoint, answered) = (
            http.clone(),
            body.clone(),
            endpoint.clone(),
            answered.clone(),
        );
        requests.push(tokio::spawn(async move {
            let response = http
                .post(endpoint.as_str())
                .header("content-type", "application/json")
                .body(body.as_ref().clone())
                .send()
                .await?;
            let at = Utc::now();
            ensure!(
                response.status() == 201,
                "writer answered {}",
                response.status()
            );
            let reply: Value = response.json().await?;
            let id = reply["data"]["batch_id"]
                .as_str()
                .context("batch_id")?
                .to_owned();
            answered
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .insert(id, at);
            Ok(())
        }));
    }
    for request in requests {
        request.await??;
    }

    let store = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
    let batches = mongodb::Client::with_uri_str(&env.mongodb_url)
        .await?
        .database(&database)
        .collection::<Document>("batches");
    crate::process::wait_for(
        Duration::from_secs(120),
        "every batch to be committed",
        || {
            let count = batches.count_documents(doc! { "status": "committed" });
            async move { count.await.is_ok_and(|n| n == total as u64) }
        },
    )
    .await?;
    let (writer_rss, relay_rss) = (
        crate::process::peak_rss_mib(&writer),
        crate::process::peak_rss_mib(&relay),
    );
    drop(relay);
    drop(writer);

    let answered = std::mem::take(&mut *answered.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    // One read of every batch: committed_at is the relay's clock reading
    // right after the last acknowledgement and the marks.
    let mut committed = HashMap::with_capacity(total);
    let mut cursor = batches
        .find(doc! {})
        .projection(doc! { "batch_id": 1, "committed_at": 1 })
        .await?;
    while let Some(batch) = cursor.try_next().await? {
        let at = get_opt_datetime(&batch, "committed_at").context("batch committed")?;
        committed.insert(batch.get_str("batch_id")?.to_owned(), at);
    }
    let mut latencies = Vec::with_capacity(total);
    for (id, at) in answered {
        let done = committed.get(&id).context("answered batch stored")?;
        latencies.push((*done - at).to_std().unwrap_or(Duration::ZERO));
    }
    store.drop_database().await?;
    let p = Percentiles::of(latencies);
    println!(
        "end-to-end latency: {total} batches of {} at {} items/s for {} s, wake-up by {}",
        args.batch_size,
        batches_per_second * args.batch_size,
        args.seconds,
        if env.change_stream() {
            "change stream"
        } else {
            "polling every 50 ms (no change stream)"
        }
    );
    println!(
        "writer commit -> last item acknowledged and batch committed (ms): p50 {:.0}  p95 {:.0}  p99 {:.0}",
        p.p50, p.p95, p.p99
    );
    crate::results::record(serde_json::json!({
        "part": "latency",
        "rate": batches_per_second * args.batch_size,
        "batch_size": args.batch_size,
        "batches": total,
        "wake": if env.change_stream() { "change stream" } else { "polling, 50 ms" },
        "p50": p.p50,
        "p95": p.p95,
        "p99": p.p99,
        "writer_rss_mib": writer_rss,
        "relay_rss_mib": relay_rss,
    }));
    Ok(())
}
