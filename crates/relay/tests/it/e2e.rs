//! The real binaries against MongoDB (or its stand-in) and Google's Pub/Sub
//! emulator: a subscriber with message ordering must receive every item in
//! (batch_sequence, item_sequence) order, also across a leader crash.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use relay::pubsub::{self, PubSubConfig};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run scripts/test.sh, which starts MongoDB and the Pub/Sub emulator"
        )
    })
}

pub(crate) fn free_port() -> u16 {
    outbox_service::ports::free_port()
}

pub(crate) fn binary(name: &str) -> PathBuf {
    let relay = PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"));
    let path = relay.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A child process killed when dropped, its output in a log file.
pub(crate) struct Process {
    pub(crate) child: Child,
    name: String,
    log: PathBuf,
}

impl Process {
    pub(crate) fn spawn(name: &str, program: PathBuf, vars: &[(&str, String)]) -> Self {
        Self::spawn_args(name, program, &[], vars)
    }

    pub(crate) fn spawn_args(
        name: &str,
        program: PathBuf,
        args: &[String],
        vars: &[(&str, String)],
    ) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log = dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LOG_FORMAT", "pretty")
            .env("RUST_LOG", "info")
            // Relays without ADMIN_TOKEN (tests that want one set it).
            .env("ADMIN_INSECURE_NO_TOKEN", "true")
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        let child = command.spawn().unwrap();
        Self {
            child,
            name: name.to_owned(),
            log,
        }
    }

    pub(crate) fn kill_hard(&mut self) {
        let pid = self.child.id().expect("running") as i32;
        // SIGKILL: no lease release, no flush, nothing.
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`, ...) with `kill(1)`.
    pub(crate) fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    pub(crate) fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().rev().take(30).collect();
        format!(
            "--- last lines of {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

pub(crate) async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) struct Stack {
    pub(crate) database: String,
    pub(crate) pubsub: PubSubConfig,
    pub(crate) subscription: String,
    pub(crate) writer: Process,
    pub(crate) writer_url: String,
    pub(crate) http: reqwest::Client,
    pub(crate) db: mongodb::Database,
    /// The MongoDB the stack runs on, and whether it is the stand-in.
    pub(crate) mongo_url: String,
    pub(crate) standin: bool,
}

pub(crate) async fn start_stack() -> Stack {
    let standin = std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin");
    // The shared stand-in runs one transaction at a time for every test
    // running in parallel: give the writer room beyond its 2 s default.
    let deadline = [("REQUEST_DEADLINE_SECONDS", "30".to_owned())];
    start_stack_on(&env("MONGODB_URL"), standin, &deadline).await
}

/// A writer (with `writer_vars` added to its environment) on the MongoDB at
/// `mongo_url`, a fresh database, topic and ordered subscription.
pub(crate) async fn start_stack_on(
    mongo_url: &str,
    standin: bool,
    writer_vars: &[(&str, String)],
) -> Stack {
    let mongo_url = mongo_url.to_owned();
    let emulator = env("PUBSUB_EMULATOR_HOST");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("e2e_{suffix}");
    let pubsub = PubSubConfig {
        project_id: "e2e-project".to_owned(),
        topic: format!("outbox-{suffix}"),
        emulator_host: Some(emulator),
        endpoint: None,
        publish_retry_limit: Duration::from_secs(30),
        batch_delay: Duration::from_millis(1),
    };
    let subscription = format!("ordered-{suffix}");
    pubsub::ensure_topic(&pubsub).await.expect("topic");
    pubsub::ensure_subscription(&pubsub, &subscription, true)
        .await
        .expect("subscription");

    let port = free_port();
    let mut vars = vec![
        ("WRITER_BIND", format!("127.0.0.1:{port}")),
        ("MONGODB_URL", mongo_url.clone()),
        ("MONGODB_DATABASE", database.clone()),
    ];
    vars.extend(writer_vars.iter().map(|(k, v)| (*k, v.clone())));
    let writer = Process::spawn("writer", binary("outbox-writer"), &vars);
    let writer_url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let ready = format!("{writer_url}/health/ready");
    eventually(Duration::from_secs(60), "the writer to be ready", || {
        let request = http.get(&ready).send();
        async move { request.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let db = mongodb::Client::with_uri_str(&mongo_url)
        .await
        .unwrap()
        .database(&database);
    Stack {
        database,
        pubsub,
        subscription,
        writer,
        writer_url,
        http,
        db,
        mongo_url,
        standin,
    }
}

impl Stack {
    pub(crate) fn relay(&self, id: &str, extra: &[(&str, &str)]) -> (Process, String) {
        let port = free_port();
        let mut vars = vec![
            ("MONGODB_URL", self.mongo_url.clone()),
            ("MONGODB_DATABASE", self.database.clone()),
            (
                "PUBSUB_EMULATOR_HOST",
                self.pubsub.emulator_host.clone().unwrap(),
            ),
            ("PUBSUB_PROJECT_ID", self.pubsub.project_id.clone()),
            ("PUBSUB_TOPIC", self.pubsub.topic.clone()),
            ("RELAY_ID", id.to_owned()),
            ("RELAY_ADMIN_BIND", format!("127.0.0.1:{port}")),
            // The stand-in's change-stream getMore blocks other commands on
            // the database; the relay polls there instead.
            ("OUTBOX_CHANGE_STREAM", (!self.standin).to_string()),
            // The stand-in makes reads wait for an open transaction.
            ("LEASE_KILL_ON_BLOCKED_READ", self.standin.to_string()),
        ];
        vars.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        (
            Process::spawn(id, binary("outbox-relay"), &vars),
            format!("http://127.0.0.1:{port}"),
        )
    }

    /// Waits until the relay's admin port at `admin` answers ready.
    /// `GET url` and its JSON answer.
    pub(crate) async fn get_json(&self, url: &str) -> Value {
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub(crate) async fn admin_ready(&self, admin: &str) {
        let ready = format!("{admin}/health/ready");
        eventually(Duration::from_secs(60), "the relay's admin port", || {
            let request = self.http.get(&ready).send();
            async move { request.await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    /// Posts one batch as JSON; the writer must store it.
    pub(crate) async fn post_batch(&self, body: &Value) {
        let response = self
            .http
            .post(format!("{}/api/v1/batch/process", self.writer_url))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    /// Submits batches of the given sizes, all at once.
    pub(crate) async fn submit(&self, sizes: &[usize]) {
        let requests = sizes.iter().enumerate().map(|(b, &n)| {
            let body: Vec<Value> = (0..n)
                .map(|i| json!({"request_id": format!("b{b}-i{i}"), "vendor_name": "acme", "i": i}))
                .collect();
            let request = self
                .http
                .post(format!("{}/api/v1/batch/process", self.writer_url))
                .header("traceparent", traceparent_of(b))
                .json(&body)
                .send();
            async move {
                let response = request.await.expect("writer answers");
                assert_eq!(response.status(), 201);
            }
        });
        futures::future::join_all(requests).await;
    }

    /// Stores a batch the way a writer before the Pub/Sub limit checks
    /// did, so it may hold an item Pub/Sub refuses (the writer now answers
    /// 413 or 422 for those): the items, then the batch document with the
    /// next sequence. Returns the batch id.
    pub(crate) async fn store_unchecked(&self, objects: &[Value]) -> String {
        self.store_unchecked_in(&outbox_core::stream::StreamName::default(), objects)
            .await
    }

    /// [`Stack::store_unchecked`] into `stream`.
    pub(crate) async fn store_unchecked_in(
        &self,
        stream: &outbox_core::stream::StreamName,
        objects: &[Value],
    ) -> String {
        use outbox_core::model::{BatchId, ItemId, ItemSequence, NewBatch, NewItem, Sequence};
        let counter_id = if stream.is_default() {
            "batch_sequence".to_owned()
        } else {
            format!("batch_sequence:{stream}")
        };
        let counter = self
            .db
            .collection::<Document>("outbox_counters")
            .find_one_and_update(
                doc! { "_id": counter_id },
                doc! { "$inc": { "value": 1_i64 } },
            )
            .return_document(mongodb::options::ReturnDocument::After)
            .await
            .unwrap()
            .expect("the writer created the counter");
        let sequence = match counter.get("value") {
            Some(mongodb::bson::Bson::Int32(n)) => u64::try_from(*n).unwrap(),
            Some(mongodb::bson::Bson::Int64(n)) => u64::try_from(*n).unwrap(),
            other => panic!("counter {other:?}"),
        };
        let batch_id = BatchId::random();
        let items: Vec<NewItem> = objects
            .iter()
            .enumerate()
            .map(|(index, object)| {
                let item_sequence = ItemSequence(u32::try_from(index + 1).unwrap());
                NewItem {
                    item_id: ItemId::of(&batch_id, item_sequence),
                    item_sequence,
                    request_id: object["request_id"].as_str().map(str::to_owned),
                    vendor_name: object["vendor_name"]
                        .as_str()
                        .unwrap_or("unknown")
                        .to_owned(),
                    request_data: object.as_object().unwrap().clone(),
                    stored: None,
                }
            })
            .collect();
        let mut vendor_counts = std::collections::BTreeMap::new();
        for item in &items {
            *vendor_counts.entry(item.vendor_name.clone()).or_insert(0) += 1;
        }
        let batch = NewBatch {
            batch_id: batch_id.clone(),
            stream: stream.clone(),
            created_at: chrono::Utc::now(),
            items,
            vendor_counts,
            idempotency: None,
            submitted_by: None,
            traceparent: None,
        };
        let documents: Vec<Document> = batch
            .items
            .iter()
            .map(|item| {
                let mut document = outbox_mongo::documents::item_document(&batch, item);
                document.insert("batch_sequence", i64::try_from(sequence).unwrap());
                document
            })
            .collect();
        self.db
            .collection::<Document>("batch_items")
            .insert_many(documents)
            .await
            .unwrap();
        self.db
            .collection::<Document>("batches")
            .insert_one(outbox_mongo::documents::batch_document(
                &batch,
                Sequence(sequence),
                0,
            ))
            .await
            .unwrap();
        batch_id.to_string()
    }

    pub(crate) async fn items(&self) -> Vec<Document> {
        self.db
            .collection::<Document>("batch_items")
            .find(doc! {})
            .sort(doc! { "batch_sequence": 1, "item_sequence": 1 })
            .projection(doc! { "request_data": 0 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }
}

/// The trace context [`Stack::submit`] sends with the `b`th batch.
pub(crate) fn traceparent_of(b: usize) -> String {
    format!("00-{:032x}-00f067aa0ba902b7-01", 0xabc000 + b)
}

/// One received message.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// The message's ordering key ("" when none).
    pub(crate) key: String,
    /// Its `stream` attribute.
    pub(crate) stream: String,
    message_id: String,
    item_id: String,
    pub(crate) position: (u64, u64),
    last: bool,
    traceparent: Option<String>,
    /// When Pub/Sub accepted the message (its `publish_time`), in ns.
    published_ns: i128,
}

/// Receives until `expected` distinct items arrived; returns every delivery
/// in arrival order (duplicates included).
pub(crate) async fn receive(
    stack: &Stack,
    expected: usize,
    limit: Duration,
    on_message: impl Fn(usize),
) -> Vec<Received> {
    receive_on(stack, &stack.subscription, expected, limit, on_message).await
}

/// [`receive`] from another subscription of the stack's topic.
pub(crate) async fn receive_on(
    stack: &Stack,
    subscription: &str,
    expected: usize,
    limit: Duration,
    on_message: impl Fn(usize),
) -> Vec<Received> {
    let client = pubsub::subscriber(&stack.pubsub).await.unwrap();
    let mut stream = client
        .subscribe(stack.pubsub.subscription_path(subscription))
        .build();
    let mut received = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let deadline = Instant::now() + limit;
    while distinct.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(remaining, stream.next()).await;
        let Ok(Some(Ok((message, handler)))) = next else {
            panic!(
                "received {} of {expected} items before giving up ({next:?})",
                distinct.len()
            );
        };
        let number = |key: &str| message.attributes[key].parse::<u64>().unwrap();
        let data: Value = serde_json::from_slice(&message.data).unwrap();
        assert_eq!(data["item_id"], message.attributes["item_id"].as_str());
        received.push(Received {
            key: message.ordering_key.clone(),
            stream: message
                .attributes
                .get("stream")
                .cloned()
                .unwrap_or_default(),
            message_id: message.message_id.clone(),
            item_id: message.attributes["item_id"].clone(),
            position: (number("batch_sequence"), number("item_sequence")),
            last: message
                .attributes
                .get("batch_last")
                .is_some_and(|v| v == "true"),
            traceparent: message.attributes.get("traceparent").cloned(),
            published_ns: message.publish_time.as_ref().map_or(0, |t| {
                i128::from(t.seconds()) * 1_000_000_000 + i128::from(t.nanos())
            }),
        });
        distinct.insert(message.attributes["item_id"].clone());
        handler.ack();
        on_message(distinct.len());
    }
    received
}

/// First deliveries in arrival order, and the number of duplicates.
pub(crate) fn firsts(received: &[Received]) -> (Vec<Received>, usize) {
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<_> = received
        .iter()
        .filter(|r| seen.insert(r.item_id.clone()))
        .cloned()
        .collect();
    let duplicates = received.len() - firsts.len();
    (firsts, duplicates)
}

pub(crate) fn assert_in_order(firsts: &[Received], sizes_by_sequence: &BTreeMap<u64, u64>) {
    let expected: Vec<(u64, u64)> = sizes_by_sequence
        .iter()
        .flat_map(|(b, n)| (1..=*n).map(move |i| (*b, i)))
        .collect();
    let got: Vec<_> = firsts.iter().map(|r| r.position).collect();
    assert_eq!(got.len(), expected.len());
    if let Some(at) = got.iter().zip(&expected).position(|(g, e)| g != e) {
        panic!(
            "first deliveries out of order at {at}: got {:?}, expected {:?}",
            &got[at..(at + 5).min(got.len())],
            &expected[at..(at + 5).min(expected.len())]
        );
    }
    for r in firsts {
        assert_eq!(
            r.last,
            sizes_by_sequence[&r.position.0] == r.position.1,
            "batch_last wrong on {:?}",
            r.position
        );
    }
}

/// The batch boundary, seen from the subscriber whatever the ordering keys:
/// Pub/Sub accepted every message of batch N (its `publish_time`) no later
/// than any message of batch N+1, because the relay publishes N+1 only once
/// N is acknowledged; and every batch arrived whole.
pub(crate) fn assert_batches_published_whole(firsts: &[Received], sizes: &BTreeMap<u64, u64>) {
    let mut spans: BTreeMap<u64, (i128, i128, u64)> = BTreeMap::new();
    for r in firsts {
        assert!(r.published_ns > 0, "no publish_time on {:?}", r.position);
        let span = spans
            .entry(r.position.0)
            .or_insert((i128::MAX, i128::MIN, 0));
        *span = (
            span.0.min(r.published_ns),
            span.1.max(r.published_ns),
            span.2 + 1,
        );
    }
    for (sequence, (_, _, count)) in &spans {
        assert_eq!(
            Some(count),
            sizes.get(sequence),
            "batch {sequence} incomplete"
        );
    }
    for (a, b) in spans.iter().zip(spans.iter().skip(1)) {
        assert!(
            a.1.1 <= b.1.0,
            "batch {} was accepted by Pub/Sub until {} ns, after batch {} began at {} ns",
            a.0,
            a.1.1,
            b.0,
            b.1.0
        );
    }
}

/// `sent: true`. The stand-in stores a boolean written with `$set` as the
/// integer 1 (a gap like its DateTime-as-string one); MongoDB keeps the bool.
pub(crate) fn is_true(value: Option<&mongodb::bson::Bson>) -> bool {
    use mongodb::bson::Bson;
    match value {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(1)) => std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin"),
        _ => false,
    }
}

pub(crate) fn sizes_by_sequence(items: &[Document]) -> BTreeMap<u64, u64> {
    let mut sizes = BTreeMap::new();
    for item in items {
        let seq = match item.get("batch_sequence") {
            Some(mongodb::bson::Bson::Int32(v)) => *v as u64,
            Some(mongodb::bson::Bson::Int64(v)) => *v as u64,
            other => panic!("batch_sequence {other:?}"),
        };
        *sizes.entry(seq).or_insert(0) += 1;
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_batches_arrive_in_order_with_their_publish_ids() {
    let stack = start_stack().await;
    let (relay, _admin) = stack.relay("relay-e2e", &[("OUTBOX_POLL_INTERVAL_SECONDS", "0.2")]);
    let sizes: Vec<usize> = (0..50).map(|b| 1 + (b * 7) % 20).collect();
    let total: usize = sizes.iter().sum();
    stack.submit(&sizes).await;

    let received = receive(&stack, total, Duration::from_secs(120), |_| {}).await;
    let (firsts, duplicates) = firsts(&received);
    let items = stack.items().await;
    assert_eq!(items.len(), total);
    assert_in_order(&firsts, &sizes_by_sequence(&items));
    assert_batches_published_whole(&firsts, &sizes_by_sequence(&items));
    eprintln!(
        "e2e: {total} items in 50 batches received in order; {duplicates} duplicate deliveries"
    );

    // The marks land right after the acknowledgements: wait for them, then
    // every stored publish_id must be the message id the subscriber saw.
    let received_ids: HashMap<_, _> = firsts
        .iter()
        .map(|r| (r.item_id.clone(), r.message_id.clone()))
        .collect();
    let batches = stack.db.collection::<Document>("batches");
    eventually(
        Duration::from_secs(30),
        "every batch to be committed",
        || {
            let count = batches.count_documents(doc! { "status": "committed" });
            async move { count.await.unwrap() == 50 }
        },
    )
    .await;
    // Every message carries its batch's trace context: the writer's span in
    // the trace each request started.
    let traceparents: HashMap<u64, String> = batches
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|b| {
            let sequence = b.get_i64("batch_sequence").map_or_else(
                |_| u64::try_from(b.get_i32("batch_sequence").unwrap()).unwrap(),
                |v| u64::try_from(v).unwrap(),
            );
            (sequence, b.get_str("traceparent").unwrap().to_owned())
        })
        .collect();
    let sent: std::collections::HashSet<String> = (0..50)
        .map(|b| traceparent_of(b)[3..35].to_owned())
        .collect();
    for r in &received {
        let traceparent = r.traceparent.as_deref().expect("a traceparent attribute");
        assert_eq!(traceparent, traceparents[&r.position.0]);
        assert!(sent.contains(&traceparent[3..35]), "{traceparent}");
    }
    for item in stack.items().await {
        let item_id = item.get_str("item_id").unwrap();
        assert_eq!(item.get_str("status").unwrap(), "sent");
        assert!(is_true(item.get("sent")), "sent: {:?}", item.get("sent"));
        assert_eq!(
            Some(item.get_str("publish_id").unwrap()),
            received_ids.get(item_id).map(String::as_str),
            "{}",
            relay.tail()
        );
    }
    drop(relay);
    drop(stack.writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_batch_loses_nothing_and_keeps_first_deliveries_in_order() {
    let stack = start_stack().await;
    let fast = [
        ("LEASE_TTL_SECONDS", "2"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        // Small pages so a batch takes several round trips and the kill lands mid-batch.
        ("OUTBOX_BATCH_SIZE", "10"),
    ];
    let (mut a, admin_a) = stack.relay("relay-a", &fast);
    let http = stack.http.clone();
    let status_a = format!("{admin_a}/api/v1/outbox/status");
    eventually(Duration::from_secs(30), "relay-a to lead", || {
        let request = http.get(&status_a).send();
        async move {
            match request.await {
                Ok(r) => r.json::<Value>().await.is_ok_and(|s| s["role"] == "leader"),
                Err(_) => false,
            }
        }
    })
    .await;
    let (b, admin_b) = stack.relay("relay-b", &fast);

    let sizes = vec![100; 20];
    let total: usize = sizes.iter().sum();
    stack.submit(&sizes).await;

    // Kill the leader once a few hundred items are out: it is mid-batch.
    let kill_at = 250;
    let killed = std::sync::atomic::AtomicBool::new(false);
    let a_cell = std::sync::Mutex::new(&mut a);
    let received = receive(&stack, total, Duration::from_secs(240), |distinct| {
        if distinct >= kill_at && !killed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            a_cell.lock().unwrap().kill_hard();
        }
    })
    .await;
    assert!(killed.load(std::sync::atomic::Ordering::SeqCst));
    let (firsts, duplicates) = firsts(&received);
    let items = stack.items().await;
    assert_eq!(firsts.len(), total, "every item arrived");
    assert_in_order(&firsts, &sizes_by_sequence(&items));
    eprintln!(
        "e2e failover: {total} items, leader SIGKILLed after {kill_at}; first deliveries in order; {duplicates} duplicate deliveries (at-least-once)"
    );

    let status: Value = stack
        .http
        .get(format!("{admin_b}/api/v1/outbox/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["lease"]["holder"], "relay-b", "{}", b.tail());
    assert!(status["lease"]["epoch"].as_u64().unwrap() >= 2);
    // The stream's published count comes from the store: what the killed
    // leader recorded is still in it, on the survivor.
    eventually(
        Duration::from_secs(30),
        "the stream's count of everything",
        || async {
            let streams = stack.get_json(&format!("{admin_b}/api/v1/streams")).await;
            streams["streams"][0]["published_total"].as_u64() >= Some(total as u64)
        },
    )
    .await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_limits_are_refused_at_ingest_and_an_older_poison_item_is_dead_lettered() {
    let stack = start_stack().await;
    let (relay, _admin) = stack.relay(
        "relay-poison",
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("OUTBOX_ON_POISON", "dead-letter"),
        ],
    );
    // 11 MB: storable in MongoDB (16 MiB), over Pub/Sub's 10 MB message
    // limit. The writer refuses it now; one stored before it did is
    // dead-lettered with the reason.
    let body = json!([
        {"request_id": "first", "vendor_name": "acme"},
        {"request_id": "huge", "vendor_name": "acme", "blob": "x".repeat(11_000_000)},
        {"request_id": "last", "vendor_name": "acme"},
    ]);
    let refused = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "item_too_large");
    assert_eq!(problem["index"], 1);
    // A request id over Pub/Sub's 1,024 bytes an attribute: refused too.
    let long_id = json!([{"request_id": "r".repeat(2000), "vendor_name": "acme"}]);
    let refused = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .json(&long_id)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "attribute_too_long");
    assert_eq!(problem["field"], "request_id");
    assert_eq!(stack.items().await.len(), 0, "nothing stored");

    let mut stored = body.as_array().unwrap().clone();
    stored.insert(2, long_id[0].clone());
    stack.store_unchecked(&stored).await;

    let received = receive(&stack, 2, Duration::from_secs(120), |_| {}).await;
    let (firsts, _) = firsts(&received);
    let positions: Vec<_> = firsts.iter().map(|r| r.position).collect();
    assert_eq!(positions, [(1, 1), (1, 4)], "{}", relay.tail());

    let batches = stack.db.collection::<Document>("batches");
    eventually(Duration::from_secs(30), "the batch to be committed", || {
        let batch = batches.find_one(doc! { "status": "committed" });
        async move { batch.await.unwrap().is_some() }
    })
    .await;
    let batch = batches.find_one(doc! {}).await.unwrap().unwrap();
    let failed = match batch.get("failed_items") {
        Some(mongodb::bson::Bson::Int32(n)) => i64::from(*n),
        Some(mongodb::bson::Bson::Int64(n)) => *n,
        other => panic!("failed_items {other:?}"),
    };
    assert_eq!(failed, 2);
    let items = stack.items().await;
    let statuses: Vec<_> = items.iter().map(|i| i.get_str("status").unwrap()).collect();
    assert_eq!(statuses, ["sent", "failed", "failed", "sent"]);
    let dead: Vec<Document> = stack
        .db
        .collection::<Document>("dead_letters")
        .find(doc! {})
        .sort(doc! { "item_sequence": 1 })
        .projection(doc! { "request_data": 0 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].get_str("request_id").unwrap(), "huge");
    let reasons: Vec<_> = dead.iter().map(|d| d.get_str("error").unwrap()).collect();
    assert!(
        reasons[0].contains("over Pub/Sub's limit of 9998976 bytes"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("attribute request_id would be 2000 bytes"),
        "{reasons:?}"
    );
    drop(relay);
}

/// `field:/vendor_name`: every vendor's items arrive in order on their own
/// ordering key, every batch whole, with the real binaries and the emulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_by_a_field_keeps_each_keys_order() {
    let stack = start_stack().await;
    let (relay, _admin) = stack.relay(
        "relay-field",
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("OUTBOX_BATCH_SIZE", "7"),
            ("PUBSUB_ORDERING_KEY_MODE", "field:/vendor_name"),
            ("PUBSUB_ORDERING_KEY_DEFAULT", "no-vendor"),
        ],
    );
    let batches = 10;
    let per_batch = 20;
    for b in 0..batches {
        let body: Vec<Value> = (0..per_batch)
            .map(|i| {
                if i % 5 == 4 {
                    json!({"request_id": format!("b{b}-i{i}"), "i": i})
                } else {
                    json!({"request_id": format!("b{b}-i{i}"), "vendor_name": format!("v{}", i % 4), "i": i})
                }
            })
            .collect();
        stack.post_batch(&json!(body)).await;
    }
    let total = batches * per_batch;
    let received = receive(&stack, total, Duration::from_secs(120), |_| {}).await;
    let (firsts, duplicates) = firsts(&received);
    assert_eq!(firsts.len(), total);
    let mut by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for r in &firsts {
        let i = r.position.1 - 1;
        let expected_key = if i % 5 == 4 {
            "no-vendor".to_owned()
        } else {
            format!("v{}", i % 4)
        };
        assert_eq!(r.key, expected_key, "{:?}", r.position);
        by_key.entry(r.key.clone()).or_default().push(r.position);
    }
    for (key, positions) in &by_key {
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {positions:?}\n{}",
            relay.tail()
        );
    }
    let sizes: BTreeMap<u64, u64> = (1..=batches as u64)
        .map(|b| (b, per_batch as u64))
        .collect();
    assert_batches_published_whole(&firsts, &sizes);
    eprintln!(
        "field ordering: {total} items on {} keys, each key in order; {duplicates} duplicates",
        by_key.len()
    );
}

/// `batch`: each batch on its own ordering key, its items in order, and
/// batch N whole at Pub/Sub before batch N+1 begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_by_batch_keeps_each_batch_in_order_and_whole() {
    let stack = start_stack().await;
    let (relay, _admin) = stack.relay(
        "relay-batch-key",
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("OUTBOX_BATCH_SIZE", "7"),
            ("PUBSUB_ORDERING_KEY_MODE", "batch"),
        ],
    );
    let sizes: Vec<usize> = (0..12).map(|b| 5 + (b * 11) % 17).collect();
    let total: usize = sizes.iter().sum();
    stack.submit(&sizes).await;
    let received = receive(&stack, total, Duration::from_secs(120), |_| {}).await;
    let (firsts, duplicates) = firsts(&received);
    let items = stack.items().await;
    let sizes = sizes_by_sequence(&items);
    let mut keys: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for r in &firsts {
        keys.entry(r.key.clone()).or_default().push(r.position);
    }
    assert_eq!(
        keys.len(),
        sizes.len(),
        "one ordering key a batch: {:?}",
        keys.keys()
    );
    for (key, positions) in &keys {
        assert!(
            positions.iter().all(|p| p.0 == positions[0].0),
            "key {key} spans batches"
        );
        let expected: Vec<u64> = (1..=sizes[&positions[0].0]).collect();
        let got: Vec<u64> = positions.iter().map(|p| p.1).collect();
        assert_eq!(got, expected, "key {key} out of order\n{}", relay.tail());
    }
    assert_batches_published_whole(&firsts, &sizes);
    eprintln!(
        "batch ordering: {total} items on {} keys; {duplicates} duplicates",
        keys.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_committed_batches_and_never_a_pending_one() {
    use outbox_core::store::OutboxStore;
    let stack = start_stack().await;
    let (relay, admin) = stack.relay(
        "relay-retention",
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("RETENTION_SECONDS", "1"),
            ("RETENTION_INTERVAL_SECONDS", "1"),
        ],
    );
    let body =
        json!([{"request_id": "keep-1"}, {"request_id": "keep-2"}, {"request_id": "keep-3"}]);
    let post = || {
        stack
            .http
            .post(format!("{}/api/v1/batch/process", stack.writer_url))
            .header("Idempotency-Key", "retention-1")
            .json(&body)
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 201);
    let received = receive(&stack, 3, Duration::from_secs(60), |_| {}).await;
    assert_eq!(firsts(&received).0.len(), 3);

    // Committed, then removed a second later: the batch and all its items.
    let batches = stack.db.collection::<Document>("batches");
    let items = stack.db.collection::<Document>("batch_items");
    eventually(
        Duration::from_secs(60),
        "retention to remove the committed batch",
        || {
            let (b, i) = (
                batches.count_documents(doc! {}),
                items.count_documents(doc! {}),
            );
            async move { b.await.unwrap() == 0 && i.await.unwrap() == 0 }
        },
    )
    .await;
    let metrics = stack
        .http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("outbox_relay_retention_removed_items_total 3"),
        "{metrics}"
    );

    // A retry of the removed batch's request is not stored again.
    let replay = post().await.unwrap();
    assert_eq!(replay.status(), 410);
    assert_eq!(
        replay.json::<Value>().await.unwrap()["code"],
        "batch_expired"
    );
    assert_eq!(batches.count_documents(doc! {}).await.unwrap(), 0);

    // With draining paused, a new batch stays pending: even a cutoff in the
    // future removes nothing that is not committed.
    let stop = stack
        .http
        .post(format!("{admin}/api/v1/outbox/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    stack.submit(&[4]).await;
    let store = outbox_mongo::MongoStore::connect(outbox_mongo::MongoConfig::new(
        stack.mongo_url.clone(),
        stack.database.clone(),
    ))
    .await
    .unwrap();
    let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);
    let removed = store
        .remove_expired(
            &outbox_core::stream::StreamName::default(),
            Some(tomorrow),
            Some(tomorrow),
            tomorrow,
            100,
        )
        .await
        .unwrap();
    assert_eq!(removed.batches, 0);
    assert_eq!(batches.count_documents(doc! {}).await.unwrap(), 1);
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 4);
    drop(relay);
}
