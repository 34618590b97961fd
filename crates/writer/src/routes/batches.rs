//! Storing a batch: `POST /api/v1/batch/process` and
//! `POST /api/v1/streams/{stream}/batches`, idempotent replays.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;
use actix_web::http::header::{self};
use actix_web::{HttpRequest, HttpResponse, post, web};
use chrono::{SecondsFormat, Utc};
use outbox_core::ingest::{self, BodyFormat, IngestError, IngestRules};
use outbox_core::model::{BatchSummary, Idempotency, NewBatch};
use outbox_core::store::{BatchStore, StoreError};
use outbox_core::stream::StreamName;
use outbox_service::problem::{Problem, ProblemDocument};
use outbox_service::trace_context::{TRACEPARENT, TraceParent};
use tracing::{Instrument, info, info_span};

use super::body::{body_format, idempotency_key, read_body};
use super::problems::{ingest_problem, schema_not_ready, schema_problem, store_problem};
use super::views::{AcceptedBatch, BatchAccepted, BatchBody, CsvRows, RequestList};
use super::{AppState, BLOCKING_PARSE_BYTES, IDEMPOTENT_REPLAYED, counted};
use crate::auth::{Access, Caller};
use crate::claim_check::ClaimChecks;
use crate::metrics::{BATCHES_ACCEPTED, IDEMPOTENT_REPLAYS, ITEMS_ACCEPTED};

pub(crate) fn accepted_response(summary: &BatchSummary, replayed: bool) -> HttpResponse {
    let location = format!("/api/v1/batch/{}/status", summary.batch_id);
    let body = BatchAccepted {
        status: "success",
        message: match summary.total_items {
            1 => "batch of 1 item stored".to_owned(),
            n => format!("batch of {n} items stored"),
        },
        data: AcceptedBatch {
            batch_id: summary.batch_id.to_string(),
            stream: summary.stream.to_string(),
            batch_sequence: summary.batch_sequence.0,
            timestamp: summary
                .created_at
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            total_json_objects: summary.total_items,
            vendor_counts: summary.vendor_counts.clone(),
            unique_vendors: summary.vendor_counts.len(),
            processing_time_ms: summary.processing_time_ms,
            submitted_by: summary.submitted_by.clone(),
        },
    };
    let mut response = HttpResponse::Created();
    response.insert_header((header::LOCATION, location));
    if replayed {
        response.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    response.json(body)
}

/// The stored batch for a key, or a 422 when the key came with another body.
/// Reads what a majority has (a batch that may still roll back is not
/// replayed), within the request deadline.
pub(crate) async fn replay(
    store: &dyn BatchStore,
    stream: &StreamName,
    idem: &Idempotency,
    deadline: tokio::time::Instant,
) -> Result<Option<HttpResponse>, Problem> {
    let found = tokio::time::timeout_at(deadline, store.find_idempotent(stream, &idem.key))
        .await
        .map_err(|_| {
            store_problem(&StoreError::Unavailable(
                "idempotency lookup passed the request deadline".to_owned(),
            ))
        })?;
    let Some((hash, summary)) = found.map_err(|e| store_problem(&e))? else {
        return Ok(None);
    };
    if hash != idem.request_hash {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this idempotency key was used with a different request body",
        ));
    }
    let Some(summary) = summary else {
        return Err(Problem::new(
            StatusCode::GONE,
            "batch_expired",
            "the batch stored under this idempotency key was delivered, committed and then \
             removed by retention; it is not stored again",
        ));
    };
    metrics::counter!(IDEMPOTENT_REPLAYS).increment(1);
    info!(message = "idempotent replay", batch_id = %summary.batch_id);
    Ok(Some(accepted_response(&summary, true)))
}

pub(crate) fn parse_batch(
    body: &[u8],
    format: BodyFormat,
    rules: &IngestRules,
    idempotency: Option<Idempotency>,
) -> Result<NewBatch, IngestError> {
    let received = Utc::now();
    let values = ingest::parse_body(body, format, rules.max_items)?;
    ingest::build_batch(values, rules, idempotency, received)
}

/// Store a batch
///
/// Validates the body and stores the batch and all its items in one MongoDB
/// transaction, with the next gap-free `batch_sequence` (commit order equals
/// sequence order). The relay then publishes every item to Pub/Sub in
/// (`batch_sequence`, `item_sequence`) order. Nothing is stored when the
/// answer is not 201.
#[utoipa::path(
    tag = "batches",
    request_body(
        description = "The batch: a JSON array of objects or `{\"requests\": [...]}` \
            (`application/json`, also `application/*+json`), one object per line \
            (`application/x-ndjson`, `application/ndjson`, `application/jsonl`), or CSV \
            (`text/csv`, `application/csv`: RFC 4180, UTF-8 with or without BOM, CRLF or LF; \
            the header row names the keys, every cell is a string). Each object's \
            `request_id` and `vendor_name` (configurable) are read for the response and \
            the messages. Limits: `MAX_BATCH_ITEMS` items, `MAX_BODY_BYTES` bytes; per item, \
            what Pub/Sub accepts of its message (10 MB with envelope and attributes, 1,024 \
            bytes for `request_id` and `vendor_name`) and 16 MiB of BSON, unless the stream \
            has a claim-check store (its `claim_check`, or the writer's `CLAIM_CHECK_URL`): \
            then an item whose message would be too large (or whose payload is over \
            `above_bytes`) is stored there under its SHA-256 before the batch, up to \
            `MAX_ITEM_BYTES` (100 MiB; the body may be that and 1 MiB more), and its message \
            carries `claim_check_url`, `claim_check_sha256` and `claim_check_bytes` in place \
            of the payload (docs/CONSUMING.md); a key twice in one \
            object and a NUL in a key are refused. Each object is published as the JSON value \
            sent, in its canonical form (docs/CONSUMING.md), objects shaped like MongoDB \
            extended JSON included.",
        content(
            (BatchBody = "application/json",
                example = json!([{"request_id": "r1", "vendor_name": "acme", "amount": 12}, {"request_id": "r2", "vendor_name": "globex"}])),
            (RequestList = "application/x-ndjson",
                example = "{\"request_id\":\"r1\",\"vendor_name\":\"acme\"}\n{\"request_id\":\"r2\"}\n"),
            (CsvRows = "text/csv", example = "request_id,vendor_name,note\r\nr1,acme,\"a, b\"\r\n"),
        )
    ),
    params(
        (
            "Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "1 to 255 visible ASCII characters. The first request with a key \
                stores the batch; a retry with the same key and the same body answers the \
                stored batch again (201 with `Idempotent-Replayed: true`), with another body \
                422 `idempotency_key_reused`. Keys are remembered `IDEMPOTENCY_TTL_SECONDS`, \
                per stream and, when the writer has API keys, per caller: two callers' keys \
                never meet."
        ),
        (
            "traceparent" = Option<String>, Header,
            description = "W3C trace context. Continued when valid (a new trace is started \
                otherwise); the writer's own `traceparent` is answered, stored with the \
                batch and put on every message of it."
        ),
    ),
    responses(
        (status = 201, description = "Stored (or replayed for its Idempotency-Key).", body = BatchAccepted,
            headers(
                ("Location" = String, description = "The batch's status: `/api/v1/batch/{batch_id}/status`."),
                ("Idempotent-Replayed" = String, description = "`true` when this answer is a replay."),
                ("traceparent" = String, description = "The writer's span in the request's trace."),
            )),
        (status = 400, description = "`invalid_json`, `invalid_csv`, `invalid_idempotency_key`, `invalid_body`.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: API keys are configured and none valid was sent.",
            body = ProblemDocument, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"batch-outbox\"`"))),
        (status = 408, description = "`body_timeout`: the body did not arrive within `BODY_READ_TIMEOUT_SECONDS`.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 410, description = "`batch_expired`: the batch stored under this Idempotency-Key was \
            committed and later removed by retention (`RETENTION_SECONDS`); it is not stored again.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "`batch_too_large` (items or bytes; `max_items` or `max_body_bytes`), \
            `item_too_large` (`index`, `max_message_bytes`): the item's Pub/Sub message (its JSON \
            envelope, attributes and ordering key) would be over Pub/Sub's 10 MB limit, or its BSON \
            over MongoDB's 16 MiB, and the stream has no claim-check store; with one, the item is \
            over `MAX_ITEM_BYTES` (`max_item_bytes`); `body_too_complex`: parsing the body would take more memory \
            than `PARSE_MEMORY_BYTES` (many small values).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`, `unsupported_charset` (only UTF-8).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "`empty_body`, `invalid_batch`, `empty_batch`, `item_not_object` (`index`), \
            `duplicate_key`, `invalid_key`, \
            `attribute_too_long` (`index`, `field`, `max_bytes`: a field the message carries as an \
            attribute, `request_id` or `vendor_name`, is over Pub/Sub's 1,024 bytes), \
            `idempotency_key_reused`, `csv_empty`, `csv_no_rows`, `csv_header` (`line`), \
            `csv_field_count` (`line`), `csv_quote` (`line`: where the quoted field that never \
            closes starts, or the stray quote).",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: the API key's items per second are spent.",
            body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds until the budget allows this batch."))),
        (status = 431, description = "`headers_too_large`: request headers over 16 KiB.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`: MongoDB cannot be reached, has no primary, or \
            the schema is still being created; nothing was stored, retry. `writer_busy`: the \
            writer is parsing as many large bodies as `PARSE_MEMORY_BYTES` allows. `outcome_unknown` \
            (with `batch_id`): MongoDB went away during the commit; look the batch up or \
            retry with the same Idempotency-Key. `claim_check_unavailable`: the claim-check \
            store did not take the batch's large items within `CLAIM_CHECK_TIMEOUT_SECONDS` \
            (or the stream's setting is unusable); nothing was stored, retry.",
            body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    ),
    security((), ("api_key" = []))
)]
#[post("/api/v1/batch/process")]
pub(crate) async fn process_batch(
    caller: Caller,
    state: web::Data<AppState>,
    access: web::Data<Access>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, Problem> {
    ingest_into(
        &state,
        &access,
        &caller,
        &req,
        payload,
        StreamName::default_stream(),
    )
    .await
}

/// Store a batch in a stream
///
/// The same as `POST /api/v1/batch/process`, into the named stream: the
/// batch takes the stream's next gap-free `batch_sequence`, its items must
/// satisfy the stream's JSON Schema when it has one, and the caller's API
/// key must be among the stream's `writers` when it names them.
/// Idempotency keys are the stream's own. The answer names the stream.
#[utoipa::path(
    tag = "batches",
    params(
        ("stream" = String, Path, pattern = "^[a-z0-9][a-z0-9-]{0,62}$", description = "The stream's name."),
        (
            "Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "As for `POST /api/v1/batch/process`, within the stream."
        ),
        ("traceparent" = Option<String>, Header, description = "W3C trace context."),
    ),
    request_body(
        description = "The batch, in any of the forms `POST /api/v1/batch/process` takes.",
        content(
            (BatchBody = "application/json"),
            (RequestList = "application/x-ndjson"),
            (CsvRows = "text/csv"),
        )
    ),
    responses(
        (status = 201, description = "Stored (or replayed for its Idempotency-Key).", body = BatchAccepted,
            headers(
                ("Location" = String, description = "The batch's status."),
                ("Idempotent-Replayed" = String, description = "`true` when this answer is a replay."),
                ("traceparent" = String, description = "The writer's span in the request's trace."),
            )),
        (status = 400, description = "`invalid_stream_name`, `invalid_json`, `invalid_csv`, `invalid_idempotency_key`, `invalid_body`.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`.", body = ProblemDocument, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer realm=\"batch-outbox\"`"))),
        (status = 403, description = "`stream_forbidden`: the stream names its writers and this API key (or a caller without one) is not among them.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "`stream_not_found`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 408, description = "`body_timeout`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 410, description = "`batch_expired`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "`batch_too_large`, `item_too_large`, `body_too_complex`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`, `unsupported_charset`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "`schema_violation` (`index`, `pointer`: JSON Pointer into the item, `schema_pointer`), and the codes of `POST /api/v1/batch/process`.",
            body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`.", body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds until the budget allows this batch."))),
        (status = 431, description = "`headers_too_large`.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "`store_unavailable`, `writer_busy`, `schema_unavailable` (the stored schema does not compile), `outcome_unknown`, `claim_check_unavailable` (the stream's claim-check store did not take its large items; nothing stored).", body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    ),
    security((), ("api_key" = []))
)]
#[post("/api/v1/streams/{stream}/batches")]
pub(crate) async fn stream_batches(
    caller: Caller,
    state: web::Data<AppState>,
    access: web::Data<Access>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, Problem> {
    let stream = match path.parse::<StreamName>() {
        Ok(stream) => stream,
        Err(e) => {
            return Err(counted(Problem::bad_request(
                "invalid_stream_name",
                e.to_string(),
            )));
        }
    };
    ingest_into(&state, &access, &caller, &req, payload, stream).await
}

pub(crate) async fn ingest_into(
    state: &AppState,
    access: &Access,
    caller: &Caller,
    req: &HttpRequest,
    payload: web::Payload,
    stream: StreamName,
) -> Result<HttpResponse, Problem> {
    let span = info_span!("ingest", stream = %stream, trace_id = tracing::field::Empty);
    let traceparent = TraceParent::for_span(
        &span,
        req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()),
    );
    span.record("trace_id", traceparent.trace_id.as_str());
    let mut response = process(state, access, caller, req, payload, &traceparent, &stream)
        .instrument(span)
        .await
        .map_err(counted)?;
    if let Ok(value) = header::HeaderValue::from_str(&traceparent.to_string()) {
        response
            .headers_mut()
            .insert(header::HeaderName::from_static(TRACEPARENT), value);
    }
    Ok(response)
}

pub(crate) async fn process(
    state: &AppState,
    access: &Access,
    caller: &Caller,
    req: &HttpRequest,
    payload: web::Payload,
    traceparent: &TraceParent,
    stream_name: &StreamName,
) -> Result<HttpResponse, Problem> {
    let submitted_by = access.name(caller).to_owned();
    let format = body_format(req)?;
    let key = idempotency_key(req)?;
    // The definition first: whether the stream has a claim-check store
    // decides how large a body it takes.
    let lookup_started = tokio::time::Instant::now();
    let lookup = lookup_started + state.request_deadline;
    let stream = tokio::time::timeout_at(lookup, state.catalog.get(stream_name))
        .await
        .map_err(|_| {
            store_problem(&StoreError::Unavailable(
                "the stream's definition could not be read within the request deadline".to_owned(),
            ))
        })?
        .map_err(|e| store_problem(&e))?;
    let Some(stream) = stream else {
        let names = tokio::time::timeout_at(lookup, state.catalog.names())
            .await
            .unwrap_or_default();
        return Err(Problem::not_found(
            "stream_not_found",
            outbox_core::stream::unknown_stream(stream_name, names.iter().map(String::as_str)),
        ));
    };
    let lookup_took = lookup_started.elapsed();
    let claim_check = state.claim_checks.rules_for(&stream.definition)?;
    let max_body_bytes = match claim_check {
        Some(_) => state.claim_checks.max_body_bytes(state.max_body_bytes),
        None => state.max_body_bytes,
    };
    let body = tokio::time::timeout(
        state.body_read_timeout,
        read_body(req, payload, max_body_bytes),
    )
    .await
    .map_err(|_| {
        Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                state.body_read_timeout.as_secs()
            ),
        )
    })??;
    let content = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&body);
    if content.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_body",
            "the request body is empty: send a JSON array of objects, one JSON object per line (NDJSON), or CSV with a header row",
        ));
    }
    // A caller whose rate budget is spent is refused before its body is
    // parsed: one item now, the rest once the count is known.
    access.admit(caller, 1)?;
    if !state.schema_ready.load(Ordering::Acquire) {
        return Err(schema_not_ready());
    }
    // Everything the store does for this request fits in one deadline,
    // reading the stream's definition included (the body's upload, between
    // the two, is bounded on its own).
    let deadline = tokio::time::Instant::now() + state.request_deadline.saturating_sub(lookup_took);
    if let Some(error) = &stream.schema_error {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "schema_unavailable",
            format!("stream {stream_name}'s stored JSON Schema does not compile ({error}); an operator must define it again"),
        )
        .with_retry_after(30));
    }
    if !stream
        .definition
        .admits(access.required().then_some(submitted_by.as_str()))
    {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "stream_forbidden",
            format!("this API key may not write stream {stream_name}"),
        ));
    }
    // Keys are the caller's own when callers are told apart (API keys):
    // one client can neither claim another's key nor read its batch.
    let idempotency = key.map(|key| Idempotency {
        key: if access.required() {
            format!("{submitted_by}/{key}")
        } else {
            key
        },
        request_hash: ingest::request_hash(&body),
    });
    if let Some(idem) = &idempotency
        && let Some(response) = replay(state.store.as_ref(), stream_name, idem, deadline).await?
    {
        return Ok(response);
    }
    let rules = IngestRules {
        ordering: stream.definition.ordering.clone(),
        stream: stream_name.clone(),
        claim_check,
        ..state.rules.clone()
    };
    let schema = stream.schema.clone();
    let check = move |body: &[u8], rules: &IngestRules, idempotency| {
        let batch = parse_batch(body, format, rules, idempotency).map_err(ingest_problem)?;
        if let Some(schema) = &schema {
            schema
                .check(batch.items.iter().map(|i| &i.request_data))
                .map_err(schema_problem)?;
        }
        Ok::<_, Problem>(batch)
    };
    let _parse_permit = state.parse_budget.reserve(&body, format, deadline).await?;
    let batch = if body.len() > BLOCKING_PARSE_BYTES {
        web::block(move || check(&body, &rules, idempotency))
            .await
            .map_err(|_| Problem::internal())??
    } else {
        check(&body, &rules, idempotency)?
    };
    if batch.items.len() > 1 {
        access.admit(caller, batch.items.len() - 1)?;
    }
    let batch = NewBatch {
        submitted_by: access.required().then(|| submitted_by.clone()),
        traceparent: Some(traceparent.to_string()),
        ..batch
    };
    let span = info_span!("store_batch", batch_id = %batch.batch_id, items = batch.items.len());
    let batch_id = batch.batch_id.clone();
    let idempotency = batch.idempotency.clone();
    // Detached from the request: a client that disconnects drops this
    // handler, and must not cut the objects or the transaction off half-way,
    // nor leave pins behind. The task ends by itself at its deadlines.
    let task = tokio::spawn(
        store_with_objects(
            Arc::clone(&state.claim_checks),
            Arc::clone(&state.store),
            batch,
            deadline,
            state.request_deadline,
        )
        .instrument(span.clone()),
    );
    let stored = task.await.unwrap_or_else(|e| {
        Ok(Err(StoreError::Other(format!(
            "the store task failed: {e}"
        ))))
    })?;
    match stored {
        Ok(summary) => {
            metrics::counter!(BATCHES_ACCEPTED, "submitted_by" => submitted_by.clone())
                .increment(1);
            metrics::counter!(ITEMS_ACCEPTED, "submitted_by" => submitted_by)
                .increment(summary.total_items);
            span.in_scope(|| {
                info!(
                    message = "batch stored",
                    batch_sequence = summary.batch_sequence.0,
                    processing_time_ms = summary.processing_time_ms
                );
            });
            Ok(accepted_response(&summary, false))
        }
        Err(StoreError::DuplicateIdempotencyKey) => {
            // A concurrent request with the same key won: answer with its batch.
            // Not found by a majority read yet: its commit is not majority
            // committed; the client retries shortly.
            let idem = idempotency.as_ref().ok_or_else(Problem::internal)?;
            // A lookup of its own: a large (staged) batch may have spent
            // the request's deadline before it lost the race.
            let lookup = tokio::time::Instant::now() + state.request_deadline;
            replay(state.store.as_ref(), stream_name, idem, lookup)
                .await?
                .ok_or_else(Problem::store_unavailable)
        }
        Err(e @ StoreError::OutcomeUnknown(_)) => {
            Err(span.in_scope(|| store_problem(&e).with("batch_id", batch_id.as_str())))
        }
        Err(e) => Err(span.in_scope(|| store_problem(&e))),
    }
}

/// Puts the batch's large payloads in their claim-check store, then stores
/// the batch: a batch is never visible before the objects it refers to. A
/// batch surely not stored gives its references back; one whose outcome is
/// unknown keeps them (its objects are kept, never lost).
async fn store_with_objects(
    claim_checks: Arc<ClaimChecks>,
    store: Arc<dyn BatchStore>,
    mut batch: NewBatch,
    deadline: tokio::time::Instant,
    request_deadline: std::time::Duration,
) -> Result<Result<BatchSummary, StoreError>, Problem> {
    let pinned = claim_checks
        .store_payloads(&mut batch)
        .instrument(info_span!("claim_check"))
        .await?;
    // The objects may have taken a while: the store gets its own deadline.
    let deadline = if pinned.is_empty() {
        deadline
    } else {
        deadline.max(tokio::time::Instant::now() + request_deadline)
    };
    let stored = store.insert_batch(&batch, deadline).await;
    if matches!(&stored, Err(e) if !matches!(e, StoreError::OutcomeUnknown(_))) {
        claim_checks.unpin(pinned).await;
    }
    Ok(stored)
}
