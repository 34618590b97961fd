//! The relay's reads: what it publishes next, and what it shows. Every read
//! is at [`crate::read_concern`] (majority): a decision taken on a write
//! that a failover rolls back would break the order.

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use outbox_core::model::{BatchId, BatchStatus, ItemSequence, ItemStatus, Sequence};
use outbox_core::store::{Backlog, ItemView, ItemWindow, OutboxItem, PendingBatch, StoreError};
use outbox_core::stream::StreamName;

use super::{to_i64, unfinished, window_ids};
use crate::documents::{get_u64, item_view, outbox_item, pending_batch};
use crate::errors::classify;
use crate::{MongoStore, ids};

impl MongoStore {
    /// The stream's unfinished batches after `after`, in sequence order.
    pub(super) async fn pending_after(
        &self,
        stream: &StreamName,
        after: Option<Sequence>,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        let after = after.map_or(0, |s| to_i64(s.0));
        let cursor = self
            .batches()
            .find(doc! {
                "stream": ids::field(stream),
                "status": unfinished(),
                "batch_sequence": { "$gt": after },
            })
            .sort(doc! { "batch_sequence": 1 })
            .limit(i64::from(limit))
            .projection(doc! { "vendor_counts": 0 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        self.collect(cursor, pending_batch).await
    }

    pub(super) async fn backlog_of(&self, stream: &StreamName) -> Result<Backlog, StoreError> {
        // O(1): the counter (the last sequence given out) less the last
        // committed (recorded by the commits), two reads by `_id`, and the
        // head batch by the (stream, status, batch_sequence) index; the
        // three at once.
        let counter = async {
            let counter = self
                .counters()
                .find_one(doc! { "_id": ids::counter(stream) })
                .read_concern(crate::read_concern())
                .await
                .map_err(classify)?;
            Ok::<_, StoreError>(
                counter
                    .as_ref()
                    .and_then(|c| get_u64(c, "value").ok())
                    .unwrap_or(0),
            )
        };
        let (issued, committed, head) =
            futures::try_join!(counter, self.recorded_commit(stream), async {
                Ok(self
                    .pending_after(stream, None, 1)
                    .await?
                    .into_iter()
                    .next())
            })?;
        let pending = match (committed, &head) {
            (_, None) => 0,
            (Some(committed), Some(_)) => issued.saturating_sub(committed.0),
            // Nothing recorded yet (data committed before commits recorded
            // it): count, until the next commit records it.
            (None, Some(_)) => self
                .batches()
                .count_documents(doc! { "stream": ids::field(stream), "status": unfinished() })
                .read_concern(crate::read_concern())
                .await
                .map_err(classify)?,
        };
        Ok(Backlog {
            pending_batches: pending,
            oldest_created_at: head.as_ref().map(|b| b.created_at),
            head,
        })
    }

    /// One window's pending items (see `OutboxStore::unsent_items`).
    pub(super) async fn unsent_window(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // Every item of the window by primary key: the cost does not grow
        // with the backlog (no index needed, no sort on the server).
        let first = u64::from(after.0) + 1;
        let ids = window_ids(batch_id, after, limit);
        let cursor = self
            .items()
            .find(doc! {
                "_id": { "$in": &ids },
                "status": ItemStatus::Pending.as_str(),
            })
            .batch_size(limit)
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        let mut items = self.collect(cursor, outbox_item).await?;
        items.retain(|item| item.batch_id == *batch_id);
        items.sort_by_key(|item| item.item_sequence);
        if items.len() < ids.len() {
            self.check_window(batch_id, first, &ids, &items).await?;
        }
        Ok(items)
    }

    pub(super) async fn unsent_windows(
        &self,
        windows: &[ItemWindow],
    ) -> Result<Vec<Vec<OutboxItem>>, StoreError> {
        // Every window's items in one read by primary key.
        let ids: Vec<Vec<String>> = windows
            .iter()
            .map(|w| window_ids(&w.batch_id, w.after, w.limit))
            .collect();
        let all: Vec<&String> = ids.iter().flatten().collect();
        if all.is_empty() {
            return Ok(vec![Vec::new(); windows.len()]);
        }
        let cursor = self
            .items()
            .find(doc! {
                "_id": { "$in": &all },
                "status": ItemStatus::Pending.as_str(),
            })
            .batch_size(u32::try_from(all.len()).unwrap_or(u32::MAX))
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        let mut read = self.collect(cursor, outbox_item).await?;
        read.sort_by(|a, b| {
            a.batch_id
                .as_str()
                .cmp(b.batch_id.as_str())
                .then(a.item_sequence.cmp(&b.item_sequence))
        });
        let mut pages = Vec::with_capacity(windows.len());
        for (window, ids) in windows.iter().zip(&ids) {
            let range =
                window.after.0.saturating_add(1)..=window.after.0.saturating_add(window.limit);
            let items: Vec<OutboxItem> = read
                .iter()
                .filter(|i| i.batch_id == window.batch_id && range.contains(&i.item_sequence.0))
                .cloned()
                .collect();
            if items.len() < ids.len() {
                self.check_window(&window.batch_id, u64::from(window.after.0) + 1, ids, &items)
                    .await?;
            }
            pages.push(items);
        }
        Ok(pages)
    }

    pub(super) async fn item_views(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<ItemView>, StoreError> {
        let cursor = self
            .items()
            .find(doc! { "batch_id": batch_id.as_str(), "item_sequence": { "$gt": i64::from(after.0) } })
            .sort(doc! { "item_sequence": 1 })
            .limit(i64::from(limit))
            .projection(doc! { "request_data": 0 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        self.collect(cursor, item_view).await
    }

    pub(super) async fn committed_sequence(
        &self,
        stream: &StreamName,
    ) -> Result<Option<Sequence>, StoreError> {
        if let Some(sequence) = self.recorded_commit(stream).await? {
            return Ok(Some(sequence));
        }
        // Committed before commits recorded it: the highest committed batch.
        let last = self
            .batches()
            .find_one(
                doc! { "stream": ids::field(stream), "status": BatchStatus::Committed.as_str() },
            )
            .sort(doc! { "batch_sequence": -1 })
            .projection(doc! { "batch_sequence": 1 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        last.map(|b| get_u64(&b, "batch_sequence").map(Sequence))
            .transpose()
    }

    /// The highest committed sequence as the commits recorded it in the
    /// lease document.
    async fn recorded_commit(&self, stream: &StreamName) -> Result<Option<Sequence>, StoreError> {
        let lease = self
            .lease()
            .find_one(doc! { "_id": ids::lease(stream) })
            .projection(doc! { "committed_sequence": 1 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        Ok(lease
            .as_ref()
            .and_then(|l| get_u64(l, "committed_sequence").ok())
            .map(Sequence))
    }

    /// A window read gave fewer pending items than it has positions: the
    /// others must be there, sent or failed. A position with no document
    /// at all ends the read: publishing what follows it would put a later
    /// item before an earlier one.
    async fn check_window(
        &self,
        batch_id: &BatchId,
        first: u64,
        ids: &[String],
        pending: &[OutboxItem],
    ) -> Result<(), StoreError> {
        let read: std::collections::HashSet<String> =
            pending.iter().map(|i| i.item_id.to_string()).collect();
        let others: Vec<&String> = ids.iter().filter(|id| !read.contains(*id)).collect();
        let cursor = self
            .items()
            .find(doc! { "_id": { "$in": &others }, "batch_id": batch_id.as_str() })
            .projection(doc! { "_id": 1 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        let present: std::collections::HashSet<String> = cursor
            .try_collect::<Vec<Document>>()
            .await
            .map_err(classify)?
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect();
        let found = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| read.contains(*id) || present.contains(*id))
            .map(|(offset, _)| first + offset as u64);
        let last = first + ids.len() as u64 - 1;
        match outbox_core::store::first_missing(first, last, found) {
            None => Ok(()),
            Some(missing) => Err(StoreError::Incomplete(format!(
                "batch {batch_id} has no item {missing} (not readable at read concern majority); nothing after it is published"
            ))),
        }
    }

    pub(crate) async fn collect<T>(
        &self,
        cursor: mongodb::Cursor<Document>,
        convert: fn(&Document) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let documents: Vec<Document> = cursor.try_collect().await.map_err(classify)?;
        documents.iter().map(convert).collect()
    }
}
