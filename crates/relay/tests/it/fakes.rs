//! A Pub/Sub stand-in with Pub/Sub's ordering-key behaviour: after a failed
//! publish on a key, every publish on that key fails until `resume`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use outbox_core::memory::MemoryStore;
use outbox_core::model::NewBatch;
use outbox_core::publish::{
    OrderingKeyMode, OutboxMessage, PublishError, PublishFuture, Publisher,
};
use outbox_core::store::BatchStore;
use outbox_core::stream::{StreamDefinition, StreamName};
use relay::drain::{DrainSettings, OnePublisher, PoisonPolicy, Publishers};
use relay::lease::LeaseSettings;
use relay::runner::{Runner, RunnerSettings};
use relay::status::StatusBoard;
use tokio::sync::Notify;

/// One acknowledged message: (batch_sequence, item_sequence, who published it).
pub type Delivery = (u64, u32, String);

#[derive(Default)]
struct State {
    delivered: Vec<Delivery>,
    /// When each delivery was accepted (tokio's clock).
    delivered_at: Vec<tokio::time::Instant>,
    /// Publishes that fail once each (by (batch_sequence, item_sequence)).
    fail_once: HashSet<(u64, u32)>,
    /// Items Pub/Sub always rejects.
    poison: HashSet<(u64, u32)>,
    paused_keys: HashSet<String>,
    /// When set, every publish fails (an outage).
    down: bool,
    next_id: u64,
    attempts: HashMap<(u64, u32), u32>,
    /// Switches this store off once the given item is acknowledged: the
    /// publish succeeded but its mark cannot be written (a crash between
    /// the two).
    break_store_after: Option<((u64, u32), MemoryStore)>,
    /// Publishes never answer (a frozen Pub/Sub).
    hang: bool,
    /// How long an answer takes (tokio's clock: paused in tests).
    latency: Duration,
    /// The batches with a publish in flight, and every set seen when a
    /// publish was handed over (with its batch).
    in_flight: BTreeMap<u64, usize>,
    overlaps: Vec<Vec<u64>>,
    most_in_flight: usize,
}

#[derive(Clone)]
pub struct FakePublisher {
    name: String,
    state: Arc<Mutex<State>>,
}

fn position(message: &OutboxMessage) -> (u64, u32) {
    let number = |key: &str| message.attributes[key].parse::<u64>().unwrap();
    (number("batch_sequence"), number("item_sequence") as u32)
}

impl FakePublisher {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: Arc::default(),
        }
    }

    /// Another replica's client, recording into the same log.
    pub fn replica(&self, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: Arc::clone(&self.state),
        }
    }

    pub fn fail_once(&self, batch_sequence: u64, item_sequence: u32) {
        self.state
            .lock()
            .unwrap()
            .fail_once
            .insert((batch_sequence, item_sequence));
    }

    pub fn poison(&self, batch_sequence: u64, item_sequence: u32) {
        self.state
            .lock()
            .unwrap()
            .poison
            .insert((batch_sequence, item_sequence));
    }

    pub fn break_store_after(&self, batch_sequence: u64, item_sequence: u32, store: &MemoryStore) {
        self.state.lock().unwrap().break_store_after =
            Some(((batch_sequence, item_sequence), store.clone()));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn clear_poison(&mut self) {
        self.state.lock().unwrap().poison.clear();
    }

    pub fn set_hang(&self, hang: bool) {
        self.state.lock().unwrap().hang = hang;
    }

    /// Answers take `latency` (a Pub/Sub a round trip away).
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// The most publishes that were in flight at once.
    pub fn most_in_flight(&self) -> usize {
        self.state.lock().unwrap().most_in_flight
    }

    /// For every publish handed over: the batches in flight at that moment
    /// (its own included), when there were several.
    pub fn overlapping_batches(&self) -> Vec<Vec<u64>> {
        self.state.lock().unwrap().overlaps.clone()
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn delivered(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().delivered.clone()
    }

    /// When each of [`delivered`](Self::delivered) was accepted.
    pub fn delivered_at(&self) -> Vec<tokio::time::Instant> {
        self.state.lock().unwrap().delivered_at.clone()
    }

    pub fn attempts(&self, batch_sequence: u64, item_sequence: u32) -> u32 {
        self.state
            .lock()
            .unwrap()
            .attempts
            .get(&(batch_sequence, item_sequence))
            .copied()
            .unwrap_or(0)
    }
}

impl Publisher for FakePublisher {
    fn publish(&self, message: OutboxMessage) -> PublishFuture {
        let mut state = self.state.lock().unwrap();
        let at = position(&message);
        *state.attempts.entry(at).or_default() += 1;
        if state.hang {
            return futures::future::pending().boxed();
        }
        let key = message.ordering_key.clone();
        let paused = key.as_ref().is_some_and(|k| state.paused_keys.contains(k));
        let result = if paused {
            Err(PublishError::Transient("ordering key paused".into()))
        } else if state.poison.contains(&at) {
            Err(PublishError::Permanent("invalid argument".into()))
        } else if state.down || state.fail_once.remove(&at) {
            Err(PublishError::Transient("unavailable".into()))
        } else {
            state.next_id += 1;
            state.delivered.push((at.0, at.1, self.name.clone()));
            state.delivered_at.push(tokio::time::Instant::now());
            if let Some((_, store)) = state.break_store_after.take_if(|(when, _)| *when == at) {
                store.set_unavailable(true);
            }
            Ok(format!("m-{}", state.next_id))
        };
        if result.is_err()
            && let Some(key) = key
        {
            state.paused_keys.insert(key);
        }
        *state.in_flight.entry(at.0).or_default() += 1;
        let now: usize = state.in_flight.values().sum();
        state.most_in_flight = state.most_in_flight.max(now);
        if state.in_flight.len() > 1 {
            let batches = state.in_flight.keys().copied().collect();
            state.overlaps.push(batches);
        }
        let latency = state.latency;
        let shared = Arc::clone(&self.state);
        async move {
            tokio::time::sleep(latency).await;
            let mut state = shared.lock().unwrap();
            if let Some(n) = state.in_flight.get_mut(&at.0) {
                *n -= 1;
                if *n == 0 {
                    state.in_flight.remove(&at.0);
                }
            }
            result
        }
        .boxed()
    }

    fn resume(&self, ordering_key: &str) {
        self.state.lock().unwrap().paused_keys.remove(ordering_key);
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        futures::future::ready(()).boxed()
    }
}

/// The default stream with `on_poison`, publishing to `batch-outbox`.
pub fn definition(on_poison: PoisonPolicy) -> StreamDefinition {
    StreamDefinition {
        name: StreamName::default_stream(),
        topic: "batch-outbox".to_owned(),
        ordering: OrderingKeyMode::Global,
        on_poison,
        schema: None,
        writers: None,
        created_at: None,
        updated_at: None,
        claim_check: None,
    }
}

pub fn settings(holder: &str, page_size: u32, on_poison: PoisonPolicy) -> RunnerSettings {
    settings_for(holder, page_size, definition(on_poison))
}

/// Settings of a runner for `definition`'s stream.
pub fn settings_for(holder: &str, page_size: u32, definition: StreamDefinition) -> RunnerSettings {
    RunnerSettings {
        lease: LeaseSettings {
            stream: definition.name.clone(),
            holder: holder.to_owned(),
            ttl: Duration::from_secs(10),
            standby_poll: Duration::from_secs(1),
        },
        poll_interval: Duration::from_secs(1),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(30),
        drain: DrainSettings::fixed(page_size, definition),
    }
}

pub struct Replica {
    pub runner: Runner,
    pub status: Arc<StatusBoard>,
}

pub fn replica(
    store: &MemoryStore,
    publisher: &FakePublisher,
    settings: RunnerSettings,
) -> Replica {
    let status = Arc::new(StatusBoard::default());
    let runner = Runner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        publishers(publisher),
        settings,
        Arc::clone(&status),
        Arc::new(Notify::new()),
    );
    Replica { runner, status }
}

/// One fake publisher for every topic.
pub fn publishers(publisher: &FakePublisher) -> Arc<dyn Publishers> {
    Arc::new(OnePublisher(Arc::new(publisher.clone())))
}

/// Stores batches of the given sizes through the writer's store trait.
pub async fn store_batches(store: &MemoryStore, sizes: &[usize]) -> Vec<NewBatch> {
    let mut batches = Vec::new();
    for &size in sizes {
        let objects = (0..size).map(|i| serde_json::json!({ "i": i })).collect();
        let batch = outbox_core::ingest::build_batch(
            objects,
            &outbox_core::ingest::IngestRules::default(),
            None,
            chrono::Utc::now(),
        )
        .unwrap();
        store
            .insert_batch(
                &batch,
                tokio::time::Instant::now() + std::time::Duration::from_secs(60),
            )
            .await
            .unwrap();
        batches.push(batch);
    }
    batches
}

/// Stores batches whose items carry `"k": "k<n>"`, n cycling over `keys`.
pub async fn store_keyed_batches(store: &MemoryStore, sizes: &[usize], keys: usize) {
    for &size in sizes {
        let objects = (0..size)
            .map(|i| serde_json::json!({ "i": i, "k": format!("k{}", i % keys) }))
            .collect();
        let batch = outbox_core::ingest::build_batch(
            objects,
            &outbox_core::ingest::IngestRules::default(),
            None,
            chrono::Utc::now(),
        )
        .unwrap();
        store
            .insert_batch(
                &batch,
                tokio::time::Instant::now() + std::time::Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
}

/// Every (batch_sequence, item_sequence) of the given batch sizes, in order.
pub fn expected_order(sizes: &[usize]) -> Vec<(u64, u32)> {
    sizes
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| (1..=n as u32).map(move |i| (b as u64 + 1, i)))
        .collect()
}

/// First deliveries in the order they happened, and how many duplicates.
pub fn first_deliveries(delivered: &[Delivery]) -> (Vec<(u64, u32)>, usize) {
    let mut seen = BTreeMap::new();
    let mut firsts = Vec::new();
    for (b, i, _) in delivered {
        if seen.insert((*b, *i), ()).is_none() {
            firsts.push((*b, *i));
        }
    }
    (firsts.clone(), delivered.len() - firsts.len())
}
