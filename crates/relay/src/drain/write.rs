//! The fenced progress writes, in the background: one at a time, in the
//! order they were handed over, each carrying every page handed over while
//! the one before it ran (group commit), so a store that costs round trips
//! is paid a few of them per write, not per page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use outbox_core::model::Sequence;
use outbox_core::store::{Fence, OutboxStore, PageWrite, PendingBatch, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::info;

use crate::metrics;
use crate::status::StatusBoard;

/// Pages handed over and not yet written, at most: the drain waits for a
/// write when it is this far ahead (what a crash would publish again).
const AHEAD: usize = 4;

/// Marks in one store write, at most (MongoDB takes 100,000 statements a
/// command, 16 MiB; a mark is about 200 bytes).
const MARKS_PER_WRITE: usize = 10_000;

/// One page to record, and its batch when the page finishes it.
pub(super) struct Page {
    pub write: PageWrite,
    pub finishes: Option<PendingBatch>,
}

enum Command {
    Record {
        fence: Fence,
        pages: Vec<Page>,
        _permit: OwnedSemaphorePermit,
    },
    /// Replies once everything handed over before is written, with the
    /// first error since the last settle.
    Settle(oneshot::Sender<Option<StoreError>>),
}

/// What the writes report to: the stream's status and what it knows
/// committed.
pub(super) struct Shared {
    pub status: Arc<StatusBoard>,
    pub stream: String,
    /// The highest committed sequence, as known under a lease epoch.
    pub committed: Mutex<Option<(u64, Option<Sequence>)>>,
    /// A write failed since the last settle.
    pub failed: AtomicBool,
}

impl Shared {
    pub fn record_committed(&self, sequence: Sequence) {
        let mut known = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, last)) = known.as_mut() {
            *last = (*last).max(Some(sequence));
        }
    }

    /// Forgets what is known committed: after a write that failed, its
    /// commit may have applied all the same (an answer lost on the way
    /// back), so the next pass asks the store rather than trust this.
    pub fn forget_committed(&self) {
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn committed(&self, batch: &PendingBatch) {
        self.record_committed(batch.batch_sequence);
        let age = (outbox_core::world::now() - batch.created_at)
            .num_milliseconds()
            .max(0) as f64
            / 1000.0;
        ::metrics::histogram!(metrics::END_TO_END_LATENCY, "stream" => self.stream.clone())
            .record(age);
        ::metrics::counter!(metrics::BATCHES_COMMITTED, "stream" => self.stream.clone())
            .increment(1);
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
}

/// The background writer of one stream's drain.
pub(super) struct Writes {
    store: Arc<dyn OutboxStore>,
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    room: Arc<Semaphore>,
}

impl Writes {
    pub fn new(store: Arc<dyn OutboxStore>, shared: Arc<Shared>) -> Self {
        Self {
            store,
            shared,
            tx: Mutex::new(None),
            room: Arc::new(Semaphore::new(AHEAD)),
        }
    }

    /// The writer task's queue, started on first use.
    fn sender(&self) -> mpsc::UnboundedSender<Command> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(
            Arc::clone(&self.store),
            Arc::clone(&self.shared),
            receiver,
        ));
        *tx = Some(sender.clone());
        sender
    }

    /// Hands pages over to be written after those before them; waits only
    /// when [`AHEAD`] groups of pages are already waiting.
    pub async fn record(&self, fence: Fence, pages: Vec<Page>) {
        if pages.is_empty() {
            return;
        }
        let Ok(permit) = Arc::clone(&self.room).acquire_owned().await else {
            return;
        };
        let _ = self.sender().send(Command::Record {
            fence,
            pages,
            _permit: permit,
        });
    }

    /// Whether a write failed since the last settle: the drain stops
    /// handing pages over and settles.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Waits until everything handed over is written.
    ///
    /// # Errors
    /// The first write error since the last settle (the writes handed over
    /// after a failed one are dropped: the pass re-reads what is unsent).
    pub async fn settle(&self) -> Result<(), StoreError> {
        let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        if tx.send(Command::Settle(reply)).is_err() {
            return Err(StoreError::Other("the page writer stopped".to_owned()));
        }
        match answer.await {
            Ok(None) => Ok(()),
            Ok(Some(error)) => Err(error),
            Err(_) => Err(StoreError::Other("the page writer stopped".to_owned())),
        }
    }
}

async fn run(
    store: Arc<dyn OutboxStore>,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let mut error: Option<StoreError> = None;
    while let Some(first) = rx.recv().await {
        // Everything handed over meanwhile goes into this write.
        let mut commands = vec![first];
        while let Ok(next) = rx.try_recv() {
            commands.push(next);
        }
        let mut batch: Option<(Fence, Vec<Page>)> = None;
        let mut permits = Vec::new();
        for command in commands {
            match command {
                Command::Record {
                    fence,
                    pages,
                    _permit,
                } => {
                    if error.is_some() {
                        continue;
                    }
                    if let Some((current, pending)) = batch.take() {
                        if current == fence {
                            let mut pending = pending;
                            pending.extend(pages);
                            batch = Some((current, pending));
                        } else {
                            write(&*store, &shared, &current, pending, &mut error).await;
                            batch = Some((fence, pages));
                        }
                    } else {
                        batch = Some((fence, pages));
                    }
                    permits.push(_permit);
                }
                Command::Settle(reply) => {
                    if let Some((fence, pages)) = batch.take() {
                        write(&*store, &shared, &fence, pages, &mut error).await;
                    }
                    permits.clear();
                    shared.failed.store(false, Ordering::SeqCst);
                    let _ = reply.send(error.take());
                }
            }
        }
        if let Some((fence, pages)) = batch.take() {
            write(&*store, &shared, &fence, pages, &mut error).await;
        }
        drop(permits);
    }
}

/// Writes `pages` in order, at most [`MARKS_PER_WRITE`] marks a store
/// write; stops at the first error (kept in `error`).
async fn write(
    store: &dyn OutboxStore,
    shared: &Shared,
    fence: &Fence,
    pages: Vec<Page>,
    error: &mut Option<StoreError>,
) {
    let mut pages = pages.into_iter().peekable();
    while pages.peek().is_some() && error.is_none() {
        let mut chunk = Vec::new();
        let mut marks = 0;
        while let Some(page) =
            pages.next_if(|p| chunk.is_empty() || marks + p.write.marks.len() <= MARKS_PER_WRITE)
        {
            marks += page.write.marks.len();
            chunk.push(page);
        }
        let writes: Vec<PageWrite> = chunk.iter().map(|p| p.write.clone()).collect();
        match store.record_pages(fence, &writes).await {
            Ok(()) => {
                for page in &chunk {
                    if let Some(batch) = &page.finishes {
                        shared.committed(batch);
                    }
                }
            }
            Err(e) => {
                shared.forget_committed();
                shared.failed.store(true, Ordering::SeqCst);
                *error = Some(e);
            }
        }
    }
}
