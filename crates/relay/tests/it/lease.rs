//! Leadership: one publisher at a time, takeover after a crash, and a
//! replica that cannot renew stops publishing before its lease expires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchStatus, ItemStatus};
use outbox_core::store::{Fence, Lease, LeaseStore, StoreError};
use relay::drain::PoisonPolicy;
use relay::runner::Runner;
use relay::status::StatusBoard;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fakes::{
    FakePublisher, expected_order, first_deliveries, replica, settings, store_batches,
};

fn all_committed(store: &MemoryStore) -> bool {
    store
        .batch_statuses()
        .iter()
        .all(|(_, s)| *s == BatchStatus::Committed)
}

async fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn two_relays_never_both_publish() {
    let store = MemoryStore::new();
    let sizes = [5, 5, 5, 5];
    store_batches(&store, &sizes).await;
    let a = FakePublisher::new("a");
    let b = a.replica("b");
    let stop = CancellationToken::new();
    let first = replica(&store, &a, settings("relay-a", 2, PoisonPolicy::Halt));
    let second = replica(&store, &b, settings("relay-b", 2, PoisonPolicy::Halt));
    let tasks = [
        tokio::spawn(first.runner.run(stop.clone())),
        tokio::spawn(second.runner.run(stop.clone())),
    ];
    wait_for("the backlog to drain", Duration::from_secs(120), || {
        all_committed(&store)
    })
    .await;
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    let delivered = a.delivered();
    let publishers: std::collections::BTreeSet<_> = delivered.iter().map(|d| d.2.clone()).collect();
    assert_eq!(
        publishers.len(),
        1,
        "both replicas published: {delivered:?}"
    );
    let (firsts, duplicates) = first_deliveries(&delivered);
    assert_eq!((firsts, duplicates), (expected_order(&sizes), 0));
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_within_ttl_plus_one_poll_after_the_leader_dies() {
    let store = MemoryStore::new();
    store_batches(&store, &[3]).await;
    let a = FakePublisher::new("a");
    let b = a.replica("b");
    let leader = replica(&store, &a, settings("relay-a", 10, PoisonPolicy::Halt));
    let leader_task = tokio::spawn(leader.runner.run(CancellationToken::new()));
    wait_for("the first batch", Duration::from_secs(30), || {
        all_committed(&store)
    })
    .await;
    let standby = replica(&store, &b, settings("relay-b", 10, PoisonPolicy::Halt));
    let stop = CancellationToken::new();
    let standby_task = tokio::spawn(standby.runner.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The leader dies without releasing its lease; new work arrives.
    leader_task.abort();
    let died = Instant::now();
    store_batches(&store, &[2]).await;
    wait_for("the standby to publish", Duration::from_secs(60), || {
        b.delivered().iter().any(|d| d.2 == "b")
    })
    .await;
    let takeover = died.elapsed();
    // TTL 10 s, poll 1 s; the dead leader last renewed up to TTL/3 before dying.
    assert!(
        takeover <= Duration::from_secs(11),
        "takeover took {takeover:?}"
    );
    stop.cancel();
    standby_task.await.unwrap();
    let (firsts, duplicates) = first_deliveries(&a.delivered());
    assert_eq!((firsts, duplicates), (expected_order(&[3, 2]), 0));
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_the_lease_for_an_immediate_takeover() {
    let store = MemoryStore::new();
    let a = FakePublisher::new("a");
    let b = a.replica("b");
    let leader = replica(&store, &a, settings("relay-a", 10, PoisonPolicy::Halt));
    let stop_leader = CancellationToken::new();
    let leader_task = tokio::spawn(leader.runner.run(stop_leader.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let standby = replica(&store, &b, settings("relay-b", 10, PoisonPolicy::Halt));
    let stop = CancellationToken::new();
    let standby_task = tokio::spawn(standby.runner.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        store
            .current(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
            .unwrap()
            .holder,
        "relay-a"
    );

    stop_leader.cancel();
    leader_task.await.unwrap();
    let released = Instant::now();
    store_batches(&store, &[1]).await;
    wait_for("the standby to publish", Duration::from_secs(10), || {
        !b.delivered().is_empty()
    })
    .await;
    assert!(
        released.elapsed() <= Duration::from_secs(2),
        "took {:?}",
        released.elapsed()
    );
    stop.cancel();
    standby_task.await.unwrap();
}

/// A lease store a test can cut one replica off from.
struct Partitioned {
    inner: MemoryStore,
    cut: Arc<AtomicBool>,
}

#[async_trait]
impl LeaseStore for Partitioned {
    async fn now_ms(&self) -> Result<i64, StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("partitioned".into()));
        }
        self.inner.now_ms().await
    }

    async fn acquire_or_renew(
        &self,
        stream: &outbox_core::stream::StreamName,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("partitioned".into()));
        }
        self.inner
            .acquire_or_renew(stream, holder, now_ms, ttl_ms)
            .await
    }

    async fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        self.inner.release(fence).await
    }

    async fn current(
        &self,
        stream: &outbox_core::stream::StreamName,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.current(stream).await
    }

    async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.inner.leases().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_publishing_before_its_lease_expires() {
    let store = MemoryStore::new();
    let a = FakePublisher::new("a");
    let b = a.replica("b");
    let cut = Arc::new(AtomicBool::new(false));
    let leader = Runner::new(
        Arc::new(store.clone()),
        Arc::new(Partitioned {
            inner: store.clone(),
            cut: Arc::clone(&cut),
        }),
        crate::fakes::publishers(&a),
        settings("relay-a", 1, PoisonPolicy::Halt),
        Arc::new(StatusBoard::default()),
        Arc::new(Notify::new()),
    );
    let stop = CancellationToken::new();
    let leader_task = tokio::spawn(leader.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let epoch = store
        .current(&outbox_core::stream::StreamName::default())
        .await
        .unwrap()
        .unwrap()
        .epoch;

    // Cut the leader off from renewing; it can still reach everything else.
    cut.store(true, Ordering::SeqCst);
    let standby = replica(&store, &b, settings("relay-b", 1, PoisonPolicy::Halt));
    let standby_task = tokio::spawn(standby.runner.run(stop.clone()));
    // Work keeps arriving, one item at a time.
    for _ in 0..40 {
        store_batches(&store, &[1]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for("the backlog to drain", Duration::from_secs(60), || {
        all_committed(&store)
    })
    .await;
    stop.cancel();
    leader_task.await.unwrap();
    standby_task.await.unwrap();

    let lease = store
        .current(&outbox_core::stream::StreamName::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("relay-b", epoch + 1));
    let delivered = a.delivered();
    let first_b = delivered
        .iter()
        .position(|d| d.2 == "b")
        .expect("the standby took over");
    assert!(
        delivered[first_b..].iter().all(|d| d.2 == "b"),
        "the old leader published after the takeover: {delivered:?}"
    );
    let (firsts, duplicates) = first_deliveries(&delivered);
    assert_eq!(firsts.len(), 40);
    assert_eq!(duplicates, 0);
}

/// A stop request waits for the page in flight, but not for ever: with a
/// Pub/Sub that never answers, the replica stops after its grace period.
#[tokio::test(start_paused = true)]
async fn a_stop_does_not_wait_forever_for_a_publish_that_never_answers() {
    let store = MemoryStore::new();
    store_batches(&store, &[5]).await;
    let publisher = FakePublisher::new("frozen");
    publisher.set_hang(true);
    let leader = replica(
        &store,
        &publisher,
        settings("frozen", 10, PoisonPolicy::Halt),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(leader.runner.run(stop.clone()));
    wait_for("a publish to hang", Duration::from_secs(30), || {
        publisher.attempts(1, 1) > 0
    })
    .await;
    stop.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(31), task).await;
    assert!(stopped.is_ok(), "still running after the 30 s grace");
    assert!(
        store
            .all_items()
            .iter()
            .all(|(_, _, status, _)| *status == ItemStatus::Pending)
    );
}
