//! One stream's loop: keep its lease, honour its pause, drain it when
//! leader, sleep until woken (change stream or poll interval), back off on
//! errors. The cluster (`cluster.rs`) runs one for each stream this replica
//! may lead, and stops it (finishing the page in flight, releasing the
//! lease) to hand the stream over.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::store::{LeaseStore, OutboxStore};
use outbox_core::stream::StreamName;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::backoff::Backoff;
use crate::drain::{DrainError, DrainSettings, Drainer, Pass, Publishers};
use crate::lease::{Leadership, LeaseKeeper, LeaseSettings};
use crate::metrics;
use crate::status::StatusBoard;

#[derive(Clone, Debug)]
pub struct RunnerSettings {
    pub drain: DrainSettings,
    pub lease: LeaseSettings,
    pub poll_interval: Duration,
    /// Bounds for the backoff after failed passes.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// After a stop request, how long the page in flight may take; past it
    /// the replica exits anyway (a store or Pub/Sub that does not answer
    /// must not hold a shutdown: what was not marked is published again).
    pub shutdown_grace: Duration,
}

/// Everything one replica runs for one stream.
pub struct Runner {
    stream: StreamName,
    store: Arc<dyn OutboxStore>,
    drainer: Drainer,
    keeper: LeaseKeeper,
    leadership: Leadership,
    settings: RunnerSettings,
    status: Arc<StatusBoard>,
    wake: Arc<Notify>,
}

impl Runner {
    pub fn new(
        store: Arc<dyn OutboxStore>,
        lease_store: Arc<dyn LeaseStore>,
        publishers: Arc<dyn Publishers>,
        settings: RunnerSettings,
        status: Arc<StatusBoard>,
        wake: Arc<Notify>,
    ) -> Self {
        let (keeper, leadership) = LeaseKeeper::new(lease_store, settings.lease.clone());
        let drainer = Drainer::new(
            Arc::clone(&store),
            publishers,
            settings.drain.clone(),
            Arc::clone(&status),
        );
        Self {
            stream: settings.drain.stream(),
            store,
            drainer,
            keeper,
            leadership,
            settings,
            status,
            wake,
        }
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.clone()
    }

    /// Runs until `shutdown`: the page in flight is finished and marked, then
    /// the lease is released so a standby takes over at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let keeper_stop = CancellationToken::new();
        let keeper = async {
            self.keeper.run(keeper_stop.clone()).await;
        };
        let drain = async {
            let gave_up = async {
                shutdown.cancelled().await;
                tokio::time::sleep(self.settings.shutdown_grace).await;
            };
            tokio::select! {
                biased;
                () = self.drain_loop(&shutdown) => {}
                () = gave_up => warn!(
                    message = "the page in flight did not finish in time; stopping anyway (unmarked items are published again)",
                    grace_seconds = self.settings.shutdown_grace.as_secs()
                ),
            }
            keeper_stop.cancel();
        };
        tokio::join!(
            keeper.instrument(info_span!("lease")),
            drain.instrument(info_span!("drain"))
        );
        // Releasing lets a standby take over at once; if the store does not
        // answer, the lease simply expires.
        let release = tokio::time::timeout(self.settings.lease.ttl / 2, self.keeper.release());
        if release.await.is_err() {
            warn!(message = "cannot release the lease in time; it will expire");
        }
        // What this replica reported for the stream goes back to zero, so a
        // stream that moved on is not reported halted or lagging here
        // (alerts take the maximum per stream over the replicas).
        let stream = self.stream.to_string();
        for gauge in [
            metrics::IS_LEADER,
            metrics::LEASE_EPOCH,
            metrics::HALTED,
            metrics::PAUSED,
            metrics::PENDING_BATCHES,
            metrics::OLDEST_PENDING_AGE,
        ] {
            ::metrics::gauge!(gauge, "stream" => stream.clone()).set(0.0);
        }
        info!(message = "stopped draining the stream", stream = %self.stream);
    }

    async fn drain_loop(&self, shutdown: &CancellationToken) {
        let mut backoff = Backoff::new(self.settings.backoff_base, self.settings.backoff_cap);
        let mut leadership = self.leadership.clone();
        let mut last_backlog = None::<tokio::time::Instant>;
        while !shutdown.is_cancelled() {
            let wait = match self.tick(shutdown, &mut last_backlog).await {
                Ok(()) => {
                    backoff.reset();
                    self.settings.poll_interval
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    warn!(message = "drain pass failed; backing off", stream = %self.stream, %error, retry_in_ms = delay.as_millis() as u64);
                    self.status.record_error(&error);
                    let kind = match error {
                        DrainError::Publish(_) | DrainError::Gap { .. } => None,
                        DrainError::NotLeader => Some("fenced"),
                        DrainError::Store(_) => Some("store"),
                    };
                    if let Some(kind) = kind {
                        ::metrics::counter!(metrics::STORE_ERRORS, "kind" => kind, "stream" => self.stream.to_string()).increment(1);
                    }
                    delay
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = self.wake.notified() => {}
                () = leadership.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One wake-up: drain batch after batch while leader and not paused.
    async fn tick(
        &self,
        shutdown: &CancellationToken,
        last_backlog: &mut Option<tokio::time::Instant>,
    ) -> Result<(), DrainError> {
        let held = self.leadership.held();
        let stream = self.stream.to_string();
        ::metrics::gauge!(metrics::IS_LEADER, "stream" => stream.clone()).set(
            if self.leadership.is_leader() {
                1.0
            } else {
                0.0
            },
        );
        if let Some(held) = &held {
            ::metrics::gauge!(metrics::LEASE_EPOCH, "stream" => stream)
                .set(held.lease.epoch as f64);
        }
        let paused = self.store.paused(&self.stream).await?;
        self.status.update(|s| s.paused = paused);
        ::metrics::gauge!(metrics::PAUSED, "stream" => self.stream.to_string()).set(if paused {
            1.0
        } else {
            0.0
        });
        // Every replica reports the backlog, at most once a second.
        if last_backlog.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            self.refresh_backlog().await?;
            *last_backlog = Some(tokio::time::Instant::now());
        }
        if paused || !self.leadership.is_leader() {
            return Ok(());
        }
        let drained = self.drain_batches(shutdown, last_backlog).await;
        // Whatever stopped the draining, the page write in flight is done
        // (or its failure known) before we pause, stop or give up the lease.
        let settled = self.drainer.settle().await;
        drained.and(settled)
    }

    async fn drain_batches(
        &self,
        shutdown: &CancellationToken,
        last_backlog: &mut Option<tokio::time::Instant>,
    ) -> Result<(), DrainError> {
        loop {
            match self.drainer.pass(&self.leadership, shutdown).await? {
                Pass::Committed(_) if !shutdown.is_cancelled() => {
                    if last_backlog.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        self.refresh_backlog().await?;
                        *last_backlog = Some(tokio::time::Instant::now());
                    }
                    // A stop request is honoured between passes (about a
                    // second of draining; the pipeline carries on after).
                    if self.store.paused(&self.stream).await? {
                        self.status.update(|s| s.paused = true);
                        return Ok(());
                    }
                }
                Pass::Idle => {
                    self.refresh_backlog().await?;
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
    }

    async fn refresh_backlog(&self) -> Result<(), DrainError> {
        let backlog = self.store.backlog(&self.stream).await?;
        let age = backlog
            .oldest_created_at
            .map(|at| (outbox_core::world::now() - at).num_milliseconds().max(0) as f64 / 1000.0);
        let stream = self.stream.to_string();
        ::metrics::gauge!(metrics::PENDING_BATCHES, "stream" => stream.clone())
            .set(backlog.pending_batches as f64);
        ::metrics::gauge!(metrics::OLDEST_PENDING_AGE, "stream" => stream).set(age.unwrap_or(0.0));
        self.status.update(|s| {
            s.pending_batches = Some(backlog.pending_batches);
            s.oldest_pending_age_seconds = age;
        });
        Ok(())
    }
}
