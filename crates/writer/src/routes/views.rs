//! The answers' and bodies' shapes, for the OpenAPI document.

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
