//! One process's connection to the replica set: the store traits over
//! [`ReplicaSet`], as the MongoDB adapter (`outbox-mongo`) uses MongoDB.
//! Reads go to the read concern's copy; writes wait for their majority;
//! fenced writes run as transactions on the session recorded in the lease
//! ([`crate::sessions`]), and a failed one moves to a fresh session, as the
//! adapter's `fenced_applied` does. The lease itself is in
//! [`crate::lease_store`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchId, BatchProgress, BatchSummary, ItemSequence, NewBatch, Sequence};
use outbox_core::replay::{HeldRange, ReplayAction, ReplayId, ReplayJob, ReplayProgress};
use outbox_core::store::{
    Backlog, BatchStore, Fence, ItemView, ItemWindow, Lease, Member, MemberStore, OutboxItem,
    OutboxStore, PageWrite, PendingBatch, Removed, ReplayStore, SentMark, StoreError, StreamStore,
};
use outbox_core::stream::{StreamDefinition, StreamName};

use crate::process::Process;
use crate::replica_set::{Kind, ReplicaSet};
use crate::sessions::{SessionId, Txn};

/// A statement's round trip inside a fenced transaction (its first
/// statement, the lease's, before the commit).
const STATEMENT_RTT: Duration = Duration::from_millis(2);

/// A process's fenced session for one stream, and the epoch it was
/// recorded under in the lease.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) session: SessionId,
    pub(crate) recorded: Option<u64>,
}

/// What a process's connection keeps: its sessions, and the leases as it
/// last read them (with their recorded sessions).
#[derive(Default)]
pub(crate) struct Own {
    pub(crate) slots: Mutex<HashMap<StreamName, Slot>>,
    pub(crate) views: Mutex<HashMap<StreamName, (Lease, Option<SessionId>)>>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One process's connection to the replica set.
#[derive(Clone)]
pub struct SimStore {
    pub(crate) rs: Arc<ReplicaSet>,
    pub(crate) process: Arc<Process>,
    pub(crate) own: Arc<Own>,
}

/// A transaction a live process gave up on (its future dropped) is
/// aborted, as the driver and the adapter's `end_in_background` do; a dead
/// process's stays open, holding the lease: the orphan.
struct Open<'a> {
    store: &'a SimStore,
    stream: StreamName,
    txn: Option<Txn>,
}

impl Open<'_> {
    fn end(mut self) {
        if let Some(txn) = self.txn.take() {
            self.store.rs.end(&self.stream, txn);
        }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if let Some(txn) = self.txn.take()
            && !self.store.process.is_dead()
        {
            self.store.rs.end(&self.stream, txn);
        }
    }
}

impl SimStore {
    pub fn new(rs: Arc<ReplicaSet>, process: Arc<Process>) -> Self {
        Self {
            rs,
            process,
            own: Arc::default(),
        }
    }

    /// This process's fenced session for `stream` (a fresh one when it has
    /// none).
    pub(crate) fn slot(&self, stream: &StreamName) -> Slot {
        *lock(&self.own.slots)
            .entry(stream.clone())
            .or_insert_with(|| Slot {
                session: self.rs.new_session(),
                recorded: None,
            })
    }

    /// A fenced write failed for a reason other than the fence: the next
    /// one runs on a fresh session.
    fn drop_session(&self, stream: &StreamName) {
        lock(&self.own.slots).remove(stream);
    }

    /// A fenced write's statements before its commit: the session recorded
    /// under the fence's epoch if it is not yet, the transaction opened on
    /// the lease document, one round trip.
    async fn open_fenced(&self, fence: &Fence) -> Result<Open<'_>, StoreError> {
        let result = self.open_fenced_inner(fence).await;
        if let Err(e) = &result
            && !matches!(e, StoreError::Fenced { .. })
        {
            self.drop_session(&fence.stream);
        }
        result
    }

    async fn open_fenced_inner(&self, fence: &Fence) -> Result<Open<'_>, StoreError> {
        let slot = self.slot(&fence.stream);
        if slot.recorded != Some(fence.epoch) {
            self.lease_write(&fence.stream, "record_fenced_session", |rs| {
                let holds = rs
                    .primary
                    .lease_of(&fence.stream)
                    .is_some_and(|l| l.holder == fence.holder && l.epoch == fence.epoch);
                if holds {
                    rs.record(&fence.stream, slot.session);
                    Ok(())
                } else {
                    Err(StoreError::Fenced { epoch: fence.epoch })
                }
            })
            .await?;
            if let Some(current) = lock(&self.own.slots).get_mut(&fence.stream)
                && current.session == slot.session
            {
                current.recorded = Some(fence.epoch);
            }
        }
        self.process.io().await;
        let txn = self.rs.open(&self.process, &fence.stream, slot.session)?;
        let open = Open {
            store: self,
            stream: fence.stream.clone(),
            txn: Some(txn),
        };
        tokio::time::sleep(STATEMENT_RTT).await;
        self.process.io().await;
        Ok(open)
    }

    /// A write to the lease document outside a transaction: it waits behind
    /// an open transaction, for up to the lease's time limit.
    pub(crate) async fn lease_write<T>(
        &self,
        stream: &StreamName,
        what: &str,
        apply: impl Fn(&ReplicaSet) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + crate::lease_store::LEASE_TIME_LIMIT;
        loop {
            self.rs
                .wait_unheld(stream, deadline - tokio::time::Instant::now())
                .await?;
            let op = self.rs.begin(&self.process, Kind::Write, what).await?;
            if self.rs.is_held(stream) {
                continue;
            }
            let result = apply(&self.rs);
            return self.rs.finish(op, Kind::Write, what, result).await;
        }
    }
}

macro_rules! read {
    ($self:ident, $tr:ident :: $call:ident ( $($arg:expr),* )) => {{
        let _op = $self.rs.begin(&$self.process, Kind::Read, stringify!($call)).await?;
        <MemoryStore as $tr>::$call($self.rs.reader() $(, $arg)*).await
    }};
}

/// A fenced write: a transaction on the recorded session that holds the
/// stream's lease document from its first statement to its commit.
macro_rules! fenced {
    ($self:ident, $fence:expr, $tr:ident :: $call:ident ( $($arg:expr),* )) => {{
        let what = stringify!($call);
        let open = $self.open_fenced($fence).await?;
        let committed = async {
            let op = $self.rs.begin(&$self.process, Kind::Transaction, what).await?;
            let txn = open.txn.expect("open until it ends");
            if !$self.rs.is_open(&$fence.stream, txn) {
                return Err(StoreError::Unavailable(format!(
                    "{what}: NoSuchTransaction, the transaction was aborted (simulated)"
                )));
            }
            let result = <MemoryStore as $tr>::$call(&$self.rs.primary $(, $arg)*).await;
            Ok((op, result))
        }
        .await;
        open.end();
        let result = match committed {
            Ok((op, result)) => $self.rs.finish(op, Kind::Transaction, what, result).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result
            && !matches!(e, StoreError::Fenced { .. })
        {
            $self.drop_session(&$fence.stream);
        }
        result
    }};
}

macro_rules! write {
    ($self:ident, $kind:expr, $tr:ident :: $call:ident ( $($arg:expr),* )) => {{
        let op = $self.rs.begin(&$self.process, $kind, stringify!($call)).await?;
        let result = <MemoryStore as $tr>::$call(&$self.rs.primary $(, $arg)*).await;
        $self.rs.finish(op, $kind, stringify!($call), result).await
    }};
}

#[async_trait]
impl BatchStore for SimStore {
    async fn insert_batch(
        &self,
        batch: &NewBatch,
        deadline: tokio::time::Instant,
    ) -> Result<BatchSummary, StoreError> {
        write!(
            self,
            Kind::Transaction,
            BatchStore::insert_batch(batch, deadline)
        )
    }

    async fn find_idempotent(
        &self,
        stream: &StreamName,
        key: &str,
    ) -> Result<Option<(String, Option<BatchSummary>)>, StoreError> {
        read!(self, BatchStore::find_idempotent(stream, key))
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        read!(self, BatchStore::batch_progress(batch_id))
    }

    async fn ready(&self) -> Result<(), StoreError> {
        read!(self, BatchStore::ready())
    }
}

#[async_trait]
impl MemberStore for SimStore {
    async fn heartbeat(&self, member: &Member) -> Result<(), StoreError> {
        write!(self, Kind::Write, MemberStore::heartbeat(member))
    }

    async fn members(&self, now_ms: i64) -> Result<Vec<Member>, StoreError> {
        read!(self, MemberStore::members(now_ms))
    }

    async fn recently_gone(&self, now_ms: i64) -> Result<Vec<Member>, StoreError> {
        read!(self, MemberStore::recently_gone(now_ms))
    }

    async fn leave(&self, id: &str) -> Result<(), StoreError> {
        write!(self, Kind::Write, MemberStore::leave(id))
    }
}

#[async_trait]
impl StreamStore for SimStore {
    async fn streams(&self) -> Result<Vec<StreamDefinition>, StoreError> {
        read!(self, StreamStore::streams())
    }

    async fn stream(&self, name: &StreamName) -> Result<Option<StreamDefinition>, StoreError> {
        read!(self, StreamStore::stream(name))
    }

    async fn put_stream(&self, definition: &StreamDefinition) -> Result<bool, StoreError> {
        write!(self, Kind::Write, StreamStore::put_stream(definition))
    }
}

#[async_trait]
impl OutboxStore for SimStore {
    async fn head_batch(&self, stream: &StreamName) -> Result<Option<PendingBatch>, StoreError> {
        read!(self, OutboxStore::head_batch(stream))
    }

    async fn pending_batches(
        &self,
        stream: &StreamName,
        after: Option<Sequence>,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        read!(self, OutboxStore::pending_batches(stream, after, limit))
    }

    async fn backlog(&self, stream: &StreamName) -> Result<Backlog, StoreError> {
        read!(self, OutboxStore::backlog(stream))
    }

    async fn unsent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        read!(self, OutboxStore::unsent_items(batch_id, after, limit))
    }

    async fn unsent_items_in(
        &self,
        windows: &[ItemWindow],
    ) -> Result<Vec<Vec<OutboxItem>>, StoreError> {
        read!(self, OutboxStore::unsent_items_in(windows))
    }

    async fn items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<ItemView>, StoreError> {
        read!(self, OutboxStore::items(batch_id, after, limit))
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        read!(self, OutboxStore::batch_progress(batch_id))
    }

    async fn start_batch(&self, fence: &Fence, batch_id: &BatchId) -> Result<(), StoreError> {
        fenced!(self, fence, OutboxStore::start_batch(fence, batch_id))
    }

    async fn mark_sent(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        fenced!(self, fence, OutboxStore::mark_sent(fence, batch_id, marks))
    }

    async fn commit_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
    ) -> Result<(), StoreError> {
        fenced!(
            self,
            fence,
            OutboxStore::commit_batch(fence, batch_id, sequence)
        )
    }

    async fn finish_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        fenced!(
            self,
            fence,
            OutboxStore::finish_batch(fence, batch_id, sequence, marks)
        )
    }

    async fn record_pages(&self, fence: &Fence, pages: &[PageWrite]) -> Result<(), StoreError> {
        fenced!(self, fence, OutboxStore::record_pages(fence, pages))
    }

    async fn committed_through(&self, stream: &StreamName) -> Result<Option<Sequence>, StoreError> {
        read!(self, OutboxStore::committed_through(stream))
    }

    async fn fail_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        item_sequence: ItemSequence,
        error: &str,
    ) -> Result<(), StoreError> {
        fenced!(
            self,
            fence,
            OutboxStore::fail_batch(fence, batch_id, item_sequence, error)
        )
    }

    async fn dead_letter(
        &self,
        fence: &Fence,
        item: &OutboxItem,
        error: &str,
    ) -> Result<(), StoreError> {
        fenced!(self, fence, OutboxStore::dead_letter(fence, item, error))
    }

    async fn retry_batch(&self, batch_id: &BatchId) -> Result<bool, StoreError> {
        write!(self, Kind::Write, OutboxStore::retry_batch(batch_id))
    }

    async fn remove_expired(
        &self,
        stream: &StreamName,
        committed_before: Option<DateTime<Utc>>,
        dead_letters_before: Option<DateTime<Utc>>,
        abandoned_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Removed, StoreError> {
        write!(
            self,
            Kind::Write,
            OutboxStore::remove_expired(
                stream,
                committed_before,
                dead_letters_before,
                abandoned_before,
                limit
            )
        )
    }

    async fn paused(&self, stream: &StreamName) -> Result<bool, StoreError> {
        read!(self, OutboxStore::paused(stream))
    }

    async fn set_paused(&self, stream: &StreamName, paused: bool) -> Result<(), StoreError> {
        write!(self, Kind::Write, OutboxStore::set_paused(stream, paused))
    }
}

#[async_trait]
impl ReplayStore for SimStore {
    async fn held_range(&self, stream: &StreamName) -> Result<HeldRange, StoreError> {
        read!(self, ReplayStore::held_range(stream))
    }

    async fn range_totals(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
    ) -> Result<(u64, u64), StoreError> {
        read!(self, ReplayStore::range_totals(stream, from, to))
    }

    async fn create_replay(&self, job: &ReplayJob) -> Result<(), StoreError> {
        write!(self, Kind::Write, ReplayStore::create_replay(job))
    }

    async fn replay(&self, id: &ReplayId) -> Result<Option<ReplayJob>, StoreError> {
        read!(self, ReplayStore::replay(id))
    }

    async fn replays(
        &self,
        stream: Option<&StreamName>,
        limit: u32,
    ) -> Result<Vec<ReplayJob>, StoreError> {
        read!(self, ReplayStore::replays(stream, limit))
    }

    async fn running_replays(&self, stream: &StreamName) -> Result<Vec<ReplayJob>, StoreError> {
        read!(self, ReplayStore::running_replays(stream))
    }

    async fn act_on_replay(
        &self,
        id: &ReplayId,
        action: ReplayAction,
    ) -> Result<Option<ReplayJob>, StoreError> {
        write!(self, Kind::Write, ReplayStore::act_on_replay(id, action))
    }

    async fn record_replay(
        &self,
        fence: &Fence,
        progress: &ReplayProgress,
    ) -> Result<(), StoreError> {
        fenced!(self, fence, ReplayStore::record_replay(fence, progress))
    }

    async fn fail_replay(
        &self,
        fence: &Fence,
        id: &ReplayId,
        error: &str,
    ) -> Result<(), StoreError> {
        fenced!(self, fence, ReplayStore::fail_replay(fence, id, error))
    }

    async fn committed_batches(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        read!(
            self,
            ReplayStore::committed_batches(stream, from, to, limit)
        )
    }

    async fn sent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        read!(self, ReplayStore::sent_items(batch_id, after, limit))
    }
}
