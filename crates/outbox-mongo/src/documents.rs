//! The stored document shapes, built with `doc!` and read field by field.
//!
//! Reading is lenient about integer widths (an `Int32` where an `Int64` was
//! written) and accepts dates stored as RFC 3339 strings, so documents
//! written by other tools (or MongoDB-compatible servers) still load.

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Bson, Document, doc};
use outbox_core::claim_check::{ClaimCheck, Reference, StoredPayload};
use outbox_core::model::{
    BatchId, BatchProgress, BatchStatus, BatchSummary, ItemCounts, ItemId, ItemSequence,
    ItemStatus, NewBatch, NewItem, Sequence, VendorCounts,
};
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::{ItemView, Member, OutboxItem, PendingBatch, StoreError};
#[cfg(test)]
use outbox_core::stream::PoisonPolicy;
use outbox_core::stream::{StreamDefinition, StreamName};
use serde_json::{Map, Value};

fn malformed(field: &str, doc: &Document) -> StoreError {
    let id = doc
        .get("batch_id")
        .map(ToString::to_string)
        .unwrap_or_default();
    StoreError::Other(format!(
        "stored document {id} has a missing or malformed {field:?}"
    ))
}

pub(crate) fn get_u64(doc: &Document, field: &str) -> Result<u64, StoreError> {
    let value = match doc.get(field) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Double(v)) if v.fract() == 0.0 => *v as i64,
        _ => return Err(malformed(field, doc)),
    };
    u64::try_from(value).map_err(|_| malformed(field, doc))
}

/// A flag however it was stored: MongoDB keeps a boolean, but the
/// development stand-in reads a boolean written with `$set` back as 1 (and
/// a hand edit may leave a number). Absent or anything else is `false`.
pub(crate) fn get_flag(doc: &Document, field: &str) -> bool {
    match doc.get(field) {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        Some(Bson::Double(n)) => *n != 0.0,
        _ => false,
    }
}

fn get_string(doc: &Document, field: &str) -> Result<String, StoreError> {
    doc.get_str(field)
        .map(str::to_owned)
        .map_err(|_| malformed(field, doc))
}

fn get_opt_string(doc: &Document, field: &str) -> Option<String> {
    doc.get_str(field).ok().map(str::to_owned)
}

pub(crate) fn get_datetime(doc: &Document, field: &str) -> Result<DateTime<Utc>, StoreError> {
    get_opt_datetime(doc, field).ok_or_else(|| malformed(field, doc))
}

pub fn get_opt_datetime(doc: &Document, field: &str) -> Option<DateTime<Utc>> {
    match doc.get(field)? {
        Bson::DateTime(d) => Some(d.to_chrono()),
        Bson::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .or_else(|_| s.parse::<DateTime<Utc>>())
            // Naive UTC, as Python's str() of a BSON date (the stand-in).
            .or_else(|_| {
                chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                    .map(|naive| naive.and_utc())
            })
            .ok(),
        _ => None,
    }
}

fn get_batch_id(doc: &Document) -> Result<BatchId, StoreError> {
    get_string(doc, "batch_id")?
        .parse()
        .map_err(|_| malformed("batch_id", doc))
}

fn parse_status<T: serde::de::DeserializeOwned>(
    doc: &Document,
    field: &str,
) -> Result<T, StoreError> {
    let text = get_string(doc, field)?;
    serde_json::from_value(Value::String(text)).map_err(|_| malformed(field, doc))
}

pub(crate) fn bson_datetime(at: DateTime<Utc>) -> Bson {
    Bson::DateTime(bson::DateTime::from_chrono(at))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The batch document, without its sequence (set inside the transaction).
pub fn batch_document(batch: &NewBatch, sequence: Sequence, processing_time_ms: u64) -> Document {
    let vendor_counts: Document = batch
        .vendor_counts
        .iter()
        .map(|(k, v)| (k.clone(), Bson::Int64(to_i64(*v))))
        .collect();
    let mut document = doc! {
        "batch_id": batch.batch_id.as_str(),
        "batch_sequence": to_i64(sequence.0),
        "created_at": bson_datetime(batch.created_at),
        "total_items": to_i64(batch.items.len() as u64),
        "vendor_counts": vendor_counts,
        "status": BatchStatus::Pending.as_str(),
        "processing_time_ms": to_i64(processing_time_ms),
        "committed_at": Bson::Null,
        // Items marked sent, and dead-lettered, by the relay: the batch
        // commits when they add up to total_items.
        "sent_items": 0_i64,
        "failed_items": 0_i64,
    };
    if !batch.stream.is_default() {
        document.insert("stream", batch.stream.as_str());
    }
    if let Some(idem) = &batch.idempotency {
        document.insert("idempotency_key", idem.key.as_str());
        document.insert("request_hash", idem.request_hash.as_str());
    }
    if let Some(name) = &batch.submitted_by {
        document.insert("submitted_by", name.as_str());
    }
    if let Some(traceparent) = &batch.traceparent {
        document.insert("traceparent", traceparent.as_str());
    }
    document
}

/// The request object as stored: its JSON text, never a BSON document. An
/// object converted to BSON is read back as MongoDB extended JSON, so a
/// payload shaped like it (`{"$date": 0}`, `{"$numberLong": "5"}`) would come
/// back as another value, and grow on the way; JSON text comes back as the
/// value that was sent (docs/CONSUMING.md gives its canonical form).
pub(crate) fn stored_payload(payload: &Map<String, Value>) -> Bson {
    Bson::String(Value::Object(payload.clone()).to_string())
}

/// The request object of an item or dead letter: JSON text, or (written
/// before payloads were stored as text) a BSON document read as relaxed
/// extended JSON.
pub(crate) fn read_payload(doc: &Document) -> Result<Map<String, Value>, StoreError> {
    match doc.get("request_data") {
        Some(Bson::String(text)) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(malformed("request_data", doc)),
        },
        Some(Bson::Document(data)) => match Bson::Document(data.clone()).into_relaxed_extjson() {
            Value::Object(map) => Ok(map),
            _ => Err(malformed("request_data", doc)),
        },
        _ => Err(malformed("request_data", doc)),
    }
}

/// An item document; `batch_sequence` is filled in per attempt.
pub fn item_document(batch: &NewBatch, item: &NewItem) -> Document {
    // A payload in a claim-check store is not in MongoDB: its reference is.
    let request_data = match &item.stored {
        Some(_) => Bson::Null,
        None => stored_payload(&item.request_data),
    };
    let item_id = item.item_id.0.to_string();
    let mut document = doc! {
        // The item id is the primary key too, so the relay's marks are
        // primary-key updates.
        "_id": &item_id,
        "item_id": item_id,
        "batch_id": batch.batch_id.as_str(),
        "batch_sequence": Bson::Null,
        "item_sequence": i64::from(item.item_sequence.0),
        "request_id": item.request_id.as_deref().map_or(Bson::Null, Bson::from),
        "vendor_name": item.vendor_name.as_str(),
        "request_data": request_data,
        "status": ItemStatus::Pending.as_str(),
        "sent": false,
        "publish_id": Bson::Null,
        "created_at": bson_datetime(batch.created_at),
        "sent_at": Bson::Null,
    };
    // The shard key's first field on a sharded cluster (`sharding`).
    if !batch.stream.is_default() {
        document.insert("stream", batch.stream.as_str());
    }
    if let Some(stored) = &item.stored {
        document.insert("claim_check", claim_check_document(stored));
    }
    document
}

/// A claim-check reference as an item document keeps it.
pub(crate) fn claim_check_document(stored: &StoredPayload) -> Document {
    let mut document = doc! {
        "url": &stored.reference.url,
        "sha256": &stored.reference.sha256,
        "bytes": i64::try_from(stored.reference.bytes).unwrap_or(i64::MAX),
    };
    if let Some(key) = &stored.field_key {
        document.insert("field_key", key.as_str());
    }
    document
}

/// The claim-check reference of an item document, when it has one.
pub(crate) fn stored_of(doc: &Document) -> Result<Option<StoredPayload>, StoreError> {
    let Ok(reference) = doc.get_document("claim_check") else {
        return Ok(None);
    };
    let bad = || malformed("claim_check", doc);
    Ok(Some(StoredPayload {
        reference: Reference {
            url: get_string(reference, "url").map_err(|_| bad())?,
            sha256: get_string(reference, "sha256").map_err(|_| bad())?,
            bytes: get_u64(reference, "bytes").map_err(|_| bad())?,
        },
        field_key: get_opt_string(reference, "field_key"),
    }))
}

pub(crate) fn batch_summary(doc: &Document) -> Result<BatchSummary, StoreError> {
    let mut vendor_counts = VendorCounts::new();
    if let Ok(counts) = doc.get_document("vendor_counts") {
        for (vendor, count) in counts {
            let count = match count {
                Bson::Int32(v) => u64::try_from(*v).unwrap_or(0),
                Bson::Int64(v) => u64::try_from(*v).unwrap_or(0),
                _ => return Err(malformed("vendor_counts", doc)),
            };
            vendor_counts.insert(vendor.clone(), count);
        }
    }
    Ok(BatchSummary {
        batch_id: get_batch_id(doc)?,
        stream: crate::ids::stream_of(doc),
        batch_sequence: Sequence(get_u64(doc, "batch_sequence")?),
        created_at: get_datetime(doc, "created_at")?,
        total_items: get_u64(doc, "total_items")?,
        vendor_counts,
        processing_time_ms: get_u64(doc, "processing_time_ms")?,
        submitted_by: get_opt_string(doc, "submitted_by"),
    })
}

pub(crate) fn pending_batch(doc: &Document) -> Result<PendingBatch, StoreError> {
    Ok(PendingBatch {
        batch_id: get_batch_id(doc)?,
        stream: crate::ids::stream_of(doc),
        batch_sequence: Sequence(get_u64(doc, "batch_sequence")?),
        status: parse_status(doc, "status")?,
        total_items: get_u64(doc, "total_items")?,
        created_at: get_datetime(doc, "created_at")?,
        last_error: get_opt_string(doc, "last_error"),
        traceparent: get_opt_string(doc, "traceparent"),
    })
}

pub(crate) fn batch_progress(
    doc: &Document,
    sent: u64,
    failed: u64,
) -> Result<BatchProgress, StoreError> {
    let total = get_u64(doc, "total_items")?;
    Ok(BatchProgress {
        batch_id: get_batch_id(doc)?,
        stream: crate::ids::stream_of(doc),
        batch_sequence: Sequence(get_u64(doc, "batch_sequence")?),
        status: parse_status(doc, "status")?,
        counts: ItemCounts {
            total,
            sent,
            failed,
            pending: total.saturating_sub(sent + failed),
        },
        created_at: get_datetime(doc, "created_at")?,
        committed_at: get_opt_datetime(doc, "committed_at"),
        last_error: get_opt_string(doc, "last_error"),
        submitted_by: get_opt_string(doc, "submitted_by"),
        traceparent: get_opt_string(doc, "traceparent"),
    })
}

fn item_id(doc: &Document) -> Result<ItemId, StoreError> {
    get_string(doc, "item_id")?
        .parse()
        .map(ItemId)
        .map_err(|_| malformed("item_id", doc))
}

fn item_sequence(doc: &Document) -> Result<ItemSequence, StoreError> {
    let value = get_u64(doc, "item_sequence")?;
    u32::try_from(value)
        .map(ItemSequence)
        .map_err(|_| malformed("item_sequence", doc))
}

pub(crate) fn outbox_item(doc: &Document) -> Result<OutboxItem, StoreError> {
    let stored = stored_of(doc)?;
    let request_data = match stored {
        Some(_) => Map::new(),
        None => read_payload(doc)?,
    };
    Ok(OutboxItem {
        item_id: item_id(doc)?,
        batch_id: get_batch_id(doc)?,
        // Staged items get their batch's sequence only with the batch
        // document; the relay takes it from there.
        batch_sequence: Sequence(get_u64(doc, "batch_sequence").unwrap_or(0)),
        item_sequence: item_sequence(doc)?,
        request_id: get_opt_string(doc, "request_id"),
        vendor_name: get_string(doc, "vendor_name")?,
        request_data,
        stored,
    })
}

pub(crate) fn item_view(doc: &Document) -> Result<ItemView, StoreError> {
    Ok(ItemView {
        item_id: item_id(doc)?,
        item_sequence: item_sequence(doc)?,
        request_id: get_opt_string(doc, "request_id"),
        vendor_name: get_string(doc, "vendor_name")?,
        status: parse_status(doc, "status")?,
        publish_id: get_opt_string(doc, "publish_id"),
        sent_at: get_opt_datetime(doc, "sent_at"),
        error: get_opt_string(doc, "error"),
    })
}

/// A stream definition as stored. The schema is kept as JSON text: a JSON
/// Schema's keys (`$ref`, `$defs`, ...) start with `$`, which MongoDB
/// reserves in documents.
pub(crate) fn stream_document(definition: &StreamDefinition, now: DateTime<Utc>) -> Document {
    let mut document = doc! {
        "_id": definition.name.as_str(),
        "topic": &definition.topic,
        "ordering_key": definition.ordering.to_string(),
        "on_poison": definition.on_poison.to_string(),
        "updated_at": bson_datetime(now),
    };
    if let OrderingKeyMode::Field { default_key, .. } = &definition.ordering {
        document.insert("ordering_key_default", default_key.as_str());
    }
    if let Some(schema) = &definition.schema {
        document.insert("schema", schema.to_string());
    }
    if let Some(writers) = &definition.writers {
        document.insert("writers", writers.clone());
    }
    if let Some(claim_check) = &definition.claim_check {
        let mut setting = doc! { "url": &claim_check.url };
        if let Some(above) = claim_check.above_bytes {
            setting.insert("above_bytes", i64::try_from(above).unwrap_or(i64::MAX));
        }
        document.insert("claim_check", setting);
    }
    document
}

/// The optional fields of a stream document: a definition without one
/// removes it.
pub(crate) const STREAM_OPTIONAL_FIELDS: [&str; 4] =
    ["ordering_key_default", "schema", "writers", "claim_check"];

pub(crate) fn stream_definition(doc: &Document) -> Result<StreamDefinition, StoreError> {
    let name: StreamName = get_string(doc, "_id")?
        .parse()
        .map_err(|_| malformed("_id", doc))?;
    let mut ordering: OrderingKeyMode = get_string(doc, "ordering_key")?
        .parse()
        .map_err(|_| malformed("ordering_key", doc))?;
    if let Some(default_key) = get_opt_string(doc, "ordering_key_default") {
        ordering = ordering.with_default_key(&default_key);
    }
    let schema = match get_opt_string(doc, "schema") {
        Some(text) => Some(serde_json::from_str(&text).map_err(|_| malformed("schema", doc))?),
        None => None,
    };
    let writers = match doc.get_array("writers") {
        Ok(names) => Some(
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect(),
        ),
        Err(_) => None,
    };
    let claim_check = match doc.get_document("claim_check") {
        Ok(setting) => Some(ClaimCheck {
            url: get_string(setting, "url").map_err(|_| malformed("claim_check", doc))?,
            above_bytes: get_u64(setting, "above_bytes").ok(),
        }),
        Err(_) => None,
    };
    Ok(StreamDefinition {
        name,
        topic: get_string(doc, "topic")?,
        ordering,
        on_poison: get_string(doc, "on_poison")?
            .parse()
            .map_err(|_| malformed("on_poison", doc))?,
        schema,
        writers,
        created_at: get_opt_datetime(doc, "created_at"),
        updated_at: get_opt_datetime(doc, "updated_at"),
        claim_check,
    })
}

pub(crate) fn member_document(member: &Member) -> Document {
    let published: Document = member
        .published
        .iter()
        .map(|(stream, n)| (stream.clone(), Bson::Int64(to_i64(*n))))
        .collect();
    doc! {
        "_id": &member.id,
        "admin_url": &member.admin_url,
        "host": &member.host,
        "pid": i64::from(member.pid),
        "version": &member.version,
        "started_at": bson_datetime(member.started_at),
        "expires_at_ms": member.expires_at_ms,
        "published": published,
        "admin_token": member.admin_token.as_deref().map_or(Bson::Null, Bson::from),
    }
}

pub(crate) fn member(doc: &Document) -> Result<Member, StoreError> {
    let published = doc
        .get_document("published")
        .map(|d| {
            d.iter()
                .filter_map(|(k, v)| {
                    let n = match v {
                        Bson::Int32(n) => u64::try_from(*n).ok(),
                        Bson::Int64(n) => u64::try_from(*n).ok(),
                        Bson::Double(n) if *n >= 0.0 => Some(*n as u64),
                        _ => None,
                    };
                    n.map(|n| (k.clone(), n))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Member {
        id: get_string(doc, "_id")?,
        admin_url: get_opt_string(doc, "admin_url").unwrap_or_default(),
        host: get_opt_string(doc, "host").unwrap_or_default(),
        pid: u32::try_from(get_u64(doc, "pid").unwrap_or(0)).unwrap_or(0),
        version: get_opt_string(doc, "version").unwrap_or_default(),
        started_at: get_opt_datetime(doc, "started_at").unwrap_or_else(Utc::now),
        expires_at_ms: get_u64(doc, "expires_at_ms")
            .ok()
            .and_then(|n| i64::try_from(n).ok())
            .unwrap_or(0),
        published,
        admin_token: get_opt_string(doc, "admin_token"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_definition_round_trips() {
        let definition = StreamDefinition {
            name: "orders".parse().unwrap(),
            topic: "orders".into(),
            ordering: "field:/customer/id"
                .parse::<OrderingKeyMode>()
                .unwrap()
                .with_default_key("none"),
            on_poison: PoisonPolicy::DeadLetter,
            schema: Some(
                serde_json::json!({"$defs": {"id": {"type": "string"}}, "properties": {"id": {"$ref": "#/$defs/id"}}}),
            ),
            writers: Some(vec!["billing".into()]),
            created_at: None,
            updated_at: None,
            claim_check: Some(ClaimCheck {
                url: "gs://acme/outbox".into(),
                above_bytes: Some(4096),
            }),
        };
        let now = Utc::now();
        let read = stream_definition(&stream_document(&definition, now)).unwrap();
        assert_eq!(read.name, definition.name);
        assert_eq!(read.ordering, definition.ordering);
        assert_eq!(read.on_poison, definition.on_poison);
        assert_eq!(read.schema, definition.schema);
        assert_eq!(read.writers, definition.writers);
        assert_eq!(read.claim_check, definition.claim_check);
        assert!(read.updated_at.is_some());
    }

    #[test]
    fn a_claim_checked_item_keeps_its_reference_and_no_payload() {
        let rules = outbox_core::ingest::IngestRules {
            claim_check: Some(outbox_core::ingest::ClaimCheckRules {
                setting: ClaimCheck {
                    url: "memory://".into(),
                    above_bytes: Some(10),
                },
                location: outbox_core::claim_check::Location::Memory,
                max_item_bytes: 1 << 20,
            }),
            ..outbox_core::ingest::IngestRules::default()
        };
        let values = vec![serde_json::json!({"request_id": "r", "text": "long enough"})];
        let mut batch = outbox_core::ingest::build_batch(values, &rules, None, Utc::now()).unwrap();
        batch.items[0].request_data = Map::new();
        let document = item_document(&batch, &batch.items[0]);
        assert_eq!(document.get("request_data"), Some(&Bson::Null));
        let mut stored = document.clone();
        stored.insert("batch_sequence", 1_i64);
        let read = outbox_item(&stored).unwrap();
        assert_eq!(read.stored, batch.items[0].stored);
        assert!(read.request_data.is_empty());
        assert_eq!(read.request_id.as_deref(), Some("r"));
    }

    #[test]
    fn dates_read_from_bson_and_from_strings() {
        let at = DateTime::parse_from_rfc3339("2026-11-22T23:54:14.571Z")
            .unwrap()
            .with_timezone(&Utc);
        for value in [
            bson_datetime(at),
            Bson::String("2026-11-22T23:54:14.571Z".into()),
            Bson::String("2026-11-22 23:54:14.571000".into()),
        ] {
            assert_eq!(
                get_opt_datetime(&doc! { "t": value.clone() }, "t"),
                Some(at),
                "{value}"
            );
        }
        assert_eq!(get_opt_datetime(&doc! { "t": "yesterday" }, "t"), None);
        assert_eq!(get_opt_datetime(&doc! { "t": Bson::Null }, "t"), None);
    }

    #[test]
    fn flags_read_from_booleans_and_numbers() {
        for (value, expected) in [
            (Bson::Boolean(true), true),
            (Bson::Boolean(false), false),
            (Bson::Int32(1), true),
            (Bson::Int32(0), false),
            (Bson::Int64(1), true),
            (Bson::Double(1.0), true),
            (Bson::Null, false),
            (Bson::String("true".into()), false),
        ] {
            assert_eq!(
                get_flag(&doc! { "f": value.clone() }, "f"),
                expected,
                "{value}"
            );
        }
        assert!(!get_flag(&doc! {}, "f"));
    }
}

#[cfg(test)]
mod roundtrip {
    use mongodb::bson::{self, Document};
    use outbox_core::ingest::{BodyFormat, IngestRules, build_batch, parse_body};
    use outbox_core::model::{BatchStatus, Sequence};
    use outbox_core::publish::{OrderingKeyMode, OutboxMessage};
    use outbox_core::store::PendingBatch;
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::{item_document, outbox_item};

    /// Objects shaped like MongoDB extended JSON (v1 and v2, canonical and
    /// relaxed), `$`-prefixed and dotted keys, and numbers at the edges:
    /// what a BSON conversion would change.
    fn look_alike() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(|n| json!({ "$date": n })),
            Just(json!({ "$date": "1970-01-01T00:00:00Z" })),
            Just(json!({ "$date": { "$numberLong": "0" } })),
            any::<i64>().prop_map(|n| json!({ "$numberLong": n.to_string() })),
            any::<i32>().prop_map(|n| json!({ "$numberInt": n.to_string() })),
            Just(json!({ "$numberDouble": "NaN" })),
            Just(json!({ "$numberDouble": "-0.0" })),
            Just(json!({ "$numberDecimal": "1.50" })),
            Just(json!({ "$oid": "5f0c1d2e3a4b5c6d7e8f9a0b" })),
            Just(json!({ "$binary": { "base64": "AA==", "subType": "00" } })),
            Just(json!({ "$binary": "AA==", "$type": "00" })),
            Just(json!({ "$regularExpression": { "pattern": "a", "options": "i" } })),
            Just(json!({ "$regex": "a", "$options": "i" })),
            Just(json!({ "$timestamp": { "t": 1, "i": 2 } })),
            Just(json!({ "$symbol": "s" })),
            Just(json!({ "$code": "f()", "$scope": {} })),
            Just(json!({ "$minKey": 1 })),
            Just(json!({ "$maxKey": 1 })),
            Just(json!({ "$undefined": true })),
            Just(json!({ "$uuid": "00000000-0000-4000-8000-000000000000" })),
            Just(
                json!({ "$dbPointer": { "$ref": "c", "$id": { "$oid": "5f0c1d2e3a4b5c6d7e8f9a0b" } } })
            ),
            Just(json!({ "$ref": "c", "$id": 1 })),
            Just(json!({ "a.b": 1, "$x": 2, "": 3 })),
            Just(json!(-0.0)),
            Just(json!(1e308)),
            Just(json!(5e-324)),
            Just(json!(i64::MAX)),
            Just(json!(i64::MIN)),
            Just(json!(u64::MAX)),
        ]
    }

    /// Any JSON value a client may send (finite numbers, any text, nesting,
    /// extended-JSON look-alikes).
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300_f64..1e300).prop_map(Value::from),
            ".{0,20}".prop_map(Value::String),
            look_alike(),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            "[^\u{0}]{0,12}",
            "\\$[a-zA-Z]{1,12}",
            "[a-z]{1,4}\\.[a-z]{1,4}",
        ]
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(key(), json_value(), 0..8).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// What a consumer receives is the JSON value the client sent: the
        /// body is parsed, stored (as BSON bytes, as MongoDB keeps them),
        /// read back and published, and the message's `payload` is the same
        /// JSON text, extended-JSON look-alikes and all.
        #[test]
        fn an_accepted_body_is_published_as_sent(objects in prop::collection::vec(object(), 1..5)) {
            let body = serde_json::to_vec(&objects).expect("serializes");
            let values = parse_body(&body, BodyFormat::Json, 10_000).expect("accepted");
            let batch = build_batch(values, &IngestRules::default(), None, chrono::Utc::now()).expect("valid");
            let pending = PendingBatch {
                batch_id: batch.batch_id.clone(),
                stream: batch.stream.clone(),
                batch_sequence: Sequence(1),
                status: BatchStatus::Pending,
                total_items: batch.items.len() as u64,
                created_at: batch.created_at,
                last_error: None,
                traceparent: None,
            };
            for (item, original) in batch.items.iter().zip(&objects) {
                let mut document = item_document(&batch, item);
                document.insert("batch_sequence", 1_i64);
                let bytes = bson::to_vec(&document).expect("encodes");
                let stored: Document = bson::from_slice(&bytes).expect("decodes");
                let read = outbox_item(&stored).expect("readable");
                let message = OutboxMessage::for_item(&read, &pending, &OrderingKeyMode::Global);
                let published: Value = serde_json::from_slice(&message.data).expect("JSON");
                let sent = serde_json::to_string(original).expect("text");
                prop_assert_eq!(serde_json::to_string(&published["payload"]).expect("text"), sent);
            }
        }
    }

    #[test]
    fn the_reported_payload_comes_back_as_sent() {
        let sent = r#"{"request_id":"x1","d":{"$date":0},"n":{"$numberLong":"5"}}"#;
        let values = parse_body(format!("[{sent}]").as_bytes(), BodyFormat::Json, 10_000).unwrap();
        let batch = build_batch(values, &IngestRules::default(), None, chrono::Utc::now()).unwrap();
        let mut document = item_document(&batch, &batch.items[0]);
        document.insert("batch_sequence", 1_i64);
        let read = outbox_item(&document).unwrap();
        assert_eq!(Value::Object(read.request_data).to_string(), sent);
    }

    #[test]
    fn payloads_stored_as_documents_before_still_read() {
        let legacy = bson::doc! {
            "item_id": "6f1c1d2e-3a4b-4c6d-8e8f-9a0b1c2d3e4f",
            "batch_id": "0123456789abcdef",
            "batch_sequence": 1_i64,
            "item_sequence": 1_i64,
            "vendor_name": "acme",
            "request_data": { "a": 1_i32, "b": "x" },
        };
        let read = outbox_item(&legacy).unwrap();
        assert_eq!(Value::Object(read.request_data), json!({"a": 1, "b": "x"}));
    }
}
