//! `outbox-bench rtt`: the drain rate against round-trip time. A delaying
//! proxy (the chaos suite's, half the round trip each way) sits between the
//! relay and MongoDB, Pub/Sub, or both; one relay per setting drains the
//! same backlogs, one stream per batch size and ordering mode (each paused
//! while stored, then resumed alone and timed until its last commit). Also
//! the writer's latency per batch with MongoDB a round trip away, and the
//! seed's publisher algorithm (one item at a time) beside ours.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chaos::proxy::Proxy;
use clap::Args;
use mongodb::bson::{Document, doc};
use outbox_core::ingest::{IngestRules, build_batch};
use outbox_core::model::{BatchStatus, ItemSequence};
use outbox_core::publish::{OrderingKeyMode, OutboxMessage, Publisher};
use outbox_core::store::{BatchStore, OutboxStore, StreamStore};
use outbox_core::stream::{PoisonPolicy, StreamDefinition, StreamName};
use outbox_mongo::{MongoConfig, MongoStore};
use relay::pubsub::{self, PubSubPublisher};
use tokio::time::Instant;

use crate::Env;
use crate::stats::{Percentiles, per_second};
use crate::writer::sample_items;

#[derive(Args)]
pub struct RttArgs {
    #[command(flatten)]
    env: Env,
    /// Round trips added to both MongoDB and Pub/Sub, in ms (0: loopback,
    /// no proxy).
    #[arg(long, value_delimiter = ',', default_value = "0,1,5,20,50")]
    rtt_ms: Vec<u64>,
    /// Round trips added to MongoDB alone and to Pub/Sub alone, in ms.
    #[arg(long, value_delimiter = ',', default_value = "20")]
    one_side_ms: Vec<u64>,
    /// Items per batch (one stream each).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    sizes: Vec<usize>,
    /// Ordering key modes (one stream each).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "global,field:/vendor_name"
    )]
    modes: Vec<OrderingKeyMode>,
    /// Items in each backlog, per batch size: 50 x this for batches of 10,
    /// 60 x for 100, 80 x for 1,000: five to eight groups of 1,000 items
    /// (the relay's page), so that the rate between the first commit and
    /// the last spans several group writes (one group can commit a
    /// hundred small batches at once).
    #[arg(long, default_value_t = 100)]
    scale: usize,
    /// The writer's latency at these round trips to MongoDB, in ms.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    writer_rtt_ms: Vec<u64>,
    /// The seed's algorithm beside ours at these round trips (both sides).
    #[arg(long, value_delimiter = ',', default_value = "0,20")]
    seed_rtt_ms: Vec<u64>,
}

/// Where the relay's traffic is delayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Both,
    MongoDb,
    PubSub,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::MongoDb => "MongoDB",
            Self::PubSub => "Pub/Sub",
        }
    }
}

/// The proxies of one setting, and the addresses to use.
struct Route {
    mongodb_url: String,
    emulator_host: String,
    _proxies: Vec<Proxy>,
}

fn host_of(url: &str) -> anyhow::Result<SocketAddr> {
    let host = url
        .trim_start_matches("mongodb://")
        .split(['/', '?'])
        .next()
        .unwrap_or_default()
        .split(',')
        .next()
        .unwrap_or_default();
    host.parse()
        .with_context(|| format!("MONGODB_URL host {host:?} is not ip:port"))
}

async fn route(env: &Env, rtt: Duration, side: Side) -> anyhow::Result<Route> {
    let mut route = Route {
        mongodb_url: env.mongodb_url.clone(),
        emulator_host: env.pubsub_emulator_host.clone(),
        _proxies: Vec::new(),
    };
    if rtt.is_zero() {
        return Ok(route);
    }
    let each_way = (rtt / 2, rtt / 2);
    if side != Side::PubSub {
        let proxy = Proxy::start(host_of(&env.mongodb_url)?, each_way).await?;
        route.mongodb_url = format!("mongodb://{}/?directConnection=true", proxy.address);
        route._proxies.push(proxy);
    }
    if side != Side::MongoDb {
        let proxy = Proxy::start(env.pubsub_emulator_host.parse()?, each_way).await?;
        route.emulator_host = proxy.address.to_string();
        route._proxies.push(proxy);
    }
    Ok(route)
}

fn stream_name(size: usize, mode: &OrderingKeyMode) -> anyhow::Result<StreamName> {
    let tag = match mode {
        OrderingKeyMode::Global => "global",
        OrderingKeyMode::Batch => "batch",
        _ => "field",
    };
    format!("s{size}-{tag}")
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn backlog_items(size: usize, scale: usize) -> usize {
    let factor = match size {
        0..=10 => 50,
        11..=100 => 60,
        _ => 80,
    };
    (factor * scale).max(size)
}

pub async fn run(args: RttArgs) -> anyhow::Result<()> {
    let mut settings: Vec<(Side, u64)> = args.rtt_ms.iter().map(|&ms| (Side::Both, ms)).collect();
    for &ms in &args.one_side_ms {
        settings.push((Side::MongoDb, ms));
        settings.push((Side::PubSub, ms));
    }
    println!(
        "rtt benchmark: each backlog drained by one relay whose MongoDB and/or Pub/Sub traffic goes through a proxy adding the round trip; items/s from the first commit seen to the last"
    );
    println!(
        "{:>8} {:>7} {:>20} {:>6} {:>8} {:>10}",
        "delayed", "rtt ms", "mode", "batch", "items", "items/s"
    );
    let mut loopback = std::collections::HashMap::new();
    let mut all = std::collections::HashMap::new();
    for (side, ms) in settings {
        let rates = drain_setting(&args, side, Duration::from_millis(ms)).await?;
        for (size, mode, items, rate) in rates {
            if ms == 0 {
                loopback.insert((size, mode.to_string()), rate);
            }
            all.insert((side, ms, size, mode.to_string()), rate);
            let base = loopback.get(&(size, mode.to_string())).copied();
            println!(
                "{:>8} {ms:>7} {:>20} {size:>6} {items:>8} {rate:>10.0}{}",
                side.name(),
                mode.to_string(),
                base.map_or_else(String::new, |b| format!("   ({:.2} of loopback)", rate / b))
            );
            crate::results::record(serde_json::json!({
                "part": "rtt",
                "side": side.name(),
                "rtt_ms": ms,
                "mode": mode.to_string(),
                "batch_size": size,
                "items": items,
                "items_s": rate,
                "loopback_items_s": base,
            }));
        }
    }
    println!();
    writer(&args).await?;
    println!();
    seed(&args, &all).await?;
    Ok(())
}

/// One relay behind the proxies of `side`; every (size, mode) stream
/// drained in turn. Returns (size, mode, items, items/s).
async fn drain_setting(
    args: &RttArgs,
    side: Side,
    rtt: Duration,
) -> anyhow::Result<Vec<(usize, OrderingKeyMode, usize, f64)>> {
    let env = &args.env;
    let http = reqwest::Client::new();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("bench_rtt_{suffix}");
    let store = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
    store.ensure_schema().await?;
    let mut runs = Vec::new();
    for &size in &args.sizes {
        for mode in &args.modes {
            let name = stream_name(size, mode)?;
            let topic = format!("bench-rtt-{suffix}-{name}");
            pubsub::ensure_topic(&crate::relay_drain::pubsub_config(env, &topic)).await?;
            store
                .put_stream(&StreamDefinition {
                    name: name.clone(),
                    topic,
                    ordering: mode.clone(),
                    on_poison: PoisonPolicy::Halt,
                    schema: None,
                    writers: None,
                    created_at: None,
                    updated_at: None,
                    claim_check: None,
                })
                .await?;
            store.set_paused(&name, true).await?;
            let items = backlog_items(size, args.scale);
            let values = sample_items(size, "rtt");
            for _ in 0..items / size {
                let mut batch = build_batch(
                    values.clone(),
                    &IngestRules::default(),
                    None,
                    chrono::Utc::now(),
                )?;
                batch.stream = name.clone();
                store
                    .insert_batch(&batch, Instant::now() + Duration::from_secs(60))
                    .await?;
            }
            runs.push((size, mode.clone(), name, (items / size) * size));
        }
    }
    let route = route(env, rtt, side).await?;
    let port = crate::process::free_port()?;
    let relay = crate::process::spawn_logged(
        &env.bin_dir,
        "outbox-relay",
        "rtt-relay",
        &[
            ("MONGODB_URL", route.mongodb_url.clone()),
            ("MONGODB_DATABASE", database.clone()),
            ("PUBSUB_EMULATOR_HOST", route.emulator_host.clone()),
            ("PUBSUB_PROJECT_ID", crate::relay_drain::PROJECT.to_owned()),
            ("PUBSUB_TOPIC", format!("bench-rtt-{suffix}-default")),
            ("RELAY_ID", "bench-rtt".to_owned()),
            ("RELAY_ADMIN_BIND", format!("127.0.0.1:{port}")),
            ("OUTBOX_CHANGE_STREAM", env.change_stream().to_string()),
            (
                "LEASE_KILL_ON_BLOCKED_READ",
                (!env.change_stream()).to_string(),
            ),
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.05".to_owned()),
            ("LEASE_TTL_SECONDS", "10".to_owned()),
        ],
    )?;
    // It leads every stream (the only replica).
    let cluster = format!("http://127.0.0.1:{port}/api/v1/cluster");
    let streams = runs.len() + 1;
    crate::process::wait_for(
        Duration::from_secs(120),
        "the relay to lead every stream",
        || {
            let request = http.get(&cluster).send();
            async move {
                let Ok(response) = request.await else {
                    return false;
                };
                let Ok(body) = response.json::<serde_json::Value>().await else {
                    return false;
                };
                body["replicas"][0]["leads"]
                    .as_array()
                    .is_some_and(|l| l.len() == streams)
            }
        },
    )
    .await?;
    let batches = mongodb::Client::with_uri_str(&env.mongodb_url)
        .await?
        .database(&database)
        .collection::<Document>("batches");
    let mut rates = Vec::new();
    for (size, mode, name, items) in runs {
        store.set_paused(&name, false).await?;
        // The rate between the first commit seen and the last: the drain
        // running, not the wake-up after the resume.
        let expected = (items / size) as u64;
        let mut first: Option<(Instant, u64)> = None;
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let committed = batches
                .count_documents(doc! { "stream": name.as_str(), "status": "committed" })
                .await?;
            if committed > 0 && first.is_none() {
                first = Some((Instant::now(), committed));
            }
            if committed == expected {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "stream {name} did not drain");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (at, done) = first.unwrap_or((Instant::now(), 0));
        let rate = if done == expected {
            // Drained between two looks: as fast as a look can tell.
            f64::NAN
        } else {
            per_second(((expected - done) as usize) * size, at.elapsed())
        };
        rates.push((size, mode, items, rate));
    }
    drop(relay);
    store.drop_database().await?;
    Ok(rates)
}

/// The writer's latency per 100-item batch, one client, with MongoDB a
/// round trip away.
async fn writer(args: &RttArgs) -> anyhow::Result<()> {
    let env = &args.env;
    let http = reqwest::Client::new();
    println!("writer, one client, batches of 100, MongoDB a round trip away:");
    println!(
        "{:>7} {:>8} {:>8} {:>8}",
        "rtt ms", "p50 ms", "p95 ms", "items/s"
    );
    for &ms in &args.writer_rtt_ms {
        let route = route(env, Duration::from_millis(ms), Side::MongoDb).await?;
        let database = format!("bench_rtt_w_{}", uuid::Uuid::new_v4().simple());
        let routed = Env {
            mongodb_url: route.mongodb_url.clone(),
            ..env.clone()
        };
        let (mut process, url) = crate::process::writer(&routed, &database, &http).await?;
        let body = serde_json::to_vec(&sample_items(100, "rtt"))?;
        let mut latencies = Vec::new();
        let started = Instant::now();
        for _ in 0..100 {
            let at = Instant::now();
            let response = http
                .post(format!("{url}/api/v1/batch/process"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 201,
                "writer answered {}",
                response.status()
            );
            latencies.push(at.elapsed());
        }
        let rate = per_second(100 * 100, started.elapsed());
        let p = Percentiles::of(latencies);
        println!("{ms:>7} {:>8.1} {:>8.1} {rate:>8.0}", p.p50, p.p95);
        crate::results::record(serde_json::json!({
            "part": "rtt-writer", "rtt_ms": ms, "p50_ms": p.p50, "p95_ms": p.p95, "items_s": rate,
        }));
        let _ = process.kill().await;
        MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database))
            .await?
            .drop_database()
            .await?;
    }
    Ok(())
}

/// The seed's publisher (docs/design/seed 000): the oldest pending batch,
/// its items one at a time, each awaited and then updated, then the batch
/// marked committed. In this process, through the same proxies.
async fn seed_drain(store: &MongoStore, publisher: &PubSubPublisher) -> anyhow::Result<usize> {
    let stream = StreamName::default_stream();
    let items = store.database().collection::<Document>("batch_items");
    let batches = store.database().collection::<Document>("batches");
    let mut published = 0;
    while let Some(batch) = store.head_batch(&stream).await? {
        let total = u32::try_from(batch.total_items)?;
        let page = store
            .unsent_items(&batch.batch_id, ItemSequence(0), total)
            .await?;
        for item in &page {
            let message = OutboxMessage::for_item(item, &batch, &OrderingKeyMode::Global);
            let id = publisher
                .publish(message)
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e:?}"))?;
            items
                .update_one(
                    doc! { "_id": item.item_id.to_string() },
                    doc! { "$set": {
                        "status": "sent", "sent": true, "publish_id": id,
                        "sent_at": mongodb::bson::DateTime::now(),
                    } },
                )
                .await?;
            published += 1;
        }
        batches
            .update_one(
                doc! { "batch_id": batch.batch_id.as_str() },
                doc! { "$set": {
                    "status": BatchStatus::Committed.as_str(),
                    "committed_at": mongodb::bson::DateTime::now(),
                } },
            )
            .await?;
    }
    Ok(published)
}

/// The seed's algorithm beside ours (batches of 100, `global`).
async fn seed(
    args: &RttArgs,
    ours: &std::collections::HashMap<(Side, u64, usize, String), f64>,
) -> anyhow::Result<()> {
    let env = &args.env;
    println!(
        "the seed's publisher algorithm (one item at a time, each awaited and updated) on batches of 100, global key:"
    );
    println!(
        "{:>7} {:>8} {:>12} {:>12} {:>10}",
        "rtt ms", "items", "seed items/s", "ours items/s", "ours/seed"
    );
    for &ms in &args.seed_rtt_ms {
        let rtt = Duration::from_millis(ms);
        let route = route(env, rtt, Side::Both).await?;
        let database = format!("bench_seed_{}", uuid::Uuid::new_v4().simple());
        let direct = MongoStore::connect(MongoConfig::new(&env.mongodb_url, &database)).await?;
        direct.ensure_schema().await?;
        // A backlog the seed drains in under a minute at 20 ms.
        let items = if ms >= 10 { 300 } else { 2_000 };
        let values = sample_items(100, "seed");
        for _ in 0..items / 100 {
            let batch = build_batch(
                values.clone(),
                &IngestRules::default(),
                None,
                chrono::Utc::now(),
            )?;
            direct
                .insert_batch(&batch, Instant::now() + Duration::from_secs(60))
                .await?;
        }
        let routed = MongoStore::connect(MongoConfig::new(&route.mongodb_url, &database)).await?;
        let topic = format!("bench-seed-{}", uuid::Uuid::new_v4().simple());
        let mut config = crate::relay_drain::pubsub_config(env, &topic);
        pubsub::ensure_topic(&config).await?;
        config.emulator_host = Some(route.emulator_host.clone());
        let publisher = PubSubPublisher::connect(&config).await?;
        let started = Instant::now();
        let published = seed_drain(&routed, &publisher).await?;
        let seed_rate = per_second(published, started.elapsed());
        let ours = ours
            .get(&(Side::Both, ms, 100, "global".to_owned()))
            .copied();
        println!(
            "{ms:>7} {published:>8} {seed_rate:>12.0} {:>12} {:>10}",
            ours.map_or_else(|| "-".to_owned(), |o| format!("{o:.0}")),
            ours.map_or_else(|| "-".to_owned(), |o| format!("{:.1}", o / seed_rate))
        );
        crate::results::record(serde_json::json!({
            "part": "seed", "rtt_ms": ms, "items": published, "seed_items_s": seed_rate, "ours_items_s": ours,
        }));
        direct.drop_database().await?;
    }
    Ok(())
}
