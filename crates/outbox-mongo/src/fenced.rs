//! The relay's fenced progress writes.
//!
//! Every progress write runs in a transaction that first updates the lease
//! document on a filter holding the writer's epoch. When another replica has
//! taken the lease the filter matches nothing and the transaction is aborted
//! with [`StoreError::Fenced`]; when the takeover races the write, MongoDB's
//! write conflict on the lease document aborts one of the two.
//!
//! All fenced transactions of a process run on one session per stream,
//! recorded in the lease document before its first transaction (see
//! `lease.rs`), so that a successor can kill a transaction this process
//! leaves open by dying. Each mark and commit records the epoch it was
//! written under (`sent_epoch`, `committed_epoch`), so a fencing failure
//! would be visible in the data.

use mongodb::ClientSession;
use mongodb::bson::{Bson, Document, doc};
use outbox_core::model::{BatchId, BatchStatus, ItemSequence, ItemStatus, Sequence};
use outbox_core::replay::{ReplayId, ReplayProgress, ReplayState};
use outbox_core::store::{
    ConflictRetry, DEFAULT_TRANSACTION_RETRY_TIME, Fence, OutboxItem, PageWrite, SentMark,
    StoreError,
};

use crate::documents::{bson_datetime, get_u64};
use crate::errors::classify;
use crate::transaction::transaction_options;
use crate::{MongoStore, ids};

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The statement that marks one item sent: only a pending item matches,
/// so marking an item a second time (a page published again after a crash)
/// changes nothing and is not counted.
fn mark_statement(batch_id: &BatchId, mark: &SentMark, now: &Bson, epoch: i64) -> Document {
    doc! {
        "q": {
            "_id": mark.item_id.to_string(),
            "batch_id": batch_id.as_str(),
            "status": ItemStatus::Pending.as_str(),
        },
        "u": { "$set": {
            "status": ItemStatus::Sent.as_str(),
            "sent": true,
            "publish_id": &mark.publish_id,
            "sent_at": now.clone(),
            "sent_epoch": epoch,
        } },
    }
}

/// One fenced write: the steps it runs inside the transaction.
pub(crate) enum FencedWrite<'a> {
    Start(&'a BatchId),
    Marks(&'a BatchId, &'a [SentMark]),
    Commit(&'a BatchId, Sequence),
    /// The last page's marks and the commit in one transaction.
    Finish(&'a BatchId, Sequence, &'a [SentMark]),
    /// Several pages' marks and the commits they finish, in one transaction
    /// of four statements whatever their number (`write_pages`).
    Pages(&'a [PageWrite]),
    Fail(&'a BatchId, ItemSequence, &'a str),
    DeadLetter(&'a OutboxItem, &'a str),
    /// A replay job's position (`replays.rs`).
    Replay(&'a ReplayProgress),
    ReplayFailed(&'a ReplayId, &'a str),
}

impl FencedWrite<'_> {
    /// The marks it records: the items it says were published.
    fn marks(&self) -> usize {
        match self {
            Self::Marks(_, marks) | Self::Finish(_, _, marks) => marks.len(),
            Self::Pages(pages) => pages.iter().map(|p| p.marks.len()).sum(),
            _ => 0,
        }
    }

    /// The sequence this write commits, if it commits a batch.
    fn commits(&self) -> Option<Sequence> {
        match self {
            Self::Commit(_, sequence) | Self::Finish(_, sequence, _) => Some(*sequence),
            Self::Pages(pages) => pages
                .iter()
                .filter(|p| p.finishes)
                .map(|p| p.sequence)
                .max(),
            _ => None,
        }
    }
}

impl MongoStore {
    /// Runs `write` in a transaction fenced by the lease epoch, retrying
    /// conflicts, on the process's one fenced session.
    pub(crate) async fn fenced(
        &self,
        fence: &Fence,
        write: FencedWrite<'_>,
    ) -> Result<(), StoreError> {
        self.fenced_applied(fence, write).await.map(drop)
    }

    /// [`fenced`](Self::fenced); `Ok(false)` when the write found it cannot
    /// be applied as one (its transaction was aborted, nothing written).
    pub(crate) async fn fenced_applied(
        &self,
        fence: &Fence,
        write: FencedWrite<'_>,
    ) -> Result<bool, StoreError> {
        let mut slot = std::sync::Arc::clone(&self.fenced.of(&fence.stream).session)
            .lock_owned()
            .await;
        if slot.is_none() {
            let session = self.fenced.client.start_session().await.map_err(classify)?;
            *slot = Some((session, None));
        }
        let Some((session, recorded)) = slot.as_mut() else {
            return Err(StoreError::Other("no fenced session".to_owned()));
        };
        // Recorded before its first transaction under this epoch (a new
        // holder's acquisition clears the field), while we hold the session:
        // the id in the lease is the session in use.
        if *recorded != Some(fence.epoch) {
            let id = self.recordable(session.id()).await?;
            self.record_fenced_session(fence, &id).await?;
            *recorded = Some(fence.epoch);
        }
        let mut retry = ConflictRetry::new(DEFAULT_TRANSACTION_RETRY_TIME);
        let result = loop {
            match self.fenced_once(session, fence, &write).await {
                Err(e) if retry.again(&e).await => {}
                other => break other,
            }
        };
        if let Err(error) = &result
            && !matches!(error, StoreError::Fenced { .. })
        {
            // The session may have been killed by a successor, or may still
            // have a transaction open on the server that we gave up on: end
            // it, and start the next write on a fresh, recorded session.
            if let Some((session, _)) = slot.take() {
                let id = self
                    .recordable(session.id())
                    .await
                    .unwrap_or_else(|_| session.id().clone());
                let kill =
                    tokio::time::timeout(std::time::Duration::from_secs(1), self.kill_session(&id));
                if let Ok(Err(kill_error)) = kill.await {
                    tracing::debug!(message = "cannot kill the failed fenced session", error = %kill_error);
                }
            }
        }
        result
    }

    async fn fenced_once(
        &self,
        session: &mut ClientSession,
        fence: &Fence,
        write: &FencedWrite<'_>,
    ) -> Result<bool, StoreError> {
        session
            .start_transaction()
            .with_options(transaction_options(self.config.commit_timeout))
            .await
            .map_err(classify)?;
        let result = async {
            // The fence, and for a commit the record of the highest
            // committed sequence (what the next batch must follow), in one
            // statement.
            // With the count of items the stream published (whoever led).
            let mut claim = doc! { "$inc": {
                "fenced_writes": 1_i64,
                "published_items": i64::try_from(write.marks()).unwrap_or(i64::MAX),
            } };
            if let Some(sequence) = write.commits() {
                claim.insert("$max", doc! { "committed_sequence": to_i64(sequence.0) });
            }
            let claimed = self
                .lease()
                .update_one(
                    doc! { "_id": ids::lease(&fence.stream), "holder": &fence.holder, "epoch": to_i64(fence.epoch) },
                    claim,
                )
                .session(&mut *session)
                .await
                .map_err(classify)?;
            if claimed.matched_count != 1 {
                return Err(StoreError::Fenced { epoch: fence.epoch });
            }
            self.apply(session, fence, write).await
        }
        .await;
        match result {
            Ok(true) => self.commit(session).await.map(|()| true),
            Ok(false) => {
                Self::abort(session).await;
                Ok(false)
            }
            Err(e) => {
                Self::abort(session).await;
                Err(e)
            }
        }
    }

    /// The sent marks of one page: one `update` command with a statement
    /// per item, one round trip for the whole page (MongoDB 6 has no
    /// client bulkWrite).
    async fn write_marks(
        &self,
        session: &mut ClientSession,
        batch_id: &BatchId,
        marks: &[SentMark],
        now: &Bson,
        epoch: i64,
    ) -> Result<(), StoreError> {
        // Only pending items match: marking an item a second time (a page
        // republished after a crash) changes nothing, so `n` counts the
        // items this write moved to sent, added to the batch's `sent_items`.
        let updates: Vec<Document> = marks
            .iter()
            .map(|mark| mark_statement(batch_id, mark, now, epoch))
            .collect();
        let matched = self
            .update_items(session, updates, &format!("batch {batch_id}"))
            .await?;
        if matched > 0 {
            self.batches()
                .update_one(
                    doc! { "batch_id": batch_id.as_str() },
                    doc! {
                        "$inc": { "sent_items": matched },
                        // The first marks start the batch (no write of its own).
                        "$set": { "status": BatchStatus::Processing.as_str() },
                    },
                )
                .session(&mut *session)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Commits a batch after checking, inside the transaction, that no item
    /// is still pending. (Dead-lettered items were counted into the batch's
    /// `failed_items` when they were set aside.)
    async fn write_commit(
        &self,
        session: &mut ClientSession,
        batch_id: &BatchId,
        now: &Bson,
        epoch: i64,
    ) -> Result<(), StoreError> {
        // The batch counts its sent and failed items (every mark and dead
        // letter adds to them in its own transaction): one read decides.
        let batch = self
            .batches()
            .find_one(doc! { "batch_id": batch_id.as_str() })
            .projection(doc! { "total_items": 1, "sent_items": 1, "failed_items": 1 })
            .session(&mut *session)
            .await
            .map_err(classify)?
            .ok_or_else(|| StoreError::NotFound(batch_id.clone()))?;
        let done = match (
            get_u64(&batch, "sent_items"),
            get_u64(&batch, "total_items"),
        ) {
            (Ok(sent), Ok(total)) => sent + get_u64(&batch, "failed_items").unwrap_or(0) >= total,
            // A batch stored before the counters existed: look for a
            // pending item.
            _ => self
                .items()
                .find_one(
                    doc! { "batch_id": batch_id.as_str(), "status": ItemStatus::Pending.as_str() },
                )
                .projection(doc! { "item_sequence": 1 })
                .session(&mut *session)
                .await
                .map_err(classify)?
                .is_none(),
        };
        if !done {
            return Err(StoreError::Other(format!(
                "batch {batch_id} still has unsent items"
            )));
        }
        self.batches()
            .update_one(
                doc! { "batch_id": batch_id.as_str() },
                doc! { "$set": {
                    "status": BatchStatus::Committed.as_str(),
                    "committed_at": now.clone(),
                    "committed_epoch": epoch,
                } },
            )
            .session(&mut *session)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn apply(
        &self,
        session: &mut ClientSession,
        fence: &Fence,
        write: &FencedWrite<'_>,
    ) -> Result<bool, StoreError> {
        let now = bson_datetime(chrono::Utc::now());
        let epoch = to_i64(fence.epoch);
        match *write {
            FencedWrite::Start(batch_id) => {
                self.batches()
                    .update_one(
                        doc! { "batch_id": batch_id.as_str(), "status": BatchStatus::Pending.as_str() },
                        doc! { "$set": { "status": BatchStatus::Processing.as_str(), "started_at": now } },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
            }
            FencedWrite::Marks(batch_id, marks) => {
                self.write_marks(session, batch_id, marks, &now, epoch)
                    .await?;
            }
            FencedWrite::Commit(batch_id, _) => {
                self.write_commit(session, batch_id, &now, epoch).await?;
            }
            FencedWrite::Finish(batch_id, _, marks) => {
                self.write_marks(session, batch_id, marks, &now, epoch)
                    .await?;
                self.write_commit(session, batch_id, &now, epoch).await?;
            }
            FencedWrite::Pages(pages) => {
                return self.write_pages(session, pages, &now, epoch).await;
            }
            FencedWrite::Fail(batch_id, item_sequence, error) => {
                self.batches()
                    .update_one(
                        doc! { "batch_id": batch_id.as_str() },
                        doc! { "$set": {
                            "status": BatchStatus::Failed.as_str(),
                            "last_error": format!("item {item_sequence}: {error}"),
                            "failed_item_sequence": i64::from(item_sequence.0),
                            "failed_at": now,
                        } },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
                self.items()
                    .update_one(
                        doc! { "batch_id": batch_id.as_str(), "item_sequence": i64::from(item_sequence.0) },
                        doc! { "$set": { "error": error } },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
            }
            FencedWrite::DeadLetter(item, error) => {
                self.items()
                    .update_one(
                        doc! { "_id": item.item_id.to_string(), "batch_id": item.batch_id.as_str() },
                        doc! { "$set": { "status": ItemStatus::Failed.as_str(), "error": error, "failed_at": now.clone() } },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
                self.batches()
                    .update_one(
                        doc! { "batch_id": item.batch_id.as_str() },
                        doc! { "$inc": { "failed_items": 1_i64 } },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
                let request_data = match &item.stored {
                    Some(_) => Bson::Null,
                    None => crate::documents::stored_payload(&item.request_data),
                };
                let mut letter = doc! {
                        "item_id": item.item_id.to_string(),
                        "batch_id": item.batch_id.as_str(),
                        "batch_sequence": to_i64(item.batch_sequence.0),
                        "item_sequence": i64::from(item.item_sequence.0),
                        "request_id": item.request_id.as_deref().map_or(Bson::Null, Bson::from),
                        "vendor_name": &item.vendor_name,
                        "request_data": request_data,
                        "error": error,
                        "dead_lettered_at": now,
                };
                if let Some(stored) = &item.stored {
                    letter.insert(
                        "claim_check",
                        crate::documents::claim_check_document(stored),
                    );
                    // The dead letter refers to the object too, for as long
                    // as it is kept: one more reference, released when
                    // retention removes it. The item is retained, so the
                    // object is not being deleted.
                    self.objects()
                        .update_one(
                            doc! { "_id": &stored.reference.url },
                            doc! { "$inc": { "refs": 1_i64 } },
                        )
                        .session(&mut *session)
                        .await
                        .map_err(classify)?;
                }
                if !fence.stream.is_default() {
                    letter.insert("stream", fence.stream.as_str());
                }
                self.dead_letters()
                    .insert_one(letter)
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
            }
            FencedWrite::Replay(progress) => {
                self.write_replay(session, progress, now).await?;
            }
            FencedWrite::ReplayFailed(id, error) => {
                self.replays()
                    .update_one(
                        doc! { "_id": id.as_str(), "state": ReplayState::Running.as_str() },
                        doc! { "$set": { "state": ReplayState::Failed.as_str(), "error": error, "updated_at": now } },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
            }
        }
        Ok(true)
    }

    /// One `update` command on the items (one round trip): how many
    /// matched, which are the items it moved to sent.
    async fn update_items(
        &self,
        session: &mut ClientSession,
        updates: Vec<Document>,
        what: &str,
    ) -> Result<i64, StoreError> {
        let statements = updates.len() as i64;
        if statements == 0 {
            return Ok(0);
        }
        let reply = self
            .db
            .run_command(doc! {
                "update": &self.config.items_collection,
                "updates": updates,
                "ordered": true,
            })
            .session(&mut *session)
            .await
            .map_err(classify)?;
        let matched = reply
            .get("n")
            .and_then(Bson::as_i64)
            .or_else(|| reply.get("n").and_then(Bson::as_i32).map(i64::from));
        if reply.get_array("writeErrors").is_ok_and(|e| !e.is_empty()) {
            return Err(StoreError::Other(format!(
                "marking items of {what} sent: {reply}"
            )));
        }
        match matched {
            Some(n) if (0..=statements).contains(&n) => Ok(n),
            _ => Err(StoreError::Other(format!(
                "marking {statements} items of {what} sent: unexpected reply {reply}"
            ))),
        }
    }

    /// Several pages in one transaction, four statements in all: the fence
    /// (with the highest commit), every mark in one `update` command, every
    /// batch's count (and, for those the pages finish, its commit) in
    /// another. A batch is committed only if its counts say every item is
    /// sent or failed (checked by the statement's filter). `Ok(false)` when
    /// that check fails for a batch (one stored before the counters
    /// existed): the caller records the pages one by one instead.
    async fn write_pages(
        &self,
        session: &mut ClientSession,
        pages: &[PageWrite],
        now: &Bson,
        epoch: i64,
    ) -> Result<bool, StoreError> {
        let marks: Vec<Document> = pages
            .iter()
            .flat_map(|page| {
                page.marks
                    .iter()
                    .map(|mark| mark_statement(&page.batch_id, mark, now, epoch))
            })
            .collect();
        let expected = marks.len() as i64;
        let matched = self
            .update_items(session, marks, &format!("{} pages", pages.len()))
            .await?;
        // Each batch once, in page order: its new marks, whether finished.
        let mut batches: Vec<(&BatchId, i64, bool)> = Vec::new();
        for page in pages {
            match batches.last_mut() {
                Some((id, n, finishes)) if *id == &page.batch_id => {
                    *n += page.marks.len() as i64;
                    *finishes |= page.finishes;
                }
                _ => batches.push((&page.batch_id, page.marks.len() as i64, page.finishes)),
            }
        }
        // Every mark moved a pending item (the usual case): each batch
        // gained its marks. Otherwise some were sent already (pages
        // published again): count what each batch has sent.
        let exact = matched == expected;
        let mut updates = Vec::with_capacity(batches.len());
        for (batch_id, gained, finishes) in batches {
            if gained == 0 && !finishes {
                continue;
            }
            let status = if finishes {
                BatchStatus::Committed
            } else {
                BatchStatus::Processing
            };
            let mut set = doc! { "status": status.as_str() };
            let mut update = doc! {};
            let sent_after: Bson = if exact {
                update.insert("$inc", doc! { "sent_items": gained });
                // A batch without counters (stored before they existed)
                // never passes the check below: recorded one by one.
                Bson::Document(doc! { "$add": [ { "$ifNull": ["$sent_items", -1_i64] }, gained ] })
            } else {
                let sent = self
                    .items()
                    .count_documents(
                        doc! { "batch_id": batch_id.as_str(), "status": ItemStatus::Sent.as_str() },
                    )
                    .session(&mut *session)
                    .await
                    .map_err(classify)? as i64;
                set.insert("sent_items", sent);
                Bson::Int64(sent)
            };
            let mut filter = doc! { "batch_id": batch_id.as_str() };
            if finishes {
                set.insert("committed_at", now.clone());
                set.insert("committed_epoch", epoch);
                // Inside `$and`: the development stand-in ignores the other
                // fields of a filter that has `$expr` beside them.
                let complete = doc! { "$expr": { "$gte": [
                    { "$add": [sent_after, { "$ifNull": ["$failed_items", 0_i64] }] },
                    "$total_items",
                ] } };
                filter = doc! { "$and": [filter, complete] };
            }
            update.insert("$set", set);
            updates.push(doc! { "q": filter, "u": update });
        }
        if updates.is_empty() {
            return Ok(true);
        }
        let statements = updates.len() as i64;
        let reply = self
            .db
            .run_command(doc! {
                "update": &self.config.batches_collection,
                "updates": updates,
                "ordered": true,
            })
            .session(&mut *session)
            .await
            .map_err(classify)?;
        if reply.get_array("writeErrors").is_ok_and(|e| !e.is_empty()) {
            return Err(StoreError::Other(format!("recording pages: {reply}")));
        }
        let n = reply
            .get("n")
            .and_then(Bson::as_i64)
            .or_else(|| reply.get("n").and_then(Bson::as_i32).map(i64::from))
            .unwrap_or(-1);
        Ok(n == statements)
    }
}
