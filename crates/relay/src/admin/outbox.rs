//! `/api/v1/outbox/...`: the default stream, as these endpoints meant before
//! streams existed (every stream has the same under `/api/v1/streams/`).

use actix_web::{HttpResponse, get, post, web};
use outbox_core::stream::StreamName;
use outbox_service::problem::{Problem, ProblemDocument};

use super::views::{HistoryView, PausedView, PendingPage, StatusView};
use super::{AdminState, Page, streams};

/// The default stream's status
///
/// This replica's role for the default stream, the lease, whether draining
/// is paused or halted, the batch in flight and the backlog (the default
/// stream's part of `GET /api/v1/streams/default/status`).
#[utoipa::path(tag = "outbox", responses(
    (status = 200, description = "Status.", body = StatusView),
    (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
))]
#[get("/api/v1/outbox/status")]
pub(crate) async fn status(state: web::Data<AdminState>) -> Result<HttpResponse, Problem> {
    let status = streams::status_json(&state, &StreamName::default_stream()).await?;
    Ok(HttpResponse::Ok().json(status))
}

/// The default stream's recent history
///
/// This replica's counters every 2 seconds over the last 10 minutes, oldest
/// first: what the dashboard's drain-rate and lag charts start from.
#[utoipa::path(tag = "outbox", responses((status = 200, description = "Samples.", body = HistoryView)))]
#[get("/api/v1/outbox/history")]
pub(crate) async fn history(state: web::Data<AdminState>) -> Result<HttpResponse, Problem> {
    Ok(HttpResponse::Ok().json(streams::history_json(
        &state,
        &StreamName::default_stream(),
    )?))
}

/// Resume the default stream
///
/// Clears the default stream's pause (stored in MongoDB, honoured by every replica).
#[utoipa::path(tag = "outbox",
    responses(
        (status = 200, description = "Draining resumed.", body = PausedView),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/start")]
pub(crate) async fn start(state: web::Data<AdminState>) -> Result<HttpResponse, Problem> {
    streams::set_paused(&state, &StreamName::default_stream(), false).await
}

/// Pause the default stream
///
/// Every replica stops draining the default stream within about a second
/// (the group of pages in flight is published and recorded first); writers
/// keep accepting batches. Kept across restarts.
#[utoipa::path(tag = "outbox",
    responses(
        (status = 200, description = "Draining paused.", body = PausedView),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/stop")]
pub(crate) async fn stop(state: web::Data<AdminState>) -> Result<HttpResponse, Problem> {
    streams::set_paused(&state, &StreamName::default_stream(), true).await
}

/// The default stream's pending batches
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
pub(crate) async fn pending_batches(
    state: web::Data<AdminState>,
    page: web::Query<Page>,
) -> Result<HttpResponse, Problem> {
    let page = streams::pending_json(&state, &StreamName::default_stream(), &page).await?;
    Ok(HttpResponse::Ok().json(page))
}
