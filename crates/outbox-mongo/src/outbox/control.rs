//! Operators' controls of a stream: the pause flag, and putting a failed
//! batch back to draining.

use mongodb::bson::{Bson, doc};
use outbox_core::model::{BatchId, BatchStatus};
use outbox_core::store::StoreError;
use outbox_core::stream::StreamName;

use crate::documents::get_flag;
use crate::errors::classify;
use crate::{MongoStore, ids};

impl MongoStore {
    pub(super) async fn paused_flag(&self, stream: &StreamName) -> Result<bool, StoreError> {
        let control = self
            .control()
            .find_one(doc! { "_id": ids::control(stream) })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        Ok(control.is_some_and(|c| get_flag(&c, "paused")))
    }

    pub(super) async fn set_paused_flag(
        &self,
        stream: &StreamName,
        paused: bool,
    ) -> Result<(), StoreError> {
        self.control()
            .update_one(
                doc! { "_id": ids::control(stream) },
                doc! { "$set": { "paused": paused } },
            )
            .upsert(true)
            .await
            .map_err(classify)?;
        Ok(())
    }
    pub(super) async fn retry_failed(&self, batch_id: &BatchId) -> Result<bool, StoreError> {
        let result = self
            .batches()
            .update_one(
                doc! { "batch_id": batch_id.as_str(), "status": BatchStatus::Failed.as_str() },
                doc! { "$set": { "status": BatchStatus::Processing.as_str(), "last_error": Bson::Null } },
            )
            .await
            .map_err(classify)?;
        Ok(result.matched_count == 1)
    }
}
