//! Pub/Sub's delivering side, for one subscription with message ordering,
//! modelled after its documented rules:
//!
//! - the messages of an ordering key go to one subscriber client at a
//!   time, in order, several outstanding at once; the key's affinity moves
//!   between clients (a reconnect, scaling);
//! - a nack, or an ack deadline that passes, redelivers that message and
//!   every later one of its key, acknowledged or not;
//! - an ack of a delivery that was superseded (redelivered since) does
//!   not count;
//! - a dead-letter policy takes a message after 5 delivery attempts.
//!
//! The clients run the consumer crate's [`Core`]; every ack is checked
//! against what the handler had handled by then.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use outbox_consumer::{
    Answer, Contract, Core, Delivery, Handler, Item, Limits, MemorySeen, Received,
};
use outbox_core::world;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::pubsub::{Message, PubSub};
use crate::replica_set::FaultCounts;
use crate::trace::Trace;

pub const ACK_DEADLINE: Duration = Duration::from_secs(10);
const MAX_DELIVERY_ATTEMPTS: u32 = 5;

/// What the handlers did, across clients: each item's handling in order,
/// and every broken promise seen on the way.
#[derive(Default)]
pub struct Handled {
    /// Dedup key to how many times it was handled.
    pub times: BTreeMap<String, u32>,
    /// Per (lane, ordering key): the positions handled, in order.
    pub order: BTreeMap<String, Vec<(u64, u32)>>,
    pub batches_whole: u64,
    pub batches_partial: u64,
    pub violations: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ConsumerKnobs {
    /// The chance that the handler fails a delivery.
    pub failures: f64,
    /// The longest a handler takes, in ms (past the ack deadline: a
    /// subscriber that stops extending its lease).
    pub slowest_ms: u64,
}

struct KeyCursor {
    messages: Vec<Message>,
    acked: Vec<bool>,
    attempts: Vec<u32>,
    next: usize,
    client: usize,
    /// Position to (delivery id, deadline).
    outstanding: BTreeMap<usize, (u64, Instant)>,
}

struct SubState {
    keys: BTreeMap<String, KeyCursor>,
    read: usize,
    next_delivery: u64,
    clients: Vec<mpsc::UnboundedSender<Received>>,
    tasks: Vec<JoinHandle<()>>,
    knobs: ConsumerKnobs,
    dead_lettered: BTreeSet<String>,
    faults: FaultCounts,
}

pub struct Subscription {
    pubsub: Arc<PubSub>,
    topic: String,
    whole_batches: bool,
    /// A subscriber's flow control, per key (`max_outstanding`):
    /// docs/CONSUMING.md asks for at least the largest batch with whole
    /// batches; a seed may set it below, as a consumer left at its default
    /// would be for batches over 1,000 items.
    outstanding: usize,
    state: Mutex<SubState>,
    pub handled: Arc<Mutex<Handled>>,
    /// The memory of handled items all clients share (as `MongoSeen` is
    /// shared in production).
    seen: Arc<MemorySeen>,
    trace: Trace,
    me: Weak<Subscription>,
}

fn dedup_key(attributes: &BTreeMap<String, String>) -> String {
    let item = attributes.get("item_id").cloned().unwrap_or_default();
    match attributes.get("replay_id") {
        Some(replay) => format!("{replay}/{item}"),
        None => item,
    }
}

impl Subscription {
    pub fn new(
        pubsub: Arc<PubSub>,
        topic: &str,
        whole_batches: bool,
        outstanding: usize,
        clients: usize,
        trace: Trace,
    ) -> Arc<Self> {
        let sub = Arc::new_cyclic(|me| Self {
            pubsub,
            topic: topic.to_owned(),
            whole_batches,
            outstanding,
            state: Mutex::new(SubState {
                keys: BTreeMap::new(),
                read: 0,
                next_delivery: 0,
                clients: Vec::new(),
                tasks: Vec::new(),
                knobs: ConsumerKnobs::default(),
                dead_lettered: BTreeSet::new(),
                faults: FaultCounts::new(),
            }),
            handled: Arc::default(),
            seen: Arc::default(),
            trace,
            me: me.clone(),
        });
        for client in 0..clients {
            sub.start_client(client);
        }
        sub
    }

    fn state(&self) -> MutexGuard<'_, SubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_knobs(&self, knobs: ConsumerKnobs) {
        self.state().knobs = knobs;
    }

    pub fn faults(&self) -> FaultCounts {
        self.state().faults.clone()
    }

    /// Items the subscription's dead-letter policy took.
    pub fn dead_lettered(&self) -> BTreeSet<String> {
        self.state().dead_lettered.clone()
    }

    /// (Re)starts client `index` with a fresh consumer core: what the one
    /// before held is lost, and comes again after its ack deadline.
    pub fn start_client(&self, index: usize) {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Received>();
        let handler = SimHandler {
            handled: Arc::clone(&self.handled),
            sub: self.me.clone(),
            client: index,
        };
        let contract = if self.whole_batches {
            Contract::Global
        } else {
            Contract::PerKey
        };
        let mut core = Core::new(
            Arc::clone(&self.seen),
            handler,
            self.whole_batches,
            contract,
        )
        .with_limits(Limits {
            batch_wait: Duration::from_secs(20),
            release_blocked_after: Duration::from_secs(15),
            max_held: self.outstanding,
        });
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    received = receiver.recv() => match received {
                        Some(received) => { core.on(received).await; }
                        None => return,
                    },
                    () = tokio::time::sleep(Duration::from_secs(1)) => { core.tick().await; }
                }
            }
        });
        let mut state = self.state();
        if index < state.clients.len() {
            state.clients[index] = sender;
            let old = std::mem::replace(&mut state.tasks[index], task);
            old.abort();
            *state.faults.entry("consumer restart").or_default() += 1;
        } else {
            state.clients.push(sender);
            state.tasks.push(task);
        }
    }

    /// Moves every key's affinity to another client: what is outstanding
    /// at the old one no longer counts, and comes again from the new one.
    pub fn move_keys(&self) {
        let mut state = self.state();
        let clients = state.clients.len().max(1);
        for cursor in state.keys.values_mut() {
            cursor.client = (cursor.client + 1) % clients;
            cursor.outstanding.clear();
            cursor.next = cursor
                .acked
                .iter()
                .position(|a| !a)
                .unwrap_or(cursor.acked.len());
        }
        *state.faults.entry("key affinity moved").or_default() += 1;
        drop(state);
        self.trace.log(format!(
            "pubsub: {} ordering keys moved to other clients",
            self.topic
        ));
    }

    /// Whether everything the topic accepted was acknowledged.
    pub fn drained(&self) -> bool {
        let state = self.state();
        state.read == self.pubsub.log(&self.topic, 0).len()
            && state.keys.values().all(|c| c.acked.iter().all(|a| *a))
    }

    /// One round: takes in what the topic accepted, redelivers what passed
    /// its deadline, and delivers what is next on each key.
    pub fn round(&self) {
        let fresh = self.pubsub.log(&self.topic, self.state().read);
        let mut state = self.state();
        state.read += fresh.len();
        let clients = state.clients.len().max(1);
        for message in fresh {
            let client = (world::random_u64() % clients as u64) as usize;
            let cursor = state
                .keys
                .entry(message.key.clone())
                .or_insert_with(|| KeyCursor {
                    messages: Vec::new(),
                    acked: Vec::new(),
                    attempts: Vec::new(),
                    next: 0,
                    client,
                    outstanding: BTreeMap::new(),
                });
            cursor.messages.push(message);
            cursor.acked.push(false);
            cursor.attempts.push(0);
        }
        let now = Instant::now();
        let mut deliveries = Vec::new();
        let mut expired = 0;
        let mut dead = Vec::new();
        let SubState {
            keys,
            next_delivery,
            ..
        } = &mut *state;
        for (key, cursor) in keys.iter_mut() {
            if let Some((&position, _)) = cursor
                .outstanding
                .iter()
                .find(|(_, (_, deadline))| *deadline <= now)
            {
                expired += 1;
                cursor.outstanding.retain(|p, _| *p < position);
                cursor.next = cursor.next.min(position);
            }
            while cursor.next < cursor.messages.len() && cursor.outstanding.len() < self.outstanding
            {
                let position = cursor.next;
                cursor.next += 1;
                if cursor.outstanding.contains_key(&position) {
                    continue;
                }
                cursor.attempts[position] += 1;
                if !cursor.acked[position] && cursor.attempts[position] > MAX_DELIVERY_ATTEMPTS {
                    cursor.acked[position] = true;
                    dead.push(dedup_key(&cursor.messages[position].attributes));
                    continue;
                }
                *next_delivery += 1;
                cursor
                    .outstanding
                    .insert(position, (*next_delivery, now + ACK_DEADLINE));
                deliveries.push((
                    cursor.client,
                    key.clone(),
                    position,
                    *next_delivery,
                    cursor.messages[position].clone(),
                ));
            }
        }
        if expired > 0 {
            *state.faults.entry("ack deadline passed").or_default() += expired;
        }
        for item in &dead {
            state.dead_lettered.insert(item.clone());
        }
        let senders = state.clients.clone();
        drop(state);
        for item in dead {
            self.trace
                .log(format!("pubsub: {item} dead-lettered by the subscription"));
        }
        for (client, key, position, delivery, message) in deliveries {
            let attributes: HashMap<String, String> =
                message.attributes.clone().into_iter().collect();
            let item = Item::parse(&message.id, &message.key, &attributes, &message.data);
            let answer = SimAnswer {
                sub: self.me.clone(),
                key,
                position,
                delivery,
                item: dedup_key(&message.attributes),
            };
            if let Some(sender) = senders.get(client) {
                let _ = sender.send(Received {
                    item,
                    answer: Box::new(answer),
                });
            }
        }
    }

    fn answer(&self, key: &str, position: usize, delivery: u64, item: &str, ack: bool) {
        if ack {
            let handled = self
                .handled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .times
                .contains_key(item);
            if !handled {
                let line = format!("acked {item} before any handler handled it");
                self.trace.log(format!("consumer: VIOLATION {line}"));
                self.handled
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .violations
                    .push(line);
            }
        }
        let mut state = self.state();
        let Some(cursor) = state.keys.get_mut(key) else {
            return;
        };
        if cursor.outstanding.get(&position).map(|(d, _)| *d) != Some(delivery) {
            return; // superseded: the ack or nack does not count
        }
        cursor.outstanding.remove(&position);
        if ack {
            cursor.acked[position] = true;
        } else {
            cursor.outstanding.retain(|p, _| *p < position);
            cursor.next = cursor.next.min(position);
        }
    }
}

struct SimAnswer {
    sub: Weak<Subscription>,
    key: String,
    position: usize,
    delivery: u64,
    item: String,
}

impl Answer for SimAnswer {
    fn ack(self: Box<Self>) {
        if let Some(sub) = self.sub.upgrade() {
            sub.answer(&self.key, self.position, self.delivery, &self.item, true);
        }
    }

    fn nack(self: Box<Self>) {
        if let Some(sub) = self.sub.upgrade() {
            sub.answer(&self.key, self.position, self.delivery, &self.item, false);
        }
    }
}

/// The application: records what it handles, checks it against the
/// promises, and fails or dawdles as the schedule says.
struct SimHandler {
    handled: Arc<Mutex<Handled>>,
    sub: Weak<Subscription>,
    client: usize,
}

#[async_trait]
impl Handler for SimHandler {
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        let knobs = self
            .sub
            .upgrade()
            .map(|s| s.state().knobs)
            .unwrap_or_default();
        if knobs.slowest_ms > 0 {
            tokio::time::sleep(Duration::from_millis(world::random_range(
                0..=knobs.slowest_ms,
            )))
            .await;
        }
        if world::random_fraction() < knobs.failures {
            anyhow::bail!("the handler failed (simulated)");
        }
        let (items, partial) = match delivery {
            Delivery::Item(item) => (vec![item], false),
            Delivery::Batch(items) => (items, false),
            Delivery::Partial { items, .. } => (items, true),
        };
        let mut guard = self
            .handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let handled = &mut *guard;
        if items.len() > 1 || partial {
            if partial {
                handled.batches_partial += 1;
            } else {
                handled.batches_whole += 1;
            }
        }
        for item in &items {
            let key = item.dedup_key();
            let times = handled.times.entry(key.clone()).or_default();
            *times += 1;
            if *times > 1 {
                handled
                    .violations
                    .push(format!("{key} handled {times} times"));
            }
            let lane = format!(
                "{}|{}|{}",
                item.stream,
                item.replay_id.clone().unwrap_or_default(),
                item.ordering_key
            );
            let position = (item.position.batch_sequence, item.position.item_sequence);
            let order = handled.order.entry(lane.clone()).or_default();
            if let Some(last) = order.last()
                && *last >= position
            {
                let line = format!("{lane}: {position:?} handled after {last:?}");
                handled.violations.push(line);
            }
            order.push(position);
        }
        drop(guard);
        if let Some(sub) = self.sub.upgrade() {
            let names: Vec<String> = items
                .iter()
                .map(|i| format!("{}/{}", i.position.batch_sequence, i.position.item_sequence))
                .collect();
            sub.trace.log(format!(
                "consumer {}: handled {}{}",
                self.client,
                names.join(" "),
                if partial { " (partial batch)" } else { "" }
            ));
        }
        Ok(())
    }
}
