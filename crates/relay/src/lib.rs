//! The relay: drains the batches the writer stored, strictly in order, to
//! Google Cloud Pub/Sub, while holding a fenced leader lease in MongoDB.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`drain`]: one pass over the head batch: read, publish, mark, commit.
//! - [`lease`]: acquiring and renewing the lease; local validity.
//! - [`runner`]: one stream's loop: lease, pause, wake-ups and passes.
//! - [`cluster`]: the streams this replica leads (the share rule) and their runners.
//! - [`pubsub`]: Google's Pub/Sub client behind the core `Publisher` trait.
//! - [`admin`]: the admin HTTP port and its OpenAPI description.
//! - [`retention`]: the leader removes expired committed batches and dead letters.
//! - [`tail`]: print what a subscription receives (`outbox-relay tail`, `outboxctl tail`).
//! - [`dashboard`]: the operator's page at `/` on the admin port.
//! - [`status`], [`metrics`], [`backoff`]: what the replica reports, and how it waits.

pub mod admin;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod drain;
pub mod lease;
pub mod metrics;
pub mod pubsub;
pub mod replay;
pub mod retention;
pub mod runner;
pub mod sharding;
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
use outbox_core::store::{LeaseStore, MemberStore, OutboxStore, ReplayStore, StreamStore};
use outbox_core::stream::StreamName;
use outbox_mongo::MongoStore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utoipa_actix_web::AppExt;

pub use cluster::{Cluster, ClusterSettings, ClusterStores};
pub use config::{Cli, Command, Config};
use drain::Publishers;

/// A bound, not yet running, relay replica.
pub struct Application {
    admin: Server,
    admin_addr: SocketAddr,
    cluster: Arc<Cluster>,
    mongo: Option<MongoStore>,
    start_paused: bool,
    change_stream: bool,
    lease_ttl: Duration,
    /// Topics to create for streams as they appear (development).
    create_topics: Option<pubsub::PubSubConfig>,
    /// What replays' topics are checked against (set by [`Application::build`]).
    topics: Arc<admin::Topics>,
}

/// The server-side time limit of each lease operation: a quarter of the
/// TTL (within 250 ms and 5 s), so that a renewal blocked by a transaction
/// fails, and is retried, well before the lease runs out.
fn lease_operation_timeout(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

impl ClusterStores {
    /// Every store from one value implementing all of them (the MongoDB
    /// adapter, the in-memory model).
    pub fn all<S>(store: S) -> Self
    where
        S: OutboxStore
            + LeaseStore
            + StreamStore
            + MemberStore
            + ReplayStore
            + outbox_core::claim_check::ObjectRefStore
            + Clone,
    {
        Self {
            objects: Arc::new(store.clone()),
            outbox: Arc::new(store.clone()),
            leases: Arc::new(store.clone()),
            streams: Arc::new(store.clone()),
            members: Arc::new(store.clone()),
            replays: Arc::new(store),
        }
    }
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
        // A runner per stream led, each with a read or a transaction in
        // flight, and the admin port's reads: more than the driver's 10.
        mongo_config.pool_size = Some(100);
        let mongo = MongoStore::connect(mongo_config)
            .await
            .context("configuring the MongoDB client")?;
        // The lease on a client of its own (appName `<appName>:lease`).
        let lease_store = mongo
            .lease_handle()
            .await
            .context("configuring the lease's MongoDB client")?;
        let pubsub = config.pubsub_config().map_err(anyhow::Error::msg)?;
        let client = pubsub::PubSubClient::connect(&pubsub)
            .await
            .context("building the Pub/Sub publisher")?
            .with_max_keys(config.publisher_max_keys);
        let stores = ClusterStores {
            outbox: Arc::new(mongo.clone()),
            leases: Arc::new(lease_store),
            streams: Arc::new(mongo.clone()),
            members: Arc::new(mongo.clone()),
            replays: Arc::new(mongo.clone()),
            objects: Arc::new(mongo.clone()),
        };
        let mut app = Self::with_parts(&config, stores, Arc::new(client))?;
        app.mongo = Some(mongo);
        app.change_stream = config.change_stream;
        app.topics.set(pubsub.clone(), config.create_topic);
        app.create_topics = config.create_topic.then_some(pubsub);
        Ok(app)
    }

    /// Binds a replica over any stores and publishers.
    ///
    /// # Errors
    /// When the admin port cannot be bound.
    pub fn with_parts(
        config: &Config,
        stores: ClusterStores,
        publishers: Arc<dyn Publishers>,
    ) -> anyhow::Result<Self> {
        metrics::describe();
        if config.admin_token.is_none() {
            warn!(
                message = "the admin API is open: no ADMIN_TOKEN (--admin-insecure-no-token); anyone who reaches the admin port can read every batch and pause, define or replay streams",
                admin_bind = %config.admin_bind
            );
        }
        ::metrics::gauge!(metrics::ADMIN_OPEN).set(if config.admin_token.is_none() {
            1.0
        } else {
            0.0
        });
        let listener = TcpListener::bind(config.admin_bind)
            .with_context(|| format!("binding {}", config.admin_bind))?;
        let admin_addr = listener.local_addr().context("reading the bound address")?;
        let cluster = Arc::new(Cluster::new(
            ClusterSettings {
                relay_id: outbox_core::store::instance_id(
                    &config.relay_id,
                    outbox_core::world::random_u64() as u32,
                ),
                admin_url: config.admin_url(admin_addr),
                page_size: config.page_size,
                ttl: config.lease_ttl(),
                poll_interval: config.poll_interval(),
                backoff_base: Duration::from_millis(100),
                backoff_cap: Duration::from_secs_f64(config.max_backoff_seconds),
                shutdown_grace: Duration::from_secs(config.publish_retry_seconds),
                retention: config.retention(),
                default_stream: config.default_stream(),
                max_streams: config.max_streams,
                admin_token: config
                    .admin_token
                    .as_deref()
                    .map(|t| admin::AdminToken::new(t).fingerprint()),
            },
            stores,
            publishers,
        ));
        let topics = Arc::new(admin::Topics::default());
        let state = web::Data::new(admin::AdminState {
            cluster: Arc::clone(&cluster),
            topics: Arc::clone(&topics),
            admin_token: config.admin_token.as_deref().map(admin::AdminToken::new),
            prometheus: outbox_service::telemetry::prometheus(),
        });
        let admin = HttpServer::new(move || {
            let (app, api) = App::new()
                .app_data(state.clone())
                .app_data(outbox_service::problem::query_config())
                .app_data(admin::json_config())
                .wrap(actix_web::middleware::from_fn(admin::guard))
                .wrap(actix_web::middleware::from_fn(
                    outbox_service::problem::limit_headers,
                ))
                .into_utoipa_app()
                .openapi(<admin::AdminApi as utoipa::OpenApi>::openapi())
                .configure(admin::configure)
                .split_for_parts();
            let mut api = api;
            admin::require_token_in(&mut api);
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
            cluster,
            mongo: None,
            start_paused: !config.enable_processor,
            change_stream: false,
            lease_ttl: config.lease_ttl(),
            create_topics: None,
            topics,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Runs until `shutdown` resolves: finishes each stream's page in
    /// flight, releases the leases, leaves the registry, stops the admin
    /// port.
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
            info!(message = "stopping: finishing the pages in flight");
            trigger.cancel();
        });
        let admin_handle = self.admin.handle();
        let admin = tokio::spawn(self.admin);
        let stores = self.cluster.stores().clone();
        if let Some(mongo) = &self.mongo {
            if self.change_stream {
                tokio::spawn(watch_batches(
                    mongo.clone(),
                    Arc::clone(&self.cluster),
                    token.clone(),
                ));
            } else {
                info!(message = "change stream disabled; polling only");
            }
            if self.start_paused {
                tokio::select! {
                    () = pause_default(stores.outbox.as_ref()) => {}
                    () = token.cancelled() => {}
                }
            }
            // Indexes in the background: the cluster takes over streams at
            // once. A replica started while another's orphaned transaction
            // holds a collection (or, on the stand-in, every write) would
            // otherwise wait for it before it could kill it.
            tokio::spawn(prepare(mongo.clone(), self.lease_ttl, token.clone()));
        } else if self.start_paused {
            let _ = stores
                .outbox
                .set_paused(&StreamName::default_stream(), true)
                .await;
        }
        tokio::spawn(sample_history(Arc::clone(&self.cluster), token.clone()));
        if let Some(pubsub) = self.create_topics.clone() {
            tokio::spawn(create_topics(
                pubsub,
                Arc::clone(&self.cluster),
                token.clone(),
            ));
        }
        if !token.is_cancelled() {
            Arc::clone(&self.cluster).run(token).await;
        }
        admin_handle.stop(true).await;
        admin.await.map_err(std::io::Error::other)?
    }
}

/// Creates the topic of every stream as it appears (development, with
/// `PUBSUB_CREATE_TOPIC`).
async fn create_topics(
    pubsub: pubsub::PubSubConfig,
    cluster: Arc<Cluster>,
    token: CancellationToken,
) {
    let mut created = std::collections::BTreeSet::new();
    loop {
        for stream in cluster.streams() {
            let topic = stream.definition.topic.clone();
            if !created.contains(&topic) {
                match create_topic_with_retries(&pubsub.for_topic(&topic)).await {
                    Ok(()) => {
                        created.insert(topic);
                    }
                    Err(error) => {
                        warn!(message = "cannot create the stream's topic", stream = %stream.definition.name, %error)
                    }
                }
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Records each stream's counters every [`status::SAMPLE_INTERVAL`] for
/// the dashboard's charts (`GET /api/v1/outbox/history`), from the start.
async fn sample_history(cluster: Arc<Cluster>, token: CancellationToken) {
    let mut ticks = tokio::time::interval(status::SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                for stream in cluster.streams() {
                    stream.status.sample();
                }
            }
            () = token.cancelled() => return,
        }
    }
}

/// Creates indexes (and pauses the cluster when configured to start paused),
/// retrying until MongoDB answers.
/// Pauses the default stream (`ENABLE_OUTBOX_PROCESSOR=false`) before
/// anything drains, retrying until MongoDB answers.
async fn pause_default(store: &dyn OutboxStore) {
    let mut backoff = backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match store.set_paused(&StreamName::default_stream(), true).await {
            Ok(()) => {
                info!(message = "ENABLE_OUTBOX_PROCESSOR=false: the default stream is paused");
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(message = "MongoDB not ready; retrying", %error, retry_in_ms = delay.as_millis() as u64);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Creates the indexes (retrying until MongoDB answers) and checks the
/// transaction lifetime limit.
async fn prepare(mongo: MongoStore, lease_ttl: Duration, token: CancellationToken) {
    let mut backoff = backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    while !token.is_cancelled() {
        match mongo.ensure_schema().await {
            Ok(()) => break,
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(message = "cannot create the indexes yet; retrying", %error, retry_in_ms = delay.as_millis() as u64);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = token.cancelled() => return,
                }
            }
        }
    }
    // A leader killed inside a transaction is replaced after the TTL (its
    // session is killed); MongoDB's own limit matters for the writers,
    // whose orphans nobody can know.
    mongo
        .check_transaction_lifetime(lease_ttl.max(Duration::from_secs(15)), "writers and relays")
        .await;
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
async fn watch_batches(mongo: MongoStore, cluster: Arc<Cluster>, shutdown: CancellationToken) {
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
                            Some(Ok(())) => cluster.wake_all(),
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
