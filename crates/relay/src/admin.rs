//! The admin HTTP port: status, start/stop, inspection, retry, health and
//! metrics.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, get, post, web};
use chrono::SecondsFormat;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::model::{BatchId, InvalidBatchId, ItemSequence, Sequence};
use outbox_core::store::{LeaseStore, OutboxStore, StoreError};
use outbox_service::problem::{Problem, ProblemDocument};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::lease::Leadership;
use crate::status::StatusBoard;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AdminState {
    pub store: Arc<dyn OutboxStore>,
    pub lease_store: Arc<dyn LeaseStore>,
    pub leadership: Leadership,
    pub status: Arc<StatusBoard>,
    pub wake: Arc<Notify>,
    pub relay_id: String,
    pub admin_token: Option<String>,
    pub prometheus: PrometheusHandle,
}

/// Registers every route; the OpenAPI document is collected from these
/// registrations, so it lists exactly the routes the port serves.
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(status)
        .service(history)
        .service(start)
        .service(stop)
        .service(pending_batches)
        .service(batch_status)
        .service(batch_items)
        .service(retry_batch)
        .service(live)
        .service(ready)
        .service(render_metrics)
        .service(crate::dashboard::page)
        .service(crate::dashboard::script)
        .service(crate::dashboard::style);
}

/// The admin API's OpenAPI description; paths come from [`configure`].
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "batch-outbox relay admin",
        description = "Each relay replica's admin port: the cluster's draining state, \
            pause and resume (cluster-wide), inspection of pending and failed batches, \
            retry of a failed batch, health and metrics. The POST operations need \
            `Authorization: Bearer <ADMIN_TOKEN>` when the relay has a token. Errors are \
            `application/problem+json` with a stable `code`.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "outbox", description = "Draining state and control"),
        (name = "batches", description = "Pending and failed batches"),
        (name = "operations", description = "Health and metrics"),
        (name = "dashboard", description = "The operator's page")
    ),
    modifiers(&AdminTokenScheme)
)]
pub struct AdminApi;

struct AdminTokenScheme;

impl utoipa::Modify for AdminTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        outbox_service::openapi::add_bearer_scheme(
            openapi,
            "admin_token",
            "The relay's ADMIN_TOKEN, when it has one.",
        );
    }
}

fn store_problem(error: &StoreError) -> Problem {
    match error {
        StoreError::Unavailable(_) | StoreError::Conflict(_) => {
            warn!(message = "store unavailable", %error);
            Problem::store_unavailable()
        }
        StoreError::NotFound(id) => Problem::not_found("batch_not_found", format!("no batch {id}")),
        _ => {
            error!(message = "store error", %error);
            Problem::internal()
        }
    }
}

fn parse_batch_id(raw: &str) -> Result<BatchId, Problem> {
    raw.parse()
        .map_err(|e: InvalidBatchId| Problem::bad_request("invalid_batch_id", e.to_string()))
}

/// Checks `Authorization: Bearer <token>` when a token is configured,
/// comparing in constant time.
fn authorize(state: &AdminState, req: &HttpRequest) -> Result<(), Problem> {
    let Some(expected) = &state.admin_token else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        ))
    }
}

#[derive(Deserialize)]
struct Page {
    limit: Option<u32>,
    cursor: Option<String>,
}

impl Page {
    fn limit(&self) -> Result<u32, Problem> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(Problem::bad_request(
                "invalid_limit",
                format!("limit must be 1 to {MAX_LIMIT}"),
            )),
        }
    }

    fn cursor(&self) -> Result<Option<u64>, Problem> {
        self.cursor
            .as_deref()
            .map(|c| {
                c.parse::<u64>().map_err(|_| {
                    Problem::bad_request(
                        "invalid_cursor",
                        "cursor must be a number from next_cursor",
                    )
                })
            })
            .transpose()
    }
}

/// Cluster status
///
/// This replica's role, the lease, whether draining is paused or halted,
/// the batch in flight and the backlog.
#[utoipa::path(tag = "outbox", responses((status = 200, description = "Status.", body = StatusView)))]
#[get("/api/v1/outbox/status")]
async fn status(state: web::Data<AdminState>) -> HttpResponse {
    let snapshot = state.status.snapshot();
    let lease = state.lease_store.current().await;
    let lease_json = match &lease {
        Ok(Some(lease)) => {
            json!({ "holder": lease.holder, "epoch": lease.epoch, "expires_at_ms": lease.expires_at_ms })
        }
        Ok(None) => serde_json::Value::Null,
        Err(e) => json!({ "error": e.to_string() }),
    };
    let current = match &snapshot.current_batch {
        Some(batch) => {
            let progress = state
                .store
                .batch_progress(&batch.batch_id)
                .await
                .ok()
                .flatten();
            json!({
                "batch_id": batch.batch_id,
                "batch_sequence": batch.batch_sequence,
                "total_items": batch.total_items,
                "sent": progress.as_ref().map(|p| p.counts.sent),
                "pending": progress.as_ref().map(|p| p.counts.pending),
                "progress_percentage": progress.as_ref().map(|p| p.counts.progress_percentage()),
            })
        }
        None => serde_json::Value::Null,
    };
    HttpResponse::Ok().json(json!({
        "relay_id": state.relay_id,
        "role": if state.leadership.is_leader() { "leader" } else { "standby" },
        "lease": lease_json,
        "paused": snapshot.paused,
        "halted": snapshot.halted,
        "current_batch": current,
        "pending_batches": snapshot.pending_batches,
        "oldest_pending_age_seconds": snapshot.oldest_pending_age_seconds,
        "published_total": snapshot.published_total,
        "batches_committed_total": snapshot.batches_committed_total,
        "last_error": snapshot.last_error,
        "last_error_at": snapshot.last_error_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        "recent_errors": snapshot.recent_errors.iter().map(|e| json!({
            "at": e.at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "message": e.message,
        })).collect::<Vec<_>>(),
    }))
}

/// Recent history
///
/// This replica's counters every 2 seconds over the last 10 minutes, oldest
/// first: what the dashboard's drain-rate and lag charts start from.
#[utoipa::path(tag = "outbox", responses((status = 200, description = "Samples.", body = HistoryView)))]
#[get("/api/v1/outbox/history")]
async fn history(state: web::Data<AdminState>) -> HttpResponse {
    let samples: Vec<_> = state
        .status
        .history()
        .into_iter()
        .map(|s| {
            json!({
                "at": s.at.to_rfc3339_opts(SecondsFormat::Millis, true),
                "published_total": s.published_total,
                "pending_batches": s.pending_batches,
                "oldest_pending_age_seconds": s.oldest_pending_age_seconds,
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "interval_seconds": crate::status::SAMPLE_INTERVAL.as_secs(),
        "samples": samples,
    }))
}

async fn set_paused(
    state: &AdminState,
    req: &HttpRequest,
    paused: bool,
) -> Result<HttpResponse, Problem> {
    authorize(state, req)?;
    state
        .store
        .set_paused(paused)
        .await
        .map_err(|e| store_problem(&e))?;
    state.status.update(|s| s.paused = paused);
    state.wake.notify_one();
    info!(
        message = if paused {
            "draining paused"
        } else {
            "draining resumed"
        }
    );
    Ok(HttpResponse::Ok().json(json!({ "paused": paused })))
}

/// Resume draining
///
/// Clears the cluster-wide pause (stored in MongoDB, honoured by every replica).
#[utoipa::path(tag = "outbox",
    responses(
        (status = 200, description = "Draining resumed.", body = PausedView),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/start")]
async fn start(state: web::Data<AdminState>, req: HttpRequest) -> Result<HttpResponse, Problem> {
    set_paused(&state, &req, false).await
}

/// Pause draining
///
/// Pauses the whole cluster after the page in flight; writers keep accepting
/// batches. Kept across restarts.
#[utoipa::path(tag = "outbox",
    responses(
        (status = 200, description = "Draining paused.", body = PausedView),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/stop")]
async fn stop(state: web::Data<AdminState>, req: HttpRequest) -> Result<HttpResponse, Problem> {
    set_paused(&state, &req, true).await
}

/// Pending batches
///
/// Batches not committed yet, in `batch_sequence` order, a page at a time.
#[utoipa::path(tag = "batches",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000 (default 100)."),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,19}$", description = "`next_cursor` of the page before."),
    ),
    responses(
        (status = 200, description = "A page of batches.", body = PendingPage),
        (status = 400, description = "`invalid_limit`, `invalid_cursor`, `invalid_query`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/outbox/pending-batches")]
async fn pending_batches(
    state: web::Data<AdminState>,
    page: web::Query<Page>,
) -> Result<HttpResponse, Problem> {
    let limit = page.limit()?;
    let after = page.cursor()?.map(Sequence);
    let batches = state
        .store
        .pending_batches(after, limit)
        .await
        .map_err(|e| store_problem(&e))?;
    let next_cursor = (batches.len() == limit as usize)
        .then(|| batches.last().map(|b| b.batch_sequence.0.to_string()))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({ "batches": batches, "next_cursor": next_cursor })))
}

/// A batch's status
#[utoipa::path(tag = "batches",
    params(("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$", description = "16 lowercase hex digits.")),
    responses(
        (status = 200, description = "The batch.", body = AdminBatchView),
        (status = 400, description = "`invalid_batch_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`batch_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/outbox/batch/{batch_id}/status")]
async fn batch_status(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let batch_id = parse_batch_id(&path)?;
    let progress = state
        .store
        .batch_progress(&batch_id)
        .await
        .map_err(|e| store_problem(&e))?
        .ok_or_else(|| Problem::not_found("batch_not_found", format!("no batch {batch_id}")))?;
    let time = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    Ok(HttpResponse::Ok().json(json!({
        "batch_id": progress.batch_id,
        "batch_sequence": progress.batch_sequence,
        "status": progress.status,
        "items": progress.counts,
        "progress_percentage": progress.counts.progress_percentage(),
        "created_at": time(progress.created_at),
        "committed_at": progress.committed_at.map(time),
        "last_error": progress.last_error,
    })))
}

/// A batch's items
///
/// In `item_sequence` order, a page at a time, with each item's status and
/// Pub/Sub message id.
#[utoipa::path(tag = "batches",
    params(
        ("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$", description = "16 lowercase hex digits."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000 (default 100)."),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,19}$", description = "`next_cursor` of the page before."),
    ),
    responses(
        (status = 200, description = "A page of items.", body = ItemsPage),
        (status = 400, description = "`invalid_batch_id`, `invalid_limit`, `invalid_cursor`, `invalid_query`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`batch_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/outbox/batch/{batch_id}/items")]
async fn batch_items(
    state: web::Data<AdminState>,
    path: web::Path<String>,
    page: web::Query<Page>,
) -> Result<HttpResponse, Problem> {
    let batch_id = parse_batch_id(&path)?;
    let limit = page.limit()?;
    let after = ItemSequence(u32::try_from(page.cursor()?.unwrap_or(0)).unwrap_or(u32::MAX));
    let items = state
        .store
        .items(&batch_id, after, limit)
        .await
        .map_err(|e| store_problem(&e))?;
    if items.is_empty()
        && state
            .store
            .batch_progress(&batch_id)
            .await
            .map_err(|e| store_problem(&e))?
            .is_none()
    {
        return Err(Problem::not_found(
            "batch_not_found",
            format!("no batch {batch_id}"),
        ));
    }
    let next_cursor = (items.len() == limit as usize)
        .then(|| items.last().map(|i| i.item_sequence.0.to_string()))
        .flatten();
    Ok(HttpResponse::Ok()
        .json(json!({ "batch_id": batch_id, "items": items, "next_cursor": next_cursor })))
}

/// Retry a failed batch
///
/// Puts a failed (halted) batch back to draining from its first unsent item.
#[utoipa::path(tag = "batches",
    params(("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$", description = "16 lowercase hex digits.")),
    responses(
        (status = 200, description = "The batch drains again.", body = RetryView),
        (status = 400, description = "`invalid_batch_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`batch_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`batch_not_failed`: only a failed batch can be retried.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/batch/{batch_id}/retry")]
async fn retry_batch(
    state: web::Data<AdminState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    authorize(&state, &req)?;
    let batch_id = parse_batch_id(&path)?;
    if state
        .store
        .retry_batch(&batch_id)
        .await
        .map_err(|e| store_problem(&e))?
    {
        info!(message = "failed batch put back to draining", batch_id = %batch_id);
        state.wake.notify_one();
        return Ok(HttpResponse::Ok().json(json!({ "batch_id": batch_id, "status": "processing" })));
    }
    match state
        .store
        .batch_progress(&batch_id)
        .await
        .map_err(|e| store_problem(&e))?
    {
        None => Err(Problem::not_found(
            "batch_not_found",
            format!("no batch {batch_id}"),
        )),
        Some(progress) => Err(Problem::new(
            StatusCode::CONFLICT,
            "batch_not_failed",
            format!(
                "batch {batch_id} is {}, only a failed batch can be retried",
                progress.status.as_str()
            ),
        )),
    }
}

/// Liveness
#[utoipa::path(tag = "operations", responses((status = 200, description = "Alive.", body = HealthView)))]
#[get("/health/live")]
async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Readiness
///
/// 200 when MongoDB answers.
#[utoipa::path(tag = "operations", responses(
    (status = 200, description = "Ready.", body = HealthView),
    (status = 503, description = "Not ready, with the reason.", body = HealthView,
        headers(("Retry-After" = u32, description = "Seconds to wait."))),
))]
#[get("/health/ready")]
async fn ready(state: web::Data<AdminState>) -> HttpResponse {
    match tokio::time::timeout(READY_TIMEOUT, state.store.paused()).await {
        Ok(Ok(_)) => HttpResponse::Ok().json(json!({ "status": "ready" })),
        Ok(Err(e)) => not_ready(&e.to_string()),
        Err(_) => not_ready("MongoDB did not answer in time"),
    }
}

fn not_ready(reason: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header((header::RETRY_AFTER, "2"))
        .json(json!({ "status": "unavailable", "reason": reason }))
}

/// Prometheus metrics
#[utoipa::path(tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4.", body = String, content_type = "text/plain"),
))]
#[get("/metrics")]
async fn render_metrics(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
        .body(state.prometheus.render())
}

/// Unknown routes get a problem+json 404, known routes with another method
/// a 405 with `Allow`.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    let (problem, allow) = outbox_service::problem::no_route(&req);
    outbox_service::problem::no_route_response(&problem, allow)
}

// What the admin endpoints answer, described for OpenAPI. The handlers
// build the same JSON; schemathesis (scripts/api-check.sh) checks every
// answer against these.

/// The cluster as this replica sees it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct StatusView {
    relay_id: String,
    /// `leader` or `standby`.
    role: String,
    /// The lease as stored (null before anyone took it; `{error}` when
    /// MongoDB did not answer).
    lease: Option<LeaseView>,
    /// Draining paused cluster-wide.
    paused: bool,
    /// The failed batch draining halted on, if any (retry it to go on).
    halted: Option<HaltView>,
    current_batch: Option<CurrentBatchView>,
    pending_batches: Option<u64>,
    oldest_pending_age_seconds: Option<f64>,
    published_total: u64,
    batches_committed_total: u64,
    last_error: Option<String>,
    last_error_at: Option<String>,
    /// This replica's last errors, newest first (at most 20).
    recent_errors: Vec<ErrorView>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct HistoryView {
    /// Seconds between two samples.
    interval_seconds: u64,
    /// Oldest first; at most 300.
    samples: Vec<SampleView>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SampleView {
    /// RFC 3339.
    at: String,
    /// Items this replica has published since it started.
    published_total: u64,
    pending_batches: Option<u64>,
    oldest_pending_age_seconds: Option<f64>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorView {
    /// RFC 3339.
    at: String,
    message: String,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct HaltView {
    batch_id: String,
    batch_sequence: u64,
    error: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct LeaseView {
    holder: Option<String>,
    epoch: Option<u64>,
    expires_at_ms: Option<i64>,
    error: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CurrentBatchView {
    batch_id: String,
    batch_sequence: u64,
    total_items: u64,
    sent: Option<u64>,
    pending: Option<u64>,
    progress_percentage: Option<f64>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PausedView {
    paused: bool,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PendingPage {
    batches: Vec<PendingBatchView>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PendingBatchView {
    batch_id: String,
    batch_sequence: u64,
    /// `pending`, `processing` or `failed`.
    status: String,
    total_items: u64,
    created_at: String,
    last_error: Option<String>,
    traceparent: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct AdminBatchView {
    batch_id: String,
    batch_sequence: u64,
    /// `pending`, `processing`, `committed` or `failed`.
    status: String,
    items: ItemCountsView,
    progress_percentage: f64,
    created_at: String,
    committed_at: Option<String>,
    last_error: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ItemCountsView {
    total: u64,
    sent: u64,
    failed: u64,
    pending: u64,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ItemsPage {
    batch_id: String,
    items: Vec<ItemViewDoc>,
    next_cursor: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[schema(as = Item)]
#[allow(dead_code)]
pub struct ItemViewDoc {
    item_id: String,
    item_sequence: u32,
    request_id: Option<String>,
    vendor_name: String,
    /// `pending`, `sent` or `failed`.
    status: String,
    /// The Pub/Sub message id, once acknowledged.
    publish_id: Option<String>,
    sent_at: Option<String>,
    /// Why the item was dead-lettered.
    error: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct RetryView {
    batch_id: String,
    /// `processing`.
    status: String,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct HealthView {
    /// `ok`, `ready` or `unavailable`.
    status: String,
    reason: Option<String>,
}
