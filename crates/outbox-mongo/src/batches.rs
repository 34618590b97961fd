//! Atomic batch ingest: the batch, its items, its idempotency key and the
//! next sequence number in one transaction.

use std::future::IntoFuture;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use mongodb::ClientSession;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{Acknowledgment, ReturnDocument, WriteConcern};
use outbox_core::memory::elapsed_ms;
use outbox_core::model::{BatchId, BatchProgress, BatchSummary, NewBatch, Sequence};
use outbox_core::store::{BatchStore, ConflictRetry, StoreError};
use tokio::time::Instant;
use tracing::{debug, instrument};

use crate::documents::{
    batch_document, batch_progress, batch_summary, bson_datetime, get_u64, item_document,
};
use crate::errors::{classify, is_duplicate_key};
use crate::transaction::{Attempt, deadline_passed, server_budget, transaction_options};
use outbox_core::stream::StreamName;

use crate::{MongoStore, ids};

/// MongoDB's limit on one document (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// Counts bytes written: a document's encoded size without keeping it.
#[derive(Default)]
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Refuses an item whose BSON is over MongoDB's document limit (BSON of a
/// numeric array can be several times its JSON text). Returns its size.
fn check_size(index: usize, document: &Document) -> Result<usize, StoreError> {
    let mut count = ByteCount::default();
    document
        .to_writer(&mut count)
        .map_err(|e| StoreError::Other(format!("item {index} cannot be encoded: {e}")))?;
    if count.0 > MAX_DOCUMENT_BYTES {
        return Err(StoreError::ItemTooLarge {
            index,
            bytes: count.0,
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    Ok(count.0)
}

/// Where a batch's items go.
enum Items<'a> {
    /// Inserted by the batch's own transaction.
    Inline(&'a mut [Document]),
    /// Stored already, outside it ([`MongoStore::stage_items`]): the
    /// transaction publishes them by inserting the batch document and
    /// removing the staging record.
    Staged,
}

/// At most this much of a staged batch's items per `insert` command: each
/// step must finish within the request's budget, however large the batch.
const STAGE_CHUNK_ITEMS: usize = 1000;
const STAGE_CHUNK_BYTES: usize = 8 * 1024 * 1024;

impl MongoStore {
    /// Stores a large batch's items before its transaction: first a staging
    /// record (so that a sweep finds what a writer that dies leaves behind),
    /// then the items, a chunk per command, each within `budget` and
    /// acknowledged by a majority. Nothing reads them until the batch
    /// document exists: the relay finds items through their batch.
    async fn stage_items(
        &self,
        batch: &NewBatch,
        items: &[Document],
        sizes: &[usize],
        budget: Duration,
    ) -> Result<(), StoreError> {
        let majority = WriteConcern::builder()
            .w(Acknowledgment::Majority)
            .w_timeout(budget)
            .build();
        let step = |what: &'static str| move |_| deadline_passed(what);
        tokio::time::timeout(
            budget,
            self.staged()
                .insert_one(doc! {
                    "_id": batch.batch_id.as_str(),
                    "stream": ids::field(&batch.stream),
                    "total_items": i64::try_from(items.len()).unwrap_or(i64::MAX),
                    "created_at": bson_datetime(Utc::now()),
                })
                .write_concern(majority.clone()),
        )
        .await
        .map_err(step("record the staged batch"))?
        .map_err(classify)?;
        let mut start = 0;
        while start < items.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < items.len() && end - start < STAGE_CHUNK_ITEMS && bytes < STAGE_CHUNK_BYTES
            {
                bytes += sizes[end];
                end += 1;
            }
            tokio::time::timeout(
                budget,
                self.items()
                    .insert_many(&items[start..end])
                    .ordered(true)
                    .write_concern(majority.clone()),
            )
            .await
            .map_err(step("store a chunk of the batch's items"))?
            .map_err(classify)?;
            start = end;
        }
        Ok(())
    }

    /// Gives up a staged batch that will not be published (its transaction
    /// failed, or the writer gave up): its staging record is marked
    /// abandoned (so its transaction, if still trying, cannot claim it),
    /// then its items are removed by primary key. The record stays: a chunk
    /// insert the writer gave up on may still land afterwards, and the
    /// relay's sweep ([`MongoStore::sweep_staged`], after
    /// `STAGED_ABANDONED_AFTER_SECONDS`) removes the items again, and then
    /// the record. In the background, briefly retried.
    fn unstage_in_background(&self, batch_id: &BatchId, total_items: usize) {
        let store = self.clone();
        let batch_id = batch_id.clone();
        tokio::spawn(async move {
            for attempt in 0..5_u32 {
                match store.abandon(&batch_id, total_items).await {
                    Ok(()) => return,
                    Err(error) => {
                        debug!(message = "cannot give up a staged batch yet", %batch_id, %error, attempt);
                        tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)).await;
                    }
                }
            }
        });
    }

    /// Marks the staging record abandoned and removes the items stored so
    /// far (unless the batch was published).
    async fn abandon(&self, batch_id: &BatchId, total_items: usize) -> Result<(), StoreError> {
        let marked = self
            .staged()
            .update_one(
                doc! { "_id": batch_id.as_str() },
                doc! { "$set": { "abandoned_at": bson_datetime(Utc::now()) } },
            )
            .await
            .map_err(classify)?;
        if marked.matched_count == 0 && self.published(batch_id).await? {
            return Ok(());
        }
        self.remove_staged_items(batch_id, total_items).await
    }

    /// Whether the batch document exists.
    async fn published(&self, batch_id: &BatchId) -> Result<bool, StoreError> {
        Ok(self
            .batches()
            .find_one(doc! { "batch_id": batch_id.as_str() })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(classify)?
            .is_some())
    }

    /// Removes a staged batch for good (the relay's sweep of abandoned
    /// ones): its record first, so that its transaction, if still trying,
    /// cannot claim half-removed items, then its items.
    pub(crate) async fn unstage(
        &self,
        batch_id: &BatchId,
        total_items: usize,
    ) -> Result<(), StoreError> {
        let removed = self
            .staged()
            .delete_one(doc! { "_id": batch_id.as_str() })
            .await
            .map_err(classify)?;
        if removed.deleted_count == 0 && self.published(batch_id).await? {
            // Claimed by its transaction (published).
            return Ok(());
        }
        self.remove_staged_items(batch_id, total_items).await
    }

    /// Removes a staged batch's items by primary key.
    async fn remove_staged_items(
        &self,
        batch_id: &BatchId,
        total_items: usize,
    ) -> Result<(), StoreError> {
        let total = u32::try_from(total_items).unwrap_or(u32::MAX);
        let mut first = 1;
        while first <= total {
            let last = first.saturating_add(999).min(total);
            let ids: Vec<String> = (first..=last)
                .map(|n| {
                    outbox_core::model::ItemId::of(batch_id, outbox_core::model::ItemSequence(n))
                        .to_string()
                })
                .collect();
            self.items()
                .delete_many(doc! { "_id": { "$in": ids }, "batch_id": batch_id.as_str() })
                .await
                .map_err(classify)?;
            first = last.saturating_add(1);
        }
        Ok(())
    }

    async fn insert_once(
        &self,
        session: &mut ClientSession,
        batch: &NewBatch,
        items: &mut Items<'_>,
        deadline: Instant,
    ) -> Result<BatchSummary, Attempt> {
        let options = transaction_options(server_budget(deadline));
        tokio::time::timeout_at(deadline, session.start_transaction().with_options(options))
            .await
            .map_err(|_| Attempt::Failed(deadline_passed("start a transaction")))?
            .map_err(|e| Attempt::Failed(classify(e)))?;
        let steps =
            tokio::time::timeout_at(deadline, self.insert_steps(session, batch, items, deadline));
        let summary = match steps.await {
            Ok(Ok(summary)) => summary,
            Ok(Err(e)) => {
                // Within the request's deadline: the answer must not wait
                // for an abort that a store that is down cannot take.
                let until = deadline.min(Instant::now() + Duration::from_secs(1));
                Self::abort_until(session, until).await;
                return Err(Attempt::Failed(e));
            }
            Err(_) => {
                // A step was cut off mid-flight: the server may still run it.
                return Err(Attempt::Abandoned);
            }
        };
        Self::commit_until(session, deadline).await?;
        Ok(summary)
    }

    async fn insert_steps(
        &self,
        session: &mut ClientSession,
        batch: &NewBatch,
        items: &mut Items<'_>,
        deadline: Instant,
    ) -> Result<BatchSummary, StoreError> {
        // Incrementing the counter inside the transaction is what makes the
        // sequence gap-free and equal to commit order: a competing writer
        // conflicts on this document and retries after we commit. It is the
        // first statement so that its `maxTimeMS` bounds any wait for the
        // counter (a store that serializes transactions makes the first
        // statement wait).
        let counter = self
            .counters()
            .find_one_and_update(
                doc! { "_id": ids::counter(&batch.stream) },
                doc! { "$inc": { "value": 1_i64 } },
            )
            .return_document(ReturnDocument::After)
            .max_time(server_budget(deadline))
            .session(&mut *session)
            .await
            .map_err(classify)?
            .ok_or_else(|| {
                StoreError::Unavailable(
                    "sequence counter missing: the schema is not ready yet".to_owned(),
                )
            })?;
        if let Some(idem) = &batch.idempotency {
            let now = Utc::now();
            // The TTL monitor runs once a minute: clear an expired key first.
            self.idempotency()
                .delete_one(doc! { "_id": ids::idempotency(&batch.stream, &idem.key), "expires_at": { "$lte": bson_datetime(now) } })
                .session(&mut *session)
                .await
                .map_err(classify)?;
            let ttl = chrono::Duration::from_std(self.config.idempotency_ttl)
                .unwrap_or(chrono::Duration::hours(24));
            let record = doc! {
                "_id": ids::idempotency(&batch.stream, &idem.key),
                "request_hash": &idem.request_hash,
                "batch_id": batch.batch_id.as_str(),
                "created_at": bson_datetime(now),
                "expires_at": bson_datetime(now + ttl),
            };
            match self
                .idempotency()
                .insert_one(record)
                .session(&mut *session)
                .await
            {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => return Err(StoreError::DuplicateIdempotencyKey),
                Err(e) => return Err(classify(e)),
            }
        }
        let sequence = Sequence(get_u64(&counter, "value")?);
        let processing_time_ms = elapsed_ms(batch.created_at);
        let document = batch_document(batch, sequence, processing_time_ms);
        self.batches()
            .insert_one(document)
            .session(&mut *session)
            .await
            .map_err(classify)?;
        match items {
            Items::Inline(items) => {
                let sequence_bson = Bson::Int64(i64::try_from(sequence.0).unwrap_or(i64::MAX));
                for item in items.iter_mut() {
                    item.insert("batch_sequence", sequence_bson.clone());
                }
                self.items()
                    .insert_many(&**items)
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
            }
            Items::Staged => {
                // Ours still: not swept as abandoned (the sweep removes the
                // record first, so one of the two wins).
                let claimed = self
                    .staged()
                    .delete_one(doc! {
                        "_id": batch.batch_id.as_str(),
                        "abandoned_at": { "$exists": false },
                    })
                    .session(&mut *session)
                    .await
                    .map_err(classify)?;
                if claimed.deleted_count != 1 {
                    return Err(StoreError::Other(format!(
                        "the staged items of batch {} were swept as abandoned",
                        batch.batch_id
                    )));
                }
            }
        }
        Ok(BatchSummary {
            batch_id: batch.batch_id.clone(),
            stream: batch.stream.clone(),
            batch_sequence: sequence,
            created_at: batch.created_at,
            total_items: batch.items.len() as u64,
            vendor_counts: batch.vendor_counts.clone(),
            processing_time_ms,
            submitted_by: batch.submitted_by.clone(),
        })
    }

    /// The batch's transaction: the next sequence, its idempotency key, the
    /// batch document, and its items (or, staged, the claim of its staged
    /// items), retried on conflicts until `deadline`.
    async fn commit_batch(
        &self,
        batch: &NewBatch,
        items: &mut Items<'_>,
        deadline: Instant,
    ) -> Result<BatchSummary, StoreError> {
        // Waiting here, not inside MongoDB, keeps pooled connections free for
        // the transactions that are running.
        // The stream's slot, then one of the process's.
        let slots = self.ingest_slots(&batch.stream);
        let _slot = tokio::time::timeout_at(deadline, slots.acquire())
            .await
            .map_err(|_| deadline_passed("take the batch (all ingest slots busy)"))?
            .map_err(|_| StoreError::Other("store is shutting down".to_owned()))?;
        let all = self.all_ingest_slots();
        let _process_slot = tokio::time::timeout_at(deadline, all.acquire())
            .await
            .map_err(|_| deadline_passed("take the batch (all ingest slots busy)"))?
            .map_err(|_| StoreError::Other("store is shutting down".to_owned()))?;
        let mut session = tokio::time::timeout_at(deadline, self.client.start_session())
            .await
            .map_err(|_| deadline_passed("answer"))?
            .map_err(classify)?;
        let mut retry = ConflictRetry::until(deadline);
        loop {
            match self.insert_once(&mut session, batch, items, deadline).await {
                Ok(summary) => return Ok(summary),
                Err(Attempt::Unknown(message)) => {
                    // Make sure it cannot commit later; say we don't know.
                    self.end_in_background(session);
                    return Err(StoreError::OutcomeUnknown(message));
                }
                Err(Attempt::Abandoned) => {
                    self.end_in_background(session);
                    return Err(deadline_passed("store the batch"));
                }
                Err(Attempt::Failed(e)) if retry.again(&e).await => {
                    debug!(
                        message = "retrying conflicting batch transaction",
                        attempt = retry.attempts()
                    );
                    metrics::counter!("outbox_writer_transaction_retries_total").increment(1);
                }
                Err(Attempt::Failed(StoreError::Conflict(message))) => {
                    // Conflicts until the deadline: the store is too busy (or a
                    // dead writer's transaction still holds the counter).
                    return Err(StoreError::Unavailable(format!(
                        "the batch kept conflicting until the request deadline: {message}"
                    )));
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    /// A batch as a majority of the replica set has it: a batch a cut-off
    /// primary committed alone may still roll back, and must not be shown
    /// (or replayed) as stored.
    async fn find_batch(&self, batch_id: &BatchId) -> Result<Option<Document>, StoreError> {
        self.batches()
            .find_one(doc! { "batch_id": batch_id.as_str() })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)
    }

    pub(crate) async fn progress_of(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        let Some(batch) = self.find_batch(batch_id).await? else {
            return Ok(None);
        };
        // The batch's own counters (kept by the relay's marks and dead
        // letters in the same transactions); counting items is the fallback
        // for batches stored before the counters existed.
        if let (Ok(sent), Ok(failed)) = (
            get_u64(&batch, "sent_items"),
            get_u64(&batch, "failed_items"),
        ) {
            return batch_progress(&batch, sent, failed).map(Some);
        }
        let items = self.items();
        let count = |status: &'static str| {
            items.count_documents(doc! { "batch_id": batch_id.as_str(), "status": status })
        };
        let (sent, failed) =
            futures::try_join!(count("sent").into_future(), count("failed").into_future())
                .map_err(classify)?;
        batch_progress(&batch, sent, failed).map(Some)
    }
}

#[async_trait]
impl BatchStore for MongoStore {
    #[instrument(skip_all, fields(batch_id = %batch.batch_id, items = batch.items.len()))]
    async fn insert_batch(
        &self,
        batch: &NewBatch,
        deadline: Instant,
    ) -> Result<BatchSummary, StoreError> {
        let mut documents = Vec::with_capacity(batch.items.len());
        let mut sizes = Vec::with_capacity(batch.items.len());
        for (index, item) in batch.items.iter().enumerate() {
            let document = item_document(batch, item);
            sizes.push(check_size(index, &document)?);
            documents.push(document);
        }
        let staged = self.config.stages(documents.len(), sizes.iter().sum());
        let deadline = if staged {
            // A large batch's items are stored before the transaction, a
            // chunk at a time, each chunk within the request's budget: the
            // deadline bounds waiting for the store, not the batch's size.
            // The transaction that makes the batch visible then gets the
            // budget afresh, and holds the sequence counter only for its
            // few statements.
            let budget = deadline.saturating_duration_since(Instant::now());
            if let Err(error) = self.stage_items(batch, &documents, &sizes, budget).await {
                self.unstage_in_background(&batch.batch_id, batch.items.len());
                return Err(error);
            }
            Instant::now() + budget
        } else {
            deadline
        };
        let mut items = if staged {
            Items::Staged
        } else {
            Items::Inline(&mut documents)
        };
        let result = self.commit_batch(batch, &mut items, deadline).await;
        if staged
            && result
                .as_ref()
                .is_err_and(|e| !matches!(e, StoreError::OutcomeUnknown(_)))
        {
            self.unstage_in_background(&batch.batch_id, batch.items.len());
        }
        result
    }

    async fn find_idempotent(
        &self,
        stream: &StreamName,
        key: &str,
    ) -> Result<Option<(String, Option<BatchSummary>)>, StoreError> {
        let record = self
            .idempotency()
            .find_one(doc! { "_id": ids::idempotency(stream, key), "expires_at": { "$gt": bson_datetime(Utc::now()) } })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let hash = record
            .get_str("request_hash")
            .unwrap_or_default()
            .to_owned();
        let batch_id: BatchId = record
            .get_str("batch_id")
            .unwrap_or_default()
            .parse()
            .map_err(|e| StoreError::Other(format!("idempotency record: {e}")))?;
        // The key and its batch were written in one transaction, so a key a
        // majority has without its batch means retention removed the batch.
        match self.find_batch(&batch_id).await? {
            Some(batch) => Ok(Some((hash, Some(batch_summary(&batch)?)))),
            None => Ok(Some((hash, None))),
        }
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        self.progress_of(batch_id).await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.check_transactions().await
    }
}
