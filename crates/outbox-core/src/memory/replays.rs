//! The in-memory model's replay jobs.

use async_trait::async_trait;

use super::{MemoryStore, StoredBatch};
use crate::model::{BatchId, BatchStatus, ItemSequence, ItemStatus, Sequence};
use crate::replay::{HeldRange, ReplayAction, ReplayId, ReplayJob, ReplayProgress, ReplayState};
use crate::store::{Fence, OutboxItem, OutboxStore, PendingBatch, ReplayStore, StoreError};
use crate::stream::StreamName;

#[async_trait]
impl ReplayStore for MemoryStore {
    async fn held_range(&self, stream: &StreamName) -> Result<HeldRange, StoreError> {
        let committed_through = self.committed_through(stream).await?.map_or(0, |s| s.0);
        let state = self.lock();
        let first = state
            .streams
            .get(stream)
            .and_then(|s| s.batches.keys().next().copied());
        Ok(HeldRange {
            first,
            committed_through,
        })
    }

    async fn range_totals(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
    ) -> Result<(u64, u64), StoreError> {
        self.check_available()?;
        let state = self.lock();
        let batches = state
            .streams
            .get(stream)
            .into_iter()
            .flat_map(|s| s.batches.range(from..=to));
        Ok(batches.fold((0, 0), |(b, i), (_, batch)| {
            (b + 1, i + batch.summary.total_items)
        }))
    }

    async fn create_replay(&self, job: &ReplayJob) -> Result<(), StoreError> {
        self.check_available()?;
        self.lock()
            .replays
            .insert(job.replay_id.clone(), job.clone());
        Ok(())
    }

    async fn replay(&self, id: &ReplayId) -> Result<Option<ReplayJob>, StoreError> {
        self.check_available()?;
        Ok(self.lock().replays.get(id).cloned())
    }

    async fn replays(
        &self,
        stream: Option<&StreamName>,
        limit: u32,
    ) -> Result<Vec<ReplayJob>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let mut jobs: Vec<ReplayJob> = state
            .replays
            .values()
            .filter(|j| stream.is_none_or(|s| &j.stream == s))
            .cloned()
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at));
        jobs.truncate(limit as usize);
        Ok(jobs)
    }

    async fn running_replays(&self, stream: &StreamName) -> Result<Vec<ReplayJob>, StoreError> {
        let mut jobs = self.replays(Some(stream), u32::MAX).await?;
        jobs.retain(|j| j.state == ReplayState::Running);
        jobs.reverse();
        Ok(jobs)
    }

    async fn act_on_replay(
        &self,
        id: &ReplayId,
        action: ReplayAction,
    ) -> Result<Option<ReplayJob>, StoreError> {
        self.check_available()?;
        let mut state = self.lock();
        let Some(job) = state.replays.get_mut(id) else {
            return Ok(None);
        };
        let (from, to) = action.transition();
        if from.contains(&job.state) {
            let now = crate::world::now();
            job.state = to;
            job.updated_at = now;
            if action == ReplayAction::Resume {
                job.error = None;
                job.running_since = now;
                job.items_at_running_since = job.items_sent;
            }
        }
        Ok(Some(job.clone()))
    }

    async fn record_replay(
        &self,
        fence: &Fence,
        progress: &ReplayProgress,
    ) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        if let Some(job) = state.replays.get_mut(&progress.replay_id)
            && !job.state.is_final()
        {
            job.position = progress.position;
            job.items_sent = progress.items_sent;
            job.batches_sent = progress.batches_sent;
            job.updated_at = crate::world::now();
            if progress.done && job.state == ReplayState::Running {
                job.state = ReplayState::Done;
            }
        }
        Ok(())
    }

    async fn fail_replay(
        &self,
        fence: &Fence,
        id: &ReplayId,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.fenced(fence)?;
        if let Some(job) = state.replays.get_mut(id)
            && job.state == ReplayState::Running
        {
            job.state = ReplayState::Failed;
            job.error = Some(error.to_owned());
            job.updated_at = crate::world::now();
        }
        Ok(())
    }

    async fn committed_batches(
        &self,
        stream: &StreamName,
        from: Sequence,
        to: Sequence,
        limit: u32,
    ) -> Result<Vec<PendingBatch>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        Ok(state
            .streams
            .get(stream)
            .into_iter()
            .flat_map(|s| s.batches.range(from..=to))
            .map(|(_, b)| b)
            .take_while(|b| b.status == BatchStatus::Committed)
            .take(limit as usize)
            .map(StoredBatch::pending)
            .collect())
    }

    async fn sent_items(
        &self,
        batch_id: &BatchId,
        after: ItemSequence,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.check_available()?;
        let state = self.lock();
        let batch = state
            .batch(batch_id)
            .ok_or_else(|| StoreError::NotFound(batch_id.clone()))?;
        // As the drain's windows: a position that is gone ends the replay.
        Ok(batch
            .window(after, limit)?
            .into_iter()
            .filter(|i| i.status == ItemStatus::Sent)
            .map(|i| i.item.clone())
            .collect())
    }
}
