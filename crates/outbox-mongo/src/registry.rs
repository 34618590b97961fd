//! Stream definitions and the relay replicas' registry.

use async_trait::async_trait;
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use outbox_core::store::{LeaseStore, Member, MemberStore, StoreError, StreamStore};
use outbox_core::stream::{StreamDefinition, StreamName};

use crate::MongoStore;
use crate::documents::{
    STREAM_OPTIONAL_FIELDS, bson_datetime, member, member_document, stream_definition,
    stream_document,
};
use crate::errors::classify;

#[async_trait]
impl StreamStore for MongoStore {
    async fn streams(&self) -> Result<Vec<StreamDefinition>, StoreError> {
        let documents: Vec<Document> = self
            .streams()
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .read_concern(crate::read_concern())
            .max_time(self.config().lease_timeout)
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        documents.iter().map(stream_definition).collect()
    }

    async fn stream(&self, name: &StreamName) -> Result<Option<StreamDefinition>, StoreError> {
        self.streams()
            .find_one(doc! { "_id": name.as_str() })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?
            .as_ref()
            .map(stream_definition)
            .transpose()
    }

    async fn put_stream(&self, definition: &StreamDefinition) -> Result<bool, StoreError> {
        // The counter first: a writer only stores batches for a stream whose
        // definition it can read, and then the counter exists.
        self.ensure_counter(&definition.name).await?;
        let now = Utc::now();
        let mut document = stream_document(definition, now);
        document.remove("_id");
        let mut unset = Document::new();
        for field in STREAM_OPTIONAL_FIELDS {
            if !document.contains_key(field) {
                unset.insert(field, "");
            }
        }
        let mut update = doc! {
            "$set": document,
            "$setOnInsert": { "created_at": bson_datetime(now) },
        };
        if !unset.is_empty() {
            update.insert("$unset", unset);
        }
        let result = self
            .streams()
            .update_one(doc! { "_id": definition.name.as_str() }, update)
            .upsert(true)
            .await
            .map_err(classify)?;
        Ok(result.upserted_id.is_some())
    }
}

impl MongoStore {
    /// The member records `filter` selects, as a majority has them. Expiries
    /// are compared by the callers, not in the query alone: one stored in
    /// another numeric type still reads.
    async fn member_records(&self, filter: Document) -> Result<Vec<Member>, StoreError> {
        let documents: Vec<Document> = self
            .members()
            .find(filter)
            .read_concern(crate::read_concern())
            .max_time(self.config().lease_timeout)
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        Ok(documents.iter().filter_map(|d| member(d).ok()).collect())
    }
}

#[async_trait]
impl MemberStore for MongoStore {
    async fn heartbeat(&self, member: &Member) -> Result<(), StoreError> {
        let mut document = member_document(member);
        document.remove("_id");
        // With the lease's time limit: an announcement that waits (on a
        // store whose writes queue behind an open transaction) fails and is
        // tried again instead of holding the replica's supervision.
        let ms = i64::try_from(self.config().lease_timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let reply = self
            .database()
            .run_command(doc! {
                "update": &self.config().members_collection,
                "updates": [{ "q": { "_id": &member.id }, "u": { "$set": document }, "upsert": true }],
                "maxTimeMS": ms,
                "writeConcern": { "w": "majority", "wtimeout": ms },
            })
            .await
            .map_err(classify)?;
        if reply.get_array("writeErrors").is_ok_and(|e| !e.is_empty()) {
            return Err(StoreError::Other(format!(
                "announcing {}: {reply}",
                member.id
            )));
        }
        Ok(())
    }

    async fn members(&self, now_ms: i64) -> Result<Vec<Member>, StoreError> {
        let mut members = self.member_records(doc! {}).await?;
        members.retain(|m| m.expires_at_ms > now_ms);
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(members)
    }

    async fn recently_gone(&self, now_ms: i64) -> Result<Vec<Member>, StoreError> {
        let cutoff = now_ms - outbox_core::store::GONE_SHOWN_MS;
        // Older records go: every process announces itself under an id of
        // its own, so the registry would grow with every restart.
        self.members()
            .delete_many(doc! { "expires_at_ms": { "$lt": cutoff } })
            .await
            .map_err(classify)?;
        let mut gone = self
            .member_records(doc! { "expires_at_ms": { "$lte": now_ms } })
            .await?;
        gone.retain(|m| m.expires_at_ms <= now_ms && m.expires_at_ms >= cutoff);
        gone.sort_by_key(|m| std::cmp::Reverse(m.expires_at_ms));
        Ok(gone)
    }

    async fn leave(&self, id: &str) -> Result<(), StoreError> {
        // Kept, expired, to be shown as gone for a while.
        let now_ms = LeaseStore::now_ms(self).await?;
        self.members()
            .update_one(
                doc! { "_id": id },
                doc! { "$set": { "expires_at_ms": now_ms } },
            )
            .await
            .map_err(classify)?;
        Ok(())
    }
}
