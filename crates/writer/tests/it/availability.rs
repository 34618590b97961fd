use std::time::{Duration, Instant};

use outbox_core::memory::MemoryStore;
use tokio::sync::oneshot;
use writer::Application;

use crate::helpers::{config, json, objects, spawn_memory_app};

/// With MongoDB unreachable, the writer answers 503 with Retry-After within
/// about the 2 s server-selection timeout, not the driver's default 30 s.
#[tokio::test]
async fn mongodb_down_fails_fast_with_503() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("mongodb://127.0.0.1:{port}/?replicaSet=rs0");
    let config = config(&["--mongodb-url", &url]);
    let app = Application::build(config)
        .await
        .expect("the writer starts while MongoDB is down");
    let address = format!("http://{}", app.local_addr());
    let (_stop, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    let http = reqwest::Client::new();

    let started = Instant::now();
    let response = http
        .post(format!("{address}/api/v1/batch/process"))
        .json(&objects(2))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await["code"], "store_unavailable");
    assert!(took < Duration::from_secs(5), "503 took {took:?}");

    let ready = http
        .get(format!("{address}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let live = http
        .get(format!("{address}/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}

/// A store outage mid-flight is a 503 too, and nothing half-written stays.
#[tokio::test]
async fn store_outage_is_a_503_and_recovers() {
    let store = MemoryStore::new();
    let app = spawn_memory_app(store.clone());
    store.set_unavailable(true);
    let response = app.post_json(&objects(3)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(store.batch_statuses().len(), 0);
    store.set_unavailable(false);
    assert_eq!(app.post_json(&objects(3)).await.status(), 201);
    assert_eq!(store.batch_statuses().len(), 1);
}
