#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The writer over HTTP: the real app in-process on port 0, against the
//! MongoDB that `scripts/test.sh` provides (a fresh database per test), or
//! against the in-memory model of the store where that shows more.

mod access;
mod availability;
mod batches;
mod claim_check;
mod concurrency;
mod csv;
mod errors;
mod helpers;
mod idempotency;
mod openapi;
mod streams;
