use serde_json::json;

use crate::helpers::{json, objects, spawn_app};

#[tokio::test]
async fn the_same_key_and_body_replays_the_original_response() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&objects(3)).unwrap();
    let first = app
        .post_raw(body.clone(), "application/json", Some("order-42"))
        .await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = json(first).await;

    let again = app
        .post_raw(body, "application/json", Some("order-42"))
        .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = json(again).await;
    assert_eq!(
        again["data"], first["data"],
        "a replay must return the original response"
    );
    assert_eq!(app.count("batches").await, 1);
    assert_eq!(app.count("batch_items").await, 3);
}

#[tokio::test]
async fn the_same_key_with_another_body_is_rejected() {
    let app = spawn_app().await;
    let first = app
        .post_raw(b"[{\"a\":1}]".to_vec(), "application/json", Some("k-1"))
        .await;
    assert_eq!(first.status(), 201);
    let reused = app
        .post_raw(b"[{\"a\":2}]".to_vec(), "application/json", Some("k-1"))
        .await;
    assert_eq!(reused.status(), 422);
    assert_eq!(json(reused).await["code"], "idempotency_key_reused");
    assert_eq!(app.count("batches").await, 1);
    // Another key stores another batch.
    let other = app
        .post_raw(b"[{\"a\":2}]".to_vec(), "application/json", Some("k-2"))
        .await;
    assert_eq!(other.status(), 201);
    assert_eq!(app.count("batches").await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_store_one_batch() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&json!([{"request_id": "same"}])).unwrap();
    let requests =
        (0..8).map(|_| app.post_raw(body.clone(), "application/json", Some("shared-key")));
    let responses = futures::future::join_all(requests).await;
    let mut batch_ids = Vec::new();
    let mut replays = 0;
    for response in responses {
        assert_eq!(response.status(), 201);
        replays += usize::from(response.headers().contains_key("idempotent-replayed"));
        batch_ids.push(json(response).await["data"]["batch_id"].clone());
    }
    batch_ids.dedup();
    assert_eq!(
        batch_ids.len(),
        1,
        "different batches for one key: {batch_ids:?}"
    );
    assert_eq!(replays, 7);
    assert_eq!(app.count("batches").await, 1);
    assert_eq!(app.count("batch_items").await, 1);
}
