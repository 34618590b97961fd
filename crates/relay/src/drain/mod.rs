//! Draining the outbox: batches in `batch_sequence` order, each batch's
//! items in `item_sequence` order, with three things overlapping so that
//! round trips to MongoDB and Pub/Sub are not paid one after another.
//!
//! The rules this module enforces:
//! - Batches are taken in sequence order with no gap: the next one read
//!   must follow the last one handed over (or the last committed), and a
//!   failed batch stops the stream until it is retried (`read.rs`).
//! - Items are handed to the client in (`batch_sequence`, `item_sequence`)
//!   order. In `global` mode a group of pages, across batches, goes out at
//!   once on the one ordering key; in `batch` and `field:` modes a batch is
//!   handed over only after every item before it was acknowledged
//!   (`publish.rs` says why).
//! - An item is marked sent only with the message id Pub/Sub returned, and
//!   a batch is committed only in the same write as, or after, the marks of
//!   all its items (`write.rs`); writes are issued one at a time in the
//!   order the pages were published.
//! - After any failure the pass ends once every write handed over is done;
//!   the next pass re-reads from MongoDB what is unsent and only then
//!   resumes the ordering keys and publishes again, from the first unsent
//!   item. Nothing is skipped and nothing acknowledged out of order.
//!
//! The pipeline: while a group of pages is published, the next group is
//! read (`read.rs`: the batches and all their items in two round trips),
//! and the writes recording earlier groups run in the background, each
//! carrying every page handed over while the one before it ran (`write.rs`:
//! four statements however many pages). A write that fails only means that
//! the pages after it are published again (duplicates, never a reordered
//! first delivery).

mod publish;
mod read;
mod write;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::model::{BatchId, Sequence};
use outbox_core::publish::{OrderingKeyMode, PublishError, Publisher};
use outbox_core::store::{OutboxStore, PageWrite, StoreError};
use outbox_core::stream::{StreamDefinition, StreamName};
use outbox_service::trace_context::TraceParent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::lease::Leadership;
use crate::metrics;
use crate::status::{CurrentBatch, Halt, StatusBoard};
use read::{Ahead, Next, Piece, Reader};
use write::{Page, Shared, Writes};

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
    /// Batches were published (the last one named; its commit may still be
    /// in flight); there may be more.
    Committed(BatchId),
    /// The head batch is failed: nothing moves until it is retried.
    Halted(BatchId),
    /// Shutdown was requested between pages.
    Interrupted,
}

/// How long one pass drains before it returns `Committed`, so the runner
/// looks at the pause flag and the backlog (the pipeline carries on).
const PASS_BUDGET: Duration = Duration::from_secs(1);

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
    shared: Arc<Shared>,
    /// The progress writes, in the background.
    writes: Writes,
    /// Where the drain is and the next read, kept from one pass to the next
    /// while nothing failed.
    ahead: Mutex<Option<Ahead>>,
    /// Ordering keys a failed publish paused; resumed once MongoDB was
    /// re-read, before anything is published again.
    paused_keys: Mutex<std::collections::BTreeSet<String>>,
}

/// How a batch's publishing ended, after a refused item.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BatchEnd {
    /// The item is dealt with (marked after all, or dead-lettered).
    Published,
    Halted,
}

impl Drainer {
    pub fn new(
        store: Arc<dyn OutboxStore>,
        publishers: Arc<dyn Publishers>,
        settings: DrainSettings,
        status: Arc<StatusBoard>,
    ) -> Self {
        let shared = Arc::new(Shared {
            status: Arc::clone(&status),
            stream: settings.stream().to_string(),
            committed: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
        });
        Self {
            writes: Writes::new(Arc::clone(&store), Arc::clone(&shared)),
            store,
            publishers,
            settings,
            status,
            shared,
            ahead: Mutex::new(None),
            paused_keys: Mutex::default(),
        }
    }

    /// The stream, as metrics label it.
    fn label(&self) -> String {
        self.shared.stream.clone()
    }

    /// The highest committed sequence, read from the store once per lease
    /// epoch and then kept up to date by our own commits; read again after
    /// any failed pass (see [`write::Shared::forget_committed`]).
    async fn committed_through(&self, epoch: u64) -> Result<Option<Sequence>, DrainError> {
        let known = *self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((known_epoch, sequence)) = known
            && known_epoch == epoch
        {
            return Ok(sequence);
        }
        let sequence = self
            .store
            .committed_through(&self.settings.stream())
            .await?;
        *self
            .shared
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((epoch, sequence));
        Ok(sequence)
    }

    fn take_ahead(&self) -> Option<Ahead> {
        self.ahead.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn keep_ahead(&self, ahead: Ahead) {
        *self.ahead.lock().unwrap_or_else(|e| e.into_inner()) = Some(ahead);
    }

    /// Waits for every write handed over, and forgets where the drain was
    /// (the next pass starts from what MongoDB says).
    ///
    /// # Errors
    /// The first write error.
    pub async fn settle(&self) -> Result<(), DrainError> {
        drop(self.take_ahead());
        self.writes.settle().await.map_err(DrainError::from_store)
    }

    /// Drains: publishes group after group of pages and hands their writes
    /// over, for about [`PASS_BUDGET`], until nothing is left, the stream
    /// halts, or `shutdown`.
    ///
    /// # Errors
    /// [`DrainError`] when the pass could not go on; nothing is lost, the
    /// next pass resumes from what MongoDB says is unsent.
    pub async fn pass(
        &self,
        leadership: &Leadership,
        shutdown: &CancellationToken,
    ) -> Result<Pass, DrainError> {
        let result = self.pass_pipelined(leadership, shutdown).await;
        if result.is_err() {
            // Whatever failed (a write whose answer was lost, a gap seen
            // from a position known before), the next pass starts from
            // what the store says is committed, never from what this
            // replica remembers.
            self.shared.forget_committed();
        }
        if !matches!(result, Ok(Pass::Committed(_))) {
            // Whatever ended the pass, the writes handed over must be done
            // (or their failure known) before the next pass reads MongoDB.
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
        // The definition as it is now, for this pass.
        let settings = {
            let definition = self.settings.definition.borrow();
            PassSettings {
                stream: definition.name.clone(),
                ordering: definition.ordering.clone(),
                on_poison: definition.on_poison,
                publisher: self.publishers.for_topic(&definition.topic),
            }
        };
        let epoch = leadership.fence().ok_or(DrainError::NotLeader)?.epoch;
        let mut ahead = match self.take_ahead() {
            Some(ahead) if ahead.epoch == epoch => ahead,
            _ => {
                // A fresh start: MongoDB says what is unsent. Whatever
                // paused a key before, publishing from there keeps order.
                self.writes.settle().await.map_err(DrainError::from_store)?;
                self.resume_keys(&settings);
                Ahead::new(epoch, self.committed_through(epoch).await?)
            }
        };
        let reader = Reader {
            store: Arc::clone(&self.store),
            stream: settings.stream.clone(),
            page_size: self.settings.page_size,
        };
        let started = tokio::time::Instant::now();
        let last = loop {
            if shutdown.is_cancelled() {
                return Ok(Pass::Interrupted);
            }
            if self.writes.failed() {
                return Err(self.settle().await.err().unwrap_or(DrainError::NotLeader));
            }
            // The group: read ahead during the last one, or read now.
            let waited = tokio::time::Instant::now();
            let read = match ahead.prefetch.take() {
                Some(prefetch) => prefetch.await.map_err(|e| {
                    DrainError::Store(StoreError::Other(format!("read-ahead task: {e}")))
                })??,
                None => {
                    reader
                        .read(ahead.position.clone(), std::mem::take(&mut ahead.queued))
                        .await?
                }
            };
            self.waited("read", waited);
            let pieces = match read.next {
                Next::Idle => {
                    self.writes.settle().await.map_err(DrainError::from_store)?;
                    self.status.update(|s| {
                        s.current_batch = None;
                        s.halted = None;
                    });
                    ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(0.0);
                    return Ok(Pass::Idle);
                }
                Next::Gap { expected, found } => return Err(DrainError::Gap { expected, found }),
                Next::Halted(batch) => {
                    self.writes.settle().await.map_err(DrainError::from_store)?;
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
                Next::Group(pieces) => pieces,
            };
            ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(0.0);
            // Read the group after this one while this one is published.
            ahead.position = read.position;
            ahead.queued = read.queued;
            let next = reader.clone();
            let (position, queued) = (ahead.position.clone(), std::mem::take(&mut ahead.queued));
            ahead.prefetch = Some(tokio::spawn(
                async move { next.read(position, queued).await },
            ));

            match self
                .publish_and_record(&settings, &pieces, leadership)
                .await
            {
                Ok(()) => {}
                Err(end) => {
                    drop(ahead);
                    return end;
                }
            }
            if started.elapsed() >= PASS_BUDGET {
                break pieces.last().map(|p| p.batch.batch_id.clone());
            }
        };
        self.keep_ahead(ahead);
        Ok(last.map_or(Pass::Idle, Pass::Committed))
    }

    /// Counts what the drain loop waited on since `since` (`DRAIN_WAIT`).
    fn waited(&self, phase: &'static str, since: tokio::time::Instant) {
        ::metrics::counter!(metrics::DRAIN_WAIT, "stream" => self.label(), "phase" => phase)
            .increment(since.elapsed().as_micros() as u64);
    }

    /// Resumes every ordering key a failed publish paused.
    fn resume_keys(&self, settings: &PassSettings) {
        let paused =
            std::mem::take(&mut *self.paused_keys.lock().unwrap_or_else(|e| e.into_inner()));
        for key in paused {
            settings.publisher.resume(&key);
        }
    }

    /// Publishes a group and hands its writes over. `Err` ends the pass
    /// with what it returns (after a failure, once the writes are done).
    async fn publish_and_record(
        &self,
        settings: &PassSettings,
        pieces: &[Piece],
        leadership: &Leadership,
    ) -> Result<(), Result<Pass, DrainError>> {
        if let Some(last) = pieces.last() {
            let published = u64::from(last.window_end.0);
            self.status.update(|s| {
                s.halted = None;
                s.current_batch = Some(CurrentBatch {
                    batch_id: last.batch.batch_id.clone(),
                    batch_sequence: last.batch.batch_sequence,
                    total_items: last.batch.total_items,
                    published: published.saturating_sub(last.items.len() as u64),
                });
            });
        }
        // One span per batch starting here, a child of the request that
        // stored it (when spans are exported): the trace runs from the
        // client to Pub/Sub.
        let spans: Vec<tracing::Span> = pieces
            .iter()
            .filter(|p| p.after.0 == 0)
            .map(|p| {
                let span = tracing::info_span!(
                    "publish_batch",
                    batch_id = %p.batch.batch_id,
                    batch_sequence = p.batch.batch_sequence.0,
                    items = p.batch.total_items,
                );
                if let Some(parent) = p.batch.traceparent.as_deref().and_then(TraceParent::parse) {
                    outbox_service::telemetry::set_remote_parent(&span, &parent);
                }
                span
            })
            .collect();
        // Checked right before publishing: a replica whose lease lapsed
        // publishes nothing more.
        let fence = leadership.fence().ok_or(Err(DrainError::NotLeader))?;
        let waited = tokio::time::Instant::now();
        let published = self.publish_group(settings, pieces).await;
        self.waited("publish", waited);
        drop(spans);
        let failed_piece = published.failure.as_ref().map(|(p, _, _)| *p);
        let mut pages = Vec::with_capacity(pieces.len());
        let mut count = 0;
        for (index, (piece, marks)) in pieces.iter().zip(published.marks).enumerate() {
            count += marks.len() as u64;
            // A piece finishes its batch when it reaches the end and
            // nothing in it or before it failed.
            let finishes = piece.reaches_end() && failed_piece.is_none_or(|f| index < f);
            if marks.is_empty() && !finishes {
                continue;
            }
            pages.push(Page {
                write: PageWrite {
                    batch_id: piece.batch.batch_id.clone(),
                    sequence: piece.batch.batch_sequence,
                    marks,
                    finishes,
                },
                finishes: finishes.then(|| piece.batch.clone()),
            });
        }
        ::metrics::counter!(metrics::PUBLISHED, "stream" => self.label()).increment(count);
        self.status.update(|s| {
            s.published_total += count;
            if let Some(current) = s.current_batch.as_mut() {
                current.published = current
                    .published
                    .max(pieces.last().map_or(0, |p| u64::from(p.window_end.0)));
            }
        });
        let waited = tokio::time::Instant::now();
        self.writes.record(fence.clone(), pages).await;
        self.waited("write", waited);
        let Some((p, index, error)) = published.failure else {
            return Ok(());
        };
        // The marks before the failure are written before anything is
        // read again.
        self.writes
            .settle()
            .await
            .map_err(|e| Err(DrainError::from_store(e)))?;
        let piece = &pieces[p];
        let item = &piece.items[index];
        match error {
            PublishError::Transient(error) => {
                ::metrics::counter!(metrics::PUBLISH_ERRORS, "kind" => "transient", "stream" => self.label())
                    .increment(1);
                warn!(
                    message = "publish failed; will retry from the first unsent item",
                    batch_id = %piece.batch.batch_id,
                    item_sequence = publish::failed_at(piece, index).0,
                    %error
                );
                Err(Err(DrainError::Publish(error)))
            }
            PublishError::Permanent(error) => {
                let end = self
                    .refused(settings, &fence, &piece.batch, item, &error)
                    .await
                    .map_err(Err)?;
                // Publishing goes on from what MongoDB says, keys resumed.
                self.resume_keys(settings);
                Err(Ok(match end {
                    BatchEnd::Halted => Pass::Halted(piece.batch.batch_id.clone()),
                    BatchEnd::Published => Pass::Committed(piece.batch.batch_id.clone()),
                }))
            }
        }
    }
}
