//! The admin port, over the in-memory store.

use clap::Parser;
use outbox_core::memory::MemoryStore;
use outbox_core::store::OutboxStore;
use relay::{Application, Cli};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::fakes::{FakePublisher, store_batches};

const TOKEN: &str = "s3cret-admin-token-0123456789abcdef";

struct Admin {
    base: String,
    http: reqwest::Client,
    /// The relay's token, sent with every GET.
    token: Option<String>,
    _stop: oneshot::Sender<()>,
}

impl Admin {
    async fn get(&self, path: &str) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
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
    let token = extra
        .iter()
        .position(|a| *a == "--admin-token")
        .map(|i| extra[i + 1].to_owned());
    let admin = Admin {
        base,
        http: reqwest::Client::new(),
        token,
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
    let admin = admin(&store, &["--admin-token", TOKEN]).await;
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
    let (code, body) = admin.post("/api/v1/outbox/start", Some(TOKEN)).await;
    assert_eq!((code, body["paused"].clone()), (200, Value::Bool(false)));
    assert!(
        !store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
    );
    assert_eq!(admin.post("/api/v1/outbox/stop", Some(TOKEN)).await.0, 200);
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
    let admin = admin(&store, &["--admin-token", TOKEN]).await;
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
        .bearer_auth(TOKEN)
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

/// The paths of the served document's `/api` operations, filled in.
fn api_routes(doc: &Value) -> Vec<(reqwest::Method, String)> {
    outbox_service::openapi::operations(doc)
        .into_iter()
        .filter(|(_, path)| path.starts_with("/api/"))
        .map(|(method, path)| {
            let path = path
                .replace("{stream}", "default")
                .replace("{batch_id}", "0123456789abcdef")
                .replace("{replay_id}", "00000000-0000-4000-8000-000000000000");
            (method.parse().unwrap(), path)
        })
        .collect()
}

/// `path` with each letter percent-encoded in turn.
fn encoded_spellings(path: &str) -> Vec<String> {
    path.char_indices()
        .filter(|(_, c)| c.is_ascii_alphabetic())
        .map(|(i, c)| format!("{}%{:02X}{}", &path[..i], c as u32, &path[i + 1..]))
        .collect()
}

#[tokio::test]
async fn with_a_token_every_api_route_needs_it_however_the_path_is_spelled() {
    let store = MemoryStore::new();
    let admin = admin(&store, &["--admin-token", TOKEN]).await;
    let http = &admin.http;
    // Open without the token: health, metrics, the document, the page.
    for path in [
        "/health/live",
        "/metrics",
        "/openapi.json",
        "/",
        "/dashboard.js",
    ] {
        let response = http
            .get(format!("{}{path}", admin.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let doc: Value = http
        .get(format!("{}/openapi.json", admin.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let routes = api_routes(&doc);
    assert_eq!(routes.len(), 26, "{routes:?}");
    for (method, path) in &routes {
        for spelling in std::iter::once(path.clone()).chain(encoded_spellings(path)) {
            for token in [None, Some("wrong-token-0123456789abcdef-0123456")] {
                let mut request = http.request(method.clone(), format!("{}{spelling}", admin.base));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 401, "{method} {spelling} with {token:?}");
                assert!(response.headers().contains_key("www-authenticate"));
            }
        }
    }
    assert!(
        store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap(),
        "nothing unauthorized changed the stream"
    );
    for (method, path) in &routes {
        // With the token the route answers (whatever it answers, not 401).
        let response = http
            .request(method.clone(), format!("{}{path}", admin.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_ne!(response.status(), 401, "{method} {path} with the token");
    }
    // The document says so for every API operation.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let secured = operation["security"] == serde_json::json!([{ "admin_token": [] }]);
            assert_eq!(secured, path.starts_with("/api/"), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn without_a_token_no_other_site_can_change_anything() {
    let store = MemoryStore::new();
    let admin = admin(&store, &["--admin-insecure-no-token"]).await;
    let start = format!("{}/api/v1/outbox/start", admin.base);
    let host = admin.base.trim_start_matches("http://").to_owned();
    for (header, value) in [
        ("origin", "https://evil.example".to_owned()),
        ("origin", "null".to_owned()),
        ("sec-fetch-site", "cross-site".to_owned()),
    ] {
        let response = admin
            .http
            .post(&start)
            .header(header, value.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{header}: {value}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "cross_origin");
    }
    assert!(
        store
            .paused(&outbox_core::stream::StreamName::default())
            .await
            .unwrap()
    );
    // Its own page (same origin) and a command-line client (no Origin) may.
    let response = admin
        .http
        .post(&start)
        .header("origin", format!("http://{host}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(admin.post("/api/v1/outbox/stop", None).await.0, 200);
    // Reads are open without a token, and the replica says it is open.
    let mut cluster = Value::Null;
    for _ in 0..500 {
        let (code, body) = admin.get("/api/v1/cluster").await;
        assert_eq!(code, 200);
        cluster = body;
        if cluster["replicas"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(cluster["replicas"][0]["admin_token"], "none", "{cluster}");
    assert_eq!(
        cluster["admin_token_mismatches"][0], cluster["relay_id"],
        "{cluster}"
    );
}
