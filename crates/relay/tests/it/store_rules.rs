//! The relay's rules over the MongoDB adapter (MongoDB or its stand-in, as
//! `scripts/test.sh` starts it), with the real drain loop and a fake
//! Pub/Sub: what it reads at which read concern (the driver's command
//! monitoring: the stand-in ignores read concerns, so the commands are what
//! is checked), what it does when an item or a batch is missing, how it
//! kills a dead leader's session, and that a pause holds after a resume.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};
use outbox_core::model::Sequence;
use outbox_core::store::{BatchStore, LeaseStore, OutboxStore};
use outbox_mongo::monitor::CommandLog;
use outbox_mongo::{MongoConfig, MongoStore};
use relay::drain::PoisonPolicy;
use relay::runner::Runner;
use relay::status::StatusBoard;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::e2e::{env, eventually};
use crate::fakes::{FakePublisher, expected_order, first_deliveries};

/// A store on a fresh database of the test MongoDB, recording its commands.
pub(crate) async fn store(test: &str) -> (MongoStore, CommandLog, mongodb::Database) {
    let database = format!("rules_{test}_{}", uuid::Uuid::new_v4().simple());
    let log = CommandLog::new();
    let mut config = MongoConfig::new(env("MONGODB_URL"), database.clone());
    config.command_log = Some(log.clone());
    config.app_name = format!("rules-{test}");
    config.lease_timeout = Duration::from_secs(5);
    let store = MongoStore::connect(config).await.unwrap();
    store.ensure_schema().await.unwrap();
    let db = mongodb::Client::with_uri_str(env("MONGODB_URL"))
        .await
        .unwrap()
        .database(&database);
    (store, log, db)
}

pub(crate) async fn insert(store: &MongoStore, size: usize) -> outbox_core::model::NewBatch {
    let batch = outbox_core::ingest::build_batch(
        (0..size).map(|i| serde_json::json!({ "i": i })).collect(),
        &outbox_core::ingest::IngestRules::default(),
        None,
        chrono::Utc::now(),
    )
    .unwrap();
    store
        .insert_batch(
            &batch,
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
        .await
        .unwrap();
    batch
}

/// One relay replica over the store, running until the returned token is
/// cancelled.
fn run(
    store: &MongoStore,
    publisher: &FakePublisher,
    holder: &str,
) -> (
    Arc<StatusBoard>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    run_with(
        store,
        publisher,
        holder,
        2,
        "global",
        Duration::from_millis(50),
    )
}

/// [`run`] with pages of `page` items and the ordering key mode `mode`.
pub(crate) fn run_with(
    store: &MongoStore,
    publisher: &FakePublisher,
    holder: &str,
    page: u32,
    mode: &str,
    poll: Duration,
) -> (
    Arc<StatusBoard>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let status = Arc::new(StatusBoard::default());
    let mut stream = crate::fakes::definition(PoisonPolicy::Halt);
    stream.ordering = mode.parse().unwrap();
    let mut settings = crate::fakes::settings_for(holder, page, stream);
    settings.poll_interval = poll;
    settings.backoff_cap = Duration::from_millis(200);
    let runner = Runner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        crate::fakes::publishers(publisher),
        settings,
        Arc::clone(&status),
        Arc::new(Notify::new()),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(runner.run(stop.clone()));
    (status, stop, task)
}

pub(crate) async fn statuses(db: &mongodb::Database) -> Vec<String> {
    use futures::TryStreamExt;
    db.collection::<Document>("batches")
        .find(doc! {})
        .sort(doc! { "batch_sequence": 1 })
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|b| b.get_str("status").unwrap().to_owned())
        .collect()
}

async fn until_committed(db: &mongodb::Database, batches: usize, status: &StatusBoard) {
    eventually(Duration::from_secs(60), "every batch committed", || async {
        let statuses = statuses(db).await;
        statuses.len() == batches && statuses.iter().all(|s| s == "committed")
    })
    .await;
    let _ = status;
}

async fn until_error(status: &StatusBoard, needle: &str, times: usize) {
    eventually(Duration::from_secs(60), needle, || async {
        status
            .snapshot()
            .recent_errors
            .iter()
            .filter(|e| e.message.contains(needle))
            .count()
            >= times
    })
    .await;
}

/// Every read the relay sends outside a transaction, while draining, asks
/// for read concern majority: what it publishes can never roll back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_the_relay_sends_is_a_majority_read() {
    let (store, log, db) = store("majority").await;
    for size in [3, 5, 1] {
        insert(&store, size).await;
    }
    log.take();
    let publisher = FakePublisher::new("a");
    let (status, stop, task) = run(&store, &publisher, "relay-majority");
    until_committed(&db, 3, &status).await;
    stop.cancel();
    task.await.unwrap();
    let commands = log.take();
    let reads: Vec<_> = commands
        .iter()
        .filter(|c| c.is_read() && c.name != "getMore" && !c.in_transaction)
        .collect();
    assert!(reads.len() >= 10, "the drain read: {commands:#?}");
    let local: Vec<_> = reads
        .iter()
        .filter(|c| c.read_concern.as_deref() != Some("majority"))
        .collect();
    assert!(local.is_empty(), "reads without majority: {local:#?}");
    // Writes outside transactions (the lease) wait for a majority too.
    let unacknowledged: Vec<_> = commands
        .iter()
        .filter(|c| matches!(c.name.as_str(), "update" | "insert" | "delete") && !c.in_transaction)
        .filter(|c| c.write_concern.as_deref() != Some("majority"))
        .collect();
    assert!(
        unacknowledged.is_empty(),
        "writes without majority: {unacknowledged:#?}"
    );
    assert_eq!(
        publisher
            .delivered()
            .iter()
            .map(|(b, i, _)| (*b, *i))
            .collect::<Vec<_>>(),
        expected_order(&[3, 5, 1])
    );
}

/// An item document removed by hand: the window that holds its position is
/// not published, the pass ends with the reason, and once the item is back
/// everything goes out in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_removed_by_hand_stops_the_drain_at_its_position() {
    let (store, _log, db) = store("hole").await;
    let first = insert(&store, 6).await;
    insert(&store, 2).await;
    let items = db.collection::<Document>("batch_items");
    let hole = outbox_core::model::ItemId::of(&first.batch_id, outbox_core::model::ItemSequence(4));
    let removed = items
        .find_one_and_delete(doc! { "_id": hole.to_string() })
        .await
        .unwrap()
        .unwrap();
    let publisher = FakePublisher::new("a");
    let (status, stop, task) = run(&store, &publisher, "relay-hole");
    until_error(
        &status,
        &format!("batch {} has no item 4", first.batch_id),
        3,
    )
    .await;
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, [(1, 1), (1, 2)], "nothing at or after the hole");

    items.insert_one(removed).await.unwrap();
    until_committed(&db, 2, &status).await;
    stop.cancel();
    task.await.unwrap();
    let (firsts, _) = first_deliveries(&publisher.delivered());
    assert_eq!(firsts, expected_order(&[6, 2]));
}

/// A sequence number taken without a readable batch (a writer's commit not
/// visible yet): the next batch is not published until it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_after_a_gap_in_the_sequence_is_not_published() {
    let (store, _log, db) = store("gap").await;
    insert(&store, 2).await;
    // Batch 2's number is taken, its document not there yet.
    db.collection::<Document>("outbox_counters")
        .update_one(
            doc! { "_id": "batch_sequence" },
            doc! { "$inc": { "value": 1_i64 } },
        )
        .await
        .unwrap();
    insert(&store, 3).await;
    let publisher = FakePublisher::new("a");
    let (status, stop, task) = run(&store, &publisher, "relay-gap");
    until_error(&status, "batch 2 is not readable yet", 3).await;
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, [(1, 1), (1, 2)], "batch 3 waits for batch 2");
    assert_eq!(statuses(&db).await, ["committed", "pending"]);

    // Batch 2 appears: 2 then 3.
    let late = outbox_core::ingest::build_batch(
        (0..4).map(|i| serde_json::json!({ "i": i })).collect(),
        &outbox_core::ingest::IngestRules::default(),
        None,
        chrono::Utc::now(),
    )
    .unwrap();
    let mut documents = Vec::new();
    for item in &late.items {
        let mut document = outbox_mongo::documents::item_document(&late, item);
        document.insert("batch_sequence", 2_i64);
        documents.push(document);
    }
    db.collection::<Document>("batch_items")
        .insert_many(documents)
        .await
        .unwrap();
    db.collection::<Document>("batches")
        .insert_one(outbox_mongo::documents::batch_document(
            &late,
            Sequence(2),
            0,
        ))
        .await
        .unwrap();
    until_committed(&db, 3, &status).await;
    stop.cancel();
    task.await.unwrap();
    let delivered: Vec<_> = publisher
        .delivered()
        .iter()
        .map(|(b, i, _)| (*b, *i))
        .collect();
    assert_eq!(delivered, expected_order(&[2, 4, 3]));
    // The backlog is the counter less the last committed: nothing left.
    assert_eq!(
        store
            .backlog(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
            .pending_batches,
        0
    );
}

/// A successor kills its predecessor's fenced session with the session's
/// `uid` (so it works when each relay runs as its own MongoDB user, given
/// the killAnySession privilege); the session recorded is the one in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_kills_the_recorded_session_by_id_and_uid() {
    let (store, log, db) = store("kill").await;
    let batch = insert(&store, 1).await;
    let ttl_ms = 1_000;
    let now = store.now_ms().await.unwrap();
    let lease = store
        .acquire_or_renew(
            &outbox_core::stream::StreamName::default(),
            "relay-a",
            now,
            ttl_ms,
        )
        .await
        .unwrap()
        .unwrap();
    let items = store
        .unsent_items(&batch.batch_id, outbox_core::model::ItemSequence(0), 1)
        .await
        .unwrap();
    let marks: Vec<_> = items
        .iter()
        .map(|i| outbox_core::store::SentMark {
            item_id: i.item_id,
            item_sequence: i.item_sequence,
            publish_id: "m-1".into(),
        })
        .collect();
    store
        .mark_sent(&lease.fence(), &batch.batch_id, &marks)
        .await
        .unwrap();
    let recorded = db
        .collection::<Document>("relay_lease")
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    let session = recorded.get_document("txn_session").unwrap().clone();
    assert!(session.contains_key("id"), "{recorded}");
    let uid = match session.get("uid") {
        Some(Bson::Binary(uid)) => uid.bytes.clone(),
        other => panic!("uid {other:?} in {recorded}"),
    };
    assert_eq!(uid.len(), 32, "SHA-256 of the user");
    assert!(
        log.commands()
            .iter()
            .any(|c| c.in_transaction && c.name == "update")
    );

    // A renewal does not rewrite it.
    let now = store.now_ms().await.unwrap();
    store
        .acquire_or_renew(
            &outbox_core::stream::StreamName::default(),
            "relay-a",
            now,
            ttl_ms,
        )
        .await
        .unwrap()
        .unwrap();
    let after_renewal = db
        .collection::<Document>("relay_lease")
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after_renewal.get_document("txn_session").unwrap(), &session);

    // Relay B, once the lease expired by the store's clock, kills it with
    // both fields, takes the lease and records its own session.
    let successor_log = CommandLog::new();
    let mut config = store.config().clone();
    config.command_log = Some(successor_log.clone());
    config.app_name = "rules-kill-b".into();
    let successor = MongoStore::connect(config).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "relay-b to take the lease",
        || async {
            let now = successor.now_ms().await.unwrap();
            successor
                .acquire_or_renew(
                    &outbox_core::stream::StreamName::default(),
                    "relay-b",
                    now,
                    ttl_ms,
                )
                .await
                .unwrap()
                .is_some_and(|l| l.holder == "relay-b" && l.epoch == 2)
        },
    )
    .await;
    let kills: Vec<_> = successor_log
        .commands()
        .into_iter()
        .filter(|c| c.name == "killSessions")
        .collect();
    assert_eq!(kills.len(), 1, "{kills:#?}");
    let Some(Bson::Array(targets)) = &kills[0].argument else {
        panic!("{kills:#?}");
    };
    assert_eq!(
        targets,
        &[Bson::Document(session.clone())],
        "killed by id and uid"
    );
    let taken = db
        .collection::<Document>("relay_lease")
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    let recorded = taken.get_document("txn_session").unwrap();
    assert_ne!(recorded, &session, "the successor's own session: {taken}");
    assert!(recorded.contains_key("uid"), "{taken}");
    assert!(
        store
            .mark_sent(&lease.fence(), &batch.batch_id, &marks)
            .await
            .is_err()
    );
}

/// Paused, resumed and paused again: the pause holds (the stand-in reads a
/// boolean written with `$set` back as 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_after_a_resume() {
    let (store, _log, _db) = store("pause").await;
    assert!(
        !store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
    );
    for paused in [true, false, true] {
        store
            .set_paused(&outbox_core::stream::StreamName::default(), paused)
            .await
            .unwrap();
        assert_eq!(
            store
                .paused(&outbox_core::stream::StreamName::default())
                .await
                .unwrap(),
            paused
        );
    }
}

/// A large batch whose items a writer staged but whose transaction never
/// made it visible (the writer died) is removed by retention after the
/// abandonment delay; a younger one, or a published one, is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_staged_items_are_swept_and_nothing_else() {
    let (store, _log, db) = store("staged").await;
    let published = insert(&store, 3).await;
    let stage = |batch: &outbox_core::model::NewBatch, age: chrono::Duration| {
        let db = db.clone();
        let batch = batch.clone();
        async move {
            let items: Vec<Document> = batch
                .items
                .iter()
                .map(|item| outbox_mongo::documents::item_document(&batch, item))
                .collect();
            db.collection::<Document>("batch_items")
                .insert_many(items)
                .await
                .unwrap();
            db.collection::<Document>("staged_batches")
                .insert_one(doc! {
                    "_id": batch.batch_id.as_str(),
                    "total_items": batch.items.len() as i64,
                    "created_at": mongodb::bson::DateTime::from_chrono(chrono::Utc::now() - age),
                })
                .await
                .unwrap();
        }
    };
    let batch = |n: usize| {
        outbox_core::ingest::build_batch(
            (0..n).map(|i| serde_json::json!({ "i": i })).collect(),
            &outbox_core::ingest::IngestRules::default(),
            None,
            chrono::Utc::now(),
        )
        .unwrap()
    };
    let (old, young, late) = (batch(1500), batch(4), batch(2));
    stage(&old, chrono::Duration::hours(2)).await;
    stage(&young, chrono::Duration::minutes(1)).await;
    // A batch its writer gave up on (its record marked abandoned, its items
    // removed) whose last chunk landed afterwards: the sweep removes it too.
    stage(&late, chrono::Duration::hours(2)).await;
    db.collection::<Document>("staged_batches")
        .update_one(
            doc! { "_id": late.batch_id.as_str() },
            doc! { "$set": { "abandoned_at": mongodb::bson::DateTime::now() } },
        )
        .await
        .unwrap();
    let removed = store
        .remove_expired(
            &outbox_core::stream::StreamName::default(),
            None,
            None,
            chrono::Utc::now() - chrono::Duration::hours(1),
            100,
        )
        .await
        .unwrap();
    assert_eq!(removed.abandoned_batches, 2);
    assert_eq!(
        db.collection::<Document>("batch_items")
            .count_documents(doc! { "batch_id": late.batch_id.as_str() })
            .await
            .unwrap(),
        0,
        "a late chunk of an abandoned batch is swept"
    );
    let items = db.collection::<Document>("batch_items");
    assert_eq!(
        items
            .count_documents(doc! { "batch_id": old.batch_id.as_str() })
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        items
            .count_documents(doc! { "batch_id": young.batch_id.as_str() })
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        items
            .count_documents(doc! { "batch_id": published.batch_id.as_str() })
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        db.collection::<Document>("staged_batches")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1
    );
}
