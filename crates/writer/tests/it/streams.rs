//! Streams at the writer: each has its own gap-free sequence and its own
//! idempotency keys; an unknown stream, a key not among the stream's
//! writers and an item that breaks the stream's schema each get their
//! problem and store nothing.

use outbox_core::memory::{CounterStep, MemoryStore, TransactionModel};
use outbox_core::model::NewBatch;
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::{BatchStore, StreamStore};
use outbox_core::stream::{PoisonPolicy, StreamDefinition, StreamName};
use outbox_mongo::{MongoConfig, MongoStore};
use serde_json::{Value, json};

use crate::helpers::{TestApp, json, mongo_url, objects, spawn_app_with};

const OPS_KEY: &str = "ops-key-0123456789abcdef";
const BILLING_KEY: &str = "billing-key-0123456789ab";

fn definition(name: &str, schema: Option<Value>, writers: Option<Vec<&str>>) -> StreamDefinition {
    StreamDefinition {
        name: name.parse().unwrap(),
        topic: format!("{name}-topic"),
        ordering: OrderingKeyMode::Global,
        on_poison: PoisonPolicy::Halt,
        schema,
        writers: writers.map(|w| w.into_iter().map(str::to_owned).collect()),
        created_at: None,
        updated_at: None,
        claim_check: None,
    }
}

/// Defines streams in the app's database, as the relay's admin API does.
async fn define(app: &TestApp, definitions: &[StreamDefinition]) {
    let store = MongoStore::connect(MongoConfig::new(mongo_url(), app.db().name()))
        .await
        .unwrap();
    for definition in definitions {
        store.put_stream(definition).await.unwrap();
    }
}

async fn post(
    app: &TestApp,
    stream: &str,
    key: Option<&str>,
    body: &Value,
    idempotency: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(&format!("/api/v1/streams/{stream}/batches")))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(idempotency) = idempotency {
        request = request.header("Idempotency-Key", idempotency);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn each_stream_has_its_own_sequence_and_idempotency_keys() {
    let app = spawn_app_with(&[]).await;
    define(
        &app,
        &[
            definition("orders", None, None),
            definition("audit", None, None),
        ],
    )
    .await;
    let mut sequences = Vec::new();
    for stream in ["orders", "audit", "orders", "default", "audit", "orders"] {
        let response = post(&app, stream, None, &objects(2), None).await;
        assert_eq!(response.status(), 201);
        let reply = json(response).await;
        assert_eq!(reply["data"]["stream"], stream);
        sequences.push((stream, reply["data"]["batch_sequence"].as_u64().unwrap()));
    }
    assert_eq!(
        sequences,
        [
            ("orders", 1),
            ("audit", 1),
            ("orders", 2),
            ("default", 1),
            ("audit", 2),
            ("orders", 3)
        ]
    );
    // The same key in two streams: two batches; again in one: a replay.
    let first = json(post(&app, "orders", None, &objects(1), Some("k-1")).await).await;
    let other = json(post(&app, "audit", None, &objects(1), Some("k-1")).await).await;
    assert_ne!(first["data"]["batch_id"], other["data"]["batch_id"]);
    let again = post(&app, "orders", None, &objects(1), Some("k-1")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        json(again).await["data"]["batch_id"],
        first["data"]["batch_id"]
    );
    // The status names the stream.
    let id = first["data"]["batch_id"].as_str().unwrap();
    let status = json(
        app.http
            .get(app.url(&format!("/api/v1/batch/{id}/status")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status["stream"], "orders");
}

#[tokio::test]
async fn an_unknown_stream_a_forbidden_key_and_a_schema_violation_store_nothing() {
    let keys = format!("ops:{OPS_KEY},billing:{BILLING_KEY}");
    let app = spawn_app_with(&["--api-keys", &keys]).await;
    let schema = json!({
        "type": "object",
        "required": ["amount"],
        "properties": {"amount": {"type": "integer", "minimum": 0}}
    });
    define(
        &app,
        &[
            definition("ledger", Some(schema), Some(vec!["billing"])),
            definition("open", None, None),
        ],
    )
    .await;

    let unknown = post(&app, "nowhere", Some(OPS_KEY), &objects(1), None).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(json(unknown).await["code"], "stream_not_found");
    let typo = json(post(&app, "ledgr", Some(OPS_KEY), &objects(1), None).await).await;
    let detail = typo["detail"].as_str().unwrap();
    assert!(detail.contains("did you mean ledger?"), "{detail}");
    assert!(
        detail.contains("outboxctl stream create ledgr --topic TOPIC"),
        "{detail}"
    );
    let bad_name = post(&app, "Not_A_Stream", Some(OPS_KEY), &objects(1), None).await;
    assert_eq!(bad_name.status(), 400);
    assert_eq!(json(bad_name).await["code"], "invalid_stream_name");

    let forbidden = post(&app, "ledger", Some(OPS_KEY), &json!([{"amount": 1}]), None).await;
    assert_eq!(forbidden.status(), 403);
    assert_eq!(json(forbidden).await["code"], "stream_forbidden");

    let violation = post(
        &app,
        "ledger",
        Some(BILLING_KEY),
        &json!([{"amount": 1}, {"amount": 2}, {"amount": "three"}]),
        None,
    )
    .await;
    assert_eq!(violation.status(), 422);
    let problem = json(violation).await;
    assert_eq!(problem["code"], "schema_violation");
    assert_eq!(problem["index"], 2);
    assert_eq!(problem["pointer"], "/amount");
    assert!(
        problem["schema_pointer"].as_str().unwrap().contains("type"),
        "{problem}"
    );
    app.assert_nothing_stored().await;

    let stored = post(
        &app,
        "ledger",
        Some(BILLING_KEY),
        &json!([{"amount": 1}]),
        None,
    )
    .await;
    assert_eq!(stored.status(), 201);
    assert_eq!(json(stored).await["data"]["stream"], "ledger");
    // A stream without writers takes any key.
    assert_eq!(
        post(&app, "open", Some(OPS_KEY), &objects(1), None)
            .await
            .status(),
        201
    );
}

/// On the model of MongoDB's transactions: writers of two streams never
/// conflict (each stream has its own counter); writers of one stream do.
#[tokio::test(start_paused = true)]
async fn writers_of_different_streams_never_conflict() {
    let model = TransactionModel {
        counter: CounterStep::First,
        statement: std::time::Duration::from_millis(1),
        per_item: std::time::Duration::from_micros(50),
        staged_above_items: None,
    };
    let batch = |stream: &str| -> NewBatch {
        let rules = outbox_core::ingest::IngestRules {
            stream: stream.parse::<StreamName>().unwrap(),
            ..outbox_core::ingest::IngestRules::default()
        };
        outbox_core::ingest::build_batch(
            vec![json!({"i": 1}); 20],
            &rules,
            None,
            chrono::Utc::now(),
        )
        .unwrap()
    };
    let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    for (streams, conflicts) in [(["a", "b"], false), (["a", "a"], true)] {
        let store = MemoryStore::with_model(model);
        let writers = streams.map(|stream| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    store.insert_batch(&batch(stream), far()).await.unwrap();
                }
            })
        });
        for writer in writers {
            writer.await.unwrap();
        }
        assert_eq!(
            store.conflicts() > 0,
            conflicts,
            "{streams:?}: {} conflicts",
            store.conflicts()
        );
        for stream in streams {
            let sequences: Vec<u64> = store
                .batch_statuses_in(&stream.parse().unwrap())
                .iter()
                .map(|(s, _)| s.0)
                .collect();
            let expected = if streams[0] == streams[1] { 40 } else { 20 };
            assert_eq!(
                sequences,
                (1..=expected).collect::<Vec<_>>(),
                "{stream}: gap-free"
            );
        }
    }
}

/// A stored schema that does not compile (written by hand, not through the
/// admin API) stops the stream's ingest with 503, rather than letting every
/// item through unchecked.
#[tokio::test]
async fn a_stored_schema_that_does_not_compile_answers_503_and_stores_nothing() {
    let store = MemoryStore::new();
    store
        .put_stream(&definition("broken", Some(json!({"type": 12})), None))
        .await
        .unwrap();
    let app = crate::helpers::spawn_memory_app(store.clone());
    let response = app
        .http
        .post(app.url("/api/v1/streams/broken/batches"))
        .json(&objects(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await["code"], "schema_unavailable");
    assert!(
        store
            .batch_statuses_in(&"broken".parse().unwrap())
            .is_empty()
    );
}
