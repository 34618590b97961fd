//! HTTP handlers, by resource:
//! - [`batches`]: storing a batch (both POST routes) and idempotent replays;
//! - [`status`]: a batch's status;
//! - [`health`]: liveness, readiness, metrics, unknown routes;
//! - [`body`]: reading a body (format, size, Idempotency-Key);
//! - [`problems`]: the problem+json answers;
//! - [`views`]: the shapes the OpenAPI document shows.

mod batches;
mod body;
mod health;
mod problems;
mod status;
mod views;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use actix_web::http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::ingest::{self, IngestRules};
use outbox_core::store::BatchStore;
use outbox_service::problem::Problem;

use crate::metrics::ERRORS;
use batches::{process_batch, stream_batches};
use health::{live, ready, render_metrics};
use status::batch_status;

pub use health::not_found;
pub use views::{
    AcceptedBatch, BatchAccepted, BatchBody, BatchStatusView, CsvRows, HealthView, RequestList,
    RequestObject,
};

/// Bodies larger than this are parsed off the HTTP worker thread.
const BLOCKING_PARSE_BYTES: usize = 1 << 20;
/// Readiness waits this long for MongoDB before answering 503.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
pub const IDEMPOTENT_REPLAYED: &str = "Idempotent-Replayed";

/// What the handlers share.
pub struct AppState {
    pub store: Arc<dyn BatchStore>,
    /// The streams' definitions (schema, writers, ordering).
    pub catalog: crate::streams::Catalog,
    /// Where large payloads go.
    pub claim_checks: Arc<crate::claim_check::ClaimChecks>,
    pub rules: IngestRules,
    pub max_body_bytes: usize,
    /// How long one request may spend on the store.
    pub request_deadline: Duration,
    /// Set once indexes and the sequence counter exist.
    pub schema_ready: Arc<AtomicBool>,
    pub prometheus: PrometheusHandle,
    /// The memory parses may take at once, in KiB permits (see
    /// `PARSE_MEMORY_BYTES`).
    pub parse_budget: ParseBudget,
    /// How long a client may take to send its body.
    pub body_read_timeout: Duration,
}

/// Bounds the memory concurrent parses take: each request reserves its
/// body's estimated parse cost ([`ingest::parse_cost`]) before it parses and
/// holds it until it has answered.
pub struct ParseBudget {
    permits: Arc<tokio::sync::Semaphore>,
    kib: u32,
}

impl ParseBudget {
    pub fn new(bytes: u64) -> Self {
        let kib = u32::try_from(bytes / 1024)
            .unwrap_or(u32::MAX)
            .min(u32::try_from(tokio::sync::Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// Reserves what parsing `body` takes, waiting until `deadline`.
    ///
    /// # Errors
    /// 413 `body_too_complex` when the estimate alone is over the budget;
    /// 503 `writer_busy` when the budget is not free by the deadline.
    async fn reserve(
        &self,
        body: &[u8],
        format: ingest::BodyFormat,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Problem> {
        let cost = ingest::parse_cost(body, format);
        let kib = u32::try_from(cost.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        if kib > self.kib {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_complex",
                format!(
                    "parsing this body would take about {} MiB, over the writer's limit of {} MiB (PARSE_MEMORY_BYTES): send fewer, larger values, or split the batch",
                    cost >> 20,
                    self.kib >> 10
                ),
            ));
        }
        tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_many_owned(kib))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "writer_busy",
                    "the writer is parsing as many large bodies as its memory allows; retry shortly",
                )
                .with_retry_after(1)
            })
    }
}

/// Registers every route; the OpenAPI document is collected from these
/// registrations, so it lists exactly the routes the app serves.
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(process_batch)
        .service(stream_batches)
        .service(batch_status)
        .service(live)
        .service(ready)
        .service(render_metrics);
}

/// Counts an error response by its code.
pub(crate) fn counted(problem: Problem) -> Problem {
    metrics::counter!(ERRORS, "code" => problem.code).increment(1);
    problem
}
