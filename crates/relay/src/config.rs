//! The relay's configuration: flags with environment fallbacks.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use outbox_core::publish::OrderingKeyMode;
use outbox_service::cli::{LogArgs, MongoArgs};

use outbox_core::stream::{DEFAULT_MAX_STREAMS, PoisonPolicy, StreamDefinition, StreamName};

use crate::pubsub::PubSubConfig;

/// Publishes the batches the writer stored in MongoDB to Google Cloud
/// Pub/Sub, strictly in order, under a fenced leader lease.
#[derive(Parser, Clone, Debug)]
#[command(name = "outbox-relay", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// Print the messages arriving on a subscription, in order, one JSON object per line.
    Tail(TailArgs),
    /// Print the shard keys and zones of a sharded cluster for the stored
    /// streams as a mongosh script; with --apply, run them through mongos.
    ShardPlan(ShardPlanArgs),
}

#[derive(Args, Clone, Debug)]
pub struct ShardPlanArgs {
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Run the commands through mongos instead of printing them.
    #[arg(long)]
    pub apply: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Args, Clone, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub source: TailSource,
    #[command(flatten)]
    pub log: LogArgs,
}

/// What `tail` reads, shared by `outbox-relay tail` and `outboxctl tail`.
#[derive(Args, Clone, Debug)]
pub struct TailSource {
    #[command(flatten)]
    pub pubsub: PubSubArgs,
    /// Subscription to read (created with message ordering if missing).
    #[arg(long, env = "PUBSUB_SUBSCRIPTION", default_value = "batch-outbox-tail")]
    pub subscription: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Check the deliveries against the consumer contract as they come
    /// (docs/CONSUMING.md): report on stderr each duplicate, each first
    /// delivery out of order and each batch left incomplete, then a
    /// summary; exit 1 when the order was broken. `global` (the default:
    /// one key a stream, batches whole) or `per-key` (`batch`, `field:`).
    #[arg(long, value_name = "CONTRACT", num_args = 0..=1, default_missing_value = "global")]
    pub verify: Option<VerifyContract>,
}

/// What `tail --verify` checks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyContract {
    Global,
    PerKey,
}

/// Where Pub/Sub is.
#[derive(Args, Clone, Debug)]
pub struct PubSubArgs {
    /// Google Cloud project of the topic.
    #[arg(long, env = "PUBSUB_PROJECT_ID", default_value = "local-project")]
    pub project_id: String,
    /// Pub/Sub topic: the relay publishes the default stream to it; tail reads it.
    #[arg(long, env = "PUBSUB_TOPIC", default_value = "batch-outbox")]
    pub topic: String,
    /// HOST:PORT of Google's Pub/Sub emulator (plain HTTP, no credentials), as Google's own tools take it.
    #[arg(long, env = "PUBSUB_EMULATOR_HOST")]
    pub emulator_host: Option<String>,
    /// A regional endpoint, e.g. https://us-east1-pubsub.googleapis.com, with the usual
    /// Google credentials. Pub/Sub keeps a key's order only among messages published in
    /// one region; the global endpoint may route a relay's publishes to several.
    #[arg(long, env = "PUBSUB_ENDPOINT")]
    pub endpoint: Option<String>,
}

impl PubSubArgs {
    pub fn to_config(
        &self,
        publish_retry_limit: Duration,
        batch_delay: Duration,
    ) -> Result<PubSubConfig, String> {
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~+%".contains(&b))
        };
        if !valid_name(&self.project_id) || !valid_name(&self.topic) {
            return Err(format!(
                "invalid PUBSUB_PROJECT_ID {:?} or PUBSUB_TOPIC {:?}",
                self.project_id, self.topic
            ));
        }
        if let Some(host) = &self.emulator_host
            && (host.contains("://") || !host.contains(':'))
        {
            return Err(format!(
                "PUBSUB_EMULATOR_HOST must be HOST:PORT, got {host:?}"
            ));
        }
        if let Some(endpoint) = &self.endpoint
            && (!endpoint.starts_with("https://") || endpoint.len() <= "https://".len())
        {
            return Err(format!(
                "PUBSUB_ENDPOINT must be an https:// URL such as https://us-east1-pubsub.googleapis.com, got {endpoint:?}"
            ));
        }
        Ok(PubSubConfig {
            project_id: self.project_id.clone(),
            topic: self.topic.clone(),
            emulator_host: self.emulator_host.clone(),
            endpoint: self.endpoint.clone(),
            publish_retry_limit,
            batch_delay,
        })
    }
}

fn default_relay_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned());
    format!("{host}-{}", std::process::id())
}

#[derive(Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub mongo: MongoArgs,
    #[command(flatten)]
    pub pubsub: PubSubArgs,
    /// Ordering key per message: one key for the whole stream (global), the
    /// batch id (batch), the value of a field of each request
    /// (field:<json-pointer>, e.g. field:/vendor_name), or none.
    #[arg(
        long = "ordering-key",
        env = "PUBSUB_ORDERING_KEY_MODE",
        default_value = "global"
    )]
    pub ordering: OrderingKeyMode,
    /// With field:<json-pointer>: the key of items that lack the field.
    #[arg(
        long = "ordering-key-default",
        env = "PUBSUB_ORDERING_KEY_DEFAULT",
        default_value = OrderingKeyMode::GLOBAL_KEY
    )]
    pub ordering_default_key: String,
    /// What to do with an item Pub/Sub rejects for good: halt the stream until an operator
    /// retries the batch (halt), or set the item aside and go on (dead-letter).
    #[arg(long, env = "OUTBOX_ON_POISON", default_value = "halt")]
    pub on_poison: PoisonPolicy,
    /// Items read, published and marked per round trip.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub page_size: u32,
    /// Seconds between checks for new batches when no change stream wakes us.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_SECONDS", default_value_t = 1.0)]
    pub poll_interval_seconds: f64,
    /// Wake on a MongoDB change stream on the batches collection, on top of polling.
    #[arg(long, env = "OUTBOX_CHANGE_STREAM", default_value_t = true, action = clap::ArgAction::Set)]
    pub change_stream: bool,
    /// Lease time to live in seconds; renewed about every third of it.
    #[arg(long, env = "LEASE_TTL_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub lease_ttl_seconds: u64,
    /// When a lease read is blocked past its time limit, kill the session the
    /// expired lease last read names. Only for servers whose reads wait for an
    /// open transaction (the development stand-in): on MongoDB a blocked read
    /// says nothing about the holder, and the kill would come from a stale view.
    #[arg(long, env = "LEASE_KILL_ON_BLOCKED_READ", default_value_t = false, action = clap::ArgAction::Set)]
    pub kill_on_blocked_lease_read: bool,
    /// This replica's name, as pages and logs show it (default: host name and
    /// process id). Each process holds leases under the name and a suffix it
    /// draws at start (`NAME#SUFFIX`), so a restart under the same name is a
    /// takeover, never a renewal. No '#'.
    #[arg(long, env = "RELAY_ID", default_value_t = default_relay_id())]
    pub relay_id: String,
    /// Start the default stream paused when false (stored in MongoDB; POST /api/v1/outbox/start resumes it).
    #[arg(long, env = "ENABLE_OUTBOX_PROCESSOR", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_processor: bool,
    /// Admin HTTP address.
    #[arg(long, env = "RELAY_ADMIN_BIND", default_value = "0.0.0.0:9090")]
    pub admin_bind: SocketAddr,
    /// The URL other replicas' pages link to for this replica's admin port (default:
    /// http:// and the bound address, the host name in place of 0.0.0.0).
    #[arg(long, env = "RELAY_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Most streams the cluster runs (and values the metrics' `stream` label takes).
    #[arg(long, env = "MAX_STREAMS", default_value_t = DEFAULT_MAX_STREAMS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub max_streams: usize,
    /// A Pub/Sub publisher is replaced by a new one, when nothing is in flight, after this
    /// many distinct ordering keys: Google's client keeps every key's task for its life.
    #[arg(long, env = "PUBLISHER_MAX_KEYS", default_value_t = crate::pubsub::MAX_KEYS_PER_PUBLISHER, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub publisher_max_keys: usize,
    /// Bearer token every admin `/api` request needs (GET included), at least 32
    /// characters (`openssl rand -hex 32`). Give every replica the same one.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Run without ADMIN_TOKEN: anyone who reaches the admin port may read
    /// every batch and pause, define or replay streams. For development only.
    #[arg(long, env = "ADMIN_INSECURE_NO_TOKEN")]
    pub admin_insecure_no_token: bool,
    /// Create the topic at start (development).
    #[arg(long, env = "PUBSUB_CREATE_TOPIC")]
    pub create_topic: bool,
    /// How long the Pub/Sub client retries one publish before the relay sees it fail, in seconds.
    #[arg(long, env = "PUBLISH_RETRY_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub publish_retry_seconds: u64,
    /// How long the Pub/Sub client waits to fill a request, in milliseconds.
    #[arg(long, env = "PUBLISH_BATCH_DELAY_MS", default_value_t = 1)]
    pub publish_batch_delay_ms: u64,
    /// How long committed batches and their items are kept, in seconds
    /// (default 7 days; 0 keeps everything). The leader removes them; a batch
    /// that is not committed is never removed. Keep it above the writers'
    /// IDEMPOTENCY_TTL_SECONDS: a retry whose batch was removed answers 410.
    #[arg(long, env = "RETENTION_SECONDS", default_value_t = 7 * 86_400)]
    pub retention_seconds: u64,
    /// How long dead letters are kept, in seconds (default 30 days; 0 keeps them).
    #[arg(long, env = "DEAD_LETTER_RETENTION_SECONDS", default_value_t = 30 * 86_400)]
    pub dead_letter_retention_seconds: u64,
    /// After how long a large batch whose items a writer staged, and whose
    /// transaction never made it visible, is taken as abandoned (its writer
    /// died or gave up) and its items removed, in seconds.
    #[arg(long, env = "STAGED_ABANDONED_AFTER_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..))]
    pub staged_abandoned_after_seconds: u64,
    /// How often the leader looks for expired data, in seconds.
    #[arg(long, env = "RETENTION_INTERVAL_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub retention_interval_seconds: u64,
    /// Longest backoff between failed passes, in seconds.
    #[arg(long, env = "OUTBOX_MAX_BACKOFF_SECONDS", default_value_t = 30.0)]
    pub max_backoff_seconds: f64,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// The default stream as this configuration describes it (a stored
    /// definition of `default` replaces it).
    pub fn default_stream(&self) -> StreamDefinition {
        StreamDefinition {
            name: StreamName::default_stream(),
            topic: self.pubsub.topic.clone(),
            ordering: self
                .ordering
                .clone()
                .with_default_key(&self.ordering_default_key),
            on_poison: self.on_poison,
            schema: None,
            writers: None,
            created_at: None,
            updated_at: None,
            claim_check: None,
        }
    }

    /// Where this replica's admin port answers, for links from the others.
    pub fn admin_url(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.admin_url {
            return url.trim_end_matches('/').to_owned();
        }
        if bound.ip().is_unspecified() {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_owned());
            format!("http://{host}:{}", bound.port())
        } else {
            format!("http://{bound}")
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs_f64(self.poll_interval_seconds)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_seconds)
    }

    /// How long the relay may take to exit after SIGTERM, whatever MongoDB
    /// and Pub/Sub do: the page in flight's grace (`PUBLISH_RETRY_SECONDS`),
    /// a lease TTL to release the leases and leave the registry, and 5 s for
    /// the admin port (45 s with the defaults).
    pub fn shutdown_bound(&self) -> Duration {
        Duration::from_secs(self.publish_retry_seconds + self.lease_ttl_seconds + 5)
    }

    pub fn retention(&self) -> crate::retention::RetentionSettings {
        let keep = |seconds: u64| (seconds > 0).then(|| Duration::from_secs(seconds));
        crate::retention::RetentionSettings {
            committed: keep(self.retention_seconds),
            dead_letters: keep(self.dead_letter_retention_seconds),
            interval: Duration::from_secs(self.retention_interval_seconds),
            abandoned: Duration::from_secs(self.staged_abandoned_after_seconds),
            objects: outbox_claim_check::Stores::default(),
        }
    }

    pub fn pubsub_config(&self) -> Result<PubSubConfig, String> {
        self.pubsub.to_config(
            Duration::from_secs(self.publish_retry_seconds),
            Duration::from_millis(self.publish_batch_delay_ms),
        )
    }

    /// Checks what clap cannot.
    ///
    /// # Errors
    /// A one-line description of the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.01..=3600.0).contains(&self.poll_interval_seconds) {
            return Err("OUTBOX_POLL_INTERVAL_SECONDS must be between 0.01 and 3600".to_owned());
        }
        if !(0.1..=3600.0).contains(&self.max_backoff_seconds) {
            return Err("OUTBOX_MAX_BACKOFF_SECONDS must be between 0.1 and 3600".to_owned());
        }
        if self.relay_id.trim().is_empty() || self.relay_id.contains('#') {
            return Err("RELAY_ID must not be empty nor contain '#'".to_owned());
        }
        match self.admin_token.as_deref() {
            None if !self.admin_insecure_no_token => {
                return Err(format!(
                    "set ADMIN_TOKEN (at least {} characters, e.g. `openssl rand -hex 32`), \
                     or start with --admin-insecure-no-token to leave the admin API open",
                    crate::admin::AdminToken::MIN_LEN
                ));
            }
            Some(token)
                if token.chars().count() < crate::admin::AdminToken::MIN_LEN
                    || !token.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                return Err(format!(
                    "ADMIN_TOKEN must be at least {} visible ASCII characters \
                     (e.g. `openssl rand -hex 32`)",
                    crate::admin::AdminToken::MIN_LEN
                ));
            }
            _ => {}
        }
        self.pubsub_config()?;
        self.mongo.to_config("outbox-relay").map(drop)
    }
}
