//! The storage traits the writer and the relay are written against, and the
//! errors they return. Adapters (MongoDB, the in-memory model) implement them.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{
    BatchId, BatchProgress, BatchSummary, ItemId, ItemSequence, ItemStatus, NewBatch, Sequence,
};
pub use crate::model::{OutboxItem, PendingBatch};
use crate::replay::{HeldRange, ReplayAction, ReplayId, ReplayJob, ReplayProgress};
use crate::stream::{StreamDefinition, StreamName};

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The database cannot be reached (or answered with a transient error):
    /// retry later. The writer answers 503.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A transaction conflicted with another one and was rolled back; retrying
    /// it from the start is safe.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// Another request stored a batch under the same idempotency key first.
    #[error("idempotency key already used")]
    DuplicateIdempotencyKey,
    /// The caller's lease epoch is no longer current: it is not the leader
    /// any more, and nothing was changed.
    #[error("fenced: lease epoch {epoch} is no longer current")]
    Fenced { epoch: u64 },
    /// The named batch does not exist.
    #[error("batch {0} not found")]
    NotFound(BatchId),
    /// The commit was sent but whether it took effect could not be learned
    /// before the deadline (the store went away mid-commit). The client
    /// must look the batch up, or retry with its idempotency key.
    #[error("commit outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// One item is larger than the store can hold once encoded (MongoDB:
    /// 16 MiB of BSON per document). Nothing was stored.
    #[error("item {index} is {bytes} bytes as stored, over the store's limit of {limit} bytes")]
    ItemTooLarge {
        index: usize,
        bytes: usize,
        limit: usize,
    },
    /// What the relay must publish next is not all readable: an item of a
    /// batch's window is absent (a sharded cluster's commit not visible on
    /// every shard yet, a document removed by hand). Nothing past it may
    /// be published; the pass ends and reads again later.
    #[error("incomplete: {0}")]
    Incomplete(String),
    /// Stored data or a reply did not have the expected shape.
    #[error("store error: {0}")]
    Other(String),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Conflict(_))
    }
}

/// How current a read outside a transaction is: which writes it may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadLevel {
    /// What the node answering has applied, including writes that a
    /// failover later rolls back (MongoDB's `local`).
    Local,
    /// What a majority of the replica set has acknowledged: never rolled
    /// back (MongoDB's `majority`).
    Majority,
}

/// The level of every read outside a transaction that the relay, the
/// lease, the registry, replays and the writer's lookups make. A decision
/// taken on a write that later rolls back (an item published, a batch
/// shown as stored, a commit point followed) would break the promises, so
/// it is [`ReadLevel::Majority`]. The MongoDB adapter sends it as the read
/// concern; the simulator's replica set serves each read by it.
pub const READS: ReadLevel = ReadLevel::Majority;

/// The first position of the window `first ..= last` that `present` (the
/// positions a read found, in ascending order) lacks: where what the relay
/// publishes must stop (see [`StoreError::Incomplete`]). Publishing past
/// it would put a later item before an earlier one. Every adapter decides
/// by it.
pub fn first_missing(first: u64, last: u64, present: impl IntoIterator<Item = u64>) -> Option<u64> {
    let mut present = present.into_iter().peekable();
    (first..=last).find(|expected| {
        while present.next_if(|p| p < expected).is_some() {}
        present.next_if_eq(expected).is_none()
    })
}

/// How long a conflicting transaction is run again before giving up.
/// Every conflict means a competitor committed, so the system as a whole
/// progresses; the budget bounds how long one unlucky request can lose.
/// (MongoDB's drivers give their convenient transaction API 120 s.)
pub const DEFAULT_TRANSACTION_RETRY_TIME: Duration = Duration::from_secs(10);

/// The retry policy for whole transactions that conflicted: run again while
/// the time budget lasts, with an exponentially growing, fully jittered
/// pause between runs (1 ms doubling up to 100 ms) so competing writers
/// spread out. Every store adapter uses it, so the
/// in-memory model exercises the same policy as MongoDB.
///
/// ```text
/// let mut retry = ConflictRetry::new(DEFAULT_TRANSACTION_RETRY_TIME);
/// loop {
///     match run_transaction().await {
///         Err(e) if retry.again(&e).await => continue,
///         other => return other,
///     }
/// }
/// ```
#[derive(Debug)]
pub struct ConflictRetry {
    attempts: u32,
    deadline: tokio::time::Instant,
}

impl ConflictRetry {
    /// Starts the budget now, before the first attempt.
    pub fn new(budget: Duration) -> Self {
        Self::until(tokio::time::Instant::now() + budget)
    }

    /// Retries until `deadline` (a request's deadline, say).
    pub fn until(deadline: tokio::time::Instant) -> Self {
        Self {
            attempts: 1,
            deadline,
        }
    }

    /// After a failed attempt: whether to run again. Only a
    /// [`StoreError::Conflict`] is retried, and only within the budget;
    /// before returning `true` it waits a random pause of up to
    /// 2^attempt ms, capped at 100 ms and at what is left of the budget.
    pub async fn again(&mut self, error: &StoreError) -> bool {
        let now = tokio::time::Instant::now();
        if !matches!(error, StoreError::Conflict(_)) || now >= self.deadline {
            return false;
        }
        let cap_ms = (2u64 << self.attempts.min(6)).min(100);
        self.attempts += 1;
        let pause = Duration::from_millis(crate::world::random_range(0..=cap_ms));
        tokio::time::sleep(pause.min(self.deadline - now)).await;
        tokio::time::Instant::now() < self.deadline
    }

    /// How many attempts have been started.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// The writer's view of the store.
#[async_trait]
pub trait BatchStore: Send + Sync + 'static {
    /// Stores the batch and all its items atomically, taking the next
    /// [`Sequence`] inside the same transaction, and records the batch's
    /// idempotency key when it has one.
    ///
    /// # Errors
    /// [`StoreError::DuplicateIdempotencyKey`] when the key was used first by
    /// another request (nothing is stored); [`StoreError::Unavailable`] when
    /// the database is down or `deadline` passed before the transaction
    /// could commit (nothing is stored then); [`StoreError::Conflict`]
    /// when conflict retries ran out at the deadline;
    /// [`StoreError::OutcomeUnknown`] when the commit was sent but its
    /// outcome is unknown at the deadline; [`StoreError::ItemTooLarge`].
    async fn insert_batch(
        &self,
        batch: &NewBatch,
        deadline: tokio::time::Instant,
    ) -> Result<BatchSummary, StoreError>;

    /// The body hash an idempotency key of `stream` was stored with and
    /// its batch, if the key is known and not expired (keys are scoped to
    /// their stream). The batch is `None` when retention removed it after
    /// it was committed.
    async fn find_idempotent(
        &self,
        stream: &StreamName,
        key: &str,
    ) -> Result<Option<(String, Option<BatchSummary>)>, StoreError>;

    /// The client-facing progress of a batch.
    async fn batch_progress(&self, batch_id: &BatchId)
    -> Result<Option<BatchProgress>, StoreError>;

    /// Checks that the store answers and supports what the service needs.
    async fn ready(&self) -> Result<(), StoreError>;
}

/// A lease on the right to drain one stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub stream: StreamName,
    pub holder: String,
    /// Increases on every change of holder; progress writes carry it.
    pub epoch: u64,
    /// Unix milliseconds after which another replica may take the lease.
    pub expires_at_ms: i64,
    /// The highest `batch_sequence` committed under any epoch, recorded by
    /// the commit's own fenced write; `None` before the first commit that
    /// recorded it.
    pub committed: Option<Sequence>,
    /// Items of the stream published and recorded, counted by every
    /// leader's fenced writes (an item published twice counts twice): what
    /// the stream has published, whichever replica led it.
    pub published: u64,
}

impl Lease {
    pub fn fence(&self) -> Fence {
        Fence {
            stream: self.stream.clone(),
            holder: self.holder.clone(),
            epoch: self.epoch,
        }
    }
}

/// Proof of leadership that every progress write carries: the write fails
/// with [`StoreError::Fenced`] when the lease has moved on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub stream: StreamName,
    pub holder: String,
    pub epoch: u64,
}

/// The leases, one per stream.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// The store's clock, in Unix milliseconds. Lease expiry is judged by
    /// it, so every replica judges by one clock, whatever its own says.
    async fn now_ms(&self) -> Result<i64, StoreError>;

    /// Takes the stream's lease when it is free or expired (a new epoch),
    /// or renews it when `holder` has it (the same epoch). `None` when
    /// another holder has a live lease.
    async fn acquire_or_renew(
        &self,
        stream: &StreamName,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError>;

    /// Gives the lease up, if `fence` still holds it, so another replica can
    /// take over at once.
    async fn release(&self, fence: &Fence) -> Result<(), StoreError>;

    /// The stream's lease as stored, whoever holds it.
    async fn current(&self, stream: &StreamName) -> Result<Option<Lease>, StoreError>;

    /// Every stream's lease as stored.
    async fn leases(&self) -> Result<Vec<Lease>, StoreError>;
}

/// A relay process's identity, as lease holder and member: its configured
/// name (`RELAY_ID`, what people read) and a suffix drawn when the process
/// starts, `NAME#SUFFIX`. A process restarted under the same name (a
/// container's host name and pid 1 are the same after a restart) is another
/// holder: its predecessor's lease is taken over (a new epoch, the orphaned
/// transaction killed), never renewed as its own; and two live processes
/// configured with one name never share an epoch.
pub fn instance_id(name: &str, suffix: u32) -> String {
    format!("{name}#{suffix:08x}")
}

/// The configured name in an [`instance_id`] (the whole id when it has no
/// suffix: holders written before instance ids).
pub fn instance_name(id: &str) -> &str {
    id.rsplit_once('#').map_or(id, |(name, _)| name)
}

/// A relay replica, as the others see it: what the share of the streams is
/// computed from, and what the cluster's status pages show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Member {
    /// Its [`instance_id`].
    pub id: String,
    /// Where its admin port answers (empty when not known).
    pub admin_url: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// By the store's clock, Unix milliseconds: a member past it is gone.
    pub expires_at_ms: i64,
    /// What it publishes, per stream it leads: items published since it
    /// started.
    pub published: std::collections::BTreeMap<String, u64>,
    /// A fingerprint of its admin token (never the token), `None` when its
    /// admin API is open: replicas with another token, or none, are
    /// flagged, since every replica obeys what any of them stores.
    pub admin_token: Option<String>,
}

impl Member {
    /// Its configured name (`RELAY_ID`).
    pub fn name(&self) -> &str {
        instance_name(&self.id)
    }
}

/// How long a member that left or stopped announcing itself is shown as
/// gone: 10 minutes.
pub const GONE_SHOWN_MS: i64 = 10 * 60 * 1000;

/// The names two or more live members share: processes configured with one
/// `RELAY_ID` (a copy-pasted deployment, a second process started by hand).
pub fn shared_names(members: &[Member]) -> Vec<String> {
    let mut names: Vec<&str> = members.iter().map(Member::name).collect();
    names.sort_unstable();
    let mut shared: Vec<String> = names
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0].to_owned())
        .collect();
    shared.dedup();
    shared
}

/// The relay replicas' registry: each announces itself every few seconds.
#[async_trait]
pub trait MemberStore: Send + Sync + 'static {
    /// Announces (or refreshes) `member` until `expires_at_ms`.
    async fn heartbeat(&self, member: &Member) -> Result<(), StoreError>;

    /// The members whose announcement has not expired at `now_ms`.
    async fn members(&self, now_ms: i64) -> Result<Vec<Member>, StoreError>;

    /// The members whose announcement expired (or who left) in the
    /// [`GONE_SHOWN_MS`] before `now_ms`, newest first: shown as gone for a
    /// while. Older records are removed (every process is a member of its
    /// own, so the registry would otherwise grow with every restart).
    async fn recently_gone(&self, now_ms: i64) -> Result<Vec<Member>, StoreError>;

    /// Marks a member that stops as gone (its announcement expires now).
    async fn leave(&self, id: &str) -> Result<(), StoreError>;
}

/// Stream definitions.
#[async_trait]
pub trait StreamStore: Send + Sync + 'static {
    /// Every stored definition (`default` only when one was stored).
    async fn streams(&self) -> Result<Vec<StreamDefinition>, StoreError>;

    /// One stored definition.
    async fn stream(&self, name: &StreamName) -> Result<Option<StreamDefinition>, StoreError>;

    /// Creates or replaces a definition (its sequence counter is created
    /// with it). Returns whether it was created.
    async fn put_stream(&self, definition: &StreamDefinition) -> Result<bool, StoreError>;
}

/// What one retention pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub batches: u64,
    pub items: u64,
    pub dead_letters: u64,
    /// Large batches whose items were stored but whose transaction never
    /// made them visible (a writer that died or gave up), removed with
    /// their items.
    pub abandoned_batches: u64,
    /// References to claim-check objects the removed items made, by object
    /// URL: retention releases them (`ObjectRefStore::release`).
    pub object_refs: std::collections::BTreeMap<String, u64>,
}

/// An item as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ItemView {
    pub item_id: ItemId,
    pub item_sequence: ItemSequence,
    pub request_id: Option<String>,
    pub vendor_name: String,
    pub status: ItemStatus,
    pub publish_id: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// Pub/Sub's acknowledgement of one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentMark {
    pub item_id: ItemId,
    pub item_sequence: ItemSequence,
    pub publish_id: String,
}

/// A window of one batch's items: positions `after + 1 ..= after + limit`
/// (see [`OutboxStore::unsent_items`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemWindow {
    pub batch_id: BatchId,
    pub after: ItemSequence,
    pub limit: u32,
}

/// One batch's share of a progress write: the acknowledgements of a page,
/// and whether they finish the batch (its commit goes in the same write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageWrite {
    pub batch_id: BatchId,
    pub sequence: Sequence,
    pub marks: Vec<SentMark>,
    /// Every item of the batch is sent or failed once these marks are in:
    /// commit it.
    pub finishes: bool,
}

/// Counts for the relay's lag metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Backlog {
    pub pending_batches: u64,
    pub oldest_created_at: Option<DateTime<Utc>>,
    /// The first batch not committed, if any.
    pub head: Option<PendingBatch>,
}

/// The relay's view of the store. Every write that records progress takes a
/// [`Fence`] and fails with [`StoreError::Fenced`] once the lease moved on.
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// The stream's first batch, in `batch_sequence` order, that is not
    /// committed.
    async fn head_batch(&self, stream: &StreamName) -> Result<Option<PendingBatch>, StoreError>;

    /// The stream's uncommitted batches in processing order, after `after`
    /// when given.
    async fn pending_batches(
        &self,
        stream: &StreamName,
        after: Option<Sequence>,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError>;

    /// How many of the stream's batches wait, and since when.
    async fn backlog(&self, stream: &StreamName) -> Result<Backlog, StoreError>;

    /// The items of a batch not yet sent nor failed whose `item_sequence`
    /// is in the window `after + 1 ..= after + limit`, in `item_sequence`
    /// order; the window lies within the batch (`after + limit <=
    /// total_items`). A window may hold fewer than `limit` of them (some
    /// are sent already), or none; the caller moves on window by window up
    /// to the batch's `total_items`. (A window, not "the next `limit`
    /// unsent", so a store can read it by primary key: [`ItemId::of`]
    /// names every item in it.)
    ///
    /// # Errors
    /// [`StoreError::Incomplete`] when a position of the window has no item
    /// at all (neither pending, sent nor failed).
    async fn unsent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError>;

    /// [`unsent_items`](Self::unsent_items) of several windows (of one
    /// batch or of consecutive batches), one list per window. Stores that
    /// can read them all in one round trip should.
    ///
    /// # Errors
    /// As [`unsent_items`](Self::unsent_items), for any window.
    async fn unsent_items_in(
        &self,
        windows: &[ItemWindow],
    ) -> Result<Vec<Vec<OutboxItem>>, StoreError> {
        let mut pages = Vec::with_capacity(windows.len());
        for window in windows {
            pages.push(
                self.unsent_items(&window.batch_id, window.after, window.limit)
                    .await?,
            );
        }
        Ok(pages)
    }

    /// Items of a batch for inspection, in `item_sequence` order.
    async fn items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<ItemView>, StoreError>;

    /// The progress of one batch.
    async fn batch_progress(&self, batch_id: &BatchId)
    -> Result<Option<BatchProgress>, StoreError>;

    /// Marks a pending batch as being drained.
    async fn start_batch(&self, fence: &Fence, batch_id: &BatchId) -> Result<(), StoreError>;

    /// Records Pub/Sub's acknowledgements, all in one write.
    async fn mark_sent(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        marks: &[SentMark],
    ) -> Result<(), StoreError>;

    /// Marks a batch whose items are all sent or failed as committed, and
    /// records `sequence` as the highest committed (see
    /// [`committed_through`](Self::committed_through)) in the same write.
    async fn commit_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
    ) -> Result<(), StoreError>;

    /// The last page's marks and the commit together. Stores that can do
    /// both in one transaction should; the result must be the same as
    /// [`mark_sent`](Self::mark_sent) followed by
    /// [`commit_batch`](Self::commit_batch).
    async fn finish_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        self.mark_sent(fence, batch_id, marks).await?;
        self.commit_batch(fence, batch_id, sequence).await
    }

    /// Records several pages, in order: each page's marks, and the commit
    /// of every batch a page finishes (the highest recorded as in
    /// [`commit_batch`](Self::commit_batch)). The result must be the same as
    /// [`mark_sent`](Self::mark_sent) and [`finish_batch`](Self::finish_batch)
    /// page after page; stores that can write them all in one transaction
    /// (a few round trips, however many pages) should.
    async fn record_pages(&self, fence: &Fence, pages: &[PageWrite]) -> Result<(), StoreError> {
        for page in pages {
            if page.finishes {
                self.finish_batch(fence, &page.batch_id, page.sequence, &page.marks)
                    .await?;
            } else if !page.marks.is_empty() {
                self.mark_sent(fence, &page.batch_id, &page.marks).await?;
            }
        }
        Ok(())
    }

    /// The highest `batch_sequence` committed: the one the next batch to
    /// publish must follow. Recorded with every commit; for data committed
    /// before it was, the highest committed batch still stored. `None`
    /// when nothing says (no commit recorded, none stored).
    async fn committed_through(&self, stream: &StreamName) -> Result<Option<Sequence>, StoreError>;

    /// Halts on an item Pub/Sub rejected for good: the batch becomes failed.
    async fn fail_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        item_sequence: ItemSequence,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Sets an item Pub/Sub rejected for good aside: it becomes failed and a
    /// copy with the error goes to the dead letters.
    async fn dead_letter(
        &self,
        fence: &Fence,
        item: &OutboxItem,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Puts a failed batch back to draining from its first unsent item.
    /// Returns whether the batch was failed.
    async fn retry_batch(&self, batch_id: &BatchId) -> Result<bool, StoreError>;

    /// Retention, for one stream: removes up to `limit` committed batches, with their items,
    /// whose commit is older than `committed_before` (oldest first), and
    /// the dead letters set aside before `dead_letters_before`. A batch that
    /// is not committed is never touched. Also removes the items of large
    /// batches staged before `abandoned_before` whose transaction never
    /// made them visible. Idempotent: a pass cut short is finished by the
    /// next.
    async fn remove_expired(
        &self,
        stream: &StreamName,
        committed_before: Option<DateTime<Utc>>,
        dead_letters_before: Option<DateTime<Utc>>,
        abandoned_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Removed, StoreError>;

    /// Whether draining the stream is paused (for every replica).
    async fn paused(&self, stream: &StreamName) -> Result<bool, StoreError>;

    /// Pauses or resumes draining the stream, for every replica.
    async fn set_paused(&self, stream: &StreamName, paused: bool) -> Result<(), StoreError>;
}

/// Replay jobs, and the reads a replay publishes from. Reads are of
/// committed data only, at the same (majority) read concern as the drain's.
#[async_trait]
pub trait ReplayStore: Send + Sync + 'static {
    /// What the stream still holds of its committed batches.
    async fn held_range(&self, stream: &StreamName) -> Result<HeldRange, StoreError>;

    /// How many batches of `from ..= to` are held, and their items.
    async fn range_totals(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
    ) -> Result<(u64, u64), StoreError>;

    /// Stores a new job.
    async fn create_replay(&self, job: &ReplayJob) -> Result<(), StoreError>;

    async fn replay(&self, id: &ReplayId) -> Result<Option<ReplayJob>, StoreError>;

    /// Jobs, newest first, of one stream or of all.
    async fn replays(
        &self,
        stream: Option<&StreamName>,
        limit: u32,
    ) -> Result<Vec<ReplayJob>, StoreError>;

    /// The stream's running jobs, oldest first (what its leader runs).
    async fn running_replays(&self, stream: &StreamName) -> Result<Vec<ReplayJob>, StoreError>;

    /// Applies an operator's action when the job is in a state it applies
    /// to (see [`ReplayAction::transition`]); a resume restarts the rate's
    /// measurement and clears the error. The job as it is afterwards,
    /// changed or not; `None` when there is no such job.
    async fn act_on_replay(
        &self,
        id: &ReplayId,
        action: ReplayAction,
    ) -> Result<Option<ReplayJob>, StoreError>;

    /// Records how far a job got, under the stream's fence; with
    /// `progress.done`, a running job becomes done.
    async fn record_replay(
        &self,
        fence: &Fence,
        progress: &ReplayProgress,
    ) -> Result<(), StoreError>;

    /// Stops a running job with an error, under the stream's fence.
    async fn fail_replay(
        &self,
        fence: &Fence,
        id: &ReplayId,
        error: &str,
    ) -> Result<(), StoreError>;

    /// The stream's committed batches from `from` up to `to`, in order, at
    /// most `limit`.
    async fn committed_batches(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError>;

    /// The sent items of a committed batch at positions `after + 1 ..=
    /// after + limit`, in order (an item the relay dead-lettered was never
    /// published, and is not replayed).
    ///
    /// # Errors
    /// [`StoreError::Incomplete`] when a position of the window has no item
    /// at all (retention removed it meanwhile), [`StoreError::NotFound`]
    /// when the batch is gone: the replay must stop there, not skip.
    async fn sent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_missing_position_is_where_a_window_stops() {
        assert_eq!(first_missing(1, 4, [1, 2, 3, 4]), None);
        assert_eq!(first_missing(1, 4, [1, 2, 4]), Some(3));
        assert_eq!(first_missing(5, 6, []), Some(5));
        assert_eq!(first_missing(3, 4, [1, 3, 4]), None);
        assert_eq!(first_missing(1, 3, [2, 3]), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn conflicts_are_retried_within_the_budget_and_nothing_else_is() {
        let conflict = StoreError::Conflict("write conflict".into());
        let mut retry = ConflictRetry::new(Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        while retry.again(&conflict).await {}
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert!(retry.attempts() > 10, "{} attempts", retry.attempts());

        let mut retry = ConflictRetry::new(Duration::from_secs(1));
        assert!(!retry.again(&StoreError::Unavailable("down".into())).await);
        assert_eq!(retry.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_never_sleeps_past_the_deadline() {
        let conflict = StoreError::Conflict("write conflict".into());
        let deadline = tokio::time::Instant::now() + Duration::from_millis(30);
        let mut retry = ConflictRetry::until(deadline);
        while retry.again(&conflict).await {}
        assert!(tokio::time::Instant::now() <= deadline);
        assert!(retry.attempts() > 1);
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.to_owned(),
            admin_url: String::new(),
            host: String::new(),
            pid: 1,
            version: String::new(),
            started_at: Utc::now(),
            expires_at_ms: 0,
            published: std::collections::BTreeMap::new(),
            admin_token: None,
        }
    }

    /// Each process is its own holder, under its configured name; two live
    /// processes configured with one name are flagged.
    #[test]
    fn processes_with_one_name_are_told_apart_and_flagged() {
        let a = instance_id("relay-1", 1);
        let b = instance_id("relay-1", 2);
        assert_ne!(a, b);
        assert_eq!(
            (instance_name(&a), instance_name(&b)),
            ("relay-1", "relay-1")
        );
        assert_eq!(instance_name("old-holder"), "old-holder");
        let members = [member(&a), member(&b), member(&instance_id("relay-2", 3))];
        assert_eq!(shared_names(&members), ["relay-1"]);
        assert!(shared_names(&members[1..]).is_empty());
    }
}
