//! Reading ahead: the next group of pages (up to a page of items, from
//! one batch or from consecutive batches) in two round trips at most (the
//! batches, when none are queued, and all their windows' items at once),
//! read while the group before it is published.

use std::collections::VecDeque;
use std::sync::Arc;

use outbox_core::model::{BatchStatus, ItemSequence, Sequence};
use outbox_core::store::{ItemWindow, OutboxItem, OutboxStore, PendingBatch, StoreError};
use outbox_core::stream::StreamName;
use tokio::task::JoinHandle;

use super::DrainError;
use crate::metrics;

/// Batches read at once, at most (they are small documents).
const BATCHES_PER_READ: u32 = 1000;

/// Where the drain is in the stream: everything before it was handed to
/// Pub/Sub (and acknowledged, or it would not be here).
#[derive(Clone, Debug)]
pub(super) enum Position {
    /// After the batch with this sequence (`None`: nothing is known to be
    /// committed, start at the first uncommitted batch).
    After(Option<Sequence>),
    /// Inside a batch: its items through `after` were handed over.
    In {
        batch: PendingBatch,
        after: ItemSequence,
    },
}

impl Position {
    /// The batch the next one read must follow: the one the position is in
    /// (its remaining window is read first), or the one it is after.
    fn last_batch(&self) -> Option<Sequence> {
        match self {
            Self::After(sequence) => *sequence,
            Self::In { batch, .. } => Some(batch.batch_sequence),
        }
    }
}

/// One window of one batch, read.
#[derive(Clone, Debug)]
pub(super) struct Piece {
    pub batch: PendingBatch,
    pub after: ItemSequence,
    pub window_end: ItemSequence,
    /// The unsent items of the window, in `item_sequence` order.
    pub items: Vec<OutboxItem>,
}

impl Piece {
    /// Whether the window reaches the batch's last item.
    pub fn reaches_end(&self) -> bool {
        u64::from(self.window_end.0) >= self.batch.total_items
    }
}

/// What comes next in the stream.
#[derive(Debug)]
pub(super) enum Next {
    /// Nothing uncommitted after the position.
    Idle,
    /// The next batch is failed: nothing moves until it is retried.
    Halted(PendingBatch),
    /// The next batch is not the one after the position.
    Gap {
        expected: Sequence,
        found: Sequence,
    },
    Group(Vec<Piece>),
}

/// A read: what comes next, where the drain will be once it is handed
/// over, and the batches read beyond it.
pub(super) struct Read {
    pub next: Next,
    pub position: Position,
    pub queued: VecDeque<PendingBatch>,
}

/// The drain's place under one lease epoch, and the next read running.
pub(super) struct Ahead {
    pub epoch: u64,
    pub position: Position,
    pub queued: VecDeque<PendingBatch>,
    pub prefetch: Option<JoinHandle<Result<Read, DrainError>>>,
}

impl Ahead {
    pub fn new(epoch: u64, after: Option<Sequence>) -> Self {
        Self {
            epoch,
            position: Position::After(after),
            queued: VecDeque::new(),
            prefetch: None,
        }
    }
}

impl Drop for Ahead {
    fn drop(&mut self) {
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.abort();
        }
    }
}

/// What a read needs.
#[derive(Clone)]
pub(super) struct Reader {
    pub store: Arc<dyn OutboxStore>,
    pub stream: StreamName,
    pub page_size: u32,
}

impl Reader {
    /// Reads the group after `position`: windows of up to `page_size` items
    /// in all, from the batch it is in and the batches after it.
    ///
    /// # Errors
    /// A store error; [`StoreError::Incomplete`] when the first window has
    /// a position with no item.
    pub async fn read(
        &self,
        position: Position,
        mut queued: VecDeque<PendingBatch>,
    ) -> Result<Read, DrainError> {
        let mut budget = self.page_size.max(1);
        let mut windows: Vec<(PendingBatch, ItemSequence, ItemSequence)> = Vec::new();
        let mut last = position.last_batch();
        if let Position::In { batch, after } = &position
            && u64::from(after.0) < batch.total_items
        {
            let window = window_of(batch, *after, budget);
            budget -= window;
            windows.push((batch.clone(), *after, ItemSequence(after.0 + window)));
        }
        while budget > 0 {
            if queued.is_empty() {
                let limit = self.page_size.clamp(1, BATCHES_PER_READ);
                queued.extend(
                    self.store
                        .pending_batches(&self.stream, last, limit)
                        .await?,
                );
                if queued.is_empty() {
                    break;
                }
            }
            let Some(batch) = queued.pop_front() else {
                break;
            };
            // Batch N+1 only after N, and batch 1 first when nothing is
            // committed: a gap is a batch not readable yet (on a sharded
            // cluster without zones, an earlier batch's shard may answer
            // later than a later one's).
            let expected = last.map_or(Sequence(1), Sequence::next);
            if batch.batch_sequence != expected {
                let found = batch.batch_sequence;
                queued.push_front(batch);
                if windows.is_empty() {
                    ::metrics::counter!(metrics::SEQUENCE_GAPS, "kind" => "batch", "stream" => self.stream.to_string()).increment(1);
                    return Ok(Read {
                        next: Next::Gap { expected, found },
                        position,
                        queued: VecDeque::new(),
                    });
                }
                break;
            }
            if batch.status == BatchStatus::Failed {
                if windows.is_empty() {
                    return Ok(Read {
                        next: Next::Halted(batch),
                        position,
                        queued: VecDeque::new(),
                    });
                }
                queued.push_front(batch);
                break;
            }
            last = Some(batch.batch_sequence);
            let window = window_of(&batch, ItemSequence(0), budget);
            budget -= window;
            windows.push((batch, ItemSequence(0), ItemSequence(window)));
        }
        if windows.is_empty() {
            return Ok(Read {
                next: Next::Idle,
                position,
                queued,
            });
        }
        let pages = match self.items(&windows).await {
            Ok(pages) => pages,
            // A later window not readable yet must not hold the first back.
            Err(DrainError::Store(StoreError::Incomplete(_))) if windows.len() > 1 => {
                let first = windows.swap_remove(0);
                windows.clear();
                windows.push(first);
                queued.clear();
                self.items(&windows).await?
            }
            Err(error) => return Err(error),
        };
        let pieces: Vec<Piece> = windows
            .into_iter()
            .zip(pages)
            .map(|((batch, after, window_end), mut items)| {
                // The batch says where it is in the stream (a staged item
                // is stored before its batch has a sequence).
                for item in &mut items {
                    item.batch_sequence = batch.batch_sequence;
                }
                Piece {
                    batch,
                    after,
                    window_end,
                    items,
                }
            })
            .collect();
        let end = pieces.last().map(|p| Position::In {
            batch: p.batch.clone(),
            after: p.window_end,
        });
        Ok(Read {
            next: Next::Group(pieces),
            position: end.unwrap_or(position),
            queued,
        })
    }

    async fn items(
        &self,
        windows: &[(PendingBatch, ItemSequence, ItemSequence)],
    ) -> Result<Vec<Vec<OutboxItem>>, DrainError> {
        let request: Vec<ItemWindow> = windows
            .iter()
            .map(|(batch, after, end)| ItemWindow {
                batch_id: batch.batch_id.clone(),
                after: *after,
                limit: end.0 - after.0,
            })
            .collect();
        match self.store.unsent_items_in(&request).await {
            Err(error @ StoreError::Incomplete(_)) => {
                ::metrics::counter!(metrics::SEQUENCE_GAPS, "kind" => "item", "stream" => self.stream.to_string()).increment(1);
                Err(DrainError::Store(error))
            }
            other => Ok(other?),
        }
    }
}

/// Items of `batch` after `after` that fit in `budget`.
fn window_of(batch: &PendingBatch, after: ItemSequence, budget: u32) -> u32 {
    u32::try_from(batch.total_items.saturating_sub(u64::from(after.0)))
        .unwrap_or(u32::MAX)
        .min(budget)
}
