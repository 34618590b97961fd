//! Writer throughput and latency beside the raw driver ceiling.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use clap::Args;
use mongodb::bson::{Bson, Document};
use mongodb::options::{Acknowledgment, ClientOptions, TransactionOptions, WriteConcern};
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::model::Sequence;
use outbox_mongo::documents::{batch_document, item_document};
use outbox_mongo::{MongoConfig, MongoStore};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::Env;
use crate::stats::{Percentiles, per_second};

#[derive(Args)]
pub struct WriterArgs {
    #[command(flatten)]
    env: Env,
    /// Items per batch, one table row group each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    sizes: Vec<usize>,
    /// Concurrent clients.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Items stored per measurement (at least two batches per client).
    #[arg(long, default_value_t = 20_000)]
    items_per_cell: usize,
}

/// `n` request objects of about 150 bytes of JSON each, like a typical client's.
pub fn sample_items(n: usize, tag: &str) -> Vec<Value> {
    const VENDORS: [&str; 3] = ["acme", "globex", "initech"];
    (0..n)
        .map(|i| {
            json!({
                "request_id": format!("{tag}-{i}"),
                "vendor_name": VENDORS[i % VENDORS.len()],
                "amount": i * 7 % 1000,
                "currency": "EUR",
                "customer": {"id": i % 97, "tier": "gold"},
                "note": "benchmark payload of a typical size",
            })
        })
        .collect()
}

pub(crate) struct Cell {
    items: usize,
    elapsed: Duration,
    pub(crate) latency: Percentiles,
}

impl Cell {
    pub(crate) fn items_per_second(&self) -> f64 {
        per_second(self.items, self.elapsed)
    }
}

/// Runs `batches` operations over `clients` tasks; `op(n)` does the n-th.
async fn measure<F, Fut>(clients: usize, batches: usize, size: usize, op: F) -> anyhow::Result<Cell>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= batches {
                        return Ok::<_, anyhow::Error>(latencies);
                    }
                    let at = Instant::now();
                    op(n).await?;
                    latencies.push(at.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(batches);
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(Cell {
        items: batches * size,
        elapsed: started.elapsed(),
        latency: Percentiles::of(latencies),
    })
}

async fn writer_cell(
    http: &reqwest::Client,
    url: &str,
    size: usize,
    clients: usize,
    batches: usize,
) -> anyhow::Result<Cell> {
    post_cell(
        http,
        vec![format!("{url}/api/v1/batch/process")],
        size,
        clients,
        batches,
    )
    .await
}

/// [`writer_cell`] on streams `w0` .. `w{spread - 1}`: the n-th batch goes
/// to stream `w{n % spread}`, so with `spread == clients` each client keeps
/// to about one stream.
pub(crate) async fn stream_cell(
    http: &reqwest::Client,
    url: &str,
    size: usize,
    clients: usize,
    batches: usize,
    spread: usize,
) -> anyhow::Result<Cell> {
    let endpoints = (0..spread)
        .map(|n| format!("{url}/api/v1/streams/w{n}/batches"))
        .collect();
    post_cell(http, endpoints, size, clients, batches).await
}

/// Posts `batches` batches of `size` items over `clients` clients, the
/// n-th to `endpoints[n % len]`.
async fn post_cell(
    http: &reqwest::Client,
    endpoints: Vec<String>,
    size: usize,
    clients: usize,
    batches: usize,
) -> anyhow::Result<Cell> {
    let body = Arc::new(serde_json::to_vec(&sample_items(size, "w"))?);
    let endpoints = Arc::new(endpoints);
    let http = http.clone();
    let shed = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&shed);
    let cell = measure(clients, batches, size, move |n| {
        let (http, endpoints, body, shed) = (
            http.clone(),
            Arc::clone(&endpoints),
            Arc::clone(&body),
            Arc::clone(&counted),
        );
        async move {
            // As a client should: a 503 (the writer shedding load past its
            // deadline) is retried after its Retry-After; the latency is
            // the whole wait.
            loop {
                let response = http
                    .post(endpoints[n % endpoints.len()].as_str())
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await?;
                let status = response.status();
                if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                    shed.fetch_add(1, Ordering::Relaxed);
                    let wait = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                    continue;
                }
                ensure!(
                    status == 201,
                    "writer answered {status}: {}",
                    response.text().await?
                );
                return Ok(());
            }
        }
    })
    .await?;
    let shed = shed.load(Ordering::Relaxed);
    if shed > 0 {
        println!(
            "      ({size} items x {clients} clients: {shed} answers were 503 and retried after Retry-After)"
        );
    }
    Ok(cell)
}

/// The ceiling: the same documents (built by the same code, so the same
/// shape and size) inserted with `insert_one` + `insert_many` in one
/// transaction per batch, straight through the driver, into collections with
/// the same indexes. No HTTP, no validation, no sequence counter.
async fn raw_cell(env: &Env, size: usize, clients: usize, batches: usize) -> anyhow::Result<Cell> {
    let database = format!("bench_raw_{}", uuid::Uuid::new_v4().simple());
    let store = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
    store.ensure_schema().await?;
    let mut options = ClientOptions::parse(&env.mongodb_url).await?;
    // One pooled connection per client and more, so a client never waits for one.
    options.max_pool_size = Some(u32::try_from(clients * 2 + 4)?);
    let client = mongodb::Client::with_options(options)?;
    let db = client.database(&database);

    let values = sample_items(size, "raw");
    let rules = IngestRules::default();
    let sequence = AtomicU64::new(0);
    let prepared: Vec<(Document, Vec<Document>)> = (0..batches)
        .map(|_| {
            let batch = build_batch(values.clone(), &rules, None, chrono::Utc::now())?;
            let seq = Sequence(sequence.fetch_add(1, Ordering::Relaxed) + 1);
            let items = batch
                .items
                .iter()
                .map(|item| {
                    let mut doc = item_document(&batch, item);
                    doc.insert("batch_sequence", Bson::Int64(i64::try_from(seq.0)?));
                    Ok(doc)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((batch_document(&batch, seq, 0), items))
        })
        .collect::<anyhow::Result<_>>()?;
    let prepared = Arc::new(std::sync::Mutex::new(
        prepared.into_iter().map(Some).collect::<Vec<_>>(),
    ));
    let options = TransactionOptions::builder()
        .write_concern(WriteConcern::builder().w(Acknowledgment::Majority).build())
        .build();
    let cell = measure(clients, batches, size, move |n| {
        let (client, db, options) = (client.clone(), db.clone(), options.clone());
        let taken = prepared.lock().ok().and_then(|mut p| p[n].take());
        async move {
            let (batch, items) = taken.context("each prepared batch is inserted once")?;
            let mut session = client.start_session().await?;
            session.start_transaction().with_options(options).await?;
            db.collection::<Document>("batches")
                .insert_one(batch)
                .session(&mut session)
                .await?;
            db.collection::<Document>("batch_items")
                .insert_many(items)
                .session(&mut session)
                .await?;
            session.commit_transaction().await?;
            Ok(())
        }
    })
    .await?;
    store.drop_database().await?;
    Ok(cell)
}

pub async fn run(args: WriterArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    println!(
        "writer benchmark: items/s and per-batch latency (ms); raw = the same documents \
         inserted in a transaction through the driver"
    );
    println!(
        "{:>6} {:>7} {:>8} | {:>10} {:>7} {:>7} {:>7} | {:>10} {:>7} {:>7} | {:>10} | {:>12}",
        "items",
        "clients",
        "batches",
        "writer/s",
        "p50",
        "p95",
        "p99",
        "raw/s",
        "p50",
        "p95",
        "writer/raw",
        "writer peak"
    );
    for &size in &args.sizes {
        for &clients in &args.clients {
            let batches = (args.items_per_cell / size).max(clients * 2);
            let database = format!("bench_writer_{}", uuid::Uuid::new_v4().simple());
            let (writer, url) = crate::process::writer(&args.env, &database, &http).await?;
            let ours = writer_cell(&http, &url, size, clients, batches).await?;
            let rss_mib = crate::process::peak_rss_mib(&writer);
            let rss = crate::process::peak_rss(&writer);
            drop(writer);
            MongoStore::connect(MongoConfig::new(&args.env.mongodb_url, &database))
                .await?
                .drop_database()
                .await?;
            let raw = raw_cell(&args.env, size, clients, batches).await?;
            println!(
                "{size:>6} {clients:>7} {batches:>8} | {:>10.0} {:>7.1} {:>7.1} {:>7.1} | {:>10.0} {:>7.1} {:>7.1} | {:>10.2} | {rss:>12}",
                ours.items_per_second(),
                ours.latency.p50,
                ours.latency.p95,
                ours.latency.p99,
                raw.items_per_second(),
                raw.latency.p50,
                raw.latency.p95,
                ours.items_per_second() / raw.items_per_second(),
            );
            crate::results::record(serde_json::json!({
                "part": "writer",
                "items": size,
                "clients": clients,
                "batches": batches,
                "writer_items_s": ours.items_per_second(),
                "p50": ours.latency.p50,
                "p95": ours.latency.p95,
                "p99": ours.latency.p99,
                "raw_items_s": raw.items_per_second(),
                "raw_p50": raw.latency.p50,
                "raw_p95": raw.latency.p95,
                "writer_rss_mib": rss_mib,
            }));
        }
    }
    Ok(())
}
