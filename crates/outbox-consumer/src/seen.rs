//! The memory of items already handled, that makes each item reach the
//! handler once: bounded in memory by default ([`MemorySeen`]), or in
//! MongoDB so that it survives restarts (`MongoSeen`, feature `mongodb`).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

/// Where handled items are remembered, by [`Item::dedup_key`](crate::Item::dedup_key).
#[async_trait]
pub trait SeenStore: Send + Sync {
    /// Whether the item was handled.
    ///
    /// # Errors
    /// When the memory cannot be read (the message is not acknowledged).
    async fn seen(&self, key: &str) -> anyhow::Result<bool>;

    /// Remembers handled items. Called after the handler succeeded and
    /// before the messages are acknowledged.
    ///
    /// # Errors
    /// When the memory cannot be written (the messages are not
    /// acknowledged, so they come again and are handled again).
    async fn remember(&self, keys: &[String]) -> anyhow::Result<()>;

    /// Which of `keys` were handled. Asked again when a batch is handed
    /// over: another client may have handled some of its items since they
    /// came here (an ordering key that moved between clients). Stores that
    /// can answer in one read should.
    ///
    /// # Errors
    /// When the memory cannot be read.
    async fn seen_of(&self, keys: &[String]) -> anyhow::Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        for key in keys {
            if self.seen(key).await? {
                seen.insert(key.clone());
            }
        }
        Ok(seen)
    }
}

/// A memory shared by several consumers (clients of one subscription in
/// one process).
#[async_trait]
impl<S: SeenStore + ?Sized> SeenStore for std::sync::Arc<S> {
    async fn seen(&self, key: &str) -> anyhow::Result<bool> {
        (**self).seen(key).await
    }

    async fn remember(&self, keys: &[String]) -> anyhow::Result<()> {
        (**self).remember(keys).await
    }

    async fn seen_of(&self, keys: &[String]) -> anyhow::Result<BTreeSet<String>> {
        (**self).seen_of(keys).await
    }
}

/// The last `capacity` handled items, in memory. A duplicate that comes
/// after more than `capacity` other items, or after a restart, is handled
/// again: size it above what can be redelivered (the subscription's
/// outstanding messages, a page of the relay, a replay's batch).
pub struct MemorySeen {
    capacity: usize,
    state: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl MemorySeen {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::default(),
        }
    }
}

impl Default for MemorySeen {
    /// 100,000 items.
    fn default() -> Self {
        Self::new(100_000)
    }
}

#[async_trait]
impl SeenStore for MemorySeen {
    async fn seen(&self, key: &str) -> anyhow::Result<bool> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .contains(key))
    }

    async fn remember(&self, keys: &[String]) -> anyhow::Result<()> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (set, order) = &mut *state;
        for key in keys {
            if set.insert(key.clone()) {
                order.push_back(key.clone());
            }
        }
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                set.remove(&oldest);
            }
        }
        Ok(())
    }
}

#[cfg(feature = "mongodb")]
pub use mongo::MongoSeen;

#[cfg(feature = "mongodb")]
mod mongo {
    use std::time::Duration;

    use async_trait::async_trait;
    use mongodb::bson::{DateTime, Document, doc};
    use mongodb::options::IndexOptions;
    use mongodb::{Collection, IndexModel};

    use super::SeenStore;

    /// Handled items in a MongoDB collection (`_id`: the item's dedup key),
    /// expired after `keep` by a TTL index: keep them at least as long as
    /// a copy can come again (the relay's `RETENTION_SECONDS`, 7 days by
    /// default, bounds replays).
    pub struct MongoSeen {
        collection: Collection<Document>,
    }

    impl MongoSeen {
        /// # Errors
        /// When the TTL index cannot be created.
        pub async fn new(collection: Collection<Document>, keep: Duration) -> anyhow::Result<Self> {
            collection
                .create_index(
                    IndexModel::builder()
                        .keys(doc! { "seen_at": 1 })
                        .options(IndexOptions::builder().expire_after(keep).build())
                        .build(),
                )
                .await?;
            Ok(Self { collection })
        }
    }

    #[async_trait]
    impl SeenStore for MongoSeen {
        async fn seen(&self, key: &str) -> anyhow::Result<bool> {
            Ok(self
                .collection
                .find_one(doc! { "_id": key })
                .await?
                .is_some())
        }

        async fn seen_of(
            &self,
            keys: &[String],
        ) -> anyhow::Result<std::collections::BTreeSet<String>> {
            let mut cursor = self
                .collection
                .find(doc! { "_id": { "$in": keys } })
                .projection(doc! { "_id": 1 })
                .await?;
            let mut seen = std::collections::BTreeSet::new();
            while cursor.advance().await? {
                if let Ok(id) = cursor.current().get_str("_id") {
                    seen.insert(id.to_owned());
                }
            }
            Ok(seen)
        }

        async fn remember(&self, keys: &[String]) -> anyhow::Result<()> {
            if keys.is_empty() {
                return Ok(());
            }
            let now = DateTime::now();
            let documents: Vec<Document> = keys
                .iter()
                .map(|key| doc! { "_id": key, "seen_at": now })
                .collect();
            match self.collection.insert_many(documents).ordered(false).await {
                Ok(_) => Ok(()),
                // Remembered already (a duplicate handled twice by a
                // replica that did not know): fine.
                Err(e) if is_duplicates_only(&e) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }

    fn is_duplicates_only(error: &mongodb::error::Error) -> bool {
        match &*error.kind {
            mongodb::error::ErrorKind::InsertMany(failure) => {
                failure
                    .write_errors
                    .as_ref()
                    .is_some_and(|errors| errors.iter().all(|e| e.code == 11000))
                    && failure.write_concern_error.is_none()
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_keeps_the_last_capacity_items() {
        let seen = MemorySeen::new(2);
        seen.remember(&["a".into(), "b".into()])
            .await
            .unwrap_or_default();
        assert!(seen.seen("a").await.unwrap_or(false));
        seen.remember(&["c".into()]).await.unwrap_or_default();
        assert!(
            !seen.seen("a").await.unwrap_or(true),
            "the oldest is forgotten"
        );
        assert!(seen.seen("b").await.unwrap_or(false) && seen.seen("c").await.unwrap_or(false));
    }
}
