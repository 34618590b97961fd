//! The writer's metric names. Labels are bounded: route patterns, status
//! codes and error codes, never ids.

pub const BATCHES_ACCEPTED: &str = "outbox_writer_batches_accepted_total";
pub const ITEMS_ACCEPTED: &str = "outbox_writer_items_accepted_total";
pub const IDEMPOTENT_REPLAYS: &str = "outbox_writer_idempotent_replays_total";
pub const REQUEST_DURATION: &str = "outbox_writer_request_duration_seconds";
pub const ERRORS: &str = "outbox_writer_errors_total";
/// Incremented by the MongoDB adapter on each retried transaction.
pub const TRANSACTION_RETRIES: &str = "outbox_writer_transaction_retries_total";

/// Registers descriptions so `/metrics` documents itself.
pub fn describe() {
    metrics::describe_counter!(BATCHES_ACCEPTED, "Batches stored");
    metrics::describe_counter!(ITEMS_ACCEPTED, "Items stored");
    metrics::describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Requests answered from an idempotency key"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "HTTP request duration"
    );
    metrics::describe_counter!(ERRORS, "Error responses by code");
    metrics::describe_counter!(
        TRANSACTION_RETRIES,
        "Batch transactions retried after a conflict"
    );
}
