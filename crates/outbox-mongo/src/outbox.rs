//! The relay's reads, and its [`OutboxStore`] over the fenced writes of
//! `fenced.rs`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ReadConcern;
use outbox_core::model::{
    BatchId, BatchProgress, BatchStatus, ItemId, ItemSequence, ItemStatus, Sequence,
};
use outbox_core::store::{
    Backlog, Fence, ItemView, ItemWindow, OutboxItem, OutboxStore, PageWrite, PendingBatch,
    Removed, SentMark, StoreError,
};

use crate::documents::{
    get_flag, get_opt_datetime, get_u64, item_view, outbox_item, pending_batch,
};
use crate::errors::classify;
use outbox_core::stream::StreamName;

use crate::fenced::FencedWrite;
use crate::{MongoStore, ids};

const UNFINISHED: [&str; 3] = ["pending", "processing", "failed"];

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `_id`s of a batch's items at positions `after + 1 ..= after + limit`
/// (every read of a window is by primary key).
pub(crate) fn window_ids(batch_id: &BatchId, after: ItemSequence, limit: u32) -> Vec<String> {
    let first = u64::from(after.0) + 1;
    let last = (u64::from(after.0) + u64::from(limit)).min(u64::from(u32::MAX));
    (first..=last)
        .map(|n| ItemId::of(batch_id, ItemSequence(n as u32)).to_string())
        .collect()
}

fn unfinished() -> Document {
    doc! { "$in": UNFINISHED.to_vec() }
}

impl MongoStore {
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

    /// The highest committed sequence as the commits recorded it in the
    /// lease document.
    async fn recorded_commit(&self, stream: &StreamName) -> Result<Option<Sequence>, StoreError> {
        let lease = self
            .lease()
            .find_one(doc! { "_id": ids::lease(stream) })
            .projection(doc! { "committed_sequence": 1 })
            .read_concern(ReadConcern::majority())
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
            .read_concern(ReadConcern::majority())
            .await
            .map_err(classify)?;
        let present: std::collections::HashSet<String> = cursor
            .try_collect::<Vec<Document>>()
            .await
            .map_err(classify)?
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_owned))
            .collect();
        match ids
            .iter()
            .position(|id| !read.contains(id) && !present.contains(id))
        {
            None => Ok(()),
            Some(offset) => Err(StoreError::Incomplete(format!(
                "batch {batch_id} has no item {} (not readable at read concern majority); nothing after it is published",
                first + offset as u64
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

#[async_trait]
impl OutboxStore for MongoStore {
    async fn head_batch(&self, stream: &StreamName) -> Result<Option<PendingBatch>, StoreError> {
        Ok(self
            .pending_batches(stream, None, 1)
            .await?
            .into_iter()
            .next())
    }

    async fn pending_batches(
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
            .read_concern(ReadConcern::majority())
            .await
            .map_err(classify)?;
        self.collect(cursor, pending_batch).await
    }

    async fn backlog(&self, stream: &StreamName) -> Result<Backlog, StoreError> {
        // O(1): the counter (the last sequence given out) less the last
        // committed (recorded by the commits), two reads by `_id`, and the
        // head batch by the (stream, status, batch_sequence) index; the
        // three at once.
        let counter = async {
            let counter = self
                .counters()
                .find_one(doc! { "_id": ids::counter(stream) })
                .read_concern(ReadConcern::majority())
                .await
                .map_err(classify)?;
            Ok::<_, StoreError>(
                counter
                    .as_ref()
                    .and_then(|c| get_u64(c, "value").ok())
                    .unwrap_or(0),
            )
        };
        let (issued, committed, head) = futures::try_join!(
            counter,
            self.recorded_commit(stream),
            self.head_batch(stream)
        )?;
        let pending = match (committed, &head) {
            (_, None) => 0,
            (Some(committed), Some(_)) => issued.saturating_sub(committed.0),
            // Nothing recorded yet (data committed before commits recorded
            // it): count, until the next commit records it.
            (None, Some(_)) => self
                .batches()
                .count_documents(doc! { "stream": ids::field(stream), "status": unfinished() })
                .read_concern(ReadConcern::majority())
                .await
                .map_err(classify)?,
        };
        Ok(Backlog {
            pending_batches: pending,
            oldest_created_at: head.as_ref().map(|b| b.created_at),
            head,
        })
    }

    async fn unsent_items(
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
            .read_concern(ReadConcern::majority())
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

    async fn unsent_items_in(
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
            .read_concern(ReadConcern::majority())
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

    async fn items(
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
            .read_concern(ReadConcern::majority())
            .await
            .map_err(classify)?;
        self.collect(cursor, item_view).await
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        self.progress_of(batch_id).await
    }

    async fn start_batch(&self, fence: &Fence, batch_id: &BatchId) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::Start(batch_id)).await
    }

    async fn mark_sent(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        self.fenced(fence, FencedWrite::Marks(batch_id, marks))
            .await
    }

    async fn commit_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
    ) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::Commit(batch_id, sequence))
            .await
    }

    async fn finish_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        sequence: Sequence,
        marks: &[SentMark],
    ) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::Finish(batch_id, sequence, marks))
            .await
    }

    async fn record_pages(&self, fence: &Fence, pages: &[PageWrite]) -> Result<(), StoreError> {
        if pages.is_empty() {
            return Ok(());
        }
        if self
            .fenced_applied(fence, FencedWrite::Pages(pages))
            .await?
        {
            return Ok(());
        }
        // A batch stored before the counters existed: page by page, each
        // commit checking for pending items itself.
        for page in pages {
            if page.finishes {
                self.fenced(
                    fence,
                    FencedWrite::Finish(&page.batch_id, page.sequence, &page.marks),
                )
                .await?;
            } else if !page.marks.is_empty() {
                self.fenced(fence, FencedWrite::Marks(&page.batch_id, &page.marks))
                    .await?;
            }
        }
        Ok(())
    }

    async fn committed_through(&self, stream: &StreamName) -> Result<Option<Sequence>, StoreError> {
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
            .read_concern(ReadConcern::majority())
            .await
            .map_err(classify)?;
        last.map(|b| get_u64(&b, "batch_sequence").map(Sequence))
            .transpose()
    }

    async fn fail_batch(
        &self,
        fence: &Fence,
        batch_id: &BatchId,
        item_sequence: ItemSequence,
        error: &str,
    ) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::Fail(batch_id, item_sequence, error))
            .await
    }

    async fn dead_letter(
        &self,
        fence: &Fence,
        item: &OutboxItem,
        error: &str,
    ) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::DeadLetter(item, error))
            .await
    }

    async fn retry_batch(&self, batch_id: &BatchId) -> Result<bool, StoreError> {
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

    async fn remove_expired(
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
                    .dead_letters()
                    .delete_many(doc! { "_id": { "$in": expired } })
                    .await
                    .map_err(classify)?
                    .deleted_count;
            }
        }
        Ok(removed)
    }

    async fn paused(&self, stream: &StreamName) -> Result<bool, StoreError> {
        let control = self
            .control()
            .find_one(doc! { "_id": ids::control(stream) })
            .read_concern(ReadConcern::majority())
            .await
            .map_err(classify)?;
        Ok(control.is_some_and(|c| get_flag(&c, "paused")))
    }

    async fn set_paused(&self, stream: &StreamName, paused: bool) -> Result<(), StoreError> {
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
}
