//! The leader lease: one document, changed only by compare-and-swap on its
//! holder, epoch and expiry as read, so two replicas can never both believe
//! they took it, and a renewal between a standby's read and its write makes
//! the standby's write match nothing.
//!
//! Lease reads are majority reads and lease writes wait for a majority
//! (with `wtimeout`): a takeover acknowledged by a primary alone could roll
//! back and leave two leaders. Every lease operation carries `maxTimeMS`
//! ([`MongoConfig::lease_timeout`](crate::MongoConfig)), so it fails instead
//! of hanging on a lease document a transaction holds.
//!
//! A leader that dies inside a fenced transaction leaves that transaction
//! open, holding the lease document, until MongoDB reaps it
//! (`transactionLifetimeLimitSeconds`, 60 s by default). So the leader runs
//! its fenced transactions on one session whose id is recorded in the lease
//! document (`txn_session`), and a replica that takes over an expired lease
//! first kills that session (`killSessions`), which aborts the orphan at once.

use async_trait::async_trait;
use mongodb::bson::{Bson, Document, doc};
use outbox_core::lease::{self, LeaseStep};
use outbox_core::model::Sequence;
use outbox_core::store::{Fence, Lease, LeaseStore, StoreError};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::errors::{MAX_TIME_MS_EXPIRED, classify, code, is_duplicate_key};
use std::sync::Arc;

use outbox_core::stream::StreamName;

use crate::{MongoStore, ids};

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A number however it was stored (a hand edit may leave a double or a
/// string); anything unreadable is 0, which for an expiry means "expired".
fn lenient_i64(value: Option<&Bson>) -> i64 {
    match value {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Double(v)) if v.is_finite() => *v as i64,
        Some(Bson::String(s)) => s.trim().parse::<f64>().map_or(0, |v| v as i64),
        _ => 0,
    }
}

fn lease_from(stream: &StreamName, doc: &Document) -> Lease {
    Lease {
        stream: stream.clone(),
        holder: doc.get_str("holder").unwrap_or_default().to_owned(),
        epoch: u64::try_from(lenient_i64(doc.get("epoch"))).unwrap_or(0),
        expires_at_ms: lenient_i64(doc.get("expires_at_ms")),
        published: u64::try_from(lenient_i64(doc.get("published_items"))).unwrap_or(0),
        committed: doc
            .get("committed_sequence")
            .map(|v| Sequence(u64::try_from(lenient_i64(Some(v))).unwrap_or(0))),
    }
}

/// A filter matching the lease document exactly as it was read: the stored
/// values themselves, whatever their types, or their absence.
fn as_read(stream: &StreamName, doc: &Document) -> Document {
    let mut filter = doc! { "_id": ids::lease(stream) };
    for field in ["holder", "epoch", "expires_at_ms"] {
        match doc.get(field) {
            Some(value) => filter.insert(field, value.clone()),
            None => filter.insert(field, doc! { "$exists": false }),
        };
    }
    filter
}

impl MongoStore {
    fn lease_timeout_ms(&self) -> i64 {
        i64::try_from(self.config.lease_timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// One `update` of the lease document, waiting for a majority, with the
    /// lease time limit. Returns how many documents matched.
    async fn lease_update(&self, filter: Document, update: Document) -> Result<u64, StoreError> {
        let ms = self.lease_timeout_ms();
        let reply = self
            .db
            .run_command(doc! {
                "update": &self.config.lease_collection,
                "updates": [{ "q": filter, "u": update }],
                "maxTimeMS": ms,
                "writeConcern": { "w": "majority", "wtimeout": ms },
            })
            .await
            .map_err(classify)?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && let Some(Bson::Document(error)) = errors.first()
        {
            return Err(StoreError::Other(format!("lease write failed: {error}")));
        }
        if let Ok(error) = reply.get_document("writeConcernError") {
            // Applied on the primary, not confirmed by a majority: it may
            // roll back, so it does not count.
            return Err(StoreError::Unavailable(format!(
                "lease write not confirmed by a majority: {error}"
            )));
        }
        Ok(u64::try_from(lenient_i64(reply.get("n"))).unwrap_or(0))
    }

    /// The lease document as a majority has it. `Err(None)` when the read
    /// hit its time limit: a transaction holds the document.
    async fn read_lease(
        &self,
        stream: &StreamName,
    ) -> Result<Option<Document>, Option<StoreError>> {
        let result = self
            .lease()
            .find_one(doc! { "_id": ids::lease(stream) })
            .read_concern(crate::read_concern())
            .max_time(self.config.lease_timeout)
            .await;
        match result {
            Ok(document) => {
                let mut seen = self.last_lease.lock().unwrap_or_else(|e| e.into_inner());
                match &document {
                    Some(document) => seen.insert(stream.clone(), document.clone()),
                    None => seen.remove(stream),
                };
                Ok(document)
            }
            Err(e) if code(&e) == Some(MAX_TIME_MS_EXPIRED) => Err(None),
            Err(e) => Err(Some(classify(e))),
        }
    }

    /// Kills the fenced-transaction session recorded in an expired lease of
    /// another holder, so its open transaction (if any) stops holding the
    /// lease document. Failures are logged: the takeover's own write will
    /// tell whether the document is free.
    async fn kill_orphan(&self, stream: &StreamName, lease: &Document, holder: &str, now_ms: i64) {
        let current = lease_from(stream, lease);
        let step = lease::step(stream, Some(&current), holder, now_ms, 0);
        if !matches!(
            step,
            LeaseStep::Take {
                kill_predecessor: true,
                ..
            }
        ) {
            return;
        }
        let Ok(session) = lease.get_document("txn_session") else {
            return;
        };
        match self.kill_session(session).await {
            Ok(()) => info!(
                message = "killed the expired leader's transaction session",
                %stream,
                holder = %current.holder,
                epoch = current.epoch
            ),
            Err(error) => warn!(message = "cannot kill the expired leader's session", %error),
        }
    }

    /// Kills the predecessor's session twice more after a takeover, 1 s and
    /// 3 s later, in the background. A statement the dead leader sent before
    /// it died may reach the server after the first kill and open a
    /// transaction there: on MongoDB its lease update matches nothing and it
    /// holds nothing, but on a server that runs one transaction at a time
    /// (the development stand-in) it holds every write until the lifetime
    /// limit (a fresh clone's run saw a takeover wait 17.9 s behind one). The
    /// writer's `end_in_background` repeats its kills for the same reason.
    fn kill_late_statements(&self, session: Document) {
        let store = self.clone();
        tokio::spawn(async move {
            for pause in [Duration::from_secs(1), Duration::from_secs(2)] {
                tokio::time::sleep(pause).await;
                if let Err(error) = store.kill_session(&session).await {
                    debug!(message = "cannot kill the predecessor's session again", %error);
                }
            }
        });
    }

    /// The fenced session to record with a lease this replica is taking
    /// under `epoch`, held (so no fenced write can swap it) until the
    /// acquisition's write says whether it was recorded. A successor then
    /// knows which session to kill from the first moment we lead. `None`
    /// when a fenced write of an earlier epoch holds the session right now:
    /// the fenced write records it before its first transaction under the
    /// new epoch instead.
    async fn session_for(
        &self,
        stream: &StreamName,
    ) -> Result<Option<(crate::FencedGuard, Document)>, StoreError> {
        let Ok(mut slot) = Arc::clone(&self.fenced.of(stream).session).try_lock_owned() else {
            return Ok(None);
        };
        if slot.is_none() {
            let session = self.fenced.client.start_session().await.map_err(classify)?;
            *slot = Some((session, None));
        }
        let Some((session, _)) = slot.as_ref() else {
            return Ok(None);
        };
        let id = self.recordable(session.id()).await?;
        Ok(Some((slot, id)))
    }

    /// Notes that the held session was recorded under `epoch`.
    fn recorded(claim: &mut Option<(crate::FencedGuard, Document)>, epoch: u64) {
        if let Some((slot, _)) = claim.as_mut()
            && let Some((_, recorded)) = slot.as_mut()
        {
            *recorded = Some(epoch);
        }
    }

    /// Records the session fenced transactions run on in the lease document
    /// (filtered by `fence`), before its first transaction.
    pub(crate) async fn record_fenced_session(
        &self,
        fence: &Fence,
        session_id: &Document,
    ) -> Result<(), StoreError> {
        let matched = self
            .lease_update(
                doc! { "_id": ids::lease(&fence.stream), "holder": &fence.holder, "epoch": to_i64(fence.epoch) },
                doc! { "$set": { "txn_session": session_id.clone() } },
            )
            .await?;
        if matched == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced { epoch: fence.epoch })
        }
    }
}

#[async_trait]
impl LeaseStore for MongoStore {
    /// The primary's clock (`hello`'s `localTime`): every replica judges
    /// lease expiry by it. (MongoDB's `$$NOW` in an update pipeline would
    /// compare on the server itself, in the compare-and-swap; the
    /// development stand-in has no update pipelines, so the time is read
    /// first, at the cost of one round trip a lease round.)
    async fn now_ms(&self) -> Result<i64, StoreError> {
        let hello = self
            .db
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(classify)?;
        crate::documents::get_opt_datetime(&hello, "localTime")
            .map(|at| at.timestamp_millis())
            .ok_or_else(|| StoreError::Other(format!("hello has no localTime: {hello}")))
    }

    async fn acquire_or_renew(
        &self,
        stream: &StreamName,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        let document = match self.read_lease(stream).await {
            Ok(document) => document,
            Err(None) => {
                // MongoDB's reads do not wait for transactions: the lease
                // read failed for another reason, and a kill would be
                // decided on a stale view, so nothing is killed. A server
                // that makes reads wait for transactions (the development
                // stand-in) opts in: there, a read blocked past its time
                // limit means the lease's holder left a transaction open.
                if lease::kill_after_unanswered_read(self.config.kill_on_blocked_lease_read) {
                    let seen = self
                        .last_lease
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(stream)
                        .cloned();
                    if let Some(seen) = seen {
                        self.kill_orphan(stream, &seen, holder, now_ms).await;
                    }
                }
                return Err(StoreError::Unavailable(
                    "the lease read did not answer in time (a transaction may hold the document)"
                        .to_owned(),
                ));
            }
            Err(Some(error)) => return Err(error),
        };
        let current = document.as_ref().map(|d| lease_from(stream, d));
        let Some((next, kill_predecessor)) =
            lease::step(stream, current.as_ref(), holder, now_ms, ttl_ms).write()
        else {
            return Ok(None);
        };
        let Some(document) = document else {
            let lease = next;
            let mut claim = self.session_for(stream).await?;
            let session = claim
                .as_ref()
                .map_or(Bson::Null, |(_, id)| Bson::Document(id.clone()));
            let ms = self.lease_timeout_ms();
            let insert = self
                .db
                .run_command(doc! {
                    "insert": &self.config.lease_collection,
                    "documents": [{
                        "_id": ids::lease(stream), "holder": holder, "epoch": to_i64(lease.epoch),
                        "expires_at_ms": lease.expires_at_ms, "txn_session": session,
                    }],
                    "maxTimeMS": ms,
                    "writeConcern": { "w": "majority", "wtimeout": ms },
                })
                .await;
            return match insert {
                Ok(reply) if reply.get_array("writeErrors").is_ok_and(|e| !e.is_empty()) => {
                    // Another replica inserted it first (E11000).
                    Ok(None)
                }
                Ok(reply) if reply.get_document("writeConcernError").is_ok() => Err(
                    StoreError::Unavailable("lease insert not confirmed by a majority".to_owned()),
                ),
                Ok(_) => {
                    Self::recorded(&mut claim, lease.epoch);
                    Ok(Some(lease))
                }
                Err(e) if is_duplicate_key(&e) => Ok(None),
                Err(e) => Err(classify(e)),
            };
        };
        if kill_predecessor {
            self.kill_orphan(stream, &document, holder, now_ms).await;
        }
        let current = lease_from(stream, &document);
        // Only if nobody changed the lease since we read it. A renewal
        // leaves the recorded session alone (the fenced write records it
        // when it changes); a new holder records its own, or clears its
        // predecessor's, just killed.
        let mut set = doc! {
            "holder": &next.holder,
            "epoch": to_i64(next.epoch),
            "expires_at_ms": next.expires_at_ms,
        };
        let mut claim = None;
        if next.epoch != current.epoch {
            claim = self.session_for(stream).await?;
            let session = claim
                .as_ref()
                .map_or(Bson::Null, |(_, id)| Bson::Document(id.clone()));
            set.insert("txn_session", session);
        }
        let matched = self
            .lease_update(as_read(stream, &document), doc! { "$set": set })
            .await?;
        if matched == 1 {
            Self::recorded(&mut claim, next.epoch);
            if kill_predecessor && let Ok(session) = document.get_document("txn_session") {
                self.kill_late_statements(session.clone());
            }
        }
        Ok((matched == 1).then_some(next))
    }

    async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        self.lease_update(
            doc! { "_id": ids::lease(&fence.stream), "holder": &fence.holder, "epoch": to_i64(fence.epoch) },
            doc! { "$set": { "expires_at_ms": 0_i64 } },
        )
        .await?;
        Ok(())
    }

    async fn current(&self, stream: &StreamName) -> Result<Option<Lease>, StoreError> {
        match self.read_lease(stream).await {
            Ok(document) => Ok(document.as_ref().map(|d| lease_from(stream, d))),
            Err(None) => Err(StoreError::Unavailable(
                "the lease document is held by a transaction".to_owned(),
            )),
            Err(Some(error)) => Err(error),
        }
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        use futures::TryStreamExt;
        let read = async {
            self.lease()
                .find(doc! {})
                .read_concern(crate::read_concern())
                .max_time(self.config.lease_timeout)
                .await?
                .try_collect::<Vec<Document>>()
                .await
        };
        let documents = match read.await {
            Ok(documents) => documents,
            Err(e) if code(&e) == Some(MAX_TIME_MS_EXPIRED) => {
                // As in `acquire_or_renew`: only where reads wait for open
                // transactions, the sessions of the expired leases last read.
                if lease::kill_after_unanswered_read(self.config.kill_on_blocked_lease_read) {
                    let seen: Vec<(StreamName, Document)> = self
                        .last_lease
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .map(|(s, d)| (s.clone(), d.clone()))
                        .collect();
                    if let Ok(now_ms) = self.now_ms().await {
                        for (stream, lease) in seen {
                            self.kill_orphan(&stream, &lease, "", now_ms).await;
                        }
                    }
                }
                return Err(StoreError::Unavailable(
                    "the leases did not answer in time (a transaction may hold one)".to_owned(),
                ));
            }
            Err(e) => return Err(classify(e)),
        };
        let mut seen = self.last_lease.lock().unwrap_or_else(|e| e.into_inner());
        Ok(documents
            .iter()
            .filter_map(|d| {
                let stream = ids::stream_of_lease(d.get_str("_id").ok()?)?;
                seen.insert(stream.clone(), d.clone());
                Some(lease_from(&stream, d))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_edited_lease_still_reads() {
        let stream = StreamName::default();
        let lease = lease_from(
            &stream,
            &doc! {
                "holder": "a", "epoch": 3.0, "expires_at_ms": 1_700_000_000_000.5_f64,
            },
        );
        assert_eq!(lease.epoch, 3);
        assert_eq!(lease.expires_at_ms, 1_700_000_000_000);
        let broken = lease_from(&stream, &doc! { "holder": "a", "expires_at_ms": "soon" });
        assert_eq!((broken.epoch, broken.expires_at_ms), (0, 0));
    }

    #[test]
    fn the_compare_and_swap_matches_the_values_as_read() {
        let stream: StreamName = "orders".parse().unwrap();
        let read =
            doc! { "_id": "relay:orders", "holder": "a", "epoch": 2.0, "expires_at_ms": 5_i32 };
        assert_eq!(
            as_read(&stream, &read),
            doc! { "_id": "relay:orders", "holder": "a", "epoch": 2.0, "expires_at_ms": 5_i32 }
        );
        let partial = doc! { "_id": "relay", "holder": "a" };
        assert_eq!(
            as_read(&StreamName::default(), &partial),
            doc! {
                "_id": "relay", "holder": "a",
                "epoch": { "$exists": false }, "expires_at_ms": { "$exists": false },
            }
        );
    }
}
