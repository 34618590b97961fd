//! The admin port, over the in-memory store.

use clap::Parser;
use outbox_core::memory::MemoryStore;
use outbox_core::store::OutboxStore;
use relay::{Application, Cli};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::fakes::{FakePublisher, store_batches};

struct Admin {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Admin {
    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn post(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.http.post(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }
}

/// A replica over `store` that never becomes leader (paused from the start),
/// so the admin API is tested on its own.
async fn admin(store: &MemoryStore, extra: &[&str]) -> Admin {
    let mut args = vec![
        "outbox-relay",
        "--admin-bind",
        "127.0.0.1:0",
        "--enable-processor",
        "false",
        "--log-format",
        "pretty",
    ];
    args.extend_from_slice(extra);
    let config = Cli::try_parse_from(args).unwrap().config;
    let app = Application::with_parts(
        &config,
        relay::ClusterStores::all(store.clone()),
        crate::fakes::publishers(&FakePublisher::new("a")),
    )
    .unwrap();
    let base = format!("http://{}", app.admin_addr());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    let admin = Admin {
        base,
        http: reqwest::Client::new(),
        _stop: tx,
    };
    // The replica pauses the cluster as it starts.
    for _ in 0..500 {
        if store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
        {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    admin
}

#[tokio::test]
async fn status_start_stop_and_tokens() {
    let store = MemoryStore::new();
    let admin = admin(&store, &["--admin-token", "s3cret"]).await;
    let (code, status) = admin.get("/api/v1/outbox/status").await;
    assert_eq!(code, 200);
    assert_eq!(status["paused"], true);
    assert!(status["role"] == "leader" || status["role"] == "standby");
    assert!(status["relay_id"].as_str().is_some_and(|id| !id.is_empty()));

    assert_eq!(admin.post("/api/v1/outbox/start", None).await.0, 401);
    assert_eq!(
        admin.post("/api/v1/outbox/start", Some("wrong")).await.0,
        401
    );
    assert!(
        store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap(),
        "an unauthorized start changed nothing"
    );
    let (code, body) = admin.post("/api/v1/outbox/start", Some("s3cret")).await;
    assert_eq!((code, body["paused"].clone()), (200, Value::Bool(false)));
    assert!(
        !store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
    );
    assert_eq!(
        admin.post("/api/v1/outbox/stop", Some("s3cret")).await.0,
        200
    );
    assert!(
        store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn inspection_pages_and_retry() {
    let store = MemoryStore::new();
    let batches = store_batches(&store, &[3, 2, 1]).await;
    let admin = admin(&store, &[]).await;

    let (code, page) = admin.get("/api/v1/outbox/pending-batches?limit=2").await;
    assert_eq!(code, 200);
    let sequences: Vec<_> = page["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch_sequence"].clone())
        .collect();
    assert_eq!(sequences, [1, 2]);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = admin
        .get(&format!(
            "/api/v1/outbox/pending-batches?limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(rest["batches"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_cursor"], Value::Null);

    let id = batches[0].batch_id.to_string();
    let (code, status) = admin
        .get(&format!("/api/v1/outbox/batch/{id}/status"))
        .await;
    assert_eq!(code, 200);
    assert_eq!(status["status"], "pending");
    assert_eq!(status["items"]["total"], 3);

    let (_, items) = admin
        .get(&format!("/api/v1/outbox/batch/{id}/items?limit=2"))
        .await;
    let seqs: Vec<_> = items["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_sequence"].clone())
        .collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(items["items"][0]["status"], "pending");
    let (_, more) = admin
        .get(&format!("/api/v1/outbox/batch/{id}/items?limit=2&cursor=2"))
        .await;
    assert_eq!(more["items"][0]["item_sequence"], 3);

    let (code, body) = admin
        .post(&format!("/api/v1/outbox/batch/{id}/retry"), None)
        .await;
    assert_eq!(
        (code, body["code"].clone()),
        (409, Value::from("batch_not_failed"))
    );
    let (code, body) = admin
        .post("/api/v1/outbox/batch/0123456789abcdef/retry", None)
        .await;
    assert_eq!(
        (code, body["code"].clone()),
        (404, Value::from("batch_not_found"))
    );
    let (code, body) = admin.get("/api/v1/outbox/batch/nope/status").await;
    assert_eq!(
        (code, body["code"].clone()),
        (400, Value::from("invalid_batch_id"))
    );
    let (code, body) = admin
        .get("/api/v1/outbox/batch/0123456789abcdef/items")
        .await;
    assert_eq!(
        (code, body["code"].clone()),
        (404, Value::from("batch_not_found"))
    );
    let (code, body) = admin.get("/api/v1/outbox/pending-batches?limit=0").await;
    assert_eq!(
        (code, body["code"].clone()),
        (400, Value::from("invalid_limit"))
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let store = MemoryStore::new();
    let admin = admin(&store, &[]).await;
    assert_eq!(admin.get("/health/live").await.0, 200);
    assert_eq!(admin.get("/health/ready").await.0, 200);
    store.set_unavailable(true);
    assert_eq!(admin.get("/health/ready").await.0, 503);
    store.set_unavailable(false);
    let text = reqwest::get(format!("{}/metrics", admin.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("outbox_relay_is_leader"), "{text}");
}

#[tokio::test]
async fn the_openapi_document_describes_every_admin_route_and_docs_are_served() {
    use outbox_service::openapi::{document_problems, operations};
    let store = MemoryStore::new();
    let admin = admin(&store, &["--admin-token", "s3cret"]).await;
    let (code, doc) = admin.get("/openapi.json").await;
    assert_eq!(code, 200);
    assert_eq!(document_problems(&doc), Vec::<String>::new());
    let routes: Vec<(String, String)> = [
        ("GET", "/"),
        ("GET", "/api/v1/cluster"),
        ("GET", "/api/v1/outbox/batch/{batch_id}/items"),
        ("GET", "/api/v1/outbox/batch/{batch_id}/status"),
        ("GET", "/api/v1/outbox/history"),
        ("GET", "/api/v1/outbox/pending-batches"),
        ("GET", "/api/v1/outbox/replays"),
        ("GET", "/api/v1/outbox/replays/{replay_id}"),
        ("GET", "/api/v1/outbox/status"),
        ("GET", "/api/v1/streams"),
        ("GET", "/api/v1/streams/{stream}"),
        ("GET", "/api/v1/streams/{stream}/batch/{batch_id}/items"),
        ("GET", "/api/v1/streams/{stream}/batch/{batch_id}/status"),
        ("GET", "/api/v1/streams/{stream}/history"),
        ("GET", "/api/v1/streams/{stream}/pending-batches"),
        ("GET", "/api/v1/streams/{stream}/status"),
        ("GET", "/dashboard.css"),
        ("GET", "/dashboard.js"),
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/metrics"),
        ("POST", "/api/v1/outbox/batch/{batch_id}/retry"),
        ("POST", "/api/v1/outbox/replays"),
        ("POST", "/api/v1/outbox/replays/{replay_id}/cancel"),
        ("POST", "/api/v1/outbox/replays/{replay_id}/pause"),
        ("POST", "/api/v1/outbox/replays/{replay_id}/resume"),
        ("POST", "/api/v1/outbox/start"),
        ("POST", "/api/v1/outbox/stop"),
        ("POST", "/api/v1/streams/{stream}/batch/{batch_id}/retry"),
        ("POST", "/api/v1/streams/{stream}/pause"),
        ("POST", "/api/v1/streams/{stream}/resume"),
        ("PUT", "/api/v1/streams/{stream}"),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
    .collect();
    assert_eq!(operations(&doc), routes);
    assert!(doc["components"]["securitySchemes"]["admin_token"].is_object());
    let text = doc.to_string();
    for code in [
        "unauthorized",
        "stream_not_found",
        "invalid_stream",
        "too_many_streams",
        "batch_not_found",
        "batch_not_failed",
        "invalid_batch_id",
        "invalid_limit",
        "invalid_cursor",
        "store_unavailable",
    ] {
        assert!(
            text.contains(&format!("`{code}`")),
            "problem code {code} is not described"
        );
    }

    let page = admin
        .http
        .get(format!("{}/docs/", admin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("swagger-ui"));
    let response = admin
        .http
        .get(format!("{}/api/v1/outbox/stop", admin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
}

/// The replica records its counters from the start, for the dashboard.
#[tokio::test]
async fn history_has_the_counters_from_the_start() {
    let store = MemoryStore::new();
    let admin = admin(&store, &[]).await;
    let mut answer = Value::Null;
    for _ in 0..500 {
        let (code, body) = admin.get("/api/v1/outbox/history").await;
        assert_eq!(code, 200);
        if body["samples"].as_array().is_some_and(|s| !s.is_empty()) {
            answer = body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(answer["interval_seconds"], 2, "{answer}");
    let sample = &answer["samples"][0];
    assert_eq!(sample["published_total"], 0, "{answer}");
    assert!(
        sample["at"].as_str().is_some_and(|at| at.ends_with('Z')),
        "{answer}"
    );
}
