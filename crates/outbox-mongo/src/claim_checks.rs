//! Claim-check objects' references (`ObjectRefStore`): one document per
//! object in `claim_check_objects`, `{_id: <object url>, refs, state}`.
//!
//! Every step is one single-document update, atomic on its own:
//! - a pin is an upsert that matches only a document not being deleted; on
//!   one being deleted the upsert's insert meets the `_id` and fails with a
//!   duplicate key, and the pin waits;
//! - a release decrements, then (a second update) marks `state: deleting`
//!   only a document whose count is zero and that is not marked yet: one
//!   caller deletes the object, and no pin can count a reference meanwhile;
//!   a crash between the two leaves a count of zero unmarked, which keeps
//!   the object (harmless);
//! - `forget` removes the document once the object is gone, only if it is
//!   still the deletion that caller began (`marked_ms`).

use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;
use outbox_core::claim_check::{Deletion, ObjectRefStore};
use outbox_core::store::StoreError;

use crate::MongoStore;
use crate::errors::{classify, is_duplicate_key};

/// The state of an object being deleted (a string: the development
/// stand-in reads a boolean written with `$set` back as 1). Filters say
/// `$nin: [DELETING]` rather than `$ne`: the same on MongoDB, and the
/// stand-in's updates match no document without the field on `$ne`.
const DELETING: &str = "deleting";

/// The state of an object whose deletion was abandoned (kept, counted).
const LIVE: &str = "live";

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

    async fn release(&self, url: &str, refs: u64) -> Result<Option<Deletion>, StoreError> {
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
            return Ok(None);
        };
        if crate::documents::get_u64(&after, "refs").unwrap_or(0) > 0 {
            return Ok(None);
        }
        // Marked only if still at zero and not marked: a pin in between
        // (the count above zero again) or another pass (marked) wins.
        let marked_ms = chrono::Utc::now().timestamp_millis();
        let marked = self
            .objects()
            .update_one(
                doc! { "_id": url, "refs": { "$lte": 0_i64 }, "state": { "$nin": [DELETING] } },
                doc! { "$set": { "state": DELETING, "marked_ms": marked_ms } },
            )
            .await
            .map_err(classify)?;
        Ok((marked.modified_count == 1).then(|| Deletion {
            url: url.to_owned(),
            marked_ms,
        }))
    }

    async fn being_deleted(&self, marked_before_ms: i64) -> Result<Vec<Deletion>, StoreError> {
        let documents: Vec<Document> = self
            .objects()
            .find(doc! { "state": DELETING, "marked_ms": { "$lt": marked_before_ms } })
            .projection(doc! { "_id": 1, "marked_ms": 1 })
            .limit(1000)
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        Ok(documents
            .iter()
            .filter_map(|d| {
                Some(Deletion {
                    url: d.get_str("_id").ok()?.to_owned(),
                    marked_ms: d.get_i64("marked_ms").ok()?,
                })
            })
            .collect())
    }

    async fn forget(&self, deletion: &Deletion) -> Result<(), StoreError> {
        self.objects()
            .delete_one(doc! {
                "_id": &deletion.url,
                "state": DELETING,
                "marked_ms": deletion.marked_ms,
            })
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn abandon(&self, deletion: &Deletion) -> Result<(), StoreError> {
        self.objects()
            .update_one(
                doc! { "_id": &deletion.url, "state": DELETING, "marked_ms": deletion.marked_ms },
                doc! { "$set": { "state": LIVE } },
            )
            .await
            .map_err(classify)?;
        Ok(())
    }
}
