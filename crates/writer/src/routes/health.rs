//! Liveness, readiness, metrics and the answer for unknown routes.

use std::sync::atomic::Ordering;

use super::views::HealthView;
use super::{AppState, READY_TIMEOUT, counted};
use actix_web::http::header::{self, ContentType};
use actix_web::{HttpRequest, HttpResponse, get, web};
use serde_json::json;

/// Liveness
///
/// 200 while the process serves HTTP; it does not look at MongoDB.
#[utoipa::path(tag = "operations", responses((status = 200, description = "Alive.", body = HealthView)))]
#[get("/health/live")]
pub(crate) async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Readiness
///
/// 200 when MongoDB answers and the schema (indexes, sequence counter)
/// exists: the writer can store batches.
#[utoipa::path(tag = "operations", responses(
    (status = 200, description = "Ready.", body = HealthView),
    (status = 503, description = "Not ready, with the reason.", body = HealthView,
        headers(("Retry-After" = u32, description = "Seconds to wait."))),
))]
#[get("/health/ready")]
pub(crate) async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let problem = if !state.schema_ready.load(Ordering::Acquire) {
        Some("indexes and sequence counter not created yet".to_owned())
    } else {
        match tokio::time::timeout(READY_TIMEOUT, state.store.ready()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("MongoDB did not answer in time".to_owned()),
        }
    };
    match problem {
        None => HttpResponse::Ok().json(json!({ "status": "ready" })),
        Some(reason) => HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "2"))
            .json(json!({ "status": "unavailable", "reason": reason })),
    }
}

/// Prometheus metrics
///
/// `outbox_writer_*` counters and histograms in the Prometheus text format.
#[utoipa::path(tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4.", body = String, content_type = "text/plain"),
))]
#[get("/metrics")]
pub(crate) async fn render_metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(ContentType(mime_text_plain()))
        .body(state.prometheus.render())
}

pub(crate) fn mime_text_plain() -> actix_web::mime::Mime {
    "text/plain; version=0.0.4; charset=utf-8"
        .parse()
        .unwrap_or(actix_web::mime::TEXT_PLAIN)
}

/// Unknown routes get a problem+json 404, known routes with another method
/// a 405 with `Allow`.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    let (problem, allow) = outbox_service::problem::no_route(&req);
    outbox_service::problem::no_route_response(&counted(problem), allow)
}
