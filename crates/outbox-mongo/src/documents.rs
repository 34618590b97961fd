//! The stored document shapes, built with `doc!` and read field by field.
//!
//! Reading is lenient about integer widths (an `Int32` where an `Int64` was
//! written) and accepts dates stored as RFC 3339 strings, so documents
//! written by other tools (or MongoDB-compatible servers) still load.

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Bson, Document, doc};
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

/// An item document; `batch_sequence` is filled in per attempt.
///
/// # Errors
/// When the request object holds a number BSON cannot represent.
pub fn item_document(batch: &NewBatch, item: &NewItem) -> Result<Document, StoreError> {
    let request_data = bson::to_document(&item.request_data).map_err(|e| {
        StoreError::Other(format!("item {} cannot be stored: {e}", item.item_sequence))
    })?;
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
    Ok(document)
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
    let request_data = match doc.get("request_data") {
        Some(Bson::Document(data)) => match Bson::Document(data.clone()).into_relaxed_extjson() {
            Value::Object(map) => map,
            _ => Map::new(),
        },
        _ => return Err(malformed("request_data", doc)),
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
    document
}

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
        };
        let now = Utc::now();
        let read = stream_definition(&stream_document(&definition, now)).unwrap();
        assert_eq!(read.name, definition.name);
        assert_eq!(read.ordering, definition.ordering);
        assert_eq!(read.on_poison, definition.on_poison);
        assert_eq!(read.schema, definition.schema);
        assert_eq!(read.writers, definition.writers);
        assert!(read.updated_at.is_some());
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
    use outbox_core::ingest::{BodyFormat, IngestRules, build_batch, parse_body};
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::{item_document, outbox_item};

    /// Any JSON value a client may send (finite numbers, any text, nesting).
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e300_f64..1e300).prop_map(Value::from),
            ".{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[^\u{0}]{0,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map("[^\u{0}]{0,12}", json_value(), 0..8)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// What a client sends is what the relay reads back: the body,
        /// parsed, stored as BSON and read again, gives the same objects.
        #[test]
        fn an_accepted_body_is_stored_and_read_back_unchanged(objects in prop::collection::vec(object(), 1..5)) {
            let body = serde_json::to_vec(&objects).expect("serializes");
            let values = parse_body(&body, BodyFormat::Json).expect("accepted");
            let batch = build_batch(values, &IngestRules::default(), None, chrono::Utc::now()).expect("valid");
            for (item, original) in batch.items.iter().zip(&objects) {
                let mut document = item_document(&batch, item).expect("storable");
                document.insert("batch_sequence", 1_i64);
                let read = outbox_item(&document).expect("readable");
                prop_assert_eq!(&read.request_data, original);
            }
        }
    }
}
