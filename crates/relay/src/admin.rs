//! The admin HTTP port: status, start/stop, inspection, retry, health and
//! metrics.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use chrono::SecondsFormat;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::model::{BatchId, InvalidBatchId, ItemSequence, Sequence};
use outbox_core::store::{LeaseStore, OutboxStore, StoreError};
use outbox_service::problem::Problem;
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

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/outbox/status", web::get().to(status))
        .route("/api/v1/outbox/start", web::post().to(start))
        .route("/api/v1/outbox/stop", web::post().to(stop))
        .route(
            "/api/v1/outbox/pending-batches",
            web::get().to(pending_batches),
        )
        .route(
            "/api/v1/outbox/batch/{batch_id}/status",
            web::get().to(batch_status),
        )
        .route(
            "/api/v1/outbox/batch/{batch_id}/items",
            web::get().to(batch_items),
        )
        .route(
            "/api/v1/outbox/batch/{batch_id}/retry",
            web::post().to(retry_batch),
        )
        .route("/health/live", web::get().to(live))
        .route("/health/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics));
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

async fn start(state: web::Data<AdminState>, req: HttpRequest) -> Result<HttpResponse, Problem> {
    set_paused(&state, &req, false).await
}

async fn stop(state: web::Data<AdminState>, req: HttpRequest) -> Result<HttpResponse, Problem> {
    set_paused(&state, &req, true).await
}

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

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

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

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        ))
        .body(state.prometheus.render())
}

pub async fn not_found(req: HttpRequest) -> HttpResponse {
    Problem::not_found(
        "route_not_found",
        format!("no route for {} {}", req.method(), req.path()),
    )
    .error_response()
}
