//! Claim-check at the writer, over the in-memory store: a stream with a
//! store takes items past Pub/Sub's message limit and past
//! `MAX_BODY_BYTES`, up to `MAX_ITEM_BYTES`, and pins each object it refers
//! to; a stream without one refuses them as before.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use outbox_core::claim_check::{ClaimCheck, Location, ObjectRefStore, sha256_hex};
use outbox_core::memory::MemoryStore;
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::StreamStore;
use outbox_core::stream::{PoisonPolicy, StreamDefinition};
use serde_json::{Value, json};
use writer::Application;

use crate::helpers::{TestApp, config, start};

fn definition(name: &str, claim_check: Option<ClaimCheck>) -> StreamDefinition {
    StreamDefinition {
        name: name.parse().unwrap(),
        topic: format!("{name}-topic"),
        ordering: OrderingKeyMode::Global,
        on_poison: PoisonPolicy::Halt,
        schema: None,
        writers: None,
        created_at: None,
        updated_at: None,
        claim_check,
    }
}

async fn post(app: &TestApp, stream: &str, body: &Value) -> (u16, Value) {
    let response = app
        .http
        .post(app.url(&format!("/api/v1/streams/{stream}/batches")))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_stream_with_a_store_takes_large_items_up_to_max_item_bytes_and_pins_them() {
    let store = MemoryStore::new();
    let memory = ClaimCheck {
        url: "memory://".to_owned(),
        above_bytes: None,
    };
    store
        .put_stream(&definition("docs", Some(memory)))
        .await
        .unwrap();
    store.put_stream(&definition("plain", None)).await.unwrap();
    let config = config(&[
        "--max-body-bytes",
        "1048576",
        "--max-item-bytes",
        "12000000",
    ]);
    let app = Application::with_store(
        &config,
        Arc::new(store.clone()),
        Arc::new(AtomicBool::new(true)),
    )
    .unwrap();
    let app = start(app, None);

    // 10.5 MB: over Pub/Sub's message limit and over MAX_BODY_BYTES.
    let big = json!({"request_id": "big", "blob": "x".repeat(10_500_000)});
    let (status, answer) = post(&app, "docs", &json!([big])).await;
    assert_eq!(status, 201, "{answer}");
    let url = Location::Memory.object_url(&sha256_hex(&serde_json::to_vec(&big).unwrap()));
    // One reference pinned: releasing it is what lets retention delete.
    assert!(
        store.release(&url, 1).await.unwrap().is_some(),
        "pinned once"
    );

    // Over MAX_ITEM_BYTES: refused, and no pin is left behind.
    let huge = json!([{"blob": "x".repeat(12_500_000)}]);
    let (status, problem) = post(&app, "docs", &huge).await;
    assert_eq!(
        (
            status,
            problem["code"].as_str(),
            problem["max_item_bytes"].as_u64()
        ),
        (413, Some("item_too_large"), Some(12_000_000)),
        "{problem}"
    );
    // A stream without a store keeps MAX_BODY_BYTES.
    let (status, problem) = post(&app, "plain", &json!([big])).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (413, Some("batch_too_large")),
        "{problem}"
    );
}

#[test]
fn a_claim_check_setting_the_writer_cannot_use_is_refused_at_start() {
    for (args, expected) in [
        (vec!["--claim-check-url", "s3://bucket"], "not supported"),
        (
            vec![
                "--claim-check-url",
                "memory://",
                "--claim-check-above-bytes",
                "0",
            ],
            "above_bytes",
        ),
        (
            vec!["--claim-check-above-bytes", "10"],
            "needs CLAIM_CHECK_URL",
        ),
    ] {
        let error = config(&args).validate().unwrap_err();
        assert!(error.contains(expected), "{args:?}: {error}");
    }
    assert!(
        config(&["--claim-check-url", "gs://bucket/prefix"])
            .validate()
            .is_ok()
    );
}
