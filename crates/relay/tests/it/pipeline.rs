//! The latency-tolerant drain against the in-memory store and a fake
//! Pub/Sub whose answers take 20 ms (tokio's paused clock): groups of pages
//! across batches in flight at once in `global` mode, never two batches at
//! once in `batch` and `field:` modes, and publish failures injected in the
//! middle of a group keep first deliveries in order and batches whole.

use std::time::Duration;

use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchStatus, ItemStatus};
use relay::drain::PoisonPolicy;
use tokio_util::sync::CancellationToken;

use crate::fakes::{
    FakePublisher, definition, expected_order, first_deliveries, replica, settings_for,
    store_batches, store_keyed_batches,
};

const SIZES: [usize; 7] = [3, 2, 4, 1, 5, 2, 3];

fn all_committed(store: &MemoryStore) -> bool {
    store
        .batch_statuses()
        .iter()
        .all(|(_, s)| *s == BatchStatus::Committed)
}

/// Runs one replica with `ordering` and pages of `page_size` until every
/// batch is committed (bounded in virtual time).
async fn drain(
    store: &MemoryStore,
    publisher: &FakePublisher,
    ordering: &str,
    page_size: u32,
    policy: PoisonPolicy,
) {
    let mut stream = definition(policy);
    stream.ordering = ordering.parse().unwrap();
    let replica = replica(store, publisher, settings_for("relay-a", page_size, stream));
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !all_committed(store) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not drained after 600 virtual seconds: {:?}",
            store.batch_statuses()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    task.await.unwrap();
}

/// Every first delivery of a batch comes before any of a later batch's.
fn assert_batches_whole(firsts: &[(u64, u32)]) {
    for (index, (batch, _)) in firsts.iter().enumerate() {
        assert!(
            firsts[index..].iter().all(|(b, _)| b >= batch),
            "an item of batch {batch} came after a later batch's: {firsts:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn in_global_mode_a_group_of_pages_across_batches_is_in_flight_at_once() {
    let store = MemoryStore::new();
    store_batches(&store, &SIZES).await;
    let publisher = FakePublisher::new("a");
    publisher.set_latency(Duration::from_millis(20));
    drain(&store, &publisher, "global", 8, PoisonPolicy::Halt).await;

    let (firsts, duplicates) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&SIZES));
    assert_eq!(duplicates, 0);
    // Pages of 8 items: more than the largest batch (5) in flight at once.
    assert_eq!(publisher.most_in_flight(), 8);
    assert!(!publisher.overlapping_batches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn in_global_mode_a_failure_in_the_middle_of_a_group_publishes_the_rest_again_in_order() {
    let store = MemoryStore::new();
    store_batches(&store, &SIZES).await;
    let publisher = FakePublisher::new("a");
    publisher.set_latency(Duration::from_millis(20));
    // The first group is batches 1 and 2 and three items of batch 3.
    // Batch 2's first item fails: the client pauses the key, so every later
    // message handed over with it (batch 3's too) fails as well.
    publisher.fail_once(2, 1);
    drain(&store, &publisher, "global", 8, PoisonPolicy::Halt).await;

    let (firsts, duplicates) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&SIZES));
    assert_eq!(duplicates, 0, "nothing acknowledged was published again");
    assert_eq!(publisher.attempts(2, 1), 2);
    assert_eq!(
        publisher.attempts(3, 1),
        2,
        "the paused item of the next batch was retried"
    );
    assert_eq!(
        publisher.attempts(1, 3),
        1,
        "the acknowledged item before it was not"
    );
    assert!(
        store
            .all_items()
            .iter()
            .all(|(_, _, status, _)| *status == ItemStatus::Sent)
    );
}

#[tokio::test(start_paused = true)]
async fn in_batch_mode_two_batches_are_never_in_flight_at_once_even_when_read_together() {
    let store = MemoryStore::new();
    store_batches(&store, &SIZES).await;
    let publisher = FakePublisher::new("a");
    publisher.set_latency(Duration::from_millis(20));
    publisher.fail_once(3, 2);
    drain(&store, &publisher, "batch", 8, PoisonPolicy::Halt).await;

    let (firsts, _) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&SIZES));
    assert_batches_whole(&firsts);
    assert_eq!(
        publisher.overlapping_batches(),
        Vec::<Vec<u64>>::new(),
        "a batch went out before the one before it was acknowledged"
    );
}

#[tokio::test(start_paused = true)]
async fn in_field_mode_keys_keep_their_order_and_batches_stay_whole_through_a_failure() {
    let store = MemoryStore::new();
    let sizes = [6, 6, 6, 6];
    store_keyed_batches(&store, &sizes, 3).await;
    let publisher = FakePublisher::new("a");
    publisher.set_latency(Duration::from_millis(20));
    // Batch 2's second item (key k1) fails once: k1 pauses, k0 and k2 go on.
    publisher.fail_once(2, 2);
    drain(&store, &publisher, "field:/k", 12, PoisonPolicy::Halt).await;

    let (firsts, _) = first_deliveries(&publisher.delivered());
    let key = |(_, item): &(u64, u32)| (item - 1) % 3;
    for k in 0..3 {
        let of_key: Vec<_> = firsts.iter().filter(|at| key(at) == k).collect();
        assert!(
            of_key.windows(2).all(|w| w[0] < w[1]),
            "key k{k} out of order: {of_key:?}"
        );
    }
    assert_batches_whole(&firsts);
    assert_eq!(publisher.overlapping_batches(), Vec::<Vec<u64>>::new());
    let mut sorted = firsts.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected_order(&sizes), "every item delivered");
}

#[tokio::test(start_paused = true)]
async fn an_item_refused_for_good_in_the_middle_of_a_group_is_set_aside_and_the_rest_goes_on_in_order()
 {
    let store = MemoryStore::new();
    store_batches(&store, &SIZES).await;
    let publisher = FakePublisher::new("a");
    publisher.set_latency(Duration::from_millis(20));
    publisher.poison(3, 2);
    drain(&store, &publisher, "global", 8, PoisonPolicy::DeadLetter).await;

    let (firsts, duplicates) = first_deliveries(&publisher.delivered());
    let expected: Vec<_> = expected_order(&SIZES)
        .into_iter()
        .filter(|at| *at != (3, 2))
        .collect();
    assert_eq!(firsts, expected);
    assert_eq!(duplicates, 0);
    let failed: Vec<_> = store
        .all_items()
        .into_iter()
        .filter(|(_, _, status, _)| *status == ItemStatus::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_store_lost_after_an_acknowledgement_in_the_middle_of_a_group_republishes_only_what_was_not_recorded()
 {
    let store = MemoryStore::new();
    store_batches(&store, &SIZES).await;
    let publisher = FakePublisher::new("a");
    publisher.set_latency(Duration::from_millis(20));
    // Acknowledged, then the store goes away before the marks are written.
    publisher.break_store_after(2, 1, &store);
    let mut stream = definition(PoisonPolicy::Halt);
    stream.ordering = "global".parse().unwrap();
    let replica = replica(&store, &publisher, settings_for("relay-a", 8, stream));
    let stop = CancellationToken::new();
    let task = tokio::spawn(replica.runner.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    store.set_unavailable(false);
    while !all_committed(&store) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    task.await.unwrap();

    let (firsts, duplicates) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&SIZES));
    // The group in flight when the store went away (8 items) at most.
    assert!(duplicates <= 8, "{duplicates} duplicates");
    assert!(
        store
            .all_items()
            .iter()
            .all(|(_, _, status, id)| *status == ItemStatus::Sent && id.is_some())
    );
}

/// A commit that applied but whose answer was lost (`OutcomeUnknown`): the
/// drain must not trust the position it remembered; it asks the store, and
/// every later batch is published under the same lease epoch.
#[tokio::test(start_paused = true)]
async fn a_commit_whose_answer_was_lost_never_stalls_the_stream() {
    for ordering in ["global", "batch", "field:/vendor_name"] {
        let store = MemoryStore::new();
        store_batches(&store, &SIZES).await;
        store.lose_commit_answer(outbox_core::model::Sequence(3));
        store.lose_commit_answer(outbox_core::model::Sequence(5));
        let publisher = FakePublisher::new("a");
        publisher.set_latency(Duration::from_millis(20));
        drain(&store, &publisher, ordering, 4, PoisonPolicy::Halt).await;

        let (firsts, _) = first_deliveries(&publisher.delivered());
        assert_eq!(firsts, expected_order(&SIZES), "{ordering}");
        let lease = outbox_core::store::LeaseStore::current(
            &store,
            &outbox_core::stream::StreamName::default_stream(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(lease.epoch, 1, "{ordering}: one leader, one epoch");
    }
}
