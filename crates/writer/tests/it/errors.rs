//! Every client error: its status, its stable code, and that nothing was stored.

use mongodb::bson::doc;
use serde_json::{Value, json};

use crate::helpers::{TestApp, json, objects, spawn_app, spawn_app_with};

async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "wrong status for {code}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body = json(response).await;
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

async fn post(app: &TestApp, body: &str, content_type: &str) -> reqwest::Response {
    app.post_raw(body.as_bytes().to_vec(), content_type, None)
        .await
}

#[tokio::test]
async fn bad_bodies_are_rejected_and_store_nothing() {
    let app = spawn_app_with(&["--max-batch-items", "5", "--max-body-bytes", "2048"]).await;
    let json_type = "application/json";
    assert_problem(
        post(&app, "[{\"a\":1},", json_type).await,
        400,
        "invalid_json",
    )
    .await;
    assert_problem(
        post(&app, "{\"a\":1}", json_type).await,
        422,
        "invalid_batch",
    )
    .await;
    assert_problem(
        post(&app, "\"text\"", json_type).await,
        422,
        "invalid_batch",
    )
    .await;
    assert_problem(
        post(&app, "{\"requests\": 3}", json_type).await,
        422,
        "invalid_batch",
    )
    .await;
    let body = assert_problem(
        post(&app, "[{}, {}, 5]", json_type).await,
        422,
        "item_not_object",
    )
    .await;
    assert_eq!(body["index"], 2);
    for (body, content_type) in [
        ("", json_type),
        (" \r\n", json_type),
        ("\n\n", "application/x-ndjson"),
        ("", "text/csv"),
    ] {
        assert_problem(post(&app, body, content_type).await, 422, "empty_body").await;
    }
    assert_problem(post(&app, "[]", json_type).await, 422, "empty_batch").await;
    assert_problem(
        post(&app, "{\"requests\": []}", json_type).await,
        422,
        "empty_batch",
    )
    .await;
    let six = serde_json::to_string(&objects(6)).unwrap();
    assert_problem(post(&app, &six, json_type).await, 413, "batch_too_large").await;
    let big = serde_json::to_string(&json!([{"blob": "x".repeat(4096)}])).unwrap();
    assert_problem(post(&app, &big, json_type).await, 413, "batch_too_large").await;
    assert_problem(
        post(&app, "[{}]", "text/plain").await,
        415,
        "unsupported_media_type",
    )
    .await;
    assert_problem(
        post(&app, "a=b", "application/x-www-form-urlencoded").await,
        415,
        "unsupported_media_type",
    )
    .await;
    assert_problem(
        post(&app, "{\"a\":1}\nnope\n", "application/x-ndjson").await,
        400,
        "invalid_json",
    )
    .await;
    assert_problem(
        post(&app, "[1]\n", "application/x-ndjson").await,
        422,
        "item_not_object",
    )
    .await;
    let bad_key = app
        .post_raw(b"[{}]".to_vec(), json_type, Some("has space"))
        .await;
    assert_problem(bad_key, 400, "invalid_idempotency_key").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn batch_status_errors() {
    let app = spawn_app().await;
    let malformed = app
        .http
        .get(app.url("/api/v1/batch/not-a-batch/status"))
        .send()
        .await
        .unwrap();
    assert_problem(malformed, 400, "invalid_batch_id").await;
    let unknown = app
        .http
        .get(app.url("/api/v1/batch/0123456789abcdef/status"))
        .send()
        .await
        .unwrap();
    assert_problem(unknown, 404, "batch_not_found").await;
    let no_route = app
        .http
        .get(app.url("/api/v2/nothing"))
        .send()
        .await
        .unwrap();
    assert_problem(no_route, 404, "route_not_found").await;
    app.assert_nothing_stored().await;
}

#[tokio::test]
async fn error_codes_are_counted_in_metrics() {
    let app = spawn_app().await;
    post(&app, "[]", "application/json").await;
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("outbox_writer_errors_total{code=\"empty_batch\"}")),
        "{metrics}"
    );
}

/// An item is stored as its JSON text: one of many small values takes its
/// JSON size in MongoDB (as BSON it took several times that, and an item
/// well under the body limit could pass MongoDB's 16 MiB per document).
#[tokio::test]
async fn an_item_of_many_small_values_is_stored_at_its_json_size() {
    let app = spawn_app().await;
    // 2.5 million zeros: 5 MB of JSON (about 30 MB as BSON numbers).
    let numbers = vec!["0"; 2_500_000].join(",");
    let big = format!(r#"{{"request_id":"big","vendor_name":"acme","n":[{numbers}]}}"#);
    let body = format!(r#"[{{"request_id":"small","vendor_name":"acme"}},{big}]"#);
    let response = post(&app, &body, "application/json").await;
    assert_eq!(response.status(), 201);
    let items = app
        .find_sorted("batch_items", doc! {}, doc! { "item_sequence": 1 })
        .await;
    assert_eq!(items[1].get_str("request_data").unwrap(), big);
}

/// Deep nesting up to the parser's limit is stored as sent (items are kept
/// as JSON text, so MongoDB's 100 levels do not apply); a NUL in the vendor
/// name, which the batch counts under as a key, is a client error, not 500.
#[tokio::test]
async fn deep_items_are_stored_and_a_nul_in_the_vendor_is_422() {
    let app = spawn_app().await;
    let deep = format!("[{{\"a\":{}1{}}}]", "[".repeat(120), "]".repeat(120));
    let response = post(&app, &deep, "application/json").await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["data"]["total_json_objects"], 1, "{body}");
    assert_problem(
        post(&app, r#"[{"vendor_name":"a\u0000b"}]"#, "application/json").await,
        422,
        "invalid_key",
    )
    .await;
    assert_eq!(app.count("batches").await, 1);
}
