use std::time::Duration;

use mongodb::bson::{Bson, doc};
use serde_json::json;

use crate::helpers::{eventually, get_i64, json, objects, spawn_app, spawn_app_with};

#[tokio::test]
async fn a_batch_is_stored_whole_and_reported() {
    let app = spawn_app().await;
    let body = json!([
        {"request_id": "a-1", "vendor_name": "acme", "payload": {"x": [1, 2.5, "s"], "nested": {"ok": true}}},
        {"request_id": 7, "vendor_name": "globex"},
        {"vendor_name": "acme"},
        {"something": "else"}
    ]);
    let response = app.post_json(&body).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let reply = json(response).await;
    assert_eq!(reply["status"], "success");
    let data = &reply["data"];
    let batch_id = data["batch_id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/batch/{batch_id}/status"));
    assert_eq!(data["batch_sequence"], 1);
    assert_eq!(data["total_json_objects"], 4);
    assert_eq!(
        data["vendor_counts"],
        json!({"acme": 2, "globex": 1, "unknown": 1})
    );
    assert_eq!(data["unique_vendors"], 3);
    assert!(data["processing_time_ms"].is_u64());
    let timestamp = data["timestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok() && timestamp.ends_with('Z'),
        "{timestamp}"
    );

    let batches = app.find_sorted("batches", doc! {}, doc! {}).await;
    assert_eq!(batches.len(), 1);
    let batch = &batches[0];
    assert_eq!(batch.get_str("batch_id").unwrap(), batch_id);
    assert_eq!(get_i64(batch, "batch_sequence"), 1);
    assert_eq!(get_i64(batch, "total_items"), 4);
    assert_eq!(batch.get_str("status").unwrap(), "pending");
    assert_eq!(batch.get("committed_at"), Some(&Bson::Null));

    let items = app
        .find_sorted(
            "batch_items",
            doc! { "batch_id": &batch_id },
            doc! { "item_sequence": 1 },
        )
        .await;
    assert_eq!(items.len(), 4);
    for (index, item) in items.iter().enumerate() {
        assert_eq!(get_i64(item, "item_sequence"), index as i64 + 1);
        assert_eq!(get_i64(item, "batch_sequence"), 1);
        assert_eq!(item.get_str("status").unwrap(), "pending");
        assert!(!item.get_bool("sent").unwrap());
        assert_eq!(item.get("publish_id"), Some(&Bson::Null));
        assert!(uuid::Uuid::parse_str(item.get_str("item_id").unwrap()).is_ok());
        let stored: serde_json::Value =
            serde_json::from_str(item.get_str("request_data").unwrap()).unwrap();
        assert_eq!(stored, body[index], "request_data changed");
    }
    let request_ids: Vec<_> = items.iter().map(|i| i.get("request_id").cloned()).collect();
    assert_eq!(
        request_ids,
        [
            Some(Bson::from("a-1")),
            Some(Bson::from("7")),
            Some(Bson::Null),
            Some(Bson::Null)
        ]
    );
    assert_eq!(items[3].get_str("vendor_name").unwrap(), "unknown");

    let status = json(app.http.get(app.url(&location)).send().await.unwrap()).await;
    assert_eq!(status["batch_id"], batch_id.as_str());
    assert_eq!(status["status"], "pending");
    assert_eq!(
        (
            status["total"].clone(),
            status["sent"].clone(),
            status["pending"].clone()
        ),
        (json!(4), json!(0), json!(4))
    );
    assert_eq!(status["progress_percentage"], 0.0);
    assert_eq!(status["committed_at"], serde_json::Value::Null);
}

#[tokio::test]
async fn the_requests_wrapper_and_ndjson_are_accepted() {
    let app = spawn_app().await;
    let wrapped = app.post_json(&json!({"requests": objects(3)})).await;
    assert_eq!(wrapped.status(), 201);
    assert_eq!(json(wrapped).await["data"]["batch_sequence"], 1);

    let ndjson = "{\"request_id\":\"n1\"}\n\n{\"request_id\":\"n2\",\"vendor_name\":\"acme\"}\n";
    let response = app
        .post_raw(ndjson.as_bytes().to_vec(), "application/x-ndjson", None)
        .await;
    assert_eq!(response.status(), 201);
    let reply = json(response).await;
    assert_eq!(reply["data"]["batch_sequence"], 2);
    assert_eq!(reply["data"]["total_json_objects"], 2);
    assert_eq!(app.count("batch_items").await, 5);
}

/// A batch at the item limit is staged: its items stored a chunk at a time
/// before a short transaction takes the sequence and publishes the batch.
#[tokio::test]
async fn a_ten_thousand_item_batch_is_staged_and_stored_whole() {
    let app = spawn_app().await;
    let response = app.post_json(&objects(10_000)).await;
    assert_eq!(response.status(), 201);
    let reply = json(response).await;
    assert_eq!(reply["data"]["total_json_objects"], 10_000);
    assert_eq!(reply["data"]["batch_sequence"], 1);
    assert_eq!(app.count("batch_items").await, 10_000);
    assert_eq!(
        app.count("staged_batches").await,
        0,
        "the staging record went with the transaction"
    );
    let last = app
        .find_sorted("batch_items", doc! {}, doc! { "item_sequence": -1 })
        .await;
    assert_eq!(get_i64(&last[0], "item_sequence"), 10_000);
    // The next batch, small, takes the next sequence in one transaction.
    let small = json(app.post_json(&objects(3)).await).await;
    assert_eq!(small["data"]["batch_sequence"], 2);
    let status: serde_json::Value = app
        .http
        .get(app.url(&format!(
            "/api/v1/batch/{}/status",
            reply["data"]["batch_id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["total"], 10_000);
    assert_eq!(status["status"], "pending");
}

/// Two requests with one idempotency key, both staged: one batch is stored,
/// the other request answers it, and the loser's staged items are removed.
#[tokio::test]
async fn a_staged_batch_that_loses_its_idempotency_key_leaves_nothing_behind() {
    let app = spawn_app_with(&["--stage-above-items", "0"]).await;
    let body = objects(50);
    let send = || {
        app.http
            .post(app.url("/api/v1/batch/process"))
            .header("Idempotency-Key", "same-key")
            .json(&body)
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.status() == 201 && b.status() == 201,
        "{} {}",
        a.status(),
        b.status()
    );
    let (a, b) = (json(a).await, json(b).await);
    assert_eq!(a["data"]["batch_id"], b["data"]["batch_id"]);
    assert_eq!(app.count("batches").await, 1);
    eventually(
        Duration::from_secs(30),
        "the loser's staged items removed",
        || async { app.count("batch_items").await == 50 },
    )
    .await;
    // Its staging record stays, marked abandoned, for the relay's sweep: a
    // chunk insert the writer gave up on that lands later is removed then.
    let records = app
        .find_sorted("staged_batches", doc! {}, doc! { "_id": 1 })
        .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].get("abandoned_at").is_some(), "{records:?}");
    assert_ne!(
        records[0].get_str("_id").unwrap(),
        a["data"]["batch_id"].as_str().unwrap()
    );
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let app = spawn_app().await;
    let live = app.http.get(app.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    assert_eq!(app.post_json(&objects(2)).await.status(), 201);
    let metrics = app.metrics().await;
    for name in [
        "outbox_writer_batches_accepted_total",
        "outbox_writer_items_accepted_total",
        "outbox_writer_request_duration_seconds_bucket",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
}

/// A URL asking for secondary reads must not break transactions (which the
/// driver refuses on anything but the primary) nor the relay's reads: the
/// writer pins the primary.
#[tokio::test]
async fn a_url_preferring_secondaries_still_stores_batches() {
    let url = crate::helpers::mongo_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}readPreference=secondaryPreferred");
    let app = crate::helpers::spawn_app_on(&url, &[]).await;
    let response = app.post_json(&crate::helpers::objects(3)).await;
    assert_eq!(response.status(), 201);
    assert_eq!(app.count("batch_items").await, 3);
}
