//! One seed: the workload, the fault schedule, the run on virtual time,
//! and the checks once the faults healed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::ingest::{self, BodyFormat, IngestRules};
use outbox_core::model::Sequence;
use outbox_core::model::{BatchId, Idempotency};
use outbox_core::publish::OrderingKeyMode;
use outbox_core::replay::{ReplayId, ReplayJob, ReplayRequest, ReplayState};
use outbox_core::store::{BatchStore, ReplayStore, StoreError, StreamStore};
use outbox_core::stream::{PoisonPolicy, StreamDefinition, StreamName};
use outbox_core::world;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relay::retention::RetentionSettings;
use relay::{Cluster, ClusterSettings, ClusterStores};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::process::Process;
use crate::pubsub::{PubSub, PubSubKnobs, SimPublishers};
use crate::replica_set::{FaultCounts, Knobs, ReplicaSet};
use crate::sim_store::SimStore;
use crate::subscription::{ConsumerKnobs, Subscription};
use crate::trace::Trace;

/// How long after the last fault every accepted item must be delivered
/// and handled: the lease TTL (10 s), the relay's backoff cap (2 s), the
/// consumer's limits (20 s for a batch's rest, 15 s for a blocked key)
/// and the ack deadline (10 s), with room.
pub const DELIVERY_BOUND: Duration = Duration::from_secs(120);
const LEASE_TTL: Duration = Duration::from_secs(10);
/// How long a stream may go without a live lease while a replica could
/// take it (a primary is up, and a replica is alive, not frozen, and reads
/// its leases): a standby's poll (0.5 s), the relay's backoff cap (2 s), a
/// lease read's and a lease write's time limits (1 s each), with room for
/// lost answers and a lagging majority. An orphaned transaction left
/// holding the lease lasts the lifetime limit, 60 to 90 s.
pub const TAKEOVER_BOUND: Duration = Duration::from_secs(20);
/// How long after delivery every live replica must lead its floor share:
/// a TTL for a dead replica's record to expire, a few polls, with room.
const SHARE_BOUND: Duration = Duration::from_secs(30);
/// The window faults are scheduled in; the workload is submitted in its
/// first half.
const FAULT_WINDOW_MS: u64 = 60_000;

/// What a run found.
pub struct Outcome {
    pub seed: u64,
    pub trace: Trace,
    pub violations: Vec<String>,
    pub faults: FaultCounts,
    pub accepted_items: usize,
    pub checks: usize,
    pub virtual_seconds: u64,
    /// The longest a stream went without a live lease while a replica
    /// could take it.
    pub longest_unled: Duration,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// A stream of the workload and what was accepted on it.
struct SimStream {
    definition: StreamDefinition,
    subscription: Arc<Subscription>,
}

/// What the writers' clients were told.
#[derive(Default)]
struct Answers {
    /// Batch id to (stream, sequence, item count, poison positions).
    accepted: BTreeMap<String, (String, u64, u32, BTreeSet<u32>)>,
    /// Batch ids answered with an error that promises nothing was stored.
    refused: BTreeSet<String>,
}

fn pick<T: Clone>(options: &[T]) -> T {
    options[(world::random_u64() % options.len() as u64) as usize].clone()
}

fn chance(p: f64) -> bool {
    world::random_fraction() < p
}

fn ms(range: std::ops::RangeInclusive<u64>) -> Duration {
    Duration::from_millis(world::random_range(range))
}

/// Runs `seed` on a runtime of its own, on one thread, on virtual time.
pub fn run(seed: u64) -> Outcome {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    // The runtime's own random choices follow the seed too (see
    // .cargo/config.toml); without `tokio_unstable` a seed may not replay
    // exactly, and `a_seed_replays_exactly` says so.
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let runtime = builder.build().expect("a current-thread runtime");
    let epoch: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let outcome = runtime.block_on(async move {
        world::simulate(seed, epoch);
        let outcome = simulate(seed).await;
        world::leave();
        outcome
    });
    runtime.shutdown_background();
    outcome
}

struct Replica {
    process: Arc<Process>,
    stop: CancellationToken,
}

/// The process name of a random stream's leader, if any stream has one.
fn leader_of_some_stream(rs: &ReplicaSet, streams: &[SimStream]) -> Option<String> {
    let leaders: Vec<String> = streams
        .iter()
        .filter_map(|s| rs.primary().lease_of(&s.definition.name))
        .map(|l| outbox_core::store::instance_name(&l.holder).to_owned())
        .collect();
    (!leaders.is_empty()).then(|| pick(&leaders))
}

/// Watches every stream's lease on the store's clock: how long each goes
/// without a live lease while some replica could take it.
async fn watch_leases(
    rs: Arc<ReplicaSet>,
    streams: Vec<StreamName>,
    replicas: Arc<Mutex<Vec<Arc<Process>>>>,
    longest: Arc<Mutex<(Duration, Vec<String>)>>,
) {
    let mut unled_since: BTreeMap<StreamName, tokio::time::Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tokio::time::Instant::now();
        let can_lead = !rs.is_down()
            && lock(&replicas)
                .iter()
                .any(|p| p.is_active() && !rs.reads_are_slow(p.name()));
        let Ok(now_ms) = rs.clock_ms().await else {
            continue;
        };
        for stream in &streams {
            let led = rs
                .primary()
                .lease_of(stream)
                .is_some_and(|l| l.expires_at_ms > now_ms);
            if led || !can_lead {
                unled_since.remove(stream);
                continue;
            }
            let since = *unled_since.entry(stream.clone()).or_insert(now);
            let unled = now - since;
            let mut longest = lock(&longest);
            longest.0 = longest.0.max(unled);
            if unled > TAKEOVER_BOUND && !longest.1.iter().any(|v| v.starts_with(stream.as_str())) {
                longest.1.push(format!(
                    "{stream} had no live lease for over {} s while a replica could take it",
                    TAKEOVER_BOUND.as_secs()
                ));
            }
        }
    }
}

fn start_replica(name: &str, rs: &Arc<ReplicaSet>, pubsub: &Arc<PubSub>, trace: &Trace) -> Replica {
    let process = Arc::new(Process::new(name));
    let store = SimStore::new(Arc::clone(rs), Arc::clone(&process));
    let publishers = Arc::new(SimPublishers::new(Arc::clone(pubsub), Arc::clone(&process)));
    let epoch_of = Arc::clone(&publishers.epoch_of);
    let id = outbox_core::store::instance_id(name, world::random_u64() as u32);
    let cluster = Arc::new(Cluster::new(
        ClusterSettings {
            relay_id: id.clone(),
            admin_url: String::new(),
            page_size: 4,
            ttl: LEASE_TTL,
            poll_interval: Duration::from_millis(500),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(5),
            retention: RetentionSettings {
                committed: Some(Duration::from_secs(40)),
                dead_letters: Some(Duration::from_secs(40)),
                interval: Duration::from_secs(5),
                abandoned: Duration::from_secs(60),
                objects: Default::default(),
            },
            default_stream: StreamDefinition {
                name: StreamName::default_stream(),
                topic: "default".to_owned(),
                ordering: OrderingKeyMode::Global,
                on_poison: PoisonPolicy::DeadLetter,
                schema: None,
                writers: None,
                created_at: None,
                updated_at: None,
                claim_check: None,
            },
            max_streams: 10,
            admin_token: None,
        },
        ClusterStores {
            outbox: Arc::new(store.clone()),
            leases: Arc::new(store.clone()),
            streams: Arc::new(store.clone()),
            members: Arc::new(store.clone()),
            replays: Arc::new(store),
            // The simulated writers store no payload by reference, so
            // retention has no object to release.
            objects: Arc::new(outbox_core::memory::MemoryStore::new()),
        },
        publishers,
    ));
    let weak = Arc::downgrade(&cluster);
    let _ = epoch_of.set(Box::new(move |stream: &str| {
        let cluster = weak.upgrade()?;
        let view = cluster.stream(&stream.parse().ok()?)?;
        view.lease.filter(|_| view.leading).map(|l| l.epoch)
    }));
    let stop = CancellationToken::new();
    tokio::spawn(Arc::clone(&cluster).run(stop.clone()));
    trace.log(format!("relay: {id} started"));
    Replica { process, stop }
}

/// One client of the writer: submits its batches one after another, each
/// until it has a definite answer, with an idempotency key, as the
/// README tells clients to.
async fn client(
    index: usize,
    batches: Vec<(StreamDefinition, Vec<Value>)>,
    store: SimStore,
    answers: Arc<Mutex<Answers>>,
    trace: Trace,
) {
    for (number, (definition, items)) in batches.into_iter().enumerate() {
        tokio::time::sleep(ms(0..=2_000)).await;
        let body = serde_json::to_vec(&items).unwrap_or_default();
        let key = format!("client{index}-batch{number}");
        let idempotency = Idempotency {
            key: key.clone(),
            request_hash: ingest::request_hash(&body),
        };
        let rules = IngestRules {
            ordering: definition.ordering.clone(),
            stream: definition.name.clone(),
            ..IngestRules::default()
        };
        let poison: BTreeSet<u32> = items
            .iter()
            .enumerate()
            .filter(|(_, item)| item["poison"] == Value::Bool(true))
            .map(|(i, _)| i as u32 + 1)
            .collect();
        let mut pause = Duration::from_millis(100);
        loop {
            // What the writer does for a request: the key first, then the
            // batch's transaction.
            let accepted = match store.find_idempotent(&definition.name, &key).await {
                Ok(Some((_, Some(summary)))) => Some(summary),
                Ok(Some((_, None))) => {
                    trace.log(format!(
                        "client {index}: {key} expired before it was confirmed"
                    ));
                    break;
                }
                Ok(None) => {
                    let values = ingest::parse_body(&body, BodyFormat::Json, rules.max_items)
                        .expect("the workload's bodies are valid");
                    let batch = ingest::build_batch(
                        values,
                        &rules,
                        Some(idempotency.clone()),
                        world::now(),
                    )
                    .expect("the workload's batches are valid");
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    match store.insert_batch(&batch, deadline).await {
                        Ok(summary) => Some(summary),
                        Err(
                            StoreError::OutcomeUnknown(_) | StoreError::DuplicateIdempotencyKey,
                        ) => None,
                        Err(StoreError::Unavailable(_) | StoreError::Conflict(_)) => {
                            lock(&answers).refused.insert(batch.batch_id.to_string());
                            None
                        }
                        Err(other) => panic!("unexpected answer to a batch: {other}"),
                    }
                }
                Err(_) => None,
            };
            if let Some(summary) = accepted {
                trace.log(format!(
                    "client {index}: {key} stored as {} {} ({} items)",
                    summary.stream, summary.batch_sequence.0, summary.total_items
                ));
                lock(&answers).accepted.insert(
                    summary.batch_id.to_string(),
                    (
                        summary.stream.to_string(),
                        summary.batch_sequence.0,
                        summary.total_items as u32,
                        poison.clone(),
                    ),
                );
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The workload a seed draws: streams, their modes, batches.
fn workload(trace: &Trace) -> Vec<(StreamDefinition, bool)> {
    let count = world::random_range(1..=2);
    (0..count)
        .map(|i| {
            let mode: OrderingKeyMode = pick(&["global", "batch", "field:/vendor_name"])
                .parse()
                .expect("a mode");
            let poison = chance(0.3);
            let name = format!("s{i}");
            trace.log(format!("stream {name}: {mode}, poison items: {poison}"));
            (
                StreamDefinition {
                    name: name.parse().expect("a stream name"),
                    topic: name.clone(),
                    ordering: mode.with_default_key(&name),
                    on_poison: PoisonPolicy::DeadLetter,
                    schema: None,
                    writers: None,
                    created_at: None,
                    updated_at: None,
                    claim_check: None,
                },
                poison,
            )
        })
        .collect()
}

async fn simulate(seed: u64) -> Outcome {
    let trace = Trace::new();
    trace.log(format!("seed {seed}"));
    let rs = ReplicaSet::new(trace.clone(), seed);
    let pubsub = PubSub::new(trace.clone());
    let admin = SimStore::new(Arc::clone(&rs), Arc::new(Process::new("setup")));
    let mut streams = Vec::new();
    let defined = workload(&trace);
    for (definition, _) in &defined {
        rs.primary()
            .put_stream(definition)
            .await
            .expect("in memory");
        let whole = definition.ordering == OrderingKeyMode::Global;
        let clients = world::random_range(1..=2) as usize;
        let outstanding = pick(&[10, 100]);
        trace.log(format!(
            "subscription {}: {clients} clients, {outstanding} outstanding",
            definition.topic
        ));
        streams.push(SimStream {
            subscription: Subscription::new(
                Arc::clone(&pubsub),
                &definition.topic,
                whole,
                outstanding,
                clients,
                trace.clone(),
            ),
            definition: definition.clone(),
        });
    }
    rs.replicate();

    // Replication and deliveries run for the whole run.
    {
        let rs = Arc::clone(&rs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(rs.knobs().lag).await;
                rs.replicate();
            }
        });
    }
    for stream in &streams {
        let sub = Arc::clone(&stream.subscription);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                sub.round();
            }
        });
    }

    {
        let rs = Arc::clone(&rs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::sessions::REAPER_PERIOD).await;
                rs.reap();
            }
        });
    }

    let names: Vec<String> = (1..=world::random_range(2..=3))
        .map(|i| format!("relay-{i}"))
        .collect();
    let mut replicas: BTreeMap<String, Replica> = names
        .iter()
        .map(|name| (name.clone(), start_replica(name, &rs, &pubsub, &trace)))
        .collect();
    let processes: Arc<Mutex<Vec<Arc<Process>>>> = Arc::new(Mutex::new(
        replicas.values().map(|r| Arc::clone(&r.process)).collect(),
    ));
    let unled: Arc<Mutex<(Duration, Vec<String>)>> = Arc::default();
    let watcher = tokio::spawn(watch_leases(
        Arc::clone(&rs),
        streams.iter().map(|s| s.definition.name.clone()).collect(),
        Arc::clone(&processes),
        Arc::clone(&unled),
    ));

    // The writers' clients.
    let answers = Arc::new(Mutex::new(Answers::default()));
    let mut clients = Vec::new();
    for index in 0..world::random_range(1..=3) as usize {
        let batches: Vec<(StreamDefinition, Vec<Value>)> = (0..world::random_range(3..=8))
            .map(|_| {
                let (definition, poison) = pick(&defined);
                let size = if chance(0.1) {
                    30
                } else {
                    world::random_range(1..=8)
                };
                let items = (1..=size)
                    .map(|n| {
                        let mut item = json!({
                            "request_id": format!("c{index}-{n}"),
                            "vendor_name": pick(&["acme", "globex", "initech"]),
                            "n": n,
                        });
                        if poison && chance(0.05) {
                            item["poison"] = Value::Bool(true);
                        }
                        item
                    })
                    .collect();
                (definition, items)
            })
            .collect();
        let store = SimStore::new(
            Arc::clone(&rs),
            Arc::new(Process::new(format!("writer-{index}"))),
        );
        clients.push(tokio::spawn(client(
            index,
            batches,
            store,
            Arc::clone(&answers),
            trace.clone(),
        )));
    }

    // An operator replays committed ranges to the stream's topic: its own
    // draws, so the rest of a seed's schedule does not depend on them.
    let replays: Arc<Mutex<Vec<(String, ReplayId)>>> = Arc::default();
    {
        let mut operator = StdRng::seed_from_u64(seed ^ 0x0e7a_70e5_9e37_79b9);
        let plan: Vec<(u64, usize, f64, f64)> = (0..operator.random_range(0..=2))
            .map(|_| {
                (
                    operator.random_range(5_000..=FAULT_WINDOW_MS),
                    operator.random_range(0..defined.len()),
                    operator.random::<f64>(),
                    operator.random::<f64>(),
                )
            })
            .collect();
        let store = SimStore::new(Arc::clone(&rs), Arc::new(Process::new("operator")));
        let definitions: Vec<StreamDefinition> = defined.iter().map(|(d, _)| d.clone()).collect();
        let replays = Arc::clone(&replays);
        let trace = trace.clone();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            for (at, stream, from, length) in plan {
                tokio::time::sleep_until(started + Duration::from_millis(at)).await;
                let definition = &definitions[stream];
                if let Some(id) = start_replay(&store, definition, from, length, &trace).await {
                    lock(&replays).push((definition.name.to_string(), id));
                }
            }
        });
    }

    // The fault schedule.
    let mut events: Vec<(u64, u32)> = (0..world::random_range(3..=10))
        .map(|_| {
            (
                world::random_range(0..=FAULT_WINDOW_MS),
                world::random_range(0..=13) as u32,
            )
        })
        .collect();
    events.sort_unstable();
    let started = tokio::time::Instant::now();
    let mut last_fault = started;
    let mut own = FaultCounts::new();
    for (at, kind) in events {
        tokio::time::sleep_until(started + Duration::from_millis(at)).await;
        let victim = pick(&names);
        match kind {
            0 | 1 => {
                // Often while replication lags, so that writes wait for
                // their majority when the primary goes: those roll back.
                if chance(0.7) {
                    rs.set_knobs(Knobs {
                        lag: ms(300..=1_500),
                        ..rs.knobs()
                    });
                    tokio::time::sleep(ms(100..=1_000)).await;
                }
                rs.step_down(ms(500..=8_000)).await;
            }
            2 => {
                let knobs = Knobs {
                    lag: ms(200..=2_000),
                    ..rs.knobs()
                };
                trace.log(format!(
                    "mongo: replication lags {} ms",
                    knobs.lag.as_millis()
                ));
                rs.set_knobs(knobs);
            }
            3 => {
                let knobs = Knobs {
                    lost_answers: world::random_range(5..=30) as f64 / 100.0,
                    ..rs.knobs()
                };
                trace.log(format!("mongo: answers lost at {:.2}", knobs.lost_answers));
                rs.set_knobs(knobs);
            }
            4 => {
                let knobs = Knobs {
                    conflicts: 0.2,
                    ..rs.knobs()
                };
                trace.log("mongo: write conflicts at 0.20");
                rs.set_knobs(knobs);
            }
            5 => {
                // Half the kills land inside a fenced transaction of a
                // leader, the moment that leaves an orphan holding a lease.
                let inside = chance(0.5);
                let victim = if inside {
                    leader_of_some_stream(&rs, &streams).unwrap_or(victim)
                } else {
                    victim
                };
                if let Some(replica) = replicas.get(&victim) {
                    if inside {
                        rs.doom(&victim);
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                        while !replica.process.is_dead() && tokio::time::Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        rs.pardon(&victim);
                    }
                    if !replica.process.is_dead() {
                        replica.process.kill();
                        trace.log(format!("relay: {victim} killed"));
                    }
                    *own.entry("relay killed").or_default() += 1;
                    let rs = Arc::clone(&rs);
                    let pubsub = Arc::clone(&pubsub);
                    let trace2 = trace.clone();
                    let name = victim.clone();
                    tokio::time::sleep(ms(1_000..=8_000)).await;
                    let replica = start_replica(&name, &rs, &pubsub, &trace2);
                    lock(&processes).push(Arc::clone(&replica.process));
                    replicas.insert(name.clone(), replica);
                }
            }
            6 => {
                if let Some(replica) = replicas.get(&victim) {
                    let length = LEASE_TTL + ms(1_000..=8_000);
                    trace.log(format!(
                        "relay: {victim} frozen for {} ms",
                        length.as_millis()
                    ));
                    *own.entry("relay frozen").or_default() += 1;
                    replica.process.freeze(length);
                }
            }
            7 => {
                let knobs = PubSubKnobs {
                    failures: 0.3,
                    duplicates: 0.1,
                    latency_ms: 200,
                };
                trace.log("pubsub: publishes fail at 0.30, land twice at 0.10");
                pubsub.set_knobs(knobs);
            }
            8 => {
                let stream = pick(
                    &streams
                        .iter()
                        .map(|s| s.subscription.clone())
                        .collect::<Vec<_>>(),
                );
                stream.move_keys();
            }
            9 => {
                let stream = pick(
                    &streams
                        .iter()
                        .map(|s| s.subscription.clone())
                        .collect::<Vec<_>>(),
                );
                trace.log("consumer: a subscriber client restarts");
                stream.start_client(0);
            }
            10 => {
                for stream in &streams {
                    stream.subscription.set_knobs(ConsumerKnobs {
                        failures: 0.2,
                        slowest_ms: 12_000,
                    });
                }
                trace.log("consumer: handlers fail at 0.20 and take up to 12 s");
            }
            12 => {
                let until = tokio::time::Instant::now() + LEASE_TTL + ms(2_000..=15_000);
                trace.log(format!(
                    "mongo: {victim}'s lease reads exceed their time limit for {} ms",
                    (until - tokio::time::Instant::now()).as_millis()
                ));
                rs.slow_lease_reads(&victim, until);
            }
            _ => {
                let latest = lock(&answers)
                    .accepted
                    .iter()
                    .last()
                    .map(|(id, (_, _, total, _))| (id.clone(), *total));
                if let Some((batch, total)) = latest
                    && let Ok(batch_id) = batch.parse::<BatchId>()
                {
                    let item = world::random_range(1..=u64::from(total)) as u32;
                    trace.log(format!(
                        "mongo: item {item} of {batch} not visible to majority reads for a while"
                    ));
                    rs.hide(&batch_id, item);
                }
            }
        }
        last_fault = tokio::time::Instant::now();
        // Each fault lasts a while, then heals.
        tokio::time::sleep(ms(1_000..=6_000)).await;
        rs.set_knobs(Knobs::default());
        rs.reveal();
        pubsub.set_knobs(PubSubKnobs::default());
        for stream in &streams {
            stream.subscription.set_knobs(ConsumerKnobs::default());
        }
    }
    let mut violations = Vec::new();
    for client in clients {
        if let Err(e) = client.await {
            violations.push(format!("a writer's client failed: {e}"));
        }
    }
    trace.log("faults healed, workload submitted");

    // Everything accepted must now arrive within the bound.
    let deadline = last_fault.max(tokio::time::Instant::now()) + DELIVERY_BOUND;
    let replays = lock(&replays).clone();
    let done = |answers: &Answers| {
        streams.iter().all(|s| s.subscription.drained())
            && replays.iter().all(|(stream, id)| {
                replay_finished(rs.primary(), &streams, answers, stream, id).is_some()
            })
            && answers
                .accepted
                .iter()
                .all(|(batch, (stream, _, total, poison))| {
                    let Some(sim) = streams
                        .iter()
                        .find(|s| s.definition.name.as_str() == stream)
                    else {
                        return true;
                    };
                    let handled = lock(&sim.subscription.handled);
                    (1..=*total).filter(|p| !poison.contains(p)).all(|p| {
                        let item = outbox_core::model::ItemId::of(
                            &batch.parse().expect("a batch id"),
                            outbox_core::model::ItemSequence(p),
                        );
                        handled.times.contains_key(&item.to_string())
                    })
                })
    };
    while tokio::time::Instant::now() < deadline && !done(&lock(&answers)) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let delivered_in_time = done(&lock(&answers));
    watcher.abort();
    // The share rule's promise once the cluster is stable: every replica
    // leads at least its floor share, within a few polls and a TTL for the
    // records of the replicas that died.
    let mut every_stream: Vec<StreamName> =
        streams.iter().map(|s| s.definition.name.clone()).collect();
    every_stream.push(StreamName::default_stream());
    every_stream.sort();
    every_stream.dedup();
    let balanced = || {
        let active: Vec<String> = replicas
            .iter()
            .filter(|(_, r)| r.process.is_active())
            .map(|(name, _)| name.clone())
            .collect();
        let floor = every_stream.len() / active.len().max(1);
        let leaders: Vec<String> = every_stream
            .iter()
            .filter_map(|s| rs.primary().lease_of(s))
            .filter(|l| l.expires_at_ms > 0)
            .map(|l| outbox_core::store::instance_name(&l.holder).to_owned())
            .collect();
        active
            .iter()
            .all(|name| leaders.iter().filter(|l| *l == name).count() >= floor)
    };
    let settle = tokio::time::Instant::now() + SHARE_BOUND;
    while tokio::time::Instant::now() < settle && !balanced() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !balanced() {
        for stream in &every_stream {
            let holder = rs.primary().lease_of(stream).map(|l| l.holder);
            trace.log(format!("at the end {stream} is led by {holder:?}"));
        }
        violations.push(format!(
            "a replica did not lead its share of the streams within {} s of the end",
            SHARE_BOUND.as_secs()
        ));
    }
    let virtual_seconds = started.elapsed().as_secs();
    for replica in replicas.values() {
        replica.stop.cancel();
    }
    drop(admin);

    let answers = lock(&answers);
    let mut checks = 0;
    check(&streams, &answers, &pubsub, &mut violations, &mut checks);
    checks += 1;
    for (stream, id) in &replays {
        checks += 1;
        match replay_finished(rs.primary(), &streams, &answers, stream, id) {
            Some(Ok(state)) => trace.log(format!("replay {id}: {state:?}")),
            Some(Err(missing)) => violations.push(format!(
                "replay {id} is done but {missing} of its items were never handled"
            )),
            None => violations.push(format!("replay {id} did not finish")),
        }
    }
    if !delivered_in_time {
        violations.push(format!(
            "not every accepted item was delivered and handled within {} s of the last fault",
            DELIVERY_BOUND.as_secs()
        ));
    }
    checks += 3;
    violations.extend(rs.session_violations());
    let (longest_unled, unled) = lock(&unled).clone();
    violations.extend(unled);
    for violation in &violations {
        trace.log(format!("VIOLATION {violation}"));
    }
    let mut faults = rs.faults();
    for (kind, count) in pubsub.faults() {
        *faults.entry(kind).or_default() += count;
    }
    for stream in &streams {
        for (kind, count) in stream.subscription.faults() {
            *faults.entry(kind).or_default() += count;
        }
    }
    faults.extend(own);
    Outcome {
        seed,
        trace,
        violations,
        faults,
        accepted_items: answers.accepted.values().map(|a| a.2 as usize).sum(),
        checks,
        virtual_seconds,
        longest_unled,
    }
}

/// Starts a replay of part of what `definition`'s stream holds committed,
/// as `POST /api/v1/outbox/replays` does: the range checked against what
/// is held, its totals counted, the job stored. Returns the job's id when
/// it may have been stored (an answer lost on the way back included).
async fn start_replay(
    store: &SimStore,
    definition: &StreamDefinition,
    from: f64,
    length: f64,
    trace: &Trace,
) -> Option<ReplayId> {
    for _ in 0..20 {
        let Ok(held) = store.held_range(&definition.name).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let first = held.first.map_or(held.committed_through + 1, |s| s.0);
        if held.committed_through < first {
            return None;
        }
        let span = held.committed_through - first;
        let from = first + (span as f64 * from) as u64;
        let to = from + ((held.committed_through - from) as f64 * length) as u64;
        held.check(Sequence(from), Sequence(to)).ok()?;
        let Ok((batches, items)) = store
            .range_totals(&definition.name, Sequence(from), Sequence(to))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if batches != to - from + 1 {
            return None;
        }
        let job = ReplayJob::new(
            ReplayRequest {
                stream: definition.name.clone(),
                from_sequence: Sequence(from),
                to_sequence: Sequence(to),
                topic: definition.topic.clone(),
                ordering: definition.ordering.clone(),
                max_items_per_second: None,
            },
            items,
            world::now(),
        );
        let stored = store.create_replay(&job).await;
        trace.log(format!(
            "operator: replay {} of {} {from}..={to} ({items} items): {}",
            job.replay_id,
            definition.name,
            if stored.is_ok() {
                "started"
            } else {
                "answer lost"
            }
        ));
        return Some(job.replay_id);
    }
    None
}

/// How a replay ended, once it did: `Ok(state)` when it is done with
/// every copy handled, or stopped (failed, cancelled, never stored);
/// `Err(missing)` when it is done but copies were not handled. `None`
/// while it runs, or while its copies are still coming.
fn replay_finished(
    store: &outbox_core::memory::MemoryStore,
    streams: &[SimStream],
    answers: &Answers,
    stream: &str,
    id: &ReplayId,
) -> Option<Result<ReplayState, usize>> {
    let job = futures::executor::block_on(store.replay(id)).ok()?;
    let Some(job) = job else {
        return Some(Ok(ReplayState::Cancelled));
    };
    match job.state {
        ReplayState::Done => {}
        ReplayState::Failed | ReplayState::Cancelled => return Some(Ok(job.state)),
        ReplayState::Running | ReplayState::Paused => return None,
    }
    let sim = streams
        .iter()
        .find(|s| s.definition.name.as_str() == stream)?;
    let handled = lock(&sim.subscription.handled);
    let dead = sim.subscription.dead_lettered();
    let range = job.from_sequence.0..=job.to_sequence.0;
    let missing = answers
        .accepted
        .iter()
        .filter(|(_, (name, sequence, _, _))| name == stream && range.contains(sequence))
        .flat_map(|(batch, (_, _, total, poison))| {
            let batch_id: BatchId = batch.parse().expect("a batch id");
            (1..=*total)
                .filter(|p| !poison.contains(p))
                .map(move |p| {
                    let item = outbox_core::model::ItemId::of(
                        &batch_id,
                        outbox_core::model::ItemSequence(p),
                    );
                    format!("{id}/{item}")
                })
                .collect::<Vec<_>>()
        })
        .filter(|key| !handled.times.contains_key(key) && !dead.contains(key))
        .count();
    if missing == 0 {
        Some(Ok(ReplayState::Done))
    } else if sim.subscription.drained() {
        Some(Err(missing))
    } else {
        None
    }
}

/// The promises, checked against what the topics accepted and what the
/// consumers handled.
fn check(
    streams: &[SimStream],
    answers: &Answers,
    pubsub: &PubSub,
    violations: &mut Vec<String>,
    checks: &mut usize,
) {
    for stream in streams {
        let topic = &stream.definition.topic;
        let log = pubsub.log(topic, 0);
        // First publishes in order on each key, and no publish from an
        // older leader after a newer one's.
        let mut first: BTreeSet<String> = BTreeSet::new();
        let mut last: BTreeMap<String, (u64, u32)> = BTreeMap::new();
        let mut epochs: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for message in &log {
            let number = |name: &str| {
                message
                    .attributes
                    .get(name)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let position = (number("batch_sequence"), number("item_sequence") as u32);
            let batch = message
                .attributes
                .get("batch_id")
                .cloned()
                .unwrap_or_default();
            *checks += 1;
            match answers.accepted.get(&batch) {
                Some((_, sequence, _, _)) if *sequence == position.0 => {}
                Some((_, sequence, _, _)) => violations.push(format!(
                    "{topic}: batch {batch} published as sequence {} but stored as {sequence}",
                    position.0
                )),
                None if answers.refused.contains(&batch) => violations.push(format!(
                    "{topic}: batch {batch} published although its writer was told it was not stored"
                )),
                None => violations.push(format!(
                    "{topic}: batch {batch} published but never acknowledged to its writer"
                )),
            }
            if let Some(epoch) = message.epoch {
                *checks += 1;
                if let Some((newest, by)) = epochs.get(&message.key)
                    && epoch < *newest
                {
                    violations.push(format!(
                        "{topic} key {:?}: {}/{} published by {} at epoch {epoch} after {by} published at epoch {newest}",
                        message.key, position.0, position.1, message.publisher
                    ));
                }
                let entry = epochs
                    .entry(message.key.clone())
                    .or_insert((epoch, message.publisher.clone()));
                if epoch > entry.0 {
                    *entry = (epoch, message.publisher.clone());
                }
            }
            let item = message
                .attributes
                .get("item_id")
                .cloned()
                .unwrap_or_default();
            if first.insert(item) {
                *checks += 1;
                if let Some(previous) = last.get(&message.key)
                    && *previous >= position
                {
                    violations.push(format!(
                        "{topic} key {:?}: {}/{} first published after {}/{}",
                        message.key, position.0, position.1, previous.0, previous.1
                    ));
                }
                last.insert(message.key.clone(), position);
            }
        }
        // Every accepted item published (poison ones set aside), handled.
        let handled = lock(&stream.subscription.handled);
        let dead = stream.subscription.dead_lettered();
        for (batch, (name, sequence, total, poison)) in &answers.accepted {
            if name != stream.definition.name.as_str() {
                continue;
            }
            let Ok(batch_id) = batch.parse::<BatchId>() else {
                continue;
            };
            for position in 1..=*total {
                *checks += 1;
                let item = outbox_core::model::ItemId::of(
                    &batch_id,
                    outbox_core::model::ItemSequence(position),
                )
                .to_string();
                let published = first.contains(&item);
                if poison.contains(&position) {
                    if published {
                        violations.push(format!(
                            "{topic}: poison item {sequence}/{position} was published"
                        ));
                    }
                } else if !published {
                    violations.push(format!(
                        "{topic}: accepted item {sequence}/{position} was never published"
                    ));
                } else if !handled.times.contains_key(&item) && !dead.contains(&item) {
                    violations.push(format!(
                        "{topic}: item {sequence}/{position} was published but never handled"
                    ));
                }
            }
        }
        *checks += 1;
        violations.extend(handled.violations.iter().map(|v| format!("{topic}: {v}")));
    }
}
