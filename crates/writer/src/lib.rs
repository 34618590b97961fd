//! The writer: accepts batches of JSON requests over HTTP and stores each
//! one atomically in MongoDB, with a gap-free `batch_sequence`.
//!
//! # Layout
//! - [`config`]: command-line flags and environment variables.
//! - [`routes`]: the HTTP handlers.
//! - [`auth`]: optional API keys and per-key rate limits.
//! - [`claim_check`]: large payloads put in an object store before their batch.
//! - [`metrics`]: metric names.
//! - [`openapi`]: the OpenAPI document (`/openapi.json`, `/docs/`).
//! - [`Application`]: binds the listener and runs the server; tests start
//!   it in-process on port 0, with MongoDB or the in-memory store.

pub mod auth;
pub mod claim_check;
pub mod config;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod streams;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix_web::dev::{Server, Service};
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use outbox_core::claim_check::ObjectRefStore;
use outbox_core::store::{BatchStore, StreamStore};
use outbox_mongo::MongoStore;
use tracing::{info, warn};

pub use config::Config;
use openapi::WriterApi;
use routes::AppState;
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

/// A bound, not yet running, writer.
pub struct Application {
    server: Server,
    local_addr: SocketAddr,
    grace: Duration,
}

impl Application {
    /// Connects to MongoDB (lazily: the writer starts, and answers 503,
    /// while MongoDB is down) and binds the listener. Indexes and the
    /// sequence counter are created in the background as soon as MongoDB
    /// answers; `/health/ready` reports when.
    ///
    /// # Errors
    /// When the MongoDB URL is invalid or the address cannot be bound.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let mongo_config = config
            .mongo
            .to_config("outbox-writer")
            .map_err(anyhow::Error::msg)?;
        let mut mongo_config = mongo_config;
        mongo_config.idempotency_ttl = Duration::from_secs(config.idempotency_ttl_seconds);
        // Requests read (definitions, idempotency keys) beside the
        // transactions the slots admit: room for them all.
        mongo_config.pool_size = Some(100);
        mongo_config.stage_above_items =
            usize::try_from(config.stage_above_items).unwrap_or(usize::MAX);
        mongo_config.stage_above_bytes =
            usize::try_from(config.stage_above_bytes).unwrap_or(usize::MAX);
        let store = MongoStore::connect(mongo_config)
            .await
            .context("configuring the MongoDB client")?;
        let schema_ready = Arc::new(AtomicBool::new(false));
        tokio::spawn(ensure_schema(store.clone(), Arc::clone(&schema_ready)));
        Self::with_store(&config, Arc::new(store), schema_ready)
    }

    /// Binds the writer over any [`BatchStore`].
    ///
    /// # Errors
    /// When the address cannot be bound or the API keys cannot be read.
    pub fn with_store<S>(
        config: &Config,
        store: Arc<S>,
        schema_ready: Arc<AtomicBool>,
    ) -> anyhow::Result<Self>
    where
        S: BatchStore + StreamStore + ObjectRefStore,
    {
        crate::metrics::describe();
        let listener =
            TcpListener::bind(config.bind).with_context(|| format!("binding {}", config.bind))?;
        let local_addr = listener.local_addr().context("reading the bound address")?;
        let access = web::Data::new(config.access().map_err(anyhow::Error::msg)?);
        if access.required() {
            info!(message = "API keys required on /api/v1/");
        }
        let state = web::Data::new(AppState {
            catalog: streams::Catalog::new(Arc::clone(&store) as Arc<dyn StreamStore>),
            claim_checks: Arc::new(claim_check::ClaimChecks {
                default: config.claim_check(),
                max_item_bytes: config.max_item_bytes,
                timeout: Duration::from_secs(config.claim_check_timeout_seconds),
                stores: outbox_claim_check::Stores::default(),
                refs: Arc::clone(&store) as Arc<dyn ObjectRefStore>,
            }),
            store,
            rules: config.ingest_rules(),
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            request_deadline: config.request_deadline(),
            schema_ready,
            prometheus: outbox_service::telemetry::prometheus(),
            parse_budget: routes::ParseBudget::new(config.parse_memory_bytes),
            body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds),
        });
        let mut server = HttpServer::new(move || {
            let (app, api) = App::new()
                .app_data(state.clone())
                .app_data(access.clone())
                .app_data(outbox_service::problem::query_config())
                .wrap(actix_web::middleware::from_fn(
                    outbox_service::problem::limit_headers,
                ))
                .wrap_fn(|req, service| {
                    let started = Instant::now();
                    let method = req.method().to_string();
                    let response = service.call(req);
                    async move {
                        let response = response.await?;
                        let route = response
                            .request()
                            .match_pattern()
                            .unwrap_or_else(|| "unmatched".to_owned());
                        ::metrics::histogram!(
                            crate::metrics::REQUEST_DURATION,
                            "method" => method,
                            "route" => route,
                            "status" => response.status().as_u16().to_string(),
                        )
                        .record(started.elapsed().as_secs_f64());
                        Ok(response)
                    }
                })
                .into_utoipa_app()
                .openapi(WriterApi::openapi())
                .configure(routes::configure)
                .split_for_parts();
            app.configure(outbox_service::openapi::serve(api))
                .default_service(web::to(routes::not_found))
        })
        .listen(listener)
        .context("listening")?
        .disable_signals()
        .shutdown_timeout(config.shutdown_grace_seconds);
        if let Some(workers) = config.workers {
            server = server.workers(workers);
        }
        Ok(Self {
            server: server.run(),
            local_addr,
            grace: config.shutdown_grace(),
        })
    }

    /// The address the listener is bound to (port 0 is resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves, then stops taking connections and
    /// lets in-flight requests finish within the grace period.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let handle = self.server.handle();
        let grace = self.grace;
        tokio::spawn(async move {
            shutdown.await;
            info!(
                message = "stopping: finishing in-flight requests",
                grace_seconds = grace.as_secs()
            );
            handle.stop(true).await;
        });
        self.server.await
    }
}

/// Creates indexes and the counter, retrying until MongoDB answers.
async fn ensure_schema(store: MongoStore, ready: Arc<AtomicBool>) {
    let mut delay = Duration::from_millis(200);
    loop {
        match store.ensure_schema().await {
            Ok(()) => {
                ready.store(true, Ordering::Release);
                info!(message = "schema ready");
                // A writer killed inside its transaction holds the sequence
                // counter until MongoDB aborts the transaction.
                store
                    .check_transaction_lifetime(Duration::from_secs(15), "writers")
                    .await;
                return;
            }
            Err(error) => {
                warn!(message = "cannot create the schema yet; retrying", %error, retry_in_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
