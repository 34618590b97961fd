//! The lease over the replica set, as the MongoDB adapter
//! (`outbox-mongo/src/lease.rs`) takes it: a majority read with a time
//! limit, the decision by [`outbox_core::lease`], the predecessor's
//! session killed, then a compare-and-swap on the lease as read, which
//! waits behind an open transaction for up to the same limit. A read that
//! does not answer in time kills only if
//! [`lease::kill_after_unanswered_read`] says so for MongoDB, whose reads
//! never wait for a transaction.

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::lease::{self, LeaseStep};
use outbox_core::store::{Fence, Lease, LeaseStore, StoreError};
use outbox_core::stream::StreamName;

use crate::replica_set::Kind;
use crate::sessions::SessionId;
use crate::sim_store::{SimStore, lock};

/// `maxTimeMS` of every lease operation: `MongoConfig::lease_timeout`'s
/// default (the relay sets TTL/4, kept between 250 ms and 5 s; a shorter
/// limit here only makes a held lease answer sooner).
pub const LEASE_TIME_LIMIT: Duration = Duration::from_secs(1);

/// MongoDB's reads never wait for an open transaction.
const READS_WAIT_FOR_TRANSACTIONS: bool = false;

/// A lease read that did not answer within its time limit.
struct Unanswered;

impl SimStore {
    /// Runs a lease read at the read concern's level; a process over a slow
    /// link gets no answer within the limit.
    async fn lease_read<T>(
        &self,
        read: impl AsyncFnOnce(&Self) -> Result<T, StoreError>,
    ) -> Result<Result<T, StoreError>, Unanswered> {
        let op = match self.rs.begin(&self.process, Kind::Read, "lease read").await {
            Ok(op) => op,
            Err(e) => return Ok(Err(e)),
        };
        if self.rs.reads_are_slow(self.process.name()) {
            drop(op);
            tokio::time::sleep(LEASE_TIME_LIMIT).await;
            return Err(Unanswered);
        }
        let result = read(self).await;
        drop(op);
        Ok(result)
    }

    /// The stream's lease and recorded session, remembered as this
    /// process's view of it.
    async fn view(
        &self,
        stream: &StreamName,
    ) -> Result<Result<Option<(Lease, Option<SessionId>)>, StoreError>, Unanswered> {
        self.lease_read(async |store: &Self| {
            let lease = store.rs.reader().current(stream).await?;
            let majority = matches!(
                outbox_core::store::READS,
                outbox_core::store::ReadLevel::Majority
            );
            let view = lease.map(|l| (l, store.rs.recorded(stream, majority)));
            let mut views = lock(&store.own.views);
            match &view {
                Some(view) => views.insert(stream.clone(), view.clone()),
                None => views.remove(stream),
            };
            Ok(view)
        })
        .await
    }

    /// Kills the session recorded in `seen` if the lease rules say its
    /// holder's lease is another's and expired. Failures are the takeover's
    /// write's to find out, as in the adapter.
    async fn kill_orphan(
        &self,
        stream: &StreamName,
        seen: &(Lease, Option<SessionId>),
        holder: &str,
        now_ms: i64,
    ) {
        let (lease, session) = seen;
        let step = lease::step(stream, Some(lease), holder, now_ms, 0);
        if let (
            LeaseStep::Take {
                kill_predecessor: true,
                ..
            },
            Some(session),
        ) = (step, session)
        {
            let _ = self.rs.kill_session(&self.process, stream, *session).await;
        }
    }

    /// After an unanswered read: kills from the views last read, if the
    /// lease rules allow it on MongoDB.
    async fn after_unanswered(&self, streams: &[StreamName], holder: &str, now_ms: i64) {
        if !lease::kill_after_unanswered_read(READS_WAIT_FOR_TRANSACTIONS) {
            return;
        }
        for stream in streams {
            let seen = lock(&self.own.views).get(stream).cloned();
            if let Some(seen) = seen {
                self.kill_orphan(stream, &seen, holder, now_ms).await;
            }
        }
    }
}

#[async_trait]
impl LeaseStore for SimStore {
    async fn now_ms(&self) -> Result<i64, StoreError> {
        let _op = self.rs.begin(&self.process, Kind::Read, "now").await?;
        self.rs.clock_ms().await
    }

    async fn acquire_or_renew(
        &self,
        stream: &StreamName,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        let view = match self.view(stream).await {
            Ok(view) => view?,
            Err(Unanswered) => {
                self.after_unanswered(std::slice::from_ref(stream), holder, now_ms)
                    .await;
                return Err(StoreError::Unavailable(
                    "the lease read did not answer in time (simulated)".to_owned(),
                ));
            }
        };
        let current = view.as_ref().map(|(lease, _)| lease.clone());
        let Some((next, kill_predecessor)) =
            lease::step(stream, current.as_ref(), holder, now_ms, ttl_ms).write()
        else {
            return Ok(None);
        };
        if kill_predecessor && let Some(seen) = &view {
            self.kill_orphan(stream, seen, holder, now_ms).await;
        }
        // A new holder records its session with the write that takes the
        // lease; a renewal leaves it alone.
        let taking = current.as_ref().is_none_or(|c| c.epoch != next.epoch);
        let session = taking.then(|| self.slot(stream).session);
        let written = self
            .lease_write(stream, "acquire_or_renew", |rs| {
                let written = rs.primary.swap_lease(stream, current.as_ref(), &next)?;
                if written && let Some(session) = session {
                    rs.record(stream, session);
                }
                Ok(written)
            })
            .await?;
        if written
            && let Some(session) = session
            && let Some(slot) = lock(&self.own.slots).get_mut(stream)
            && slot.session == session
        {
            slot.recorded = Some(next.epoch);
        }
        Ok(written.then_some(next))
    }

    async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        self.lease_write(&fence.stream, "release", |rs| {
            let current = rs.primary.lease_of(&fence.stream);
            if let Some(lease) = &current
                && lease.holder == fence.holder
                && lease.epoch == fence.epoch
            {
                let released = Lease {
                    expires_at_ms: 0,
                    ..lease.clone()
                };
                rs.primary
                    .swap_lease(&fence.stream, current.as_ref(), &released)?;
            }
            Ok(())
        })
        .await
    }

    async fn current(&self, stream: &StreamName) -> Result<Option<Lease>, StoreError> {
        match self.view(stream).await {
            Ok(view) => Ok(view?.map(|(lease, _)| lease)),
            Err(Unanswered) => Err(StoreError::Unavailable(
                "the lease read did not answer in time (simulated)".to_owned(),
            )),
        }
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let read = self
            .lease_read(async |store: &Self| store.rs.reader().leases().await)
            .await;
        match read {
            Ok(leases) => {
                let leases = leases?;
                let mut views = lock(&self.own.views);
                for lease in &leases {
                    let majority = matches!(
                        outbox_core::store::READS,
                        outbox_core::store::ReadLevel::Majority
                    );
                    let session = self.rs.recorded(&lease.stream, majority);
                    views.insert(lease.stream.clone(), (lease.clone(), session));
                }
                Ok(leases)
            }
            Err(Unanswered) => {
                let streams: Vec<StreamName> = lock(&self.own.views).keys().cloned().collect();
                if let Ok(now_ms) = self.rs.clock_ms().await {
                    self.after_unanswered(&streams, "", now_ms).await;
                }
                Err(StoreError::Unavailable(
                    "the leases did not answer in time (simulated)".to_owned(),
                ))
            }
        }
    }
}
