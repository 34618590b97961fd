//! Ids, sequence numbers, statuses and the shape of a batch.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::claim_check::StoredPayload;

/// A batch id: 16 lowercase hexadecimal characters (64 random bits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BatchId(String);

/// A string that is not a valid [`BatchId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("batch id must be 16 lowercase hexadecimal characters, got {0:?}")]
pub struct InvalidBatchId(pub String);

impl BatchId {
    pub const LEN: usize = 16;

    /// A new random id.
    pub fn random() -> Self {
        let value = crate::world::random_u64();
        Self(format!("{value:016x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BatchId {
    type Err = InvalidBatchId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = s.len() == Self::LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidBatchId(s.chars().take(64).collect()))
        }
    }
}

impl TryFrom<String> for BatchId {
    type Error = InvalidBatchId;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<BatchId> for String {
    fn from(id: BatchId) -> Self {
        id.0
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An item id: a UUID, the key consumers deduplicate on.
///
/// Derived from the batch id and the item's position ([`ItemId::of`]), so
/// the relay can name every item of a page and read them by primary key:
/// a read that costs the same whatever the size of the backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(pub Uuid);

/// The UUID namespace item ids are derived in (UUID version 5).
const ITEM_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_0b6e_4a8e_4c5b_9b2c_3e7a_1d2f_8a90);

impl ItemId {
    pub fn random() -> Self {
        Self(uuid::Builder::from_random_bytes(crate::world::random_bytes()).into_uuid())
    }

    /// The id of the item at `sequence` in `batch`: a name-based UUID
    /// (version 5) of `"{batch_id}/{sequence}"`. Batch ids are random, so
    /// item ids are unique across batches.
    pub fn of(batch: &BatchId, sequence: ItemSequence) -> Self {
        let name = format!("{batch}/{}", sequence.0);
        Self(Uuid::new_v5(&ITEM_ID_NAMESPACE, name.as_bytes()))
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A batch's position in the stream: gap-free, starting at 1, and equal to
/// the order in which batches committed.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Sequence(pub u64);

impl Sequence {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An item's position within its batch: 1..=n in request order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct ItemSequence(pub u32);

impl fmt::Display for ItemSequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a batch is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchStatus {
    /// Stored by the writer; the relay has not started it.
    Pending,
    /// The relay is publishing its items.
    Processing,
    /// Every item was acknowledged by Pub/Sub (or dead-lettered).
    Committed,
    /// Halted on an item Pub/Sub rejected for good; an operator retries it.
    Failed,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Committed => "committed",
            Self::Failed => "failed",
        }
    }
}

/// Where an item is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    Pending,
    Sent,
    Failed,
}

impl ItemStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }
}

/// Vendor name to number of items, sorted by name for stable output.
pub type VendorCounts = BTreeMap<String, u64>;

/// One item of a batch as validated, before it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct NewItem {
    pub item_id: ItemId,
    pub item_sequence: ItemSequence,
    /// The object's request id, kept as a string; `None` when absent.
    pub request_id: Option<String>,
    /// The object's vendor; [`crate::ingest::UNKNOWN_VENDOR`] when absent.
    pub vendor_name: String,
    /// The request object exactly as received; empty once it is `stored`.
    pub request_data: Map<String, Value>,
    /// Set when the payload goes to (or went to) a claim-check store: the
    /// message carries this reference in place of it.
    pub stored: Option<StoredPayload>,
}

/// A validated batch, ready for one atomic write. The store assigns the
/// [`Sequence`] inside the transaction that writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewBatch {
    pub batch_id: BatchId,
    /// The stream the batch belongs to (its sequence is the stream's).
    pub stream: StreamName,
    pub created_at: DateTime<Utc>,
    pub items: Vec<NewItem>,
    pub vendor_counts: VendorCounts,
    pub idempotency: Option<Idempotency>,
    /// The name of the API key that submitted the batch, when the writer
    /// requires keys.
    pub submitted_by: Option<String>,
    /// W3C trace context (`traceparent`) of the request that produced the
    /// batch; the relay puts it on every message of the batch.
    pub traceparent: Option<String>,
}

/// An idempotency key with the hash of the request body it was first used with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    /// SHA-256 of the request body, lowercase hex: the same key with another
    /// body is a client error, not a replay.
    pub request_hash: String,
}

/// What the writer reports about a stored batch; also what a replay returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub batch_id: BatchId,
    #[serde(default)]
    pub stream: StreamName,
    pub batch_sequence: Sequence,
    pub created_at: DateTime<Utc>,
    pub total_items: u64,
    pub vendor_counts: VendorCounts,
    pub processing_time_ms: u64,
    /// The name of the API key that submitted it (when the writer has keys).
    #[serde(default)]
    pub submitted_by: Option<String>,
}

/// Item counts of a batch by status, for status endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ItemCounts {
    pub total: u64,
    pub sent: u64,
    pub failed: u64,
    pub pending: u64,
}

impl ItemCounts {
    /// Share of items no longer pending, in percent, rounded to two decimals.
    pub fn progress_percentage(&self) -> f64 {
        if self.total == 0 {
            return 100.0;
        }
        let done = (self.sent + self.failed) as f64;
        (done * 10_000.0 / self.total as f64).round() / 100.0
    }
}

/// The client-facing state of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchProgress {
    pub batch_id: BatchId,
    pub stream: StreamName,
    pub batch_sequence: Sequence,
    pub status: BatchStatus,
    pub counts: ItemCounts,
    pub created_at: DateTime<Utc>,
    pub committed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub submitted_by: Option<String>,
    pub traceparent: Option<String>,
}

/// A stream's name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamName(String);

/// A string that is not a valid [`StreamName`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a stream name is 1 to 63 characters of lowercase letters, digits and '-', starting with a letter or digit; got {0:?}"
)]
pub struct InvalidStreamName(pub String);

impl StreamName {
    pub const DEFAULT: &'static str = "default";
    pub const MAX_LEN: usize = 63;

    /// The stream everything without a stream name means.
    pub fn default_stream() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for StreamName {
    fn default() -> Self {
        Self::default_stream()
    }
}

impl FromStr for StreamName {
    type Err = InvalidStreamName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= Self::MAX_LEN
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidStreamName(s.chars().take(80).collect()))
        }
    }
}

impl TryFrom<String> for StreamName {
    type Error = InvalidStreamName;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<StreamName> for String {
    fn from(name: StreamName) -> Self {
        name.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A batch the relay has still to finish.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingBatch {
    pub batch_id: BatchId,
    pub stream: StreamName,
    pub batch_sequence: Sequence,
    pub status: BatchStatus,
    pub total_items: u64,
    pub created_at: DateTime<Utc>,
    /// Why the batch is failed, when it is.
    pub last_error: Option<String>,
    /// The trace context the batch was submitted with, for its messages.
    pub traceparent: Option<String>,
}

/// An item as the relay publishes it.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxItem {
    pub item_id: ItemId,
    pub batch_id: BatchId,
    pub batch_sequence: Sequence,
    pub item_sequence: ItemSequence,
    pub request_id: Option<String>,
    pub vendor_name: String,
    /// The request object; empty when the payload is `stored`.
    pub request_data: Map<String, Value>,
    /// The reference published in place of a payload in a claim-check store.
    pub stored: Option<StoredPayload>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_are_derived_from_batch_and_position() {
        let batch = BatchId::random();
        let first = ItemId::of(&batch, ItemSequence(1));
        assert_eq!(first, ItemId::of(&batch, ItemSequence(1)));
        assert_ne!(first, ItemId::of(&batch, ItemSequence(2)));
        assert_ne!(first, ItemId::of(&BatchId::random(), ItemSequence(1)));
        assert_eq!(first.0.get_version_num(), 5);
    }

    #[test]
    fn random_batch_ids_parse_back() {
        for _ in 0..100 {
            let id = BatchId::random();
            assert_eq!(id.as_str().len(), 16);
            assert_eq!(id.as_str().parse::<BatchId>(), Ok(id.clone()));
        }
    }

    #[test]
    fn malformed_batch_ids_are_rejected() {
        for bad in [
            "",
            "abc",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "0123456789abcdef0",
        ] {
            assert!(bad.parse::<BatchId>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn progress_counts_sent_and_failed_as_done() {
        let counts = ItemCounts {
            total: 3,
            sent: 1,
            failed: 1,
            pending: 1,
        };
        assert_eq!(counts.progress_percentage(), 66.67);
        assert_eq!(ItemCounts::default().progress_percentage(), 100.0);
    }
}
