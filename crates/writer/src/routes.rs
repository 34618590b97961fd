//! HTTP handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, ContentType};
use actix_web::{HttpRequest, HttpResponse, get, post, web};
use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::ingest::{self, BodyFormat, CsvError, IngestError, IngestRules};
use outbox_core::model::{BatchId, BatchSummary, Idempotency, NewBatch};
use outbox_core::store::{BatchStore, StoreError};
use outbox_core::stream::{SchemaViolation, StreamName};
use outbox_service::problem::{Problem, ProblemDocument};
use outbox_service::trace_context::{TRACEPARENT, TraceParent};
use serde_json::json;
use tracing::{Instrument, error, info, info_span, warn};

use crate::auth::{Access, Caller};
use crate::metrics::{BATCHES_ACCEPTED, ERRORS, IDEMPOTENT_REPLAYS, ITEMS_ACCEPTED};

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
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Problem> {
        let cost = ingest::parse_cost(body);
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
fn counted(problem: Problem) -> Problem {
    metrics::counter!(ERRORS, "code" => problem.code).increment(1);
    problem
}

fn ingest_problem(error: IngestError) -> Problem {
    let detail = error.to_string();
    match error {
        IngestError::InvalidJson(_) => Problem::bad_request("invalid_json", detail),
        IngestError::DuplicateKey(_) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "duplicate_key", detail)
        }
        IngestError::InvalidKey(_) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_key", detail)
        }
        IngestError::InvalidBatch(_) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_batch", detail)
        }
        IngestError::ItemNotObject { index, .. } => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "item_not_object", detail)
                .with("index", index)
        }
        IngestError::EmptyBatch => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "empty_batch", detail)
        }
        IngestError::TooManyItems { max, .. } => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", detail)
                .with("max_items", max)
        }
        IngestError::ItemTooLarge { index, max, .. } => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "item_too_large", detail)
                .with("index", index)
                .with("max_message_bytes", max)
        }
        IngestError::AttributeTooLong {
            index, field, max, ..
        } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "attribute_too_long",
            detail,
        )
        .with("index", index)
        .with("field", field)
        .with("max_bytes", max),
        IngestError::InvalidIdempotencyKey => {
            Problem::bad_request("invalid_idempotency_key", detail)
        }
        IngestError::Csv(error) => {
            let problem = match error {
                CsvError::Malformed { .. } => Problem::bad_request("invalid_csv", detail),
                CsvError::Quote { .. } => {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "csv_quote", detail)
                }
                CsvError::Empty => {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "csv_empty", detail)
                }
                CsvError::NoRows => {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "csv_no_rows", detail)
                }
                CsvError::TooManyRows => {
                    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", detail)
                }
                CsvError::EmptyHeader { .. }
                | CsvError::DuplicateHeader { .. }
                | CsvError::InvalidHeader { .. } => {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "csv_header", detail)
                }
                CsvError::FieldCount { .. } => {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "csv_field_count", detail)
                }
            };
            match error.line() {
                Some(line) => problem.with("line", line),
                None => problem,
            }
        }
    }
}

fn schema_problem(violation: SchemaViolation) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "schema_violation",
        violation.to_string(),
    )
    .with("index", violation.index)
    .with("pointer", violation.pointer)
    .with("schema_pointer", violation.schema_pointer)
}

fn store_problem(error: &StoreError) -> Problem {
    match error {
        StoreError::Unavailable(_) | StoreError::Conflict(_) => {
            warn!(message = "store unavailable", %error);
            Problem::store_unavailable()
        }
        StoreError::OutcomeUnknown(_) => {
            warn!(message = "commit outcome unknown", %error);
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                "MongoDB went away while the batch was committing: it may or may not be stored. \
                 Look it up by batch_id, or send the request again with the same Idempotency-Key",
            )
            .with_retry_after(2)
        }
        StoreError::ItemTooLarge {
            index,
            bytes,
            limit,
        } => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "item_too_large",
            format!("item {index} is {bytes} bytes once stored, over MongoDB's limit of {limit} bytes per item"),
        )
        .with("index", *index),
        _ => {
            error!(message = "store error", %error);
            Problem::internal()
        }
    }
}

/// Before the schema exists a POST cannot be stored: 503, like readiness.
fn schema_not_ready() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the writer is still preparing MongoDB (indexes, sequence counter); retry shortly",
    )
    .with_retry_after(1)
}

fn body_format(req: &HttpRequest) -> Result<BodyFormat, Problem> {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
    };
    let text = value.to_str().unwrap_or_default().to_ascii_lowercase();
    let mut parts = text.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_owned();
    // JSON is UTF-8 (RFC 8259): a body declared in another charset would be
    // misread, so it is refused.
    if let Some(charset) = parts
        .filter_map(|p| p.trim().strip_prefix("charset="))
        .map(|c| c.trim_matches('"'))
        .find(|c| !matches!(*c, "utf-8" | "utf8"))
    {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_charset",
            format!("charset {charset:?} is not supported; send UTF-8"),
        ));
    }
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        e if e.starts_with("application/") && e.ends_with("+json") => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
            Ok(BodyFormat::NdJson)
        }
        "text/csv" | "application/csv" => Ok(BodyFormat::Csv),
        other => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {other:?} is not supported; send application/json, application/x-ndjson or text/csv"
            ),
        )),
    }
}

fn too_large(max: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch_too_large",
        format!("request body is larger than the limit of {max} bytes"),
    )
    .with("max_body_bytes", max)
}

async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
) -> Result<Vec<u8>, Problem> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large(max));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| Problem::bad_request("invalid_body", format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, Problem> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ingest_problem(IngestError::InvalidIdempotencyKey))?;
    ingest::validate_idempotency_key(key).map_err(ingest_problem)?;
    Ok(Some(key.to_owned()))
}

fn accepted_response(summary: &BatchSummary, replayed: bool) -> HttpResponse {
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
async fn replay(
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

fn parse_batch(
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
            bytes for `request_id` and `vendor_name`) and 16 MiB of BSON; a key twice in one \
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
            over MongoDB's 16 MiB; `body_too_complex`: parsing the body would take more memory \
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
            retry with the same Idempotency-Key.",
            body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    ),
    security((), ("api_key" = []))
)]
#[post("/api/v1/batch/process")]
async fn process_batch(
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
        (status = 503, description = "`store_unavailable`, `writer_busy`, `schema_unavailable` (the stored schema does not compile), `outcome_unknown`.", body = ProblemDocument, content_type = "application/problem+json",
            headers(("Retry-After" = u32, description = "Seconds to wait before retrying."))),
    ),
    security((), ("api_key" = []))
)]
#[post("/api/v1/streams/{stream}/batches")]
async fn stream_batches(
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

async fn ingest_into(
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

async fn process(
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
    let body = tokio::time::timeout(
        state.body_read_timeout,
        read_body(req, payload, state.max_body_bytes),
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
    // reading the stream's definition included.
    let deadline = tokio::time::Instant::now() + state.request_deadline;
    let stream = tokio::time::timeout_at(deadline, state.catalog.get(stream_name))
        .await
        .map_err(|_| {
            store_problem(&StoreError::Unavailable(
                "the stream's definition could not be read within the request deadline".to_owned(),
            ))
        })?
        .map_err(|e| store_problem(&e))?;
    let Some(stream) = stream else {
        let names = tokio::time::timeout_at(deadline, state.catalog.names())
            .await
            .unwrap_or_default();
        return Err(Problem::not_found(
            "stream_not_found",
            outbox_core::stream::unknown_stream(stream_name, names.iter().map(String::as_str)),
        ));
    };
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
    let _parse_permit = state.parse_budget.reserve(&body, deadline).await?;
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
    // Detached from the request: a client that disconnects drops this
    // handler, and must not cut the transaction off half-way. The task ends
    // by itself at the deadline.
    let batch = Arc::new(batch);
    let store = Arc::clone(&state.store);
    let task = {
        let batch = Arc::clone(&batch);
        tokio::spawn(
            async move { store.insert_batch(&batch, deadline).await }.instrument(span.clone()),
        )
    };
    let stored = task
        .await
        .unwrap_or_else(|e| Err(StoreError::Other(format!("the store task failed: {e}"))));
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
            let idem = batch.idempotency.as_ref().ok_or_else(Problem::internal)?;
            // A lookup of its own: a large (staged) batch may have spent
            // the request's deadline before it lost the race.
            let lookup = tokio::time::Instant::now() + state.request_deadline;
            replay(state.store.as_ref(), stream_name, idem, lookup)
                .await?
                .ok_or_else(Problem::store_unavailable)
        }
        Err(e @ StoreError::OutcomeUnknown(_)) => {
            Err(span.in_scope(|| store_problem(&e).with("batch_id", batch.batch_id.as_str())))
        }
        Err(e) => Err(span.in_scope(|| store_problem(&e))),
    }
}

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
async fn batch_status(
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

/// Liveness
///
/// 200 while the process serves HTTP; it does not look at MongoDB.
#[utoipa::path(tag = "operations", responses((status = 200, description = "Alive.", body = HealthView)))]
#[get("/health/live")]
async fn live() -> HttpResponse {
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
async fn ready(state: web::Data<AppState>) -> HttpResponse {
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
async fn render_metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(ContentType(mime_text_plain()))
        .body(state.prometheus.render())
}

fn mime_text_plain() -> actix_web::mime::Mime {
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

/// A request body in JSON: an array of request objects, or the same array
/// under `requests`.
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // describes the body for OpenAPI; ingest parses it
pub enum BatchBody {
    Objects(RequestList),
    Wrapped { requests: RequestList },
}

/// One or more request objects.
pub struct RequestList;

impl utoipa::PartialSchema for RequestList {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(<RequestObject as utoipa::PartialSchema>::schema())
            .min_items(Some(1))
            .into()
    }
}

impl utoipa::ToSchema for RequestList {}

/// A CSV body's content: rows of string cells under one header row.
pub struct CsvRows;

impl utoipa::PartialSchema for CsvRows {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
        let cell = ObjectBuilder::new().schema_type(Type::String);
        // A key a row lacks is an empty cell.
        let row = ObjectBuilder::new()
            .additional_properties(Some(cell))
            .description(Some(
                "One row: the header row names the keys, every cell is a string.",
            ));
        ArrayBuilder::new()
            .items(row)
            .min_items(Some(1))
            .description(Some(
                "The rows of a CSV file (RFC 4180) whose header row is the union of their keys.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for CsvRows {}

/// One request: any JSON object, stored and published exactly as sent.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct RequestObject(std::collections::BTreeMap<String, serde_json::Value>);

/// The answer to a stored batch.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct BatchAccepted {
    /// Always `success`.
    #[schema(example = "success")]
    pub status: &'static str,
    #[schema(example = "batch of 2 items stored")]
    pub message: String,
    pub data: AcceptedBatch,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct AcceptedBatch {
    /// 16 lowercase hex digits.
    #[schema(example = "4f1c2a9e0b7d3c58")]
    pub batch_id: String,
    /// The stream the batch is in (`default` for `/api/v1/batch/process`).
    #[schema(example = "default")]
    pub stream: String,
    /// Gap-free, in commit order; the relay publishes batches in this order.
    #[schema(example = 42)]
    pub batch_sequence: u64,
    /// When the batch was received (RFC 3339, UTC).
    pub timestamp: String,
    pub total_json_objects: u64,
    /// Items per vendor (`unknown` for items without a vendor).
    pub vendor_counts: std::collections::BTreeMap<String, u64>,
    pub unique_vendors: usize,
    /// Time spent storing the batch.
    pub processing_time_ms: u64,
    /// The name of the API key that submitted it; absent when the writer
    /// has no API keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
}

/// A batch's status and item counts.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct BatchStatusView {
    pub batch_id: String,
    /// The stream the batch is in.
    pub stream: String,
    pub batch_sequence: u64,
    /// `pending`, `processing`, `committed` or `failed`.
    #[schema(example = "committed")]
    pub status: &'static str,
    pub total: u64,
    /// Items acknowledged by Pub/Sub.
    pub sent: u64,
    /// Items set aside as dead letters.
    pub failed: u64,
    pub pending: u64,
    pub progress_percentage: f64,
    pub created_at: String,
    /// When the relay committed the batch (every item acknowledged).
    pub committed_at: Option<String>,
    pub last_error: Option<String>,
    /// The API key name that submitted the batch, when keys are required.
    pub submitted_by: Option<String>,
    /// The trace context stored with the batch.
    pub traceparent: Option<String>,
}

/// A health answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthView {
    /// `ok`, `ready` or `unavailable`.
    pub status: String,
    /// Why the service is not ready.
    pub reason: Option<String>,
}
