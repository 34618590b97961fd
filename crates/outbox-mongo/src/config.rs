//! Connection settings and collection names.

use std::time::Duration;

/// See [`MongoConfig::transaction_concurrency`].
pub const DEFAULT_TRANSACTION_CONCURRENCY: usize = 4;

/// See [`MongoConfig::stage_above_items`].
pub const DEFAULT_STAGE_ABOVE_ITEMS: usize = 1000;
pub const DEFAULT_STAGE_ABOVE_BYTES: usize = 4 * 1024 * 1024;

/// Where the data lives. Collection names are configurable so several
/// deployments can share a database.
#[derive(Clone, Debug)]
pub struct MongoConfig {
    pub url: String,
    pub database: String,
    pub batches_collection: String,
    pub items_collection: String,
    pub counters_collection: String,
    pub idempotency_collection: String,
    pub lease_collection: String,
    pub control_collection: String,
    pub dead_letter_collection: String,
    /// Large batches whose items are stored before their transaction.
    pub staged_collection: String,
    /// Stream definitions.
    pub streams_collection: String,
    /// The relay replicas' registry.
    pub members_collection: String,
    /// Replay jobs.
    pub replays_collection: String,
    /// Claim-check objects' reference counts.
    pub objects_collection: String,
    /// How long an operation waits for a usable server before failing.
    /// Short, so clients get a 503 quickly instead of hanging for the
    /// driver's default 30 s.
    pub server_selection_timeout: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How many ingest transactions one process runs at once; the rest
    /// queue in memory. Every ingest transaction writes the one sequence
    /// counter, so MongoDB runs them one after another anyway: more in
    /// flight only means more write conflicts and retries. Keep it below the
    /// connection pool size (`maxPoolSize`, or [`Self::pool_size`]).
    pub transaction_concurrency: usize,
    /// Ingest transactions one process runs at once over every stream: at
    /// most the connection pool holds (a transaction takes a connection for
    /// each statement; with more in flight than connections, a transaction
    /// can wait for a connection others hold while they wait for it).
    pub max_transactions: usize,
    /// The connection pool's size when the URL does not set `maxPoolSize`
    /// (`None`: the driver's 10). The relay runs a runner per stream it
    /// leads, each with a read or a transaction in flight.
    pub pool_size: Option<u32>,
    /// Server-side time limit (`maxTimeMS`, and `wtimeout` of the majority
    /// write concern) of each lease read and write: a lease operation that
    /// waits on a document another transaction holds fails after this long
    /// instead of hanging past the lease's expiry. The relay sets it from
    /// its TTL.
    pub lease_timeout: Duration,
    /// Server-side limit on how long a fenced transaction's commit may wait
    /// for a majority (`wtimeout`, `maxCommitTimeMS`).
    pub commit_timeout: Duration,
    pub app_name: String,
    /// A batch with more items than this, or more bytes of items than
    /// [`stage_above_bytes`](Self::stage_above_bytes), has its items stored
    /// before its transaction, a chunk at a time, so that the transaction
    /// (which holds the sequence counter every writer needs) stays short
    /// whatever the batch's size. `usize::MAX` stores every batch in one
    /// transaction.
    pub stage_above_items: usize,
    pub stage_above_bytes: usize,
    /// When a lease read is blocked past its time limit, kill the session
    /// recorded in the lease as last read, if that lease had expired.
    /// MongoDB's reads never wait for transactions, so there a blocked read
    /// says nothing about the holder and this stays off (a kill would be
    /// decided on a stale view); the development stand-in makes reads wait
    /// for an open transaction, so its scripts turn it on.
    pub kill_on_blocked_lease_read: bool,
    /// Records every command the store's clients send (tests, benchmarks).
    pub command_log: Option<crate::monitor::CommandLog>,
}

impl MongoConfig {
    /// Whether a batch of `items` items of `bytes` bytes is staged.
    pub fn stages(&self, items: usize, bytes: usize) -> bool {
        items > self.stage_above_items || bytes > self.stage_above_bytes
    }

    pub fn new(url: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: database.into(),
            batches_collection: "batches".to_owned(),
            items_collection: "batch_items".to_owned(),
            counters_collection: "outbox_counters".to_owned(),
            idempotency_collection: "idempotency_keys".to_owned(),
            lease_collection: "relay_lease".to_owned(),
            control_collection: "relay_control".to_owned(),
            dead_letter_collection: "dead_letters".to_owned(),
            staged_collection: "staged_batches".to_owned(),
            streams_collection: "outbox_streams".to_owned(),
            members_collection: "relay_members".to_owned(),
            replays_collection: "replay_jobs".to_owned(),
            objects_collection: "claim_check_objects".to_owned(),
            server_selection_timeout: Duration::from_secs(2),
            idempotency_ttl: Duration::from_secs(24 * 60 * 60),
            transaction_concurrency: DEFAULT_TRANSACTION_CONCURRENCY,
            max_transactions: 8,
            pool_size: None,
            lease_timeout: Duration::from_secs(1),
            commit_timeout: Duration::from_secs(10),
            app_name: "batch-outbox".to_owned(),
            kill_on_blocked_lease_read: false,
            stage_above_items: DEFAULT_STAGE_ABOVE_ITEMS,
            stage_above_bytes: DEFAULT_STAGE_ABOVE_BYTES,
            command_log: None,
        }
    }
}
