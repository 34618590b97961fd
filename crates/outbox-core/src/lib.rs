//! The domain of batch-outbox: what a batch and its items are, how a request
//! becomes a batch, and the traits the services are written against.
//!
//! Nothing here knows about MongoDB, Pub/Sub or HTTP; the adapters convert at
//! the edge. That keeps the ordering and fencing rules testable against the
//! in-memory implementations in [`memory`].
//!
//! # Layout
//! - [`model`]: ids, sequence numbers, statuses, batches and items.
//! - [`ingest`]: request bodies to a validated [`model::NewBatch`].
//! - [`store`]: the writer's [`store::BatchStore`], the relay's
//!   [`store::OutboxStore`] and [`store::LeaseStore`], and their errors.
//! - [`lease`]: the lease rules every lease store follows (take, renew,
//!   and when to kill a predecessor's session).
//! - [`publish`]: the [`publish::Publisher`] the relay sends items through,
//!   and Pub/Sub's limits on a message.
//! - [`stream`]: streams (name, topic, ordering, schema, writers).
//! - [`replay`]: replay jobs (a range of committed batches published again).
//! - [`claim_check`]: items too large for a Pub/Sub message, stored in an
//!   object store by digest and published by reference.
//! - [`memory`]: in-memory implementations of the store traits, used by tests
//!   to show properties the MongoDB stand-in cannot (conflicting transactions).
//! - [`world`]: random numbers and the wall clock, which the simulator replaces.

pub mod claim_check;
pub mod ingest;
pub mod lease;
pub mod memory;
pub mod model;
pub mod publish;
pub mod replay;
pub mod store;
pub mod stream;
pub mod world;

pub use model::{
    BatchId, BatchStatus, BatchSummary, ItemId, ItemSequence, ItemStatus, NewBatch, NewItem,
    Sequence,
};
