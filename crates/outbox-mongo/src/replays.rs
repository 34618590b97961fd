//! Replay jobs in MongoDB: one document per job in `replay_jobs`, its
//! progress written under the stream's fence (`fenced.rs`), and the reads a
//! replay publishes from (committed batches, sent items), at read concern
//! `majority` like the drain's.

use async_trait::async_trait;
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::ClientSession;
use mongodb::bson::{Bson, Document, doc};
use outbox_core::model::{BatchId, BatchStatus, ItemSequence, ItemStatus, Sequence};
use outbox_core::replay::{
    HeldRange, ReplayAction, ReplayId, ReplayJob, ReplayPosition, ReplayProgress, ReplayState,
};
use outbox_core::store::{Fence, OutboxItem, OutboxStore, PendingBatch, ReplayStore, StoreError};
use outbox_core::stream::StreamName;

use crate::documents::{bson_datetime, get_datetime, get_u64, outbox_item, pending_batch};
use crate::errors::classify;
use crate::fenced::FencedWrite;
use crate::outbox::window_ids;
use crate::{MongoStore, ids};

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn malformed(field: &str) -> StoreError {
    StoreError::Other(format!(
        "a stored replay job has a missing or malformed {field:?}"
    ))
}

fn job_document(job: &ReplayJob) -> Document {
    doc! {
        "_id": job.replay_id.as_str(),
        "stream": job.stream.as_str(),
        "from_sequence": to_i64(job.from_sequence.0),
        "to_sequence": to_i64(job.to_sequence.0),
        "topic": &job.topic,
        "ordering_key": job.ordering.to_string(),
        "max_items_per_second": job.max_items_per_second.map_or(Bson::Null, |n| Bson::Int64(i64::from(n))),
        "state": job.state.as_str(),
        "position_batch": to_i64(job.position.batch_sequence.0),
        "position_after": i64::from(job.position.after.0),
        "items_sent": to_i64(job.items_sent),
        "items_total": to_i64(job.items_total),
        "batches_sent": to_i64(job.batches_sent),
        "batches_total": to_i64(job.batches_total),
        "error": job.error.as_deref().map_or(Bson::Null, Bson::from),
        "created_at": bson_datetime(job.created_at),
        "updated_at": bson_datetime(job.updated_at),
        "running_since": bson_datetime(job.running_since),
        "items_at_running_since": to_i64(job.items_at_running_since),
    }
}

fn job(doc: &Document) -> Result<ReplayJob, StoreError> {
    let text = |field: &str| doc.get_str(field).map_err(|_| malformed(field));
    Ok(ReplayJob {
        replay_id: text("_id")?.parse().map_err(|_| malformed("_id"))?,
        stream: text("stream")?.parse().map_err(|_| malformed("stream"))?,
        from_sequence: Sequence(get_u64(doc, "from_sequence")?),
        to_sequence: Sequence(get_u64(doc, "to_sequence")?),
        topic: text("topic")?.to_owned(),
        ordering: text("ordering_key")?
            .parse()
            .map_err(|_| malformed("ordering_key"))?,
        max_items_per_second: get_u64(doc, "max_items_per_second")
            .ok()
            .and_then(|n| u32::try_from(n).ok()),
        state: text("state")?.parse().map_err(|_| malformed("state"))?,
        position: ReplayPosition {
            batch_sequence: Sequence(get_u64(doc, "position_batch")?),
            after: ItemSequence(
                u32::try_from(get_u64(doc, "position_after")?)
                    .map_err(|_| malformed("position_after"))?,
            ),
        },
        items_sent: get_u64(doc, "items_sent")?,
        items_total: get_u64(doc, "items_total")?,
        batches_sent: get_u64(doc, "batches_sent")?,
        batches_total: get_u64(doc, "batches_total")?,
        error: doc.get_str("error").ok().map(str::to_owned),
        created_at: get_datetime(doc, "created_at")?,
        updated_at: get_datetime(doc, "updated_at")?,
        running_since: get_datetime(doc, "running_since")?,
        items_at_running_since: get_u64(doc, "items_at_running_since")?,
    })
}

impl MongoStore {
    /// A job's position, in the fenced transaction; a done range ends a
    /// running job.
    pub(crate) async fn write_replay(
        &self,
        session: &mut ClientSession,
        progress: &ReplayProgress,
        now: Bson,
    ) -> Result<(), StoreError> {
        let live = [
            ReplayState::Running,
            ReplayState::Paused,
            ReplayState::Failed,
        ]
        .map(ReplayState::as_str);
        self.replays()
            .update_one(
                doc! { "_id": progress.replay_id.as_str(), "state": { "$in": live.to_vec() } },
                doc! { "$set": {
                    "position_batch": to_i64(progress.position.batch_sequence.0),
                    "position_after": i64::from(progress.position.after.0),
                    "items_sent": to_i64(progress.items_sent),
                    "batches_sent": to_i64(progress.batches_sent),
                    "updated_at": now.clone(),
                } },
            )
            .session(&mut *session)
            .await
            .map_err(classify)?;
        if progress.done {
            self.replays()
                .update_one(
                    doc! { "_id": progress.replay_id.as_str(), "state": ReplayState::Running.as_str() },
                    doc! { "$set": { "state": ReplayState::Done.as_str(), "updated_at": now } },
                )
                .session(&mut *session)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }
}

#[async_trait]
impl ReplayStore for MongoStore {
    async fn held_range(&self, stream: &StreamName) -> Result<HeldRange, StoreError> {
        let committed_through = self.committed_through(stream).await?.map_or(0, |s| s.0);
        let first = self
            .batches()
            .find_one(doc! { "stream": ids::field(stream) })
            .sort(doc! { "batch_sequence": 1 })
            .projection(doc! { "batch_sequence": 1 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        Ok(HeldRange {
            first: first
                .as_ref()
                .map(|b| get_u64(b, "batch_sequence").map(Sequence))
                .transpose()?,
            committed_through,
        })
    }

    async fn range_totals(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
    ) -> Result<(u64, u64), StoreError> {
        let batches: Vec<Document> = self
            .batches()
            .find(doc! {
                "stream": ids::field(stream),
                "batch_sequence": { "$gte": to_i64(from.0), "$lte": to_i64(to.0) },
            })
            .projection(doc! { "total_items": 1 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        let items = batches
            .iter()
            .map(|b| get_u64(b, "total_items"))
            .sum::<Result<u64, _>>()?;
        Ok((batches.len() as u64, items))
    }

    async fn create_replay(&self, job: &ReplayJob) -> Result<(), StoreError> {
        self.replays()
            .insert_one(job_document(job))
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn replay(&self, id: &ReplayId) -> Result<Option<ReplayJob>, StoreError> {
        self.replays()
            .find_one(doc! { "_id": id.as_str() })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?
            .as_ref()
            .map(job)
            .transpose()
    }

    async fn replays(
        &self,
        stream: Option<&StreamName>,
        limit: u32,
    ) -> Result<Vec<ReplayJob>, StoreError> {
        let filter = stream.map_or_else(Document::new, |s| doc! { "stream": s.as_str() });
        let cursor = self
            .replays()
            .find(filter)
            .sort(doc! { "created_at": -1 })
            .limit(i64::from(limit))
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        self.collect(cursor, job).await
    }

    async fn running_replays(&self, stream: &StreamName) -> Result<Vec<ReplayJob>, StoreError> {
        let cursor = self
            .replays()
            .find(doc! { "stream": stream.as_str(), "state": ReplayState::Running.as_str() })
            .sort(doc! { "created_at": 1 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        self.collect(cursor, job).await
    }

    async fn act_on_replay(
        &self,
        id: &ReplayId,
        action: ReplayAction,
    ) -> Result<Option<ReplayJob>, StoreError> {
        let (from, to) = action.transition();
        let now = bson_datetime(Utc::now());
        let mut set = doc! { "state": to.as_str(), "updated_at": now.clone() };
        if action == ReplayAction::Resume {
            // The rate is measured from here: from the items sent so far,
            // read just before (no update pipelines: MongoDB 6 has them,
            // the stand-in does not). A progress write in between only
            // makes the first rate reading a little high.
            let Some(current) = self.replay(id).await? else {
                return Ok(None);
            };
            set.insert("running_since", now);
            set.insert("items_at_running_since", to_i64(current.items_sent));
            set.insert("error", Bson::Null);
        }
        let states: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        self.replays()
            .update_one(
                doc! { "_id": id.as_str(), "state": { "$in": states } },
                doc! { "$set": set },
            )
            .await
            .map_err(classify)?;
        self.replay(id).await
    }

    async fn record_replay(
        &self,
        fence: &Fence,
        progress: &ReplayProgress,
    ) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::Replay(progress)).await
    }

    async fn fail_replay(
        &self,
        fence: &Fence,
        id: &ReplayId,
        error: &str,
    ) -> Result<(), StoreError> {
        self.fenced(fence, FencedWrite::ReplayFailed(id, error))
            .await
    }

    async fn committed_batches(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        let cursor = self
            .batches()
            .find(doc! { "$and": [
                { "stream": ids::field(stream) },
                { "batch_sequence": { "$gte": to_i64(from.0), "$lte": to_i64(to.0) } },
            ] })
            .sort(doc! { "batch_sequence": 1 })
            .limit(i64::from(limit))
            .projection(doc! { "vendor_counts": 0 })
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?;
        let batches = self.collect(cursor, pending_batch).await?;
        // Up to the first that is not committed (a range is checked to be
        // committed when the job starts; a retried batch would not be).
        Ok(batches
            .into_iter()
            .take_while(|b| b.status == BatchStatus::Committed)
            .collect())
    }

    async fn sent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        // By primary key, as the drain's windows.
        let first = u64::from(after.0) + 1;
        let ids = window_ids(batch_id, after, limit);
        // Every position of the window, whatever its status: one that is
        // gone (retention got there first) must end the replay, not be
        // skipped.
        let documents: Vec<Document> = self
            .items()
            .find(doc! { "_id": { "$in": &ids } })
            .batch_size(u32::try_from(ids.len()).unwrap_or(u32::MAX))
            .read_concern(crate::read_concern())
            .await
            .map_err(classify)?
            .try_collect()
            .await
            .map_err(classify)?;
        let present: std::collections::HashSet<&str> = documents
            .iter()
            .filter(|d| d.get_str("batch_id").is_ok_and(|b| b == batch_id.as_str()))
            .filter_map(|d| d.get_str("_id").ok())
            .collect();
        if let Some(missing) = ids.iter().position(|id| !present.contains(id.as_str())) {
            return Err(StoreError::Incomplete(format!(
                "batch {batch_id} has no item {}",
                first + missing as u64
            )));
        }
        let mut items = documents
            .iter()
            .filter(|d| d.get_str("status") == Ok(ItemStatus::Sent.as_str()))
            .map(outbox_item)
            .collect::<Result<Vec<_>, _>>()?;
        items.retain(|i| &i.batch_id == batch_id);
        items.sort_by_key(|i| i.item_sequence);
        Ok(items)
    }
}
