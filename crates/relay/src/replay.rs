//! Replay jobs, run by the stream's leader beside its live drain.
//!
//! The leader takes the stream's running jobs oldest first and publishes
//! each one's range batch by batch, page by page, in the original order:
//! a page is published, Pub/Sub's answers awaited, then its position is
//! recorded under the stream's fence (at most every 500 ms, and at the
//! end). A new leader starts from the last recorded position: what the old
//! one published after it is published again (a duplicate, after the
//! original, on the same key), never out of order. The copies have keys
//! of their own (`ReplayJob::copy_of`), so the live stream's keys never
//! wait for a replay; a rate limit bounds what a replay takes of Pub/Sub,
//! and a page is at most a second of it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use outbox_core::model::{ItemSequence, Sequence};
use outbox_core::publish::{ItemMessage, PublishError, Publisher};
use outbox_core::replay::{ReplayJob, ReplayPosition, ReplayProgress, ReplayState};
use outbox_core::store::{Fence, PendingBatch, ReplayStore, StoreError};
use outbox_core::stream::StreamName;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::drain::Publishers;
use crate::lease::Leadership;
use crate::metrics;

/// How often a job's position is recorded while it runs: each record is a
/// fenced transaction on the stream's one fenced session, which the
/// drain's writes share.
const RECORD_EVERY: Duration = Duration::from_millis(500);
/// Transient publish failures in a row at one position before the job is
/// failed (a topic that does not exist, a permission missing: errors the
/// client calls retryable that no retry fixes), so that it does not hold
/// up the stream's later jobs; `resume` runs it again.
const TRANSIENT_FAILURES_BEFORE_FAILING: u32 = 10;
/// How often a running job is read again for an operator's pause or
/// cancel.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Batch headers read at once.
const BATCHES_PER_READ: u32 = 64;

#[derive(Clone)]
pub struct ReplaySettings {
    pub page_size: u32,
    pub poll_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing failed: {0}")]
    Publish(String),
    #[error("not the leader")]
    NotLeader,
}

/// Runs the stream's replay jobs while this replica leads it, until `stop`.
pub async fn run(
    store: Arc<dyn ReplayStore>,
    publishers: Arc<dyn Publishers>,
    stream: StreamName,
    leadership: Leadership,
    settings: ReplaySettings,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let worker = Worker {
        store,
        publishers,
        stream,
        leadership: leadership.clone(),
        settings: settings.clone(),
        failures: std::sync::Mutex::new(None),
        pace: std::sync::Mutex::new(None),
    };
    let mut changes = leadership;
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_cap);
    while !stop.is_cancelled() {
        let mut wait = settings.poll_interval;
        if worker.leadership.is_leader() {
            let result = tokio::select! {
                biased;
                result = worker.run_jobs() => result,
                () = stop.cancelled() => Ok(()),
            };
            match result {
                Ok(()) => backoff.reset(),
                Err(error) => {
                    wait = backoff.next_delay();
                    warn!(message = "replay failed; retrying from its last recorded position", stream = %worker.stream, %error, retry_in_ms = wait.as_millis() as u64);
                }
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => {}
            () = wake.notified() => {}
            () = changes.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

struct Worker {
    store: Arc<dyn ReplayStore>,
    publishers: Arc<dyn Publishers>,
    stream: StreamName,
    leadership: Leadership,
    settings: ReplaySettings,
    /// The job and position of the last transient failure, and how many
    /// came in a row there.
    failures: std::sync::Mutex<Option<(ReplayPosition, String, u32)>>,
    /// The pace of the job last run: kept when the job is run again (after
    /// a failure, a pause check), so its rate holds across the runs, from
    /// the first second on.
    pace: std::sync::Mutex<Option<(String, Pace)>>,
}

/// Items per second at most: waits before each page until the items sent
/// so far are due.
struct Pace {
    rate: Option<u32>,
    start: Instant,
    sent: u64,
}

impl Pace {
    async fn take(&mut self, items: usize) {
        if let Some(rate) = self.rate.filter(|r| *r > 0) {
            let due = self.start + Duration::from_secs_f64(self.sent as f64 / f64::from(rate));
            tokio::time::sleep_until(due).await;
        }
        self.sent += items as u64;
    }
}

impl Worker {
    fn fence(&self) -> Result<Fence, ReplayError> {
        self.leadership.fence().ok_or(ReplayError::NotLeader)
    }

    /// Every running job of the stream, oldest first, each to its end (or
    /// until paused, cancelled or failed).
    async fn run_jobs(&self) -> Result<(), ReplayError> {
        loop {
            let Some(job) = self
                .store
                .running_replays(&self.stream)
                .await?
                .into_iter()
                .next()
            else {
                return Ok(());
            };
            self.run_job(job).await?;
        }
    }

    async fn run_job(&self, mut job: ReplayJob) -> Result<(), ReplayError> {
        info!(message = "replaying", replay_id = %job.replay_id, stream = %self.stream, from = job.position.batch_sequence.0, after = job.position.after.0, to = job.to_sequence.0, topic = %job.topic);
        let publisher = self.publishers.for_topic(&job.topic);
        let id = job.replay_id.to_string();
        let kept = self
            .pace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .filter(|(of, pace)| *of == id && pace.rate == job.max_items_per_second);
        let mut pace = kept.map_or_else(
            || Pace {
                rate: job.max_items_per_second,
                start: Instant::now(),
                sent: 0,
            },
            |(_, pace)| pace,
        );
        let result = self.run_job_paced(&mut job, &*publisher, &mut pace).await;
        *self
            .pace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((id, pace));
        result
    }

    async fn run_job_paced(
        &self,
        job: &mut ReplayJob,
        publisher: &dyn outbox_core::publish::Publisher,
        pace: &mut Pace,
    ) -> Result<(), ReplayError> {
        // A page is at most a second of the rate.
        let page_size = job
            .max_items_per_second
            .map_or(self.settings.page_size, |r| {
                r.clamp(1, self.settings.page_size)
            });
        let mut recorded = Instant::now();
        let mut checked = Instant::now();
        loop {
            if checked.elapsed() >= CHECK_EVERY {
                checked = Instant::now();
                match self.store.replay(&job.replay_id).await? {
                    Some(current) if current.state == ReplayState::Running => {}
                    _ => {
                        // Paused or cancelled: what was published is
                        // recorded (its progress shows where it stopped).
                        self.record(job, false).await?;
                        return Ok(());
                    }
                }
            }
            if job.position.batch_sequence > job.to_sequence {
                self.record(job, true).await?;
                info!(message = "replay done", replay_id = %job.replay_id, items = job.items_sent, batches = job.batches_sent);
                return Ok(());
            }
            let batches = self
                .store
                .committed_batches(
                    &self.stream,
                    job.position.batch_sequence,
                    job.to_sequence,
                    BATCHES_PER_READ,
                )
                .await?;
            if batches.first().map(|b| b.batch_sequence) != Some(job.position.batch_sequence) {
                let error = format!(
                    "batch {} of the range is no longer held: retention removed it",
                    job.position.batch_sequence
                );
                return self.fail(job, &error).await;
            }
            for batch in batches {
                if batch.batch_sequence != job.position.batch_sequence
                    || checked.elapsed() >= CHECK_EVERY
                {
                    // Read the batches (or the job) again before going on.
                    break;
                }
                while u64::from(job.position.after.0) < batch.total_items {
                    let left = batch.total_items - u64::from(job.position.after.0);
                    let limit = u32::try_from(left.min(u64::from(page_size))).unwrap_or(page_size);
                    let items = match self
                        .store
                        .sent_items(&batch.batch_id, job.position.after, limit)
                        .await
                    {
                        Ok(items) => items,
                        Err(StoreError::Incomplete(_) | StoreError::NotFound(_)) => {
                            // Retention removed it while the job ran:
                            // nothing past it may be published.
                            let error = format!(
                                "batch {} of the range is no longer held (retention removed it)",
                                batch.batch_sequence
                            );
                            return self.fail(job, &error).await;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    pace.take(items.len()).await;
                    // Never publish under a lease that lapsed: a successor
                    // may be publishing from the recorded position.
                    self.fence()?;
                    if let Err(failure) = self.publish(job, &batch, &items, publisher).await {
                        return match failure {
                            PublishError::Permanent(error) => self.fail(job, &error).await,
                            PublishError::Transient(error) => {
                                if self.transient_failure(job) >= TRANSIENT_FAILURES_BEFORE_FAILING
                                {
                                    let error = format!(
                                        "{TRANSIENT_FAILURES_BEFORE_FAILING} publish attempts in a row failed at batch {} position {}: {error}",
                                        job.position.batch_sequence,
                                        job.position.after.0 + 1
                                    );
                                    return self.fail(job, &error).await;
                                }
                                self.record(job, false).await?;
                                Err(ReplayError::Publish(error))
                            }
                        };
                    }
                    self.clear_failures();
                    job.position.after = ItemSequence(job.position.after.0 + limit);
                    job.items_sent += u64::from(limit);
                    ::metrics::counter!(metrics::REPLAYED, "stream" => self.stream.to_string())
                        .increment(items.len() as u64);
                    if recorded.elapsed() >= RECORD_EVERY {
                        self.record(job, false).await?;
                        recorded = Instant::now();
                    }
                    if checked.elapsed() >= CHECK_EVERY {
                        break;
                    }
                }
                if u64::from(job.position.after.0) < batch.total_items {
                    // Read the job again before going on.
                    break;
                }
                job.batches_sent += 1;
                job.position = ReplayPosition {
                    batch_sequence: Sequence(batch.batch_sequence.0 + 1),
                    after: ItemSequence(0),
                };
            }
        }
    }

    /// Counts a transient failure at the job's position; how many came in
    /// a row there.
    fn transient_failure(&self, job: &ReplayJob) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = match &*failures {
            Some((position, id, n))
                if *position == job.position && id == job.replay_id.as_str() =>
            {
                n + 1
            }
            _ => 1,
        };
        *failures = Some((job.position, job.replay_id.to_string(), count));
        count
    }

    fn clear_failures(&self) {
        *self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Publishes a page's copies and waits for every answer.
    async fn publish(
        &self,
        job: &ReplayJob,
        batch: &PendingBatch,
        items: &[outbox_core::store::OutboxItem],
        publisher: &dyn Publisher,
    ) -> Result<(), PublishError> {
        // Every copy is checked before any is handed to the client: a page
        // is published whole or not at all.
        let mut messages = Vec::with_capacity(items.len());
        let mut keys = Vec::new();
        for item in items {
            let message = job.copy_of(ItemMessage::of(item, batch).build(&job.ordering));
            message.check_limits().map_err(|e| {
                PublishError::Permanent(format!("item {}: {e}", item.item_sequence))
            })?;
            if let Some(key) = &message.ordering_key
                && !keys.contains(key)
            {
                keys.push(key.clone());
            }
            messages.push(message);
        }
        let pending: Vec<_> = messages.into_iter().map(|m| publisher.publish(m)).collect();
        let results = join_all(pending).await;
        if let Some(error) = results.into_iter().find_map(Result::err) {
            // The client paused these keys: the retry starts from the
            // recorded position, on resumed keys.
            for key in &keys {
                publisher.resume(key);
            }
            return Err(error);
        }
        Ok(())
    }

    async fn record(&self, job: &ReplayJob, done: bool) -> Result<(), ReplayError> {
        let progress = ReplayProgress {
            replay_id: job.replay_id.clone(),
            position: job.position,
            items_sent: job.items_sent,
            batches_sent: job.batches_sent,
            done,
        };
        self.store.record_replay(&self.fence()?, &progress).await?;
        Ok(())
    }

    async fn fail(&self, job: &mut ReplayJob, error: &str) -> Result<(), ReplayError> {
        warn!(message = "replay failed", replay_id = %job.replay_id, stream = %self.stream, error);
        self.record(job, false).await?;
        self.store
            .fail_replay(&self.fence()?, &job.replay_id, error)
            .await?;
        job.state = ReplayState::Failed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pace_holds_the_rate() {
        let start = Instant::now();
        let mut pace = Pace {
            rate: Some(100),
            start,
            sent: 0,
        };
        for _ in 0..5 {
            pace.take(100).await;
        }
        // 500 items at 100/s: the fifth page is due after 4 s.
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        let mut free = Pace {
            rate: None,
            start,
            sent: 0,
        };
        free.take(1_000_000).await;
        assert_eq!(start.elapsed(), Duration::from_secs(4));
    }
}
