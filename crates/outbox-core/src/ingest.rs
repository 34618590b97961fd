//! Turning a request body into a validated [`NewBatch`].
//!
//! Validation happens before anything is written: a batch that fails here
//! changes nothing in the store.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::model::{
    BatchId, Idempotency, ItemId, ItemSequence, NewBatch, NewItem, Sequence, StreamName,
    VendorCounts,
};
use crate::publish::{ItemMessage, LimitViolation, OrderingKeyMode};

/// The vendor items without a vendor field are counted under.
pub const UNKNOWN_VENDOR: &str = "unknown";

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// How request objects are read.
#[derive(Clone, Debug)]
pub struct IngestRules {
    /// Field holding each object's request id.
    pub request_id_field: String,
    /// Field holding each object's vendor name.
    pub vendor_field: String,
    /// Most items one batch may hold.
    pub max_items: usize,
    /// How the relay will key the batch's messages (their ordering key
    /// counts against Pub/Sub's message limit).
    pub ordering: OrderingKeyMode,
    /// The stream the batch is for.
    pub stream: StreamName,
}

impl Default for IngestRules {
    fn default() -> Self {
        Self {
            request_id_field: "request_id".to_owned(),
            vendor_field: "vendor_name".to_owned(),
            max_items: 10_000,
            ordering: OrderingKeyMode::Global,
            stream: StreamName::default_stream(),
        }
    }
}

/// Why a request body is not a valid batch. Each variant is a client error.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IngestError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// An object names the same key twice: which value is meant is not
    /// clear, so the batch is refused rather than one value dropped.
    #[error("{0}")]
    DuplicateKey(String),
    /// A key MongoDB cannot store (it contains a NUL character).
    #[error("{0}")]
    InvalidKey(String),
    #[error("{0}")]
    InvalidBatch(String),
    #[error("item {index} is not a JSON object (found {found})")]
    ItemNotObject { index: usize, found: &'static str },
    #[error("batch is empty: send at least one object")]
    EmptyBatch,
    #[error("batch has {count} items, more than the limit of {max}")]
    TooManyItems { count: usize, max: usize },
    /// The item's message would be over Pub/Sub's 10 MB limit: it could
    /// never be delivered.
    #[error(
        "item {index} would be a Pub/Sub message of {bytes} bytes, over Pub/Sub's limit of {max} bytes"
    )]
    ItemTooLarge {
        index: usize,
        bytes: usize,
        max: usize,
    },
    /// A field the relay copies into a message attribute is longer than
    /// Pub/Sub allows an attribute value: the message could never be
    /// delivered.
    #[error(
        "item {index}: {field} is {bytes} bytes, over Pub/Sub's limit of {max} bytes for the {field} attribute of its message"
    )]
    AttributeTooLong {
        index: usize,
        field: String,
        bytes: usize,
        max: usize,
    },
    #[error(
        "item {index} has the integer {number} at {path}, outside the signed 64-bit range MongoDB stores"
    )]
    NumberOutOfRange {
        index: usize,
        /// JSON Pointer to the number inside the item.
        path: String,
        number: String,
    },
    #[error("idempotency key must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    #[error(transparent)]
    Csv(#[from] CsvError),
}

/// Why a CSV body is not a table of rows under one header row. Every variant
/// but `Empty` and `NoRows` names the line (1-based, counting the header).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CsvError {
    #[error("the CSV body is empty: send a header row and at least one row")]
    Empty,
    #[error("the CSV body has a header row but no rows")]
    NoRows,
    #[error("line {line}: header column {column} has no name")]
    EmptyHeader { line: u64, column: usize },
    #[error("line {line}: header name {name:?} appears twice")]
    DuplicateHeader { line: u64, name: String },
    #[error("line {line}: header name {name:?} has a NUL character, which MongoDB cannot store")]
    InvalidHeader { line: u64, name: String },
    #[error("line {line}: {found} fields, but the header has {expected}")]
    FieldCount {
        line: u64,
        expected: usize,
        found: usize,
    },
    #[error("line {line}: {reason}")]
    Malformed { line: u64, reason: String },
    /// A quote where RFC 4180 allows none: a quoted field that never ends
    /// (the rest of the file would vanish into one cell), a quote inside
    /// an unquoted field, or text after a field's closing quote. `line` is
    /// where the quoted field started, or where the stray quote is.
    #[error("line {line}: {reason}")]
    Quote { line: u64, reason: &'static str },
}

impl CsvError {
    /// The line the error is on, when it is on one.
    pub fn line(&self) -> Option<u64> {
        match self {
            Self::Empty | Self::NoRows => None,
            Self::EmptyHeader { line, .. }
            | Self::DuplicateHeader { line, .. }
            | Self::InvalidHeader { line, .. }
            | Self::FieldCount { line, .. }
            | Self::Malformed { line, .. }
            | Self::Quote { line, .. } => Some(*line),
        }
    }
}

/// The body formats the writer accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFormat {
    /// A JSON array of objects, or `{"requests": [ ... ]}`.
    Json,
    /// One JSON object per line; blank lines are skipped.
    NdJson,
    /// CSV (RFC 4180, UTF-8 with or without a byte-order mark, CRLF or LF):
    /// the header row names the keys and each row becomes one object whose
    /// values are the cells as strings (an empty cell is `""`).
    Csv,
}

/// Parses a body into its request objects (not yet checked to be objects).
///
/// # Errors
/// [`IngestError::InvalidJson`] for malformed JSON and
/// [`IngestError::InvalidBatch`] for JSON of the wrong shape.
pub fn parse_body(body: &[u8], format: BodyFormat) -> Result<Vec<Value>, IngestError> {
    match format {
        BodyFormat::Json => parse_json(body),
        BodyFormat::NdJson => parse_ndjson(body),
        BodyFormat::Csv => parse_csv(body).map_err(IngestError::Csv),
    }
}

/// Prefixes of the parser's own errors, to tell them from syntax errors.
const DUPLICATE_KEY: &str = "duplicate key";
const NUL_IN_KEY: &str = "key with a NUL character";

fn json_error(error: &serde_json::Error, line: Option<usize>) -> IngestError {
    let message = match line {
        Some(line) => format!("line {line}: {error}"),
        None => error.to_string(),
    };
    if error.to_string().starts_with(DUPLICATE_KEY) {
        IngestError::DuplicateKey(message)
    } else if error.to_string().starts_with(NUL_IN_KEY) {
        IngestError::InvalidKey(message)
    } else {
        IngestError::InvalidJson(message)
    }
}

/// A JSON value parsed strictly: no object with a key twice, no key with a
/// NUL character. (serde_json keeps the last of duplicate keys silently.)
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        use serde::de::Error;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key.contains('\0') {
                return Err(A::Error::custom(format!("{NUL_IN_KEY}: {key:?}")));
            }
            let Strict(value) = map.next_value()?;
            if object.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "{DUPLICATE_KEY} {key:?} in one object"
                )));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn parse_json(body: &[u8]) -> Result<Vec<Value>, IngestError> {
    let Strict(value) = serde_json::from_slice(body).map_err(|e| json_error(&e, None))?;
    match value {
        Value::Array(items) => Ok(items),
        Value::Object(mut object) => match object.remove("requests") {
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(IngestError::InvalidBatch(format!(
                "\"requests\" must be an array, found {}",
                kind(&other)
            ))),
            None => Err(IngestError::InvalidBatch(
                "body must be a JSON array of objects or an object with a \"requests\" array"
                    .to_owned(),
            )),
        },
        other => Err(IngestError::InvalidBatch(format!(
            "body must be a JSON array of objects or an object with a \"requests\" array, found {}",
            kind(&other)
        ))),
    }
}

fn parse_ndjson(body: &[u8]) -> Result<Vec<Value>, IngestError> {
    body.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(number, line)| {
            serde_json::from_slice::<Strict>(line)
                .map(|Strict(value)| value)
                .map_err(|e| json_error(&e, Some(number + 1)))
        })
        .collect()
}

/// Checks the quoting RFC 4180 prescribes, which the `csv` reader forgives
/// (it reads an unterminated quoted field to the end of the file, and takes
/// a bare quote as text): a field is quoted from its first character to a
/// closing quote followed by a comma, a line end or the end of the body, a
/// quote inside it doubled; an unquoted field holds no quote at all.
fn check_quotes(body: &[u8]) -> Result<(), CsvError> {
    enum State {
        FieldStart,
        Unquoted,
        Quoted { from: u64 },
        QuoteInQuoted { from: u64 },
    }
    let mut state = State::FieldStart;
    let mut line = 1;
    for &byte in body {
        state = match (state, byte) {
            (State::FieldStart, b'"') => State::Quoted { from: line },
            (State::FieldStart | State::Unquoted, b',' | b'\r' | b'\n') => State::FieldStart,
            (State::Unquoted, b'"') => {
                return Err(CsvError::Quote {
                    line,
                    reason: "a quote inside an unquoted field (quote the whole field and double the quote: \"a\"\"b\")",
                });
            }
            (State::FieldStart | State::Unquoted, _) => State::Unquoted,
            (State::Quoted { from }, b'"') => State::QuoteInQuoted { from },
            (quoted @ State::Quoted { .. }, _) => quoted,
            (State::QuoteInQuoted { from }, b'"') => State::Quoted { from },
            (State::QuoteInQuoted { .. }, b',' | b'\r' | b'\n') => State::FieldStart,
            (State::QuoteInQuoted { from }, _) => {
                return Err(CsvError::Quote {
                    line: from,
                    reason: "text after the closing quote of the quoted field that starts here (a quote inside a quoted field is doubled: \"a\"\"b\")",
                });
            }
        };
        if byte == b'\n' {
            line += 1;
        }
    }
    match state {
        State::Quoted { from } => Err(CsvError::Quote {
            line: from,
            reason: "the quoted field that starts here is never closed",
        }),
        _ => Ok(()),
    }
}

fn parse_csv(body: &[u8]) -> Result<Vec<Value>, CsvError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(CsvError::Empty);
    }
    check_quotes(body)?;
    // The reader's own line numbers can lag by one after CRLF line ends:
    // count the line feeds up to the record's first byte instead (only when
    // reporting an error).
    let line_at = |position: Option<&csv::Position>| {
        let end = position.map_or(0, |p| usize::try_from(p.byte()).unwrap_or(usize::MAX));
        let upto = body.get(..=end).unwrap_or(body);
        1 + upto.iter().filter(|&&b| b == b'\n').count() as u64
    };
    let malformed = |error: csv::Error| {
        let line = line_at(error.position());
        let reason = match error.into_kind() {
            csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_owned(),
            other => format!("{other:?}"),
        };
        CsvError::Malformed { line, reason }
    };
    // Flexible, so that a row of the wrong width is reported by us, with the
    // counts, rather than as the reader's own error.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let mut records = reader.records();
    let header = records.next().ok_or(CsvError::Empty)?.map_err(malformed)?;
    let line = line_at(header.position());
    let mut names: Vec<String> = Vec::with_capacity(header.len());
    for (column, name) in header.iter().enumerate() {
        if name.is_empty() {
            return Err(CsvError::EmptyHeader {
                line,
                column: column + 1,
            });
        }
        if name.contains('\0') {
            return Err(CsvError::InvalidHeader {
                line,
                name: name.to_owned(),
            });
        }
        if names.iter().any(|n| n == name) {
            return Err(CsvError::DuplicateHeader {
                line,
                name: name.to_owned(),
            });
        }
        names.push(name.to_owned());
    }
    let mut objects = Vec::new();
    for record in records {
        let record = record.map_err(malformed)?;
        if record.len() != names.len() {
            return Err(CsvError::FieldCount {
                line: line_at(record.position()),
                expected: names.len(),
                found: record.len(),
            });
        }
        let object: Map<String, Value> = names
            .iter()
            .zip(record.iter())
            .map(|(name, cell)| (name.clone(), Value::String(cell.to_owned())))
            .collect();
        objects.push(Value::Object(object));
    }
    if objects.is_empty() {
        return Err(CsvError::NoRows);
    }
    Ok(objects)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks an idempotency key: 1 to 255 visible ASCII characters.
///
/// # Errors
/// [`IngestError::InvalidIdempotencyKey`] otherwise.
pub fn validate_idempotency_key(key: &str) -> Result<(), IngestError> {
    let valid = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(())
    } else {
        Err(IngestError::InvalidIdempotencyKey)
    }
}

/// SHA-256 of a request body, lowercase hex.
pub fn request_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Builds a batch from parsed request objects.
///
/// # Errors
/// Every [`IngestError`] that concerns the items: empty, too many, an element
/// that is not an object, or an object too large to store.
pub fn build_batch(
    values: Vec<Value>,
    rules: &IngestRules,
    idempotency: Option<Idempotency>,
    now: DateTime<Utc>,
) -> Result<NewBatch, IngestError> {
    if values.is_empty() {
        return Err(IngestError::EmptyBatch);
    }
    let batch_id = BatchId::random();
    if values.len() > rules.max_items {
        return Err(IngestError::TooManyItems {
            count: values.len(),
            max: rules.max_items,
        });
    }
    let mut vendor_counts = VendorCounts::new();
    let total_items = values.len() as u64;
    let mut items = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        let object = match value {
            Value::Object(object) => object,
            other => {
                return Err(IngestError::ItemNotObject {
                    index,
                    found: kind(&other),
                });
            }
        };
        check_numbers(index, &object)?;
        let request_id = scalar_text(object.get(&rules.request_id_field));
        let vendor_name = scalar_text(object.get(&rules.vendor_field))
            .unwrap_or_else(|| UNKNOWN_VENDOR.to_owned());
        let item_sequence = ItemSequence(u32::try_from(index + 1).unwrap_or(u32::MAX));
        let item = NewItem {
            item_id: ItemId::of(&batch_id, item_sequence),
            item_sequence,
            request_id,
            vendor_name,
            request_data: object,
        };
        check_message(index, &batch_id, &item, total_items, rules)?;
        *vendor_counts.entry(item.vendor_name.clone()).or_default() += 1;
        items.push(item);
    }
    Ok(NewBatch {
        batch_id,
        stream: rules.stream.clone(),
        created_at: now,
        items,
        vendor_counts,
        idempotency,
        submitted_by: None,
        traceparent: None,
    })
}

/// A string or number field as text; anything else (absent, null, objects)
/// as `None`.
fn scalar_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// BSON has no unsigned 64-bit integer: an integer above `i64::MAX` cannot be
/// stored unchanged, so it is refused rather than silently altered. The
/// JSON Pointer to it is built only when one is found.
fn check_numbers(index: usize, object: &Map<String, Value>) -> Result<(), IngestError> {
    /// The first such integer: its path segments, innermost first, and its text.
    fn find(value: &Value) -> Option<(Vec<String>, String)> {
        match value {
            Value::Number(n) if n.is_u64() && !n.is_i64() => Some((Vec::new(), n.to_string())),
            Value::Array(values) => values.iter().enumerate().find_map(|(i, v)| {
                find(v).map(|(mut path, n)| {
                    path.push(i.to_string());
                    (path, n)
                })
            }),
            Value::Object(map) => find_in(map),
            _ => None,
        }
    }
    fn find_in(map: &Map<String, Value>) -> Option<(Vec<String>, String)> {
        map.iter().find_map(|(key, v)| {
            find(v).map(|(mut path, n)| {
                path.push(key.replace('~', "~0").replace('/', "~1"));
                (path, n)
            })
        })
    }
    match find_in(object) {
        None => Ok(()),
        Some((segments, number)) => Err(IngestError::NumberOutOfRange {
            index,
            path: segments.iter().rev().map(|s| format!("/{s}")).collect(),
            number,
        }),
    }
}

/// The longest a `traceparent` attribute can be (version 00).
const TRACEPARENT_BYTES: usize = 55;

/// Checks the message the relay will build for `item` against Pub/Sub's
/// limits, before anything is stored: its sequence, still unknown, is taken
/// at its longest, and so is the trace context the writer adds.
fn check_message(
    index: usize,
    batch_id: &BatchId,
    item: &NewItem,
    total_items: u64,
    rules: &IngestRules,
) -> Result<(), IngestError> {
    let traceparent = "0".repeat(TRACEPARENT_BYTES);
    let message = ItemMessage {
        stream: &rules.stream,
        batch_id,
        item_id: &item.item_id,
        batch_sequence: Sequence(u64::MAX),
        item_sequence: item.item_sequence,
        request_id: item.request_id.as_deref(),
        vendor_name: &item.vendor_name,
        payload: &item.request_data,
        total_items,
        traceparent: Some(&traceparent),
    };
    match message.check_limits(&rules.ordering) {
        Ok(()) => Ok(()),
        Err(LimitViolation::MessageTooLarge { bytes, limit }) => Err(IngestError::ItemTooLarge {
            index,
            bytes,
            max: limit,
        }),
        Err(LimitViolation::AttributeTooLong { name, bytes, limit }) => {
            // The attribute is named after the field it copies.
            let field = match name.as_str() {
                "request_id" => rules.request_id_field.clone(),
                "vendor_name" => rules.vendor_field.clone(),
                other => other.to_owned(),
            };
            Err(IngestError::AttributeTooLong {
                index,
                field,
                bytes,
                max: limit,
            })
        }
        // Our attribute names and keys are ours, and short; an ordering key
        // over the limit is hashed. Still, never store what cannot go out.
        Err(other) => Err(IngestError::InvalidBatch(format!("item {index}: {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn build(values: Vec<Value>) -> Result<NewBatch, IngestError> {
        build_batch(values, &IngestRules::default(), None, Utc::now())
    }

    #[test]
    fn array_and_requests_wrapper_parse_alike() {
        let array = parse_body(br#"[{"a":1},{"b":2}]"#, BodyFormat::Json).unwrap();
        let wrapped = parse_body(br#"{"requests":[{"a":1},{"b":2}]}"#, BodyFormat::Json).unwrap();
        assert_eq!(array, wrapped);
        assert_eq!(array.len(), 2);
    }

    #[test]
    fn ndjson_skips_blank_lines_and_names_the_bad_line() {
        let ok = parse_body(b"{\"a\":1}\n\n{\"b\":2}\n", BodyFormat::NdJson).unwrap();
        assert_eq!(ok.len(), 2);
        let err = parse_body(b"{\"a\":1}\n{oops}\n", BodyFormat::NdJson).unwrap_err();
        assert!(
            matches!(err, IngestError::InvalidJson(ref m) if m.starts_with("line 2:")),
            "{err}"
        );
    }

    #[test]
    fn wrong_shapes_are_invalid_batches() {
        for body in [&br#"{"x":[]}"#[..], br#"{"requests":{}}"#, b"42", br#""s""#] {
            let err = parse_body(body, BodyFormat::Json).unwrap_err();
            assert!(matches!(err, IngestError::InvalidBatch(_)), "{err}");
        }
        assert!(matches!(
            parse_body(b"[{", BodyFormat::Json),
            Err(IngestError::InvalidJson(_))
        ));
    }

    #[test]
    fn extracts_request_ids_and_counts_vendors() {
        let batch = build(vec![
            json!({"request_id": "r-1", "vendor_name": "acme"}),
            json!({"request_id": 42, "vendor_name": "acme"}),
            json!({"vendor_name": "globex"}),
            json!({"request_id": null}),
        ])
        .unwrap();
        let ids: Vec<_> = batch
            .items
            .iter()
            .map(|i| i.request_id.as_deref())
            .collect();
        assert_eq!(ids, [Some("r-1"), Some("42"), None, None]);
        let sequences: Vec<_> = batch.items.iter().map(|i| i.item_sequence.0).collect();
        assert_eq!(sequences, [1, 2, 3, 4]);
        let counts: Vec<_> = batch
            .vendor_counts
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(counts, [("acme", 2), ("globex", 1), ("unknown", 1)]);
        assert_eq!(
            batch.items[0].request_data,
            json!({"request_id": "r-1", "vendor_name": "acme"})
                .as_object()
                .unwrap()
                .clone()
        );
    }

    #[test]
    fn configured_field_names_are_used() {
        let rules = IngestRules {
            request_id_field: "rid".into(),
            vendor_field: "v".into(),
            max_items: 10,
            ..IngestRules::default()
        };
        let batch = build_batch(
            vec![json!({"rid": "x", "v": "y"})],
            &rules,
            None,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(batch.items[0].request_id.as_deref(), Some("x"));
        assert_eq!(batch.items[0].vendor_name, "y");
    }

    #[test]
    fn rejects_empty_too_many_and_non_objects() {
        assert_eq!(build(vec![]), Err(IngestError::EmptyBatch));
        let rules = IngestRules {
            max_items: 2,
            ..IngestRules::default()
        };
        assert_eq!(
            build_batch(vec![json!({}); 3], &rules, None, Utc::now()),
            Err(IngestError::TooManyItems { count: 3, max: 2 })
        );
        assert_eq!(
            build(vec![json!({}), json!([1])]),
            Err(IngestError::ItemNotObject {
                index: 1,
                found: "an array"
            })
        );
    }

    #[test]
    fn rejects_integers_bson_cannot_hold_and_names_where() {
        let rules = IngestRules::default();
        let values = vec![
            json!({"ok": i64::MAX, "neg": i64::MIN}),
            json!({"a": {"b/c": [1, u64::MAX]}}),
        ];
        let err = build_batch(values, &rules, None, Utc::now()).unwrap_err();
        assert_eq!(
            err,
            IngestError::NumberOutOfRange {
                index: 1,
                path: "/a/b~1c/1".into(),
                number: u64::MAX.to_string(),
            }
        );
        assert!(
            build_batch(
                vec![json!({"x": i64::MAX, "f": 1.5e300})],
                &rules,
                None,
                Utc::now()
            )
            .is_ok()
        );
    }

    #[test]
    fn refuses_an_item_whose_message_pubsub_would_refuse() {
        use crate::publish::limits::{MAX_MESSAGE_BYTES, REQUEST_RESERVE_BYTES};
        // 10.5 MB of JSON: Pub/Sub takes at most 10 MB a message.
        let err = build(vec![json!({}), json!({"blob": "x".repeat(10_500_000)})]).unwrap_err();
        assert!(
            matches!(err, IngestError::ItemTooLarge { index: 1, max, .. } if max == MAX_MESSAGE_BYTES - REQUEST_RESERVE_BYTES),
            "{err}"
        );
        // The envelope and attributes count: a payload just under the
        // limit on its own is still too large as a message.
        let near = "x".repeat(MAX_MESSAGE_BYTES - REQUEST_RESERVE_BYTES - 100);
        assert!(matches!(
            build(vec![json!({"blob": near})]),
            Err(IngestError::ItemTooLarge { index: 0, .. })
        ));
        let fits = "x".repeat(MAX_MESSAGE_BYTES - REQUEST_RESERVE_BYTES - 2_000);
        assert!(build(vec![json!({"blob": fits})]).is_ok());
        // Fields copied into attributes: at most 1,024 bytes each.
        let long = "é".repeat(600); // 1,200 bytes, 600 characters
        assert_eq!(
            build(vec![
                json!({"request_id": "ok"}),
                json!({"request_id": long})
            ]),
            Err(IngestError::AttributeTooLong {
                index: 1,
                field: "request_id".into(),
                bytes: 1200,
                max: 1024
            })
        );
        assert!(matches!(
            build(vec![json!({"vendor_name": "v".repeat(1025)})]),
            Err(IngestError::AttributeTooLong { index: 0, ref field, .. }) if field == "vendor_name"
        ));
        assert!(
            build(vec![
                json!({"vendor_name": "v".repeat(1024), "request_id": "r".repeat(1024)})
            ])
            .is_ok()
        );
        // A configured field name is the one named.
        let rules = IngestRules {
            request_id_field: "rid".into(),
            ..IngestRules::default()
        };
        assert!(matches!(
            build_batch(vec![json!({"rid": "r".repeat(2000)})], &rules, None, Utc::now()),
            Err(IngestError::AttributeTooLong { ref field, .. }) if field == "rid"
        ));
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_255() {
        assert!(validate_idempotency_key("abc-123_XYZ:~").is_ok());
        assert!(validate_idempotency_key(&"k".repeat(255)).is_ok());
        for bad in ["", "has space", "tab\t", "é", &"k".repeat(256)] {
            assert_eq!(
                validate_idempotency_key(bad),
                Err(IngestError::InvalidIdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn request_hash_is_stable_sha256() {
        assert_eq!(
            request_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn duplicate_keys_and_nul_keys_are_refused_and_say_where() {
        let duplicate = parse_body(br#"[{"a": 1, "b": {"c": 1, "c": 2}}]"#, BodyFormat::Json);
        assert!(
            matches!(&duplicate, Err(IngestError::DuplicateKey(m)) if m.contains("\"c\"") && m.contains("column")),
            "{duplicate:?}"
        );
        let nul = parse_body(b"{\"x\": 1}\n{\"a\\u0000b\": 1}", BodyFormat::NdJson);
        assert!(
            matches!(&nul, Err(IngestError::InvalidKey(m)) if m.starts_with("line 2")),
            "{nul:?}"
        );
        let fine = parse_body(br#"[{"a": 1, "b": {"a": 1}}, {"a": 2}]"#, BodyFormat::Json).unwrap();
        assert_eq!(fine.len(), 2);
    }

    fn csv(body: &[u8]) -> Result<Vec<Value>, IngestError> {
        parse_body(body, BodyFormat::Csv)
    }

    fn csv_error(body: &[u8]) -> CsvError {
        match csv(body) {
            Err(IngestError::Csv(e)) => e,
            other => panic!("expected a CSV error, got {other:?}"),
        }
    }

    #[test]
    fn csv_rows_become_objects_of_strings() {
        let body = "\u{feff}request_id,vendor_name,note\r\n\
                    r1,acme,\"a, \"\"quoted\"\"\r\nline\"\r\n\
                    r2,,\r\n";
        let rows = csv(body.as_bytes()).unwrap();
        assert_eq!(
            rows,
            vec![
                json!({"request_id": "r1", "vendor_name": "acme", "note": "a, \"quoted\"\r\nline"}),
                json!({"request_id": "r2", "vendor_name": "", "note": ""}),
            ]
        );
        // LF line ends and no BOM read the same; keys keep the header's order.
        let lf = csv(b"b,a\n1,2\n").unwrap();
        assert_eq!(
            serde_json::to_string(&lf).unwrap(),
            r#"[{"b":"1","a":"2"}]"#
        );
        let batch = build(rows).unwrap();
        assert_eq!(batch.items[0].request_id.as_deref(), Some("r1"));
        assert_eq!(batch.items[0].vendor_name, "acme");
    }

    #[test]
    fn csv_errors_name_their_line() {
        assert_eq!(csv_error(b""), CsvError::Empty);
        assert_eq!(csv_error(b"\xEF\xBB\xBF\r\n"), CsvError::Empty);
        assert_eq!(csv_error(b"a,b\r\n"), CsvError::NoRows);
        assert_eq!(
            csv_error(b"a,b\n1,2\n3\n"),
            CsvError::FieldCount {
                line: 3,
                expected: 2,
                found: 1
            }
        );
        assert_eq!(
            csv_error(b"a,b\r\n1,2\r\n3\r\n"),
            CsvError::FieldCount {
                line: 3,
                expected: 2,
                found: 1
            }
        );
        assert_eq!(
            csv_error(b"a,b\n1,2,3\n"),
            CsvError::FieldCount {
                line: 2,
                expected: 2,
                found: 3
            }
        );
        assert_eq!(
            csv_error(b"a,,c\n1,2,3\n"),
            CsvError::EmptyHeader { line: 1, column: 2 }
        );
        assert_eq!(
            csv_error(b"a,b,a\n1,2,3\n"),
            CsvError::DuplicateHeader {
                line: 1,
                name: "a".to_owned()
            }
        );
        let bad = csv_error(b"a,b\n1,2\n\xff,3\n");
        assert!(
            matches!(bad, CsvError::Malformed { line: 3, ref reason } if reason.contains("UTF-8")),
            "{bad:?}"
        );
        // A quoted newline moves the next row's line on.
        assert_eq!(csv_error(b"a,b\n\"x\ny\",2\n3\n").line(), Some(4));
    }

    #[test]
    fn csv_quotes_out_of_place_are_refused_where_they_start() {
        // An unterminated quote would swallow every later row into one cell.
        let unterminated = csv_error(b"request_id,vendor_name\nm1,\"unterminated\nm2,acme\n");
        assert!(
            matches!(unterminated, CsvError::Quote { line: 2, reason } if reason.contains("never closed")),
            "{unterminated:?}"
        );
        let bare = csv_error(b"a,b\r\n1,2\r\nab\"cd,3\r\n");
        assert!(
            matches!(bare, CsvError::Quote { line: 3, reason } if reason.contains("unquoted")),
            "{bare:?}"
        );
        let after = csv_error(b"a,b\n\"x\ny\"z,2\n");
        assert!(
            matches!(after, CsvError::Quote { line: 2, reason } if reason.contains("after the closing quote")),
            "{after:?}"
        );
        // What RFC 4180 allows still reads: doubled quotes, quoted line
        // ends, an empty quoted field, a quoted last field without a line end.
        let rows = csv(b"a,b\n\"x\"\"y\",\"\"\n\"1\r\n2\",\"end\"").unwrap();
        assert_eq!(
            rows,
            vec![
                json!({"a": "x\"y", "b": ""}),
                json!({"a": "1\r\n2", "b": "end"})
            ]
        );
    }
}
