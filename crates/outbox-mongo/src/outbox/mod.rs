//! The relay's [`OutboxStore`]: its reads (`reads.rs`), its writes (the
//! fenced writes of `fenced.rs`), retention (`retention.rs`) and the
//! operators' controls (`control.rs`).

mod control;
mod reads;
mod retention;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{Document, doc};
use outbox_core::model::{BatchId, BatchProgress, ItemId, ItemSequence, Sequence};
use outbox_core::store::{
    Backlog, Fence, ItemView, ItemWindow, OutboxItem, OutboxStore, PageWrite, PendingBatch,
    Removed, SentMark, StoreError,
};

use outbox_core::stream::StreamName;

use crate::MongoStore;
use crate::fenced::FencedWrite;

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
        self.pending_after(stream, after, limit).await
    }

    async fn backlog(&self, stream: &StreamName) -> Result<Backlog, StoreError> {
        self.backlog_of(stream).await
    }

    async fn unsent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.unsent_window(batch_id, after, limit).await
    }

    async fn unsent_items_in(
        &self,
        windows: &[ItemWindow],
    ) -> Result<Vec<Vec<OutboxItem>>, StoreError> {
        self.unsent_windows(windows).await
    }

    async fn items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<ItemView>, StoreError> {
        self.item_views(batch_id, after, limit).await
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
        self.committed_sequence(stream).await
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
        self.retry_failed(batch_id).await
    }

    async fn remove_expired(
        &self,
        stream: &StreamName,
        committed_before: Option<DateTime<Utc>>,
        dead_letters_before: Option<DateTime<Utc>>,
        abandoned_before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Removed, StoreError> {
        self.expire(
            stream,
            committed_before,
            dead_letters_before,
            abandoned_before,
            limit,
        )
        .await
    }

    async fn paused(&self, stream: &StreamName) -> Result<bool, StoreError> {
        self.paused_flag(stream).await
    }

    async fn set_paused(&self, stream: &StreamName, paused: bool) -> Result<(), StoreError> {
        self.set_paused_flag(stream, paused).await
    }
}
