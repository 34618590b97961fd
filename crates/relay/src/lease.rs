//! Keeping the leader lease: acquire, renew about every TTL/3, and stop
//! calling ourselves leader *before* the lease can expire in the store.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::store::{Fence, Lease, LeaseStore};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A lease this replica holds, and until when it may act on it.
#[derive(Clone, Debug)]
pub struct Held {
    pub lease: Lease,
    /// Renewal request start + TTL - safety margin: past this instant we stop
    /// publishing even if nobody has taken over yet.
    pub valid_until: Instant,
}

/// This replica's view of its leadership.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<Option<Held>>,
}

impl Leadership {
    /// A fence to write with, while the lease is held and locally valid.
    pub fn fence(&self) -> Option<Fence> {
        self.rx
            .borrow()
            .as_ref()
            .filter(|held| Instant::now() < held.valid_until)
            .map(|held| held.lease.fence())
    }

    pub fn is_leader(&self) -> bool {
        self.fence().is_some()
    }

    /// The lease we hold, even if it lapsed locally.
    pub fn held(&self) -> Option<Held> {
        self.rx.borrow().clone()
    }

    /// The epoch held, and whether it may be written with now.
    fn role(&self) -> (Option<u64>, bool) {
        let epoch = self.rx.borrow().as_ref().map(|held| held.lease.epoch);
        (epoch, self.is_leader())
    }

    /// Resolves when leadership changed: gained, lost, a new epoch, or
    /// usable again after a lapse. A renewal that only extends the lease
    /// does not count: the loops waiting here would otherwise run a pass
    /// (and its reads) at every renewal.
    pub async fn changed(&mut self) {
        let before = self.role();
        loop {
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if self.role() != before {
                return;
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The stream whose lease this is.
    pub stream: outbox_core::stream::StreamName,
    pub holder: String,
    pub ttl: Duration,
    /// How often a standby tries to take the lease.
    pub standby_poll: Duration,
}

impl LeaseSettings {
    fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Stop acting on a lease this long before it expires in the store:
    /// a fifth of the TTL, covering clock skew between replicas and the time
    /// an in-flight page takes.
    fn safety_margin(&self) -> Duration {
        self.ttl / 5
    }
}

/// Runs the lease loop until `shutdown`, then releases the lease (after the
/// caller has stopped draining, see [`LeaseKeeper::release`]).
pub struct LeaseKeeper {
    store: Arc<dyn LeaseStore>,
    settings: LeaseSettings,
    tx: watch::Sender<Option<Held>>,
}

impl LeaseKeeper {
    pub fn new(store: Arc<dyn LeaseStore>, settings: LeaseSettings) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                store,
                settings,
                tx,
            },
            Leadership { rx },
        )
    }

    /// One acquire-or-renew round; returns how long to wait for the next.
    pub async fn round(&self) -> Duration {
        let started = Instant::now();
        let ttl_ms = i64::try_from(self.settings.ttl.as_millis()).unwrap_or(i64::MAX);
        let was = self.tx.borrow().as_ref().map(|h| h.lease.epoch);
        // A store that does not answer at all (frozen, partitioned) must not
        // stall the loop: the round gives up after half the TTL.
        // Expiry is judged by the store's clock (MongoDB's primary's), the
        // same for every replica.
        let round = tokio::time::timeout(self.settings.ttl / 2, async {
            let now_ms = self.store.now_ms().await?;
            self.store
                .acquire_or_renew(&self.settings.stream, &self.settings.holder, now_ms, ttl_ms)
                .await
        });
        let result = round.await.unwrap_or_else(|_| {
            Err(outbox_core::store::StoreError::Unavailable(
                "the lease operation did not answer within half the TTL".to_owned(),
            ))
        });
        match result {
            Ok(Some(lease)) => {
                if was != Some(lease.epoch) {
                    info!(message = "became leader", stream = %lease.stream, holder = %lease.holder, epoch = lease.epoch);
                }
                let valid_until = started + self.settings.ttl - self.settings.safety_margin();
                self.tx.send_replace(Some(Held { lease, valid_until }));
                self.settings.renew_every()
            }
            Ok(None) => {
                if was.is_some() {
                    warn!(message = "lost the lease to another replica", stream = %self.settings.stream);
                }
                self.tx.send_replace(None);
                self.settings.standby_poll.min(self.settings.renew_every())
            }
            Err(error) => {
                // Keep what we had: it lapses by itself at valid_until.
                warn!(message = "cannot renew the lease", %error);
                self.tx.send_modify(|_| {});
                self.settings.standby_poll.min(self.settings.renew_every())
            }
        }
    }

    /// Renews until `shutdown` is cancelled.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            let wait = self.round().await;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&self) {
        let held = self.tx.send_replace(None);
        if let Some(held) = held {
            match self.store.release(&held.lease.fence()).await {
                Ok(()) => {
                    info!(message = "released the lease", stream = %held.lease.stream, epoch = held.lease.epoch)
                }
                Err(error) => warn!(message = "cannot release the lease; it will expire", %error),
            }
        }
    }
}
