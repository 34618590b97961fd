//! `/api/v1/outbox/replays`: start, list, follow, pause, resume and cancel
//! replay jobs (`crate::replay` runs them).

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, get, post, web};
use chrono::SecondsFormat;
use outbox_core::model::Sequence;
use outbox_core::publish::OrderingKeyMode;
use outbox_core::replay::{ReplayAction, ReplayId, ReplayJob, ReplayRefused, ReplayRequest};
use outbox_core::stream::valid_topic;
use outbox_service::problem::{Problem, ProblemDocument};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use super::views::{ReplayBody, ReplayList, ReplayView};
use super::{AdminState, known_stream, store_problem};

const MAX_REPLAYS_LISTED: u32 = 100;

/// The body of `POST /api/v1/outbox/replays`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    #[serde(default)]
    stream: Option<String>,
    #[serde(deserialize_with = "whole")]
    from_sequence: u64,
    #[serde(deserialize_with = "whole")]
    to_sequence: u64,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    ordering_key: Option<String>,
    #[serde(default, deserialize_with = "whole_rate")]
    max_items_per_second: Option<u32>,
}

/// A whole number however JSON wrote it: `4` or `4.0` (JSON Schema's
/// `integer` takes both).
pub(crate) fn whole_number(number: &serde_json::Number) -> Option<u64> {
    number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    })
}

fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(d)?;
    whole_number(&number).ok_or_else(|| {
        serde::de::Error::custom(format!("{number} is not a whole number of at least 0"))
    })
}

fn whole_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    whole_number(&number)
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{number} is not a whole number from 0 to {}",
                u32::MAX
            ))
        })
}

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_replay", detail)
}

fn time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A job as the API shows it.
pub(crate) fn replay_json(job: &ReplayJob) -> Value {
    json!({
        "replay_id": job.replay_id,
        "stream": job.stream,
        "from_sequence": job.from_sequence.0,
        "to_sequence": job.to_sequence.0,
        "topic": job.topic,
        "ordering_key": job.ordering.to_string(),
        "max_items_per_second": job.max_items_per_second,
        "state": job.state,
        "items_sent": job.items_sent,
        "items_total": job.items_total,
        "batches_sent": job.batches_sent,
        "batches_total": job.batches_total,
        "position": {
            "batch_sequence": job.position.batch_sequence.0,
            "after_item": job.position.after.0,
        },
        "rate_items_per_second": job.rate(),
        "eta_seconds": job.eta_seconds(),
        "error": job.error,
        "created_at": time(job.created_at),
        "updated_at": time(job.updated_at),
    })
}

fn parse_replay_id(raw: &str) -> Result<ReplayId, Problem> {
    raw.parse()
        .map_err(|e: String| Problem::bad_request("invalid_replay_id", e))
}

fn not_found(id: &ReplayId) -> Problem {
    Problem::not_found("replay_not_found", format!("no replay {id}"))
}

/// Start a replay
///
/// Publishes the committed batches `from_sequence ..= to_sequence` of a
/// stream (`default` when absent) again, in their original order, with
/// their original attributes plus `replay_id`, on ordering keys of their own
/// (`replay:<replay_id>:<key>`), to `topic` (the stream's when absent), at
/// most `max_items_per_second` (no limit when absent). `ordering_key` is the
/// mode (default: the stream's). The stream's leader runs it beside the live
/// drain; it survives leader changes (resuming from its last recorded
/// position: duplicates possible, never out of order).
#[utoipa::path(tag = "replays", operation_id = "start_replay",
    request_body(content = ReplayBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Started.", body = ReplayView,
            headers(("Location" = String, description = "`/api/v1/outbox/replays/{replay_id}`."))),
        (status = 400, description = "`invalid_json`, `invalid_stream_name`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 410, description = "`range_removed`: retention removed the start of the range; `first_available_sequence` is the first batch still held.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "`body_too_large`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_replay`: an empty range, a topic Pub/Sub would refuse, an unknown ordering-key mode, a zero rate; `range_not_committed`: the range goes past the last committed batch; `topic_not_found`: the topic does not exist (a relay with `PUBSUB_CREATE_TOPIC` creates it instead).", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`, `pubsub_unavailable` (the topic could not be created).", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/replays")]
pub(crate) async fn start(
    state: web::Data<AdminState>,
    body: web::Json<StartBody>,
) -> Result<HttpResponse, Problem> {
    let body = body.into_inner();
    let stream = known_stream(&state, body.stream.as_deref().unwrap_or("default"))?;
    let definition = state
        .cluster
        .stream(&stream)
        .map(|view| view.definition)
        .ok_or_else(|| Problem::not_found("stream_not_found", format!("no stream {stream}")))?;
    let topic = body.topic.unwrap_or_else(|| definition.topic.clone());
    if !valid_topic(&topic) {
        return Err(invalid(format!(
            "{topic:?} is not a topic name Pub/Sub takes"
        )));
    }
    state.topics.check(&topic).await?;
    let ordering: OrderingKeyMode = match body.ordering_key.as_deref() {
        Some(mode) => mode.parse().map_err(invalid)?,
        None => definition.ordering.clone(),
    };
    if body.max_items_per_second == Some(0) {
        return Err(invalid(
            "max_items_per_second must be at least 1 (absent: no limit)",
        ));
    }
    let (from, to) = (Sequence(body.from_sequence), Sequence(body.to_sequence));
    let store = &state.cluster.stores().replays;
    let held = store
        .held_range(&stream)
        .await
        .map_err(|e| store_problem(&e))?;
    held.check(from, to).map_err(|refused| match refused {
        ReplayRefused::InvalidRange(detail) => invalid(detail),
        ReplayRefused::NotCommitted { committed, .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "range_not_committed",
            refused.to_string(),
        )
        .with("committed_through", committed),
        ReplayRefused::Removed {
            first_available, ..
        } => Problem::new(StatusCode::GONE, "range_removed", refused.to_string())
            .with("first_available_sequence", first_available.0),
    })?;
    let (batches, items) = store
        .range_totals(&stream, from, to)
        .await
        .map_err(|e| store_problem(&e))?;
    if batches != to.0 - from.0 + 1 {
        // Retention got there between the check and the count.
        let held = store
            .held_range(&stream)
            .await
            .map_err(|e| store_problem(&e))?;
        let first = held.first.map_or(held.committed_through + 1, |s| s.0);
        return Err(Problem::new(
            StatusCode::GONE,
            "range_removed",
            format!("batches of the range are no longer held; the first batch held is {first}"),
        )
        .with("first_available_sequence", first));
    }
    let job = ReplayJob::new(
        ReplayRequest {
            stream,
            from_sequence: from,
            to_sequence: to,
            topic,
            ordering,
            max_items_per_second: body.max_items_per_second,
        },
        items,
        outbox_core::world::now(),
    );
    store
        .create_replay(&job)
        .await
        .map_err(|e| store_problem(&e))?;
    info!(message = "replay started", replay_id = %job.replay_id, stream = %job.stream, from = from.0, to = to.0, topic = %job.topic, items);
    state.cluster.wake_replays();
    Ok(HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            format!("/api/v1/outbox/replays/{}", job.replay_id),
        ))
        .json(replay_json(&job)))
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    stream: Option<String>,
}

/// List replays
///
/// The newest 100 replay jobs, of one stream (`?stream=`) or of all, newest
/// first, with their progress.
#[utoipa::path(tag = "replays", operation_id = "list_replays",
    params(("stream" = Option<String>, Query, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "The jobs.", body = ReplayList),
        (status = 400, description = "`invalid_stream_name`, `invalid_query`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/outbox/replays")]
pub(crate) async fn list(
    state: web::Data<AdminState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, Problem> {
    let stream = query
        .stream
        .as_deref()
        .map(super::parse_stream)
        .transpose()?;
    let jobs = state
        .cluster
        .stores()
        .replays
        .replays(stream.as_ref(), MAX_REPLAYS_LISTED)
        .await
        .map_err(|e| store_problem(&e))?;
    let replays: Vec<Value> = jobs.iter().map(replay_json).collect();
    Ok(HttpResponse::Ok().json(json!({ "replays": replays })))
}

/// A replay
///
/// Its state (`running`, `paused`, `done`, `cancelled`, `failed`), batches
/// and items sent of the total, rate and ETA while it runs, and the error
/// that stopped it.
#[utoipa::path(tag = "replays", operation_id = "show_replay",
    params(("replay_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The job.", body = ReplayView),
        (status = 400, description = "`invalid_replay_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`replay_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/outbox/replays/{replay_id}")]
pub(crate) async fn show(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let id = parse_replay_id(&path)?;
    let job = state
        .cluster
        .stores()
        .replays
        .replay(&id)
        .await
        .map_err(|e| store_problem(&e))?
        .ok_or_else(|| not_found(&id))?;
    Ok(HttpResponse::Ok().json(replay_json(&job)))
}

async fn act(state: &AdminState, raw: &str, action: ReplayAction) -> Result<HttpResponse, Problem> {
    let id = parse_replay_id(raw)?;
    let store = &state.cluster.stores().replays;
    let (from, to) = action.transition();
    // An action that does not apply is a conflict, even when the job is
    // already where it would lead (resuming a running job).
    let before = store
        .replay(&id)
        .await
        .map_err(|e| store_problem(&e))?
        .ok_or_else(|| not_found(&id))?;
    let (job, applied) = if from.contains(&before.state) {
        let after = store
            .act_on_replay(&id, action)
            .await
            .map_err(|e| store_problem(&e))?
            .ok_or_else(|| not_found(&id))?;
        let applied = after.state == to;
        (after, applied)
    } else {
        (before, false)
    };
    if !applied {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "replay_state_conflict",
            format!(
                "replay {id} is {}: {} applies to a replay that is {}",
                job.state,
                action.as_str(),
                from.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        )
        .with("state", job.state.as_str()));
    }
    info!(message = "replay changed", replay_id = %id, action = action.as_str(), state = %job.state);
    state.cluster.wake_replays();
    Ok(HttpResponse::Ok().json(replay_json(&job)))
}

/// Pause a replay
///
/// The leader stops it within about a second, recording how far it got.
#[utoipa::path(tag = "replays", operation_id = "pause_replay",
    params(("replay_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "Paused.", body = ReplayView),
        (status = 400, description = "`invalid_replay_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`replay_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`replay_state_conflict`: it is not running.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/replays/{replay_id}/pause")]
pub(crate) async fn pause(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    act(&state, &path, ReplayAction::Pause).await
}

/// Resume a replay
///
/// A paused or failed replay runs again from where it stopped.
#[utoipa::path(tag = "replays", operation_id = "resume_replay",
    params(("replay_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "Running.", body = ReplayView),
        (status = 400, description = "`invalid_replay_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`replay_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`replay_state_conflict`: it is not paused nor failed.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/replays/{replay_id}/resume")]
pub(crate) async fn resume(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    act(&state, &path, ReplayAction::Resume).await
}

/// Cancel a replay
///
/// Stops it for good (within about a second while it runs).
#[utoipa::path(tag = "replays", operation_id = "cancel_replay",
    params(("replay_id" = String, Path, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "Cancelled.", body = ReplayView),
        (status = 400, description = "`invalid_replay_id`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`replay_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`replay_state_conflict`: it is done or cancelled already.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/outbox/replays/{replay_id}/cancel")]
pub(crate) async fn cancel(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    act(&state, &path, ReplayAction::Cancel).await
}
