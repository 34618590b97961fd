//! A deterministic simulator for batch-outbox.
//!
//! In one process, on tokio's paused clock, it runs the real code: several
//! relay replicas ([`relay::Cluster`]: leases, the share rule, the
//! pipelined drain, retention), the writer's ingest path
//! ([`outbox_core::ingest`] and the store's batch transaction, as the
//! writer calls them) and the consumer crate's [`outbox_consumer::Core`].
//! Around it are models, not fakes that always succeed: a MongoDB replica
//! set ([`replica_set`], with transactions that hold a lease across
//! statements in [`sessions`], behind the store traits in [`sim_store`]
//! and [`lease_store`]), Pub/Sub's publishing ([`pubsub`]) and delivering
//! ([`subscription`]) sides, and processes that die and freeze
//! ([`process`]). A seed draws the workload and the fault schedule
//! ([`run`]); random numbers and the wall clock come from
//! [`outbox_core::world`], so a seed replays exactly.

pub mod lease_store;
pub mod process;
pub mod pubsub;
pub mod replica_set;
pub mod run;
pub mod sessions;
pub mod sim_store;
pub mod subscription;
pub mod trace;

pub use run::{DELIVERY_BOUND, Outcome, run};
