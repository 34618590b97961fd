//! API keys, per-key rate limits and trace context over HTTP.

use mongodb::bson::doc;
use serde_json::Value;

use crate::helpers::{TestApp, json, objects, spawn_app, spawn_app_with};

const OPS_KEY: &str = "ops-key-0123456789abcdef";
const BILLING_KEY: &str = "billing-key-0123456789abcdef";

async fn post_as(app: &TestApp, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = app.http.post(app.url("/api/v1/batch/process")).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn with_api_keys_every_api_request_needs_a_valid_one() {
    let file = std::env::temp_dir().join(format!("writer-keys-{}", uuid::Uuid::new_v4()));
    std::fs::write(&file, format!("# billing team\nbilling:{BILLING_KEY}\n")).unwrap();
    let keys = format!("ops:{OPS_KEY}");
    let app = spawn_app_with(&[
        "--api-keys",
        &keys,
        "--api-keys-file",
        file.to_str().unwrap(),
    ])
    .await;
    std::fs::remove_file(&file).unwrap();

    for token in [None, Some("wrong-key-0123456789abcdef"), Some("")] {
        let response = post_as(&app, token, &objects(1)).await;
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"batch-outbox\""
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem = json(response).await;
        assert_eq!(problem["code"], "unauthorized");
        assert!(!problem.to_string().contains(OPS_KEY));
    }
    let unknown = "/api/v1/batch/0123456789abcdef/status";
    let response = app.http.get(app.url(unknown)).send().await.unwrap();
    assert_eq!(response.status(), 401);
    app.assert_nothing_stored().await;

    // Health and metrics stay open.
    for path in ["/health/live", "/health/ready", "/metrics"] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }

    let response = post_as(&app, Some(OPS_KEY), &objects(2)).await;
    assert_eq!(response.status(), 201);
    let response = post_as(&app, Some(BILLING_KEY), &objects(3)).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let status = app
        .http
        .get(app.url(&location))
        .bearer_auth(BILLING_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    assert_eq!(json(status).await["submitted_by"], "billing");

    let batches = app
        .find_sorted("batches", doc! {}, doc! { "batch_sequence": 1 })
        .await;
    let names: Vec<_> = batches
        .iter()
        .map(|b| b.get_str("submitted_by").unwrap())
        .collect();
    assert_eq!(names, ["ops", "billing"]);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("outbox_writer_items_accepted_total{submitted_by=\"billing\"} 3"),
        "{metrics}"
    );
    assert!(!metrics.contains(BILLING_KEY));
}

#[tokio::test]
async fn a_key_over_its_item_rate_gets_429_with_retry_after() {
    let keys = format!("ops:{OPS_KEY},billing:{BILLING_KEY}");
    let app = spawn_app_with(&[
        "--api-keys",
        &keys,
        "--rate-limit-items-per-second",
        "1",
        "--max-batch-items",
        "5",
    ])
    .await;
    assert_eq!(
        post_as(&app, Some(OPS_KEY), &objects(5)).await.status(),
        201
    );
    let response = post_as(&app, Some(OPS_KEY), &objects(2)).await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    assert_eq!(json(response).await["code"], "rate_limited");
    // Another key has its own budget.
    assert_eq!(
        post_as(&app, Some(BILLING_KEY), &objects(5)).await.status(),
        201
    );
    assert_eq!(app.count("batches").await, 2);
}

#[tokio::test]
async fn the_trace_context_is_continued_stored_and_answered() {
    let app = spawn_app().await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = app
        .http
        .post(app.url("/api/v1/batch/process"))
        .header("traceparent", incoming)
        .json(&objects(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let answered = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        answered.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{answered}"
    );
    assert_ne!(
        answered, incoming,
        "the writer's own span is the new parent"
    );

    // No (or an invalid) header: a new trace is started.
    let response = app
        .http
        .post(app.url("/api/v1/batch/process"))
        .header("traceparent", "garbage")
        .json(&objects(1))
        .send()
        .await
        .unwrap();
    let started = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(started.len(), 55, "{started}");
    assert!(!started.contains("4bf92f3577b34da6a3ce929d0e0e4736"));

    let batches = app
        .find_sorted("batches", doc! {}, doc! { "batch_sequence": 1 })
        .await;
    let stored: Vec<_> = batches
        .iter()
        .map(|b| b.get_str("traceparent").unwrap())
        .collect();
    assert_eq!(stored, [answered.as_str(), started.as_str()]);
    // Open API: batches carry no submitter.
    assert!(batches[0].get("submitted_by").is_none());
}

/// The spellings of `path` with one letter percent-encoded (upper- and
/// lowercase hex in turn): the router decodes them to the same route.
fn encoded_spellings(path: &str) -> Vec<String> {
    path.char_indices()
        .filter(|(_, c)| c.is_ascii_alphabetic())
        .map(|(i, c)| {
            let hex = if i % 2 == 0 {
                format!("%{:02X}", c as u32)
            } else {
                format!("%{:02x}", c as u32)
            };
            format!("{}{hex}{}", &path[..i], &path[i + 1..])
        })
        .collect()
}

#[tokio::test]
async fn no_spelling_of_an_api_path_gets_past_the_key_check() {
    let app = spawn_app_with(&["--api-keys", &format!("ops:{OPS_KEY}")]).await;
    let stored = post_as(&app, Some(OPS_KEY), &objects(1)).await;
    assert_eq!(stored.status(), 201);
    let batch_id = json(stored).await["data"]["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = json(app.http.get(app.url("/openapi.json")).send().await.unwrap()).await;
    let api: Vec<(String, String)> = outbox_service::openapi::operations(&doc)
        .into_iter()
        .filter(|(_, path)| path.starts_with("/api/"))
        .collect();
    assert_eq!(api.len(), 3, "every API route is covered: {api:?}");
    let mut tried = 0;
    for (method, template) in api {
        let path = template
            .replace("{batch_id}", &batch_id)
            .replace("{stream}", "default");
        let method: reqwest::Method = method.parse().unwrap();
        for spelling in std::iter::once(path.clone()).chain(encoded_spellings(&path)) {
            let response = app
                .http
                .request(method.clone(), app.url(&spelling))
                .json(&objects(1))
                .send()
                .await
                .unwrap();
            // Every spelling reaches the route and is refused there.
            assert_eq!(response.status(), 401, "{method} {spelling}");
            tried += 1;
        }
    }
    assert!(tried > 60, "{tried}");
    assert_eq!(
        app.count("batches").await,
        1,
        "nothing stored without a key"
    );
}

/// Idempotency keys are the caller's own: the same key from two API keys'
/// callers stores two batches, and neither replays the other's.
#[tokio::test]
async fn an_idempotency_key_is_scoped_to_its_caller() {
    let keys = format!("ops:{OPS_KEY},billing:{BILLING_KEY}");
    let app = spawn_app_with(&["--api-keys", &keys]).await;
    let send = |token: &'static str| {
        app.http
            .post(app.url("/api/v1/batch/process"))
            .bearer_auth(token)
            .header("Idempotency-Key", "order-42")
            .json(&objects(1))
            .send()
    };
    let ops = send(OPS_KEY).await.unwrap();
    assert_eq!(ops.status(), 201);
    let ops_body = json(ops).await;
    assert_eq!(
        ops_body["data"]["submitted_by"], "ops",
        "the answer names the caller"
    );
    let ops_batch = ops_body["data"]["batch_id"].clone();
    let billing = send(BILLING_KEY).await.unwrap();
    assert_eq!(billing.status(), 201);
    assert!(billing.headers().get("idempotent-replayed").is_none());
    let billing_batch = json(billing).await["data"]["batch_id"].clone();
    assert_ne!(
        ops_batch, billing_batch,
        "another caller's key is not a replay"
    );
    // The same caller again: a replay of its own batch.
    let again = send(OPS_KEY).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(json(again).await["data"]["batch_id"], ops_batch);
    assert_eq!(app.count("batches").await, 2);
}
