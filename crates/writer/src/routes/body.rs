//! Reading a request's body: its format, its size, its Idempotency-Key.

use super::IDEMPOTENCY_KEY;
use super::problems::ingest_problem;
use actix_web::http::StatusCode;
use actix_web::http::header::{self};
use actix_web::{HttpRequest, web};
use futures::StreamExt;
use outbox_core::ingest::{self, BodyFormat, IngestError};
use outbox_service::problem::Problem;

pub(crate) fn body_format(req: &HttpRequest) -> Result<BodyFormat, Problem> {
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

pub(crate) fn too_large(max: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "batch_too_large",
        format!("request body is larger than the limit of {max} bytes"),
    )
    .with("max_body_bytes", max)
}

pub(crate) async fn read_body(
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

pub(crate) fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, Problem> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ingest_problem(IngestError::InvalidIdempotencyKey))?;
    ingest::validate_idempotency_key(key).map_err(ingest_problem)?;
    Ok(Some(key.to_owned()))
}
