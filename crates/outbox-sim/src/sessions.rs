//! Transactions that hold a lease document across statements, as MongoDB
//! runs them, and what ends them: commit, abort, `killSessions`, the
//! transaction lifetime limit and a step-down. From MongoDB's manual
//! (*Transactions: Production Considerations*, *In-progress Transactions
//! and Write Conflicts*; `transactionLifetimeLimitSeconds`; `killSessions`)
//! and SERVER-34650:
//!
//! - A transaction that writes a document takes its lock until it commits
//!   or aborts. Another transaction writing it fails at once with
//!   `WriteConflict`; a write outside a transaction waits until the
//!   transaction ends or its `maxTimeMS` expires.
//! - Reads never wait: they read a snapshot.
//! - A transaction still open [`LIFETIME_LIMIT`] after it started is
//!   aborted by a cleanup that runs every [`REAPER_PERIOD`] (the smaller of
//!   60 s and half the limit).
//! - `killSessions` aborts the session's open transaction at once; a
//!   step-down aborts every open transaction.
//! - The lease document records the session a leader's fenced transactions
//!   run on (`txn_session`). It replicates and rolls back with the lease.
//!
//! The model also checks the lease rules' promise about kills
//! ([`outbox_core::lease`]): a kill never hits the session of a leader
//! whose lease, as a majority has it, has been live without a break for
//! [`KILL_GRACE`]. A kill decided on a fresh majority read can meet a lease
//! whose renewal a moment ago has not reached the majority yet, or reached
//! it a moment ago; one decided on a view read long ago meets a leader that
//! has led undisturbed for seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_core::store::{Lease, StoreError};
use outbox_core::stream::StreamName;
use tokio::time::Instant;

use crate::process::Process;
use crate::replica_set::{Kind, ReplicaSet};

/// MongoDB's default `transactionLifetimeLimitSeconds`.
pub const LIFETIME_LIMIT: Duration = Duration::from_secs(60);
/// How often MongoDB's cleanup aborts transactions past the limit.
pub const REAPER_PERIOD: Duration = Duration::from_secs(30);
/// A leader live this long without a break is never a kill's target.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// A session, as the server names it.
pub type SessionId = u64;

/// An open transaction holding a stream's lease document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Txn {
    pub number: u64,
    pub session: SessionId,
    opened: Instant,
}

#[derive(Default)]
pub(crate) struct Sessions {
    next: u64,
    /// Per stream: the open transaction holding its lease document.
    holding: BTreeMap<StreamName, Txn>,
    /// The lease documents' `txn_session`, on the primary and as a
    /// majority has it.
    recorded: BTreeMap<StreamName, SessionId>,
    recorded_majority: BTreeMap<StreamName, SessionId>,
    /// Per stream: since when its lease, as a majority has it, has been
    /// live without a break.
    live_since: BTreeMap<StreamName, Instant>,
    /// Processes killed inside their next transaction, once it holds the
    /// lease document.
    doomed: Vec<String>,
    /// Processes whose lease reads exceed their time limit, and until when.
    slow_reads: BTreeMap<String, Instant>,
    pub(crate) violations: Vec<String>,
}

impl ReplicaSet {
    /// A session id, never used before.
    pub(crate) fn new_session(&self) -> SessionId {
        let mut sessions = self.sessions();
        sessions.next += 1;
        sessions.next
    }

    /// Opens a transaction on `session` that writes `stream`'s lease
    /// document (a fenced write's first statement). `WriteConflict` when
    /// another transaction holds it.
    pub(crate) fn open(
        &self,
        process: &Process,
        stream: &StreamName,
        session: SessionId,
    ) -> Result<Txn, StoreError> {
        let mut sessions = self.sessions();
        if let Some(other) = sessions.holding.get(stream)
            && other.session != session
        {
            return Err(StoreError::Conflict(format!(
                "WriteConflict: the lease of {stream} is held by the transaction of session {} (simulated)",
                other.session
            )));
        }
        sessions.next += 1;
        let txn = Txn {
            number: sessions.next,
            session,
            opened: Instant::now(),
        };
        sessions.holding.insert(stream.clone(), txn);
        let doomed = sessions.doomed.iter().position(|p| p == process.name());
        if let Some(index) = doomed {
            sessions.doomed.remove(index);
            drop(sessions);
            process.kill();
            self.trace.log(format!(
                "relay: {} killed inside its transaction on {stream} (session {session})",
                process.name()
            ));
        }
        Ok(txn)
    }

    /// Whether `txn` still holds `stream`'s lease document (not killed,
    /// reaped or aborted by a step-down).
    pub(crate) fn is_open(&self, stream: &StreamName, txn: Txn) -> bool {
        self.sessions().holding.get(stream) == Some(&txn)
    }

    /// Ends `txn` (committed or aborted), freeing the lease document.
    pub(crate) fn end(&self, stream: &StreamName, txn: Txn) {
        let mut sessions = self.sessions();
        if sessions.holding.get(stream) == Some(&txn) {
            sessions.holding.remove(stream);
            drop(sessions);
            self.released.send_modify(|v| *v += 1);
        }
    }

    /// Waits until no transaction holds `stream`'s lease document, as a
    /// write outside a transaction does, for up to `limit` (`maxTimeMS`).
    pub(crate) async fn wait_unheld(
        &self,
        stream: &StreamName,
        limit: Duration,
    ) -> Result<(), StoreError> {
        let deadline = Instant::now() + limit;
        let mut changes = self.released.subscribe();
        loop {
            if !self.sessions().holding.contains_key(stream) {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = changes.changed() => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(StoreError::Unavailable(format!(
                        "MaxTimeMSExpired: a transaction holds the lease of {stream} (simulated)"
                    )));
                }
            }
        }
    }

    pub(crate) fn is_held(&self, stream: &StreamName) -> bool {
        self.sessions().holding.contains_key(stream)
    }

    /// `killSessions` of `session`, decided on a lease of `stream`.
    pub(crate) async fn kill_session(
        &self,
        process: &Process,
        stream: &StreamName,
        session: SessionId,
    ) -> Result<(), StoreError> {
        let _op = self.begin(process, Kind::Read, "killSessions").await?;
        let lease = self.majority().lease_of(stream);
        let now_ms = self.clock_ms().await?;
        let mut sessions = self.sessions();
        if let Some(lease) = lease
            && sessions.recorded_majority.get(stream) == Some(&session)
            && lease.expires_at_ms > now_ms
            && let Some(since) = sessions.live_since.get(stream)
            && since.elapsed() >= KILL_GRACE
        {
            let violation = format!(
                "{} killed the session of {stream}'s live leader {} (epoch {}, live for {} ms without a break)",
                process.name(),
                lease.holder,
                lease.epoch,
                since.elapsed().as_millis()
            );
            let first = format!("{} killed the session of {stream}'s", process.name());
            if !sessions.violations.iter().any(|v| v.starts_with(&first)) {
                sessions.violations.push(violation);
            }
        }
        let aborted: Vec<StreamName> = sessions
            .holding
            .iter()
            .filter(|(_, txn)| txn.session == session)
            .map(|(stream, _)| stream.clone())
            .collect();
        for stream in &aborted {
            sessions.holding.remove(stream);
        }
        drop(sessions);
        let mut state = self.state();
        Self::count(&mut state, "session killed");
        if !aborted.is_empty() {
            Self::count(&mut state, "orphan aborted by a kill");
        }
        drop(state);
        self.trace.log(format!(
            "mongo: {} killed session {session}{}",
            process.name(),
            if aborted.is_empty() {
                String::new()
            } else {
                " and aborted its transaction".to_owned()
            }
        ));
        self.released.send_modify(|v| *v += 1);
        Ok(())
    }

    /// The cleanup MongoDB runs every [`REAPER_PERIOD`].
    pub(crate) fn reap(&self) {
        let mut sessions = self.sessions();
        let expired: Vec<(StreamName, Txn)> = sessions
            .holding
            .iter()
            .filter(|(_, txn)| txn.opened.elapsed() >= LIFETIME_LIMIT)
            .map(|(s, t)| (s.clone(), *t))
            .collect();
        for (stream, _) in &expired {
            sessions.holding.remove(stream);
        }
        drop(sessions);
        for (stream, txn) in expired {
            Self::count(&mut self.state(), "transaction reaped");
            self.trace.log(format!(
                "mongo: the transaction of session {} on {stream} reaped after {} s",
                txn.session,
                txn.opened.elapsed().as_secs()
            ));
            self.released.send_modify(|v| *v += 1);
        }
    }

    /// A step-down aborts every open transaction and rolls the recorded
    /// sessions back with the lease documents.
    pub(crate) fn abort_all(&self) {
        let mut sessions = self.sessions();
        sessions.holding.clear();
        sessions.recorded = sessions.recorded_majority.clone();
        drop(sessions);
        self.released.send_modify(|v| *v += 1);
    }

    /// The secondaries caught up: the recorded sessions too.
    pub(crate) fn replicate_sessions(&self) {
        let mut sessions = self.sessions();
        sessions.recorded_majority = sessions.recorded.clone();
    }

    /// The session recorded in `stream`'s lease, at the read level's view.
    pub(crate) fn recorded(&self, stream: &StreamName, majority: bool) -> Option<SessionId> {
        let sessions = self.sessions();
        if majority {
            sessions.recorded_majority.get(stream).copied()
        } else {
            sessions.recorded.get(stream).copied()
        }
    }

    /// Writes `txn_session` (with the write that takes the lease, or a
    /// fenced write's before its first transaction).
    pub(crate) fn record(&self, stream: &StreamName, session: SessionId) {
        self.sessions().recorded.insert(stream.clone(), session);
    }

    /// The commit point moved: the leases a majority had (`before`) gave
    /// way to the ones it has now. A lease that expired on the way, or
    /// changed holder, starts a new unbroken stretch of life.
    pub(crate) fn majority_leases_moved(&self, before: &[Lease], now_ms: i64) {
        let after = self.majority().all_leases();
        let mut sessions = self.sessions();
        for lease in &after {
            let earlier = before.iter().find(|b| b.stream == lease.stream);
            let unbroken = earlier.is_some_and(|b| {
                b.holder == lease.holder && b.epoch == lease.epoch && b.expires_at_ms > now_ms
            });
            if lease.expires_at_ms <= now_ms {
                sessions.live_since.remove(&lease.stream);
            } else if !unbroken || !sessions.live_since.contains_key(&lease.stream) {
                sessions
                    .live_since
                    .insert(lease.stream.clone(), Instant::now());
            }
        }
    }

    /// `process` is killed inside its next transaction, once it holds a
    /// lease document: the moment that leaves an orphan.
    pub fn doom(&self, process: &str) {
        self.sessions().doomed.push(process.to_owned());
    }

    /// Forgets a doom that never struck (the process ran no transaction).
    pub fn pardon(&self, process: &str) {
        self.sessions().doomed.retain(|p| p != process);
    }

    /// `process`'s lease reads exceed their time limit until `until`, as
    /// over a slow link.
    pub fn slow_lease_reads(&self, process: &str, until: Instant) {
        Self::count(&mut self.state(), "slow lease reads");
        self.sessions().slow_reads.insert(process.to_owned(), until);
    }

    pub(crate) fn reads_are_slow(&self, process: &str) -> bool {
        self.sessions()
            .slow_reads
            .get(process)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Violations the model saw (kills of live leaders).
    pub fn session_violations(&self) -> Vec<String> {
        self.sessions().violations.clone()
    }
}
