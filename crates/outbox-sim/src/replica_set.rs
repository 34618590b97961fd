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
//! - **Transactions across statements** ([`crate::sessions`]): a fenced
//!   write holds its stream's lease document from its first statement to
//!   its commit; the lifetime limit, `killSessions` and step-downs end it.
//!
//! A fenced write's effects apply at its commit, atomically (the in-memory
//! store's fence check and writes); its earlier statements take the lock
//! and the round trips, which is where a process dies or freezes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchId, ItemSequence};
use outbox_core::store::{READS, ReadLevel, StoreError};
use outbox_core::world;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{OwnedRwLockReadGuard, RwLock, watch};
use tokio::time::Instant;

use crate::process::Process;
use crate::sessions::Sessions;
use crate::trace::Trace;

/// How far apart two members' clocks are: the primary's clock steps by up
/// to this at each election. NTP keeps servers within milliseconds; a
/// second is generous, and below the TTL/5 margin a leader keeps
/// (invariant 5), which is what makes a step harmless.
pub const CLOCK_STEP_BOUND: Duration = Duration::from_millis(1_000);

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

pub(crate) struct State {
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
    /// How far this term's primary's clock is from the first's.
    clock_offset_ms: i64,
    /// Its own draws, so the rest of a seed does not depend on them.
    clocks: StdRng,
}

pub struct ReplicaSet {
    pub(crate) primary: MemoryStore,
    majority: MemoryStore,
    state: Mutex<State>,
    sessions: Mutex<Sessions>,
    /// Bumped whenever a transaction stops holding a lease document.
    pub(crate) released: watch::Sender<u64>,
    /// Held (shared) by every operation while it applies; a step-down takes
    /// it alone, so it falls between operations.
    gate: Arc<RwLock<()>>,
    changed: watch::Sender<u64>,
    pub(crate) trace: Trace,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    /// A transaction or findAndModify whose lost answer the adapter reports
    /// as an unknown outcome.
    Transaction,
    /// Any other write.
    Write,
}

pub(crate) struct Op {
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
    pub fn new(trace: Trace, seed: u64) -> Arc<Self> {
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
                clock_offset_ms: 0,
                clocks: StdRng::seed_from_u64(seed ^ 0xc10c_c10c_5eed_0001),
            }),
            sessions: Mutex::new(Sessions::default()),
            released: watch::Sender::new(0),
            gate: Arc::new(RwLock::new(())),
            changed: watch::Sender::new(0),
            trace,
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The primary's clock (`hello`'s `localTime`), Unix milliseconds: the
    /// one clock leases are judged by. It steps at each election.
    pub async fn clock_ms(&self) -> Result<i64, StoreError> {
        Ok(self.clock_now_ms())
    }

    pub(crate) fn clock_now_ms(&self) -> i64 {
        let offset = self.state().clock_offset_ms;
        self.primary.clock_ms() + offset
    }

    /// Whether an election is under way (no primary).
    pub fn is_down(&self) -> bool {
        self.state()
            .down_until
            .is_some_and(|until| Instant::now() < until)
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

    pub(crate) fn count(state: &mut State, kind: &'static str) {
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
        let offset = state.clock_offset_ms;
        let before = self.majority.all_leases();
        self.majority.copy_data_from(&self.primary);
        self.majority_leases_moved(&before, self.primary.clock_ms() + offset);
        for (batch_id, item) in &state.invisible {
            self.majority.hide_item(batch_id, ItemSequence(*item));
        }
        state.majority = state.applied;
        self.replicate_sessions();
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
        // The new primary's clock is another machine's.
        let bound = CLOCK_STEP_BOUND.as_millis() as i64;
        state.clock_offset_ms = state.clocks.random_range(-bound..=bound);
        let offset = state.clock_offset_ms;
        Self::count(&mut state, "step-down");
        if rolled_back > 0 {
            Self::count(&mut state, "rollback");
        }
        self.primary.copy_data_from(&self.majority);
        self.abort_all();
        drop(state);
        self.trace.log(format!(
            "mongo: step-down of term {term}, {rolled_back} writes rolled back, election {} ms, the new primary's clock {offset:+} ms",
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

    /// The lease documents as a majority has them (what kills are judged
    /// against).
    pub(crate) fn majority(&self) -> &MemoryStore {
        &self.majority
    }

    pub(crate) fn reader(&self) -> &MemoryStore {
        match READS {
            ReadLevel::Majority => &self.majority,
            ReadLevel::Local => &self.primary,
        }
    }

    pub(crate) async fn begin(
        &self,
        process: &Process,
        kind: Kind,
        what: &str,
    ) -> Result<Op, StoreError> {
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

    pub(crate) async fn finish<T>(
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
