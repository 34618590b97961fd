//! The replay worker against the in-memory store and a fake Pub/Sub
//! (tokio's paused clock): a position that retention removed while a job
//! ran ends the job there (nothing after it is published), and a publish
//! that keeps failing fails the job instead of holding up the stream's
//! later jobs.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchStatus, ItemSequence, Sequence};
use outbox_core::publish::OrderingKeyMode;
use outbox_core::replay::{ReplayJob, ReplayRequest, ReplayState};
use outbox_core::store::ReplayStore;
use outbox_core::stream::StreamName;
use relay::drain::PoisonPolicy;
use relay::replay::ReplaySettings;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::fakes::{FakePublisher, publishers, replica, settings, store_batches};

const SIZES: [usize; 3] = [3, 3, 3];

/// Drains `SIZES` with a runner that keeps leading; starts a replay of
/// batches 1..=3 with a worker beside it; returns when the job is no
/// longer running (bounded in virtual time).
async fn replay_until_stopped(
    store: &MemoryStore,
    publisher: &FakePublisher,
    before_replay: impl FnOnce(&MemoryStore, &[outbox_core::model::NewBatch]),
) -> ReplayJob {
    replay_at(store, publisher, None, before_replay).await
}

/// [`replay_until_stopped`] at `rate` items per second.
async fn replay_at(
    store: &MemoryStore,
    publisher: &FakePublisher,
    rate: Option<u32>,
    before_replay: impl FnOnce(&MemoryStore, &[outbox_core::model::NewBatch]),
) -> ReplayJob {
    let batches = store_batches(store, &SIZES).await;
    let replica = replica(
        store,
        publisher,
        settings("relay-a", 100, PoisonPolicy::Halt),
    );
    let leadership = replica.runner.leadership();
    let stop = CancellationToken::new();
    let runner = tokio::spawn(replica.runner.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !store
        .batch_statuses()
        .iter()
        .all(|(_, s)| *s == BatchStatus::Committed)
    {
        assert!(tokio::time::Instant::now() < deadline, "not drained");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    before_replay(store, &batches);
    let job = ReplayJob::new(
        ReplayRequest {
            stream: StreamName::default_stream(),
            from_sequence: Sequence(1),
            to_sequence: Sequence(3),
            topic: "replayed".to_owned(),
            ordering: OrderingKeyMode::Global,
            max_items_per_second: rate,
        },
        9,
        Utc::now(),
    );
    store.create_replay(&job).await.unwrap();
    let worker = tokio::spawn(relay::replay::run(
        Arc::new(store.clone()),
        publishers(publisher),
        StreamName::default_stream(),
        leadership,
        ReplaySettings {
            page_size: 100,
            poll_interval: Duration::from_millis(50),
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_secs(1),
        },
        Arc::new(Notify::new()),
        stop.clone(),
    ));
    let stopped = loop {
        let current = store.replay(&job.replay_id).await.unwrap().unwrap();
        if current.state != ReplayState::Running {
            break current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay never stopped: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.cancel();
    runner.await.unwrap();
    worker.await.unwrap();
    stopped
}

#[tokio::test(start_paused = true)]
async fn a_position_retention_removed_mid_replay_ends_the_job_there_instead_of_being_skipped() {
    let store = MemoryStore::new();
    let publisher = FakePublisher::new("relay-a");
    let job = replay_until_stopped(&store, &publisher, |store, batches| {
        // Retention removes batch 2's items first (its document last).
        store.hide_item(&batches[1].batch_id, ItemSequence(2));
    })
    .await;
    assert_eq!(job.state, ReplayState::Failed, "{job:?}");
    assert!(
        job.error.as_deref().unwrap_or_default().contains("batch 2"),
        "{job:?}"
    );
    assert_eq!(job.position.batch_sequence, Sequence(2), "{job:?}");
    // Nothing of batch 2 or after was replayed: the live drain's 9, and
    // batch 1's 3 copies.
    let delivered = publisher.delivered();
    assert_eq!(delivered.len(), 9 + 3, "{delivered:?}");
    assert!(
        delivered[9..].iter().all(|(batch, _, _)| *batch == 1),
        "{delivered:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_publish_that_keeps_failing_fails_the_job_instead_of_holding_up_the_stream() {
    let store = MemoryStore::new();
    let publisher = FakePublisher::new("relay-a");
    let job = replay_until_stopped(&store, &publisher, |_, _| publisher.set_down(true)).await;
    assert_eq!(job.state, ReplayState::Failed, "{job:?}");
    assert!(
        job.error
            .as_deref()
            .unwrap_or_default()
            .contains("10 publish attempts in a row"),
        "{job:?}"
    );
    assert_eq!(job.items_sent, 0);
    assert_eq!(
        publisher.attempts(1, 1),
        1 + 10,
        "the drain's one and the replay's ten"
    );
}

/// The rate holds from the first second, and across the job's runs: a
/// transient failure that ends a run (the job is run again from its
/// recorded position) does not start the pace afresh.
#[tokio::test(start_paused = true)]
async fn a_replay_holds_its_rate_from_the_first_second_and_across_its_runs() {
    let store = MemoryStore::new();
    let publisher = FakePublisher::new("a");
    let drained = std::sync::Mutex::new(0);
    let job = replay_at(&store, &publisher, Some(1), |_, _| {
        *drained.lock().unwrap() = publisher.delivered().len();
        // Twice in the range: the job's run ends and it is run again.
        publisher.fail_once(1, 3);
        publisher.fail_once(2, 2);
    })
    .await;
    assert_eq!(job.state, ReplayState::Done, "{job:?}");
    let from = *drained.lock().unwrap();
    let times = publisher.delivered_at();
    let copies = &times[from..];
    assert_eq!(copies.len(), 9);
    for (n, at) in copies.iter().enumerate() {
        let since = at.duration_since(copies[0]);
        assert!(
            since >= Duration::from_secs(n as u64),
            "copy {} went out {since:?} after the first: over 1 a second",
            n + 1
        );
    }
}
