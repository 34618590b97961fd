//! The relay: drains the batches the writer stored, strictly in order, to
//! Google Cloud Pub/Sub, while holding a fenced leader lease in MongoDB.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`drain`]: one pass over the head batch: read, publish, mark, commit.
//! - [`lease`]: acquiring and renewing the lease; local validity.
//! - [`runner`]: the loop that ties lease, pause, wake-ups and passes together.
//! - [`pubsub`]: Google's Pub/Sub client behind the core `Publisher` trait.
//! - [`admin`]: the admin HTTP port and its OpenAPI description.
//! - [`retention`]: the leader removes expired committed batches and dead letters.
//! - [`tail`]: print what a subscription receives (`outbox-relay tail`, `outboxctl tail`).
//! - [`dashboard`]: the operator's page at `/` on the admin port.
//! - [`status`], [`metrics`], [`backoff`]: what the replica reports, and how it waits.

pub mod admin;
pub mod backoff;
pub mod config;
pub mod dashboard;
pub mod drain;
pub mod lease;
pub mod metrics;
pub mod pubsub;
pub mod retention;
pub mod runner;
pub mod status;
pub mod tail;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use anyhow::Context;
use futures::StreamExt;
use outbox_core::publish::Publisher;
use outbox_core::store::{LeaseStore, OutboxStore};
use outbox_mongo::MongoStore;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utoipa_actix_web::AppExt;

pub use config::{Cli, Command, Config};
use drain::DrainSettings;
use lease::LeaseSettings;
use runner::{Runner, RunnerSettings};
use status::StatusBoard;

/// A bound, not yet running, relay replica.
pub struct Application {
    admin: Server,
    admin_addr: SocketAddr,
    runner: Runner,
    mongo: Option<MongoStore>,
    wake: Arc<Notify>,
    start_paused: bool,
    change_stream: bool,
    lease_ttl: Duration,
    store: Arc<dyn OutboxStore>,
    retention: retention::RetentionSettings,
    status: Arc<StatusBoard>,
}

/// The server-side time limit of each lease operation: a quarter of the
/// TTL (within 250 ms and 5 s), so that a renewal blocked by a transaction
/// fails, and is retried, well before the lease runs out.
fn lease_operation_timeout(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

impl Application {
    /// Connects to MongoDB (lazily) and Pub/Sub, and binds the admin port.
    ///
    /// # Errors
    /// When a client cannot be configured or the port cannot be bound.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let mut mongo_config = config
            .mongo
            .to_config(&format!("outbox-relay:{}", config.relay_id))
            .map_err(anyhow::Error::msg)?;
        mongo_config.lease_timeout = lease_operation_timeout(config.lease_ttl());
        mongo_config.kill_on_blocked_lease_read = config.kill_on_blocked_lease_read;
        let mongo = MongoStore::connect(mongo_config)
            .await
            .context("configuring the MongoDB client")?;
        // The lease on a client of its own (appName `<appName>:lease`).
        let lease_store = mongo
            .lease_handle()
            .await
            .context("configuring the lease's MongoDB client")?;
        let pubsub = config.pubsub_config().map_err(anyhow::Error::msg)?;
        if config.create_topic {
            create_topic_with_retries(&pubsub).await?;
        }
        let publisher = pubsub::PubSubPublisher::connect(&pubsub)
            .await
            .context("building the Pub/Sub publisher")?;
        let store = Arc::new(mongo.clone());
        let mut app = Self::with_parts(&config, store, Arc::new(lease_store), Arc::new(publisher))?;
        app.mongo = Some(mongo);
        app.change_stream = config.change_stream;
        app.lease_ttl = config.lease_ttl();
        Ok(app)
    }

    /// Binds a replica over any store and publisher.
    ///
    /// # Errors
    /// When the admin port cannot be bound.
    pub fn with_parts(
        config: &Config,
        store: Arc<dyn OutboxStore>,
        lease_store: Arc<dyn LeaseStore>,
        publisher: Arc<dyn Publisher>,
    ) -> anyhow::Result<Self> {
        metrics::describe();
        let status = Arc::new(StatusBoard::default());
        let wake = Arc::new(Notify::new());
        let settings = RunnerSettings {
            drain: DrainSettings {
                page_size: config.page_size,
                ordering: config
                    .ordering
                    .clone()
                    .with_default_key(&config.ordering_default_key),
                on_poison: config.on_poison,
            },
            lease: LeaseSettings {
                holder: config.relay_id.clone(),
                ttl: config.lease_ttl(),
                standby_poll: config.poll_interval(),
            },
            poll_interval: config.poll_interval(),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs_f64(config.max_backoff_seconds),
            shutdown_grace: Duration::from_secs(config.publish_retry_seconds),
        };
        let runner = Runner::new(
            Arc::clone(&store),
            Arc::clone(&lease_store),
            publisher,
            settings,
            Arc::clone(&status),
            Arc::clone(&wake),
        );
        let state = web::Data::new(admin::AdminState {
            store: Arc::clone(&store),
            lease_store,
            leadership: runner.leadership(),
            status: Arc::clone(&status),
            wake: Arc::clone(&wake),
            relay_id: config.relay_id.clone(),
            admin_token: config.admin_token.clone(),
            prometheus: outbox_service::telemetry::prometheus(),
        });
        let listener = TcpListener::bind(config.admin_bind)
            .with_context(|| format!("binding {}", config.admin_bind))?;
        let admin_addr = listener.local_addr().context("reading the bound address")?;
        let admin = HttpServer::new(move || {
            let (app, api) = App::new()
                .app_data(state.clone())
                .app_data(outbox_service::problem::query_config())
                .wrap(actix_web::middleware::from_fn(
                    outbox_service::problem::limit_headers,
                ))
                .into_utoipa_app()
                .openapi(<admin::AdminApi as utoipa::OpenApi>::openapi())
                .configure(admin::configure)
                .split_for_parts();
            app.configure(outbox_service::openapi::serve(api))
                .default_service(web::to(admin::not_found))
        })
        .listen(listener)
        .context("listening")?
        .workers(1)
        .disable_signals()
        .shutdown_timeout(5)
        .run();
        Ok(Self {
            admin,
            admin_addr,
            runner,
            mongo: None,
            wake,
            start_paused: !config.enable_processor,
            change_stream: false,
            lease_ttl: config.lease_ttl(),
            store,
            retention: config.retention(),
            status,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Runs until `shutdown` resolves: finishes the page in flight, releases
    /// the lease, stops the admin port.
    ///
    /// # Errors
    /// When the admin server fails.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let token = CancellationToken::new();
        let trigger = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            info!(message = "stopping: finishing the page in flight");
            trigger.cancel();
        });
        let admin_handle = self.admin.handle();
        let admin = tokio::spawn(self.admin);
        if let Some(mongo) = &self.mongo {
            if self.change_stream {
                tokio::spawn(watch_batches(
                    mongo.clone(),
                    Arc::clone(&self.wake),
                    token.clone(),
                ));
            } else {
                info!(message = "change stream disabled; polling only");
            }
            tokio::select! {
                () = prepare(mongo, self.start_paused, self.store.as_ref()) => {}
                () = token.cancelled() => {}
            }
            // A leader killed inside a transaction is replaced after the TTL
            // (its session is killed); MongoDB's own limit matters for the
            // writers, whose orphans nobody can know.
            mongo
                .check_transaction_lifetime(
                    self.lease_ttl.max(Duration::from_secs(15)),
                    "writers and relays",
                )
                .await;
        } else if self.start_paused {
            let _ = self.store.set_paused(true).await;
        }
        tokio::spawn(sample_history(Arc::clone(&self.status), token.clone()));
        tokio::spawn(retention::run(
            Arc::clone(&self.store),
            self.runner.leadership(),
            self.retention.clone(),
            token.clone(),
        ));
        if !token.is_cancelled() {
            self.runner.run(token).await;
        }
        admin_handle.stop(true).await;
        admin.await.map_err(std::io::Error::other)?
    }
}

/// Records the replica's counters every [`status::SAMPLE_INTERVAL`] for the
/// dashboard's charts (`GET /api/v1/outbox/history`), from the start.
async fn sample_history(status: Arc<StatusBoard>, token: CancellationToken) {
    let mut ticks = tokio::time::interval(status::SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => status.sample(),
            () = token.cancelled() => return,
        }
    }
}

/// Creates indexes (and pauses the cluster when configured to start paused),
/// retrying until MongoDB answers.
async fn prepare(mongo: &MongoStore, start_paused: bool, store: &dyn OutboxStore) {
    let mut backoff = backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let result = async {
            mongo.ensure_schema().await?;
            if start_paused {
                store.set_paused(true).await?;
                info!(message = "ENABLE_OUTBOX_PROCESSOR=false: draining paused cluster-wide");
            }
            Ok::<_, outbox_core::store::StoreError>(())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(message = "MongoDB not ready; retrying", %error, retry_in_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn create_topic_with_retries(pubsub: &pubsub::PubSubConfig) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match pubsub::ensure_topic(pubsub).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 10 => {
                warn!(message = "cannot create the topic yet; retrying", error = %e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Wakes the runner on every change to the batches collection. Where the
/// server has no change streams the runner still polls; we retry the watch
/// now and then.
async fn watch_batches(mongo: MongoStore, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut backoff = backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut warned = false;
    while !shutdown.is_cancelled() {
        match mongo.watch_batches().await {
            Ok(stream) => {
                info!(message = "watching the batches collection for changes");
                backoff.reset();
                let mut stream = std::pin::pin!(stream);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        event = stream.next() => match event {
                            Some(Ok(())) => wake.notify_one(),
                            Some(Err(error)) => { warn!(message = "change stream failed", %error); break; }
                            None => break,
                        }
                    }
                }
            }
            Err(error) => {
                if !warned {
                    warn!(message = "no change stream; relying on polling", %error);
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
