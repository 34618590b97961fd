//! Retention: committed batches past their age, old dead letters, and the
//! items of staged batches that no transaction made visible.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use outbox_core::model::{BatchId, BatchStatus, ItemId, ItemSequence};
use outbox_core::store::{Removed, StoreError};
use outbox_core::stream::StreamName;

use crate::documents::{get_opt_datetime, get_u64};
use crate::errors::classify;
use crate::{MongoStore, ids};

impl MongoStore {
    /// See `OutboxStore::remove_expired`.
    pub(super) async fn expire(
        &self,
        stream: &StreamName,
        committed_before: Option<DateTime<Utc>>,
        dead_letters_before: Option<DateTime<Utc>>,
        abandoned_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Removed, StoreError> {
        let mut removed = Removed {
            abandoned_batches: self.sweep_staged(stream, abandoned_before, limit).await?,
            ..Removed::default()
        };
        if let Some(cutoff) = committed_before {
            // Oldest committed first (commit order is sequence order), by the
            // (status, batch_sequence) index; the dates are compared here,
            // not in the query, so that a date stored in another form (the
            // stand-in's strings) can never match too much.
            let committed: Vec<Document> = self
                .batches()
                .find(doc! { "stream": ids::field(stream), "status": BatchStatus::Committed.as_str() })
                .sort(doc! { "batch_sequence": 1 })
                .limit(i64::from(limit))
                .projection(doc! { "batch_id": 1, "total_items": 1, "committed_at": 1 })
                .await
                .map_err(classify)?
                .try_collect()
                .await
                .map_err(classify)?;
            for batch in committed {
                let expired =
                    get_opt_datetime(&batch, "committed_at").is_some_and(|at| at < cutoff);
                if !expired {
                    break;
                }
                let batch_id: BatchId = batch
                    .get_str("batch_id")
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| StoreError::Other(format!("stored batch id: {e}")))?;
                let total = u32::try_from(get_u64(&batch, "total_items")?).unwrap_or(u32::MAX);
                // Items first, by primary key, a page at a time; the batch
                // document last, so a pass cut short finds it again.
                let mut first = 1;
                while first <= total {
                    let last = first.saturating_add(999).min(total);
                    let ids: Vec<String> = (first..=last)
                        .map(|n| ItemId::of(&batch_id, ItemSequence(n)).to_string())
                        .collect();
                    // Claim-checked items one by one, each reference counted
                    // only by the call that deleted its item: two passes (a
                    // leader whose lease just lapsed and its successor) never
                    // release one reference twice.
                    removed.items += self
                        .delete_referring(
                            self.items(),
                            doc! { "_id": { "$in": &ids } },
                            &mut removed,
                        )
                        .await?;
                    let deleted = self
                        .items()
                        .delete_many(doc! { "_id": { "$in": ids } })
                        .await
                        .map_err(classify)?;
                    removed.items += deleted.deleted_count;
                    first = last.saturating_add(1);
                }
                let deleted = self
                    .batches()
                    .delete_one(doc! {
                        "batch_id": batch_id.as_str(),
                        "status": BatchStatus::Committed.as_str(),
                    })
                    .await
                    .map_err(classify)?;
                removed.batches += deleted.deleted_count;
            }
        }
        if let Some(cutoff) = dead_letters_before {
            let letters: Vec<Document> = self
                .dead_letters()
                .find(doc! { "stream": ids::field(stream) })
                .projection(doc! { "_id": 1, "dead_lettered_at": 1 })
                .limit(10_000)
                .await
                .map_err(classify)?
                .try_collect()
                .await
                .map_err(classify)?;
            let expired: Vec<Bson> = letters
                .iter()
                .filter(|d| get_opt_datetime(d, "dead_lettered_at").is_some_and(|at| at < cutoff))
                .filter_map(|d| d.get("_id").cloned())
                .collect();
            if !expired.is_empty() {
                removed.dead_letters = self
                    .delete_referring(
                        self.dead_letters(),
                        doc! { "_id": { "$in": &expired } },
                        &mut removed,
                    )
                    .await?;
                removed.dead_letters += self
                    .dead_letters()
                    .delete_many(doc! { "_id": { "$in": expired } })
                    .await
                    .map_err(classify)?
                    .deleted_count;
            }
        }
        Ok(removed)
    }

    /// Deletes the documents of `collection` that `filter` matches and that
    /// refer to a claim-check object, one at a time, and counts the
    /// references of those this call deleted in `removed.object_refs`;
    /// returns how many.
    async fn delete_referring(
        &self,
        collection: mongodb::Collection<Document>,
        mut filter: Document,
        removed: &mut Removed,
    ) -> Result<u64, StoreError> {
        filter.insert("claim_check", doc! { "$exists": true });
        let referring: Vec<Document> = collection
            .find(filter)
            .projection(doc! { "_id": 1 })
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        let mut deleted = 0;
        for document in referring {
            let Some(id) = document.get("_id") else {
                continue;
            };
            // The whole reference comes back (the stand-in answers a dotted
            // projection with a flattened key).
            let gone = collection
                .find_one_and_delete(doc! { "_id": id.clone() })
                .projection(doc! { "claim_check": 1 })
                .await
                .map_err(classify)?;
            if let Some(url) = gone
                .as_ref()
                .and_then(|d| d.get_document("claim_check").ok())
                .and_then(|c| c.get_str("url").ok())
            {
                *removed.object_refs.entry(url.to_owned()).or_default() += 1;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Removes large batches staged before `before` that no transaction
    /// made visible: their writer died or gave up. Dates compared here, as
    /// retention's.
    async fn sweep_staged(
        &self,
        stream: &StreamName,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let staged: Vec<Document> = self
            .staged()
            .find(doc! { "stream": ids::field(stream) })
            .limit(i64::from(limit))
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        let mut swept = 0;
        for record in staged {
            if get_opt_datetime(&record, "created_at").is_none_or(|at| at >= before) {
                continue;
            }
            let Ok(batch_id) = record.get_str("_id").unwrap_or_default().parse::<BatchId>() else {
                continue;
            };
            let total = usize::try_from(get_u64(&record, "total_items").unwrap_or(0)).unwrap_or(0);
            self.unstage(&batch_id, total).await?;
            tracing::warn!(message = "removed an abandoned staged batch", %batch_id, items = total);
            swept += 1;
        }
        Ok(swept)
    }
}
