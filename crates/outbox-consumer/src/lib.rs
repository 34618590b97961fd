//! The consumer's side of batch-outbox's contract (docs/CONSUMING.md), as
//! code: each item handed to the application once, in order, optionally as
//! whole batches, and acknowledged only after the application handled it.
//!
//! - [`Item`]: one message read back (its attributes and JSON body).
//! - [`Verifier`]: the order contract checked delivery by delivery
//!   (first deliveries in order per ordering key, batches whole, duplicates
//!   counted); `outboxctl tail --verify` and the chaos suite use it.
//! - [`SeenStore`]: the memory of handled items ([`MemorySeen`], bounded;
//!   `MongoSeen` with the `mongodb` feature, kept across restarts).
//! - [`Consumer`] and [`Core`]: read an ordered subscription with Google's
//!   subscriber client and call a [`Handler`].
//! - [`ClaimCheckResolver`]: a payload stored by reference (claim-check) is
//!   fetched, its size and SHA-256 checked, and handed over in place; never
//!   an item whose object is missing or changed.
//!
//! ```no_run
//! use outbox_consumer::{Consumer, ConsumerConfig, Delivery, Handler, MemorySeen};
//!
//! struct Print;
//!
//! #[async_trait::async_trait]
//! impl Handler for Print {
//!     async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
//!         println!("{delivery:?}");
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let config = ConsumerConfig::new("my-project", "orders-ordered");
//! let report = Consumer::run(&config, MemorySeen::default(), Print, std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod claim_check;
mod consumer;
mod crypto;
mod item;
mod seen;
mod verify;

pub use claim_check::ClaimCheckResolver;
pub use consumer::{
    Answer, Consumer, ConsumerConfig, Core, Delivery, Handler, Limits, Outcome, Received,
};
pub use crypto::install_crypto_provider;
pub use item::{Item, Lane, NotAnItem, Position};
#[cfg(feature = "mongodb")]
pub use seen::MongoSeen;
pub use seen::{MemorySeen, SeenStore};
pub use verify::{Contract, Report, Verdict, Verifier};
