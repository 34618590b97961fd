//! Draining the outbox: one batch at a time, in `batch_sequence` order, each
//! batch's items in `item_sequence` order, many publishes in flight.
//!
//! The rules this module enforces:
//! - Only the head batch (the lowest uncommitted `batch_sequence`) is ever
//!   published, and it is committed only after every item was acknowledged
//!   (or dead-lettered); so every item of batch N is acknowledged before any
//!   item of batch N+1 is published.
//! - Items are read from MongoDB in `item_sequence` order and handed to the
//!   client in that order; the client keeps their order on the ordering key.
//! - An item is marked sent only with the message id Pub/Sub returned.
//! - After any failure the pass ends; the next pass re-reads from MongoDB
//!   which items are still unsent and only then resumes the ordering key and
//!   publishes again, from the first unsent item. Nothing is skipped and
//!   nothing acknowledged out of order.
//!
//! Pipelining: the fenced write that records a page (its marks, and for the
//! last page of a batch the commit) runs in the background while the next
//! page is read and published; at most one write is in flight, and writes
//! are issued in page order. The next page, even the first of the next
//! batch, is published only after every item of the page before it was
//! acknowledged, which is all the order contract asks; a write that then
//! fails only means the pages after it are published again (duplicates,
//! never a reordered first delivery).

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use futures::FutureExt;
use outbox_core::model::{BatchId, BatchStatus, ItemSequence, Sequence};
use outbox_core::publish::{OrderingKeyMode, OutboxMessage, PublishError, Publisher};
use outbox_core::store::{Fence, OutboxItem, OutboxStore, PendingBatch, SentMark, StoreError};
use outbox_core::stream::{StreamDefinition, StreamName};
use tokio::sync::watch;
use outbox_service::trace_context::TraceParent;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::lease::Leadership;
use crate::metrics;
use crate::status::{CurrentBatch, Halt, StatusBoard};

pub use outbox_core::stream::PoisonPolicy;

/// Where a stream's messages go: a publisher per topic.
pub trait Publishers: Send + Sync + 'static {
    fn for_topic(&self, topic: &str) -> Arc<dyn Publisher>;
}

/// The same publisher whatever the topic (tests, benchmarks).
pub struct OnePublisher(pub Arc<dyn Publisher>);

impl Publishers for OnePublisher {
    fn for_topic(&self, _topic: &str) -> Arc<dyn Publisher> {
        Arc::clone(&self.0)
    }
}

#[derive(Clone, Debug)]
pub struct DrainSettings {
    /// Items read, published and marked per round trip.
    pub page_size: u32,
    /// The stream's definition as it changes: a pass takes it as it is when
    /// it starts a batch.
    pub definition: watch::Receiver<StreamDefinition>,
}

impl DrainSettings {
    /// Settings whose definition never changes.
    pub fn fixed(page_size: u32, definition: StreamDefinition) -> Self {
        Self {
            page_size,
            definition: watch::channel(definition).1,
        }
    }

    pub fn stream(&self) -> StreamName {
        self.definition.borrow().name.clone()
    }
}

/// What one pass works with: the definition as the pass started, and the
/// publisher of its topic.
struct PassSettings {
    stream: StreamName,
    ordering: OrderingKeyMode,
    on_poison: PoisonPolicy,
    publisher: Arc<dyn Publisher>,
}

/// How a pass ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// No uncommitted batch.
    Idle,
    /// A batch was committed; there may be more.
    Committed(BatchId),
    /// The head batch is failed: nothing moves until it is retried.
    Halted(BatchId),
    /// Shutdown was requested between pages.
    Interrupted,
}

/// Why a pass stopped early. All of these are retried by the caller.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("not the leader (lease lost or not renewed in time)")]
    NotLeader,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publish failed: {0}")]
    Publish(String),
    /// The next batch to publish is not the one after the last committed:
    /// batch `expected` is not readable yet (a writer's commit not visible
    /// at read concern majority, or a document removed). Nothing after it
    /// is published until it is.
    #[error(
        "batch {expected} is not readable yet (the next stored batch is {found}); nothing after it is published until it is"
    )]
    Gap { expected: Sequence, found: Sequence },
}

impl DrainError {
    fn from_store(error: StoreError) -> Self {
        match error {
            StoreError::Fenced { .. } => Self::NotLeader,
            other => Self::Store(other),
        }
    }
}

pub struct Drainer {
    store: Arc<dyn OutboxStore>,
    publishers: Arc<dyn Publishers>,
    settings: DrainSettings,
    status: Arc<StatusBoard>,
    /// The page write running in the background, if any.
    in_flight: std::sync::Mutex<Option<InFlight>>,
    /// Ordering keys a failed publish paused; resumed once MongoDB was
    /// re-read, before anything is published again.
    paused_keys: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The highest committed sequence, as known under a lease epoch: the
    /// next batch published must be the one after it.
    committed: std::sync::Mutex<Option<(u64, Option<Sequence>)>>,
}

/// A fenced page write running in the background.
struct InFlight {
    /// The batch it finishes (commits), when it is that batch's last page.
    finishes: Option<PendingBatch>,
    write: JoinHandle<Result<(), StoreError>>,
}

impl Drainer {
    pub fn new(
        store: Arc<dyn OutboxStore>,
        publishers: Arc<dyn Publishers>,
        settings: DrainSettings,
        status: Arc<StatusBoard>,
    ) -> Self {
        Self {
            store,
            publishers,
            settings,
            status,
            in_flight: std::sync::Mutex::new(None),
            paused_keys: std::sync::Mutex::default(),
            committed: std::sync::Mutex::new(None),
        }
    }

    /// The stream, as metrics label it.
    fn label(&self) -> String {
        self.settings.definition.borrow().name.to_string()
    }

    /// The highest committed sequence, read from the store once per lease
    /// epoch and then kept up to date by our own commits.
    async fn committed_through(&self, epoch: u64) -> Result<Option<Sequence>, DrainError> {
        let known = *self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known_epoch, sequence)) = known
            && known_epoch == epoch
        {
            return Ok(sequence);
        }
        let sequence = self.store.committed_through(&self.settings.stream()).await?;
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = Some((epoch, sequence));
        Ok(sequence)
    }

    fn record_committed(&self, sequence: Sequence) {
        let mut known = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, last)) = known.as_mut() {
            *last = (*last).max(Some(sequence));
        }
    }

    fn take_in_flight(&self) -> Option<InFlight> {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The batch whose commit is in flight, if any.
    fn finishing(&self) -> Option<Sequence> {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|f| f.finishes.as_ref().map(|b| b.batch_sequence))
    }

    /// Waits for the page write in flight, if any, and reports its batch
    /// committed when it was the batch's last.
    ///
    /// # Errors
    /// The write's error.
    pub async fn settle(&self) -> Result<(), DrainError> {
        let Some(in_flight) = self.take_in_flight() else {
            return Ok(());
        };
        in_flight
            .write
            .await
            .map_err(|e| DrainError::Store(StoreError::Other(format!("page write task: {e}"))))?
            .map_err(DrainError::from_store)?;
        if let Some(batch) = in_flight.finishes {
            self.record_committed(batch.batch_sequence);
            self.committed(&batch);
        }
        Ok(())
    }

    /// Starts a page's write once the one before it is done.
    async fn write_in_background(
        &self,
        fence: Fence,
        batch: &PendingBatch,
        marks: Vec<SentMark>,
        finishes: bool,
    ) -> Result<(), DrainError> {
        self.settle().await?;
        let store = Arc::clone(&self.store);
        let batch_id = batch.batch_id.clone();
        let sequence = batch.batch_sequence;
        let write = tokio::spawn(async move {
            if finishes {
                store.finish_batch(&fence, &batch_id, sequence, &marks).await
            } else {
                store.mark_sent(&fence, &batch_id, &marks).await
            }
        });
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = Some(InFlight {
            finishes: finishes.then(|| batch.clone()),
            write,
        });
        Ok(())
    }

    fn committed(&self, batch: &PendingBatch) {
        let age = (chrono::Utc::now() - batch.created_at)
            .num_milliseconds()
            .max(0) as f64
            / 1000.0;
        ::metrics::histogram!(metrics::END_TO_END_LATENCY, "stream" => self.label()).record(age);
        ::metrics::counter!(metrics::BATCHES_COMMITTED, "stream" => self.label()).increment(1);
        self.status.update(|s| {
            s.batches_committed_total += 1;
            if s.current_batch
                .as_ref()
                .is_some_and(|c| c.batch_id == batch.batch_id)
            {
                s.current_batch = None;
            }
        });
        info!(
            message = "batch committed",
            batch_id = %batch.batch_id,
            batch_sequence = batch.batch_sequence.0,
            items = batch.total_items,
            end_to_end_seconds = age
        );
    }

    /// Works on the head batch: publishes its unsent items and commits it.
    ///
    /// # Errors
    /// [`DrainError`] when the pass could not finish; nothing is lost, the
    /// next pass resumes from what MongoDB says is unsent.
    pub async fn pass(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> Result<Pass, DrainError> {
        let result = self.pass_pipelined(leadership, shutdown).await;
        if !matches!(result, Ok(Pass::Committed(_))) {
            // Whatever ended the pass, the write in flight must be done (or
            // its failure known) before the next pass reads MongoDB.
            let settled = self.settle().await;
            return result.and_then(|pass| settled.map(|()| pass));
        }
        result
    }

    async fn pass_pipelined(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> Result<Pass, DrainError> {
        // The definition as it is now, for this batch.
        let settings = {
            let definition = self.settings.definition.borrow();
            PassSettings {
                stream: definition.name.clone(),
                ordering: definition.ordering.clone(),
                on_poison: definition.on_poison,
                publisher: self.publishers.for_topic(&definition.topic),
            }
        };
        // While the previous batch's commit is in flight, the head is the
        // first uncommitted batch after it.
        let finishing = self.finishing();
        let head = match finishing {
            Some(sequence) => self
                .store
                .pending_batches(&settings.stream, Some(sequence), 1)
                .await?
                .into_iter()
                .next(),
            None => self.store.head_batch(&settings.stream).await?,
        };
        let Some(batch) = head else {
            self.settle().await?;
            self.status.update(|s| {
                s.current_batch = None;
                s.halted = None;
            });
            ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(0.0);
            return Ok(Pass::Idle);
        };
        // Batch N+1 goes out only after N is committed: the head must be
        // the batch right after the last committed (or the one whose commit
        // is in flight). A gap means a batch not readable yet.
        let epoch = leadership.fence().ok_or(DrainError::NotLeader)?.epoch;
        let after = match finishing {
            Some(sequence) => Some(sequence),
            None => self.committed_through(epoch).await?,
        };
        if let Some(after) = after
            && batch.batch_sequence != after.next()
        {
            ::metrics::counter!(metrics::SEQUENCE_GAPS, "kind" => "batch", "stream" => self.label()).increment(1);
            return Err(DrainError::Gap {
                expected: after.next(),
                found: batch.batch_sequence,
            });
        }
        if batch.status == BatchStatus::Failed {
            self.settle().await?;
            self.status.update(|s| {
                s.current_batch = None;
                s.halted = Some(Halt {
                    batch_id: batch.batch_id.clone(),
                    batch_sequence: batch.batch_sequence,
                    error: batch.last_error.clone(),
                });
            });
            ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(1.0);
            return Ok(Pass::Halted(batch.batch_id));
        }
        ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(0.0);
        self.status.update(|s| {
            s.halted = None;
            s.current_batch = Some(CurrentBatch {
                batch_id: batch.batch_id.clone(),
                batch_sequence: batch.batch_sequence,
                total_items: batch.total_items,
                published: 0,
            });
        });
        leadership.fence().ok_or(DrainError::NotLeader)?;
        // The first page's write sets the batch `processing`; no write of
        // its own.
        // One span per batch, a child of the request that stored it (when
        // spans are exported): the trace runs from the client to Pub/Sub.
        let span = tracing::info_span!(
            "publish_batch",
            batch_id = %batch.batch_id,
            batch_sequence = batch.batch_sequence.0,
            items = batch.total_items,
        );
        if let Some(parent) = batch.traceparent.as_deref().and_then(TraceParent::parse) {
            outbox_service::telemetry::set_remote_parent(&span, &parent);
        }
        let published = self
            .publish_batch(&settings, &batch, leadership, shutdown)
            .instrument(span)
            .await?;
        match published {
            BatchEnd::Published => {
                self.settle().await?;
                let fence = leadership.fence().ok_or(DrainError::NotLeader)?;
                self.store
                    .commit_batch(&fence, &batch.batch_id, batch.batch_sequence)
                    .await
                    .map_err(DrainError::from_store)?;
                self.record_committed(batch.batch_sequence);
                self.committed(&batch);
            }
            // Its commit is in flight; `settle` reports it.
            BatchEnd::Committed => {}
            BatchEnd::Halted => return Ok(Pass::Halted(batch.batch_id)),
            BatchEnd::Interrupted => return Ok(Pass::Interrupted),
        }
        Ok(Pass::Committed(batch.batch_id))
    }

    async fn publish_batch(
        &self,
        settings: &PassSettings,
        batch: &PendingBatch,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> Result<BatchEnd, DrainError> {
        let key = settings.ordering.stream_key(&batch.stream, &batch.batch_id);
        // Whatever paused a key before, MongoDB has just told us (below)
        // what is unsent; publishing again from there keeps the order.
        let resume = || {
            if let Some(key) = &key {
                settings.publisher.resume(key);
            }
            let paused =
                std::mem::take(&mut *self.paused_keys.lock().unwrap_or_else(|e| e.into_inner()));
            for key in paused {
                settings.publisher.resume(&key);
            }
        };
        resume();
        let page_size = self.settings.page_size;
        let mut after = ItemSequence(0);
        loop {
            if shutdown.is_cancelled() {
                return Ok(BatchEnd::Interrupted);
            }
            if u64::from(after.0) >= batch.total_items {
                return Ok(BatchEnd::Published);
            }
            // The window after+1 ..= after+page_size (within the batch),
            // read by primary key. A position with no item ends the pass.
            let window = u32::try_from(batch.total_items - u64::from(after.0))
                .unwrap_or(u32::MAX)
                .min(page_size);
            let window_end = ItemSequence(after.0.saturating_add(window));
            let step = Instant::now();
            let mut items = match self.store.unsent_items(&batch.batch_id, after, window).await {
                Err(error @ StoreError::Incomplete(_)) => {
                    ::metrics::counter!(metrics::SEQUENCE_GAPS, "kind" => "item", "stream" => self.label()).increment(1);
                    return Err(DrainError::Store(error));
                }
                other => other?,
            };
            // The batch says where it is in the stream (a staged item is
            // stored before its batch has a sequence).
            for item in &mut items {
                item.batch_sequence = batch.batch_sequence;
            }
            let read_ms = step.elapsed().as_millis() as u64;
            if items.is_empty() {
                after = window_end;
                continue;
            }
            // Checked right before publishing: a replica whose lease lapsed
            // publishes nothing more.
            let fence = leadership.fence().ok_or(DrainError::NotLeader)?;
            let step = Instant::now();
            let page = self.publish_page(settings, batch, &items).await;
            let publish_ms = step.elapsed().as_millis() as u64;
            // Items are numbered 1..=total: the window that reaches the last
            // one, without a failure, leaves nothing pending (earlier windows
            // were all marked), so its marks and the commit go together.
            let finishes = page.failure.is_none() && u64::from(window_end.0) >= batch.total_items;
            let published = page.marks.len() as u64;
            if finishes || !page.marks.is_empty() {
                let step = Instant::now();
                self.write_in_background(fence.clone(), batch, page.marks.clone(), finishes)
                    .await?;
                tracing::debug!(
                    message = "page",
                    items = items.len(),
                    read_ms,
                    publish_ms,
                    wait_for_previous_write_ms = step.elapsed().as_millis() as u64
                );
            }
            if page.failure.is_some() {
                // The failure paths write synchronously, after the marks.
                self.settle().await?;
            }
            ::metrics::counter!(metrics::PUBLISHED, "stream" => self.label()).increment(published);
            self.status.update(|s| {
                s.published_total += published;
                if let Some(current) = s.current_batch.as_mut() {
                    current.published += published;
                }
            });
            match page.failure {
                None if finishes => return Ok(BatchEnd::Committed),
                None => after = window_end,
                Some((index, PublishError::Transient(error))) => {
                    ::metrics::counter!(metrics::PUBLISH_ERRORS, "kind" => "transient", "stream" => self.label())
                        .increment(1);
                    warn!(
                        message = "publish failed; will retry from the first unsent item",
                        batch_id = %batch.batch_id,
                        item_sequence = items[index].item_sequence.0,
                        %error
                    );
                    return Err(DrainError::Publish(error));
                }
                Some((index, PublishError::Permanent(error))) => {
                    let item = &items[index];
                    if let Some(message_id) = self.confirm_poison(settings, batch, item).await? {
                        // Alone it went through: another message of the
                        // failed request was the problem. Mark and go on.
                        let mark = SentMark {
                            item_id: item.item_id,
                            item_sequence: item.item_sequence,
                            publish_id: message_id,
                        };
                        self.store
                            .mark_sent(&fence, &batch.batch_id, &[mark])
                            .await
                            .map_err(DrainError::from_store)?;
                    } else {
                        ::metrics::counter!(metrics::PUBLISH_ERRORS, "kind" => "permanent", "stream" => self.label())
                            .increment(1);
                        if self.poisoned(settings, &fence, batch, item, &error).await? == BatchEnd::Halted {
                            return Ok(BatchEnd::Halted);
                        }
                    }
                    resume();
                    after = ItemSequence(0);
                }
            }
        }
    }

    /// Publishes a page with every message in flight at once and waits for
    /// all answers. Stops handing messages to the client at the first one
    /// Pub/Sub would refuse (over one of its limits: an item stored before
    /// the writer checked them), so nothing after it goes out first.
    async fn publish_page(
        &self,
        settings: &PassSettings,
        batch: &PendingBatch,
        items: &[OutboxItem],
    ) -> PageResult {
        let messages: Vec<OutboxMessage> = items
            .iter()
            .map(|item| OutboxMessage::for_item(item, batch, &settings.ordering))
            .collect();
        let refused = messages
            .iter()
            .enumerate()
            .find_map(|(index, m)| m.check_limits().err().map(|e| (index, e)));
        let sendable = refused.as_ref().map_or(messages.len(), |(index, _)| *index);
        let oversize_error = refused.map(|(index, violation)| {
            ::metrics::counter!(metrics::PUBLISH_ERRORS, "kind" => "over_limit", "stream" => self.label()).increment(1);
            (index, PublishError::Permanent(violation.to_string()))
        });
        let keys: Vec<Option<String>> = messages.iter().map(|m| m.ordering_key.clone()).collect();
        let started = Instant::now();
        let in_flight: Vec<_> = messages
            .into_iter()
            .take(sendable)
            .map(|message| {
                settings
                    .publisher
                    .publish(message)
                    .map(move |result| (result, started.elapsed()))
            })
            .collect();
        let results = futures::future::join_all(in_flight).await;
        let mut marks = Vec::with_capacity(results.len());
        let mut failure = None;
        for (index, (result, latency)) in results.into_iter().enumerate() {
            match result {
                Ok(message_id) => {
                    ::metrics::histogram!(metrics::PUBLISH_LATENCY, "stream" => self.label()).record(latency.as_secs_f64());
                    marks.push(SentMark {
                        item_id: items[index].item_id,
                        item_sequence: items[index].item_sequence,
                        publish_id: message_id,
                    });
                }
                Err(error) => {
                    // The client paused this key: resume it before the
                    // next publish on it.
                    if let Some(key) = &keys[index] {
                        self.paused_keys
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key.clone());
                    }
                    failure.get_or_insert((index, error));
                }
            }
        }
        PageResult {
            marks,
            failure: failure.or(oversize_error),
        }
    }

    /// Publishes a rejected item on its own: `Some(message id)` if it goes
    /// through after all, `None` if Pub/Sub rejects it for good.
    async fn confirm_poison(
        &self,
        settings: &PassSettings,
        batch: &PendingBatch,
        item: &OutboxItem,
    ) -> Result<Option<String>, DrainError> {
        let message = OutboxMessage::for_item(item, batch, &settings.ordering);
        if message.check_limits().is_err() {
            return Ok(None);
        }
        if let Some(key) = &message.ordering_key {
            settings.publisher.resume(key);
        }
        match settings.publisher.publish(message).await {
            Ok(message_id) => Ok(Some(message_id)),
            Err(PublishError::Permanent(_)) => Ok(None),
            Err(PublishError::Transient(error)) => Err(DrainError::Publish(error)),
        }
    }

    async fn poisoned(
        &self,
        settings: &PassSettings,
        fence: &Fence,
        batch: &PendingBatch,
        item: &OutboxItem,
        error: &str,
    ) -> Result<BatchEnd, DrainError> {
        match settings.on_poison {
            PoisonPolicy::Halt => {
                warn!(
                    message = "item rejected for good; halting on this batch until it is retried",
                    batch_id = %batch.batch_id,
                    item_sequence = item.item_sequence.0,
                    %error
                );
                self.store
                    .fail_batch(fence, &batch.batch_id, item.item_sequence, error)
                    .await
                    .map_err(DrainError::from_store)?;
                self.status.update(|s| {
                    s.current_batch = None;
                    s.halted = Some(Halt {
                        batch_id: batch.batch_id.clone(),
                        batch_sequence: batch.batch_sequence,
                        error: Some(format!("item {}: {error}", item.item_sequence)),
                    });
                });
                self.status
                    .record_error(format!("batch {} halted: {error}", batch.batch_id));
                ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(1.0);
                Ok(BatchEnd::Halted)
            }
            PoisonPolicy::DeadLetter => {
                warn!(
                    message = "item rejected for good; dead-lettered",
                    batch_id = %batch.batch_id,
                    item_sequence = item.item_sequence.0,
                    %error
                );
                self.store
                    .dead_letter(fence, item, error)
                    .await
                    .map_err(DrainError::from_store)?;
                ::metrics::counter!(metrics::DEAD_LETTERED, "stream" => self.label()).increment(1);
                Ok(BatchEnd::Published)
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum BatchEnd {
    /// Every item is sent or failed; the batch still needs its commit.
    Published,
    /// The last page's marks and the commit went in one write.
    Committed,
    Halted,
    Interrupted,
}

struct PageResult {
    marks: Vec<SentMark>,
    /// The first failed item's index in the page, and why.
    failure: Option<(usize, PublishError)>,
}
