//! `application/problem+json` (RFC 9457) errors with a stable `code`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An error as the client sees it. The cause chain goes to the log, not here.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// Stable, machine-readable: clients branch on it.
    pub code: &'static str,
    /// Human-readable detail for this occurrence.
    pub detail: String,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u32>,
    /// Extra members, such as the index of a bad item. Boxed: problems
    /// travel in `Result`s and should stay small.
    pub extra: Box<serde_json::Map<String, serde_json::Value>>,
}

/// The problem+json document as the OpenAPI descriptions show it (the
/// response itself is written by [`Problem::error_response`]).
#[derive(utoipa::ToSchema)]
#[schema(
    title = "Problem",
    description = "RFC 9457 problem details, with a stable machine-readable `code`. \
                   Some problems add members: `index` (the item at fault), `path` (a JSON \
                   Pointer into it), `line` (the CSV line), `max_items`, `max_body_bytes`, \
                   `batch_id` (with `outcome_unknown`)."
)]
#[allow(dead_code)] // read by the OpenAPI derive only
pub struct ProblemDocument {
    /// `urn:batch-outbox:problem:<code>`.
    #[schema(example = "urn:batch-outbox:problem:invalid_json")]
    r#type: String,
    /// The HTTP status's reason phrase.
    #[schema(example = "Bad Request")]
    title: String,
    #[schema(example = 400)]
    status: u16,
    /// Stable: clients branch on it. Each operation lists the codes it answers.
    #[schema(example = "invalid_json")]
    code: String,
    /// What went wrong this time, for a person.
    detail: String,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            extra: Box::default(),
        }
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// The store cannot be reached: 503 with `Retry-After`.
    pub fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "MongoDB is unavailable; retry later",
        )
        .with_retry_after(2)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; see the service log",
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let body = Body {
            kind: format!("urn:batch-outbox:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            code: self.code,
            detail: &self.detail,
            extra: &self.extra,
        };
        let mut response = HttpResponse::build(self.status);
        response.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        response.body(serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// The largest total of request header names and values either service
/// takes (the HTTP layer itself allows much more).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Middleware (`actix_web::middleware::from_fn`): refuses a request whose
/// headers add up to more than [`MAX_HEADER_BYTES`] with 431
/// `headers_too_large`, before any handler reads it.
///
/// # Errors
/// What the next service returns.
pub async fn limit_headers(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > MAX_HEADER_BYTES {
        let problem = Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers are {bytes} bytes, over the limit of {MAX_HEADER_BYTES}"),
        );
        return Ok(req.into_response(problem.error_response()));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// Query strings that do not parse are a problem+json 400 `invalid_query`.
pub fn query_config() -> actix_web::web::QueryConfig {
    actix_web::web::QueryConfig::default().error_handler(|error, _| {
        Problem::bad_request("invalid_query", format!("invalid query string: {error}")).into()
    })
}

/// JSON bodies that do not parse, or are over `limit` bytes, are a
/// problem+json 400 `invalid_json` (413 `body_too_large`).
pub fn json_config(limit: usize) -> actix_web::web::JsonConfig {
    actix_web::web::JsonConfig::default()
        .limit(limit)
        .error_handler(|error, _| {
            use actix_web::error::JsonPayloadError;
            match error {
                JsonPayloadError::Overflow { limit }
                | JsonPayloadError::OverflowKnownLength { limit, .. } => Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body is over {limit} bytes"),
                )
                .into(),
                JsonPayloadError::ContentType => Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send application/json",
                )
                .into(),
                other => Problem::bad_request(
                    "invalid_json",
                    format!("the body is not the JSON expected: {other}"),
                )
                .into(),
            }
        })
}

/// The methods each route pattern answers, from a service's OpenAPI
/// document, so that a request with another method gets 405 with `Allow`.
#[derive(Debug, Default, Clone)]
pub struct AllowedMethods(std::collections::HashMap<String, String>);

impl From<&utoipa::openapi::OpenApi> for AllowedMethods {
    fn from(api: &utoipa::openapi::OpenApi) -> Self {
        let methods = api
            .paths
            .paths
            .iter()
            .map(|(pattern, item)| {
                let names: Vec<&str> = [
                    ("GET", item.get.is_some()),
                    ("POST", item.post.is_some()),
                    ("PUT", item.put.is_some()),
                    ("PATCH", item.patch.is_some()),
                    ("DELETE", item.delete.is_some()),
                ]
                .into_iter()
                .filter_map(|(name, present)| present.then_some(name))
                .collect();
                (pattern.clone(), names.join(", "))
            })
            .collect();
        Self(methods)
    }
}

/// The answer for a request no route took: 405 `method_not_allowed` (with
/// `Allow`) when its path is served with other methods, else 404
/// `route_not_found`.
pub fn no_route(req: &actix_web::HttpRequest) -> (Problem, Option<String>) {
    let allowed = req
        .app_data::<actix_web::web::Data<AllowedMethods>>()
        .and_then(|methods| {
            let pattern = req.resource_map().match_pattern(req.path())?;
            methods.0.get(&pattern).cloned()
        });
    match allowed {
        Some(allow) => (
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!(
                    "{} {} is not served; allowed: {allow}",
                    req.method(),
                    req.path()
                ),
            ),
            Some(allow),
        ),
        None => (
            Problem::not_found(
                "route_not_found",
                format!("no route for {} {}", req.method(), req.path()),
            ),
            None,
        ),
    }
}

/// Renders [`no_route`]'s answer.
pub fn no_route_response(problem: &Problem, allow: Option<String>) -> HttpResponse {
    let mut response = problem.error_response();
    if let Some(value) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}
