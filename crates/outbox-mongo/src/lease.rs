//! The leader lease: one document, changed only by compare-and-swap on its
//! holder and epoch, so two replicas can never both believe they took it.

use async_trait::async_trait;
use mongodb::bson::{Document, doc};
use outbox_core::store::{Fence, Lease, LeaseStore, StoreError};

use crate::documents::get_u64;
use crate::errors::{classify, is_duplicate_key};
use crate::{LEASE_ID, MongoStore};

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn lease_from(doc: &Document) -> Result<Lease, StoreError> {
    let expires_at_ms = match doc.get("expires_at_ms") {
        Some(mongodb::bson::Bson::Int64(v)) => *v,
        Some(mongodb::bson::Bson::Int32(v)) => i64::from(*v),
        _ => {
            return Err(StoreError::Other(
                "lease document without expires_at_ms".to_owned(),
            ));
        }
    };
    Ok(Lease {
        holder: doc.get_str("holder").unwrap_or_default().to_owned(),
        epoch: get_u64(doc, "epoch")?,
        expires_at_ms,
    })
}

#[async_trait]
impl LeaseStore for MongoStore {
    async fn acquire_or_renew(
        &self,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        let expires_at_ms = now_ms + ttl_ms;
        let Some(current) = self.current().await? else {
            let lease = Lease {
                holder: holder.to_owned(),
                epoch: 1,
                expires_at_ms,
            };
            let document = doc! {
                "_id": LEASE_ID, "holder": holder, "epoch": 1_i64, "expires_at_ms": expires_at_ms,
            };
            return match self.lease().insert_one(document).await {
                Ok(_) => Ok(Some(lease)),
                Err(e) if is_duplicate_key(&e) => Ok(None),
                Err(e) => Err(classify(e)),
            };
        };
        let next = if current.holder == holder {
            Lease {
                expires_at_ms,
                ..current.clone()
            }
        } else if current.expires_at_ms > now_ms {
            return Ok(None);
        } else {
            Lease {
                holder: holder.to_owned(),
                epoch: current.epoch + 1,
                expires_at_ms,
            }
        };
        // Only if nobody changed the lease since we read it.
        let result = self
            .lease()
            .update_one(
                doc! { "_id": LEASE_ID, "holder": &current.holder, "epoch": to_i64(current.epoch) },
                doc! { "$set": {
                    "holder": &next.holder,
                    "epoch": to_i64(next.epoch),
                    "expires_at_ms": next.expires_at_ms,
                } },
            )
            .await
            .map_err(classify)?;
        Ok((result.matched_count == 1).then_some(next))
    }

    async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        self.lease()
            .update_one(
                doc! { "_id": LEASE_ID, "holder": &fence.holder, "epoch": to_i64(fence.epoch) },
                doc! { "$set": { "expires_at_ms": 0_i64 } },
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn current(&self) -> Result<Option<Lease>, StoreError> {
        let document = self
            .lease()
            .find_one(doc! { "_id": LEASE_ID })
            .await
            .map_err(classify)?;
        document.as_ref().map(lease_from).transpose()
    }
}
