//! A MongoDB replica set, as the store traits see it, modelled after
//! MongoDB's documented semantics (replication, read concern, write
//! concern, rollback, retryable commit errors):
//!
//! - **The primary** applies each operation atomically (the in-memory
//!   store, whose ingest transactions conflict as MongoDB's do).
//! - **The majority commit point** lags: secondaries copy the primary's
//!   data every [`Knobs::lag`]. A read at `majority` ([`READS`]) is served
//!   from that copy, a read at `local` from the primary.
//! - **Writes are `w: majority`:** a write is answered once the commit
//!   point covers it.
//! - **Step-down and election:** the primary's writes that no majority has
//!   are rolled back (the new primary starts from the commit point), and
//!   for the election's length every operation fails. A write waiting for
//!   its majority when it was rolled back is answered as its driver would:
//!   a transaction's commit with `UnknownTransactionCommitResult`
//!   ([`StoreError::OutcomeUnknown`]), any other write with a network error
//!   ([`StoreError::Unavailable`]).
//! - **Lost answers:** a write applied (or not) whose answer is lost on the
//!   way back, answered as above.
//! - **WriteConflict** on a transaction, before it applies
//!   ([`StoreError::Conflict`], which callers retry).
//! - **Visibility on a sharded cluster:** an item a majority read does not
//!   see yet although its batch is visible.
//!
//! Not modelled: concurrent transactions holding locks across statements
//! (the in-memory store runs each fenced write atomically), so the
//! transaction lifetime limit and `killSessions` are not exercised here;
//! the stand-in's fail-point tests cover those on the wire.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchId, BatchProgress, BatchSummary, ItemSequence, NewBatch, Sequence};
use outbox_core::replay::{HeldRange, ReplayAction, ReplayId, ReplayJob, ReplayProgress};
use outbox_core::store::{
    Backlog, BatchStore, Fence, ItemView, ItemWindow, Lease, LeaseStore, Member, MemberStore,
    OutboxItem, OutboxStore, PageWrite, PendingBatch, READS, ReadLevel, Removed, ReplayStore,
    SentMark, StoreError, StreamStore,
};
use outbox_core::stream::{StreamDefinition, StreamName};
use outbox_core::world;
use tokio::sync::{OwnedRwLockReadGuard, RwLock, watch};
use tokio::time::Instant;

use crate::process::Process;
use crate::trace::Trace;

/// What the fault schedule turns.
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// How often the secondaries catch up with the primary.
    pub lag: Duration,
    /// The chance that a write's answer is lost.
    pub lost_answers: f64,
    /// The chance that a transaction hits a WriteConflict.
    pub conflicts: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            lag: Duration::from_millis(5),
            lost_answers: 0.0,
            conflicts: 0.0,
        }
    }
}

/// Faults injected, by kind.
pub type FaultCounts = BTreeMap<&'static str, u64>;

struct State {
    term: u64,
    /// Writes applied on the primary, this term included.
    applied: u64,
    /// How many of them a majority has.
    majority: u64,
    /// Per ended term: the last write that survived its step-down.
    cuts: BTreeMap<u64, u64>,
    down_until: Option<Instant>,
    knobs: Knobs,
    /// Items a majority read does not see yet.
    invisible: BTreeSet<(BatchId, u32)>,
    faults: FaultCounts,
}

pub struct ReplicaSet {
    primary: MemoryStore,
    majority: MemoryStore,
    state: Mutex<State>,
    /// Held (shared) by every operation while it applies; a step-down takes
    /// it alone, so it falls between operations.
    gate: Arc<RwLock<()>>,
    changed: watch::Sender<u64>,
    trace: Trace,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    /// A transaction or findAndModify whose lost answer the adapter reports
    /// as an unknown outcome.
    Transaction,
    /// Any other write.
    Write,
}

struct Op {
    term: u64,
    lose_answer: bool,
    _applying: OwnedRwLockReadGuard<()>,
}

fn lost(kind: Kind, what: &str) -> StoreError {
    match kind {
        Kind::Transaction => StoreError::OutcomeUnknown(format!(
            "{what}: UnknownTransactionCommitResult (simulated)"
        )),
        _ => StoreError::Unavailable(format!("{what}: connection closed (simulated)")),
    }
}

impl ReplicaSet {
    pub fn new(trace: Trace) -> Arc<Self> {
        Arc::new(Self {
            primary: MemoryStore::new(),
            majority: MemoryStore::new(),
            state: Mutex::new(State {
                term: 1,
                applied: 0,
                majority: 0,
                cuts: BTreeMap::new(),
                down_until: None,
                knobs: Knobs::default(),
                invisible: BTreeSet::new(),
                faults: FaultCounts::new(),
            }),
            gate: Arc::new(RwLock::new(())),
            changed: watch::Sender::new(0),
            trace,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_knobs(&self, knobs: Knobs) {
        self.state().knobs = knobs;
    }

    pub fn knobs(&self) -> Knobs {
        self.state().knobs
    }

    pub fn faults(&self) -> FaultCounts {
        self.state().faults.clone()
    }

    fn count(state: &mut State, kind: &'static str) {
        *state.faults.entry(kind).or_default() += 1;
    }

    /// The data as the primary has it (what the checks read at the end).
    pub fn primary(&self) -> &MemoryStore {
        &self.primary
    }

    /// The secondaries catch up: the commit point moves to the primary's
    /// last write. The replication task calls it every [`Knobs::lag`].
    pub fn replicate(&self) {
        let mut state = self.state();
        if state.down_until.is_some_and(|until| Instant::now() < until) {
            return;
        }
        self.majority.copy_data_from(&self.primary);
        for (batch_id, item) in &state.invisible {
            self.majority.hide_item(batch_id, ItemSequence(*item));
        }
        state.majority = state.applied;
        drop(state);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The primary steps down between two operations: its writes that no
    /// majority has are rolled back, and no operation succeeds until an
    /// election is over.
    pub async fn step_down(&self, election: Duration) {
        let _alone = self.gate.write().await;
        let mut state = self.state();
        let rolled_back = state.applied - state.majority;
        let term = state.term;
        let cut = state.majority;
        state.cuts.insert(term, cut);
        state.term += 1;
        state.applied = state.majority;
        state.down_until = Some(Instant::now() + election);
        Self::count(&mut state, "step-down");
        if rolled_back > 0 {
            Self::count(&mut state, "rollback");
        }
        self.primary.copy_data_from(&self.majority);
        drop(state);
        self.trace.log(format!(
            "mongo: step-down of term {term}, {rolled_back} writes rolled back, election {} ms",
            election.as_millis()
        ));
        self.changed.send_modify(|v| *v += 1);
    }

    /// An item a majority read does not see until [`reveal`](Self::reveal).
    pub fn hide(&self, batch_id: &BatchId, item: u32) {
        let mut state = self.state();
        state.invisible.insert((batch_id.clone(), item));
        Self::count(&mut state, "invisible item");
        drop(state);
        self.majority.hide_item(batch_id, ItemSequence(item));
    }

    pub fn reveal(&self) {
        self.state().invisible.clear();
        self.majority.restore_items();
    }

    fn reader(&self) -> &MemoryStore {
        match READS {
            ReadLevel::Majority => &self.majority,
            ReadLevel::Local => &self.primary,
        }
    }

    async fn begin(&self, process: &Process, kind: Kind, what: &str) -> Result<Op, StoreError> {
        process.io().await;
        let applying = Arc::clone(&self.gate).read_owned().await;
        let mut state = self.state();
        if state.down_until.is_some_and(|until| Instant::now() < until) {
            return Err(StoreError::Unavailable(
                "no primary: an election is under way (simulated)".to_owned(),
            ));
        }
        let knobs = state.knobs;
        let mut lose_answer = false;
        if kind != Kind::Read {
            if kind == Kind::Transaction && world::random_fraction() < knobs.conflicts {
                Self::count(&mut state, "write conflict");
                return Err(StoreError::Conflict(format!(
                    "{what}: WriteConflict (simulated)"
                )));
            }
            if world::random_fraction() < knobs.lost_answers {
                Self::count(&mut state, "lost answer");
                if world::random_fraction() < 0.5 {
                    drop(state);
                    self.trace
                        .log(format!("mongo: {what} not applied, answer lost"));
                    return Err(lost(kind, what));
                }
                lose_answer = true;
            }
        }
        Ok(Op {
            term: state.term,
            lose_answer,
            _applying: applying,
        })
    }

    async fn finish<T>(
        &self,
        op: Op,
        kind: Kind,
        what: &str,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if kind == Kind::Read || result.is_err() {
            return result;
        }
        let version = {
            let mut state = self.state();
            state.applied += 1;
            state.applied
        };
        let Op {
            term,
            lose_answer,
            _applying,
        } = op;
        // Applied: a step-down may come now, while the write waits for its
        // majority.
        drop(_applying);
        if lose_answer {
            self.trace
                .log(format!("mongo: {what} applied, answer lost"));
            return Err(lost(kind, what));
        }
        let mut changes = self.changed.subscribe();
        loop {
            {
                let state = self.state();
                if state.term != term {
                    if version > state.cuts.get(&term).copied().unwrap_or(0) {
                        drop(state);
                        self.trace
                            .log(format!("mongo: {what} rolled back before its majority"));
                        return Err(lost(kind, what));
                    }
                    return result;
                }
                if state.majority >= version {
                    return result;
                }
            }
            if changes.changed().await.is_err() {
                return Err(lost(kind, what));
            }
        }
    }
}

/// One process's connection to the replica set.
#[derive(Clone)]
pub struct SimStore {
    rs: Arc<ReplicaSet>,
    process: Arc<Process>,
}

impl SimStore {
    pub fn new(rs: Arc<ReplicaSet>, process: Arc<Process>) -> Self {
        Self { rs, process }
    }
}

macro_rules! read {
    ($self:ident, $tr:ident :: $call:ident ( $($arg:expr),* )) => {{
        let _op = $self.rs.begin(&$self.process, Kind::Read, stringify!($call)).await?;
        <MemoryStore as $tr>::$call($self.rs.reader() $(, $arg)*).await
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
impl LeaseStore for SimStore {
    async fn now_ms(&self) -> Result<i64, StoreError> {
        let _op = self.rs.begin(&self.process, Kind::Read, "now").await?;
        self.rs.primary.now_ms().await
    }

    async fn acquire_or_renew(
        &self,
        stream: &StreamName,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        write!(
            self,
            Kind::Write,
            LeaseStore::acquire_or_renew(stream, holder, now_ms, ttl_ms)
        )
    }

    async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        write!(self, Kind::Write, LeaseStore::release(fence))
    }

    async fn current(&self, stream: &StreamName) -> Result<Option<Lease>, StoreError> {
        read!(self, LeaseStore::current(stream))
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        read!(self, LeaseStore::leases())
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
        write!(
            self,
            Kind::Transaction,
            OutboxStore::start_batch(fence, batch_id)
        )
    }

    async fn mark_sent(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        write!(
            self,
            Kind::Transaction,
            OutboxStore::mark_sent(fence, batch_id, marks)
        )
    }

    async fn commit_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
    ) -> Result<(), StoreError> {
        write!(
            self,
            Kind::Transaction,
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
        write!(
            self,
            Kind::Transaction,
            OutboxStore::finish_batch(fence, batch_id, sequence, marks)
        )
    }

    async fn record_pages(&self, fence: &Fence, pages: &[PageWrite]) -> Result<(), StoreError> {
        write!(
            self,
            Kind::Transaction,
            OutboxStore::record_pages(fence, pages)
        )
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
        write!(
            self,
            Kind::Transaction,
            OutboxStore::fail_batch(fence, batch_id, item_sequence, error)
        )
    }

    async fn dead_letter(
        &self,
        fence: &Fence,
        item: &OutboxItem,
        error: &str,
    ) -> Result<(), StoreError> {
        write!(
            self,
            Kind::Transaction,
            OutboxStore::dead_letter(fence, item, error)
        )
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
        write!(
            self,
            Kind::Transaction,
            ReplayStore::record_replay(fence, progress)
        )
    }

    async fn fail_replay(
        &self,
        fence: &Fence,
        id: &ReplayId,
        error: &str,
    ) -> Result<(), StoreError> {
        write!(
            self,
            Kind::Transaction,
            ReplayStore::fail_replay(fence, id, error)
        )
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
