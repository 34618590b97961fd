//! What the relay sends to Pub/Sub, and the trait it sends it through.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use futures_core::future::BoxFuture;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::claim_check::StoredPayload;
use crate::model::{BatchId, ItemId, ItemSequence, OutboxItem, PendingBatch, Sequence, StreamName};

/// How messages are grouped for Pub/Sub's per-key ordering.
///
/// Whatever the mode, every item of batch N is acknowledged by Pub/Sub
/// before any item of batch N+1 is published.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum OrderingKeyMode {
    /// One key for the whole stream: a subscriber with message ordering
    /// receives everything in order. Pub/Sub caps one key at about 1 MB/s.
    #[default]
    Global,
    /// The batch id: order within a batch; batches are still published one
    /// after another, but a subscriber may see two batches interleave on
    /// redelivery.
    Batch,
    /// Each item's key is the value at a JSON pointer into its request
    /// object (`field:/vendor_name`, `field:/customer/id`); items without
    /// it (or with an object, array or null there) use `default_key`. Items
    /// of one key are delivered in order; many keys are in flight at once,
    /// so throughput grows with the number of distinct keys (about 1 MB/s
    /// per key on Pub/Sub).
    Field {
        pointer: String,
        default_key: String,
    },
    /// No key: no ordering promise from Pub/Sub at all.
    None,
}

/// Pub/Sub's published limits on one message
/// (<https://cloud.google.com/pubsub/quotas#resource_limits>). Google's
/// emulator enforces none of them, so the writer refuses an item whose
/// message would break one and the relay checks every message before it
/// hands it to the client: both behave the same on the emulator as on
/// Pub/Sub.
pub mod limits {
    /// A message: 10 MB. Counted here as data, attribute keys and values
    /// and the ordering key together, the most a one-message publish
    /// request may carry, less [`REQUEST_RESERVE_BYTES`].
    pub const MAX_MESSAGE_BYTES: usize = 10_000_000;
    /// Kept free under [`MAX_MESSAGE_BYTES`] for the request's own framing
    /// and topic name, and for the attributes a replay adds.
    pub const REQUEST_RESERVE_BYTES: usize = 1024;
    pub const MAX_ATTRIBUTES: usize = 100;
    pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
    pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
    pub const MAX_ORDERING_KEY_BYTES: usize = 1024;
}

pub use limits::MAX_ORDERING_KEY_BYTES;

/// Why Pub/Sub would refuse a message (it answers `INVALID_ARGUMENT`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitViolation {
    #[error(
        "the message would be {bytes} bytes, over Pub/Sub's limit of {limit} bytes (data, attributes and ordering key)"
    )]
    MessageTooLarge { bytes: usize, limit: usize },
    #[error(
        "attribute {name} would be {bytes} bytes, over Pub/Sub's limit of {limit} bytes for an attribute value"
    )]
    AttributeTooLong {
        name: String,
        bytes: usize,
        limit: usize,
    },
    #[error("attribute name {name:?} is over Pub/Sub's limit of {limit} bytes")]
    AttributeNameTooLong { name: String, limit: usize },
    #[error("{count} attributes, over Pub/Sub's limit of {limit}")]
    TooManyAttributes { count: usize, limit: usize },
    #[error("ordering key of {bytes} bytes, over Pub/Sub's limit of {limit}")]
    OrderingKeyTooLong { bytes: usize, limit: usize },
}

impl OrderingKeyMode {
    /// The key used for the whole stream in [`OrderingKeyMode::Global`],
    /// and the default key of [`OrderingKeyMode::Field`].
    pub const GLOBAL_KEY: &'static str = "batch-outbox";

    /// The key of every message of a batch, in the modes where it is one
    /// key per batch (`None` for `Field`, whose keys are per item, and for
    /// `None`).
    pub fn key_for(&self, batch_id: &BatchId) -> Option<String> {
        match self {
            Self::Global => Some(Self::GLOBAL_KEY.to_owned()),
            Self::Batch => Some(batch_id.to_string()),
            Self::Field { .. } | Self::None => None,
        }
    }

    /// The key of every message of a batch of `stream`, in the modes where
    /// it is one key per batch: the stream's name in `global` mode
    /// (`batch-outbox` for the default stream), the batch id in `batch`.
    pub fn stream_key(&self, stream: &StreamName, batch_id: &BatchId) -> Option<String> {
        match self {
            Self::Global if !stream.is_default() => Some(stream.to_string()),
            other => other.key_for(batch_id),
        }
    }

    /// The key of one item's message.
    pub fn key_for_item(&self, item: &OutboxItem) -> Option<String> {
        self.key_for_payload(&item.batch_id, &item.request_data)
    }

    /// The key of the message of an item of `batch_id` whose request
    /// object is `payload`.
    pub fn key_for_payload(
        &self,
        batch_id: &BatchId,
        payload: &Map<String, Value>,
    ) -> Option<String> {
        let Self::Field {
            pointer,
            default_key,
        } = self
        else {
            return self.key_for(batch_id);
        };
        let key = match field(payload, pointer) {
            Some(Value::String(text)) if !text.is_empty() => text.clone(),
            Some(value @ (Value::Number(_) | Value::Bool(_))) => value.to_string(),
            _ => return Some(default_key.clone()),
        };
        if key.len() <= MAX_ORDERING_KEY_BYTES {
            Some(key)
        } else {
            // Too long for Pub/Sub: its digest keeps one key per value.
            use sha2::Digest;
            Some(format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(key.as_bytes()))
            ))
        }
    }

    /// Sets the default key of a `Field` mode; other modes are unchanged.
    #[must_use]
    pub fn with_default_key(self, key: &str) -> Self {
        match self {
            Self::Field { pointer, .. } => Self::Field {
                pointer,
                default_key: key.to_owned(),
            },
            other => other,
        }
    }
}

/// The value at a JSON pointer (RFC 6901) into a request object.
fn field<'a>(object: &'a Map<String, Value>, pointer: &str) -> Option<&'a Value> {
    let rest = pointer.strip_prefix('/')?;
    let (first, tail) = rest.split_once('/').map_or((rest, ""), |(f, t)| (f, t));
    let first = first.replace("~1", "/").replace("~0", "~");
    let value = object.get(&first)?;
    if tail.is_empty() {
        Some(value)
    } else {
        value.pointer(&format!("/{tail}"))
    }
}

impl FromStr for OrderingKeyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "global" => Ok(Self::Global),
            "batch" => Ok(Self::Batch),
            "none" => Ok(Self::None),
            other => match other.strip_prefix("field:") {
                Some(pointer) if pointer.starts_with('/') && pointer.len() > 1 => Ok(Self::Field {
                    pointer: pointer.to_owned(),
                    default_key: Self::GLOBAL_KEY.to_owned(),
                }),
                Some(pointer) => Err(format!(
                    "field:{pointer} needs a JSON pointer such as field:/vendor_name"
                )),
                None => Err(format!(
                    "unknown ordering key mode {other:?} (global, batch, none or field:<json-pointer>)"
                )),
            },
        }
    }
}

impl fmt::Display for OrderingKeyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("global"),
            Self::Batch => f.write_str("batch"),
            Self::Field { pointer, .. } => write!(f, "field:{pointer}"),
            Self::None => f.write_str("none"),
        }
    }
}

/// One Pub/Sub message.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxMessage {
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    pub ordering_key: Option<String>,
}

#[derive(Serialize)]
struct MessageBody<'a> {
    batch_id: &'a BatchId,
    item_id: &'a ItemId,
    request_id: Option<&'a str>,
    vendor_name: &'a str,
    /// Absent when the payload is in a claim-check store.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Map<String, Value>>,
}

/// What one item's message is made of, borrowed from wherever it is kept:
/// the relay builds messages from stored items, the writer checks the
/// message an item will become before it stores it.
#[derive(Clone, Copy, Debug)]
pub struct ItemMessage<'a> {
    pub stream: &'a StreamName,
    pub batch_id: &'a BatchId,
    pub item_id: &'a ItemId,
    pub batch_sequence: Sequence,
    pub item_sequence: ItemSequence,
    pub request_id: Option<&'a str>,
    pub vendor_name: &'a str,
    pub payload: &'a Map<String, Value>,
    /// The claim-check reference published in place of `payload`.
    pub stored: Option<&'a StoredPayload>,
    pub total_items: u64,
    pub traceparent: Option<&'a str>,
}

impl<'a> ItemMessage<'a> {
    /// The parts of a stored item's message.
    pub fn of(item: &'a OutboxItem, batch: &'a PendingBatch) -> Self {
        Self {
            stream: &batch.stream,
            batch_id: &item.batch_id,
            item_id: &item.item_id,
            batch_sequence: batch.batch_sequence,
            item_sequence: item.item_sequence,
            request_id: item.request_id.as_deref(),
            vendor_name: &item.vendor_name,
            payload: &item.request_data,
            stored: item.stored.as_ref(),
            total_items: batch.total_items,
            traceparent: batch.traceparent.as_deref(),
        }
    }

    fn body(&self) -> MessageBody<'a> {
        MessageBody {
            batch_id: self.batch_id,
            item_id: self.item_id,
            request_id: self.request_id,
            vendor_name: self.vendor_name,
            payload: self.stored.is_none().then_some(self.payload),
        }
    }

    fn attributes(&self) -> BTreeMap<String, String> {
        let mut attributes = BTreeMap::from([
            ("stream".to_owned(), self.stream.to_string()),
            ("batch_id".to_owned(), self.batch_id.to_string()),
            ("batch_sequence".to_owned(), self.batch_sequence.to_string()),
            ("item_sequence".to_owned(), self.item_sequence.to_string()),
            ("item_id".to_owned(), self.item_id.to_string()),
            ("vendor_name".to_owned(), self.vendor_name.to_owned()),
            ("batch_total_items".to_owned(), self.total_items.to_string()),
        ]);
        if let Some(request_id) = self.request_id {
            attributes.insert("request_id".to_owned(), request_id.to_owned());
        }
        if u64::from(self.item_sequence.0) == self.total_items {
            attributes.insert("batch_last".to_owned(), "true".to_owned());
        }
        if let Some(traceparent) = self.traceparent {
            attributes.insert("traceparent".to_owned(), traceparent.to_owned());
        }
        if let Some(stored) = self.stored {
            for (name, value) in stored.reference.attributes() {
                attributes.insert(name.to_owned(), value);
            }
        }
        attributes
    }

    /// The message's ordering key. The one key of `global` mode (and the
    /// default key of `field:` mode) is the stream's name, `batch-outbox`
    /// for the default stream as before streams: two streams never share
    /// a key, so one's failure never pauses the other's.
    fn ordering_key(&self, mode: &OrderingKeyMode) -> Option<String> {
        let key = match (self.stored, mode) {
            // A stored payload's field key was taken when it was written.
            (Some(stored), OrderingKeyMode::Field { default_key, .. }) => Some(
                stored
                    .field_key
                    .clone()
                    .unwrap_or_else(|| default_key.clone()),
            ),
            _ => mode.key_for_payload(self.batch_id, self.payload),
        };
        key.map(|key| {
            if key == OrderingKeyMode::GLOBAL_KEY && !self.stream.is_default() {
                self.stream.to_string()
            } else {
                key
            }
        })
    }

    /// The message.
    pub fn build(&self, mode: &OrderingKeyMode) -> OutboxMessage {
        // Serializing a map of JSON values cannot fail.
        let data = serde_json::to_vec(&self.body()).unwrap_or_default();
        OutboxMessage {
            data,
            attributes: self.attributes(),
            ordering_key: self.ordering_key(mode),
        }
    }

    /// Checks the message this would build against Pub/Sub's limits
    /// without building its data.
    ///
    /// # Errors
    /// The first limit it breaks.
    pub fn check_limits(&self, mode: &OrderingKeyMode) -> Result<(), LimitViolation> {
        let mut count = ByteCount(0);
        // Serializing a map of JSON values cannot fail.
        let _ = serde_json::to_writer(&mut count, &self.body());
        let message = OutboxMessage {
            data: Vec::new(),
            attributes: self.attributes(),
            ordering_key: self.ordering_key(mode),
        };
        message.check_limits_with_data(count.0)
    }
}

/// Counts bytes written.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl OutboxMessage {
    /// The message for one item of `batch`.
    pub fn for_item(item: &OutboxItem, batch: &PendingBatch, mode: &OrderingKeyMode) -> Self {
        ItemMessage::of(item, batch).build(mode)
    }

    /// Checks the message against Pub/Sub's published limits.
    ///
    /// # Errors
    /// The first limit it breaks.
    pub fn check_limits(&self) -> Result<(), LimitViolation> {
        self.check_limits_with_data(self.data.len())
    }

    fn check_limits_with_data(&self, data_bytes: usize) -> Result<(), LimitViolation> {
        use limits::*;
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(LimitViolation::TooManyAttributes {
                count: self.attributes.len(),
                limit: MAX_ATTRIBUTES,
            });
        }
        for (name, value) in &self.attributes {
            if name.len() > MAX_ATTRIBUTE_KEY_BYTES {
                return Err(LimitViolation::AttributeNameTooLong {
                    name: name.chars().take(64).collect(),
                    limit: MAX_ATTRIBUTE_KEY_BYTES,
                });
            }
            if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return Err(LimitViolation::AttributeTooLong {
                    name: name.clone(),
                    bytes: value.len(),
                    limit: MAX_ATTRIBUTE_VALUE_BYTES,
                });
            }
        }
        if let Some(key) = &self.ordering_key
            && key.len() > MAX_ORDERING_KEY_BYTES
        {
            return Err(LimitViolation::OrderingKeyTooLong {
                bytes: key.len(),
                limit: MAX_ORDERING_KEY_BYTES,
            });
        }
        let bytes = self.size() - self.data.len() + data_bytes;
        if bytes + REQUEST_RESERVE_BYTES > MAX_MESSAGE_BYTES {
            return Err(LimitViolation::MessageTooLarge {
                bytes,
                limit: MAX_MESSAGE_BYTES - REQUEST_RESERVE_BYTES,
            });
        }
        Ok(())
    }

    /// The size Pub/Sub counts against its 10 MB limit: data, attribute
    /// names and values, and the ordering key.
    pub fn size(&self) -> usize {
        self.data.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.ordering_key.as_ref().map_or(0, String::len)
    }
}

/// Why a publish failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// Worth retrying: the service is unreachable, overloaded, or the
    /// ordering key is paused after an earlier failure.
    #[error("transient publish error: {0}")]
    Transient(String),
    /// Pub/Sub will never accept this message (too large, invalid).
    #[error("permanent publish error: {0}")]
    Permanent(String),
}

/// Pub/Sub's answer to one publish: the message id once acknowledged.
pub type PublishFuture = BoxFuture<'static, Result<String, PublishError>>;

/// Sends messages to Pub/Sub.
///
/// `publish` only starts a publish and returns at once, so many can be in
/// flight; messages with the same ordering key are delivered in the order
/// `publish` was called. After a failure the implementation pauses that key
/// (every later publish on it fails) until [`Publisher::resume`].
pub trait Publisher: Send + Sync + 'static {
    fn publish(&self, message: OutboxMessage) -> PublishFuture;

    /// Lets publishing on `ordering_key` continue after a failure.
    fn resume(&self, ordering_key: &str);

    /// Waits until everything published so far has an answer.
    fn flush(&self) -> BoxFuture<'_, ()>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn item(seq: u32, request_id: Option<&str>) -> OutboxItem {
        OutboxItem {
            item_id: ItemId::random(),
            batch_id: "00000000000000aa".parse().unwrap(),
            batch_sequence: Sequence(7),
            item_sequence: ItemSequence(seq),
            request_id: request_id.map(str::to_owned),
            vendor_name: "acme".into(),
            request_data: json!({"x": [1, 2], "request_id": request_id})
                .as_object()
                .unwrap()
                .clone(),
            stored: None,
        }
    }

    fn batch_of(total_items: u64, traceparent: Option<&str>) -> PendingBatch {
        PendingBatch {
            batch_id: "00000000000000aa".parse().unwrap(),
            stream: crate::stream::StreamName::default(),
            batch_sequence: Sequence(7),
            status: crate::model::BatchStatus::Pending,
            total_items,
            created_at: chrono::Utc::now(),
            last_error: None,
            traceparent: traceparent.map(str::to_owned),
        }
    }

    #[test]
    fn message_carries_the_payload_and_attributes() {
        let item = item(2, Some("r-2"));
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let message = OutboxMessage::for_item(
            &item,
            &batch_of(2, Some(traceparent)),
            &OrderingKeyMode::Global,
        );
        let body: Value = serde_json::from_slice(&message.data).unwrap();
        assert_eq!(body["batch_id"], "00000000000000aa");
        assert_eq!(body["item_id"], item.item_id.to_string());
        assert_eq!(body["request_id"], "r-2");
        assert_eq!(body["vendor_name"], "acme");
        assert_eq!(body["payload"], Value::Object(item.request_data.clone()));
        let attr = |k: &str| message.attributes.get(k).map(String::as_str);
        assert_eq!(attr("batch_sequence"), Some("7"));
        assert_eq!(attr("item_sequence"), Some("2"));
        assert_eq!(attr("batch_total_items"), Some("2"));
        assert_eq!(attr("batch_last"), Some("true"));
        assert_eq!(attr("request_id"), Some("r-2"));
        assert_eq!(attr("traceparent"), Some(traceparent));
        assert_eq!(
            message.ordering_key.as_deref(),
            Some(OrderingKeyMode::GLOBAL_KEY)
        );
    }

    #[test]
    fn a_stored_payload_is_published_as_its_reference() {
        let mut stored = item(1, Some("r-1"));
        stored.request_data = Map::new();
        stored.stored = Some(StoredPayload {
            reference: crate::claim_check::Reference {
                url: format!("gs://b/sha256/{}", "a".repeat(64)),
                sha256: "a".repeat(64),
                bytes: 25 << 20,
            },
            field_key: Some("c-9".to_owned()),
        });
        let message =
            OutboxMessage::for_item(&stored, &batch_of(1, None), &OrderingKeyMode::Global);
        let body: Value = serde_json::from_slice(&message.data).unwrap();
        assert!(body.get("payload").is_none(), "{body}");
        assert_eq!(body["request_id"], "r-1");
        assert_eq!(
            message.attributes["claim_check_bytes"],
            (25_u64 << 20).to_string()
        );
        assert_eq!(message.attributes["claim_check_sha256"], "a".repeat(64));
        assert!(message.check_limits().is_ok());
        let field: OrderingKeyMode = "field:/customer".parse().unwrap();
        let keyed = OutboxMessage::for_item(&stored, &batch_of(1, None), &field);
        assert_eq!(keyed.ordering_key.as_deref(), Some("c-9"));
        stored.stored.as_mut().unwrap().field_key = None;
        let defaulted = OutboxMessage::for_item(&stored, &batch_of(1, None), &field);
        assert_eq!(
            defaulted.ordering_key.as_deref(),
            Some(OrderingKeyMode::GLOBAL_KEY)
        );
    }

    #[test]
    fn only_the_last_item_is_marked_last_and_absent_request_ids_are_left_out() {
        let message =
            OutboxMessage::for_item(&item(1, None), &batch_of(2, None), &OrderingKeyMode::Batch);
        assert!(!message.attributes.contains_key("batch_last"));
        assert!(!message.attributes.contains_key("request_id"));
        assert!(!message.attributes.contains_key("traceparent"));
        assert_eq!(message.ordering_key.as_deref(), Some("00000000000000aa"));
        let none =
            OutboxMessage::for_item(&item(1, None), &batch_of(2, None), &OrderingKeyMode::None);
        assert_eq!(none.ordering_key, None);
    }

    #[test]
    fn ordering_modes_parse_and_print() {
        for mode in [
            OrderingKeyMode::Global,
            OrderingKeyMode::Batch,
            OrderingKeyMode::None,
            "field:/vendor_name".parse().unwrap(),
        ] {
            assert_eq!(mode.to_string().parse::<OrderingKeyMode>(), Ok(mode));
        }
        for bad in ["sometimes", "field:", "field:vendor", "field:/"] {
            assert!(bad.parse::<OrderingKeyMode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_field_mode_keys_each_item_by_its_value() {
        let mode: OrderingKeyMode = "field:/x/1".parse().unwrap();
        let mode = mode.with_default_key("rest");
        let mut keyed = item(1, None);
        keyed.request_data = json!({"x": ["a", "k-7"]}).as_object().unwrap().clone();
        assert_eq!(mode.key_for_item(&keyed).as_deref(), Some("k-7"));
        keyed.request_data = json!({"x": [0, 42]}).as_object().unwrap().clone();
        assert_eq!(mode.key_for_item(&keyed).as_deref(), Some("42"));
        for missing in [
            json!({}),
            json!({"x": [0, null]}),
            json!({"x": [0, {"a": 1}]}),
            json!({"x": [0, ""]}),
        ] {
            keyed.request_data = missing.as_object().unwrap().clone();
            assert_eq!(
                mode.key_for_item(&keyed).as_deref(),
                Some("rest"),
                "{missing}"
            );
        }
        let escaped: OrderingKeyMode = "field:/a~1b".parse().unwrap();
        keyed.request_data = json!({"a/b": "slash"}).as_object().unwrap().clone();
        assert_eq!(escaped.key_for_item(&keyed).as_deref(), Some("slash"));
        keyed.request_data = json!({"a/b": "x".repeat(2000)})
            .as_object()
            .unwrap()
            .clone();
        let long = escaped.key_for_item(&keyed).unwrap();
        assert!(long.starts_with("sha256:") && long.len() <= MAX_ORDERING_KEY_BYTES);
    }
}
