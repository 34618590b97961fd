//! A batch's status, items and retry: by id under `/api/v1/outbox/` (any
//! stream), and under `/api/v1/streams/{stream}/` (that stream's only).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, post, web};
use chrono::SecondsFormat;
use outbox_core::model::{BatchId, ItemSequence};
use outbox_core::stream::StreamName;
use outbox_service::problem::{Problem, ProblemDocument};
use serde_json::{Value, json};
use tracing::info;

use super::views::{AdminBatchView, ItemsPage, RetryView};
use super::{AdminState, Page, known_stream, parse_batch_id, store_problem};

fn no_batch(batch_id: &BatchId) -> Problem {
    Problem::not_found("batch_not_found", format!("no batch {batch_id}"))
}

/// The batch's status, when it exists (and is of `stream`, when given).
async fn status_json(
    state: &AdminState,
    batch_id: &BatchId,
    stream: Option<&StreamName>,
) -> Result<Value, Problem> {
    let progress = state
        .cluster
        .stores()
        .outbox
        .batch_progress(batch_id)
        .await
        .map_err(|e| store_problem(&e))?
        .filter(|p| stream.is_none_or(|s| &p.stream == s))
        .ok_or_else(|| no_batch(batch_id))?;
    let time = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    Ok(json!({
        "batch_id": progress.batch_id,
        "stream": progress.stream,
        "batch_sequence": progress.batch_sequence,
        "status": progress.status,
        "items": progress.counts,
        "progress_percentage": progress.counts.progress_percentage(),
        "created_at": time(progress.created_at),
        "committed_at": progress.committed_at.map(time),
        "last_error": progress.last_error,
    }))
}

async fn items_json(
    state: &AdminState,
    batch_id: &BatchId,
    stream: Option<&StreamName>,
    page: &Page,
) -> Result<Value, Problem> {
    let limit = page.limit()?;
    let after = ItemSequence(u32::try_from(page.cursor()?.unwrap_or(0)).unwrap_or(u32::MAX));
    let store = &state.cluster.stores().outbox;
    // The batch must exist (in the stream).
    store
        .batch_progress(batch_id)
        .await
        .map_err(|e| store_problem(&e))?
        .filter(|p| stream.is_none_or(|s| &p.stream == s))
        .ok_or_else(|| no_batch(batch_id))?;
    let items = store
        .items(batch_id, after, limit)
        .await
        .map_err(|e| store_problem(&e))?;
    let next_cursor = (items.len() == limit as usize)
        .then(|| items.last().map(|i| i.item_sequence.0.to_string()))
        .flatten();
    Ok(json!({ "batch_id": batch_id, "items": items, "next_cursor": next_cursor }))
}

async fn retry(
    state: &AdminState,
    batch_id: &BatchId,
    stream: Option<&StreamName>,
) -> Result<HttpResponse, Problem> {
    let store = &state.cluster.stores().outbox;
    let progress = store
        .batch_progress(batch_id)
        .await
        .map_err(|e| store_problem(&e))?
        .filter(|p| stream.is_none_or(|s| &p.stream == s))
        .ok_or_else(|| no_batch(batch_id))?;
    if store
        .retry_batch(batch_id)
        .await
        .map_err(|e| store_problem(&e))?
    {
        info!(message = "failed batch put back to draining", batch_id = %batch_id, stream = %progress.stream);
        state.cluster.wake_stream(&progress.stream);
        return Ok(HttpResponse::Ok().json(
            json!({ "batch_id": batch_id, "stream": progress.stream, "status": "processing" }),
        ));
    }
    Err(Problem::new(
        StatusCode::CONFLICT,
        "batch_not_failed",
        format!(
            "batch {batch_id} is {}, only a failed batch can be retried",
            progress.status.as_str()
        ),
    ))
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
pub(crate) async fn batch_status(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let batch_id = parse_batch_id(&path)?;
    Ok(HttpResponse::Ok().json(status_json(&state, &batch_id, None).await?))
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
pub(crate) async fn batch_items(
    state: web::Data<AdminState>,
    path: web::Path<String>,
    page: web::Query<Page>,
) -> Result<HttpResponse, Problem> {
    let batch_id = parse_batch_id(&path)?;
    Ok(HttpResponse::Ok().json(items_json(&state, &batch_id, None, &page).await?))
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
pub(crate) async fn retry_batch(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let batch_id = parse_batch_id(&path)?;
    retry(&state, &batch_id, None).await
}

/// A stream's batch: status
#[utoipa::path(tag = "streams",
    params(
        ("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$"),
        ("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$", description = "16 lowercase hex digits."),
    ),
    responses(
        (status = 200, description = "The batch.", body = AdminBatchView),
        (status = 400, description = "`invalid_stream_name`, `invalid_batch_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`, `batch_not_found` (in this stream).", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/streams/{stream}/batch/{batch_id}/status")]
pub(crate) async fn stream_batch_status(
    state: web::Data<AdminState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, Problem> {
    let stream = known_stream(&state, &path.0)?;
    let batch_id = parse_batch_id(&path.1)?;
    Ok(HttpResponse::Ok().json(status_json(&state, &batch_id, Some(&stream)).await?))
}

/// A stream's batch: items
#[utoipa::path(tag = "streams",
    params(
        ("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$"),
        ("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$", description = "16 lowercase hex digits."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000 (default 100)."),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,19}$", description = "`next_cursor` of the page before."),
    ),
    responses(
        (status = 200, description = "A page of items.", body = ItemsPage),
        (status = 400, description = "`invalid_stream_name`, `invalid_batch_id`, `invalid_limit`, `invalid_cursor`, `invalid_query`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`, `batch_not_found` (in this stream).", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/streams/{stream}/batch/{batch_id}/items")]
pub(crate) async fn stream_batch_items(
    state: web::Data<AdminState>,
    path: web::Path<(String, String)>,
    page: web::Query<Page>,
) -> Result<HttpResponse, Problem> {
    let stream = known_stream(&state, &path.0)?;
    let batch_id = parse_batch_id(&path.1)?;
    Ok(HttpResponse::Ok().json(items_json(&state, &batch_id, Some(&stream), &page).await?))
}

/// A stream's batch: retry
#[utoipa::path(tag = "streams",
    params(
        ("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$"),
        ("batch_id" = String, Path, pattern = "^[0-9a-f]{16}$", description = "16 lowercase hex digits."),
    ),
    responses(
        (status = 200, description = "The batch drains again.", body = RetryView),
        (status = 400, description = "`invalid_stream_name`, `invalid_batch_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`, `batch_not_found` (in this stream).", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`batch_not_failed`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/streams/{stream}/batch/{batch_id}/retry")]
pub(crate) async fn stream_retry_batch(
    state: web::Data<AdminState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, Problem> {
    let stream = known_stream(&state, &path.0)?;
    let batch_id = parse_batch_id(&path.1)?;
    retry(&state, &batch_id, Some(&stream)).await
}
