//! MongoDB adapter of batch-outbox: the writer's [`BatchStore`], the relay's
//! [`OutboxStore`] and the leader [`LeaseStore`] over one replica set.
//!
//! # Layout
//! - [`config`]: connection settings and collection names.
//! - `documents`: the stored document shapes and their conversions.
//! - `errors`: driver errors to [`StoreError`] (what is transient, what not).
//! - `batches`: atomic batch ingest with the gap-free sequence.
//! - `outbox`: the relay's reads and its fenced progress writes.
//! - `lease`: the leader lease (compare-and-swap on holder and epoch).
//!
//! [`BatchStore`]: outbox_core::store::BatchStore
//! [`OutboxStore`]: outbox_core::store::OutboxStore
//! [`LeaseStore`]: outbox_core::store::LeaseStore
//! [`StoreError`]: outbox_core::store::StoreError

mod batches;
pub mod config;
pub mod documents;
mod errors;
mod lease;
mod outbox;

use std::sync::Arc;

use mongodb::bson::{Document, doc};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use outbox_core::store::StoreError;
use tokio::sync::Semaphore;

pub use config::MongoConfig;
use errors::classify;

/// The id of the one document in the counters collection.
const SEQUENCE_COUNTER_ID: &str = "batch_sequence";
/// The id of the one lease document.
const LEASE_ID: &str = "relay";
/// The id of the relay's cluster-wide control document.
const CONTROL_ID: &str = "relay";

/// A handle on the store; cheap to clone (the driver pools connections).
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    config: MongoConfig,
    /// Bounds the ingest transactions in flight (see
    /// [`MongoConfig::transaction_concurrency`]).
    ingest_slots: Arc<Semaphore>,
}

impl MongoStore {
    /// Connects lazily: the driver finds the servers in the background, and
    /// every operation waits at most `server_selection_timeout` for one.
    ///
    /// # Errors
    /// [`StoreError::Other`] when the URL cannot be parsed.
    pub async fn connect(config: MongoConfig) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(&config.url)
            .await
            .map_err(|e| StoreError::Other(format!("invalid MongoDB URL: {e}")))?;
        options.server_selection_timeout = Some(config.server_selection_timeout);
        options.connect_timeout = Some(config.server_selection_timeout);
        options
            .app_name
            .get_or_insert_with(|| config.app_name.clone());
        let client = Client::with_options(options)
            .map_err(|e| StoreError::Other(format!("invalid MongoDB options: {e}")))?;
        let db = client.database(&config.database);
        let ingest_slots = Arc::new(Semaphore::new(config.transaction_concurrency.max(1)));
        Ok(Self {
            client,
            db,
            config,
            ingest_slots,
        })
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
        self.batches()
            .create_indexes([
                index(doc! { "batch_id": 1 }, Some(unique())),
                index(doc! { "batch_sequence": 1 }, Some(unique())),
                index(doc! { "status": 1, "batch_sequence": 1 }, None),
            ])
            .await
            .map_err(classify)?;
        self.items()
            .create_indexes([
                index(doc! { "batch_id": 1, "item_sequence": 1 }, Some(unique())),
                index(doc! { "item_id": 1 }, Some(unique())),
                index(
                    doc! { "batch_id": 1, "status": 1, "item_sequence": 1 },
                    None,
                ),
            ])
            .await
            .map_err(classify)?;
        let ttl = IndexOptions::builder()
            .expire_after(std::time::Duration::ZERO)
            .build();
        self.idempotency()
            .create_index(index(doc! { "expires_at": 1 }, Some(ttl)))
            .await
            .map_err(classify)?;
        // The counter starts at 0; `$setOnInsert` leaves an existing one alone.
        let result = self
            .counters()
            .update_one(
                doc! { "_id": SEQUENCE_COUNTER_ID },
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

    fn dead_letters(&self) -> Collection<Document> {
        self.db.collection(&self.config.dead_letter_collection)
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
        let stream = self.batches().watch().await.map_err(classify)?;
        Ok(stream.map(|event| event.map(drop).map_err(classify)))
    }
}
