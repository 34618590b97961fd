//! `outbox-bench claim-check`: items too large for a Pub/Sub message, stored
//! by reference on the file store (issue 28). For each item size, a fresh
//! writer stores single-item batches one after another (items/s, MB/s, and
//! its peak resident memory against the item's size), then a fresh relay
//! publishes them by reference (items/s and its peak memory: it never holds
//! a payload), then the consumer's side fetches and verifies every object
//! (MB/s).
//!
//! The file store is this machine's disk and page cache: Google Cloud
//! Storage adds a network transfer per object, so the MB/s here are a
//! ceiling for one writer, not a prediction; the memory figures carry over.

use std::time::Duration;

use anyhow::ensure;
use bytes::Bytes;
use clap::Args;
use mongodb::bson::{Document, doc};
use outbox_claim_check::Objects;
use outbox_core::claim_check::{Location, Reference};
use relay::pubsub;
use tokio::time::Instant;

use crate::Env;

#[derive(Args)]
pub struct ClaimCheckArgs {
    #[command(flatten)]
    env: Env,
    /// Item sizes in MiB (comma-separated: one run each).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    sizes_mib: Vec<usize>,
    /// Bytes stored per size, at least (so many items of the size).
    #[arg(long, default_value_t = 200)]
    mib_per_size: usize,
}

pub async fn run(args: ClaimCheckArgs) -> anyhow::Result<()> {
    println!(
        "claim-check on the file store: single-item batches, one request at a time; \
         every item by reference (CLAIM_CHECK_ABOVE_BYTES=512 KiB)"
    );
    println!(
        "{:>8} {:>6} | {:>12} {:>10} {:>14} {:>10} | {:>12} {:>14} | {:>14}",
        "item",
        "items",
        "writer it/s",
        "MB/s",
        "peak RSS",
        "x item",
        "relay it/s",
        "relay RSS",
        "resolve MB/s"
    );
    for &size in &args.sizes_mib {
        run_one(&args, size).await?;
    }
    Ok(())
}

async fn run_one(args: &ClaimCheckArgs, size_mib: usize) -> anyhow::Result<()> {
    let env = &args.env;
    let http = reqwest::Client::new();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("bench_claim_check_{suffix}");
    let topic = format!("bench-claim-check-{suffix}");
    let dir = std::env::temp_dir().join(format!("outbox-bench-claim-check-{suffix}"));
    let store_url = format!("file://{}", dir.display());
    pubsub::ensure_topic(&crate::relay_drain::pubsub_config(env, &topic)).await?;
    let (writer, url) = crate::process::writer_with(
        env,
        &database,
        &http,
        &[
            ("CLAIM_CHECK_URL", store_url.clone()),
            ("CLAIM_CHECK_ABOVE_BYTES", (512 * 1024).to_string()),
            ("REQUEST_DEADLINE_SECONDS", "30".to_owned()),
        ],
    )
    .await?;
    let baseline = crate::process::peak_rss_mib(&writer);
    let bytes = size_mib * 1024 * 1024;
    let items = (args.mib_per_size / size_mib).max(3);
    // Each item a distinct payload (its own object), `bytes` long as JSON.
    let body = |n: usize| {
        let head = format!("[{{\"request_id\":\"i{n}\",\"vendor_name\":\"bench\",\"blob\":\"");
        let tail = "\"}]";
        let mut text = String::with_capacity(bytes + 64);
        text.push_str(&head);
        let fill = bytes.saturating_sub(head.len() + tail.len());
        text.extend(std::iter::repeat_n('x', fill));
        text.push_str(tail);
        Bytes::from(text)
    };
    let started = Instant::now();
    for n in 0..items {
        let response = http
            .post(format!("{url}/api/v1/batch/process"))
            .header("content-type", "application/json")
            .body(body(n))
            .send()
            .await?;
        ensure!(
            response.status() == 201,
            "item {n} of {size_mib} MiB: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let writer_secs = started.elapsed().as_secs_f64();
    let writer_rss = crate::process::peak_rss_mib(&writer);
    drop(writer);

    let batches = mongodb::Client::with_uri_str(&env.mongodb_url)
        .await?
        .database(&database);
    let started = Instant::now();
    let (relay, _admin) = crate::process::relay(env, &database, &topic, "global", &http).await?;
    let committed = batches.collection::<Document>("batches");
    crate::process::wait_for(
        Duration::from_secs(600),
        "every batch to be committed",
        || {
            let count = committed.count_documents(doc! { "status": "committed" });
            async move { count.await.is_ok_and(|n| n == items as u64) }
        },
    )
    .await?;
    let relay_secs = started.elapsed().as_secs_f64();
    let relay_rss = crate::process::peak_rss_mib(&relay);
    drop(relay);

    // The consumer's side: every object fetched and verified.
    let mut references = Vec::new();
    let mut cursor = batches
        .collection::<Document>("batch_items")
        .find(doc! { "claim_check": { "$exists": true } })
        .projection(doc! { "claim_check": 1 })
        .await?;
    use futures::TryStreamExt;
    while let Some(item) = cursor.try_next().await? {
        let reference = item.get_document("claim_check")?;
        references.push(Reference {
            url: reference.get_str("url")?.to_owned(),
            sha256: reference.get_str("sha256")?.to_owned(),
            bytes: match reference.get("bytes") {
                Some(mongodb::bson::Bson::Int32(n)) => u64::try_from(*n)?,
                Some(mongodb::bson::Bson::Int64(n)) => u64::try_from(*n)?,
                other => anyhow::bail!("a reference's size: {other:?}"),
            },
        });
    }
    ensure!(
        references.len() == items,
        "every item is stored by reference"
    );
    let objects = Objects::open(&Location::parse(&store_url)?)?;
    let started = Instant::now();
    let mut resolved = 0_u64;
    for reference in &references {
        resolved += objects.get(reference, u64::MAX).await?.len() as u64;
    }
    let resolve_secs = started.elapsed().as_secs_f64();
    batches.drop().await?;
    let _ = std::fs::remove_dir_all(&dir);

    let mb = (items * bytes) as f64 / 1e6;
    let times_item = writer_rss.map(|rss| rss / size_mib as f64);
    let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0} MiB"));
    println!(
        "{:>5} MiB {:>6} | {:>12.2} {:>10.1} {:>14} {:>10} | {:>12.2} {:>14} | {:>14.0}",
        size_mib,
        items,
        items as f64 / writer_secs,
        mb / writer_secs,
        show(writer_rss),
        times_item.map_or_else(|| "n/a".to_owned(), |x| format!("{x:.2}")),
        items as f64 / relay_secs,
        show(relay_rss),
        resolved as f64 / 1e6 / resolve_secs,
    );
    crate::results::record(serde_json::json!({
        "part": "claim-check",
        "item_mib": size_mib,
        "items": items,
        "writer_items_per_second": items as f64 / writer_secs,
        "writer_mb_per_second": mb / writer_secs,
        "writer_baseline_rss_mib": baseline,
        "writer_rss_mib": writer_rss,
        "relay_items_per_second": items as f64 / relay_secs,
        "relay_rss_mib": relay_rss,
        "resolve_mb_per_second": resolved as f64 / 1e6 / resolve_secs,
    }));
    Ok(())
}
