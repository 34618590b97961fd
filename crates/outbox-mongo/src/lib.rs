//! MongoDB adapter of batch-outbox: the writer's [`BatchStore`], the relay's
//! [`OutboxStore`] and the leader [`LeaseStore`] over one replica set (or
//! a sharded cluster: `sharding`).
//!
//! # Layout
//! - [`config`]: connection settings and collection names.
//! - `documents`: the stored document shapes and their conversions.
//! - `errors`: driver errors to [`StoreError`] (what is transient, what not).
//! - `batches`: atomic batch ingest with the gap-free sequence.
//! - `outbox`: the relay's reads, retention and the pause flag.
//! - `fenced`: the relay's writes under a lease epoch (marks, commits,
//!   dead letters, replay progress) on one recorded session.
//! - `replays`: replay jobs.
//! - `lease`: each stream's leader lease (compare-and-swap on holder and epoch).
//! - `registry`: the stream definitions and the relay replicas (members).
//! - [`sharding`]: shard keys and zones of a sharded cluster.
//! - [`monitor`]: command monitoring (the tests' command log).
//!
//! [`BatchStore`]: outbox_core::store::BatchStore
//! [`OutboxStore`]: outbox_core::store::OutboxStore
//! [`LeaseStore`]: outbox_core::store::LeaseStore
//! [`StoreError`]: outbox_core::store::StoreError

mod batches;
mod claim_checks;
pub mod config;
pub mod documents;
mod errors;
mod fenced;
mod lease;
pub mod monitor;
mod outbox;
mod registry;
mod replays;
mod transaction;

use std::sync::Arc;

use mongodb::bson::{Binary, Document, doc};
use mongodb::options::{
    ClientOptions, IndexOptions, ReadConcern, ReadPreference, SelectionCriteria,
};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use outbox_core::store::{ReadLevel, StoreError};
use outbox_core::stream::StreamName;
use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use config::MongoConfig;
use errors::classify;

/// A stream's documents in the shared collections. The default stream keeps
/// the ids (and, on batches, the absent `stream` field) it had before
/// streams existed, so an existing database needs no migration.
pub mod sharding;

pub(crate) mod ids {
    use mongodb::bson::Bson;
    use outbox_core::stream::StreamName;

    const COUNTER: &str = "batch_sequence";
    const LEASE: &str = "relay";
    const CONTROL: &str = "relay";

    fn scoped(base: &str, stream: &StreamName) -> String {
        if stream.is_default() {
            base.to_owned()
        } else {
            format!("{base}:{stream}")
        }
    }

    /// The stream's sequence counter.
    pub fn counter(stream: &StreamName) -> String {
        scoped(COUNTER, stream)
    }

    /// The stream's lease.
    pub fn lease(stream: &StreamName) -> String {
        scoped(LEASE, stream)
    }

    /// The stream's control document (the paused flag).
    pub fn control(stream: &StreamName) -> String {
        scoped(CONTROL, stream)
    }

    /// The stream a lease document's id names.
    pub fn stream_of_lease(id: &str) -> Option<StreamName> {
        if id == LEASE {
            return Some(StreamName::default_stream());
        }
        id.strip_prefix("relay:")?.parse().ok()
    }

    /// An idempotency key's id: the key itself for the default stream,
    /// `"<stream> <key>"` for another (a key has no space in it).
    pub fn idempotency(stream: &StreamName, key: &str) -> String {
        if stream.is_default() {
            key.to_owned()
        } else {
            format!("{stream} {key}")
        }
    }

    /// The value of a batch's (or dead letter's) `stream` field, and what
    /// matches it: absent (null) for the default stream.
    pub fn field(stream: &StreamName) -> Bson {
        if stream.is_default() {
            Bson::Null
        } else {
            Bson::String(stream.to_string())
        }
    }

    /// The stream a stored document's `stream` field names.
    pub fn stream_of(doc: &mongodb::bson::Document) -> StreamName {
        doc.get_str("stream")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default()
    }
}

/// The read concern of every read outside a transaction: the domain's
/// [`outbox_core::store::READS`].
pub(crate) fn read_concern() -> ReadConcern {
    match outbox_core::store::READS {
        ReadLevel::Local => ReadConcern::local(),
        ReadLevel::Majority => ReadConcern::majority(),
    }
}
/// A handle on the store; cheap to clone (the driver pools connections).
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    config: MongoConfig,
    /// Per stream, the session the relay runs that stream's fenced
    /// transactions on; shared with the lease handle (see
    /// [`MongoStore::lease_handle`]).
    fenced: Arc<FencedSessions>,
    /// Per stream, the lease document as last read, for when a read is
    /// blocked (see `lease.rs`).
    last_lease: Arc<std::sync::Mutex<std::collections::HashMap<StreamName, Document>>>,
    /// Per stream, the ingest transactions in flight (see
    /// [`MongoConfig::transaction_concurrency`]).
    stream_slots: Arc<std::sync::Mutex<std::collections::HashMap<StreamName, Arc<Semaphore>>>>,
    /// The ingest transactions in flight over every stream (see
    /// [`MongoConfig::max_transactions`]).
    all_slots: Arc<Semaphore>,
}

/// The fenced sessions of the streams this process leads, and the `uid`
/// MongoDB gives our sessions: SHA-256 of `user@db` of the authenticated
/// user (of the empty string without authentication). A successor running
/// as another user needs it to kill our sessions.
struct FencedSessions {
    /// The client the sessions belong to (the drain client).
    client: Client,
    streams: std::sync::Mutex<std::collections::HashMap<StreamName, Arc<FencedSession>>>,
    uid: tokio::sync::OnceCell<Binary>,
}

impl FencedSessions {
    fn of(&self, stream: &StreamName) -> Arc<FencedSession> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(streams.entry(stream.clone()).or_insert_with(|| {
            Arc::new(FencedSession {
                session: Arc::new(tokio::sync::Mutex::new(None)),
            })
        }))
    }
}

/// A stream's fenced session, locked.
pub(crate) type FencedGuard = tokio::sync::OwnedMutexGuard<Option<(ClientSession, Option<u64>)>>;

/// The session one stream's fenced writes run on, so that its id can be
/// recorded in the stream's lease document and a successor can kill it
/// (aborting a transaction a dead leader left open) instead of waiting for
/// MongoDB to reap it.
///
/// It is recorded under the session's lock, so the id in the lease is
/// always the session in use: when the lease is taken (a new epoch), and by
/// a fenced write before its first transaction on a new session or under
/// an epoch it was not recorded under. Renewals never write it.
struct FencedSession {
    /// The session, and the lease epoch its id was recorded under.
    session: Arc<tokio::sync::Mutex<Option<RecordedSession>>>,
}

/// A session and the lease epoch its id was recorded under, if any.
type RecordedSession = (ClientSession, Option<u64>);

impl MongoStore {
    /// Connects lazily: the driver finds the servers in the background, and
    /// every operation waits at most `server_selection_timeout` for one.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the URL cannot be parsed.
    pub async fn connect(mut config: MongoConfig) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(&config.url)
            .await
            .map_err(|e| StoreError::Other(format!("invalid MongoDB URL: {e}")))?;
        options.server_selection_timeout = Some(config.server_selection_timeout);
        options.connect_timeout = Some(config.server_selection_timeout);
        options.command_event_handler = config.command_log.as_ref().map(|log| log.handler());
        if options.max_pool_size.is_none() {
            options.max_pool_size = config.pool_size;
        }
        // Transactions must run on the primary, and the relay must read what
        // the primary committed: a URL's `readPreference=secondaryPreferred`
        // would make every transaction fail.
        options.selection_criteria =
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
        // An `appName` in the URL wins (tests use it to aim fail points).
        config.app_name = options
            .app_name
            .get_or_insert_with(|| config.app_name.clone())
            .clone();
        let client = Client::with_options(options)
            .map_err(|e| StoreError::Other(format!("invalid MongoDB options: {e}")))?;
        let db = client.database(&config.database);
        let all_slots = Arc::new(Semaphore::new(config.max_transactions.max(1)));
        let fenced = Arc::new(FencedSessions {
            client: client.clone(),
            streams: std::sync::Mutex::default(),
            uid: tokio::sync::OnceCell::new(),
        });
        Ok(Self {
            client,
            db,
            config,
            fenced,
            last_lease: Arc::default(),
            stream_slots: Arc::default(),
            all_slots,
        })
    }

    /// A handle for the lease on a client of its own, named
    /// `<appName>:lease`: renewals never queue behind the drain's
    /// operations in the connection pool, and a fail point can target them
    /// alone. It shares the fenced session with `self`.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the URL cannot be parsed.
    pub async fn lease_handle(&self) -> Result<Self, StoreError> {
        let mut config = self.config.clone();
        config.app_name = format!("{}:lease", self.config.app_name);
        let mut options = ClientOptions::parse(&config.url)
            .await
            .map_err(|e| StoreError::Other(format!("invalid MongoDB URL: {e}")))?;
        options.app_name = Some(config.app_name.clone());
        options.server_selection_timeout = Some(config.server_selection_timeout);
        options.connect_timeout = Some(config.server_selection_timeout);
        options.command_event_handler = config.command_log.as_ref().map(|log| log.handler());
        options.selection_criteria =
            Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
        let client = Client::with_options(options)
            .map_err(|e| StoreError::Other(format!("invalid MongoDB options: {e}")))?;
        Ok(Self {
            db: client.database(&config.database),
            client,
            config,
            fenced: Arc::clone(&self.fenced),
            last_lease: Arc::clone(&self.last_lease),
            stream_slots: Arc::clone(&self.stream_slots),
            all_slots: Arc::clone(&self.all_slots),
        })
    }

    /// Aborts whatever transaction the session has open (MongoDB's
    /// `killSessions`). `session` is the session as recorded: `{id, uid}`.
    /// Without `uid` MongoDB matches only the calling user's sessions; with
    /// another user's `uid` the caller needs the `killAnySession` privilege
    /// (built-in role `hostManager`; see docs/OPERATIONS.md). Refused for
    /// lack of it, the kill is tried again as our own user's.
    pub(crate) async fn kill_session(&self, session: &Document) -> Result<(), StoreError> {
        let admin = self.client.database("admin");
        match admin
            .run_command(doc! { "killSessions": [session.clone()] })
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if errors::code(&e) == Some(errors::UNAUTHORIZED)
                    && session.contains_key("uid") =>
            {
                warn!(
                    message = "killSessions with the session's uid was refused: this user lacks the killAnySession privilege (role hostManager); trying as our own user's session",
                    error = %e
                );
                let mut own = session.clone();
                own.remove("uid");
                admin
                    .run_command(doc! { "killSessions": [own] })
                    .await
                    .map_err(classify)?;
                Ok(())
            }
            Err(e) => Err(classify(e)),
        }
    }

    /// A session id as recorded for a successor to kill: `{id, uid}`.
    pub(crate) async fn recordable(&self, session_id: &Document) -> Result<Document, StoreError> {
        let uid = self
            .fenced
            .uid
            .get_or_try_init(|| async {
                let status = self
                    .fenced
                    .client
                    .database("admin")
                    .run_command(doc! { "connectionStatus": 1 })
                    .await
                    .map_err(classify)?;
                Ok::<_, StoreError>(session_uid(&status))
            })
            .await?;
        let mut recorded = session_id.clone();
        recorded.insert("uid", uid.clone());
        Ok(recorded)
    }

    /// MongoDB's `transactionLifetimeLimitSeconds`: how long a transaction
    /// left open by a dead process blocks the documents it wrote. `None`
    /// when the server does not say (no privilege, or no such parameter).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when MongoDB cannot be reached.
    pub async fn transaction_lifetime_limit(&self) -> Result<Option<u64>, StoreError> {
        let reply = self
            .client
            .database("admin")
            .run_command(doc! { "getParameter": 1, "transactionLifetimeLimitSeconds": 1 })
            .await;
        match reply {
            Ok(reply) => Ok(documents::get_u64(&reply, "transactionLifetimeLimitSeconds").ok()),
            Err(e) => match errors::classify(e) {
                StoreError::Unavailable(m) => Err(StoreError::Unavailable(m)),
                _ => Ok(None),
            },
        }
    }

    /// Reads `transactionLifetimeLimitSeconds` and warns when a process
    /// that dies inside a transaction would block others for longer than
    /// `bound` (the relay's lease TTL, or 15 s for the writer).
    pub async fn check_transaction_lifetime(&self, bound: std::time::Duration, who: &str) {
        match self.transaction_lifetime_limit().await {
            Ok(Some(limit)) if limit > bound.as_secs().max(1) => warn!(
                message = "MongoDB's transactionLifetimeLimitSeconds is high: a process killed inside a transaction blocks the others until MongoDB aborts it",
                transaction_lifetime_limit_seconds = limit,
                recommended_at_most_seconds = bound.as_secs(),
                affects = who,
                fix = "setParameter transactionLifetimeLimitSeconds (see docs/OPERATIONS.md)"
            ),
            Ok(Some(limit)) => info!(
                message = "MongoDB transaction lifetime limit",
                seconds = limit
            ),
            Ok(None) => info!(message = "cannot read MongoDB's transactionLifetimeLimitSeconds"),
            Err(error) => {
                warn!(message = "cannot read MongoDB's transactionLifetimeLimitSeconds", %error)
            }
        }
    }

    /// The stream's ingest transactions in flight, at most
    /// [`MongoConfig::transaction_concurrency`]: every ingest transaction of
    /// a stream writes its one counter, so more would only conflict; other
    /// streams' counters are other documents, and their writers never wait
    /// on these.
    pub(crate) fn ingest_slots(&self, stream: &StreamName) -> Arc<Semaphore> {
        let mut slots = self.stream_slots.lock().unwrap_or_else(|e| e.into_inner());
        let permits = self.config.transaction_concurrency.max(1);
        Arc::clone(
            slots
                .entry(stream.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(permits))),
        )
    }

    /// The ingest transactions in flight over every stream.
    pub(crate) fn all_ingest_slots(&self) -> Arc<Semaphore> {
        Arc::clone(&self.all_slots)
    }

    pub fn config(&self) -> &MongoConfig {
        &self.config
    }

    /// Creates the indexes and the sequence counter if they are missing.
    /// Safe to run from every replica at every start.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when MongoDB cannot be reached.
    pub async fn ensure_schema(&self) -> Result<(), StoreError> {
        let unique = || IndexOptions::builder().unique(true).build();
        let index = |keys: Document, options: Option<IndexOptions>| {
            IndexModel::builder().keys(keys).options(options).build()
        };
        // On mongos a unique index must start with the shard key
        // (`sharding`): batch ids are then indexed, not unique, and items
        // are unique within their stream.
        let mongos = self.is_mongos().await?;
        // A stream's batches by sequence: the default stream's have no
        // `stream` field (the index keys them under null), as before
        // streams existed.
        self.batches()
            .create_indexes([
                index(doc! { "batch_id": 1 }, (!mongos).then(unique)),
                index(doc! { "stream": 1, "batch_sequence": 1 }, Some(unique())),
                index(doc! { "stream": 1, "status": 1, "batch_sequence": 1 }, None),
            ])
            .await
            .map_err(classify)?;
        // The indexes of a single stream: the unique sequence would refuse a
        // second stream's batch 1.
        for replaced in ["batch_sequence_1", "status_1_batch_sequence_1"] {
            if let Err(e) = self.batches().drop_index(replaced).await
                && !errors::is_missing_index(&e)
            {
                return Err(classify(e));
            }
        }
        let item_keys = if mongos {
            doc! { "stream": 1, "batch_id": 1, "item_sequence": 1 }
        } else {
            doc! { "batch_id": 1, "item_sequence": 1 }
        };
        self.items()
            .create_indexes([index(item_keys, Some(unique()))])
            .await
            .map_err(classify)?;
        // Items are keyed by item_id (`_id`) and read by it; earlier versions
        // also indexed `item_id`, and (batch_id, status, item_sequence), which
        // every mark rewrote and only fallbacks read.
        for unused in ["item_id_1", "batch_id_1_status_1_item_sequence_1"] {
            if let Err(e) = self.items().drop_index(unused).await
                && !errors::is_missing_index(&e)
            {
                return Err(classify(e));
            }
        }
        let ttl = IndexOptions::builder()
            .expire_after(std::time::Duration::ZERO)
            .build();
        self.idempotency()
            .create_index(index(doc! { "expires_at": 1 }, Some(ttl)))
            .await
            .map_err(classify)?;
        // Each leader looks for its stream's running replays at every poll;
        // the admin API lists a stream's newest first.
        self.replays()
            .create_indexes([
                index(doc! { "stream": 1, "state": 1, "created_at": 1 }, None),
                index(doc! { "stream": 1, "created_at": -1 }, None),
            ])
            .await
            .map_err(classify)?;
        // Every retention pass looks for claim-check deletions left unfinished.
        self.objects()
            .create_index(index(doc! { "state": 1, "marked_ms": 1 }, None))
            .await
            .map_err(classify)?;
        // The counter starts at 0; `$setOnInsert` leaves an existing one alone.
        self.ensure_counter(&StreamName::default_stream()).await
    }

    /// Creates the stream's sequence counter, starting at 0, unless it exists.
    pub(crate) async fn ensure_counter(&self, stream: &StreamName) -> Result<(), StoreError> {
        let result = self
            .counters()
            .update_one(
                doc! { "_id": ids::counter(stream) },
                doc! { "$setOnInsert": { "value": 0_i64 } },
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => Ok(()),
            // Another replica created it at the same moment.
            Err(e) if errors::is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Drops the whole database. For tests and benchmarks.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when MongoDB cannot be reached.
    pub async fn drop_database(&self) -> Result<(), StoreError> {
        self.db.drop().await.map_err(classify)
    }

    /// Whether the server is mongos (a sharded cluster's router).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when MongoDB cannot be reached.
    pub async fn is_mongos(&self) -> Result<bool, StoreError> {
        let hello = self
            .db
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(classify)?;
        Ok(hello.get_str("msg").is_ok_and(|m| m == "isdbgrid"))
    }

    /// Runs the sharding plan ([`sharding::plan`]) for `streams` through
    /// mongos; refuses anything but mongos.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the server is not mongos or refuses a
    /// command (named in the message).
    pub async fn shard(&self, streams: &[StreamName]) -> Result<Vec<sharding::Step>, StoreError> {
        if !self.is_mongos().await? {
            return Err(StoreError::Other(
                "not a sharded cluster: shard keys apply through mongos (this is a replica set or standalone server)".to_owned(),
            ));
        }
        let steps = sharding::plan(&self.config, streams);
        let admin = self.client.database("admin");
        for step in &steps {
            admin
                .run_command(step.command.clone())
                .await
                .map_err(|e| StoreError::Other(format!("{}: {e}", step.what)))?;
        }
        Ok(steps)
    }

    /// Checks that the server is a replica-set member or mongos, which
    /// transactions need.
    async fn check_transactions(&self) -> Result<(), StoreError> {
        let hello = self
            .db
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(classify)?;
        let replica_set = hello.get_str("setName").is_ok();
        let mongos = hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        if replica_set || mongos {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "MongoDB is a standalone server; transactions need a replica set".to_owned(),
            ))
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    fn batches(&self) -> Collection<Document> {
        self.db.collection(&self.config.batches_collection)
    }

    fn items(&self) -> Collection<Document> {
        self.db.collection(&self.config.items_collection)
    }

    fn counters(&self) -> Collection<Document> {
        self.db.collection(&self.config.counters_collection)
    }

    fn idempotency(&self) -> Collection<Document> {
        self.db.collection(&self.config.idempotency_collection)
    }

    fn lease(&self) -> Collection<Document> {
        self.db.collection(&self.config.lease_collection)
    }

    fn control(&self) -> Collection<Document> {
        self.db.collection(&self.config.control_collection)
    }

    fn streams(&self) -> Collection<Document> {
        self.db.collection(&self.config.streams_collection)
    }

    fn members(&self) -> Collection<Document> {
        self.db.collection(&self.config.members_collection)
    }

    fn replays(&self) -> Collection<Document> {
        self.db.collection(&self.config.replays_collection)
    }

    fn objects(&self) -> Collection<Document> {
        self.db.collection(&self.config.objects_collection)
    }

    fn staged(&self) -> Collection<Document> {
        self.db.collection(&self.config.staged_collection)
    }

    fn dead_letters(&self) -> Collection<Document> {
        self.db.collection(&self.config.dead_letter_collection)
    }
}

/// MongoDB's `uid` of the sessions of the user a `connectionStatus` reply
/// names: SHA-256 of `user@db`, or of the empty string when no one is
/// authenticated (MongoDB's `getLogicalSessionUserDigestFor`).
pub(crate) fn session_uid(connection_status: &Document) -> Binary {
    use sha2::Digest;
    let user = connection_status
        .get_document("authInfo")
        .ok()
        .and_then(|info| info.get_array("authenticatedUsers").ok())
        .and_then(|users| users.first())
        .and_then(|user| user.as_document())
        .and_then(|user| {
            Some(format!(
                "{}@{}",
                user.get_str("user").ok()?,
                user.get_str("db").ok()?
            ))
        })
        .unwrap_or_default();
    Binary {
        subtype: mongodb::bson::spec::BinarySubtype::Generic,
        bytes: sha2::Sha256::digest(user.as_bytes()).to_vec(),
    }
}

impl MongoStore {
    /// A change stream on the batches collection: one `()` per change, so
    /// the relay wakes within milliseconds instead of at its next poll.
    ///
    /// # Errors
    /// When the server does not support change streams or cannot be reached.
    pub async fn watch_batches(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<(), StoreError>> + Send + use<>, StoreError>
    {
        use futures::StreamExt;
        // Only new batches wake the relay, not its own status updates.
        let stream = self
            .batches()
            .watch()
            .pipeline([doc! { "$match": { "operationType": "insert" } }])
            .await
            .map_err(classify)?;
        Ok(stream.map(|event| event.map(drop).map_err(classify)))
    }
}
