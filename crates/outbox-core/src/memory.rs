//! In-memory implementations of the store traits.
//!
//! They model what matters of MongoDB for the ordering and fencing rules:
//! batch inserts are transactions under snapshot isolation that conflict on
//! the sequence counter the way MongoDB's do (see [`TransactionModel`]) and
//! are retried through [`ConflictRetry`], like the MongoDB adapter; every
//! progress write is checked against the lease epoch; and the store can be
//! made unavailable to show that callers ride out outages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::{
    BatchId, BatchProgress, BatchStatus, BatchSummary, ItemCounts, ItemSequence, ItemStatus,
    NewBatch, Sequence,
};
use crate::replay::{ReplayId, ReplayJob};
use crate::store::{
    Backlog, BatchStore, ConflictRetry, Fence, ItemView, Lease, LeaseStore, Member, MemberStore,
    OutboxItem, OutboxStore, PendingBatch, Removed, SentMark, StoreError, StreamStore,
};
use crate::stream::{StreamDefinition, StreamName};

mod objects;
mod replays;

#[derive(Clone, Debug)]
struct StoredBatch {
    summary: BatchSummary,
    status: BatchStatus,
    committed_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    submitted_by: Option<String>,
    traceparent: Option<String>,
    items: Vec<StoredItem>,
}

#[derive(Debug, Clone)]
struct StoredItem {
    item: OutboxItem,
    status: ItemStatus,
    publish_id: Option<String>,
    sent_at: Option<DateTime<Utc>>,
    error: Option<String>,
}

/// How the model runs an ingest transaction: where it increments the
/// sequence counter, and what its statements cost.
///
/// The counter follows MongoDB's rules for a document written in a
/// transaction (snapshot isolation, first writer wins): the write conflicts
/// when another transaction holds an uncommitted write to it, or committed
/// one after this transaction's snapshot was taken (at its first
/// statement). The conflicting transaction is aborted, losing what it wrote,
/// and retried.
#[derive(Clone, Copy, Debug)]
pub struct TransactionModel {
    pub counter: CounterStep,
    /// One statement's round trip; zero yields to other tasks instead.
    pub statement: Duration,
    /// Added, per item, to the statement that inserts the items.
    pub per_item: Duration,
    /// Batches with more items than this have their items written before
    /// the transaction (staged, as the MongoDB adapter does for large
    /// batches), so the transaction that takes the counter costs a few
    /// statements whatever the batch's size. `None`: every batch in one
    /// transaction.
    pub staged_above_items: Option<usize>,
}

/// Where the counter is incremented within an ingest transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterStep {
    /// First statement (what the MongoDB adapter does).
    First,
    /// After the batch and its items, just before the commit.
    AfterItems,
}

impl Default for TransactionModel {
    fn default() -> Self {
        Self {
            counter: CounterStep::First,
            statement: Duration::ZERO,
            per_item: Duration::ZERO,
            staged_above_items: None,
        }
    }
}

/// One stream's part of the store.
#[derive(Clone, Debug, Default)]
struct StreamState {
    last_sequence: u64,
    /// Commits of the counter so far: its version, for snapshot checks.
    counter_version: u64,
    /// The transaction holding an uncommitted write to the counter.
    counter_holder: Option<u64>,
    batches: BTreeMap<Sequence, StoredBatch>,
    lease: Option<Lease>,
    paused: bool,
}

#[derive(Clone, Debug, Default)]
struct State {
    streams: BTreeMap<StreamName, StreamState>,
    by_id: HashMap<BatchId, (StreamName, Sequence)>,
    /// (stream, key) to (body hash, batch).
    idempotency: HashMap<(StreamName, String), (String, BatchId)>,
    dead_letters: Vec<(OutboxItem, String, DateTime<Utc>)>,
    /// Items [`MemoryStore::hide_item`] took away.
    hidden: Vec<(BatchId, StoredItem)>,
    definitions: BTreeMap<StreamName, StreamDefinition>,
    members: BTreeMap<String, Member>,
    replays: BTreeMap<ReplayId, ReplayJob>,
    /// Claim-check objects: references counted, and when their deletion
    /// began (Unix milliseconds).
    objects: BTreeMap<String, (u64, Option<i64>)>,
}

/// An in-memory store; clones share the same data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    unavailable: Arc<AtomicBool>,
    conflicts: Arc<AtomicU64>,
    wasted_items: Arc<AtomicU64>,
    transactions: Arc<AtomicU64>,
    model: TransactionModel,
    /// The store's clock (see [`LeaseStore::now_ms`]).
    clock: Arc<std::sync::OnceLock<(i64, tokio::time::Instant)>>,
    /// Batches whose commit loses its answer: applied, then answered
    /// [`StoreError::OutcomeUnknown`] (see [`MemoryStore::lose_commit_answer`]).
    lost_answers: Arc<Mutex<std::collections::BTreeSet<Sequence>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose ingest transactions follow `model`.
    pub fn with_model(model: TransactionModel) -> Self {
        Self {
            model,
            ..Self::default()
        }
    }

    /// A copy of the committed data, as a replica that applied every write
    /// so far has it: the copy shares nothing with this store (writes to
    /// one do not reach the other). A transaction's uncommitted hold on a
    /// counter is not copied. The simulator's replica set keeps its
    /// majority-committed state this way.
    pub fn copy_data_from(&self, other: &MemoryStore) {
        let mut data = other.lock().clone();
        for stream in data.streams.values_mut() {
            stream.counter_holder = None;
        }
        *self.lock() = data;
    }

    /// The store's clock ([`LeaseStore::now_ms`]): wall-clock milliseconds
    /// at its first reading, advanced by tokio's clock (tests pause tokio's
    /// clock to expire leases).
    pub fn clock_ms(&self) -> i64 {
        let (base_ms, base) = *self.clock.get_or_init(|| {
            (
                crate::world::now().timestamp_millis(),
                tokio::time::Instant::now(),
            )
        });
        base_ms + i64::try_from(base.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Every stream's lease as stored, for callers that must not wait.
    pub fn all_leases(&self) -> Vec<Lease> {
        self.lock()
            .streams
            .values()
            .filter_map(|s| s.lease.clone())
            .collect()
    }

    /// The stream's lease as stored (what [`LeaseStore::current`] answers),
    /// for callers that must not wait.
    pub fn lease_of(&self, stream: &StreamName) -> Option<Lease> {
        self.lock()
            .streams
            .get(stream)
            .and_then(|s| s.lease.clone())
    }

    /// Writes `next` as the stream's lease only if the lease is still as
    /// `read` (the same holder, epoch and expiry, or still absent): the
    /// compare-and-swap a lease store that reads first and decides with
    /// [`lease::step`](crate::lease::step) writes with. Returns whether it
    /// was written.
    pub fn swap_lease(
        &self,
        stream: &StreamName,
        read: Option<&Lease>,
        next: &Lease,
    ) -> Result<bool, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let stream_state = state.stream(stream);
        let key = |l: &Lease| (l.holder.clone(), l.epoch, l.expires_at_ms);
        if stream_state.lease.as_ref().map(key) != read.map(key) {
            return Ok(false);
        }
        let lease = stream_state.lease.get_or_insert_with(|| next.clone());
        lease.holder.clone_from(&next.holder);
        lease.epoch = next.epoch;
        lease.expires_at_ms = next.expires_at_ms;
        Ok(true)
    }

    /// Item writes lost to aborted insert transactions.
    pub fn wasted_item_writes(&self) -> u64 {
        self.wasted_items.load(Ordering::SeqCst)
    }

    /// The commit of the batch at `sequence` applies and then answers
    /// [`StoreError::OutcomeUnknown`], once, as a commit does on MongoDB
    /// when its answer is lost (a step-down after it replicated, a cut
    /// connection, a write concern error).
    pub fn lose_commit_answer(&self, sequence: Sequence) {
        self.lost_answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sequence);
    }

    /// Makes every call fail with [`StoreError::Unavailable`] (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// How many insert transactions conflicted and were retried.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::SeqCst)
    }

    /// Every item of every batch of the default stream in
    /// (batch_sequence, item_sequence) order, with its status and publish id.
    pub fn all_items(&self) -> Vec<(Sequence, ItemSequence, ItemStatus, Option<String>)> {
        self.all_items_in(&StreamName::default_stream())
    }

    /// [`all_items`](Self::all_items) of one stream.
    pub fn all_items_in(
        &self,
        stream: &StreamName,
    ) -> Vec<(Sequence, ItemSequence, ItemStatus, Option<String>)> {
        let state = self.lock();
        state
            .streams
            .get(stream)
            .into_iter()
            .flat_map(|s| s.batches.values())
            .flat_map(|b| {
                b.items.iter().map(|i| {
                    (
                        i.item.batch_sequence,
                        i.item.item_sequence,
                        i.status,
                        i.publish_id.clone(),
                    )
                })
            })
            .collect()
    }

    /// The status of each batch of the default stream in sequence order.
    pub fn batch_statuses(&self) -> Vec<(Sequence, BatchStatus)> {
        self.batch_statuses_in(&StreamName::default_stream())
    }

    /// [`batch_statuses`](Self::batch_statuses) of one stream.
    pub fn batch_statuses_in(&self, stream: &StreamName) -> Vec<(Sequence, BatchStatus)> {
        self.lock()
            .streams
            .get(stream)
            .into_iter()
            .flat_map(|s| s.batches.iter().map(|(n, b)| (*n, b.status)))
            .collect()
    }

    /// Hides one item, as a hand edit (or a commit not yet visible on
    /// every shard) would leave a batch, until [`restore_items`]: for tests
    /// of the gap rules.
    ///
    /// [`restore_items`]: Self::restore_items
    pub fn hide_item(&self, batch_id: &BatchId, item_sequence: ItemSequence) {
        let mut state = self.lock();
        let Ok(batch) = state.batch_mut(batch_id) else {
            return;
        };
        let Some(index) = batch
            .items
            .iter()
            .position(|i| i.item.item_sequence == item_sequence)
        else {
            return;
        };
        let item = batch.items.remove(index);
        state.hidden.push((batch_id.clone(), item));
    }

    /// Puts back what [`hide_item`](Self::hide_item) hid.
    pub fn restore_items(&self) {
        let mut state = self.lock();
        for (batch_id, item) in std::mem::take(&mut state.hidden) {
            if let Ok(batch) = state.batch_mut(&batch_id) {
                let at = batch
                    .items
                    .partition_point(|i| i.item.item_sequence < item.item.item_sequence);
                batch.items.insert(at, item);
            }
        }
    }

    /// Takes a sequence number without storing a batch under it, as a
    /// batch not yet visible leaves the stream, until [`insert_at`]: for
    /// tests of the gap rules.
    ///
    /// [`insert_at`]: Self::insert_at
    pub fn skip_sequence(&self) -> Sequence {
        let mut state = self.lock();
        let stream = state.stream(&StreamName::default_stream());
        stream.last_sequence += 1;
        stream.counter_version += 1;
        Sequence(stream.last_sequence)
    }

    /// Stores `batch` under a sequence [`skip_sequence`](Self::skip_sequence)
    /// took: the batch that was not visible becomes visible.
    ///
    /// # Errors
    /// When the sequence is in use.
    pub fn insert_at(
        &self,
        sequence: Sequence,
        batch: &NewBatch,
    ) -> Result<BatchSummary, StoreError> {
        if self
            .lock()
            .stream(&batch.stream)
            .batches
            .contains_key(&sequence)
        {
            return Err(StoreError::Other(format!("sequence {sequence} is in use")));
        }
        self.commit_at(batch, Some(sequence))
    }

    /// The dead-lettered items with their errors.
    pub fn dead_letters(&self) -> Vec<(OutboxItem, String)> {
        self.lock()
            .dead_letters
            .iter()
            .map(|(item, error, _)| (item.clone(), error.clone()))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a test bug; keep going with the data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_available(&self) -> Result<(), StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "memory store switched off".to_owned(),
            ))
        } else {
            Ok(())
        }
    }

    /// Locks the state for a fenced write: fails unless `fence` holds the lease.
    fn fenced(&self, fence: &Fence) -> Result<MutexGuard<'_, State>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let lease = state
            .streams
            .get(&fence.stream)
            .and_then(|s| s.lease.as_ref());
        match lease {
            Some(lease) if lease.epoch == fence.epoch && lease.holder == fence.holder => Ok(state),
            _ => Err(StoreError::Fenced { epoch: fence.epoch }),
        }
    }

    /// One statement's cost under the model.
    async fn statement(&self, items: usize) {
        let cost =
            self.model.statement + self.model.per_item * u32::try_from(items).unwrap_or(u32::MAX);
        if cost.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(cost).await;
        }
    }

    /// Transaction `txn`'s write to the stream's counter, by MongoDB's rules.
    fn write_counter(
        &self,
        stream: &StreamName,
        txn: u64,
        snapshot: u64,
    ) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let state = guard.stream(stream);
        if state.counter_holder.is_some_and(|holder| holder != txn) {
            return Err(StoreError::Conflict(
                "counter written by an open transaction".to_owned(),
            ));
        }
        if state.counter_version != snapshot {
            return Err(StoreError::Conflict(
                "counter committed after the snapshot".to_owned(),
            ));
        }
        state.counter_holder = Some(txn);
        Ok(())
    }

    async fn try_insert(&self, batch: &NewBatch, staged: bool) -> Result<BatchSummary, StoreError> {
        self.check_available()?;
        let txn = self.transactions.fetch_add(1, Ordering::SeqCst);
        let _release = CounterRelease {
            store: self,
            stream: &batch.stream,
            txn,
        };
        let snapshot = self.lock().stream(&batch.stream).counter_version;
        let mut items_written = 0;
        let result = async {
            if self.model.counter == CounterStep::First {
                self.write_counter(&batch.stream, txn, snapshot)?;
                self.statement(0).await;
            }
            self.statement(0).await; // the batch document
            if staged {
                self.statement(0).await; // the staging record's claim
            } else {
                self.statement(batch.items.len()).await;
                items_written = batch.items.len();
            }
            if self.model.counter == CounterStep::AfterItems {
                self.write_counter(&batch.stream, txn, snapshot)?;
                self.statement(0).await;
            }
            self.commit(batch)
        }
        .await;
        if matches!(result, Err(StoreError::Conflict(_))) {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
            self.wasted_items
                .fetch_add(items_written as u64, Ordering::SeqCst);
        }
        result
    }

    fn commit(&self, batch: &NewBatch) -> Result<BatchSummary, StoreError> {
        self.commit_at(batch, None)
    }

    /// Commits `batch` under the next sequence, or under `at`.
    fn commit_at(
        &self,
        batch: &NewBatch,
        at: Option<Sequence>,
    ) -> Result<BatchSummary, StoreError> {
        let mut state = self.lock();
        if let Some(idem) = &batch.idempotency
            && state
                .idempotency
                .contains_key(&(batch.stream.clone(), idem.key.clone()))
        {
            return Err(StoreError::DuplicateIdempotencyKey);
        }
        let stream = state.stream(&batch.stream);
        let sequence = match at {
            Some(sequence) => sequence,
            None => {
                stream.counter_version += 1;
                Sequence(stream.last_sequence + 1)
            }
        };
        let summary = BatchSummary {
            batch_id: batch.batch_id.clone(),
            stream: batch.stream.clone(),
            batch_sequence: sequence,
            created_at: batch.created_at,
            total_items: batch.items.len() as u64,
            vendor_counts: batch.vendor_counts.clone(),
            processing_time_ms: elapsed_ms(batch.created_at),
            submitted_by: batch.submitted_by.clone(),
        };
        let items = batch
            .items
            .iter()
            .map(|i| StoredItem {
                item: OutboxItem {
                    item_id: i.item_id,
                    batch_id: batch.batch_id.clone(),
                    batch_sequence: sequence,
                    item_sequence: i.item_sequence,
                    request_id: i.request_id.clone(),
                    vendor_name: i.vendor_name.clone(),
                    request_data: i.request_data.clone(),
                    stored: i.stored.clone(),
                },
                status: ItemStatus::Pending,
                publish_id: None,
                sent_at: None,
                error: None,
            })
            .collect();
        stream.last_sequence = stream.last_sequence.max(sequence.0);
        stream.batches.insert(
            sequence,
            StoredBatch {
                summary: summary.clone(),
                status: BatchStatus::Pending,
                committed_at: None,
                last_error: None,
                submitted_by: batch.submitted_by.clone(),
                traceparent: batch.traceparent.clone(),
                items,
            },
        );
        if let Some(idem) = &batch.idempotency {
            state.idempotency.insert(
                (batch.stream.clone(), idem.key.clone()),
                (idem.request_hash.clone(), batch.batch_id.clone()),
            );
        }
        state
            .by_id
            .insert(batch.batch_id.clone(), (batch.stream.clone(), sequence));
        Ok(summary)
    }
}

/// Ends a transaction's hold on the counter however its attempt ends, a
/// dropped future included (MongoDB aborts an abandoned transaction too).
struct CounterRelease<'a> {
    store: &'a MemoryStore,
    stream: &'a StreamName,
    txn: u64,
}

impl Drop for CounterRelease<'_> {
    fn drop(&mut self) {
        let mut state = self.store.lock();
        let stream = state.stream(self.stream);
        if stream.counter_holder == Some(self.txn) {
            stream.counter_holder = None;
        }
    }
}

/// Milliseconds since `since`, for `processing_time_ms`.
pub fn elapsed_ms(since: DateTime<Utc>) -> u64 {
    u64::try_from((crate::world::now() - since).num_milliseconds()).unwrap_or(0)
}

impl State {
    /// The stream's state, made when first needed.
    fn stream(&mut self, name: &StreamName) -> &mut StreamState {
        self.streams.entry(name.clone()).or_default()
    }

    fn batch_mut(&mut self, batch_id: &BatchId) -> Result<&mut StoredBatch, StoreError> {
        let (stream, sequence) = self
            .by_id
            .get(batch_id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(batch_id.clone()))?;
        self.streams
            .get_mut(&stream)
            .and_then(|s| s.batches.get_mut(&sequence))
            .ok_or_else(|| StoreError::NotFound(batch_id.clone()))
    }

    fn batch(&self, batch_id: &BatchId) -> Option<&StoredBatch> {
        let (stream, sequence) = self.by_id.get(batch_id)?;
        self.streams.get(stream)?.batches.get(sequence)
    }
}

impl StoredBatch {
    /// The items at positions `after + 1 ..= after + limit` (within the
    /// batch), in order. As MongoDB's adapter: a position with no item
    /// ends the read with [`StoreError::Incomplete`].
    fn window(&self, after: ItemSequence, limit: u32) -> Result<Vec<&StoredItem>, StoreError> {
        let first = u64::from(after.0) + 1;
        let last = (u64::from(after.0) + u64::from(limit)).min(self.summary.total_items);
        let window: Vec<&StoredItem> = self
            .items
            .iter()
            .filter(|i| (first..=last).contains(&u64::from(i.item.item_sequence.0)))
            .collect();
        if let Some(missing) = crate::store::first_missing(
            first,
            last,
            window.iter().map(|i| u64::from(i.item.item_sequence.0)),
        ) {
            return Err(StoreError::Incomplete(format!(
                "batch {} has no item {missing}",
                self.summary.batch_id
            )));
        }
        Ok(window)
    }

    fn pending(&self) -> PendingBatch {
        PendingBatch {
            batch_id: self.summary.batch_id.clone(),
            stream: self.summary.stream.clone(),
            batch_sequence: self.summary.batch_sequence,
            status: self.status,
            total_items: self.summary.total_items,
            created_at: self.summary.created_at,
            last_error: self.last_error.clone(),
            traceparent: self.traceparent.clone(),
        }
    }

    fn progress(&self) -> BatchProgress {
        let mut counts = ItemCounts {
            total: self.items.len() as u64,
            ..ItemCounts::default()
        };
        for item in &self.items {
            match item.status {
                ItemStatus::Pending => counts.pending += 1,
                ItemStatus::Sent => counts.sent += 1,
                ItemStatus::Failed => counts.failed += 1,
            }
        }
        BatchProgress {
            batch_id: self.summary.batch_id.clone(),
            stream: self.summary.stream.clone(),
            batch_sequence: self.summary.batch_sequence,
            status: self.status,
            counts,
            created_at: self.summary.created_at,
            committed_at: self.committed_at,
            last_error: self.last_error.clone(),
            submitted_by: self.submitted_by.clone(),
            traceparent: self.traceparent.clone(),
        }
    }
}

#[async_trait]
impl BatchStore for MemoryStore {
    async fn insert_batch(
        &self,
        batch: &NewBatch,
        deadline: tokio::time::Instant,
    ) -> Result<BatchSummary, StoreError> {
        let staged = self
            .model
            .staged_above_items
            .is_some_and(|above| batch.items.len() > above);
        let deadline = if staged {
            // As the MongoDB adapter: the items first, outside the
            // transaction, a chunk of 1,000 at a time, each within the
            // request's budget; then the transaction with the budget afresh.
            let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.statement(0).await; // the staging record
            for chunk in batch.items.chunks(1000) {
                tokio::time::timeout(budget, self.statement(chunk.len()))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(
                            "a chunk of items took over the request's budget".to_owned(),
                        )
                    })?;
            }
            tokio::time::Instant::now() + budget
        } else {
            deadline
        };
        let mut retry = ConflictRetry::until(deadline);
        loop {
            let attempt = tokio::time::timeout_at(deadline, self.try_insert(batch, staged));
            match attempt.await {
                Err(_) => {
                    return Err(StoreError::Unavailable(
                        "the batch's transaction did not commit within the request deadline"
                            .to_owned(),
                    ));
                }
                Ok(Err(e)) if retry.again(&e).await => {}
                Ok(other) => return other,
            }
        }
    }

    async fn find_idempotent(
        &self,
        stream: &StreamName,
        key: &str,
    ) -> Result<Option<(String, Option<BatchSummary>)>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        Ok(state
            .idempotency
            .get(&(stream.clone(), key.to_owned()))
            .map(|(hash, id)| (hash.clone(), state.batch(id).map(|b| b.summary.clone()))))
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        self.check_available()?;
        Ok(self.lock().batch(batch_id).map(StoredBatch::progress))
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.check_available()
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    /// Wall-clock milliseconds at the store's first reading, advanced by
    /// tokio's clock: tests pause tokio's clock to expire leases.
    async fn now_ms(&self) -> Result<i64, StoreError> {
        self.check_available()?;
        Ok(self.clock_ms())
    }

    async fn acquire_or_renew(
        &self,
        stream: &StreamName,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let stream_state = state.stream(stream);
        let Some((next, _)) =
            crate::lease::step(stream, stream_state.lease.as_ref(), holder, now_ms, ttl_ms).write()
        else {
            return Ok(None);
        };
        stream_state.lease = Some(next.clone());
        Ok(Some(next))
    }

    async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        if let Some(lease) = state.stream(&fence.stream).lease.as_mut() {
            lease.expires_at_ms = 0;
        }
        Ok(())
    }

    async fn current(&self, stream: &StreamName) -> Result<Option<Lease>, StoreError> {
        self.check_available()?;
        Ok(self
            .lock()
            .streams
            .get(stream)
            .and_then(|s| s.lease.clone()))
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.check_available()?;
        Ok(self
            .lock()
            .streams
            .values()
            .filter_map(|s| s.lease.clone())
            .collect())
    }
}

#[async_trait]
impl MemberStore for MemoryStore {
    async fn heartbeat(&self, member: &Member) -> Result<(), StoreError> {
        self.check_available()?;
        self.lock()
            .members
            .insert(member.id.clone(), member.clone());
        Ok(())
    }

    async fn members(&self, now_ms: i64) -> Result<Vec<Member>, StoreError> {
        self.check_available()?;
        Ok(self
            .lock()
            .members
            .values()
            .filter(|m| m.expires_at_ms > now_ms)
            .cloned()
            .collect())
    }

    async fn recently_gone(&self, now_ms: i64) -> Result<Vec<Member>, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        state
            .members
            .retain(|_, m| m.expires_at_ms > now_ms - crate::store::GONE_SHOWN_MS);
        let mut gone: Vec<Member> = state
            .members
            .values()
            .filter(|m| m.expires_at_ms <= now_ms)
            .cloned()
            .collect();
        gone.sort_by_key(|m| std::cmp::Reverse(m.expires_at_ms));
        Ok(gone)
    }

    async fn leave(&self, id: &str) -> Result<(), StoreError> {
        self.check_available()?;
        let now_ms = self.now_ms().await?;
        if let Some(member) = self.lock().members.get_mut(id) {
            member.expires_at_ms = now_ms;
        }
        Ok(())
    }
}

#[async_trait]
impl StreamStore for MemoryStore {
    async fn streams(&self) -> Result<Vec<StreamDefinition>, StoreError> {
        self.check_available()?;
        Ok(self.lock().definitions.values().cloned().collect())
    }

    async fn stream(&self, name: &StreamName) -> Result<Option<StreamDefinition>, StoreError> {
        self.check_available()?;
        Ok(self.lock().definitions.get(name).cloned())
    }

    async fn put_stream(&self, definition: &StreamDefinition) -> Result<bool, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let now = crate::world::now();
        let created = !state.definitions.contains_key(&definition.name);
        let created_at = state
            .definitions
            .get(&definition.name)
            .and_then(|d| d.created_at)
            .unwrap_or(now);
        state.definitions.insert(
            definition.name.clone(),
            StreamDefinition {
                created_at: Some(created_at),
                updated_at: Some(now),
                ..definition.clone()
            },
        );
        state.stream(&definition.name);
        Ok(created)
    }
}

#[async_trait]
impl OutboxStore for MemoryStore {
    async fn head_batch(&self, stream: &StreamName) -> Result<Option<PendingBatch>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        Ok(state
            .streams
            .get(stream)
            .and_then(|s| {
                s.batches
                    .values()
                    .find(|b| b.status != BatchStatus::Committed)
            })
            .map(StoredBatch::pending))
    }

    async fn pending_batches(
        &self,
        stream: &StreamName,
        after: Option<Sequence>,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let start = after.map_or(Sequence(0), Sequence::next);
        Ok(state
            .streams
            .get(stream)
            .into_iter()
            .flat_map(|s| s.batches.range(start..))
            .map(|(_, b)| b)
            .filter(|b| b.status != BatchStatus::Committed)
            .take(limit as usize)
            .map(StoredBatch::pending)
            .collect())
    }

    async fn backlog(&self, stream: &StreamName) -> Result<Backlog, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let mut pending = state
            .streams
            .get(stream)
            .into_iter()
            .flat_map(|s| s.batches.values())
            .filter(|b| b.status != BatchStatus::Committed);
        let head = pending.next().map(StoredBatch::pending);
        Ok(Backlog {
            pending_batches: u64::from(head.is_some()) + pending.count() as u64,
            oldest_created_at: head.as_ref().map(|b| b.created_at),
            head,
        })
    }

    async fn unsent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let batch = state
            .batch(batch_id)
            .ok_or_else(|| StoreError::NotFound(batch_id.clone()))?;
        Ok(batch
            .window(after, limit)?
            .into_iter()
            .filter(|i| i.status == ItemStatus::Pending)
            .map(|i| i.item.clone())
            .collect())
    }

    async fn items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<ItemView>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let batch = state
            .batch(batch_id)
            .ok_or_else(|| StoreError::NotFound(batch_id.clone()))?;
        Ok(batch
            .items
            .iter()
            .filter(|i| i.item.item_sequence > after)
            .take(limit as usize)
            .map(|i| ItemView {
                item_id: i.item.item_id,
                item_sequence: i.item.item_sequence,
                request_id: i.item.request_id.clone(),
                vendor_name: i.item.vendor_name.clone(),
                status: i.status,
                publish_id: i.publish_id.clone(),
                sent_at: i.sent_at,
                error: i.error.clone(),
            })
            .collect())
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        BatchStore::batch_progress(self, batch_id).await
    }

    async fn start_batch(&self, fence: &Fence, batch_id: &BatchId) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        let batch = state.batch_mut(batch_id)?;
        if batch.status == BatchStatus::Pending {
            batch.status = BatchStatus::Processing;
        }
        Ok(())
    }

    async fn mark_sent(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        if let Some(lease) = state.stream(&fence.stream).lease.as_mut() {
            lease.published += marks.len() as u64;
        }
        let batch = state.batch_mut(batch_id)?;
        let now = crate::world::now();
        for mark in marks {
            let index = mark.item_sequence.0 as usize - 1;
            let item = batch
                .items
                .get_mut(index)
                .filter(|i| i.item.item_id == mark.item_id)
                .ok_or_else(|| {
                    StoreError::Other(format!(
                        "batch {batch_id} has no item {} with id {}",
                        mark.item_sequence, mark.item_id
                    ))
                })?;
            // As MongoDB's marks: an item already sent keeps its first mark.
            if item.status == ItemStatus::Pending {
                item.status = ItemStatus::Sent;
                item.publish_id = Some(mark.publish_id.clone());
                item.sent_at = Some(now);
            }
        }
        // The first marks start the batch.
        if !marks.is_empty() && batch.status == BatchStatus::Pending {
            batch.status = BatchStatus::Processing;
        }
        Ok(())
    }

    async fn commit_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
    ) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        let batch = state.batch_mut(batch_id)?;
        if batch.items.iter().any(|i| i.status == ItemStatus::Pending) {
            return Err(StoreError::Other(format!(
                "batch {batch_id} still has pending items"
            )));
        }
        batch.status = BatchStatus::Committed;
        batch.committed_at = Some(crate::world::now());
        if let Some(lease) = state.stream(&fence.stream).lease.as_mut() {
            lease.committed = lease.committed.max(Some(sequence));
        }
        let lost = self
            .lost_answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&sequence);
        if lost {
            return Err(StoreError::OutcomeUnknown(format!(
                "the answer to the commit of batch {batch_id} was lost (it applied)"
            )));
        }
        Ok(())
    }

    async fn committed_through(&self, stream: &StreamName) -> Result<Option<Sequence>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let Some(stream) = state.streams.get(stream) else {
            return Ok(None);
        };
        Ok(stream.lease.as_ref().and_then(|l| l.committed).or_else(|| {
            stream
                .batches
                .values()
                .rev()
                .find(|b| b.status == BatchStatus::Committed)
                .map(|b| b.summary.batch_sequence)
        }))
    }

    async fn fail_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        item_sequence: ItemSequence,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        let batch = state.batch_mut(batch_id)?;
        batch.status = BatchStatus::Failed;
        batch.last_error = Some(format!("item {item_sequence}: {error}"));
        if let Some(item) = batch.items.get_mut(item_sequence.0 as usize - 1) {
            item.error = Some(error.to_owned());
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        fence: &Fence,
        item: &OutboxItem,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        let batch = state.batch_mut(&item.batch_id)?;
        if let Some(stored) = batch.items.get_mut(item.item_sequence.0 as usize - 1) {
            stored.status = ItemStatus::Failed;
            stored.error = Some(error.to_owned());
        }
        if let Some(stored) = &item.stored {
            // The dead letter refers to the object as long as it is kept.
            state
                .objects
                .entry(stored.reference.url.clone())
                .or_default()
                .0 += 1;
        }
        state
            .dead_letters
            .push((item.clone(), error.to_owned(), crate::world::now()));
        Ok(())
    }

    async fn retry_batch(&self, batch_id: &BatchId) -> Result<bool, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let batch = state.batch_mut(batch_id)?;
        if batch.status != BatchStatus::Failed {
            return Ok(false);
        }
        batch.status = BatchStatus::Processing;
        batch.last_error = None;
        Ok(true)
    }

    async fn remove_expired(
        &self,
        stream: &StreamName,
        committed_before: Option<DateTime<Utc>>,
        dead_letters_before: Option<DateTime<Utc>>,
        _abandoned_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Removed, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let mut removed = Removed::default();
        if let Some(cutoff) = committed_before {
            let expired: Vec<Sequence> = state
                .stream(stream)
                .batches
                .iter()
                .filter(|(_, b)| b.status == BatchStatus::Committed)
                .take_while(|(_, b)| b.committed_at.is_some_and(|at| at < cutoff))
                .map(|(sequence, _)| *sequence)
                .take(limit as usize)
                .collect();
            for sequence in expired {
                if let Some(batch) = state.stream(stream).batches.remove(&sequence) {
                    state.by_id.remove(&batch.summary.batch_id);
                    for stored in batch.items.iter().filter_map(|i| i.item.stored.as_ref()) {
                        *removed
                            .object_refs
                            .entry(stored.reference.url.clone())
                            .or_default() += 1;
                    }
                    removed.batches += 1;
                    removed.items += batch.items.len() as u64;
                }
            }
        }
        if let Some(cutoff) = dead_letters_before {
            let before = state.dead_letters.len();
            let of_stream: std::collections::HashSet<BatchId> = state
                .by_id
                .iter()
                .filter(|(_, (s, _))| s == stream)
                .map(|(id, _)| id.clone())
                .collect();
            let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut state.dead_letters)
                .into_iter()
                .partition(|(item, _, at)| *at >= cutoff || !of_stream.contains(&item.batch_id));
            state.dead_letters = kept;
            for stored in gone.iter().filter_map(|(item, _, _)| item.stored.as_ref()) {
                *removed
                    .object_refs
                    .entry(stored.reference.url.clone())
                    .or_default() += 1;
            }
            removed.dead_letters = (before - state.dead_letters.len()) as u64;
        }
        Ok(removed)
    }

    async fn paused(&self, stream: &StreamName) -> Result<bool, StoreError> {
        self.check_available()?;
        Ok(self.lock().streams.get(stream).is_some_and(|s| s.paused))
    }

    async fn set_paused(&self, stream: &StreamName, paused: bool) -> Result<(), StoreError> {
        self.check_available()?;
        self.lock().stream(stream).paused = paused;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ingest::{IngestRules, build_batch};

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(60)
    }

    fn batch(n: usize) -> NewBatch {
        build_batch(
            vec![json!({"k": 1}); n],
            &IngestRules::default(),
            None,
            Utc::now(),
        )
        .unwrap()
    }

    /// Many writers at once: every insert conflicts with the others' commits
    /// and is retried, and the sequences still come out gap-free, with each
    /// batch whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_conflicting_inserts_are_gap_free() {
        let store = MemoryStore::new();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    store.insert_batch(&batch(3), far()).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let sequences: Vec<u64> = store.batch_statuses().iter().map(|(s, _)| s.0).collect();
        assert_eq!(sequences, (1..=400).collect::<Vec<_>>());
        let items = store.all_items();
        assert_eq!(items.len(), 1200);
        for chunk in items.chunks(3) {
            let seqs: Vec<u32> = chunk.iter().map(|i| i.1.0).collect();
            assert_eq!(seqs, [1, 2, 3]);
            assert!(chunk.iter().all(|i| i.0 == chunk[0].0));
        }
        assert!(
            store.conflicts() > 0,
            "the model never produced a conflict, so it showed nothing"
        );
    }

    /// Two writers at once under MongoDB's rules: with the counter first,
    /// the loser conflicts at its first statement and loses nothing; with
    /// the counter after the items, the loser's snapshot predates the
    /// winner's commit, so it conflicts after writing its items and loses
    /// them (docs/BENCHMARKS.md, "Where the writer takes the sequence").
    #[tokio::test(start_paused = true)]
    async fn the_counter_taken_after_the_items_loses_the_items_on_a_conflict() {
        for (counter, lost) in [(CounterStep::First, 0), (CounterStep::AfterItems, 10)] {
            let store = MemoryStore::with_model(TransactionModel {
                counter,
                statement: std::time::Duration::from_millis(1),
                per_item: std::time::Duration::from_micros(100),
                staged_above_items: None,
            });
            let (a, b) = (batch(10), batch(10));
            let (first, second) =
                tokio::join!(store.insert_batch(&a, far()), store.insert_batch(&b, far()));
            let mut sequences = [
                first.unwrap().batch_sequence.0,
                second.unwrap().batch_sequence.0,
            ];
            sequences.sort_unstable();
            assert_eq!(sequences, [1, 2], "{counter:?}");
            assert!(store.conflicts() >= 1, "{counter:?}: the two overlapped");
            assert_eq!(
                store.wasted_item_writes(),
                lost * store.conflicts(),
                "{counter:?}"
            );
        }
    }

    /// A batch whose insert takes longer than the request deadline: in one
    /// transaction it can never be stored, and while it tries, small
    /// batches wait on the counter it holds; staged, it is stored, and the
    /// small batches barely notice (docs/BENCHMARKS.md, "Big batches").
    #[tokio::test(start_paused = true)]
    async fn a_staged_big_batch_is_stored_and_does_not_hold_up_small_ones() {
        use std::time::Duration;
        for (staged, big_stored, small_max) in [
            (None, false, Duration::ZERO),
            (Some(1000), true, Duration::from_millis(50)),
        ] {
            let store = MemoryStore::with_model(TransactionModel {
                counter: CounterStep::First,
                statement: Duration::from_millis(1),
                // 10,000 items: 2.5 s, over the 2 s deadline.
                per_item: Duration::from_micros(250),
                staged_above_items: staged,
            });
            let deadline = || tokio::time::Instant::now() + Duration::from_secs(2);
            let big = {
                let store = store.clone();
                tokio::spawn(async move { store.insert_batch(&batch(10_000), deadline()).await })
            };
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut slowest = Duration::ZERO;
            let mut stored = 0;
            for _ in 0..20 {
                let started = tokio::time::Instant::now();
                if store.insert_batch(&batch(10), deadline()).await.is_ok() {
                    stored += 1;
                }
                slowest = slowest.max(started.elapsed());
            }
            let big = big.await.unwrap();
            assert_eq!(big.is_ok(), big_stored, "{staged:?}: {big:?}");
            if staged.is_some() {
                assert_eq!(stored, 20);
                assert!(slowest <= small_max, "a small batch took {slowest:?}");
            } else {
                // The first small batch waits on the counter until the big
                // transaction gives up at the deadline, or fails with it.
                assert!(
                    stored < 20 || slowest >= Duration::from_millis(1500),
                    "one transaction holds the counter: {stored} stored, slowest {slowest:?}"
                );
            }
        }
    }

    /// An insert abandoned while it holds the counter (its future dropped)
    /// does not block the next one, as MongoDB aborts such a transaction.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_insert_releases_the_counter() {
        let store = MemoryStore::with_model(TransactionModel {
            counter: CounterStep::First,
            statement: std::time::Duration::from_millis(1),
            per_item: std::time::Duration::ZERO,
            staged_above_items: None,
        });
        let abandoned = tokio::time::timeout(
            std::time::Duration::from_micros(500),
            store.insert_batch(&batch(2), far()),
        )
        .await;
        assert!(abandoned.is_err(), "cut off while holding the counter");
        let stored = store.insert_batch(&batch(2), far()).await.unwrap();
        assert_eq!(stored.batch_sequence.0, 1);
        assert_eq!(store.conflicts(), 0);
    }

    #[tokio::test]
    async fn retention_removes_only_committed_batches_older_than_the_cutoff() {
        let store = MemoryStore::new();
        let fence = store
            .acquire_or_renew(&StreamName::default(), "r", 0, 3_600_000)
            .await
            .unwrap()
            .unwrap()
            .fence();
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(store.insert_batch(&batch(2), far()).await.unwrap().batch_id);
        }
        // The first two are committed, the third still pending.
        for (n, id) in ids[..2].iter().enumerate() {
            let items = store.unsent_items(id, ItemSequence(0), 2).await.unwrap();
            let marks: Vec<SentMark> = items
                .iter()
                .map(|i| SentMark {
                    item_id: i.item_id,
                    item_sequence: i.item_sequence,
                    publish_id: "m".into(),
                })
                .collect();
            store.mark_sent(&fence, id, &marks).await.unwrap();
            store
                .commit_batch(&fence, id, Sequence(n as u64 + 1))
                .await
                .unwrap();
        }
        let committed: Vec<_> = store
            .batch_statuses()
            .into_iter()
            .filter(|(_, s)| *s == BatchStatus::Committed)
            .collect();
        assert_eq!(committed.len(), 2, "the test needs two committed batches");

        let before = Utc::now() - chrono::Duration::hours(1);
        let none = store
            .remove_expired(&StreamName::default(), Some(before), None, before, 10)
            .await
            .unwrap();
        assert_eq!(none, Removed::default(), "nothing is that old");
        let now = Utc::now() + chrono::Duration::seconds(1);
        let one = store
            .remove_expired(&StreamName::default(), Some(now), None, now, 1)
            .await
            .unwrap();
        assert_eq!((one.batches, one.items), (1, 2), "the limit holds");
        let rest = store
            .remove_expired(&StreamName::default(), Some(now), Some(now), now, 10)
            .await
            .unwrap();
        assert_eq!((rest.batches, rest.items), (1, 2));
        let left = store.batch_statuses();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].1,
            BatchStatus::Pending,
            "a pending batch is never removed"
        );
        assert!(
            BatchStore::batch_progress(&store, &ids[0])
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_stale_epoch_cannot_write() {
        let store = MemoryStore::new();
        let summary = store.insert_batch(&batch(1), far()).await.unwrap();
        let first = store
            .acquire_or_renew(&StreamName::default(), "a", 0, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store
                .acquire_or_renew(&StreamName::default(), "b", 50, 100)
                .await
                .unwrap(),
            None
        );
        let second = store
            .acquire_or_renew(&StreamName::default(), "b", 101, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.epoch, first.epoch + 1);
        let err = store
            .start_batch(&first.fence(), &summary.batch_id)
            .await
            .unwrap_err();
        assert_eq!(err, StoreError::Fenced { epoch: first.epoch });
        store
            .start_batch(&second.fence(), &summary.batch_id)
            .await
            .unwrap();
    }
}
