//! Claim-check objects' references (`ObjectRefStore`): one document per
//! object in `claim_check_objects`, `{_id: <object url>, refs, state}`.
//!
//! Every step is one single-document update, atomic on its own:
//! - a pin is an upsert that matches only a document not being deleted; on
//!   one being deleted the upsert's insert meets the `_id` and fails with a
//!   duplicate key, and the pin waits;
//! - a release decrements, then marks `state: deleting` only a document whose
//!   count is zero and that is not marked yet: exactly one retention pass
//!   deletes the object, and no pin can count a reference meanwhile;
//! - `forget` removes the document once the object is gone.

use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;
use outbox_core::claim_check::ObjectRefStore;
use outbox_core::store::StoreError;

use crate::MongoStore;
use crate::errors::{classify, is_duplicate_key};

/// The state of an object being deleted (a string: the development
/// stand-in reads a boolean written with `$set` back as 1). Filters say
/// `$nin: [DELETING]` rather than `$ne`: the same on MongoDB, and the
/// stand-in's updates match no document without the field on `$ne`.
const DELETING: &str = "deleting";

/// How often a pin looks again at an object being deleted.
const PIN_POLL: Duration = Duration::from_millis(50);

fn count(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[async_trait]
impl ObjectRefStore for MongoStore {
    async fn pin(
        &self,
        url: &str,
        refs: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        loop {
            let pinned = tokio::time::timeout_at(
                deadline,
                self.objects()
                    .update_one(
                        doc! { "_id": url, "state": { "$nin": [DELETING] } },
                        doc! { "$inc": { "refs": count(refs) } },
                    )
                    .upsert(true)
                    .into_future(),
            )
            .await
            .map_err(|_| {
                StoreError::Unavailable("pinning a claim-check object timed out".to_owned())
            })?;
            match pinned {
                Ok(_) => return Ok(()),
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(classify(e)),
            }
            if tokio::time::Instant::now() + PIN_POLL > deadline {
                return Err(StoreError::Unavailable(format!(
                    "the claim-check object {url} is being deleted"
                )));
            }
            tokio::time::sleep(PIN_POLL).await;
        }
    }

    async fn unpin(&self, url: &str, refs: u64) -> Result<(), StoreError> {
        self.objects()
            .update_one(
                doc! { "_id": url, "state": { "$nin": [DELETING] } },
                doc! { "$inc": { "refs": -count(refs) } },
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn release(&self, url: &str, refs: u64) -> Result<bool, StoreError> {
        let after = self
            .objects()
            .find_one_and_update(
                doc! { "_id": url, "state": { "$nin": [DELETING] } },
                doc! { "$inc": { "refs": -count(refs) } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(classify)?;
        let Some(after) = after else {
            // Never pinned (written before claim-check counted references)
            // or being deleted already: nothing to do here.
            return Ok(false);
        };
        if crate::documents::get_u64(&after, "refs").unwrap_or(0) > 0 {
            return Ok(false);
        }
        let marked = self
            .objects()
            .update_one(
                doc! { "_id": url, "refs": { "$lte": 0_i64 }, "state": { "$nin": [DELETING] } },
                doc! { "$set": { "state": DELETING, "marked_ms": chrono::Utc::now().timestamp_millis() } },
            )
            .await
            .map_err(classify)?;
        Ok(marked.modified_count == 1)
    }

    async fn being_deleted(&self, marked_before_ms: i64) -> Result<Vec<String>, StoreError> {
        let documents: Vec<Document> = self
            .objects()
            .find(doc! { "state": DELETING, "marked_ms": { "$lt": marked_before_ms } })
            .projection(doc! { "_id": 1 })
            .limit(1000)
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        Ok(documents
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect())
    }

    async fn forget(&self, url: &str) -> Result<(), StoreError> {
        self.objects()
            .delete_one(doc! { "_id": url, "state": DELETING })
            .await
            .map_err(classify)?;
        Ok(())
    }
}
