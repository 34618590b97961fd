//! MongoDB failures injected over the wire, against the real binaries, with
//! MongoDB's own test commands (`configureFailPoint` with `failCommand`,
//! `waitForFailPoint`, `killSessions`, `setParameter`). The stand-in
//! implements them; a real `mongod --setParameter enableTestCommands=1`
//! named by `MONGODB_URL` runs the same tests.
//!
//! Fail points are server-wide and a transaction left open stalls the
//! stand-in, so each test gets a private stand-in; against a real MongoDB
//! the tests take a file lock and run one at a time.

use std::collections::BTreeMap;
use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::e2e::{
    Process, Stack, assert_in_order, env, eventually, firsts, free_port, receive, receive_on,
    sizes_by_sequence, start_stack_on,
};

/// A MongoDB this test may inject faults into.
pub(crate) struct FaultyMongo {
    url: String,
    standin: bool,
    client: mongodb::Client,
    process: Option<Process>,
    _lock: Option<std::fs::File>,
}

impl FaultyMongo {
    /// A private stand-in with MongoDB's default transaction lifetime (60 s)
    /// unless `lifetime` says otherwise, or the `MONGODB_URL` server. `None`
    /// (after saying SKIPPED) when that server has no test commands.
    pub(crate) async fn start(test: &str, lifetime: Option<u32>) -> Option<Self> {
        let standin = std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin");
        let (url, process, lock) = if standin {
            let port = free_port();
            let mut args = vec![env("STANDIN_SCRIPT"), "--port".to_owned(), port.to_string()];
            if let Some(seconds) = lifetime {
                args.push("--setParameter".to_owned());
                args.push(format!("transactionLifetimeLimitSeconds={seconds}"));
            }
            let process = Process::spawn_args("standin", env("STANDIN_PYTHON").into(), &args, &[]);
            (
                format!("mongodb://127.0.0.1:{port}/?replicaSet=rs0"),
                Some(process),
                None,
            )
        } else {
            let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fail-points.lock");
            let file = std::fs::File::create(path).unwrap();
            let file = tokio::task::spawn_blocking(move || {
                file.lock().unwrap();
                file
            })
            .await
            .unwrap();
            (env("MONGODB_URL"), None, Some(file))
        };
        let client = mongodb::Client::with_uri_str(&url).await.unwrap();
        let admin = client.database("admin");
        let started = Instant::now();
        loop {
            let probe = admin
                .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
                .await;
            match probe {
                Ok(_) => break,
                Err(e)
                    if e.to_string().contains("no such command")
                        || e.to_string().contains("enableTestCommands") =>
                {
                    println!(
                        "SKIPPED {test}: the MongoDB at MONGODB_URL has no fail points ({e}); start it with --setParameter enableTestCommands=1"
                    );
                    return None;
                }
                Err(e) => assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "MongoDB did not answer: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mongo = Self {
            url,
            standin,
            client,
            process,
            _lock: lock,
        };
        if let (false, Some(seconds)) = (standin, lifetime) {
            mongo.set_lifetime(seconds).await;
        }
        Some(mongo)
    }

    pub(crate) fn url_for(&self, app_name: &str) -> String {
        format!("{}&appName={app_name}", self.url)
    }

    async fn set_lifetime(&self, seconds: u32) {
        self.client
            .database("admin")
            .run_command(doc! { "setParameter": 1, "transactionLifetimeLimitSeconds": seconds })
            .await
            .unwrap();
    }

    /// Configures `failCommand`; returns the count `waitForFailPoint` adds to.
    pub(crate) async fn fail_point(&self, mode: Bson, data: Document) -> i64 {
        let reply = self
            .client
            .database("admin")
            .run_command(doc! { "configureFailPoint": "failCommand", "mode": mode, "data": data })
            .await
            .unwrap();
        match reply.get("count") {
            Some(Bson::Int32(n)) => i64::from(*n),
            Some(Bson::Int64(n)) => *n,
            _ => 0,
        }
    }

    pub(crate) async fn fail_point_off(&self) {
        self.fail_point(Bson::String("off".into()), doc! {}).await;
    }

    pub(crate) async fn wait_for_fail_point(&self, times_entered: i64) {
        self.client
            .database("admin")
            .run_command(doc! {
                "waitForFailPoint": "failCommand",
                "timesEntered": times_entered,
                "maxTimeMS": 60_000,
            })
            .await
            .unwrap();
    }

    pub(crate) async fn stack(&self, writer_app: &str, writer_vars: &[(&str, String)]) -> Stack {
        let url = self.url_for(writer_app);
        start_stack_on(&url, self.standin, writer_vars).await
    }

    /// A relay on this MongoDB, its appName `app`.
    fn relay(
        &self,
        stack: &Stack,
        id: &str,
        app: &str,
        extra: &[(&str, &str)],
    ) -> (Process, String) {
        let url = self.url_for(app);
        let mut vars = extra.to_vec();
        vars.push(("MONGODB_URL", url.as_str()));
        stack.relay(id, &vars)
    }
}

impl Drop for FaultyMongo {
    fn drop(&mut self) {
        if let Some(process) = &self.process
            && let Some(pid) = process.child.id()
        {
            // A frozen stand-in must be able to die.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn number(value: Option<&Bson>) -> i64 {
    match value {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        other => panic!("not a number: {other:?}"),
    }
}

fn items_of(n: usize, tag: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"request_id": format!("{tag}-{i}"), "vendor_name": "acme", "i": i}))
            .collect(),
    )
}

/// POSTs a batch; returns the status and the JSON body.
async fn post(stack: &Stack, body: &Value, key: Option<&str>) -> (u16, Value, Duration) {
    let mut request = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let started = Instant::now();
    let response = request.send().await.expect("writer answers");
    let took = started.elapsed();
    let status = response.status().as_u16();
    if status == 503 {
        assert!(
            response.headers().contains_key("retry-after"),
            "503 without Retry-After"
        );
    }
    (status, response.json().await.unwrap_or(Value::Null), took)
}

async fn count(stack: &Stack, collection: &str) -> u64 {
    stack
        .db
        .collection::<Document>(collection)
        .count_documents(doc! {})
        .await
        .unwrap()
}

/// Stored batches' sequences in order, and each batch's stored item count.
async fn stored_sequences(stack: &Stack) -> Vec<(i64, u64, u64)> {
    use futures::TryStreamExt;
    let batches: Vec<Document> = stack
        .db
        .collection::<Document>("batches")
        .find(doc! {})
        .sort(doc! { "batch_sequence": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for batch in batches {
        let items = stack
            .db
            .collection::<Document>("batch_items")
            .count_documents(doc! { "batch_id": batch.get_str("batch_id").unwrap() })
            .await
            .unwrap();
        out.push((
            number(batch.get("batch_sequence")),
            u64::try_from(number(batch.get("total_items"))).unwrap(),
            items,
        ));
    }
    out
}

fn assert_gap_free(stored: &[(i64, u64, u64)]) {
    for (index, (sequence, total, items)) in stored.iter().enumerate() {
        assert_eq!(*sequence, index as i64 + 1, "sequences {stored:?}");
        assert_eq!(total, items, "batch {sequence} is not whole");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_retries_a_transient_write_conflict_on_the_counter() {
    let Some(mongo) = FaultyMongo::start("writer_retries_a_transient_write_conflict", None).await
    else {
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    let before = mongo
        .fail_point(
            Bson::Document(doc! { "times": 3 }),
            doc! {
                "failCommands": ["findAndModify"], "appName": &app,
                "errorCode": 112, "errorLabels": ["TransientTransactionError"],
            },
        )
        .await;
    for b in 0..3 {
        let (status, body, _) = post(&stack, &items_of(5, &format!("b{b}")), None).await;
        assert_eq!(status, 201, "{body} {}", stack.writer.tail());
    }
    mongo.wait_for_fail_point(before + 3).await;
    let stored = stored_sequences(&stack).await;
    assert_eq!(stored.len(), 3, "each batch stored once: {stored:?}");
    assert_gap_free(&stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_commit_result_is_retried_and_stores_one_batch() {
    let Some(mongo) = FaultyMongo::start("an_unknown_commit_result_is_retried", None).await else {
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    // Twice: the driver's own commit retry fails too, so ours must retry.
    let before = mongo
        .fail_point(
            Bson::Document(doc! { "times": 2 }),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &app,
                "errorCode": 91, "errorLabels": ["RetryableWriteError"],
            },
        )
        .await;
    let (status, body, _) = post(&stack, &items_of(4, "once"), Some("key-once")).await;
    assert_eq!(status, 201, "{body} {}", stack.writer.tail());
    mongo.wait_for_fail_point(before + 2).await;
    assert_eq!(stored_sequences(&stack).await, [(1, 4, 4)]);
    assert_eq!(count(&stack, "idempotency_keys").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_writable_primary_on_insert_answers_503_and_stores_nothing() {
    let Some(mongo) = FaultyMongo::start("not_writable_primary_on_insert", None).await else {
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! { "failCommands": ["insert"], "appName": &app, "errorCode": 10107 },
        )
        .await;
    let (status, body, took) = post(&stack, &items_of(3, "np"), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert!(took < Duration::from_secs(4), "503 after {took:?}");
    assert_eq!(count(&stack, "batches").await, 0);
    assert_eq!(count(&stack, "batch_items").await, 0);
    mongo.fail_point_off().await;
    let (status, body, _) = post(&stack, &items_of(3, "np"), None).await;
    assert_eq!(status, 201, "{body}");
    // The failed attempts consumed no sequence number.
    assert_eq!(stored_sequences(&stack).await, [(1, 3, 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_outcome_stays_unknown_answers_outcome_unknown_with_the_batch_id() {
    let Some(mongo) = FaultyMongo::start("a_commit_whose_outcome_stays_unknown", None).await else {
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &app,
                "errorCode": 91, "errorLabels": ["RetryableWriteError"],
            },
        )
        .await;
    let body = items_of(2, "unknown");
    let (status, problem, _) = post(&stack, &body, Some("key-unknown")).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "outcome_unknown", "{problem}");
    let batch_id = problem["batch_id"]
        .as_str()
        .expect("the problem names the batch");
    mongo.fail_point_off().await;
    // The client can look the batch up: here the commit never ran.
    let lookup = stack
        .http
        .get(format!(
            "{}/api/v1/batch/{batch_id}/status",
            stack.writer_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), 404);
    assert_eq!(count(&stack, "batches").await, 0);
    // And retrying with the same key stores it once.
    let (status, stored, _) = post(&stack, &body, Some("key-unknown")).await;
    assert_eq!(status, 201, "{stored}");
    assert_eq!(stored_sequences(&stack).await, [(1, 2, 2)]);
}

/// The commit ran but a majority never confirmed it in time: the writer
/// cannot know whether the batch will survive, says so with the batch id,
/// and the client's lookup and keyed retry settle it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_concern_timeout_on_commit_answers_outcome_unknown_and_the_retry_settles_it() {
    let Some(mongo) = FaultyMongo::start("a_write_concern_timeout_on_commit", None).await else {
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &app,
                "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out", "errInfo": { "wtimeout": true } },
            },
        )
        .await;
    let body = items_of(3, "wtimeout");
    let (status, problem, _) = post(&stack, &body, Some("key-wtimeout")).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("outcome_unknown")),
        "{problem}"
    );
    let batch_id = problem["batch_id"]
        .as_str()
        .expect("the problem names the batch");
    mongo.fail_point_off().await;
    // Here the commit did take effect: the lookup finds the batch whole...
    let lookup: Value = stack
        .http
        .get(format!(
            "{}/api/v1/batch/{batch_id}/status",
            stack.writer_url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(lookup["total"], 3, "{lookup}");
    // ...and the keyed retry replays it instead of storing it twice.
    let response = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .header("Idempotency-Key", "key-wtimeout")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(stored_sequences(&stack).await, [(1, 3, 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_before_the_schema_exists_answers_503() {
    let Some(mongo) = FaultyMongo::start("a_post_before_the_schema_exists", None).await else {
        return;
    };
    let app = unique("writer");
    // Index creation hangs until the fail point is lifted.
    mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["createIndexes"], "appName": &app,
                "blockConnection": true, "blockTimeMS": 500, "errorCode": 91,
            },
        )
        .await;
    let port = free_port();
    let database = unique("schema");
    let writer = Process::spawn(
        "writer",
        crate::e2e::binary("outbox-writer"),
        &[
            ("WRITER_BIND", format!("127.0.0.1:{port}")),
            ("MONGODB_URL", mongo.url_for(&app)),
            ("MONGODB_DATABASE", database),
        ],
    );
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "the writer to listen", || {
        let live = http.get(format!("{url}/health/live")).send();
        async move { live.await.is_ok() }
    })
    .await;
    let response = http
        .post(format!("{url}/api/v1/batch/process"))
        .json(&items_of(1, "early"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "{}", writer.tail());
    assert!(response.headers().contains_key("retry-after"));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "store_unavailable");
    mongo.fail_point_off().await;
    eventually(Duration::from_secs(30), "the writer to be ready", || {
        let ready = http.get(format!("{url}/health/ready")).send();
        async move { ready.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let response = http
        .post(format!("{url}/api/v1/batch/process"))
        .json(&items_of(1, "late"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_transaction_leaves_nothing_open() {
    let Some(mongo) = FaultyMongo::start("a_client_that_disconnects_mid_transaction", None).await
    else {
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    // The batch's inserts take a while; the client gives up meanwhile.
    let before = mongo
        .fail_point(
            Bson::Document(doc! { "times": 1 }),
            doc! {
                "failCommands": ["insert"], "appName": &app,
                "blockConnection": true, "blockTimeMS": 800,
            },
        )
        .await;
    let impatient = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .timeout(Duration::from_millis(200))
        .json(&items_of(6, "gone"))
        .send()
        .await;
    assert!(impatient.is_err(), "the client was meant to give up");
    mongo.wait_for_fail_point(before + 1).await;
    // The writer finished that transaction without the client: the next
    // batch is not stuck behind a half-driven one, and both are whole.
    let (status, body, _) = post(&stack, &items_of(2, "next"), None).await;
    assert_eq!(status, 201, "{body} {}", stack.writer.tail());
    let stored = stored_sequences(&stack).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_gap_free(&stored);
}

/// Median and maximum, for the figures the tests print.
fn median_max(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

fn runs() -> usize {
    std::env::var("FAULT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mongodb_frozen_or_gone_the_writer_answers_503_within_its_deadline() {
    let Some(mongo) = FaultyMongo::start("with_mongodb_frozen_or_gone", None).await else {
        return;
    };
    let Some(process) = &mongo.process else {
        println!(
            "SKIPPED with_mongodb_frozen_or_gone: the MongoDB at MONGODB_URL is not ours to freeze"
        );
        return;
    };
    let app = unique("writer");
    let stack = mongo.stack(&app, &[]).await;
    let (status, _, _) = post(&stack, &items_of(1, "up"), None).await;
    assert_eq!(status, 201);

    let deadline = Duration::from_secs(2);
    let mut answers = BTreeMap::new();
    for (state, signal) in [("frozen", "STOP"), ("gone", "KILL")] {
        process.signal(signal);
        let mut times = Vec::new();
        for i in 0..runs().max(3) {
            let (status, body, took) =
                post(&stack, &items_of(1, &format!("{state}{i}")), None).await;
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["code"], "store_unavailable", "{body}");
            // The deadline plus room for a loaded machine; the figures are
            // printed below.
            assert!(
                took < deadline + Duration::from_secs(2),
                "{state}: 503 after {took:?}"
            );
            times.push(took);
        }
        answers.insert(state, median_max(times));
    }
    for (state, (median, max)) in answers {
        println!("store {state}: 503 store_unavailable after median {median:?}, max {max:?}");
    }
}

fn role(status: &Value) -> &str {
    status["role"].as_str().unwrap_or("")
}

async fn status_of(http: &reqwest::Client, admin: &str) -> Option<Value> {
    let response = http
        .get(format!("{admin}/api/v1/outbox/status"))
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

async fn wait_leader(http: &reqwest::Client, admin: &str, limit: Duration) {
    eventually(limit, "the relay to lead", || {
        let status = status_of(http, admin);
        async move { status.await.is_some_and(|s| role(&s) == "leader") }
    })
    .await;
}

/// POSTs one batch and returns its sequence.
async fn submit_one(stack: &Stack, n: usize, tag: &str) -> u64 {
    let (status, body, _) = post(stack, &items_of(n, tag), None).await;
    assert_eq!(status, 201, "{body}");
    body["data"]["batch_sequence"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_inside_a_fenced_transaction_is_replaced_within_ttl_and_poll() {
    let Some(mongo) = FaultyMongo::start("a_leader_killed_inside_a_fenced_transaction", None).await
    else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let (ttl, poll) = (Duration::from_secs(3), Duration::from_millis(500));
    let fast = [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.5"),
        ("OUTBOX_BATCH_SIZE", "10"),
    ];
    let bound = ttl + poll + Duration::from_secs(2);
    let mut takeovers = Vec::new();
    for run in 0..runs() {
        let a_app = unique("relay-a");
        let (mut a, admin_a) = mongo.relay(&stack, &format!("a{run}"), &a_app, &fast);
        wait_leader(&stack.http, &admin_a, Duration::from_secs(30)).await;
        let (b, admin_b) = mongo.relay(&stack, &format!("b{run}"), &unique("relay-b"), &fast);
        eventually(Duration::from_secs(30), "the standby to start", || {
            let status = status_of(&stack.http, &admin_b);
            async move { status.await.is_some() }
        })
        .await;
        // The leader's next commit hangs inside its fenced transaction.
        let before = mongo
            .fail_point(
                Bson::Document(doc! { "times": 1 }),
                doc! {
                    "failCommands": ["commitTransaction"], "appName": &a_app,
                    "blockConnection": true, "blockTimeMS": 60_000,
                },
            )
            .await;
        // A subscription per run: the last run's unconsumed duplicates
        // would hold this one's ordering key.
        let subscription = unique(&format!("run{run}"));
        relay::pubsub::ensure_subscription(&stack.pubsub, &subscription, true)
            .await
            .unwrap();
        let sequence = submit_one(&stack, 30, &format!("run{run}")).await;
        mongo.wait_for_fail_point(before + 1).await;
        a.kill_hard();
        let killed = Instant::now();
        wait_leader(&stack.http, &admin_b, Duration::from_secs(120)).await;
        let took = killed.elapsed();
        takeovers.push(took);
        assert!(
            took <= bound,
            "run {run}: takeover after {took:?}, over {bound:?}\n{}",
            b.tail()
        );

        let received = receive_on(&stack, &subscription, 30, Duration::from_secs(60), |_| {}).await;
        let (firsts, _) = firsts(&received);
        assert_in_order(&firsts, &BTreeMap::from([(sequence, 30)]));
        drop(b);
    }
    let (median, max) = median_max(takeovers.clone());
    println!(
        "leader killed inside a fenced transaction, {} runs: takeover median {median:?}, max {max:?} (bound TTL {ttl:?} + poll {poll:?} + 2 s); all: {takeovers:?}",
        takeovers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_inside_its_transaction_blocks_others_for_the_lifetime_limit_only() {
    let lifetime = 5;
    let Some(mongo) =
        FaultyMongo::start("a_writer_killed_inside_its_transaction", Some(lifetime)).await
    else {
        return;
    };
    let doomed_app = unique("doomed");
    let mut stack = mongo.stack(&doomed_app, &[]).await;
    let other_port = free_port();
    let other = Process::spawn(
        "writer-2",
        crate::e2e::binary("outbox-writer"),
        &[
            ("WRITER_BIND", format!("127.0.0.1:{other_port}")),
            ("MONGODB_URL", mongo.url_for(&unique("survivor"))),
            ("MONGODB_DATABASE", stack.database.clone()),
        ],
    );
    let other_url = format!("http://127.0.0.1:{other_port}");
    eventually(Duration::from_secs(30), "the second writer", || {
        let ready = stack.http.get(format!("{other_url}/health/ready")).send();
        async move { ready.await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let before = mongo
        .fail_point(
            Bson::Document(doc! { "times": 1 }),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &doomed_app,
                "blockConnection": true, "blockTimeMS": 60_000,
            },
        )
        .await;
    let doomed = stack
        .http
        .post(format!("{}/api/v1/batch/process", stack.writer_url))
        .json(&items_of(3, "doomed"))
        .send();
    let doomed = tokio::spawn(doomed);
    mongo.wait_for_fail_point(before + 1).await;
    stack.writer.kill_hard();
    let killed = Instant::now();
    assert!(
        doomed.await.unwrap().is_err(),
        "the killed writer cannot answer"
    );

    // The orphan holds the sequence counter: the other writer answers 503
    // within its deadline until MongoDB aborts the orphan, then stores.
    let mut refused = 0;
    let blocked_for = loop {
        let response = stack
            .http
            .post(format!("{other_url}/api/v1/batch/process"))
            .json(&items_of(2, "after"))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            201 => break killed.elapsed(),
            503 => refused += 1,
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "still blocked after 60 s"
        );
    };
    let limit = Duration::from_secs(lifetime.into());
    assert!(
        blocked_for >= limit - Duration::from_secs(1),
        "blocked only {blocked_for:?}?"
    );
    assert!(
        blocked_for <= limit + Duration::from_secs(5),
        "blocked {blocked_for:?}"
    );
    // The orphan's batch was never stored and took no sequence number.
    assert_eq!(stored_sequences(&stack).await, [(1, 2, 2)]);
    println!(
        "writer killed inside its transaction: others blocked {blocked_for:?} ({refused} requests answered 503) with transactionLifetimeLimitSeconds={lifetime}"
    );
    if !mongo.standin {
        mongo.set_lifetime(60).await;
    }
    drop(other);
}

fn epochs(items: &[Document], field: &str) -> Vec<i64> {
    items.iter().map(|i| number(i.get(field))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewals_hang_stops_and_the_standby_takes_over_fenced() {
    let Some(mongo) = FaultyMongo::start("a_leader_whose_renewals_hang", None).await else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let fast = [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        ("OUTBOX_BATCH_SIZE", "10"),
    ];
    let a_app = unique("relay-a");
    let (a, admin_a) = mongo.relay(&stack, "a", &a_app, &fast);
    wait_leader(&stack.http, &admin_a, Duration::from_secs(30)).await;
    let (b, admin_b) = mongo.relay(&stack, "b", &unique("relay-b"), &fast);
    // Every lease read and write of the leader now hangs for 6 s (2 TTLs).
    mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["find", "update", "insert"], "appName": format!("{a_app}:lease"),
                "blockConnection": true, "blockTimeMS": 6_000,
            },
        )
        .await;
    // A backlog the leader may or may not finish before its lease lapses
    // (that depends on the machine), then more once the standby leads: the
    // old leader marks some items, the new one the rest, and no mark of the
    // old one may come after the new one's.
    let sizes = vec![100; 60];
    stack.submit(&sizes).await;
    wait_leader(&stack.http, &admin_b, Duration::from_secs(30)).await;
    stack.submit(&[100; 5]).await;
    let received = receive(&stack, 6500, Duration::from_secs(240), |_| {}).await;
    let (firsts, duplicates) = firsts(&received);
    let items = stack.items().await;
    assert_in_order(&firsts, &sizes_by_sequence(&items));
    mongo.fail_point_off().await;
    eventually(
        Duration::from_secs(30),
        "the old leader to step down",
        || {
            let status = status_of(&stack.http, &admin_a);
            async move { status.await.is_some_and(|s| role(&s) != "leader") }
        },
    )
    .await;

    // Every mark and commit carries the epoch it was written under. A write
    // of the old leader after the takeover would show as an old epoch
    // after a new one.
    let batches = stack.db.collection::<Document>("batches");
    eventually(Duration::from_secs(30), "every batch committed", || {
        let n = batches.count_documents(doc! { "status": "committed" });
        async move { n.await.unwrap() == 65 }
    })
    .await;
    let items = stack.items().await;
    let sent = epochs(&items, "sent_epoch");
    assert!(
        sent.windows(2).all(|w| w[0] <= w[1]),
        "mark epochs go back: {sent:?}"
    );
    assert!(
        sent.first() < sent.last(),
        "one leader marked everything: the takeover was not shown\n{}",
        a.tail()
    );
    println!(
        "renewals hung: leader epoch {} marked {} items, successor epoch {} marked {}; {duplicates} duplicates",
        sent[0],
        sent.iter().filter(|e| **e == sent[0]).count(),
        sent[sent.len() - 1],
        sent.iter().filter(|e| **e == sent[sent.len() - 1]).count(),
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_during_the_marks_lose_nothing_and_keep_order() {
    let Some(mongo) = FaultyMongo::start("connections_closed_during_the_marks", None).await else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let app = unique("relay");
    let (relay, _admin) = mongo.relay(
        &stack,
        "r",
        &app,
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("OUTBOX_BATCH_SIZE", "10"),
        ],
    );
    let sizes = vec![50; 10];
    stack.submit(&sizes).await;
    // Once the drain is under way, cut the relay's connection on its next
    // updates (inside the marks' transactions), twice over.
    let items = stack.db.collection::<Document>("batch_items");
    let mut entered = 0;
    for threshold in [60, 250] {
        eventually(Duration::from_secs(60), "the drain to progress", || {
            let n = items.count_documents(doc! { "status": "sent" });
            async move { n.await.unwrap() >= threshold }
        })
        .await;
        let before = mongo
            .fail_point(
                Bson::Document(doc! { "times": 2 }),
                doc! { "failCommands": ["update"], "appName": &app, "closeConnection": true },
            )
            .await;
        mongo.wait_for_fail_point(before + 2).await;
        entered += 2;
    }
    let received = receive(&stack, 500, Duration::from_secs(120), |_| {}).await;
    let (firsts, duplicates) = firsts(&received);
    let stored = stack.items().await;
    assert_in_order(&firsts, &sizes_by_sequence(&stored));
    let batches = stack.db.collection::<Document>("batches");
    eventually(Duration::from_secs(30), "every batch committed", || {
        let n = batches.count_documents(doc! { "status": "committed" });
        async move { n.await.unwrap() == 10 }
    })
    .await;
    for item in stack.items().await {
        assert_eq!(item.get_str("status").unwrap(), "sent", "{}", relay.tail());
    }
    println!("{entered} connections closed mid-marks: 500 items in order, {duplicates} duplicates");
}

/// Every commit of the relay applies and is answered with a write concern
/// error (code 91, as when a primary steps down after the commit
/// replicated): the relay hears `OutcomeUnknown` for commits that happened.
/// Once the fault heals, the batches submitted after it are delivered under
/// the same lease epoch, without a restart: the drain asks MongoDB what is
/// committed instead of trusting what it remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_whose_answers_were_lost_never_stall_the_stream() {
    let Some(mongo) = FaultyMongo::start("commits_whose_answers_were_lost", None).await else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let app = unique("relay");
    let (relay, admin) = mongo.relay(
        &stack,
        "r",
        &app,
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("OUTBOX_BATCH_SIZE", "10"),
        ],
    );
    wait_leader(&stack.http, &admin, Duration::from_secs(30)).await;
    let epoch = |status: &Value| status["lease"]["epoch"].as_u64();
    let first_epoch = epoch(&status_of(&stack.http, &admin).await.unwrap());
    // Batches of one page each: every write the relay makes commits one.
    let sizes = [10; 12];
    stack.submit(&sizes[..2]).await;
    let batches = stack.db.collection::<Document>("batches");
    eventually(Duration::from_secs(60), "two batches committed", || {
        let n = batches.count_documents(doc! { "status": "committed" });
        async move { n.await.unwrap() == 2 }
    })
    .await;
    let before = mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &app,
                "writeConcernError": { "code": 91, "errmsg": "Replication is being shut down" },
            },
        )
        .await;
    stack.submit(&sizes[2..6]).await;
    mongo.wait_for_fail_point(before + 1).await;
    // The relay retries a commit whose outcome is unknown for its commit
    // timeout (10 s), then gives up on it: the fault lasts until it has.
    eventually(
        Duration::from_secs(60),
        "a commit given up as unknown",
        || {
            let status = status_of(&stack.http, &admin);
            async move {
                status.await.is_some_and(|s| {
                    s["recent_errors"].as_array().is_some_and(|errors| {
                        errors
                            .iter()
                            .any(|e| e["message"].as_str().is_some_and(|m| m.contains("outcome")))
                    })
                })
            }
        },
    )
    .await;
    mongo.fail_point_off().await;
    // After the fault: these must go out too, under the same epoch.
    stack.submit(&sizes[6..]).await;
    let received = receive(&stack, 120, Duration::from_secs(120), |_| {}).await;
    let (firsts, duplicates) = firsts(&received);
    let stored = stack.items().await;
    assert_in_order(&firsts, &sizes_by_sequence(&stored));
    eventually(Duration::from_secs(60), "every batch committed", || {
        let n = batches.count_documents(doc! { "status": "committed" });
        async move { n.await.unwrap() == 12 }
    })
    .await;
    let status = status_of(&stack.http, &admin).await.unwrap();
    assert_eq!(epoch(&status), first_epoch, "{}", relay.tail());
    assert_eq!(role(&status), "leader");
    println!(
        "commits answered with a write concern error: 120 items in order under one epoch, {duplicates} duplicates"
    );
}

/// A replica started while MongoDB cannot create its indexes (a fail point
/// holds `createIndexes`, as an orphaned transaction holds every write on
/// the stand-in) still takes over a dead leader's stream within TTL + poll
/// + 2 s: the indexes are made in the background, not before the
/// replica's supervision starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_indexes_hang_still_takes_over_in_time() {
    let Some(mongo) = FaultyMongo::start("a_replica_whose_indexes_hang", None).await else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let (ttl, poll) = (Duration::from_secs(3), Duration::from_millis(500));
    let fast = [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.5"),
    ];
    let (mut a, admin_a) = mongo.relay(&stack, "a", &unique("relay-a"), &fast);
    wait_leader(&stack.http, &admin_a, Duration::from_secs(30)).await;
    let b_app = unique("relay-b");
    let before = mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["createIndexes"], "appName": &b_app,
                "blockConnection": true, "blockTimeMS": 60_000,
            },
        )
        .await;
    let (b, admin_b) = mongo.relay(&stack, "b", &b_app, &fast);
    mongo.wait_for_fail_point(before + 1).await;
    a.kill_hard();
    let killed = Instant::now();
    wait_leader(&stack.http, &admin_b, Duration::from_secs(120)).await;
    let took = killed.elapsed();
    mongo.fail_point_off().await;
    let bound = ttl + poll + Duration::from_secs(2);
    assert!(
        took <= bound,
        "takeover after {took:?}, over {bound:?}\n{}",
        b.tail()
    );
    let sequence = submit_one(&stack, 5, "after").await;
    let received = receive(&stack, 5, Duration::from_secs(60), |_| {}).await;
    let (firsts, _) = firsts(&received);
    assert_in_order(&firsts, &BTreeMap::from([(sequence, 5)]));
}

/// A leader killed inside its fenced transaction and restarted at once under
/// the same `RELAY_ID` (a container keeps its host name and pid 1): the new
/// process is another holder, so it takes the lease over with a new epoch
/// and kills the orphan, instead of renewing the dead process's lease and
/// waiting for the orphan's lifetime limit (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_under_the_same_name_takes_over_with_a_new_epoch() {
    let Some(mongo) = FaultyMongo::start("a_leader_restarted_under_the_same_name", None).await
    else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let (ttl, poll) = (Duration::from_secs(3), Duration::from_millis(500));
    let fast = [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.5"),
        ("OUTBOX_BATCH_SIZE", "10"),
    ];
    let app = unique("relay-same");
    let (mut first, admin) = mongo.relay(&stack, "same", &app, &fast);
    wait_leader(&stack.http, &admin, Duration::from_secs(30)).await;
    let first_status = status_of(&stack.http, &admin).await.unwrap();
    let epoch = first_status["lease"]["epoch"].as_u64().unwrap();
    let first_instance = first_status["instance"].clone();
    let before = mongo
        .fail_point(
            Bson::Document(doc! { "times": 1 }),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &app,
                "blockConnection": true, "blockTimeMS": 60_000,
            },
        )
        .await;
    let sequence = submit_one(&stack, 20, "same").await;
    mongo.wait_for_fail_point(before + 1).await;
    first.kill_hard();
    let killed = Instant::now();
    drop(first);
    let (second, admin) = mongo.relay(&stack, "same", &app, &fast);
    wait_leader(&stack.http, &admin, Duration::from_secs(120)).await;
    let took = killed.elapsed();
    let status = status_of(&stack.http, &admin).await.unwrap();
    assert!(
        status["lease"]["epoch"].as_u64().unwrap() > epoch,
        "a new holder, a new epoch: {status}"
    );
    assert_eq!(status["lease"]["holder"], "same");
    assert_eq!(status["lease"]["holder_instance"], status["instance"]);
    assert_ne!(
        status["instance"], first_instance,
        "another process, another instance"
    );
    let bound = ttl + poll + Duration::from_secs(2);
    assert!(
        took <= bound,
        "takeover after {took:?}, over {bound:?}\n{}",
        second.tail()
    );
    let received = receive(&stack, 20, Duration::from_secs(60), |_| {}).await;
    let (firsts, _) = firsts(&received);
    assert_in_order(&firsts, &BTreeMap::from([(sequence, 20)]));
}

/// SIGTERM while every MongoDB command of the relay hangs: it exits within
/// its documented bound (PUBLISH_RETRY_SECONDS + LEASE_TTL_SECONDS + 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_store_hangs_exits_within_the_bound() {
    let Some(mongo) = FaultyMongo::start("sigterm_while_the_store_hangs", None).await else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let app = unique("relay-term");
    let (mut relay, admin) = mongo.relay(
        &stack,
        "term",
        &app,
        &[
            ("LEASE_TTL_SECONDS", "3"),
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.5"),
            ("PUBLISH_RETRY_SECONDS", "2"),
        ],
    );
    wait_leader(&stack.http, &admin, Duration::from_secs(30)).await;
    let before = mongo
        .fail_point(
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["find", "aggregate", "update", "insert", "delete", "findAndModify",
                    "commitTransaction", "abortTransaction", "killSessions", "createIndexes", "hello"],
                "appName": &app,
                "blockConnection": true, "blockTimeMS": 120_000,
            },
        )
        .await;
    let _ = submit_one(&stack, 5, "term").await;
    mongo.wait_for_fail_point(before + 1).await;
    relay.signal("TERM");
    let signalled = Instant::now();
    let exited = tokio::time::timeout(Duration::from_secs(60), relay.child.wait()).await;
    let took = signalled.elapsed();
    mongo.fail_point_off().await;
    assert!(
        exited.is_ok(),
        "still running 60 s after SIGTERM\n{}",
        relay.tail()
    );
    let bound = Duration::from_secs(2 + 3 + 5);
    assert!(
        took <= bound + Duration::from_secs(3),
        "exited after {took:?}, over {bound:?}\n{}",
        relay.tail()
    );
    println!("SIGTERM with every store command held: exited after {took:?} (bound {bound:?})");
}

/// A TCP proxy that can be cut and healed: while cut, nothing crosses it
/// in either direction (the bytes wait, as over a partitioned network).
struct Cuttable {
    address: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(false);
        let watch = cut.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        Self::pipe(client_read, server_write, watch.clone()),
                        Self::pipe(server_read, client_write, watch)
                    );
                });
            }
        });
        Self { address, cut, task }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut cut: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            while *cut.borrow() {
                if cut.changed().await.is_err() {
                    return;
                }
            }
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while *cut.borrow() {
                if cut.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The status within `limit`, or `None` when it does not answer in time.
async fn status_within(http: &reqwest::Client, admin: &str, limit: Duration) -> Option<Value> {
    let response = http
        .get(format!("{admin}/api/v1/outbox/status"))
        .timeout(limit)
        .send()
        .await
        .ok()?;
    response.json().await.ok()
}

/// A leader cut off from MongoDB (not from Pub/Sub): its status answers all
/// through the cut, it says it is not leading before its lease can expire,
/// and since when it cannot reach MongoDB; the other replica takes over;
/// once the cut heals it stays a standby (no hand-over back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_mongodb_steps_down_visibly_and_stays_standby_once_healed() {
    let Some(mongo) = FaultyMongo::start("a_leader_cut_off_from_mongodb", None).await else {
        return;
    };
    if !mongo.standin {
        println!(
            "SKIPPED a_leader_cut_off_from_mongodb: needs a MongoDB this test can put a proxy before"
        );
        return;
    }
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let upstream: std::net::SocketAddr = mongo
        .url
        .trim_start_matches("mongodb://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = Cuttable::start(upstream).await;
    let (ttl, poll) = (Duration::from_secs(3), Duration::from_millis(500));
    let proxied = format!(
        "mongodb://{}/?directConnection=true&appName={}",
        proxy.address,
        unique("relay-cut")
    );
    let fast = [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.5"),
    ];
    let mut vars = fast.to_vec();
    vars.push(("MONGODB_URL", proxied.as_str()));
    let (a, admin_a) = stack.relay("cut-a", &vars);
    wait_leader(&stack.http, &admin_a, Duration::from_secs(30)).await;
    let (b, admin_b) = mongo.relay(&stack, "cut-b", &unique("relay-b"), &fast);
    eventually(Duration::from_secs(30), "the standby to start", || {
        let status = status_of(&stack.http, &admin_b);
        async move { status.await.is_some() }
    })
    .await;

    proxy.set_cut(true);
    let cut = Instant::now();
    // Every status during the cut answers within 2 s; A says standby, with
    // since when MongoDB is unreachable, before its lease (TTL) expires.
    let mut stepped_down = None;
    let mut unreachable_said = None;
    while cut.elapsed() < ttl + poll + Duration::from_secs(3) {
        // When the request was sent: the role is read as it arrives.
        let asked = cut.elapsed();
        let status = status_within(&stack.http, &admin_a, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "A's status did not answer {asked:?} into the cut\n{}",
                    a.tail()
                )
            });
        if stepped_down.is_none() && role(&status) == "standby" {
            stepped_down = Some(asked);
        }
        if unreachable_said.is_none() && status["mongodb_unreachable_since"].is_string() {
            unreachable_said = Some(asked);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stepped_down = stepped_down.expect("A never said it stopped leading");
    assert!(
        stepped_down < ttl,
        "A said standby {stepped_down:?} into the cut, not before its lease expired ({ttl:?})"
    );
    assert!(
        unreachable_said.is_some(),
        "A never said it cannot reach MongoDB\n{}",
        a.tail()
    );
    wait_leader(&stack.http, &admin_b, Duration::from_secs(30)).await;
    let taken_over = cut.elapsed();
    let epoch = status_of(&stack.http, &admin_b).await.unwrap()["lease"]["epoch"].clone();

    proxy.set_cut(false);
    let healed = Instant::now();
    eventually(Duration::from_secs(30), "A to reach MongoDB again", || {
        let status = status_of(&stack.http, &admin_a);
        async move {
            status
                .await
                .is_some_and(|s| s["mongodb_unreachable_since"].is_null())
        }
    })
    .await;
    // For three TTLs after the heal, the stream stays where it is.
    let mut hand_overs = 0;
    while healed.elapsed() < ttl * 3 {
        let status = status_of(&stack.http, &admin_b).await.unwrap();
        if status["lease"]["epoch"] != epoch {
            hand_overs += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        hand_overs,
        0,
        "the stream moved back after the heal\n{}\n{}",
        a.tail(),
        b.tail()
    );
    let sequence = submit_one(&stack, 5, "healed").await;
    let received = receive(&stack, 5, Duration::from_secs(60), |_| {}).await;
    let (firsts, _) = firsts(&received);
    assert_in_order(&firsts, &BTreeMap::from([(sequence, 5)]));
    println!(
        "cut from MongoDB: A said standby after {stepped_down:?}, B led after {taken_over:?}; 0 hand-overs in {:?} after the heal",
        ttl * 3
    );
}

/// The leader killed inside the other kind of fenced transaction it runs,
/// a replay job's progress write (the drain's page writes are the test
/// above; a batch's failure and a dead letter are fenced writes on the same
/// recorded session): the successor takes over within TTL + poll + 2 s and
/// finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_inside_a_replay_progress_write_is_replaced_within_ttl_and_poll() {
    let Some(mongo) =
        FaultyMongo::start("a_leader_killed_inside_a_replay_progress_write", None).await
    else {
        return;
    };
    let stack = mongo.stack(&unique("writer"), &[]).await;
    let (ttl, poll) = (Duration::from_secs(3), Duration::from_millis(500));
    let fast = [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.5"),
        ("OUTBOX_BATCH_SIZE", "10"),
    ];
    let a_app = unique("relay-a");
    let (mut a, admin_a) = mongo.relay(&stack, "a", &a_app, &fast);
    wait_leader(&stack.http, &admin_a, Duration::from_secs(30)).await;
    let (b, admin_b) = mongo.relay(&stack, "b", &unique("relay-b"), &fast);
    eventually(Duration::from_secs(30), "the standby to start", || {
        let status = status_of(&stack.http, &admin_b);
        async move { status.await.is_some() }
    })
    .await;
    stack.submit(&[10, 10]).await;
    let batches = stack.db.collection::<Document>("batches");
    eventually(
        Duration::from_secs(60),
        "both batches committed",
        || async {
            batches
                .count_documents(doc! { "status": "committed" })
                .await
                .unwrap()
                == 2
        },
    )
    .await;
    // The drain is idle: the next commit is the replay's progress write.
    let before = mongo
        .fail_point(
            Bson::Document(doc! { "times": 1 }),
            doc! {
                "failCommands": ["commitTransaction"], "appName": &a_app,
                "blockConnection": true, "blockTimeMS": 60_000,
            },
        )
        .await;
    let started: Value = stack
        .http
        .post(format!("{admin_a}/api/v1/outbox/replays"))
        .json(&json!({"from_sequence": 1, "to_sequence": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = started["replay_id"].as_str().expect("started").to_owned();
    mongo.wait_for_fail_point(before + 1).await;
    a.kill_hard();
    let killed = Instant::now();
    wait_leader(&stack.http, &admin_b, Duration::from_secs(120)).await;
    let took = killed.elapsed();
    let bound = ttl + poll + Duration::from_secs(2);
    assert!(
        took <= bound,
        "takeover after {took:?}, over {bound:?}\n{}",
        b.tail()
    );
    eventually(
        Duration::from_secs(60),
        "the replay finished by the successor",
        || async {
            let job = stack
                .get_json(&format!("{admin_b}/api/v1/outbox/replays/{id}"))
                .await;
            job["state"] == "done"
        },
    )
    .await;
    println!(
        "leader killed inside a replay progress write: takeover after {took:?} (bound {bound:?})"
    );
}
