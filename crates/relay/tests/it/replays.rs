//! Replay jobs with the real binaries, MongoDB (or its stand-in) and the
//! Pub/Sub emulator: a range published again to a new topic arrives whole
//! and in order; a job survives its leader being killed; a replay beside
//! the live drain keeps both in order and holds its rate; a range that
//! retention removed is refused with 410. Deliveries are checked with the
//! consumer crate's verifier, as a consumer would.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use mongodb::bson::{Document, doc};
use outbox_consumer::{Contract, Item, Verifier};
use relay::pubsub;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::e2e::{Stack, eventually, start_stack};

fn relay_vars() -> [(&'static str, &'static str); 3] {
    [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.3"),
        ("OUTBOX_BATCH_SIZE", "50"),
    ]
}

/// A new topic with an ordered subscription; returns the subscription.
async fn topic(stack: &Stack, name: &str) -> String {
    let config = stack.pubsub.for_topic(name);
    pubsub::ensure_topic(&config).await.unwrap();
    let subscription = format!("{name}-ordered");
    pubsub::ensure_subscription(&config, &subscription, true)
        .await
        .unwrap();
    subscription
}

/// One subscriber stream on a subscription, kept open for the test: the
/// emulator keeps messages it was sending to a stream that closed leased
/// until their deadline, so a test that closed one stream and opened
/// another could wait a minute for the next messages.
struct Inbox {
    stream: google_cloud_pubsub::subscriber::MessageStream,
    _client: google_cloud_pubsub::client::Subscriber,
    distinct: std::collections::HashSet<String>,
}

impl Inbox {
    async fn open(stack: &Stack, subscription: &str) -> Self {
        let client = pubsub::subscriber(&stack.pubsub).await.unwrap();
        let stream = client
            .subscribe(stack.pubsub.subscription_path(subscription))
            .build();
        Self {
            stream,
            _client: client,
            distinct: std::collections::HashSet::new(),
        }
    }

    /// Receives until `expected` more distinct deliveries (by `dedup_key`:
    /// a replayed copy counts apart from its original) came, each parsed
    /// as the consumer crate parses it, with its publish time (s), and
    /// acknowledged.
    async fn take(&mut self, expected: usize, limit: Duration) -> Vec<(Item, f64)> {
        let target = self.distinct.len() + expected;
        let mut received = Vec::new();
        let deadline = Instant::now() + limit;
        while self.distinct.len() < target {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await;
            let Ok(Some(Ok((message, handler)))) = next else {
                panic!(
                    "received {} of {expected} before giving up",
                    expected + self.distinct.len() - target
                );
            };
            let item = Item::parse(
                &message.message_id,
                &message.ordering_key,
                &message.attributes,
                &message.data,
            )
            .unwrap();
            let published = message
                .publish_time
                .as_ref()
                .map_or(0.0, |t| t.seconds() as f64 + f64::from(t.nanos()) / 1e9);
            self.distinct.insert(item.dedup_key());
            received.push((item, published));
            handler.ack();
        }
        received
    }
}

/// [`Inbox::take`] on a subscription read once.
async fn receive_items(
    stack: &Stack,
    subscription: &str,
    expected: usize,
    limit: Duration,
) -> Vec<(Item, f64)> {
    Inbox::open(stack, subscription)
        .await
        .take(expected, limit)
        .await
}

/// Every delivery through the verifier; the report.
fn verify(received: &[(Item, f64)]) -> outbox_consumer::Report {
    let mut verifier = Verifier::new(Contract::Global);
    for (item, _) in received {
        verifier.observe(item);
    }
    verifier.final_report()
}

async fn start_replay(stack: &Stack, admin: &str, body: Value) -> (u16, Value, Option<String>) {
    let response = stack
        .http
        .post(format!("{admin}/api/v1/outbox/replays"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.json().await.unwrap(), location)
}

/// `POST .../replays/{id}/{action}`: its status and body.
async fn act(stack: &Stack, admin: &str, id: &str, action: &str) -> (u16, Value) {
    let response = stack
        .http
        .post(format!("{admin}/api/v1/outbox/replays/{id}/{action}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET .../replays`.
async fn list(stack: &Stack, admin: &str) -> Value {
    stack
        .http
        .get(format!("{admin}/api/v1/outbox/replays"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The job as `admin` shows it; `null` when the relay does not answer in
/// time (callers poll).
async fn job(stack: &Stack, admin: &str, id: &str) -> Value {
    let request = stack
        .http
        .get(format!("{admin}/api/v1/outbox/replays/{id}"))
        .timeout(Duration::from_secs(10))
        .send();
    match request.await {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn wait_done(stack: &Stack, admin: &str, id: &str) -> Value {
    eventually(Duration::from_secs(90), "the replay to be done", || async {
        job(stack, admin, id).await["state"] == "done"
    })
    .await;
    job(stack, admin, id).await
}

/// Posts `count` batches of `size` items, one after another (so their
/// sequences follow the order of `tag`s).
async fn post_batches(stack: &Stack, count: usize, size: usize, tag: &str) {
    for b in 0..count {
        let body: Vec<Value> = (0..size)
            .map(|i| json!({"request_id": format!("{tag}{b}-{i}"), "vendor_name": "acme", "i": i}))
            .collect();
        stack.post_batch(&json!(body)).await;
    }
}

/// The batch sequences and positions the first deliveries cover.
fn positions(received: &[(Item, f64)]) -> BTreeSet<(u64, u32)> {
    received
        .iter()
        .map(|(i, _)| (i.position.batch_sequence, i.position.item_sequence))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_publishes_exactly_its_range_in_order_to_a_new_topic() {
    let stack = start_stack().await;
    let (_relay, admin) = stack.relay("relay-replay", &relay_vars());
    stack.admin_ready(&admin).await;
    let sizes = [5_usize, 7, 3, 6, 4, 8];
    for (b, &n) in sizes.iter().enumerate() {
        post_batches(&stack, 1, n, &format!("s{b}-")).await;
    }
    let total: usize = sizes.iter().sum();
    let live = receive_items(&stack, &stack.subscription, total, Duration::from_secs(60)).await;
    assert!(verify(&live).held());

    let target = format!("replay-{}", uuid::Uuid::new_v4().simple());
    let subscription = topic(&stack, &target).await;
    // Batches 2..=5: 7 + 3 + 6 + 4 items.
    let (status, started, location) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 2, "to_sequence": 5, "topic": target}),
    )
    .await;
    assert_eq!(status, 201, "{started}");
    let id = started["replay_id"].as_str().unwrap().to_owned();
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/v1/outbox/replays/{id}").as_str())
    );
    assert_eq!(started["items_total"], 20);
    assert_eq!(started["batches_total"], 4);
    assert_eq!(started["stream"], "default");

    let copies = receive_items(&stack, &subscription, 20, Duration::from_secs(60)).await;
    let report = verify(&copies);
    assert!(report.held(), "{report:?}");
    assert_eq!(report.firsts, 20);
    // Exactly the range: every position of batches 2..=5, nothing else.
    let expected: BTreeSet<(u64, u32)> = (2..=5_u64)
        .flat_map(|b| (1..=sizes[b as usize - 1] as u32).map(move |i| (b, i)))
        .collect();
    assert_eq!(positions(&copies), expected);
    // The originals' ids, the job's id, keys of its own.
    let originals: HashMap<(u64, u32), String> = live
        .iter()
        .map(|(i, _)| {
            (
                (i.position.batch_sequence, i.position.item_sequence),
                i.item_id.clone(),
            )
        })
        .collect();
    for (copy, _) in &copies {
        let at = (copy.position.batch_sequence, copy.position.item_sequence);
        assert_eq!(copy.item_id, originals[&at]);
        assert_eq!(copy.replay_id.as_deref(), Some(id.as_str()));
        assert_eq!(copy.ordering_key, format!("replay:{id}:batch-outbox"));
    }
    let done = wait_done(&stack, &admin, &id).await;
    assert_eq!(done["items_sent"], 20);
    assert_eq!(done["batches_sent"], 4);

    // What cannot be replayed, and what cannot be done to a finished job.
    let (status, problem, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 4, "to_sequence": 9}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("range_not_committed"))
    );
    assert_eq!(problem["committed_through"], 6);
    let (status, problem, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 3, "to_sequence": 2}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("invalid_replay"))
    );
    let (status, problem, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 1, "to_sequence": 1, "stream": "nope"}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("stream_not_found"))
    );
    assert_eq!(act(&stack, &admin, &id, "pause").await.0, 409);
    let unknown = stack
        .http
        .get(format!(
            "{admin}/api/v1/outbox/replays/{}",
            uuid::Uuid::new_v4()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        list(&stack, &admin).await["replays"][0]["replay_id"],
        id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_survives_its_leader_being_killed_and_can_be_paused_and_resumed() {
    let stack = start_stack().await;
    let vars = relay_vars();
    let mut relays = vec![
        stack.relay("relay-r1", &vars),
        stack.relay("relay-r2", &vars),
    ];
    for (_, admin) in &relays {
        stack.admin_ready(admin).await;
    }
    post_batches(&stack, 10, 20, "k").await;
    let live = receive_items(&stack, &stack.subscription, 200, Duration::from_secs(60)).await;
    assert!(verify(&live).held());

    let target = format!("replay-{}", uuid::Uuid::new_v4().simple());
    let subscription = topic(&stack, &target).await;
    let admin = relays[0].1.clone();
    // 200 items at 40 a second: about five seconds.
    let (status, started, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 1, "to_sequence": 10, "topic": target, "max_items_per_second": 40}),
    )
    .await;
    assert_eq!(status, 201, "{started}");
    let id = started["replay_id"].as_str().unwrap().to_owned();

    // Pause it part way: it stops, and says where.
    eventually(Duration::from_secs(30), "the replay to start", || async {
        job(&stack, &admin, &id).await["items_sent"]
            .as_u64()
            .unwrap_or(0)
            >= 20
    })
    .await;
    assert_eq!(act(&stack, &admin, &id, "pause").await.0, 200);
    let (status, resumed) = act(&stack, &admin, &id, "resume").await;
    assert_eq!(status, 200);
    assert_eq!(resumed["state"], "running");

    // Kill the stream's leader while the job runs.
    eventually(
        Duration::from_secs(30),
        "the replay to get a third of the way",
        || async {
            job(&stack, &admin, &id).await["items_sent"]
                .as_u64()
                .unwrap_or(0)
                >= 60
        },
    )
    .await;
    let leader = stack
        .http
        .get(format!("{admin}/api/v1/streams/default"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["leader"]["relay_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let index = usize::from(leader == "relay-r2");
    relays[index].0.kill_hard();
    let survivor = relays[1 - index].1.clone();
    let copies = receive_items(&stack, &subscription, 200, Duration::from_secs(90)).await;
    let report = verify(&copies);
    assert!(report.held(), "{report:?}");
    assert_eq!(report.firsts, 200);
    let done = wait_done(&stack, &survivor, &id).await;
    assert_eq!(done["items_sent"], 200);
    assert_eq!(done["batches_sent"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_beside_the_live_drain_keeps_both_in_order_and_holds_its_rate() {
    let stack = start_stack().await;
    let (_relay, admin) = stack.relay("relay-beside", &relay_vars());
    stack.admin_ready(&admin).await;
    post_batches(&stack, 10, 20, "a").await;
    let mut inbox = Inbox::open(&stack, &stack.subscription).await;
    let first = inbox.take(200, Duration::from_secs(60)).await;
    assert!(verify(&first).held());

    // The copies go to the live topic itself, at 50 a second, while ten
    // more batches are drained.
    let (status, started, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 1, "to_sequence": 10, "max_items_per_second": 50}),
    )
    .await;
    assert_eq!(status, 201, "{started}");
    let id = started["replay_id"].as_str().unwrap().to_owned();
    post_batches(&stack, 10, 20, "b").await;
    let mixed = inbox.take(400, Duration::from_secs(90)).await;
    let report = verify(&mixed);
    assert!(report.held(), "{report:?}");
    let (copies, live): (Vec<_>, Vec<_>) = mixed.iter().partition(|(i, _)| i.replay_id.is_some());
    let live_positions: BTreeSet<u64> = live
        .iter()
        .map(|(i, _)| i.position.batch_sequence)
        .collect();
    assert_eq!(live_positions, (11..=20).collect());
    assert!(
        copies
            .iter()
            .all(|(i, _)| i.replay_id.as_deref() == Some(id.as_str()))
    );
    // The rate: pages of at most a second's worth (50), the n-th page not
    // before n seconds after the first; so 200 copies span at least 3 s.
    let times: Vec<f64> = copies.iter().map(|(_, at)| *at).collect();
    let span = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        span >= 2.9,
        "200 copies at 50/s were published within {span:.2} s"
    );
    wait_done(&stack, &admin, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_retention_removed_is_refused_with_410() {
    let stack = start_stack().await;
    let mut vars = relay_vars().to_vec();
    vars.extend([
        ("RETENTION_SECONDS", "1"),
        ("RETENTION_INTERVAL_SECONDS", "1"),
    ]);
    let (_relay, admin) = stack.relay("relay-retention", &vars);
    stack.admin_ready(&admin).await;
    post_batches(&stack, 3, 2, "r").await;
    let _ = receive_items(&stack, &stack.subscription, 6, Duration::from_secs(60)).await;
    let batches = stack.db.collection::<Document>("batches");
    eventually(
        Duration::from_secs(60),
        "retention to remove the batches",
        || async { batches.count_documents(doc! {}).await.unwrap() == 0 },
    )
    .await;
    let (status, problem, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 1, "to_sequence": 3}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (410, Some("range_removed")),
        "{problem}"
    );
    assert_eq!(problem["first_available_sequence"], 4);
    assert_eq!(
        list(&stack, &admin).await["replays"],
        json!([]),
        "a refused replay stores nothing"
    );
}

/// A replay to a topic that does not exist is refused when it is started,
/// saying how to create it; a relay that creates topics
/// (`PUBSUB_CREATE_TOPIC`, as dev-up runs it) creates it instead, and the
/// copies arrive there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_to_a_missing_topic_is_refused_or_the_topic_made() {
    let stack = start_stack().await;
    let (relay, admin) = stack.relay("relay-topics", &relay_vars());
    stack.admin_ready(&admin).await;
    post_batches(&stack, 2, 2, "t").await;
    let _ = receive_items(&stack, &stack.subscription, 4, Duration::from_secs(60)).await;
    let missing = format!("{}-nowhere", stack.pubsub.topic);
    let (status, problem, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 1, "to_sequence": 2, "topic": missing}),
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("topic_not_found")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("gcloud pubsub topics create"),
        "{problem}"
    );
    assert_eq!(list(&stack, &admin).await["replays"], json!([]));
    drop(relay);

    let mut vars = relay_vars().to_vec();
    vars.push(("PUBSUB_CREATE_TOPIC", "true"));
    let (_relay, admin) = stack.relay("relay-topics-2", &vars);
    stack.admin_ready(&admin).await;
    let made = format!("{}-made", stack.pubsub.topic);
    let (status, job, _) = start_replay(
        &stack,
        &admin,
        json!({"from_sequence": 1, "to_sequence": 2, "topic": made}),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(
        pubsub::topic_state(&stack.pubsub.for_topic(&made)).await,
        pubsub::TopicState::Exists
    );
    let id = job["replay_id"].as_str().unwrap().to_owned();
    assert_eq!(wait_done(&stack, &admin, &id).await["state"], "done");
}
