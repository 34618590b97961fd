//! Atomic batch ingest: the batch, its items, its idempotency key and the
//! next sequence number in one transaction.

use std::future::IntoFuture;

use async_trait::async_trait;
use chrono::Utc;
use mongodb::ClientSession;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{Acknowledgment, ReturnDocument, TransactionOptions, WriteConcern};
use outbox_core::memory::elapsed_ms;
use outbox_core::model::{BatchId, BatchProgress, BatchSummary, NewBatch, Sequence};
use outbox_core::store::{BatchStore, ConflictRetry, DEFAULT_TRANSACTION_RETRY_TIME, StoreError};
use tracing::{debug, instrument};

use crate::documents::{
    batch_document, batch_progress, batch_summary, bson_datetime, get_u64, item_document,
};
use crate::errors::{classify, is_duplicate_key, is_unknown_commit_result};
use crate::{MongoStore, SEQUENCE_COUNTER_ID};

/// How often a commit whose outcome is unknown is retried (it is idempotent).
const COMMIT_ATTEMPTS: u32 = 5;

pub(crate) fn transaction_options() -> TransactionOptions {
    TransactionOptions::builder()
        .write_concern(WriteConcern::builder().w(Acknowledgment::Majority).build())
        .build()
}

impl MongoStore {
    /// Commits, retrying while the outcome is unknown; a transient failure
    /// of the commit itself means the whole transaction should run again.
    pub(crate) async fn commit(session: &mut ClientSession) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match session.commit_transaction().await {
                Ok(()) => return Ok(()),
                Err(e) if is_unknown_commit_result(&e) && attempt < COMMIT_ATTEMPTS => {
                    debug!(message = "commit outcome unknown, retrying", error = %e, attempt);
                }
                Err(e) => return Err(classify(e)),
            }
        }
    }

    /// Aborts after a failed step. The step's error is what matters; an
    /// abort failure only means the server will time the transaction out.
    pub(crate) async fn abort(session: &mut ClientSession) {
        if let Err(e) = session.abort_transaction().await {
            debug!(message = "abort failed", error = %e);
        }
    }

    async fn insert_once(
        &self,
        session: &mut ClientSession,
        batch: &NewBatch,
        items: &mut [Document],
    ) -> Result<BatchSummary, StoreError> {
        session
            .start_transaction()
            .with_options(transaction_options())
            .await
            .map_err(classify)?;
        let result = self.insert_steps(session, batch, items).await;
        match result {
            Ok(summary) => {
                Self::commit(session).await?;
                Ok(summary)
            }
            Err(e) => {
                Self::abort(session).await;
                Err(e)
            }
        }
    }

    async fn insert_steps(
        &self,
        session: &mut ClientSession,
        batch: &NewBatch,
        items: &mut [Document],
    ) -> Result<BatchSummary, StoreError> {
        if let Some(idem) = &batch.idempotency {
            let now = Utc::now();
            // The TTL monitor runs once a minute: clear an expired key first.
            self.idempotency()
                .delete_one(doc! { "_id": &idem.key, "expires_at": { "$lte": bson_datetime(now) } })
                .session(&mut *session)
                .await
                .map_err(classify)?;
            let ttl = chrono::Duration::from_std(self.config.idempotency_ttl)
                .unwrap_or(chrono::Duration::hours(24));
            let record = doc! {
                "_id": &idem.key,
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
        // Incrementing the counter inside the transaction is what makes the
        // sequence gap-free and equal to commit order: a competing writer
        // conflicts on this document and retries after we commit.
        let counter = self
            .counters()
            .find_one_and_update(
                doc! { "_id": SEQUENCE_COUNTER_ID },
                doc! { "$inc": { "value": 1_i64 } },
            )
            .return_document(ReturnDocument::After)
            .session(&mut *session)
            .await
            .map_err(classify)?
            .ok_or_else(|| {
                StoreError::Other("sequence counter missing; run ensure_schema".to_owned())
            })?;
        let sequence = Sequence(get_u64(&counter, "value")?);
        let sequence_bson = Bson::Int64(i64::try_from(sequence.0).unwrap_or(i64::MAX));
        for item in items.iter_mut() {
            item.insert("batch_sequence", sequence_bson.clone());
        }
        let processing_time_ms = elapsed_ms(batch.created_at);
        let document = batch_document(batch, sequence, processing_time_ms);
        self.batches()
            .insert_one(document)
            .session(&mut *session)
            .await
            .map_err(classify)?;
        self.items()
            .insert_many(&*items)
            .session(&mut *session)
            .await
            .map_err(classify)?;
        Ok(BatchSummary {
            batch_id: batch.batch_id.clone(),
            batch_sequence: sequence,
            created_at: batch.created_at,
            total_items: batch.items.len() as u64,
            vendor_counts: batch.vendor_counts.clone(),
            processing_time_ms,
        })
    }

    async fn find_batch(&self, batch_id: &BatchId) -> Result<Option<Document>, StoreError> {
        self.batches()
            .find_one(doc! { "batch_id": batch_id.as_str() })
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
    async fn insert_batch(&self, batch: &NewBatch) -> Result<BatchSummary, StoreError> {
        let mut items = batch
            .items
            .iter()
            .map(|item| item_document(batch, item))
            .collect::<Result<Vec<_>, _>>()?;
        // Waiting here, not inside MongoDB, keeps pooled connections free for
        // the transactions that are running.
        let _slot = self
            .ingest_slots
            .acquire()
            .await
            .map_err(|_| StoreError::Other("store is shutting down".to_owned()))?;
        let mut session = self.client.start_session().await.map_err(classify)?;
        let mut retry = ConflictRetry::new(DEFAULT_TRANSACTION_RETRY_TIME);
        loop {
            match self.insert_once(&mut session, batch, &mut items).await {
                Err(e) if retry.again(&e).await => {
                    debug!(
                        message = "retrying conflicting batch transaction",
                        attempt = retry.attempts()
                    );
                    metrics::counter!("outbox_writer_transaction_retries_total").increment(1);
                }
                other => return other,
            }
        }
    }

    async fn find_idempotent(
        &self,
        key: &str,
    ) -> Result<Option<(String, BatchSummary)>, StoreError> {
        let record = self
            .idempotency()
            .find_one(doc! { "_id": key, "expires_at": { "$gt": bson_datetime(Utc::now()) } })
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
        match self.find_batch(&batch_id).await? {
            Some(batch) => Ok(Some((hash, batch_summary(&batch)?))),
            None => Ok(None),
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
