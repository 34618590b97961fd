//! Claim-check end to end, on the file store: the real writer and relay,
//! MongoDB (or its stand-in), the Pub/Sub emulator and the consumer crate.
//! An item too large for a Pub/Sub message is stored under its SHA-256
//! before its batch, published by reference, resolved and verified by the
//! consumer; a store that is down refuses the batch and stores nothing; a
//! writer killed between the object and the batch leaves no batch;
//! retention deletes an object with the last item that refers to it, and a
//! replay publishes the same references.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};
use outbox_consumer::{ClaimCheckResolver, Consumer, ConsumerConfig, Delivery, Handler, Item};
use relay::pubsub;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::e2e::{Process, Stack, binary, eventually, free_port, start_stack_on};
use crate::faults::FaultyMongo;

/// A fresh directory for a file store, and its URL.
fn store_dir() -> (PathBuf, String) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("claim-check-{}", uuid::Uuid::new_v4().simple()));
    let url = format!("file://{}", dir.display());
    (dir, url)
}

/// The objects in a file store.
fn objects_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("sha256"))
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

async fn stack_with(vars: &[(&str, String)]) -> Stack {
    let standin = std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin");
    let mut vars = vars.to_vec();
    vars.push(("REQUEST_DEADLINE_SECONDS", "30".to_owned()));
    start_stack_on(&crate::e2e::env("MONGODB_URL"), standin, &vars).await
}

fn relay_vars() -> Vec<(&'static str, &'static str)> {
    vec![
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
    ]
}

/// Keeps every item handed over.
#[derive(Clone, Default)]
struct Keep(Arc<Mutex<Vec<Item>>>);

#[async_trait::async_trait]
impl Handler for Keep {
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        let Delivery::Item(item) = delivery else {
            anyhow::bail!("single items were asked for");
        };
        self.0.lock().unwrap().push(item);
        Ok(())
    }
}

/// Runs the consumer crate on `subscription`, reading the store at
/// `store_url`, until `count` items were handed over; returns them.
async fn consume(stack: &Stack, subscription: &str, store_url: &str, count: usize) -> Vec<Item> {
    let (running, kept) = spawn_consumer(stack, subscription, store_url, count);
    running.await.unwrap();
    kept.lock().unwrap().clone()
}

/// The consumer crate in the background until `count` items were handed
/// over, and what it handed over so far.
fn spawn_consumer(
    stack: &Stack,
    subscription: &str,
    store_url: &str,
    count: usize,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<Item>>>) {
    let mut config = ConsumerConfig::new(&stack.pubsub.project_id, subscription);
    config.emulator_host = stack.pubsub.emulator_host.clone();
    config.claim_checks = Some(
        ClaimCheckResolver::new(outbox_core::claim_check::DEFAULT_MAX_ITEM_BYTES)
            .allow(store_url)
            .unwrap(),
    );
    let keep = Keep::default();
    let kept = Arc::clone(&keep.0);
    let running = tokio::spawn({
        let kept = Arc::clone(&kept);
        async move {
            let stop = async move {
                eventually(
                    Duration::from_secs(120),
                    "the items to be handed over",
                    || {
                        let done = kept.lock().unwrap().len() >= count;
                        async move { done }
                    },
                )
                .await;
            };
            let report = Consumer::run(&config, outbox_consumer::MemorySeen::default(), keep, stop)
                .await
                .unwrap();
            assert!(report.held(), "{report:?}");
        }
    });
    (running, kept)
}

async fn subscribe(stack: &Stack, name: &str) -> String {
    let subscription = format!("{name}-{}", uuid::Uuid::new_v4().simple());
    pubsub::ensure_subscription(&stack.pubsub, &subscription, true)
        .await
        .unwrap();
    subscription
}

async fn post(stack: &Stack, body: &Value) -> (u16, Value) {
    let response = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn count(stack: &Stack, collection: &str, filter: Document) -> u64 {
    stack
        .db
        .collection::<Document>(collection)
        .count_documents(filter)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25_mib_item_goes_by_reference_and_the_consumer_gets_it_verified() {
    let (dir, url) = store_dir();
    let stack = stack_with(&[("CLAIM_CHECK_URL", url.clone())]).await;
    let subscription = subscribe(&stack, "claim-check").await;
    let (_relay, admin) = stack.relay("relay-claim-check", &relay_vars());
    stack.admin_ready(&admin).await;

    let big = json!({
        "request_id": "big", "vendor_name": "acme",
        "document": "0123456789abcdef".repeat(25 * 1024 * 1024 / 16),
    });
    let body = json!([
        {"request_id": "before", "vendor_name": "acme"},
        big,
        {"request_id": "after", "vendor_name": "acme"},
    ]);
    let (status, answer) = post(&stack, &body).await;
    assert_eq!(status, 201, "{answer}");

    // Stored: the object under its digest, the item with its reference only.
    let text = serde_json::to_vec(&big).unwrap();
    let sha256 = outbox_core::claim_check::sha256_hex(&text);
    let objects = objects_in(&dir);
    assert_eq!(objects, vec![dir.join("sha256").join(&sha256)]);
    assert_eq!(std::fs::read(&objects[0]).unwrap(), text);
    let item = stack
        .db
        .collection::<Document>("batch_items")
        .find_one(doc! { "item_sequence": 2_i64 })
        .await
        .unwrap()
        .unwrap();
    let reference = item.get_document("claim_check").unwrap();
    assert_eq!(reference.get_str("sha256").unwrap(), sha256);
    assert_eq!(item.get("request_data"), Some(&Bson::Null));
    assert_eq!(
        count(
            &stack,
            "batch_items",
            doc! { "claim_check": { "$exists": true } }
        )
        .await,
        1,
        "the small items stay inline"
    );

    // Published by reference, resolved and verified, in order.
    let items = consume(&stack, &subscription, &url, 3).await;
    let positions: Vec<u32> = items.iter().map(|i| i.position.item_sequence).collect();
    assert_eq!(positions, [1, 2, 3]);
    assert_eq!(items[1].payload, big, "the payload as sent");
    let attribute = |name: &str| items[1].attributes.get(name).cloned();
    assert_eq!(attribute("claim_check_sha256"), Some(sha256));
    assert_eq!(attribute("claim_check_bytes"), Some(text.len().to_string()));
    assert_eq!(items[0].claim_check, None);
    assert_eq!(items[0].payload["request_id"], "before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_gives_503_and_stores_nothing() {
    // The store's directory cannot be made while a file stands in its way.
    let (dir, _) = store_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let blocker = dir.join("blocker");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let url = format!("file://{}/objects", blocker.display());
    let stack = stack_with(&[("CLAIM_CHECK_URL", url.clone())]).await;
    let big = json!([{"request_id": "big", "document": "x".repeat(11_000_000)}]);
    let started = Instant::now();
    let (status, problem) = post(&stack, &big).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("claim_check_unavailable")),
        "{problem}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "within the request deadline"
    );
    assert_eq!(count(&stack, "batches", doc! {}).await, 0);
    assert_eq!(count(&stack, "batch_items", doc! {}).await, 0);
    assert_eq!(
        count(
            &stack,
            "claim_check_objects",
            doc! { "refs": { "$gt": 0_i64 } }
        )
        .await,
        0,
        "its pin was taken back"
    );
    // Items that fit a message do not need the store.
    let (status, _) = post(&stack, &json!([{"request_id": "small"}])).await;
    assert_eq!(status, 201);
    // Back up: the same batch is stored.
    std::fs::remove_file(&blocker).unwrap();
    let (status, answer) = post(&stack, &big).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(objects_in(&blocker.join("objects")).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_between_the_object_and_the_batch_leaves_no_batch() {
    let Some(mongo) = FaultyMongo::start("claim_check_kill", Some(5)).await else {
        return;
    };
    let (dir, url) = store_dir();
    let mut stack = mongo
        .stack(
            "cc-writer",
            &[
                ("CLAIM_CHECK_URL", url.clone()),
                ("REQUEST_DEADLINE_SECONDS", "30".to_owned()),
            ],
        )
        .await;
    // The batch's transaction starts with the counter; it waits there.
    let entered = mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["findAndModify"], "appName": "cc-writer",
                "blockConnection": true, "blockTimeMS": 3_000,
            },
        )
        .await;
    let request = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .json(&json!([{"request_id": "big", "document": "y".repeat(11_000_000)}]))
        .send();
    let pending = tokio::spawn(request);
    mongo.wait_for_fail_point(entered + 1).await;
    assert_eq!(
        objects_in(&dir).len(),
        1,
        "the object is stored before the batch"
    );
    stack.writer.kill_hard();
    assert!(
        pending.await.unwrap().is_err(),
        "no answer from a killed writer"
    );
    mongo.fail_point_off().await;
    // Its transaction never commits: the stand-in's lifetime limit (5 s)
    // or MongoDB's ends it. Another writer on the same database stores the
    // next batch as sequence 1: nothing of the first is visible, ever.
    let port = free_port();
    let _writer = Process::spawn(
        "writer-2",
        binary("outbox-writer"),
        &[
            ("WRITER_BIND", format!("127.0.0.1:{port}")),
            ("MONGODB_URL", mongo.url_for("cc-writer-2")),
            ("MONGODB_DATABASE", stack.database.clone()),
            ("CLAIM_CHECK_URL", url.clone()),
            ("REQUEST_DEADLINE_SECONDS", "30".to_owned()),
        ],
    );
    stack.writer_url = format!("http://127.0.0.1:{port}");
    let ready = format!("{}/health/ready", stack.writer_url);
    eventually(Duration::from_secs(60), "the second writer", || {
        let request = stack.http.get(&ready).send();
        async move { request.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let (status, answer) = post(&stack, &json!([{"request_id": "next"}])).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["data"]["batch_sequence"], 1, "{answer}");
    assert_eq!(count(&stack, "batches", doc! {}).await, 1);
    assert_eq!(count(&stack, "batch_items", doc! {}).await, 1);
    // The object stays, harmless: the same payload sent again reuses it.
    assert_eq!(objects_in(&dir).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_publishes_the_same_references_and_retention_deletes_each_object_with_its_last_item()
 {
    let (dir, url) = store_dir();
    // Payloads over 1,000 bytes go to the store: small enough to be quick.
    let stack = stack_with(&[
        ("CLAIM_CHECK_URL", url.clone()),
        ("CLAIM_CHECK_ABOVE_BYTES", "1000".to_owned()),
    ])
    .await;
    let subscription = subscribe(&stack, "claim-check-replay").await;
    let (mut relay, admin) = stack.relay("relay-cc-replay", &relay_vars());
    stack.admin_ready(&admin).await;
    // One payload in both batches (one object, two references), one only
    // in the second, one small enough to stay inline.
    let shared = json!({"vendor_name": "acme", "document": "s".repeat(2000)});
    let own = json!({"vendor_name": "acme", "document": "o".repeat(3000)});
    let small = json!({"vendor_name": "acme", "note": "inline"});
    for body in [json!([shared, small]), json!([own, shared])] {
        let (status, answer) = post(&stack, &body).await;
        assert_eq!(status, 201, "{answer}");
    }
    assert_eq!(objects_in(&dir).len(), 2, "one object per payload");

    let (consumer, kept) = spawn_consumer(&stack, &subscription, &url, 8);
    eventually(Duration::from_secs(60), "the live items", || {
        let live = kept.lock().unwrap().len() >= 4;
        async move { live }
    })
    .await;
    let live: Vec<Item> = kept.lock().unwrap().clone();
    let payloads: Vec<&Value> = live.iter().map(|i| &i.payload).collect();
    assert_eq!(payloads, [&shared, &small, &own, &shared]);

    let response = stack
        .http
        .post(format!("{admin}/api/v1/outbox/replays"))
        .json(&json!({"from_sequence": 1, "to_sequence": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let started: Value = response.json().await.unwrap();
    let id = started["replay_id"].as_str().unwrap().to_owned();
    // The copies carry the references the originals did, and resolve.
    consumer.await.unwrap();
    let all = kept.lock().unwrap().clone();
    let copies: Vec<&Item> = all
        .iter()
        .filter(|i| i.replay_id.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(copies.len(), 4, "{all:?}");
    for (copy, original) in copies.iter().zip(&live) {
        assert_eq!(copy.item_id, original.item_id);
        assert_eq!(copy.claim_check, original.claim_check);
        assert_eq!(copy.payload, original.payload);
    }
    assert!(copies.iter().filter(|c| c.claim_check.is_some()).count() == 3);

    // Retention: a relay that keeps committed batches one second.
    relay.kill_hard();
    let _ = relay.child.wait().await;
    let mut vars = relay_vars();
    vars.extend([
        ("RETENTION_SECONDS", "1"),
        ("RETENTION_INTERVAL_SECONDS", "1"),
    ]);
    let (_retention, _) = stack.relay("relay-cc-retention", &vars);
    eventually(
        Duration::from_secs(90),
        "retention to remove both batches and their objects",
        || async { count(&stack, "batches", doc! {}).await == 0 && objects_in(&dir).is_empty() },
    )
    .await;
    assert_eq!(count(&stack, "claim_check_objects", doc! {}).await, 0);
    // The shared payload sent again is stored again: a new batch never
    // refers to an object retention deleted.
    let (status, answer) = post(&stack, &json!([shared])).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(objects_in(&dir).len(), 1);
}
