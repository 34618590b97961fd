//! One message of batch-outbox, as a consumer reads it: the attributes the
//! relay sets (docs/CONSUMING.md) and the JSON body.

use std::collections::{BTreeMap, HashMap};

use outbox_core::claim_check::Reference;
use serde_json::Value;

/// Why a message is not one of batch-outbox's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a batch-outbox message: {0}")]
pub struct NotAnItem(pub String);

/// Where an item stands in its stream: batches in `batch_sequence` order,
/// items in `item_sequence` order within their batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub batch_sequence: u64,
    pub item_sequence: u32,
}

/// One item, delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Pub/Sub's id of this delivery's message (a duplicate has its own).
    pub message_id: String,
    /// The ordering key the message was published with (empty: none).
    pub ordering_key: String,
    /// The item's identity: the same in every copy of it, replays included.
    pub item_id: String,
    pub stream: String,
    pub batch_id: String,
    pub position: Position,
    /// Items in the item's batch.
    pub batch_total_items: u64,
    /// The batch's last item (`batch_last`).
    pub batch_last: bool,
    /// Set on a copy published by a replay job.
    pub replay_id: Option<String>,
    pub request_id: Option<String>,
    pub vendor_name: String,
    /// The JSON object the client submitted (`Null` for a claim-checked
    /// item until it is resolved; [`crate::Core`] resolves before it hands
    /// an item over).
    pub payload: Value,
    /// Where the payload is when the message carries a reference instead;
    /// `Err` when its attributes are malformed (such an item is never
    /// handed over, nor acknowledged).
    pub claim_check: Option<Result<Reference, String>>,
    /// Every attribute, as received.
    pub attributes: BTreeMap<String, String>,
}

impl Item {
    /// Reads a message's parts.
    ///
    /// # Errors
    /// [`NotAnItem`] when an attribute the relay always sets is missing or
    /// malformed, or the body is not the relay's JSON.
    pub fn parse(
        message_id: &str,
        ordering_key: &str,
        attributes: &HashMap<String, String>,
        data: &[u8],
    ) -> Result<Self, NotAnItem> {
        let text = |name: &str| {
            attributes
                .get(name)
                .cloned()
                .ok_or_else(|| NotAnItem(format!("no {name} attribute")))
        };
        let number = |name: &str| -> Result<u64, NotAnItem> {
            text(name)?
                .parse()
                .map_err(|_| NotAnItem(format!("{name} is not a number")))
        };
        let body: Value = serde_json::from_slice(data)
            .map_err(|e| NotAnItem(format!("the body is not JSON: {e}")))?;
        let claim_check =
            Reference::from_attributes(|name| attributes.get(name).map(String::as_str))
                .map(|parsed| parsed.map_err(|e| e.to_string()));
        let item_sequence = u32::try_from(number("item_sequence")?)
            .map_err(|_| NotAnItem("item_sequence is out of range".to_owned()))?;
        Ok(Self {
            message_id: message_id.to_owned(),
            ordering_key: ordering_key.to_owned(),
            item_id: text("item_id")?,
            // Messages published before streams existed name none.
            stream: attributes
                .get("stream")
                .cloned()
                .unwrap_or_else(|| "default".to_owned()),
            batch_id: text("batch_id")?,
            position: Position {
                batch_sequence: number("batch_sequence")?,
                item_sequence,
            },
            batch_total_items: number("batch_total_items")?,
            batch_last: attributes.get("batch_last").is_some_and(|v| v == "true"),
            replay_id: attributes.get("replay_id").cloned(),
            request_id: attributes.get("request_id").cloned(),
            vendor_name: attributes.get("vendor_name").cloned().unwrap_or_default(),
            payload: body.get("payload").cloned().unwrap_or(Value::Null),
            claim_check,
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// What deduplicates a delivery: the item id, and for a replayed copy
    /// the replay too (a replay is there to be processed again: its copies
    /// are deduplicated among themselves, not against the live messages).
    pub fn dedup_key(&self) -> String {
        match &self.replay_id {
            Some(replay) => format!("{replay}/{}", self.item_id),
            None => self.item_id.clone(),
        }
    }

    /// The sequence of deliveries the item belongs to: its stream's live
    /// messages, or one replay job's copies. Order is promised within a
    /// lane, not across lanes.
    pub fn lane(&self) -> Lane {
        Lane {
            stream: self.stream.clone(),
            replay_id: self.replay_id.clone(),
        }
    }
}

/// A stream's live messages, or one replay job's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lane {
    pub stream: String,
    pub replay_id: Option<String>,
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.replay_id {
            Some(replay) => write!(f, "{} (replay {replay})", self.stream),
            None => f.write_str(&self.stream),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A message's parts as the relay publishes them.
    pub fn message(batch: u64, item: u32, total: u64) -> (HashMap<String, String>, Vec<u8>) {
        let mut attributes = HashMap::from([
            ("stream".to_owned(), "default".to_owned()),
            ("batch_id".to_owned(), format!("b{batch}")),
            ("batch_sequence".to_owned(), batch.to_string()),
            ("item_sequence".to_owned(), item.to_string()),
            ("item_id".to_owned(), format!("i{batch}-{item}")),
            ("vendor_name".to_owned(), "acme".to_owned()),
            ("batch_total_items".to_owned(), total.to_string()),
        ]);
        if u64::from(item) == total {
            attributes.insert("batch_last".to_owned(), "true".to_owned());
        }
        let body = serde_json::json!({
            "batch_id": format!("b{batch}"), "item_id": format!("i{batch}-{item}"),
            "request_id": null, "vendor_name": "acme", "payload": { "n": item },
        });
        (attributes, serde_json::to_vec(&body).unwrap_or_default())
    }

    pub fn item(batch: u64, position: u32, total: u64) -> Item {
        let (attributes, data) = message(batch, position, total);
        Item::parse("m", "batch-outbox", &attributes, &data).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_relay_message_reads_back_and_a_foreign_one_is_refused() {
        let item = item(7, 2, 2);
        assert_eq!(
            item.position,
            Position {
                batch_sequence: 7,
                item_sequence: 2
            }
        );
        assert!(item.batch_last);
        assert_eq!(item.payload, serde_json::json!({ "n": 2 }));
        assert_eq!(item.lane().to_string(), "default");
        let (mut attributes, data) = message(1, 1, 1);
        attributes.remove("item_id");
        assert_eq!(
            Item::parse("m", "", &attributes, &data),
            Err(NotAnItem("no item_id attribute".to_owned()))
        );
        assert!(Item::parse("m", "", &message(1, 1, 1).0, b"not json").is_err());
    }
}
