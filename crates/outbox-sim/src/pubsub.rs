//! Pub/Sub's publishing side, modelled after its documented rules:
//!
//! - each topic keeps what it accepted, in order;
//! - on an ordering key one request is in flight at a time, so messages
//!   land in the order they were published;
//! - a failed publish pauses its key: it and every message queued behind
//!   it fail, and so does every later publish, until `resume`;
//! - messages over the published limits are refused (the emulator takes
//!   them);
//! - a retried request whose first answer was lost lands twice (Pub/Sub
//!   is at least once);
//! - a request the process sent before it froze lands after it thaws.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use outbox_core::publish::{OutboxMessage, PublishError, PublishFuture, Publisher};
use outbox_core::world;
use relay::drain::Publishers;
use tokio::sync::{oneshot, watch};

use crate::process::Process;
use crate::replica_set::FaultCounts;
use crate::trace::Trace;

/// One message a topic accepted.
#[derive(Clone, Debug)]
pub struct Message {
    pub id: String,
    pub key: String,
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    /// The process that published it, and the lease epoch it believed it
    /// held for the stream when it called `publish`.
    pub publisher: String,
    pub epoch: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct PubSubKnobs {
    /// The chance that a request fails (transiently).
    pub failures: f64,
    /// The chance that an accepted request lands twice.
    pub duplicates: f64,
    /// The longest a request takes, in ms.
    pub latency_ms: u64,
}

#[derive(Default)]
struct Inner {
    topics: BTreeMap<String, Vec<Message>>,
    knobs: PubSubKnobs,
    faults: FaultCounts,
    next_id: u64,
}

pub struct PubSub {
    inner: Mutex<Inner>,
    /// Bumped whenever a topic accepts a message.
    pub(crate) published: watch::Sender<u64>,
    trace: Trace,
}

impl PubSub {
    pub fn new(trace: Trace) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            published: watch::Sender::new(0),
            trace,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_knobs(&self, knobs: PubSubKnobs) {
        self.inner().knobs = knobs;
    }

    pub fn faults(&self) -> FaultCounts {
        self.inner().faults.clone()
    }

    /// What `topic` accepted, from position `from` on.
    pub fn log(&self, topic: &str, from: usize) -> Vec<Message> {
        self.inner()
            .topics
            .get(topic)
            .map(|log| log.get(from..).unwrap_or_default().to_vec())
            .unwrap_or_default()
    }

    fn accept(
        &self,
        topic: &str,
        message: &OutboxMessage,
        publisher: &str,
        epoch: Option<u64>,
    ) -> Result<String, PublishError> {
        let mut inner = self.inner();
        let knobs = inner.knobs;
        if world::random_fraction() < knobs.failures {
            *inner.faults.entry("publish failure").or_default() += 1;
            return Err(PublishError::Transient(
                "UNAVAILABLE (simulated)".to_owned(),
            ));
        }
        if let Err(violation) = message.check_limits() {
            return Err(PublishError::Permanent(format!(
                "INVALID_ARGUMENT: {violation}"
            )));
        }
        if serde_json::from_slice::<serde_json::Value>(&message.data)
            .is_ok_and(|body| body["payload"]["poison"] == serde_json::Value::Bool(true))
        {
            return Err(PublishError::Permanent(
                "INVALID_ARGUMENT: refused by the topic's schema (simulated poison)".to_owned(),
            ));
        }
        let copies = if world::random_fraction() < knobs.duplicates {
            *inner.faults.entry("duplicate publish").or_default() += 1;
            2
        } else {
            1
        };
        let key = message.ordering_key.clone().unwrap_or_default();
        let mut id = String::new();
        for _ in 0..copies {
            inner.next_id += 1;
            id = format!("m{}", inner.next_id);
            inner
                .topics
                .entry(topic.to_owned())
                .or_default()
                .push(Message {
                    id: id.clone(),
                    key: key.clone(),
                    data: message.data.clone(),
                    attributes: message.attributes.clone(),
                    publisher: publisher.to_owned(),
                    epoch,
                });
        }
        drop(inner);
        let attribute = |name: &str| message.attributes.get(name).cloned().unwrap_or_default();
        self.trace.log(format!(
            "pubsub: {topic} key {key:?} accepted {}/{} from {publisher} epoch {epoch:?}{}",
            attribute("batch_sequence"),
            attribute("item_sequence"),
            if copies > 1 { " twice" } else { "" }
        ));
        self.published.send_modify(|v| *v += 1);
        Ok(id)
    }

    fn latency(&self) -> Duration {
        let most = self.inner().knobs.latency_ms.max(1);
        Duration::from_millis(world::random_range(1..=most))
    }
}

type Answer = oneshot::Sender<Result<String, PublishError>>;

#[derive(Default)]
struct Lane {
    paused: bool,
    sending: bool,
    queue: VecDeque<(OutboxMessage, Option<u64>, Answer)>,
}

/// What a relay process publishes with, one per topic.
pub struct SimPublisher {
    pubsub: Arc<PubSub>,
    topic: String,
    process: Arc<Process>,
    epoch: Arc<dyn Fn() -> Option<u64> + Send + Sync>,
    lanes: Arc<Mutex<BTreeMap<String, Lane>>>,
    in_flight: watch::Sender<usize>,
}

impl SimPublisher {
    fn lanes(&self) -> MutexGuard<'_, BTreeMap<String, Lane>> {
        self.lanes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends a key's queue, one request at a time.
    async fn send(
        pubsub: Arc<PubSub>,
        topic: String,
        process: Arc<Process>,
        lanes: Arc<Mutex<BTreeMap<String, Lane>>>,
        in_flight: watch::Sender<usize>,
        key: String,
    ) {
        loop {
            let next = {
                let mut all = lanes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let lane = all.entry(key.clone()).or_default();
                let next = lane.queue.pop_front();
                if next.is_none() {
                    lane.sending = false;
                }
                next
            };
            let Some((message, epoch, answer)) = next else {
                return;
            };
            process.io().await;
            tokio::time::sleep(pubsub.latency()).await;
            let result = pubsub.accept(&topic, &message, process.name(), epoch);
            let failed = result.is_err();
            let _ = answer.send(result);
            in_flight.send_modify(|n| *n = n.saturating_sub(1));
            if failed {
                // The key pauses: what is queued behind fails too.
                let queued = {
                    let mut all = lanes
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let lane = all.entry(key.clone()).or_default();
                    lane.paused = true;
                    lane.sending = false;
                    std::mem::take(&mut lane.queue)
                };
                for (_, _, answer) in queued {
                    let _ = answer.send(Err(PublishError::Transient(
                        "the ordering key is paused after a failed publish".to_owned(),
                    )));
                    in_flight.send_modify(|n| *n = n.saturating_sub(1));
                }
                return;
            }
        }
    }
}

impl Publisher for SimPublisher {
    fn publish(&self, message: OutboxMessage) -> PublishFuture {
        let key = message.ordering_key.clone().unwrap_or_default();
        let (answer, answered) = oneshot::channel();
        let epoch = (self.epoch)();
        let start = {
            let mut lanes = self.lanes();
            let lane = lanes.entry(key.clone()).or_default();
            if lane.paused {
                return async {
                    Err(PublishError::Transient(
                        "the ordering key is paused after a failed publish".to_owned(),
                    ))
                }
                .boxed();
            }
            lane.queue.push_back((message, epoch, answer));
            self.in_flight.send_modify(|n| *n += 1);
            !std::mem::replace(&mut lane.sending, true)
        };
        if start {
            tokio::spawn(Self::send(
                Arc::clone(&self.pubsub),
                self.topic.clone(),
                Arc::clone(&self.process),
                Arc::clone(&self.lanes),
                self.in_flight.clone(),
                key,
            ));
        }
        async move {
            answered.await.unwrap_or_else(|_| {
                Err(PublishError::Transient("the publisher stopped".to_owned()))
            })
        }
        .boxed()
    }

    fn resume(&self, ordering_key: &str) {
        if let Some(lane) = self.lanes().get_mut(ordering_key) {
            lane.paused = false;
        }
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        let mut in_flight = self.in_flight.subscribe();
        async move {
            let _ = in_flight.wait_for(|n| *n == 0).await;
        }
        .boxed()
    }
}

/// The epoch a process believes it leads a stream under (`None` when it
/// does not lead it), by the relay's own view; set once its cluster exists.
pub type EpochOf = Box<dyn Fn(&str) -> Option<u64> + Send + Sync>;

/// A relay process's publishers, one per topic (the topic is the stream's
/// name in the simulation).
pub struct SimPublishers {
    pubsub: Arc<PubSub>,
    process: Arc<Process>,
    /// The epoch this process believes it holds for a stream.
    pub epoch_of: Arc<OnceLock<EpochOf>>,
    topics: Mutex<BTreeMap<String, Arc<SimPublisher>>>,
}

impl SimPublishers {
    pub fn new(pubsub: Arc<PubSub>, process: Arc<Process>) -> Self {
        Self {
            pubsub,
            process,
            epoch_of: Arc::new(OnceLock::new()),
            topics: Mutex::default(),
        }
    }
}

impl Publishers for SimPublishers {
    fn for_topic(&self, topic: &str) -> Arc<dyn Publisher> {
        let mut topics = self
            .topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let publisher = topics.entry(topic.to_owned()).or_insert_with(|| {
            let epoch_of = Arc::clone(&self.epoch_of);
            let stream = topic.to_owned();
            Arc::new(SimPublisher {
                pubsub: Arc::clone(&self.pubsub),
                topic: topic.to_owned(),
                process: Arc::clone(&self.process),
                epoch: Arc::new(move || epoch_of.get().and_then(|f| f(&stream))),
                lanes: Arc::default(),
                in_flight: watch::Sender::new(0),
            })
        });
        Arc::clone(publisher) as Arc<dyn Publisher>
    }
}
