//! `/api/v1/streams`: define streams, list them with their live state, and
//! each stream's status, history, pause, resume and pending batches;
//! `/api/v1/cluster`: the replicas and what each leads.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, get, post, put, web};
use chrono::SecondsFormat;
use outbox_core::model::{BatchStatus, Sequence};
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::{Lease, Member, instance_name, shared_names};
use outbox_core::stream::{PoisonPolicy, StreamDefinition, StreamName};
use outbox_service::problem::{Problem, ProblemDocument};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use super::views::{
    ClusterView, HistoryView, PausedView, PendingPage, StreamDefinitionBody, StreamList,
    StreamStatusView, StreamView,
};
use super::{AdminState, Page, known_stream, parse_stream, store_problem};

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A definition as the API shows it.
pub(crate) fn definition_json(definition: &StreamDefinition) -> Value {
    let default_key = match &definition.ordering {
        OrderingKeyMode::Field { default_key, .. } => Some(default_key.clone()),
        _ => None,
    };
    json!({
        "stream": definition.name,
        "topic": definition.topic,
        "ordering_key": definition.ordering.to_string(),
        "ordering_key_default": default_key,
        "on_poison": definition.on_poison.to_string(),
        "schema": definition.schema,
        "writers": definition.writers,
        "claim_check": definition.claim_check,
        "created_at": definition.created_at.map(time),
        "updated_at": definition.updated_at.map(time),
    })
}

/// A stream's live state as the store tells it, from any replica.
pub(crate) async fn live_state(
    state: &AdminState,
    name: &StreamName,
    leases: &[Lease],
    members: &[Member],
) -> Result<Value, Problem> {
    let store = &state.cluster.stores().outbox;
    let (backlog, paused) = futures::try_join!(store.backlog(name), store.paused(name))
        .map_err(|e| store_problem(&e))?;
    let head = backlog.head.clone();
    let now_ms = outbox_core::world::now().timestamp_millis();
    let lease = leases.iter().find(|l| &l.stream == name);
    let leader = lease
        .filter(|l| l.expires_at_ms > now_ms && !l.holder.is_empty())
        .map(|l| {
            let member = members.iter().find(|m| m.id == l.holder);
            json!({
                "relay_id": instance_name(&l.holder),
                "instance": l.holder,
                "admin_url": member.map(|m| m.admin_url.clone()),
                "pid": member.map(|m| m.pid),
            })
        });
    let halted = head.as_ref().filter(|b| b.status == BatchStatus::Failed);
    let state_name = if halted.is_some() {
        "halted"
    } else if paused {
        "paused"
    } else if leader.is_none() {
        "no leader"
    } else if backlog.pending_batches > 0 {
        "running"
    } else {
        "idle"
    };
    // What the stream published, as its leaders recorded it with their
    // fenced writes: the same on every replica, and kept across a change of
    // leader (a replica's own count starts at 0 with the process).
    let published = lease.map_or(0, |l| l.published);
    let age = backlog
        .oldest_created_at
        .map(|at| (outbox_core::world::now() - at).num_milliseconds().max(0) as f64 / 1000.0);
    Ok(json!({
        "leader": leader,
        "epoch": lease.map(|l| l.epoch),
        "lease_expires_at_ms": lease.map(|l| l.expires_at_ms),
        "state": state_name,
        "paused": paused,
        "halted": halted.map(|b| json!({
            "batch_id": b.batch_id,
            "batch_sequence": b.batch_sequence,
            "error": b.last_error,
        })),
        "backlog": backlog.pending_batches,
        "oldest_pending_age_seconds": age,
        "published_total": published,
        "head_batch": head.as_ref().map(|b| json!({
            "batch_id": b.batch_id,
            "batch_sequence": b.batch_sequence,
            "status": b.status,
            "total_items": b.total_items,
        })),
    }))
}

/// How long a status answer waits for MongoDB before it says what it
/// knows without it.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the status says of a stream when MongoDB does not answer: the
/// leader and count as the last supervision read them, the rest unknown.
fn unknown_state(name: &StreamName, leases: &[Lease], paused: bool) -> Value {
    let now_ms = outbox_core::world::now().timestamp_millis();
    let lease = leases.iter().find(|l| &l.stream == name);
    let leader = lease
        .filter(|l| l.expires_at_ms > now_ms && !l.holder.is_empty())
        .map(|l| json!({ "relay_id": instance_name(&l.holder), "instance": l.holder, "admin_url": null, "pid": null }));
    json!({
        "leader": leader,
        "epoch": lease.map(|l| l.epoch),
        "lease_expires_at_ms": lease.map(|l| l.expires_at_ms),
        "state": "unknown",
        "paused": paused,
        "halted": null,
        "backlog": null,
        "oldest_pending_age_seconds": null,
        "published_total": lease.map_or(0, |l| l.published),
        "head_batch": null,
    })
}

/// The leases and members as the last supervision read them (refreshed
/// every poll interval), or read now (briefly) when none was yet.
async fn seen(state: &AdminState) -> (Vec<Member>, Vec<Lease>) {
    let (members, leases) = state.cluster.seen();
    if !members.is_empty() || !leases.is_empty() {
        return (members, leases);
    }
    let stores = state.cluster.stores();
    let read = async {
        let leases = stores.leases.leases().await.unwrap_or_default();
        let now_ms = stores.leases.now_ms().await.unwrap_or(0);
        let members = stores.members.members(now_ms).await.unwrap_or_default();
        (members, leases)
    };
    tokio::time::timeout(STORE_WAIT, read)
        .await
        .unwrap_or_default()
}

/// One stream: its definition and live state.
async fn stream_json(state: &AdminState, name: &StreamName) -> Result<Value, Problem> {
    let view = state
        .cluster
        .stream(name)
        .ok_or_else(|| Problem::not_found("stream_not_found", format!("no stream {name}")))?;
    let (members, leases) = seen(state).await;
    let mut value = definition_json(&view.definition);
    let live = live_state(state, name, &leases, &members).await?;
    if let (Some(object), Value::Object(live)) = (value.as_object_mut(), live) {
        object.extend(live);
    }
    Ok(value)
}

/// The cluster
///
/// The live relay replicas, where each one's admin port is, and which
/// streams each leads.
#[utoipa::path(tag = "streams", responses((status = 200, description = "The replicas.", body = ClusterView)))]
#[get("/api/v1/cluster")]
pub(crate) async fn cluster(state: web::Data<AdminState>) -> HttpResponse {
    let (members, leases) = seen(&state).await;
    let now_ms = outbox_core::world::now().timestamp_millis();
    let own_token = state.cluster.settings().admin_token.as_deref();
    let replicas: Vec<Value> = members
        .iter()
        .map(|m| {
            let leads: Vec<&StreamName> = leases
                .iter()
                .filter(|l| l.holder == m.id && l.expires_at_ms > now_ms)
                .map(|l| &l.stream)
                .collect();
            json!({
                "relay_id": m.name(),
                "instance": m.id,
                "admin_url": m.admin_url,
                "host": m.host,
                "pid": m.pid,
                "version": m.version,
                "started_at": time(m.started_at),
                "leads": leads,
                "this": m.id == state.cluster.relay_id(),
                "admin_token": crate::cluster::token_match(own_token, m.admin_token.as_deref()),
            })
        })
        .collect();
    let streams = state.cluster.streams().len();
    // Replicas that left or stopped announcing themselves lately: shown as
    // gone, with when, for a while (GONE_SHOWN_MS).
    // By the store's clock, as members' expiries are.
    let stores = state.cluster.stores();
    let gone: Vec<Value> = tokio::time::timeout(STORE_WAIT, async {
        let store_ms = stores.leases.now_ms().await?;
        stores.members.recently_gone(store_ms).await
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default()
    .iter()
    .filter(|m| !members.iter().any(|live| live.id == m.id))
    .map(|m| {
        json!({
            "relay_id": m.name(),
            "instance": m.id,
            "host": m.host,
            "pid": m.pid,
            "gone_at": chrono::DateTime::from_timestamp_millis(m.expires_at_ms).map(time),
        })
    })
    .collect();
    HttpResponse::Ok().json(json!({
        "gone": gone,
        "relay_id": instance_name(state.cluster.relay_id()),
        "instance": state.cluster.relay_id(),
        "replicas": replicas,
        "streams": streams,
        "share": crate::cluster::share(streams, members.len()),
        "admin_token_mismatches": crate::cluster::token_mismatches(own_token, &members),
        "duplicate_names": shared_names(&members),
    }))
}

/// Streams
///
/// Every stream with its definition and live state: leader, epoch, running,
/// idle, paused, halted or without a leader, backlog, age of the oldest
/// pending batch, items published.
#[utoipa::path(tag = "streams", responses(
    (status = 200, description = "The streams, by name.", body = StreamList),
    (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
))]
#[get("/api/v1/streams")]
pub(crate) async fn list(state: web::Data<AdminState>) -> Result<HttpResponse, Problem> {
    let (members, leases) = seen(&state).await;
    let views = state.cluster.streams();
    let live = futures::future::join_all(views.iter().map(|v| async {
        match tokio::time::timeout(
            STORE_WAIT,
            live_state(&state, &v.definition.name, &leases, &members),
        )
        .await
        {
            Ok(Ok(live)) => live,
            _ => unknown_state(&v.definition.name, &leases, v.status.snapshot().paused),
        }
    }))
    .await;
    let streams: Vec<Value> = views
        .iter()
        .zip(live)
        .map(|(view, live)| {
            let mut value = definition_json(&view.definition);
            if let (Some(object), Value::Object(live)) = (value.as_object_mut(), live) {
                object.extend(live);
            }
            value
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "streams": streams })))
}

/// A stream
#[utoipa::path(tag = "streams",
    params(("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "The stream.", body = StreamView),
        (status = 400, description = "`invalid_stream_name`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/streams/{stream}")]
pub(crate) async fn show(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let name = known_stream(&state, &path)?;
    Ok(HttpResponse::Ok().json(stream_json(&state, &name).await?))
}

/// The body of a PUT.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DefinitionBody {
    topic: String,
    #[serde(default)]
    ordering_key: Option<String>,
    #[serde(default)]
    ordering_key_default: Option<String>,
    #[serde(default)]
    on_poison: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    writers: Option<Vec<String>>,
    #[serde(default)]
    claim_check: Option<ClaimCheckBody>,
}

/// A stream's claim-check store, as a PUT takes it (`above_bytes` a whole
/// number however JSON wrote it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimCheckBody {
    url: String,
    #[serde(default)]
    above_bytes: Option<serde_json::Number>,
}

impl ClaimCheckBody {
    fn setting(self) -> Result<outbox_core::claim_check::ClaimCheck, Problem> {
        let above_bytes = match self.above_bytes {
            None => None,
            Some(number) => Some(super::replays::whole_number(&number).ok_or_else(|| {
                invalid(format!(
                    "claim_check.above_bytes {number} is not a whole number"
                ))
            })?),
        };
        Ok(outbox_core::claim_check::ClaimCheck {
            url: self.url,
            above_bytes,
        })
    }
}

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_stream", detail)
}

impl DefinitionBody {
    fn definition(self, name: StreamName) -> Result<StreamDefinition, Problem> {
        let mut ordering: OrderingKeyMode = self
            .ordering_key
            .as_deref()
            .unwrap_or("global")
            .parse()
            .map_err(invalid)?;
        if let Some(key) = &self.ordering_key_default {
            if key.is_empty() || key.len() > outbox_core::publish::MAX_ORDERING_KEY_BYTES {
                return Err(invalid("ordering_key_default must be 1 to 1,024 bytes"));
            }
            ordering = ordering.with_default_key(key);
        }
        let on_poison: PoisonPolicy = self
            .on_poison
            .as_deref()
            .unwrap_or("halt")
            .parse()
            .map_err(invalid)?;
        let definition = StreamDefinition {
            name,
            topic: self.topic,
            ordering,
            on_poison,
            schema: self.schema.filter(|s| !s.is_null()),
            writers: self.writers,
            created_at: None,
            updated_at: None,
            claim_check: self.claim_check.map(ClaimCheckBody::setting).transpose()?,
        };
        definition.validate().map_err(|e| invalid(e.0))?;
        Ok(definition)
    }
}

/// Define a stream
///
/// Creates the stream, or replaces its definition: the Pub/Sub `topic`, the
/// `ordering_key` mode (`global`, `batch`, `none`, `field:<json-pointer>`;
/// default `global`) and `ordering_key_default`, `on_poison` (`halt`,
/// `dead-letter`; default `halt`), an optional JSON Schema every item must
/// satisfy (`schema`, self-contained), and the API key names allowed to
/// write it (`writers`; absent: any). Takes effect without a restart: the
/// writers within a second, the relay at the next batch it starts.
#[utoipa::path(tag = "streams",
    params(("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    request_body(content = StreamDefinitionBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Updated.", body = StreamView),
        (status = 201, description = "Created.", body = StreamView,
            headers(("Location" = String, description = "`/api/v1/streams/{stream}`."))),
        (status = 400, description = "`invalid_stream_name`, `invalid_json`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "`too_many_streams`: `MAX_STREAMS` are defined.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "`body_too_large`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_stream`: a topic Pub/Sub would refuse, an unknown ordering-key mode or poison policy, a schema that is not a JSON Schema, an empty `writers`, a `claim_check` whose `url` is not `gs://`, `file://` or `memory://` or whose `above_bytes` is 0 or over 9,998,976.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[put("/api/v1/streams/{stream}")]
pub(crate) async fn put(
    state: web::Data<AdminState>,
    path: web::Path<String>,
    body: web::Json<DefinitionBody>,
) -> Result<HttpResponse, Problem> {
    let name = parse_stream(&path)?;
    let definition = body.into_inner().definition(name.clone())?;
    let stores = state.cluster.stores();
    let existing = stores
        .streams
        .streams()
        .await
        .map_err(|e| store_problem(&e))?;
    let known = existing.iter().any(|d| d.name == name) || name.is_default();
    let defined = existing.len() + usize::from(!existing.iter().any(|d| d.name.is_default()));
    if !known && defined >= state.cluster.settings().max_streams {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "too_many_streams",
            format!("{defined} streams are defined, the most this cluster runs (MAX_STREAMS)"),
        ));
    }
    let created = stores
        .streams
        .put_stream(&definition)
        .await
        .map_err(|e| store_problem(&e))?;
    info!(message = if created { "stream created" } else { "stream updated" }, stream = %name, topic = %definition.topic);
    let stored = stores
        .streams
        .stream(&name)
        .await
        .map_err(|e| store_problem(&e))?
        .unwrap_or(definition);
    // This replica shows it at once; the supervisor runs it now rather
    // than at its next poll (the other replicas, at theirs).
    state.cluster.slot_for(&stored);
    state.cluster.wake_all();
    let body = stream_json(&state, &name).await?;
    Ok(if created {
        HttpResponse::Created()
            .insert_header((header::LOCATION, format!("/api/v1/streams/{name}")))
            .json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

/// A stream's status as this replica sees it: the live state from the
/// store, and this replica's own part (its role, the batch it is
/// publishing, its counters and errors).
pub(crate) async fn status_json(state: &AdminState, name: &StreamName) -> Result<Value, Problem> {
    let view = state
        .cluster
        .stream(name)
        .ok_or_else(|| Problem::not_found("stream_not_found", format!("no stream {name}")))?;
    let snapshot = view.status.snapshot();
    // The leases as the last supervision read them (every poll interval);
    // this replica's own, when it leads, as it holds it now.
    let (members, mut leases) = seen(state).await;
    if let Some(lease) = &view.lease {
        leases.retain(|l| &l.stream != name);
        leases.push(lease.clone());
    }
    let lease_json = match leases.iter().find(|l| &l.stream == name) {
        Some(lease) => {
            json!({
                "holder": instance_name(&lease.holder),
                "holder_instance": lease.holder,
                "epoch": lease.epoch,
                "expires_at_ms": lease.expires_at_ms,
            })
        }
        None => Value::Null,
    };
    // Answered whatever MongoDB does: what the store cannot say within
    // STORE_WAIT is shown as unknown, with since when it has not answered.
    let live =
        match tokio::time::timeout(STORE_WAIT, live_state(state, name, &leases, &members)).await {
            Ok(Ok(live)) => live,
            _ => unknown_state(name, &leases, snapshot.paused),
        };
    let current = match &snapshot.current_batch {
        Some(batch) if view.leading => {
            let progress = tokio::time::timeout(
                STORE_WAIT,
                state
                    .cluster
                    .stores()
                    .outbox
                    .batch_progress(&batch.batch_id),
            )
            .await
            .ok()
            .and_then(Result::ok)
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
        _ => Value::Null,
    };
    Ok(json!({
        "stream": name,
        "topic": view.definition.topic,
        "relay_id": instance_name(state.cluster.relay_id()),
        "instance": state.cluster.relay_id(),
        "relay_pid": std::process::id(),
        "role": if view.leading { "leader" } else { "standby" },
        "lease": lease_json,
        "leader": live["leader"],
        "state": live["state"],
        "paused": live["paused"],
        "halted": live["halted"],
        "current_batch": current,
        "pending_batches": live["backlog"],
        "oldest_pending_age_seconds": live["oldest_pending_age_seconds"],
        "published_total": snapshot.published_total,
        "cluster_published_total": live["published_total"],
        "batches_committed_total": snapshot.batches_committed_total,
        "last_error": snapshot.last_error,
        "last_error_at": snapshot.last_error_at.map(time),
        "mongodb_unreachable_since": state.cluster.store_unreachable_since().map(time),
        "recent_errors": snapshot.recent_errors.iter().map(|e| json!({
            "at": time(e.at),
            "message": e.message,
        })).collect::<Vec<_>>(),
    }))
}

/// A stream's status
#[utoipa::path(tag = "streams", operation_id = "stream_status",
    params(("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "Status.", body = StreamStatusView),
        (status = 400, description = "`invalid_stream_name`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/streams/{stream}/status")]
pub(crate) async fn status(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let name = known_stream(&state, &path)?;
    Ok(HttpResponse::Ok().json(status_json(&state, &name).await?))
}

pub(crate) fn history_json(state: &AdminState, name: &StreamName) -> Result<Value, Problem> {
    let view = state
        .cluster
        .stream(name)
        .ok_or_else(|| Problem::not_found("stream_not_found", format!("no stream {name}")))?;
    let samples: Vec<Value> = view
        .status
        .history()
        .into_iter()
        .map(|s| {
            json!({
                "at": time(s.at),
                "published_total": s.published_total,
                "pending_batches": s.pending_batches,
                "oldest_pending_age_seconds": s.oldest_pending_age_seconds,
            })
        })
        .collect();
    Ok(json!({
        "interval_seconds": crate::status::SAMPLE_INTERVAL.as_secs(),
        "samples": samples,
    }))
}

/// A stream's recent history
///
/// This replica's counters of the stream every 2 seconds over the last 10
/// minutes, oldest first: what the dashboard's charts start from.
#[utoipa::path(tag = "streams", operation_id = "stream_history",
    params(("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "Samples.", body = HistoryView),
        (status = 400, description = "`invalid_stream_name`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/streams/{stream}/history")]
pub(crate) async fn history(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let name = known_stream(&state, &path)?;
    Ok(HttpResponse::Ok().json(history_json(&state, &name)?))
}

pub(crate) async fn set_paused(
    state: &AdminState,
    name: &StreamName,
    paused: bool,
) -> Result<HttpResponse, Problem> {
    state
        .cluster
        .stores()
        .outbox
        .set_paused(name, paused)
        .await
        .map_err(|e| store_problem(&e))?;
    if let Some(view) = state.cluster.stream(name) {
        view.status.update(|s| s.paused = paused);
    }
    state.cluster.wake_stream(name);
    info!(
        message = if paused { "draining paused" } else { "draining resumed" },
        stream = %name
    );
    Ok(HttpResponse::Ok().json(json!({ "stream": name, "paused": paused })))
}

/// Pause a stream
///
/// Every replica stops draining the stream within about a second (the group of pages
/// in flight is published and recorded first); writers
/// keep accepting batches. Kept across restarts. Other streams go on.
#[utoipa::path(tag = "streams",
    params(("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "Paused.", body = PausedView),
        (status = 400, description = "`invalid_stream_name`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/streams/{stream}/pause")]
pub(crate) async fn pause(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let name = known_stream(&state, &path)?;
    set_paused(&state, &name, true).await
}

/// Resume a stream
#[utoipa::path(tag = "streams",
    params(("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$")),
    responses(
        (status = 200, description = "Resumed.", body = PausedView),
        (status = 400, description = "`invalid_stream_name`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
#[post("/api/v1/streams/{stream}/resume")]
pub(crate) async fn resume(
    state: web::Data<AdminState>,
    path: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let name = known_stream(&state, &path)?;
    set_paused(&state, &name, false).await
}

pub(crate) async fn pending_json(
    state: &AdminState,
    name: &StreamName,
    page: &Page,
) -> Result<Value, Problem> {
    let limit = page.limit()?;
    let after = page.cursor()?.map(Sequence);
    let batches = state
        .cluster
        .stores()
        .outbox
        .pending_batches(name, after, limit)
        .await
        .map_err(|e| store_problem(&e))?;
    let next_cursor = (batches.len() == limit as usize)
        .then(|| batches.last().map(|b| b.batch_sequence.0.to_string()))
        .flatten();
    Ok(json!({ "batches": batches, "next_cursor": next_cursor }))
}

/// A stream's pending batches
///
/// Batches not committed yet, in `batch_sequence` order, a page at a time.
#[utoipa::path(tag = "streams", operation_id = "stream_pending_batches",
    params(
        ("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000 (default 100)."),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,19}$", description = "`next_cursor` of the page before."),
    ),
    responses(
        (status = 200, description = "A page of batches.", body = PendingPage),
        (status = 400, description = "`invalid_stream_name`, `invalid_limit`, `invalid_cursor`, `invalid_query`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
#[get("/api/v1/streams/{stream}/pending-batches")]
pub(crate) async fn pending_batches(
    state: web::Data<AdminState>,
    path: web::Path<String>,
    page: web::Query<Page>,
) -> Result<HttpResponse, Problem> {
    let name = known_stream(&state, &path)?;
    Ok(HttpResponse::Ok().json(pending_json(&state, &name, &page).await?))
}
