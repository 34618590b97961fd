//! The writer's configuration: flags with environment fallbacks.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use outbox_core::ingest::IngestRules;
use outbox_service::cli::{LogArgs, MongoArgs};

/// Accepts batches of JSON requests over HTTP and stores each one atomically
/// in MongoDB for the relay to publish.
#[derive(Parser, Clone, Debug)]
#[command(name = "outbox-writer", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "WRITER_BIND", default_value = "0.0.0.0:8000")]
    pub bind: SocketAddr,
    #[command(flatten)]
    pub mongo: MongoArgs,
    /// Most items one batch may hold.
    #[arg(long, env = "MAX_BATCH_ITEMS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_batch_items: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 31))]
    pub max_body_bytes: u64,
    /// A claim-check store for every stream without its own
    /// (`claim_check` in its definition): `gs://bucket/prefix`,
    /// `file:///path` or `memory://`. An item whose Pub/Sub message would
    /// be too large (or whose payload is over CLAIM_CHECK_ABOVE_BYTES) is
    /// stored there, and its message carries a reference.
    #[arg(long, env = "CLAIM_CHECK_URL")]
    pub claim_check_url: Option<String>,
    /// Payloads above this many bytes go to the claim-check store; unset:
    /// only those whose message Pub/Sub would refuse.
    #[arg(long, env = "CLAIM_CHECK_ABOVE_BYTES")]
    pub claim_check_above_bytes: Option<u64>,
    /// The largest item accepted for a stream with a claim-check store, in
    /// bytes (its body may be this large and 1 MiB more, whatever
    /// MAX_BODY_BYTES says).
    #[arg(long, env = "MAX_ITEM_BYTES", default_value_t = outbox_core::claim_check::DEFAULT_MAX_ITEM_BYTES, value_parser = clap::value_parser!(u64).range(1024..=1 << 31))]
    pub max_item_bytes: u64,
    /// How long a batch's claim-check objects may take to store, in seconds
    /// (then 503 `claim_check_unavailable`, nothing stored).
    #[arg(long, env = "CLAIM_CHECK_TIMEOUT_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub claim_check_timeout_seconds: u64,
    /// Field of each object holding its request id.
    #[arg(long, env = "REQUEST_ID_FIELD", default_value = "request_id")]
    pub request_id_field: String,
    /// Field of each object holding its vendor name.
    #[arg(long, env = "VENDOR_FIELD", default_value = "vendor_name")]
    pub vendor_field: String,
    /// How long idempotency keys are remembered, in seconds.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECONDS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_ttl_seconds: u64,
    /// How long one request may wait for MongoDB, in seconds: for an ingest
    /// slot, the idempotency lookup, the transaction and its commit. When
    /// MongoDB has no primary the answer is 503 within it; a batch that
    /// cannot commit within it is not stored (503), or, if its commit was
    /// sent, answered `outcome_unknown`. A large batch (see
    /// STAGE_ABOVE_ITEMS) gets it afresh for each chunk of its items and
    /// for its transaction: it bounds waiting, not the batch's size.
    #[arg(long, env = "REQUEST_DEADLINE_SECONDS", default_value_t = 2.0, value_parser = parse_deadline)]
    pub request_deadline_seconds: f64,
    /// A batch with more items than this has its items stored before its
    /// transaction, a chunk at a time, and the transaction (which holds the
    /// sequence counter every writer needs) stays a few statements long
    /// whatever the batch's size. 0 stages every batch.
    #[arg(long, env = "STAGE_ABOVE_ITEMS", default_value_t = outbox_mongo::config::DEFAULT_STAGE_ABOVE_ITEMS as u64)]
    pub stage_above_items: u64,
    /// As STAGE_ABOVE_ITEMS, for a batch whose items take more bytes than this.
    #[arg(long, env = "STAGE_ABOVE_BYTES", default_value_t = outbox_mongo::config::DEFAULT_STAGE_ABOVE_BYTES as u64)]
    pub stage_above_bytes: u64,
    /// How long in-flight requests may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// API keys, comma-separated `NAME:KEY` entries (a key is at least 16
    /// visible ASCII characters). When any key is configured (here or in
    /// the file), every `/api/v1/` request needs `Authorization: Bearer KEY`;
    /// the name is recorded on the batches the key submits. A name may have
    /// several keys (while one is rotated); they share its rate limit.
    #[arg(long, env = "WRITER_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// A file of API keys, one `NAME:KEY` per line (`#` starts a comment),
    /// such as a mounted Kubernetes secret. Read at start-up.
    #[arg(long, env = "WRITER_API_KEYS_FILE")]
    pub api_keys_file: Option<String>,
    /// Items per second each API key may submit (0: no limit). A request
    /// over the budget gets 429 with Retry-After; the burst is one full
    /// batch (MAX_BATCH_ITEMS) or one second's worth, whichever is larger.
    /// Without API keys the limit applies to all clients together.
    #[arg(long, env = "WRITER_RATE_LIMIT_ITEMS_PER_SECOND", default_value_t = 0)]
    pub rate_limit_items_per_second: u32,
    /// How much memory all requests parsing at once may take together, in
    /// bytes, as estimated before each parse (200 bytes a JSON value
    /// or CSV cell, plus the body). A request waits for its share within
    /// the request deadline (else 503 `writer_busy`); a body whose estimate
    /// alone is over it gets 413 `body_too_complex`. Keep it well below the
    /// writer's memory limit.
    #[arg(long, env = "PARSE_MEMORY_BYTES", default_value_t = 512 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1 << 20..=1 << 40))]
    pub parse_memory_bytes: u64,
    /// How long a client may take to send its request body, in seconds
    /// (then 408 `body_timeout`): a slow sender cannot hold a connection and
    /// its buffer for ever.
    #[arg(long, env = "BODY_READ_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_read_timeout_seconds: u64,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "WRITER_WORKERS")]
    pub workers: Option<usize>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    pub fn ingest_rules(&self) -> IngestRules {
        IngestRules {
            request_id_field: self.request_id_field.clone(),
            vendor_field: self.vendor_field.clone(),
            max_items: usize::try_from(self.max_batch_items).unwrap_or(usize::MAX),
            ..IngestRules::default()
        }
    }

    /// The claim-check setting of streams without their own.
    pub fn claim_check(&self) -> Option<outbox_core::claim_check::ClaimCheck> {
        self.claim_check_url
            .as_ref()
            .map(|url| outbox_core::claim_check::ClaimCheck {
                url: url.clone(),
                above_bytes: self.claim_check_above_bytes,
            })
    }

    pub fn request_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.request_deadline_seconds)
    }

    /// The API keys and rate limits.
    ///
    /// # Errors
    /// A one-line description of a bad key entry or an unreadable file.
    pub fn access(&self) -> Result<crate::auth::Access, String> {
        crate::auth::Access::new(
            self.api_keys.as_deref(),
            self.api_keys_file.as_deref(),
            self.rate_limit_items_per_second,
            u32::try_from(self.max_batch_items).unwrap_or(u32::MAX),
        )
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    /// Checks what clap cannot.
    ///
    /// # Errors
    /// A one-line description of the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(claim_check) = self.claim_check() {
            claim_check
                .validate()
                .map_err(|e| format!("CLAIM_CHECK_URL / CLAIM_CHECK_ABOVE_BYTES: {e}"))?;
        } else if self.claim_check_above_bytes.is_some() {
            return Err("CLAIM_CHECK_ABOVE_BYTES needs CLAIM_CHECK_URL".to_owned());
        }
        if self.request_id_field.is_empty() || self.vendor_field.is_empty() {
            return Err("REQUEST_ID_FIELD and VENDOR_FIELD must not be empty".to_owned());
        }
        if self.workers == Some(0) {
            return Err("WRITER_WORKERS must be at least 1".to_owned());
        }
        self.access()?;
        self.mongo.to_config("outbox-writer").map(drop)
    }
}

fn parse_deadline(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if (0.1..=600.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err("must be between 0.1 and 600 seconds".to_owned())
    }
}
