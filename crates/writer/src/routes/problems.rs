//! The problem+json answers for ingest, schema and store errors.

use actix_web::http::StatusCode;
use outbox_core::ingest::{CsvError, IngestError};
use outbox_core::store::StoreError;
use outbox_core::stream::SchemaViolation;
use outbox_service::problem::Problem;
use tracing::{error, warn};

pub(crate) fn ingest_problem(error: IngestError) -> Problem {
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
        IngestError::ItemOverLimit { index, max, .. } => {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "item_too_large", detail)
                .with("index", index)
                .with("max_item_bytes", max)
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

pub(crate) fn schema_problem(violation: SchemaViolation) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "schema_violation",
        violation.to_string(),
    )
    .with("index", violation.index)
    .with("pointer", violation.pointer)
    .with("schema_pointer", violation.schema_pointer)
}

pub(crate) fn store_problem(error: &StoreError) -> Problem {
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
pub(crate) fn schema_not_ready() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the writer is still preparing MongoDB (indexes, sequence counter); retry shortly",
    )
    .with_retry_after(1)
}
