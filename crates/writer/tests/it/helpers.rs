use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use mongodb::bson::{Document, doc};
use outbox_core::memory::MemoryStore;
use serde_json::Value;
use tokio::sync::oneshot;
use writer::{Application, Config};

/// Which MongoDB the scripts started: `mongod`, `external` or `standin`.
pub fn mongo_flavor() -> String {
    std::env::var("MONGODB_FLAVOR").unwrap_or_else(|_| "external".to_owned())
}

pub fn mongo_url() -> String {
    std::env::var("MONGODB_URL").unwrap_or_else(|_| {
        panic!("MONGODB_URL is not set: run scripts/test.sh, which starts MongoDB or its stand-in")
    })
}

pub struct TestApp {
    pub address: String,
    pub http: reqwest::Client,
    /// The test's own database, for looking at what was stored.
    pub db: Option<mongodb::Database>,
    _shutdown: oneshot::Sender<()>,
}

/// Logs to the test output when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

pub fn config(extra: &[&str]) -> Config {
    init_logging();
    let mut args = vec![
        "outbox-writer",
        "--bind",
        "127.0.0.1:0",
        "--log-format",
        "pretty",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).expect("test configuration parses")
}

pub fn start(app: Application, db: Option<mongodb::Database>) -> TestApp {
    let address = format!("http://{}", app.local_addr());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    TestApp {
        address,
        http: reqwest::Client::new(),
        db,
        _shutdown: tx,
    }
}

/// The writer over MongoDB, in a fresh database, once its schema is ready.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    spawn_app_on(&mongo_url(), extra).await
}

/// The writer over the MongoDB at `url` (the test looks at the data through
/// the scripts' `MONGODB_URL`, the same server).
pub async fn spawn_app_on(url: &str, extra: &[&str]) -> TestApp {
    let database = format!("writer_test_{}", uuid::Uuid::new_v4().simple());
    let mut args = vec!["--mongodb-url", url, "--mongodb-database", &database];
    // The shared stand-in runs one transaction at a time for all the tests
    // running in parallel: room beyond the 2 s default deadline.
    if !extra.contains(&"--request-deadline-seconds") {
        args.extend(["--request-deadline-seconds", "30"]);
    }
    args.extend_from_slice(extra);
    let app = Application::build(config(&args))
        .await
        .expect("writer starts");
    let client = mongodb::Client::with_uri_str(mongo_url())
        .await
        .expect("test client");
    let app = start(app, Some(client.database(&database)));
    app.wait_ready().await;
    app
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The writer over the in-memory store.
pub fn spawn_memory_app(store: MemoryStore) -> TestApp {
    let config = config(&[]);
    let app = Application::with_store(&config, Arc::new(store), Arc::new(AtomicBool::new(true)))
        .expect("writer starts");
    start(app, None)
}

/// Polls `check` every 20 ms until it returns true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn wait_ready(&self) {
        let url = self.url("/health/ready");
        let http = self.http.clone();
        // The shared stand-in runs every test's transactions one at a time:
        // creating the schema can wait behind another test's load.
        eventually(Duration::from_secs(60), "the writer to be ready", || {
            let request = http.get(&url).send();
            async move { request.await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn post_json(&self, body: &Value) -> reqwest::Response {
        self.post_raw(serde_json::to_vec(body).unwrap(), "application/json", None)
            .await
    }

    pub async fn post_raw(
        &self,
        body: Vec<u8>,
        content_type: &str,
        key: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.url("/api/v1/batch/process"))
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("request sent")
    }

    pub fn db(&self) -> &mongodb::Database {
        self.db.as_ref().expect("this app has a MongoDB database")
    }

    pub async fn count(&self, collection: &str) -> u64 {
        self.db()
            .collection::<Document>(collection)
            .count_documents(doc! {})
            .await
            .unwrap()
    }

    /// Nothing was stored: no batch, no item, no idempotency key.
    pub async fn assert_nothing_stored(&self) {
        assert_eq!(self.count("batches").await, 0, "a batch was stored");
        assert_eq!(self.count("batch_items").await, 0, "items were stored");
        assert_eq!(
            self.count("idempotency_keys").await,
            0,
            "an idempotency key was stored"
        );
    }

    pub async fn find_sorted(
        &self,
        collection: &str,
        filter: Document,
        sort: Document,
    ) -> Vec<Document> {
        use futures::TryStreamExt;
        self.db()
            .collection::<Document>(collection)
            .find(filter)
            .sort(sort)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }
}

/// `n` small request objects of alternating vendors.
pub fn objects(n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| serde_json::json!({"request_id": format!("r-{i}"), "vendor_name": if i % 2 == 0 { "acme" } else { "globex" }, "n": i}))
            .collect(),
    )
}

pub async fn json(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

pub fn get_i64(doc: &Document, key: &str) -> i64 {
    match doc.get(key) {
        Some(mongodb::bson::Bson::Int32(v)) => i64::from(*v),
        Some(mongodb::bson::Bson::Int64(v)) => *v,
        other => panic!("{key} is not an integer: {other:?}"),
    }
}
