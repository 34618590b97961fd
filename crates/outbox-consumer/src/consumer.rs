//! The consumer: hands each item to the application once (deduplicated by
//! [`SeenStore`]), optionally whole batches, and acknowledges a message
//! only after the handler succeeded and the item was remembered, so a
//! failure or a crash means the message comes again, never that it is
//! lost. [`Consumer::run`] reads an ordered subscription with Google's
//! subscriber client; [`Core`] is the same logic over any source of
//! deliveries (tests feed it directly).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::subscriber::ShutdownBehavior;
use tokio::time::Instant;
use tracing::warn;

use crate::claim_check::ClaimCheckResolver;
use crate::item::{Item, Lane, NotAnItem};
use crate::seen::SeenStore;
use crate::verify::{Contract, Report, Verdict, Verifier};

/// What the application receives.
#[derive(Clone, Debug, PartialEq)]
// Handed over one at a time: an `Item` unboxed is simpler to match on.
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    /// One item, the first time it comes.
    Item(Item),
    /// Every item of one batch, in `item_sequence` order, once the last of
    /// them came (`whole_batches`).
    Batch(Vec<Item>),
    /// What came of a batch whose other items did not come within
    /// [`Limits::batch_wait`] (an item dead-lettered at its first publish,
    /// a position a replay could not read), in `item_sequence` order, with
    /// the positions that did not come. Its items are acknowledged once
    /// handled, like a whole batch's.
    Partial { items: Vec<Item>, missing: Vec<u32> },
}

/// The application's side.
#[async_trait]
pub trait Handler: Send + Sync {
    /// Handles a delivery. `Err` leaves its messages unacknowledged: they
    /// come again (with message ordering, with everything after them on
    /// their ordering key).
    ///
    /// # Errors
    /// Whatever went wrong; the delivery comes again.
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()>;
}

/// How to answer one message.
pub trait Answer: Send {
    fn ack(self: Box<Self>);
    fn nack(self: Box<Self>);
}

impl Answer for google_cloud_pubsub::subscriber::handler::Handler {
    fn ack(self: Box<Self>) {
        google_cloud_pubsub::subscriber::handler::Handler::ack(*self);
    }

    fn nack(self: Box<Self>) {
        google_cloud_pubsub::subscriber::handler::Handler::nack(*self);
    }
}

/// One message received, and how to answer it.
pub struct Received {
    pub item: Result<Item, NotAnItem>,
    pub answer: Box<dyn Answer>,
}

/// What became of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled and acknowledged (with the others of its batch, when whole).
    Handled,
    /// Kept until the rest of its batch comes (a copy of an item held is
    /// kept too, unanswered: it is acknowledged with the batch, never
    /// before it is handled).
    Held,
    /// A copy of an item already handled: acknowledged, not handled.
    Duplicate,
    /// The handler or the memory failed: not acknowledged, it comes again.
    Failed(String),
    /// After a failure on its ordering key, before the failed message came
    /// again: not handled and not acknowledged (it comes again after it),
    /// so the handler sees the key in order.
    Blocked,
    /// Not a batch-outbox message: acknowledged and set aside (logged).
    Foreign(String),
}

/// How long the consumer waits for what may never come to this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// With whole batches: how long after a batch's first item came the
    /// rest may take. Then what came is handed over as
    /// [`Delivery::Partial`] (an item dead-lettered at its first publish
    /// never comes). Default 5 minutes.
    pub batch_wait: Duration,
    /// After a failure, how long the failed message's ordering key stays
    /// blocked in this client waiting for it to come again. Pub/Sub may
    /// redeliver it to another client (ordering keys move between clients
    /// on reconnects and scaling) or a dead-letter policy may take it; then
    /// the key is released and its messages are handled again. Default 60
    /// seconds.
    pub release_blocked_after: Duration,
    /// With whole batches: the most messages held at once, the
    /// subscriber's `max_outstanding` (Pub/Sub leases no more). Once that
    /// many are held, the oldest batch being collected is handed over as
    /// it is ([`Delivery::Partial`]): its rest cannot come until something
    /// is acknowledged. Default 1,000, [`ConsumerConfig`]'s default.
    pub max_held: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            batch_wait: Duration::from_secs(300),
            release_blocked_after: Duration::from_secs(60),
            max_held: 1000,
        }
    }
}

/// A batch being collected.
struct Collecting {
    items: BTreeMap<u32, Item>,
    /// Every delivery of its items, copies included: all are answered when
    /// the batch is (a copy acknowledged early would acknowledge an item
    /// not yet handled).
    answers: Vec<Box<dyn Answer>>,
    total: u64,
    /// When its first item came.
    since: Instant,
    /// The ordering keys of its items.
    keys: BTreeSet<String>,
}

impl Collecting {
    fn complete(&self) -> bool {
        self.items.len() as u64 >= self.total
    }
}

/// A key blocked after a failure: the delivery awaited again, and since when.
struct Blocked {
    awaited: String,
    since: Instant,
}

/// The consumer's logic, over any source of deliveries.
pub struct Core<S, H> {
    seen: S,
    handler: H,
    whole_batches: bool,
    limits: Limits,
    collecting: BTreeMap<(Lane, u64), Collecting>,
    /// Ordering keys with a failed delivery, and the item awaited again.
    blocked: BTreeMap<(Lane, String), Blocked>,
    verifier: Verifier,
    /// Copies of items held for their batch (the verifier sees an item
    /// once its batch is handled).
    held_copies: u64,
    /// Fetches claim-checked payloads; without one such an item fails.
    claim_checks: Option<ClaimCheckResolver>,
}

impl<S: SeenStore, H: Handler> Core<S, H> {
    pub fn new(seen: S, handler: H, whole_batches: bool, contract: Contract) -> Self {
        Self {
            seen,
            handler,
            whole_batches,
            limits: Limits::default(),
            collecting: BTreeMap::new(),
            blocked: BTreeMap::new(),
            verifier: Verifier::new(contract),
            held_copies: 0,
            claim_checks: None,
        }
    }

    /// The same, resolving claim-checked items with `resolver`.
    #[must_use]
    pub fn with_claim_checks(mut self, resolver: ClaimCheckResolver) -> Self {
        self.claim_checks = Some(resolver);
        self
    }

    /// The same, with other [`Limits`].
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The order contract as the deliveries so far kept it.
    pub fn report(&self) -> Report {
        let mut report = self.verifier.report();
        report.duplicates += self.held_copies;
        report
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Works on one message.
    pub async fn on(&mut self, received: Received) -> Outcome {
        let Received { item, answer } = received;
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                warn!(message = "not a batch-outbox message; acknowledged and skipped", error = %e);
                answer.ack();
                return Outcome::Foreign(e.0);
            }
        };
        let key = item.dedup_key();
        let ordering = (item.lane(), item.ordering_key.clone());
        if let Some(blocked) = self.blocked.get(&ordering) {
            if blocked.awaited == key {
                self.blocked.remove(&ordering);
            } else if blocked.since.elapsed() >= self.limits.release_blocked_after {
                warn!(
                    message = "the failed message did not come again to this client in time; its ordering key is released",
                    ordering_key = %item.ordering_key,
                    awaited = %blocked.awaited
                );
                self.blocked.remove(&ordering);
            } else {
                answer.nack();
                return Outcome::Blocked;
            }
        }
        match self.seen.seen(&key).await {
            Ok(true) => {
                self.verifier.observe(&item);
                answer.ack();
                return Outcome::Duplicate;
            }
            Ok(false) => {}
            Err(e) => {
                answer.nack();
                return Outcome::Failed(format!("reading what was seen: {e:#}"));
            }
        }
        // A payload stored by reference is fetched and verified before the
        // item goes anywhere: one that cannot be is never handed over, and
        // the rest of its key waits for it, as after a handler's failure.
        let mut item = item;
        // A copy of an item held for its batch needs no payload: it is
        // answered with the one held.
        let held_copy = self.whole_batches
            && self
                .collecting
                .get(&(item.lane(), item.position.batch_sequence))
                .is_some_and(|c| c.items.contains_key(&item.position.item_sequence));
        let resolved = match (&self.claim_checks, &item.claim_check) {
            (_, None) => Ok(()),
            _ if held_copy => Ok(()),
            (Some(resolver), Some(_)) => resolver.resolve(&mut item).await,
            (None, Some(_)) => Err(
                "the payload is in a claim-check store and this consumer has no ClaimCheckResolver"
                    .to_owned(),
            ),
        };
        if let Err(reason) = resolved {
            warn!(message = "a claim-checked item could not be resolved; it comes again", %reason);
            self.block(ordering, key);
            answer.nack();
            return Outcome::Failed(reason);
        }
        if !self.whole_batches {
            let outcome = match self.handler.handle(Delivery::Item(item.clone())).await {
                Ok(()) => match self.seen.remember(std::slice::from_ref(&key)).await {
                    Ok(()) => Outcome::Handled,
                    Err(e) => Outcome::Failed(format!("remembering: {e:#}")),
                },
                Err(e) => Outcome::Failed(format!("{e:#}")),
            };
            if outcome == Outcome::Handled {
                self.note(&item);
                answer.ack();
            } else {
                self.block(ordering, key);
                answer.nack();
            }
            return outcome;
        }
        let slot = (item.lane(), item.position.batch_sequence);
        let collecting = self
            .collecting
            .entry(slot.clone())
            .or_insert_with(|| Collecting {
                items: BTreeMap::new(),
                answers: Vec::new(),
                total: item.batch_total_items,
                since: Instant::now(),
                keys: BTreeSet::new(),
            });
        collecting.answers.push(answer);
        if collecting.items.contains_key(&item.position.item_sequence) {
            // A copy of an item held for its batch: answered with it.
            self.held_copies += 1;
            return Outcome::Held;
        }
        collecting.keys.insert(item.ordering_key.clone());
        collecting.items.insert(item.position.item_sequence, item);
        let outcomes = self.hand_over().await;
        outcomes
            .into_iter()
            .find(|(s, _)| *s == slot)
            .map_or(Outcome::Held, |(_, outcome)| outcome)
    }

    /// Until the item `awaited` comes again, the rest of its key waits.
    fn block(&mut self, ordering: (Lane, String), awaited: String) {
        self.blocked.insert(
            ordering,
            Blocked {
                awaited,
                since: Instant::now(),
            },
        );
    }

    /// Hands over the batches whose time to wait for the rest is up (call
    /// it every second or so while no message comes); returns how each
    /// batch handed over ended.
    pub async fn tick(&mut self) -> Vec<Outcome> {
        self.hand_over()
            .await
            .into_iter()
            .map(|(_, outcome)| outcome)
            .collect()
    }

    /// Hands over, in `batch_sequence` order, every batch that is complete
    /// (or waited [`Limits::batch_wait`]) and that no earlier batch still
    /// collecting shares an ordering key with: a later batch on a key is
    /// never handed over before an earlier one.
    async fn hand_over(&mut self) -> Vec<((Lane, u64), Outcome)> {
        // Keys that wait: blocked after a failure (their failed batch comes
        // again first), or holding an earlier batch still being collected.
        let mut waiting: BTreeSet<(Lane, String)> = self.blocked.keys().cloned().collect();
        let mut ready = Vec::new();
        // As many held as the subscriber leases: the oldest batch's rest
        // cannot come until something is acknowledged.
        let held: usize = self.collecting.values().map(|b| b.answers.len()).sum();
        let mut full = held >= self.limits.max_held;
        for (slot, batch) in &self.collecting {
            let keys: Vec<(Lane, String)> = batch
                .keys
                .iter()
                .map(|k| (slot.0.clone(), k.clone()))
                .collect();
            let due = batch.complete()
                || batch.since.elapsed() >= self.limits.batch_wait
                || std::mem::take(&mut full);
            if due && !keys.iter().any(|k| waiting.contains(k)) {
                ready.push((slot.clone(), keys));
            } else {
                waiting.extend(keys);
            }
        }
        let mut outcomes = Vec::new();
        let mut failed: BTreeSet<(Lane, String)> = BTreeSet::new();
        for (slot, keys) in ready {
            // A batch after one that failed on its key waits (its messages
            // come again after the failed one's).
            if keys.iter().any(|k| failed.contains(k)) {
                continue;
            }
            let Some(batch) = self.collecting.remove(&slot) else {
                continue;
            };
            let outcome = self.deliver(batch).await;
            if outcome != Outcome::Handled {
                failed.extend(keys);
            }
            outcomes.push((slot, outcome));
        }
        outcomes
    }

    async fn deliver(&mut self, mut batch: Collecting) -> Outcome {
        // Items another client handled since they came here (their key
        // moved, they came to both): not handed over again.
        let keys: Vec<String> = batch.items.values().map(Item::dedup_key).collect();
        match self.seen.seen_of(&keys).await {
            Ok(handled) if !handled.is_empty() => {
                let elsewhere: Vec<u32> = batch
                    .items
                    .iter()
                    .filter(|(_, item)| handled.contains(&item.dedup_key()))
                    .map(|(position, _)| *position)
                    .collect();
                for position in elsewhere {
                    if let Some(item) = batch.items.remove(&position) {
                        self.verifier.observe(&item);
                    }
                }
                if batch.items.is_empty() {
                    for answer in batch.answers {
                        answer.ack();
                    }
                    return Outcome::Duplicate;
                }
            }
            Ok(_) => {}
            Err(e) => {
                // As a failed handler: the batch comes again, its keys wait.
                self.block_keys(batch.items.values());
                for answer in batch.answers {
                    answer.nack();
                }
                return Outcome::Failed(format!("reading what was seen: {e:#}"));
            }
        }
        let missing: Vec<u32> = (1..=u32::try_from(batch.total).unwrap_or(u32::MAX))
            .filter(|p| !batch.items.contains_key(p))
            .collect();
        let items: Vec<Item> = batch.items.into_values().collect();
        let keys: Vec<String> = items.iter().map(Item::dedup_key).collect();
        let delivery = if missing.is_empty() {
            Delivery::Batch(items.clone())
        } else {
            warn!(
                message = "a batch's other items did not come in time; handing over what came",
                batch_sequence = items.first().map(|i| i.position.batch_sequence),
                missing = ?missing
            );
            Delivery::Partial {
                items: items.clone(),
                missing,
            }
        };
        let outcome = match self.handler.handle(delivery).await {
            Ok(()) => match self.seen.remember(&keys).await {
                Ok(()) => Outcome::Handled,
                Err(e) => Outcome::Failed(format!("remembering: {e:#}")),
            },
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        let handled = outcome == Outcome::Handled;
        if handled {
            for item in &items {
                self.note(item);
            }
        } else {
            self.block_keys(items.iter());
        }
        for answer in batch.answers {
            if handled {
                answer.ack();
            } else {
                answer.nack();
            }
        }
        outcome
    }

    /// Until the batch of `items` comes again, the rest of each of their
    /// keys waits (for the key's first item of the batch).
    fn block_keys<'a>(&mut self, items: impl Iterator<Item = &'a Item>) {
        for item in items {
            self.blocked
                .entry((item.lane(), item.ordering_key.clone()))
                .or_insert_with(|| Blocked {
                    awaited: item.dedup_key(),
                    since: Instant::now(),
                });
        }
    }

    fn note(&mut self, item: &Item) {
        if let Verdict::OutOfOrder { after } = self.verifier.observe(item) {
            warn!(
                message = "an item came after a later one on its ordering key",
                item_id = %item.item_id,
                batch_sequence = item.position.batch_sequence,
                item_sequence = item.position.item_sequence,
                after_batch = after.batch_sequence,
                after_item = after.item_sequence
            );
        }
    }
}

/// Where to read from.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub project: String,
    pub subscription: String,
    /// `host:port` of the Pub/Sub emulator (anonymous credentials).
    pub emulator_host: Option<String>,
    /// Another endpoint (a regional one), with the default credentials.
    pub endpoint: Option<String>,
    /// Messages leased ahead of the handler, at most. With
    /// `whole_batches`, at least the largest batch.
    pub max_outstanding: i64,
    /// Hand whole batches to the handler instead of single items.
    pub whole_batches: bool,
    /// What the stream's ordering-key mode promises (for the report).
    pub contract: Contract,
    /// How long to wait for what may never come to this client.
    pub limits: Limits,
    /// Resolves items whose payload is in a claim-check store; `None`:
    /// such an item is never handed over (it fails, and comes again).
    pub claim_checks: Option<ClaimCheckResolver>,
}

impl ConsumerConfig {
    pub fn new(project: &str, subscription: &str) -> Self {
        Self {
            project: project.to_owned(),
            subscription: subscription.to_owned(),
            emulator_host: None,
            endpoint: None,
            max_outstanding: 1000,
            whole_batches: false,
            contract: Contract::Global,
            limits: Limits::default(),
            claim_checks: None,
        }
    }

    fn subscription_path(&self) -> String {
        format!(
            "projects/{}/subscriptions/{}",
            self.project, self.subscription
        )
    }
}

/// Reads an ordered subscription and hands its items to a [`Handler`].
pub struct Consumer;

impl Consumer {
    /// Runs until `stop` resolves or the subscription ends; returns what
    /// the deliveries did to the order contract.
    ///
    /// # Errors
    /// When the subscriber cannot be built or its stream fails.
    pub async fn run<S: SeenStore, H: Handler>(
        config: &ConsumerConfig,
        seen: S,
        handler: H,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<Report> {
        crate::install_crypto_provider();
        let mut builder = Subscriber::builder();
        if let Some(host) = &config.emulator_host {
            builder = builder
                .with_endpoint(format!("http://{host}"))
                .with_credentials(
                    google_cloud_auth::credentials::anonymous::Builder::new().build(),
                );
        } else if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let client = builder.build().await?;
        let mut stream = client
            .subscribe(config.subscription_path())
            .set_max_outstanding_messages(config.max_outstanding)
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build();
        let shutdown = stream.shutdown_token();
        let limits = Limits {
            max_held: usize::try_from(config.max_outstanding).unwrap_or(usize::MAX),
            ..config.limits
        };
        let mut core =
            Core::new(seen, handler, config.whole_batches, config.contract).with_limits(limits);
        if let Some(resolver) = &config.claim_checks {
            core = core.with_claim_checks(resolver.clone());
        }
        let mut stop = std::pin::pin!(stop);
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let result = loop {
            let next = tokio::select! {
                () = &mut stop => break Ok(()),
                _ = ticks.tick() => {
                    for outcome in core.tick().await {
                        if let Outcome::Failed(reason) = outcome {
                            warn!(message = "not handled; it comes again", reason = %reason);
                        }
                    }
                    continue;
                }
                next = stream.next() => next,
            };
            match next {
                Some(Ok((message, answer))) => {
                    let item = Item::parse(
                        &message.message_id,
                        &message.ordering_key,
                        &message.attributes,
                        &message.data,
                    );
                    if let Outcome::Failed(reason) = core
                        .on(Received {
                            item,
                            answer: Box::new(answer),
                        })
                        .await
                    {
                        warn!(message = "not handled; it comes again", reason = %reason);
                    }
                }
                Some(Err(error)) => break Err(anyhow::Error::from(error)),
                None => break Ok(()),
            }
        };
        // Sends the acknowledgements still queued; bounded.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), shutdown.shutdown()).await;
        result.map(|()| core.report())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::item::tests::item;
    use crate::seen::MemorySeen;

    /// Records how each message was answered.
    #[derive(Clone, Default)]
    struct Answers(Arc<Mutex<Vec<(String, bool)>>>);

    struct Answering(String, Answers);

    impl Answer for Answering {
        fn ack(self: Box<Self>) {
            self.1
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((self.0, true));
        }

        fn nack(self: Box<Self>) {
            self.1
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((self.0, false));
        }
    }

    /// Keeps what it handled; fails the items named in `fail_once` once.
    #[derive(Default)]
    struct Keeping {
        handled: Mutex<Vec<Delivery>>,
        fail_once: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Handler for Keeping {
        async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
            let ids: Vec<String> = match &delivery {
                Delivery::Item(item) => vec![item.item_id.clone()],
                Delivery::Batch(items) | Delivery::Partial { items, .. } => {
                    items.iter().map(|i| i.item_id.clone()).collect()
                }
            };
            let mut fail = self.fail_once.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = fail.iter().position(|f| ids.contains(f)) {
                fail.remove(at);
                anyhow::bail!("the application failed");
            }
            self.handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(delivery);
            Ok(())
        }
    }

    fn received(item: Item, answers: &Answers) -> Received {
        Received {
            answer: Box::new(Answering(item.message_id.clone(), answers.clone())),
            item: Ok(item),
        }
    }

    /// A claim-checked copy of item `i` of batch 1: its payload in `objects`.
    async fn claim_checked(objects: &outbox_claim_check::Objects, i: u32, total: u64) -> Item {
        let mut item = item(1, i, total);
        let payload = serde_json::json!({ "n": i, "document": "x".repeat(200_000) });
        let reference = objects
            .put(bytes_of(&payload))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        item.payload = serde_json::Value::Null;
        item.claim_check = Some(Ok(reference));
        item
    }

    fn bytes_of(value: &serde_json::Value) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(value).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_malformed_reference_is_not_acknowledged_as_foreign() {
        let (mut attributes, data) = crate::item::tests::message(1, 1, 1);
        attributes.insert("claim_check_url".to_owned(), "gs://b/sha256/x".to_owned());
        let item = Item::parse("m", "batch-outbox", &attributes, &data).unwrap();
        let answers = Answers::default();
        let mut core = Core::new(
            MemorySeen::new(10),
            Keeping::default(),
            false,
            Contract::Global,
        )
        .with_claim_checks(crate::ClaimCheckResolver::new(100));
        let outcome = core.on(received(item, &answers)).await;
        assert!(
            matches!(&outcome, Outcome::Failed(why) if why.contains("claim_check_sha256")),
            "{outcome:?}"
        );
        assert!(
            !answers.0.lock().unwrap_or_else(|e| e.into_inner())[0].1,
            "not acknowledged"
        );
    }

    #[tokio::test]
    async fn a_claim_checked_item_is_handed_over_resolved_and_a_changed_one_never() {
        let dir = std::env::temp_dir().join(format!("outbox-consumer-{}", std::process::id()));
        let location =
            outbox_core::claim_check::Location::parse(&format!("file://{}", dir.display()))
                .unwrap();
        let objects = outbox_claim_check::Objects::open(&location).unwrap();
        let answers = Answers::default();
        let mut core = Core::new(
            MemorySeen::new(100),
            Keeping::default(),
            false,
            Contract::Global,
        )
        .with_claim_checks(crate::ClaimCheckResolver::new(1 << 20).with_objects(objects.clone()));
        let first = claim_checked(&objects, 1, 3).await;
        assert_eq!(core.on(received(first, &answers)).await, Outcome::Handled);
        // Item 2's object changed in the store after it was written: same
        // size, another digest.
        let changed = claim_checked(&objects, 2, 3).await;
        let reference = changed.claim_check.clone().unwrap().unwrap();
        let file = dir.join(location.key(&reference.sha256));
        let mut text = std::fs::read(&file).unwrap();
        text[10] ^= 1;
        std::fs::write(&file, text).unwrap();
        let outcome = core.on(received(changed, &answers)).await;
        assert!(
            matches!(&outcome, Outcome::Failed(why) if why.contains("SHA-256")),
            "{outcome:?}"
        );
        // What follows on its key waits for it, as after any failure.
        let third = claim_checked(&objects, 3, 3).await;
        assert_eq!(core.on(received(third, &answers)).await, Outcome::Blocked);
        // Over the consumer's limit: refused before it is fetched.
        let mut small = Core::new(
            MemorySeen::new(100),
            Keeping::default(),
            false,
            Contract::Global,
        )
        .with_claim_checks(crate::ClaimCheckResolver::new(1000).with_objects(objects.clone()));
        let big = claim_checked(&objects, 1, 1).await;
        assert!(
            matches!(small.on(received(big, &answers)).await, Outcome::Failed(why) if why.contains("over the limit"))
        );
        // No resolver: never handed over.
        let mut blind = Core::new(
            MemorySeen::new(100),
            Keeping::default(),
            false,
            Contract::Global,
        );
        let unresolved = claim_checked(&objects, 1, 1).await;
        assert!(matches!(
            blind.on(received(unresolved, &answers)).await,
            Outcome::Failed(_)
        ));
        let handled = core
            .handler()
            .handled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        assert_eq!(handled.len(), 1);
        let Delivery::Item(item) = &handled[0] else {
            panic!("{:?}", handled[0]);
        };
        assert_eq!(item.payload["n"], 1);
        assert_eq!(
            item.payload["document"].as_str().map(str::len),
            Some(200_000)
        );
        assert!(
            small
                .handler()
                .handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );
        assert!(
            blind
                .handler()
                .handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );
        let acks: Vec<bool> = answers
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, ack)| *ack)
            .collect();
        assert_eq!(
            acks,
            [true, false, false, false, false],
            "only the resolved item is acknowledged"
        );
    }

    /// Deliveries with a duplicate, and a failure whose redelivery brings
    /// what followed on the key again (Pub/Sub's behaviour with ordering).
    fn deliveries() -> Vec<Item> {
        let mut out = Vec::new();
        for (b, i, total) in [
            (1, 1, 2),
            (1, 2, 2),
            (1, 2, 2),
            (2, 1, 2),
            (2, 2, 2),
            (2, 1, 2),
            (2, 2, 2),
            (3, 1, 1),
        ] {
            let mut item = item(b, i, total);
            item.message_id = format!("m{}", out.len());
            out.push(item);
        }
        out
    }

    #[tokio::test]
    async fn each_item_reaches_the_handler_once_and_a_failed_one_comes_again() {
        let answers = Answers::default();
        let handler = Keeping::default();
        handler
            .fail_once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("i2-1".to_owned());
        let mut core = Core::new(MemorySeen::default(), handler, false, Contract::Global);
        let mut outcomes = Vec::new();
        for item in deliveries() {
            outcomes.push(core.on(received(item, &answers)).await);
        }
        let handled: Vec<String> = core
            .handler()
            .handled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| match d {
                Delivery::Item(item) => item.item_id.clone(),
                Delivery::Batch(_) | Delivery::Partial { .. } => String::new(),
            })
            .collect();
        assert_eq!(handled, ["i1-1", "i1-2", "i2-1", "i2-2", "i3-1"]);
        assert_eq!(outcomes[2], Outcome::Duplicate);
        assert!(matches!(outcomes[3], Outcome::Failed(_)));
        assert_eq!(
            outcomes[4],
            Outcome::Blocked,
            "i2-2 waits for i2-1 to come again"
        );
        assert_eq!(outcomes[6], Outcome::Handled);
        // The failed delivery and the one after it on the key were not
        // acknowledged; every other one was.
        let answered = answers.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let nacked: Vec<&str> = answered
            .iter()
            .filter(|(_, a)| !a)
            .map(|(m, _)| m.as_str())
            .collect();
        assert_eq!(nacked, ["m3", "m4"]);
        assert!(core.report().held());
    }

    #[tokio::test]
    async fn whole_batches_reach_the_handler_in_order_and_are_acknowledged_together() {
        let answers = Answers::default();
        let handler = Keeping::default();
        handler
            .fail_once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("i2-2".to_owned());
        let mut core = Core::new(MemorySeen::default(), handler, true, Contract::Global);
        let mut outcomes = Vec::new();
        for item in deliveries() {
            outcomes.push(core.on(received(item, &answers)).await);
        }
        let batches: Vec<Vec<String>> = core
            .handler()
            .handled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| match d {
                Delivery::Batch(items) => items.iter().map(|i| i.item_id.clone()).collect(),
                Delivery::Item(_) | Delivery::Partial { .. } => Vec::new(),
            })
            .collect();
        assert_eq!(
            batches,
            [vec!["i1-1", "i1-2"], vec!["i2-1", "i2-2"], vec!["i3-1"]]
        );
        // Batch 2 failed once: both its messages were nacked, then it came
        // again whole and was acknowledged.
        let answered = answers.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let nacked: Vec<&str> = answered
            .iter()
            .filter(|(_, a)| !a)
            .map(|(m, _)| m.as_str())
            .collect();
        assert_eq!(nacked, ["m3", "m4"]);
        assert!(core.report().held());
    }

    /// The item at (`batch`, `position`) of a batch of `total`, its message
    /// named `message`.
    fn at(batch: u64, position: u32, total: u64, message: &str) -> Item {
        let mut item = item(batch, position, total);
        item.message_id = message.to_owned();
        item
    }

    fn answered(answers: &Answers) -> Vec<(String, bool)> {
        answers.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn handled_batches(core: &Core<MemorySeen, Keeping>) -> Vec<(Vec<String>, Vec<u32>)> {
        core.handler()
            .handled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| match d {
                Delivery::Batch(items) => {
                    (items.iter().map(|i| i.item_id.clone()).collect(), vec![])
                }
                Delivery::Partial { items, missing } => (
                    items.iter().map(|i| i.item_id.clone()).collect(),
                    missing.clone(),
                ),
                Delivery::Item(item) => (vec![item.item_id.clone()], vec![]),
            })
            .collect()
    }

    /// A copy of an item held for its batch (Pub/Sub redelivers a message
    /// whose lease the subscriber stopped extending) is answered with the
    /// batch: acknowledged once the batch is handled, nacked if it fails,
    /// never before.
    #[tokio::test]
    async fn a_copy_of_a_held_item_is_never_acknowledged_before_its_batch_is_handled() {
        for fails in [false, true] {
            let answers = Answers::default();
            let handler = Keeping::default();
            if fails {
                handler
                    .fail_once
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push("i1-1".to_owned());
            }
            let mut core = Core::new(MemorySeen::default(), handler, true, Contract::Global);
            assert_eq!(
                core.on(received(at(1, 1, 2, "m0"), &answers)).await,
                Outcome::Held
            );
            assert_eq!(
                core.on(received(at(1, 1, 2, "m1"), &answers)).await,
                Outcome::Held
            );
            assert!(
                answered(&answers).is_empty(),
                "nothing answered before the batch is handled"
            );
            let last = core.on(received(at(1, 2, 2, "m2"), &answers)).await;
            assert_eq!(last == Outcome::Handled, !fails, "{last:?}");
            let mut all = answered(&answers);
            all.sort();
            let acked = !fails;
            assert_eq!(
                all,
                [
                    ("m0".to_owned(), acked),
                    ("m1".to_owned(), acked),
                    ("m2".to_owned(), acked)
                ]
            );
        }
    }

    /// A batch larger than the subscriber leases cannot come whole: once
    /// `max_held` messages are held, what came is handed over at once,
    /// not after `batch_wait`, and the rest follows as its own part.
    #[tokio::test(start_paused = true)]
    async fn a_batch_over_the_lease_limit_is_handed_over_in_parts_at_once() {
        let answers = Answers::default();
        let limits = Limits {
            max_held: 3,
            ..Limits::default()
        };
        let mut core = Core::new(
            MemorySeen::default(),
            Keeping::default(),
            true,
            Contract::Global,
        )
        .with_limits(limits);
        let mut outcomes = Vec::new();
        for position in 1..=5 {
            let mut item = item(1, position, 5);
            item.message_id = format!("m{position}");
            outcomes.push(core.on(received(item, &answers)).await);
        }
        assert_eq!(
            outcomes,
            [
                Outcome::Held,
                Outcome::Held,
                Outcome::Handled,
                Outcome::Held,
                Outcome::Held
            ]
        );
        let acked: Vec<String> = answers
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, ack)| *ack)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(acked, ["m1", "m2", "m3"], "the first part is acknowledged");
        let handled = core
            .handler()
            .handled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        assert!(
            matches!(&handled[..], [Delivery::Partial { items, missing }] if items.len() == 3 && missing == &[4, 5]),
            "{handled:?}"
        );
    }

    /// Another client handled the items this one holds (their key moved
    /// to it): when the wait is over they are not handed over again, and
    /// their copies here are acknowledged.
    #[tokio::test(start_paused = true)]
    async fn items_another_client_handled_meanwhile_are_not_handed_over_again() {
        let answers = Answers::default();
        let seen = std::sync::Arc::new(MemorySeen::default());
        let mut core = Core::new(
            std::sync::Arc::clone(&seen),
            Keeping::default(),
            true,
            Contract::Global,
        );
        let held: Vec<Item> = (1..=2).map(|p| item(1, p, 3)).collect();
        for item in &held {
            assert_eq!(
                core.on(received(item.clone(), &answers)).await,
                Outcome::Held
            );
        }
        let keys: Vec<String> = held.iter().map(Item::dedup_key).collect();
        seen.remember(&keys).await.unwrap_or_default();
        tokio::time::advance(Limits::default().batch_wait).await;
        assert_eq!(core.tick().await, [Outcome::Duplicate]);
        assert!(
            core.handler()
                .handled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );
        let acks = answers.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(
            acks.len() == 2 && acks.iter().all(|(_, ack)| *ack),
            "{acks:?}"
        );
    }

    /// A position that never comes (dead-lettered at its first publish) does
    /// not hold the batch for ever: after the wait, what came is handed over
    /// as partial, with what is missing, and acknowledged once handled.
    #[tokio::test(start_paused = true)]
    async fn a_batch_missing_a_position_is_handed_over_partial_after_the_wait() {
        let answers = Answers::default();
        let limits = Limits {
            batch_wait: Duration::from_secs(30),
            ..Limits::default()
        };
        let mut core = Core::new(
            MemorySeen::default(),
            Keeping::default(),
            true,
            Contract::Global,
        )
        .with_limits(limits);
        assert_eq!(
            core.on(received(at(1, 1, 3, "m0"), &answers)).await,
            Outcome::Held
        );
        assert_eq!(
            core.on(received(at(1, 3, 3, "m1"), &answers)).await,
            Outcome::Held
        );
        assert!(core.tick().await.is_empty(), "not before the wait is over");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(core.tick().await, [Outcome::Handled]);
        assert_eq!(
            handled_batches(&core),
            [(vec!["i1-1".to_owned(), "i1-3".to_owned()], vec![2])]
        );
        assert!(answered(&answers).iter().all(|(_, acked)| *acked));
        assert_eq!(answered(&answers).len(), 2);
    }

    /// A later batch on a key is never handed over before an earlier one,
    /// even when it is complete first.
    #[tokio::test]
    async fn a_later_batch_on_a_key_waits_for_the_earlier_one() {
        let answers = Answers::default();
        let mut core = Core::new(
            MemorySeen::default(),
            Keeping::default(),
            true,
            Contract::Global,
        );
        assert_eq!(
            core.on(received(at(1, 1, 2, "m0"), &answers)).await,
            Outcome::Held
        );
        assert_eq!(
            core.on(received(at(2, 1, 1, "m1"), &answers)).await,
            Outcome::Held,
            "batch 2 is complete but batch 1 is not"
        );
        assert_eq!(
            core.on(received(at(1, 2, 2, "m2"), &answers)).await,
            Outcome::Handled
        );
        let order: Vec<Vec<String>> = handled_batches(&core)
            .into_iter()
            .map(|(ids, _)| ids)
            .collect();
        assert_eq!(order, [vec!["i1-1", "i1-2"], vec!["i2-1"]]);
        assert_eq!(answered(&answers).len(), 3);
    }

    /// A key blocked after a failure is released when the failed message
    /// does not come again to this client in time (it went to another
    /// client, or to the dead-letter topic).
    #[tokio::test(start_paused = true)]
    async fn a_blocked_key_is_released_after_the_wait() {
        let answers = Answers::default();
        let handler = Keeping::default();
        handler
            .fail_once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("i1-1".to_owned());
        let mut core = Core::new(MemorySeen::default(), handler, false, Contract::Global);
        assert!(matches!(
            core.on(received(at(1, 1, 2, "m0"), &answers)).await,
            Outcome::Failed(_)
        ));
        assert_eq!(
            core.on(received(at(1, 2, 2, "m1"), &answers)).await,
            Outcome::Blocked
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            core.on(received(at(1, 2, 2, "m2"), &answers)).await,
            Outcome::Blocked
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            core.on(received(at(1, 2, 2, "m3"), &answers)).await,
            Outcome::Handled
        );
        assert_eq!(
            answered(&answers),
            [
                ("m0".to_owned(), false),
                ("m1".to_owned(), false),
                ("m2".to_owned(), false),
                ("m3".to_owned(), true)
            ]
        );
    }

    /// When an earlier batch fails, a later one on its key that was ready at
    /// the same moment is not handed over before it: it waits, and goes
    /// after the earlier one once that comes again and is handled.
    #[tokio::test]
    async fn a_batch_after_a_failed_one_on_its_key_waits_for_it() {
        let answers = Answers::default();
        let handler = Keeping::default();
        handler
            .fail_once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push("i1-1".to_owned());
        let mut core = Core::new(MemorySeen::default(), handler, true, Contract::Global);
        assert_eq!(
            core.on(received(at(1, 1, 2, "m0"), &answers)).await,
            Outcome::Held
        );
        assert_eq!(
            core.on(received(at(2, 1, 1, "m1"), &answers)).await,
            Outcome::Held
        );
        // Batch 1 completes and fails: batch 2, ready too, is not handed over.
        assert!(matches!(
            core.on(received(at(1, 2, 2, "m2"), &answers)).await,
            Outcome::Failed(_)
        ));
        assert!(handled_batches(&core).is_empty());
        // Batch 1 comes again: it goes, then batch 2.
        assert_eq!(
            core.on(received(at(1, 1, 2, "m3"), &answers)).await,
            Outcome::Held
        );
        assert_eq!(
            core.on(received(at(1, 2, 2, "m4"), &answers)).await,
            Outcome::Handled
        );
        let order: Vec<Vec<String>> = handled_batches(&core)
            .into_iter()
            .map(|(ids, _)| ids)
            .collect();
        assert_eq!(order, [vec!["i1-1", "i1-2"], vec!["i2-1"]]);
        // m1 (batch 2) was answered once, with its batch, acknowledged.
        assert!(answered(&answers).contains(&("m1".to_owned(), true)));
    }
}
