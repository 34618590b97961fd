#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The relay. `drain` and `lease` run the real drain loop against the
//! in-memory store and a publisher that injects failures (tokio's paused
//! clock stands in for time); `admin` talks to the admin port; `e2e` runs the
//! real binaries against MongoDB (or its stand-in) and Google's Pub/Sub
//! emulator, as started by `scripts/test.sh`; `faults` injects MongoDB
//! failures over the wire (fail points, killed sessions) into the real
//! binaries; `pipeline` the latency-tolerant drain with a Pub/Sub a round
//! trip away; `budget` pins the MongoDB commands per item drained and per
//! batch stored; `replays` runs replay jobs end to end; `consumer` the
//! consumer crate against the relay.

mod admin;
mod budget;
mod claim_check;
mod cli;
mod consumer;
mod dashboard;
mod drain;
mod e2e;
mod fakes;
mod faults;
mod lease;
mod otlp;
mod pipeline;
mod replay_worker;
mod replays;
mod share;
mod store_rules;
mod streams;
