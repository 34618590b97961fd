//! A batch's status: `GET /api/v1/batch/{batch_id}/status`.

use actix_web::{HttpResponse, get, web};
use chrono::{SecondsFormat, Utc};
use outbox_core::model::BatchId;
use outbox_service::problem::{Problem, ProblemDocument};

use super::problems::store_problem;
use super::views::BatchStatusView;
use super::{AppState, counted};
use crate::auth::Caller;

/// A batch's status
///
/// How far the relay is with a stored batch. Reads what a majority of the
/// replica set has: a batch that may still roll back is not shown.
#[utoipa::path(
    tag = "batches",
    params(("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$",
        description = "The `batch_id` the POST answered: 16 lowercase hex digits.")),
    responses(
        (status = 200, description = "The batch and its item counts.", body = BatchStatusView),
        (status = 400, description = "`invalid_batch_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`batch_not_found`: never stored, or removed by retention.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait."))),
    ),
    security((), ("api_key" = []))
)]
#[get("/api/v1/batch/{batch_id}/status")]
pub(crate) async fn batch_status(
    _caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let raw = path.into_inner();
    let result = async {
        let batch_id: BatchId = raw
            .parse()
            .map_err(|e: outbox_core::model::InvalidBatchId| {
                Problem::bad_request("invalid_batch_id", e.to_string())
            })?;
        let progress = state
            .store
            .batch_progress(&batch_id)
            .await
            .map_err(|e| store_problem(&e))?
            .ok_or_else(|| Problem::not_found("batch_not_found", format!("no batch {batch_id}")))?;
        let time = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        Ok(HttpResponse::Ok().json(BatchStatusView {
            batch_id: progress.batch_id.to_string(),
            stream: progress.stream.to_string(),
            batch_sequence: progress.batch_sequence.0,
            status: progress.status.as_str(),
            total: progress.counts.total,
            sent: progress.counts.sent,
            failed: progress.counts.failed,
            pending: progress.counts.pending,
            progress_percentage: progress.counts.progress_percentage(),
            created_at: time(progress.created_at),
            committed_at: progress.committed_at.map(time),
            last_error: progress.last_error,
            submitted_by: progress.submitted_by,
            traceparent: progress.traceparent,
        }))
    }
    .await;
    result.map_err(counted)
}
