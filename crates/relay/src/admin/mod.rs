//! The admin HTTP port: the cluster and its streams, their status, pause
//! and resume, inspection, retry, health and metrics.
//!
//! - [`streams`]: `/api/v1/streams` (define, list, each stream's status and
//!   control) and `/api/v1/cluster`;
//! - [`outbox`]: `/api/v1/outbox/...`, what it meant before streams: the
//!   default stream;
//! - [`batches`]: a batch's status, items and retry, by id;
//! - [`replays`]: `/api/v1/outbox/replays`, replay jobs;
//! - [`views`]: the answers' shapes, for the OpenAPI document.

pub mod batches;
pub mod outbox;
pub mod replays;
pub mod streams;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, ResponseError, get};
use metrics_exporter_prometheus::PrometheusHandle;
use outbox_core::model::{BatchId, InvalidBatchId};
use outbox_core::store::StoreError;
use outbox_core::stream::StreamName;
use outbox_service::problem::Problem;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{error, warn};

use crate::cluster::Cluster;

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest stream definition taken (a schema can be long).
const MAX_DEFINITION_BYTES: usize = 1024 * 1024;

pub struct AdminState {
    pub cluster: Arc<Cluster>,
    /// Where replays may publish.
    pub topics: Arc<Topics>,
    /// `None` only with `--admin-insecure-no-token`.
    pub admin_token: Option<AdminToken>,
    pub prometheus: PrometheusHandle,
}

/// Checks the topic a replay names before the job is stored, and creates it
/// where the relay creates topics (`PUBSUB_CREATE_TOPIC`, as dev-up runs
/// it). Without a Pub/Sub configuration (tests over fakes) every topic is
/// taken as there.
#[derive(Default)]
pub struct Topics {
    pubsub: std::sync::OnceLock<(crate::pubsub::PubSubConfig, bool)>,
}

impl Topics {
    /// Uses `config`'s Pub/Sub; `create` makes a missing topic.
    pub fn set(&self, config: crate::pubsub::PubSubConfig, create: bool) {
        let _ = self.pubsub.set((config, create));
    }

    /// `Ok` when `topic` exists (or was made, or Pub/Sub does not say).
    ///
    /// # Errors
    /// 422 `topic_not_found`, saying how to create it.
    pub async fn check(&self, topic: &str) -> Result<(), Problem> {
        use crate::pubsub::{TopicState, ensure_topic, topic_state};
        let Some((config, create)) = self.pubsub.get() else {
            return Ok(());
        };
        let config = config.for_topic(topic);
        match topic_state(&config).await {
            TopicState::Exists => Ok(()),
            TopicState::Missing if *create => ensure_topic(&config).await.map_err(|e| {
                warn!(message = "cannot create the replay's topic", %e);
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "pubsub_unavailable", e.to_string())
                    .with_retry_after(5)
            }),
            TopicState::Missing => Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "topic_not_found",
                format!(
                    "topic {} does not exist: create it first (`gcloud pubsub topics create {topic} --project {}`), or run the relays with PUBSUB_CREATE_TOPIC",
                    config.topic_path(),
                    config.project_id
                ),
            )
            .with("topic", topic)),
            TopicState::Unknown(reason) => {
                // The replay's publishes will say, and fail the job.
                warn!(message = "cannot tell whether the replay's topic exists; starting anyway", %topic, %reason);
                Ok(())
            }
        }
    }
}

/// Definitions of streams in the body of a PUT: problem+json on bad JSON.
pub fn json_config() -> actix_web::web::JsonConfig {
    outbox_service::problem::json_config(MAX_DEFINITION_BYTES)
}

/// Registers every route; the OpenAPI document is collected from these
/// registrations, so it lists exactly the routes the port serves.
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(outbox::status)
        .service(outbox::history)
        .service(outbox::start)
        .service(outbox::stop)
        .service(outbox::pending_batches)
        .service(batches::batch_status)
        .service(batches::batch_items)
        .service(batches::retry_batch)
        .service(streams::cluster)
        .service(streams::list)
        .service(streams::show)
        .service(streams::put)
        .service(streams::status)
        .service(streams::history)
        .service(streams::pause)
        .service(streams::resume)
        .service(streams::pending_batches)
        .service(batches::stream_batch_status)
        .service(batches::stream_batch_items)
        .service(batches::stream_retry_batch)
        .service(replays::start)
        .service(replays::list)
        .service(replays::show)
        .service(replays::pause)
        .service(replays::resume)
        .service(replays::cancel)
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
        description = "Each relay replica's admin port. The cluster runs streams: independent, \
            strictly ordered outboxes, each with its own sequence, lease, topic and pause; \
            `/api/v1/streams` defines them and shows each one's leader and state, and every \
            stream's status, pause, resume, pending batches, batches, items and retry live \
            under `/api/v1/streams/{stream}/`. The `/api/v1/outbox/` endpoints are the \
            `default` stream's, as before streams existed. Any replica answers for every \
            stream. Every `/api` request, GET included, needs `Authorization: Bearer \
            <ADMIN_TOKEN>`; health, metrics and this document do not. A relay runs without \
            a token only when started with `--admin-insecure-no-token`. Errors are `application/problem+json` with a stable `code`.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "streams", description = "Streams: define, list, status and control"),
        (name = "outbox", description = "The default stream, as before streams"),
        (name = "batches", description = "Pending and failed batches"),
        (name = "replays", description = "Replay jobs: a range of committed batches published again, in order"),
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

pub(crate) fn store_problem(error: &StoreError) -> Problem {
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

pub(crate) fn parse_batch_id(raw: &str) -> Result<BatchId, Problem> {
    raw.parse()
        .map_err(|e: InvalidBatchId| Problem::bad_request("invalid_batch_id", e.to_string()))
}

pub(crate) fn parse_stream(raw: &str) -> Result<StreamName, Problem> {
    raw.parse()
        .map_err(|e: outbox_core::stream::InvalidStreamName| {
            Problem::bad_request("invalid_stream_name", e.to_string())
        })
}

/// The stream, when this cluster knows it: 404 `stream_not_found` otherwise.
pub(crate) fn known_stream(state: &AdminState, raw: &str) -> Result<StreamName, Problem> {
    let name = parse_stream(raw)?;
    if state.cluster.stream(&name).is_some() {
        Ok(name)
    } else {
        let known: Vec<String> = state
            .cluster
            .streams()
            .iter()
            .map(|view| view.definition.name.to_string())
            .collect();
        Err(Problem::not_found(
            "stream_not_found",
            outbox_core::stream::unknown_stream(&name, known.iter().map(String::as_str)),
        ))
    }
}

/// The admin token as the relay keeps it: its SHA-256 digest, compared in
/// constant time with the digest of what a request presents, so neither the
/// token's bytes nor its length leak through timing.
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// The least length of an `ADMIN_TOKEN` (e.g. `openssl rand -hex 32`).
    pub const MIN_LEN: usize = 32;

    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// What replicas announce of their token so that a replica with
    /// another one (or none) can be flagged: the first 12 hex digits of the
    /// SHA-256 of a domain tag and the token's digest. The token itself
    /// is never stored or shown.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"batch-outbox admin token fingerprint\0");
        hasher.update(self.digest);
        hex::encode(&hasher.finalize()[..6])
    }

    fn admits(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(self.digest.ct_eq(&presented))
    }
}

/// Paths that answer without the token: health, metrics, the API's
/// description, and the dashboard's page and assets (which hold no data;
/// the page asks for the token). Compared with the path exactly as sent:
/// any other spelling, percent-encoded or not, needs the token (fail
/// closed), and every `/api` route, present and future, is behind it.
fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/" | "/dashboard.js"
            | "/dashboard.css"
            | "/health/live"
            | "/health/ready"
            | "/metrics"
            | "/openapi.json"
            | "/docs"
    ) || path.starts_with("/docs/")
}

/// Middleware (`actix_web::middleware::from_fn`) in front of every route.
///
/// - With a token: every request but [`is_open`]'s needs `Authorization:
///   Bearer <ADMIN_TOKEN>`, GET included (the API shows request ids,
///   vendor names, schemas, hosts and errors).
/// - Without one (only with `--admin-insecure-no-token`): a request that
///   changes something is refused when a browser says it comes from
///   another site (`Origin` or `Sec-Fetch-Site`), so that no web page can
///   pause a stream through an operator's browser.
///
/// # Errors
/// What the next service returns.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<actix_web::web::Data<AdminState>>().cloned();
    let refusal = match state.as_deref().map(|s| s.admin_token.as_ref()) {
        // Fail closed when the state is missing.
        None => Some(Problem::internal()),
        Some(_) if is_open(req.path()) => None,
        Some(Some(token)) => {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, token) = v.trim().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                });
            match presented {
                Some(presented) if token.admits(presented) => None,
                _ => Some(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this relay's admin API needs its token: send Authorization: Bearer <ADMIN_TOKEN>",
                )),
            }
        }
        Some(None) => (!req.method().is_safe())
            .then(|| cross_site(req.request()))
            .flatten(),
    };
    match refusal {
        None => Ok(next.call(req).await?.map_into_boxed_body()),
        Some(problem) => {
            let mut response = problem.error_response();
            if problem.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"batch-outbox admin\""),
                );
            }
            Ok(req.into_response(response))
        }
    }
}

/// A browser's request from another site: `Sec-Fetch-Site: cross-site`, or
/// an `Origin` whose host is not the one the request was sent to.
fn cross_site(req: &HttpRequest) -> Option<Problem> {
    let headers = req.headers();
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(|origin| origin.split_once("://").map_or(origin, |(_, rest)| rest));
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let foreign = fetch_site.eq_ignore_ascii_case("cross-site")
        || origin_host.is_some_and(|origin| Some(origin) != host);
    foreign.then(|| {
        Problem::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "a request from another site may not change this relay (it has no ADMIN_TOKEN)",
        )
    })
}

/// Marks every `/api` operation of the served document as needing the
/// token, as [`guard`] does.
pub fn require_token_in(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityRequirement;
    for (path, item) in &mut api.paths.paths {
        if !path.starts_with("/api/") {
            continue;
        }
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            operation.security = Some(vec![SecurityRequirement::new(
                "admin_token",
                Vec::<String>::new(),
            )]);
            let responses = &mut operation.responses.responses;
            if !responses.contains_key("401") {
                responses.insert(
                    "401".to_owned(),
                    utoipa::openapi::RefOr::T(
                        utoipa::openapi::ResponseBuilder::new()
                            .description("`unauthorized`: the admin token is missing or wrong.")
                            .content(
                                "application/problem+json",
                                utoipa::openapi::ContentBuilder::new()
                                    .schema(Some(utoipa::openapi::Ref::from_schema_name(
                                        "ProblemDocument",
                                    )))
                                    .build(),
                            )
                            .build(),
                    ),
                );
            }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct Page {
    limit: Option<u32>,
    cursor: Option<String>,
}

impl Page {
    pub(crate) fn limit(&self) -> Result<u32, Problem> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(Problem::bad_request(
                "invalid_limit",
                format!("limit must be 1 to {MAX_LIMIT}"),
            )),
        }
    }

    pub(crate) fn cursor(&self) -> Result<Option<u64>, Problem> {
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

/// Liveness
#[utoipa::path(tag = "operations", responses((status = 200, description = "Alive.", body = views::HealthView)))]
#[get("/health/live")]
async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Readiness
///
/// 200 when MongoDB answers.
#[utoipa::path(tag = "operations", responses(
    (status = 200, description = "Ready.", body = views::HealthView),
    (status = 503, description = "Not ready, with the reason.", body = views::HealthView,
        headers(("Retry-After" = u32, description = "Seconds to wait."))),
))]
#[get("/health/ready")]
async fn ready(state: actix_web::web::Data<AdminState>) -> HttpResponse {
    let store = &state.cluster.stores().outbox;
    match tokio::time::timeout(READY_TIMEOUT, store.paused(&StreamName::default_stream())).await {
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
async fn render_metrics(state: actix_web::web::Data<AdminState>) -> HttpResponse {
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
