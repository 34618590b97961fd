//! The relay's metric names. Labels are bounded (error kinds, and the
//! stream, at most `MAX_STREAMS` values), never ids.

pub const PUBLISHED: &str = "outbox_relay_published_total";
pub const PUBLISH_LATENCY: &str = "outbox_relay_publish_latency_seconds";
pub const PUBLISH_ERRORS: &str = "outbox_relay_publish_errors_total";
pub const STORE_ERRORS: &str = "outbox_relay_store_errors_total";
pub const BATCHES_COMMITTED: &str = "outbox_relay_batches_committed_total";
pub const DEAD_LETTERED: &str = "outbox_relay_items_dead_lettered_total";
pub const PENDING_BATCHES: &str = "outbox_relay_pending_batches";
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
pub const END_TO_END_LATENCY: &str = "outbox_relay_end_to_end_latency_seconds";
pub const IS_LEADER: &str = "outbox_relay_is_leader";
pub const LEASE_EPOCH: &str = "outbox_relay_lease_epoch";
pub const HALTED: &str = "outbox_relay_halted";
pub const PAUSED: &str = "outbox_relay_paused";
pub const RETENTION_REMOVED_BATCHES: &str = "outbox_relay_retention_removed_batches_total";
pub const RETENTION_REMOVED_ITEMS: &str = "outbox_relay_retention_removed_items_total";
pub const RETENTION_REMOVED_OBJECTS: &str = "outbox_relay_retention_removed_objects_total";
pub const RETENTION_REMOVED_DEAD_LETTERS: &str =
    "outbox_relay_retention_removed_dead_letters_total";

pub const SEQUENCE_GAPS: &str = "outbox_relay_sequence_gaps_total";
pub const REPLAYED: &str = "outbox_relay_replayed_total";
pub const ADMIN_TOKEN_MISMATCHES: &str = "outbox_relay_admin_token_mismatches";
pub const ADMIN_OPEN: &str = "outbox_relay_admin_open";
pub const DUPLICATE_NAMES: &str = "outbox_relay_duplicate_names";
/// Microseconds a stream's drain loop spent waiting, by `phase`: `read` (the
/// next group from MongoDB, when the read-ahead had not finished),
/// `publish` (Pub/Sub's answers for a group), `write` (room among the
/// writes in flight, when MongoDB falls behind). The rest of its time is
/// its own work. A profile of where a drain's time goes.
pub const DRAIN_WAIT: &str = "outbox_relay_drain_wait_microseconds_total";

pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PUBLISHED, "Items acknowledged by Pub/Sub and marked sent");
    describe_counter!(
        DRAIN_WAIT,
        Unit::Microseconds,
        "Microseconds the drain loop waited, by phase (read, publish, write)"
    );
    describe_counter!(REPLAYED, "Copies published by replay jobs and acknowledged");
    describe_histogram!(
        PUBLISH_LATENCY,
        Unit::Seconds,
        "Time from publish to Pub/Sub acknowledgement"
    );
    describe_counter!(
        PUBLISH_ERRORS,
        "Failed publishes by kind (transient, permanent)"
    );
    describe_counter!(STORE_ERRORS, "Failed MongoDB operations by kind");
    describe_counter!(
        SEQUENCE_GAPS,
        "Passes ended because what comes next was not readable: a batch after a gap in batch_sequence (kind=batch) or a missing item (kind=item)"
    );
    describe_counter!(
        RETENTION_REMOVED_BATCHES,
        "Committed batches removed by retention"
    );
    describe_counter!(RETENTION_REMOVED_ITEMS, "Items removed by retention");
    describe_counter!(
        RETENTION_REMOVED_OBJECTS,
        "Claim-check objects deleted by retention (no retained item referred to them)"
    );
    describe_counter!(
        RETENTION_REMOVED_DEAD_LETTERS,
        "Dead letters removed by retention"
    );
    describe_counter!(BATCHES_COMMITTED, "Batches whose items were all published");
    describe_counter!(
        DEAD_LETTERED,
        "Items set aside after a permanent publish failure"
    );
    describe_gauge!(PENDING_BATCHES, "Batches not yet committed");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest uncommitted batch"
    );
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "Writer commit to acknowledgement of the batch's last item"
    );
    describe_gauge!(IS_LEADER, "1 while this replica holds the stream's lease");
    describe_gauge!(
        LEASE_EPOCH,
        "Fencing epoch of the stream's lease this replica holds"
    );
    describe_gauge!(HALTED, "1 while the stream is halted on a failed batch");
    describe_gauge!(PAUSED, "1 while the stream is paused (on every replica)");
    describe_gauge!(
        ADMIN_TOKEN_MISMATCHES,
        "Live replicas whose admin token differs from this one's or that have none"
    );
    describe_gauge!(
        DUPLICATE_NAMES,
        "RELAY_IDs that two or more live relay processes share"
    );
    describe_gauge!(
        ADMIN_OPEN,
        "1 when this replica's admin API has no token (--admin-insecure-no-token)"
    );
}
