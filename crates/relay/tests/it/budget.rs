//! The command budget: the MongoDB commands (round trips) the relay sends
//! to drain a backlog and the writer to store a batch, counted with the
//! driver's command monitoring on MongoDB or its stand-in. A count does not
//! depend on the machine's speed: it is the figure that carries over to a
//! real replica set, so these tests pin it and fail when it grows.

use std::time::Duration;

use outbox_core::store::BatchStore;
use outbox_mongo::monitor::Command;

use crate::e2e::eventually;
use crate::fakes::FakePublisher;
use crate::store_rules::{insert, run_with, statuses, store};

/// What draining a backlog cost, by kind of command.
#[derive(Debug, Default, PartialEq, Eq)]
struct Drained {
    /// Reads of items (`find` on the items).
    item_reads: usize,
    /// Reads of batches, the backlog's head read aside.
    batch_reads: usize,
    /// Fenced transactions (one `commitTransaction` each).
    writes: usize,
    /// Statements inside them, commits aside.
    statements: usize,
}

fn count(commands: &[Command]) -> Drained {
    let named = |name: &str, collection: &str| {
        commands
            .iter()
            .filter(|c| {
                c.name == name && c.collection.as_deref() == Some(collection) && !c.in_transaction
            })
            .count()
    };
    // Each backlog reading reads the counter once and the head batch once.
    let backlogs = named("find", "outbox_counters");
    Drained {
        item_reads: named("find", "batch_items"),
        batch_reads: named("find", "batches") - backlogs,
        writes: commands
            .iter()
            .filter(|c| c.name == "commitTransaction")
            .count(),
        statements: commands
            .iter()
            .filter(|c| {
                c.in_transaction
                    && !matches!(c.name.as_str(), "commitTransaction" | "abortTransaction")
            })
            .count(),
    }
}

/// Drains `batches` batches of `size` items in `mode` with pages of
/// `page` items; what it cost until the last commit was seen.
async fn drain(mode: &str, batches: usize, size: usize, page: u32) -> Drained {
    let (store, log, db) = store(&format!("budget_{}", mode.replace([':', '/'], "_"))).await;
    for _ in 0..batches {
        insert(&store, size).await;
    }
    log.take();
    let publisher = FakePublisher::new("a");
    // Polls far apart: an idle stream's reads (one a poll) stay out of it.
    let (_status, stop, task) = run_with(
        &store,
        &publisher,
        "relay-budget",
        page,
        mode,
        Duration::from_secs(30),
    );
    eventually(
        Duration::from_secs(120),
        "every batch committed",
        || async {
            let statuses = statuses(&db).await;
            statuses.len() == batches && statuses.iter().all(|s| s == "committed")
        },
    )
    .await;
    let drained = count(&log.take());
    stop.cancel();
    task.await.unwrap();
    drained
}

/// The budget of one configuration: every page group is read in one items
/// read and at most one batches read (plus one that finds the stream
/// drained, and one a lease epoch for the last committed batch), and
/// written in at most one transaction of three statements and its commit
/// (the fence, every mark, every batch's count and commit).
fn assert_within_budget(drained: &Drained, groups: usize) {
    assert_eq!(drained.item_reads, groups, "{drained:?}");
    assert!(drained.batch_reads <= groups + 2, "{drained:?}");
    assert!((1..=groups).contains(&drained.writes), "{drained:?}");
    // The first write under a new epoch records the session in the lease
    // (one statement more, once).
    assert!(
        drained.statements == 3 * drained.writes || drained.statements == 3 * drained.writes + 1,
        "{drained:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_1000_items_costs_a_handful_of_round_trips_in_every_mode() {
    for mode in ["global", "batch", "field:/i"] {
        // Ten batches of 100: one group of 1,000.
        let drained = drain(mode, 10, 100, 1000).await;
        eprintln!("{mode}, 10 x 100 items: {drained:?}");
        assert_within_budget(&drained, 1);
    }
    // One batch of 1,000 in pages of 250: four groups.
    let drained = drain("global", 1, 1000, 250).await;
    eprintln!("global, 1 x 1,000 items, pages of 250: {drained:?}");
    assert_within_budget(&drained, 4);
    // A hundred batches of 10: one group of 1,000 in `global` mode.
    let drained = drain("global", 100, 10, 1000).await;
    eprintln!("global, 100 x 10 items: {drained:?}");
    assert_within_budget(&drained, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storing_a_batch_costs_four_commands_and_six_with_an_idempotency_key() {
    let (store, log, _db) = store("budget_writer").await;
    insert(&store, 1).await;
    log.take();
    insert(&store, 100).await;
    let commands = log.take();
    let names: Vec<&str> = commands.iter().map(|c| c.name.as_str()).collect();
    // The counter, the batch, its items, the commit.
    assert_eq!(
        names,
        ["findAndModify", "insert", "insert", "commitTransaction"],
        "{commands:#?}"
    );

    let mut keyed = outbox_core::ingest::build_batch(
        vec![serde_json::json!({ "i": 1 })],
        &outbox_core::ingest::IngestRules::default(),
        None,
        chrono::Utc::now(),
    )
    .unwrap();
    keyed.idempotency = Some(outbox_core::model::Idempotency {
        key: "k-1".to_owned(),
        request_hash: "0".repeat(64),
    });
    store
        .insert_batch(
            &keyed,
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
        .await
        .unwrap();
    let keyed_commands = log.take();
    let names: Vec<&str> = keyed_commands.iter().map(|c| c.name.as_str()).collect();
    // The counter, an expired record of the key (if any) removed, the
    // key's record, the batch, its items, the commit.
    assert_eq!(
        names,
        [
            "findAndModify",
            "delete",
            "insert",
            "insert",
            "insert",
            "commitTransaction"
        ],
        "{keyed_commands:#?}"
    );
}
