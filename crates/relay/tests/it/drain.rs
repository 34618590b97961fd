//! The drain loop against the in-memory store and the fake publisher.

use std::time::Duration;

use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchStatus, ItemStatus};
use outbox_core::store::OutboxStore;
use relay::drain::PoisonPolicy;
use tokio_util::sync::CancellationToken;

use crate::fakes::{
    FakePublisher, expected_order, first_deliveries, replica, settings, store_batches,
};

/// Runs one replica until `done` holds (bounded in virtual time), then stops it.
async fn run_until(
    store: &MemoryStore,
    publisher: &FakePublisher,
    page_size: u32,
    policy: PoisonPolicy,
    done: impl Fn(&MemoryStore) -> bool,
) {
    let holder = format!("relay-{}", publisher.name());
    let replica = replica(store, publisher, settings(&holder, page_size, policy));
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !done(store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not done after 600 virtual seconds: {:?}",
            store.batch_statuses()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
}

fn all_committed(store: &MemoryStore) -> bool {
    store
        .batch_statuses()
        .iter()
        .all(|(_, s)| *s == BatchStatus::Committed)
}

#[tokio::test(start_paused = true)]
async fn drains_batches_in_order_and_marks_every_item() {
    let store = MemoryStore::new();
    let sizes = [3, 1, 5, 2];
    store_batches(&store, &sizes).await;
    let publisher = FakePublisher::new("a");
    run_until(&store, &publisher, 2, PoisonPolicy::Halt, all_committed).await;

    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, expected_order(&sizes));
    let items = store.all_items();
    assert!(
        items
            .iter()
            .all(|(_, _, status, id)| *status == ItemStatus::Sent && id.is_some())
    );
    let mut ids: Vec<_> = items.iter().filter_map(|i| i.3.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        items.len(),
        "publish ids must be the distinct ids Pub/Sub returned"
    );
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_resumes_from_the_first_unsent_item() {
    let store = MemoryStore::new();
    let sizes = [4, 6, 3];
    store_batches(&store, &sizes).await;
    let publisher = FakePublisher::new("a");
    // Item 2 of batch 2 fails; 3 and 4 of the same page fail too because the
    // ordering key is paused. They must go out again, 2 first.
    publisher.fail_once(2, 2);
    run_until(&store, &publisher, 4, PoisonPolicy::Halt, all_committed).await;

    let (firsts, duplicates) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&sizes));
    assert_eq!(duplicates, 0, "nothing acknowledged was published again");
    assert_eq!(publisher.attempts(2, 2), 2);
    assert_eq!(publisher.attempts(2, 3), 2, "the paused item was retried");
}

#[tokio::test(start_paused = true)]
async fn outages_of_pubsub_and_mongodb_end_with_everything_delivered_in_order() {
    let store = MemoryStore::new();
    let sizes = [3, 3, 3];
    store_batches(&store, &sizes).await;
    let publisher = FakePublisher::new("a");
    publisher.set_down(true);
    let replica = replica(
        &store,
        &publisher,
        settings("relay-a", 2, PoisonPolicy::Halt),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(publisher.delivered().is_empty());
    assert!(
        replica.status.snapshot().last_error.is_some(),
        "the outage is reported"
    );

    publisher.set_down(false);
    store.set_unavailable(true);
    tokio::time::sleep(Duration::from_secs(60)).await;
    store.set_unavailable(false);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !all_committed(&store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained after the outages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let (firsts, _) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&sizes));
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_publish_and_mark_republishes_only_unmarked_items() {
    let store = MemoryStore::new();
    let sizes = [4, 4];
    store_batches(&store, &sizes).await;
    let publisher = FakePublisher::new("a");
    // Batch 2's first page (items 1-2) is acknowledged, then MongoDB goes
    // away before the marks are written, and the relay "crashes".
    publisher.break_store_after(2, 2, &store);
    let first = replica(
        &store,
        &publisher,
        settings("relay-a", 2, PoisonPolicy::Halt),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(first.runner.run(stop.clone()));
    while publisher.attempts(2, 2) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    let _ = task.await;
    store.set_unavailable(false);
    // Acknowledged but not marked: batch 2's first page, and (pipelining)
    // batch 1's last page when its write was still in flight.
    let unmarked: Vec<(u64, u32)> = store
        .all_items()
        .into_iter()
        .filter(|(_, _, status, _)| *status == ItemStatus::Pending)
        .map(|(b, i, _, _)| (b.0, i.0))
        .filter(|at| publisher.attempts(at.0, at.1) > 0)
        .collect();
    assert!(
        unmarked.contains(&(2, 1)) && unmarked.contains(&(2, 2)),
        "{unmarked:?}"
    );

    // A new replica takes over once the dead one's lease expires.
    let second = publisher.replica("b");
    run_until(&store, &second, 2, PoisonPolicy::Halt, all_committed).await;
    let delivered = publisher.delivered();
    let (firsts, duplicates) = first_deliveries(&delivered);
    assert_eq!(firsts, expected_order(&sizes));
    assert_eq!(
        duplicates,
        unmarked.len(),
        "exactly the unmarked items were published again: {delivered:?}"
    );
    let republished: Vec<_> = delivered
        .iter()
        .filter(|d| d.2 == "b")
        .map(|d| (d.0, d.1))
        .filter(|at| unmarked.contains(at))
        .collect();
    assert_eq!(republished, unmarked);
}

#[tokio::test(start_paused = true)]
async fn halt_policy_fails_the_batch_stops_advancing_and_resumes_on_retry() {
    let store = MemoryStore::new();
    let sizes = [2, 3, 2];
    let batches = store_batches(&store, &sizes).await;
    let publisher = FakePublisher::new("a");
    publisher.poison(2, 2);
    let replica = replica(
        &store,
        &publisher,
        settings("relay-a", 10, PoisonPolicy::Halt),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    while replica.status.snapshot().halted.is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let statuses: Vec<_> = store.batch_statuses().into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        statuses,
        [
            BatchStatus::Committed,
            BatchStatus::Failed,
            BatchStatus::Pending
        ]
    );
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(
        delivered,
        [(1, 1), (1, 2), (2, 1)],
        "nothing after the poisoned item went out"
    );
    let halted = replica.status.snapshot().halted.unwrap();
    assert_eq!(halted.batch_id, batches[1].batch_id);
    assert!(halted.error.unwrap().contains("item 2"));

    // The operator fixes the cause and retries the batch.
    let mut fixed = publisher.replica("a");
    fixed.clear_poison();
    assert!(store.retry_batch(&batches[1].batch_id).await.unwrap());
    while !all_committed(&store) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let (firsts, duplicates) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&sizes));
    assert_eq!(duplicates, 0);
}

#[tokio::test(start_paused = true)]
async fn dead_letter_policy_sets_the_item_aside_and_goes_on() {
    let store = MemoryStore::new();
    let sizes = [2, 3, 2];
    store_batches(&store, &sizes).await;
    let publisher = FakePublisher::new("a");
    publisher.poison(2, 2);
    run_until(
        &store,
        &publisher,
        10,
        PoisonPolicy::DeadLetter,
        all_committed,
    )
    .await;
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    let expected: Vec<_> = expected_order(&sizes)
        .into_iter()
        .filter(|p| *p != (2, 2))
        .collect();
    assert_eq!(delivered, expected);
    let dead = store.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].0.batch_sequence.0, dead[0].0.item_sequence.0),
        (2, 2)
    );
    assert!(dead[0].1.contains("invalid argument"));
    let progress = store
        .batch_progress(&dead[0].0.batch_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((progress.counts.sent, progress.counts.failed), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn stop_pauses_the_cluster_and_start_resumes_it() {
    let store = MemoryStore::new();
    store_batches(&store, &[2, 2]).await;
    store
        .set_paused(&outbox_core::stream::StreamName::default(), true)
        .await
        .unwrap();
    let publisher = FakePublisher::new("a");
    let replica = replica(
        &store,
        &publisher,
        settings("relay-a", 10, PoisonPolicy::Halt),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        publisher.delivered().is_empty(),
        "a paused cluster publishes nothing"
    );
    assert!(replica.status.snapshot().paused);
    store
        .set_paused(&outbox_core::stream::StreamName::default(), false)
        .await
        .unwrap();
    while !all_committed(&store) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    assert_eq!(publisher.delivered().len(), 4);
}

/// Ordering by a field: each key's items in order, keys independent of each
/// other (a failure on one key does not hold the others back), and batch
/// N+1 only after every item of batch N was acknowledged.
#[tokio::test(start_paused = true)]
async fn field_keys_stay_in_order_each_and_batches_stay_whole_through_a_failure() {
    let store = MemoryStore::new();
    let sizes = [6, 6, 6];
    crate::fakes::store_keyed_batches(&store, &sizes, 3).await;
    let publisher = FakePublisher::new("a");
    // Batch 2's second item (key k1) fails once: k1 pauses, k0 and k2 go on.
    publisher.fail_once(2, 2);
    let mut definition = crate::fakes::definition(PoisonPolicy::Halt);
    definition.ordering = "field:/k".parse().unwrap();
    let settings = crate::fakes::settings_for("relay-a", 6, definition);
    let replica = replica(&store, &publisher, settings);
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    while !all_committed(&store) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();

    let (firsts, _) = first_deliveries(&publisher.delivered());
    let key = |(_, item): &(u64, u32)| (item - 1) % 3;
    for k in 0..3 {
        let of_key: Vec<_> = firsts.iter().filter(|at| key(at) == k).collect();
        assert!(
            of_key.windows(2).all(|w| w[0] < w[1]),
            "key k{k} out of order: {of_key:?}"
        );
    }
    let mut expected = expected_order(&sizes);
    assert_ne!(firsts, expected, "the failed key held the others back");
    for (index, (batch, _)) in firsts.iter().enumerate() {
        assert!(
            firsts[index..].iter().all(|(b, _)| b >= batch),
            "an item of batch {batch} came after a later batch's: {firsts:?}"
        );
    }
    let mut sorted = firsts.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "every item delivered once first");
}

/// A batch whose sequence is taken but which is not readable yet (a
/// writer's commit not visible at majority, or on every shard): the batches
/// after it wait, and go out in order once it is there.
#[tokio::test(start_paused = true)]
async fn a_batch_after_a_gap_waits_for_the_missing_one() {
    let store = MemoryStore::new();
    store_batches(&store, &[2]).await;
    let missing = store.skip_sequence();
    store_batches(&store, &[3]).await;
    let publisher = FakePublisher::new("a");
    let holder = "relay-gap";
    let replica = replica(&store, &publisher, settings(holder, 2, PoisonPolicy::Halt));
    let status = std::sync::Arc::clone(&replica.status);
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    // Several passes meet the gap: nothing of batch 3 goes out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let errors = status.snapshot().recent_errors;
        if errors
            .iter()
            .filter(|e| e.message.contains("batch 2 is not readable yet"))
            .count()
            >= 3
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no gap reported: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, [(1, 1), (1, 2)], "nothing after the gap");

    // The missing batch appears: everything goes out, in sequence order.
    let late = fakes_batch(4);
    store.insert_at(missing, &late).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !all_committed(&store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            store.batch_statuses()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, expected_order(&[2, 4, 3]));
}

/// With nothing committed, the first batch published is sequence 1: a
/// later batch readable before it (on a sharded cluster without zones, its
/// shard answered first) waits for it.
#[tokio::test(start_paused = true)]
async fn with_nothing_committed_the_first_batch_waits_for_sequence_one() {
    let store = MemoryStore::new();
    let missing = store.skip_sequence();
    store_batches(&store, &[3]).await;
    let publisher = FakePublisher::new("a");
    let replica = replica(
        &store,
        &publisher,
        settings("relay-first", 2, PoisonPolicy::Halt),
    );
    let status = std::sync::Arc::clone(&replica.status);
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !status
        .snapshot()
        .recent_errors
        .iter()
        .any(|e| e.message.contains("batch 1 is not readable yet"))
    {
        assert!(tokio::time::Instant::now() < deadline, "no gap reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(publisher.delivered().is_empty(), "nothing before batch 1");
    store.insert_at(missing, &fakes_batch(2)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !all_committed(&store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            store.batch_statuses()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, expected_order(&[2, 3]));
}

/// An item absent from its batch's window ends the pass: nothing at or
/// after its position goes out until it is readable again.
#[tokio::test(start_paused = true)]
async fn a_missing_item_ends_the_pass_and_nothing_after_it_goes_out() {
    let store = MemoryStore::new();
    let batches = store_batches(&store, &[6, 2]).await;
    store.hide_item(&batches[0].batch_id, outbox_core::model::ItemSequence(4));
    let publisher = FakePublisher::new("a");
    let replica = replica(
        &store,
        &publisher,
        settings("relay-hole", 2, PoisonPolicy::Halt),
    );
    let status = std::sync::Arc::clone(&replica.status);
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let errors = status.snapshot().recent_errors;
        if errors
            .iter()
            .filter(|e| e.message.contains("has no item 4"))
            .count()
            >= 3
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no gap reported: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(
        delivered,
        [(1, 1), (1, 2)],
        "the window holding the hole is not published"
    );

    store.restore_items();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !all_committed(&store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            store.batch_statuses()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let (firsts, _) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&[6, 2]));
}

fn fakes_batch(size: usize) -> outbox_core::model::NewBatch {
    outbox_core::ingest::build_batch(
        (0..size).map(|i| serde_json::json!({ "i": i })).collect(),
        &outbox_core::ingest::IngestRules::default(),
        None,
        chrono::Utc::now(),
    )
    .unwrap()
}
