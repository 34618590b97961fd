//! What the writer and the relay binaries share.
//!
//! # Layout
//! - [`cli`]: the MongoDB and logging options both binaries take, and the
//!   exit-64-on-bad-configuration rule.
//! - [`telemetry`]: tracing subscriber and the Prometheus recorder.
//! - [`problem`]: `application/problem+json` errors with stable codes.
//! - [`openapi`]: soundness checks on a served OpenAPI document (for tests).
//! - [`shutdown`]: SIGTERM / SIGINT as a future.
//! - [`trace_context`]: the W3C `traceparent` both binaries read and write.

pub mod cli;
pub mod openapi;
pub mod ports;
pub mod problem;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;
