//! Turning a request body into a validated [`NewBatch`].
//!
//! Validation happens before anything is written: a batch that fails here
//! changes nothing in the store.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::claim_check::{self, ClaimCheck, Location, Reference, StoredPayload};
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
    /// The stream's claim-check store, when it has one: items too large for
    /// a message (or above its threshold) go there.
    pub claim_check: Option<ClaimCheckRules>,
}

/// Which items go to a claim-check store, and how large one may be.
#[derive(Clone, Debug)]
pub struct ClaimCheckRules {
    pub setting: ClaimCheck,
    pub location: Location,
    /// The largest payload accepted (`MAX_ITEM_BYTES`).
    pub max_item_bytes: u64,
}

impl Default for IngestRules {
    fn default() -> Self {
        Self {
            request_id_field: "request_id".to_owned(),
            vendor_field: "vendor_name".to_owned(),
            max_items: 10_000,
            ordering: OrderingKeyMode::Global,
            stream: StreamName::default_stream(),
            claim_check: None,
        }
    }
}

/// Why a request body is not a valid batch. Each variant is a client error.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
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
    /// Parsing stops at the first item past the limit, so `count` is at
    /// most `max + 1`.
    #[error("batch has more than {max} items, the limit")]
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
    /// The item is over what the stream's claim-check store takes
    /// (`MAX_ITEM_BYTES`).
    #[error("item {index} is {bytes} bytes, over the limit of {max} bytes for one item")]
    ItemOverLimit { index: usize, bytes: u64, max: u64 },
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
    #[error("idempotency key must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    #[error(transparent)]
    Csv(#[from] CsvError),
}

/// Why a CSV body is not a table of rows under one header row. Every variant
/// but `Empty` and `NoRows` names the line (1-based, counting the header).
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum CsvError {
    #[error("the CSV body is empty: send a header row and at least one row")]
    Empty,
    #[error("the CSV body has a header row but no rows")]
    NoRows,
    /// More rows than a batch may have items (parsing stopped there).
    #[error("the CSV body has more rows than a batch may have items")]
    TooManyRows,
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
            Self::Empty | Self::NoRows | Self::TooManyRows => None,
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

/// Parses a body into its request objects (not yet checked to be objects),
/// stopping at the first one past `max_items`: a body of more items is
/// refused before it is all in memory.
///
/// # Errors
/// [`IngestError::InvalidJson`] for malformed JSON,
/// [`IngestError::InvalidBatch`] for JSON of the wrong shape and
/// [`IngestError::TooManyItems`] past `max_items`.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    max_items: usize,
) -> Result<Vec<Value>, IngestError> {
    let too_many = || IngestError::TooManyItems {
        count: max_items.saturating_add(1),
        max: max_items,
    };
    match format {
        BodyFormat::Json => parse_json(body, max_items),
        BodyFormat::NdJson => parse_ndjson(body, max_items),
        BodyFormat::Csv => parse_csv(body, max_items).map_err(IngestError::Csv),
    }
    .map_err(|e| match e {
        IngestError::InvalidJson(message) if message.contains(TOO_MANY_ITEMS) => too_many(),
        IngestError::Csv(CsvError::TooManyRows) => too_many(),
        other => other,
    })
}

/// What the parser says when it stops at the item past the limit.
const TOO_MANY_ITEMS: &str = "more items than the batch limit";

/// A rough bound on the memory a parse of `body` takes, in bytes: the body
/// itself and 200 bytes for each value (a JSON value or a CSV cell, counted
/// by their separators in one pass over the bytes; a key and its value in a
/// map, a string's header and allocation, the map's index; measured at up
/// to 180 bytes a name for a CSV header of millions of names). Small values are
/// what makes a body expand: `[0,0,...]` or a CSV of empty cells take some
/// 15 to 100 times their size once parsed. The writer reserves this much of
/// its parse budget before it parses.
pub fn parse_cost(body: &[u8], format: BodyFormat) -> usize {
    const PER_VALUE: usize = 200;
    let mut values = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in body {
        if in_string {
            match (format, escaped, byte) {
                // JSON strings escape with a backslash; CSV fields only
                // double their quotes (`""`: out and back in).
                (BodyFormat::Csv, _, b'"') => in_string = false,
                (BodyFormat::Csv, _, _) => {}
                (_, true, _) => escaped = false,
                (_, false, b'\\') => escaped = true,
                (_, false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match (format, byte) {
            (_, b'"') => in_string = true,
            (BodyFormat::Csv, b',' | b'\n') => values += 1,
            (BodyFormat::Json | BodyFormat::NdJson, b',' | b':' | b'[' | b'{') => values += 1,
            _ => {}
        }
    }
    body.len().saturating_add(values.saturating_mul(PER_VALUE))
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

/// The body's top level (`top`): an array of items, or an object whose
/// `requests` array holds them (its other members are skipped unparsed);
/// below it (`!top`), the value of `requests`. Either array is read item by
/// item and refused at the first item past `max`.
struct Body {
    max: usize,
    top: bool,
}

/// What the top level held: the items, or the shape of what it was instead.
enum TopLevel {
    Items(Vec<Value>),
    NoRequests,
    Requests(&'static str),
    Other(&'static str),
}

impl<'de> serde::de::DeserializeSeed<'de> for Body {
    type Value = TopLevel;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<TopLevel, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Body {
    fn other(&self, found: &'static str) -> TopLevel {
        if self.top {
            TopLevel::Other(found)
        } else {
            TopLevel::Requests(found)
        }
    }
}

impl<'de> serde::de::Visitor<'de> for Body {
    type Value = TopLevel;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of objects or an object with a \"requests\" array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<TopLevel, A::Error> {
        Items { max: self.max }.visit_seq(seq).map(TopLevel::Items)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        use serde::de::Error;
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if !self.top || key != "requests" {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            if found.is_some() {
                return Err(A::Error::custom(format!(
                    "{DUPLICATE_KEY} \"requests\" in one object"
                )));
            }
            found = Some(map.next_value_seed(Body {
                max: self.max,
                top: false,
            })?);
        }
        Ok(match found {
            Some(found) => found,
            None if self.top => TopLevel::NoRequests,
            None => TopLevel::Requests("an object"),
        })
    }

    fn visit_bool<E>(self, _: bool) -> Result<TopLevel, E> {
        Ok(self.other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<TopLevel, E> {
        Ok(self.other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<TopLevel, E> {
        Ok(self.other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<TopLevel, E> {
        Ok(self.other("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<TopLevel, E> {
        Ok(self.other("a string"))
    }
    fn visit_unit<E>(self) -> Result<TopLevel, E> {
        Ok(self.other("null"))
    }
}

/// An array of strictly parsed values, refused past `max` elements.
struct Items {
    max: usize,
}

impl<'de> serde::de::Visitor<'de> for Items {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of items")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        use serde::de::Error;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max).min(4096));
        while let Some(Strict(item)) = seq.next_element()? {
            if items.len() == self.max {
                return Err(A::Error::custom(TOO_MANY_ITEMS));
            }
            items.push(item);
        }
        Ok(items)
    }
}

fn parse_json(body: &[u8], max_items: usize) -> Result<Vec<Value>, IngestError> {
    use serde::de::DeserializeSeed;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let top = Body {
        max: max_items,
        top: true,
    }
    .deserialize(&mut deserializer)
    .and_then(|top| deserializer.end().map(|()| top))
    .map_err(|e| json_error(&e, None))?;
    let shape = "body must be a JSON array of objects or an object with a \"requests\" array";
    match top {
        TopLevel::Items(items) => Ok(items),
        TopLevel::Requests(found) => Err(IngestError::InvalidBatch(format!(
            "\"requests\" must be an array, found {found}"
        ))),
        TopLevel::NoRequests => Err(IngestError::InvalidBatch(shape.to_owned())),
        TopLevel::Other(found) => Err(IngestError::InvalidBatch(format!("{shape}, found {found}"))),
    }
}

fn parse_ndjson(body: &[u8], max_items: usize) -> Result<Vec<Value>, IngestError> {
    let mut items = Vec::new();
    let lines = body
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace));
    for (number, line) in lines {
        if items.len() == max_items {
            return Err(IngestError::InvalidJson(TOO_MANY_ITEMS.to_owned()));
        }
        let Strict(value) =
            serde_json::from_slice::<Strict>(line).map_err(|e| json_error(&e, Some(number + 1)))?;
        items.push(value);
    }
    Ok(items)
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

fn parse_csv(body: &[u8], max_items: usize) -> Result<Vec<Value>, CsvError> {
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
    let mut seen = std::collections::HashSet::with_capacity(header.len());
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
        if !seen.insert(name) {
            return Err(CsvError::DuplicateHeader {
                line,
                name: name.to_owned(),
            });
        }
        names.push(name.to_owned());
    }
    let mut objects = Vec::new();
    for record in records {
        if objects.len() == max_items {
            return Err(CsvError::TooManyRows);
        }
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
        let request_id = scalar_text(object.get(&rules.request_id_field));
        let vendor_name = scalar_text(object.get(&rules.vendor_field))
            .unwrap_or_else(|| UNKNOWN_VENDOR.to_owned());
        if vendor_name.contains('\0') {
            // Vendors are counted under their names as keys of the batch
            // document, and MongoDB keys cannot hold a NUL.
            return Err(IngestError::InvalidKey(format!(
                "item {index}: {} has a NUL character, which MongoDB cannot store as a key",
                rules.vendor_field
            )));
        }
        let item_sequence = ItemSequence(u32::try_from(index + 1).unwrap_or(u32::MAX));
        let mut item = NewItem {
            item_id: ItemId::of(&batch_id, item_sequence),
            item_sequence,
            request_id,
            vendor_name,
            request_data: object,
            stored: None,
        };
        let inline = check_message(index, &batch_id, &item, total_items, rules);
        match &rules.claim_check {
            Some(claim_check) if to_store(&inline, &item, claim_check) => {
                item.stored = Some(stored_payload(index, &batch_id, &item, rules, claim_check)?);
                check_message(index, &batch_id, &item, total_items, rules)?;
            }
            _ => inline?,
        }
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

/// Whether an item goes to the claim-check store: its message would be
/// over Pub/Sub's size limit, or its payload is above the threshold.
fn to_store(
    inline: &Result<(), IngestError>,
    item: &NewItem,
    claim_check: &ClaimCheckRules,
) -> bool {
    match inline {
        Err(IngestError::ItemTooLarge { .. }) => true,
        Err(_) => false,
        Ok(()) => {
            claim_check.setting.above_bytes.is_some()
                && claim_check
                    .setting
                    .stores(claim_check::payload_bytes(&item.request_data), true)
        }
    }
}

/// The reference an item's payload will be stored under (its digest is
/// taken here, as the payload is serialized, without a copy of it).
fn stored_payload(
    index: usize,
    batch_id: &BatchId,
    item: &NewItem,
    rules: &IngestRules,
    claim_check: &ClaimCheckRules,
) -> Result<StoredPayload, IngestError> {
    let (sha256, bytes) = claim_check::digest_of(&item.request_data);
    if bytes > claim_check.max_item_bytes {
        return Err(IngestError::ItemOverLimit {
            index,
            bytes,
            max: claim_check.max_item_bytes,
        });
    }
    let field_key = matches!(rules.ordering, OrderingKeyMode::Field { .. })
        .then(|| rules.ordering.key_for_payload(batch_id, &item.request_data))
        .flatten();
    Ok(StoredPayload {
        reference: Reference {
            url: claim_check.location.object_url(&sha256),
            sha256,
            bytes,
        },
        field_key,
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
        stored: item.stored.as_ref(),
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
        let array = parse_body(br#"[{"a":1},{"b":2}]"#, BodyFormat::Json, 10_000).unwrap();
        let wrapped = parse_body(
            br#"{"requests":[{"a":1},{"b":2}]}"#,
            BodyFormat::Json,
            10_000,
        )
        .unwrap();
        assert_eq!(array, wrapped);
        assert_eq!(array.len(), 2);
    }

    #[test]
    fn ndjson_skips_blank_lines_and_names_the_bad_line() {
        let ok = parse_body(b"{\"a\":1}\n\n{\"b\":2}\n", BodyFormat::NdJson, 10_000).unwrap();
        assert_eq!(ok.len(), 2);
        let err = parse_body(b"{\"a\":1}\n{oops}\n", BodyFormat::NdJson, 10_000).unwrap_err();
        assert!(
            matches!(err, IngestError::InvalidJson(ref m) if m.starts_with("line 2:")),
            "{err}"
        );
    }

    #[test]
    fn wrong_shapes_are_invalid_batches() {
        for body in [&br#"{"x":[]}"#[..], br#"{"requests":{}}"#, b"42", br#""s""#] {
            let err = parse_body(body, BodyFormat::Json, 10_000).unwrap_err();
            assert!(matches!(err, IngestError::InvalidBatch(_)), "{err}");
        }
        assert!(matches!(
            parse_body(b"[{", BodyFormat::Json, 10_000),
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
    fn integers_of_the_whole_64_bit_range_are_taken_as_sent() {
        let values = vec![json!({"ok": i64::MAX, "neg": i64::MIN, "a": {"b/c": [1, u64::MAX]}})];
        let batch = build(values.clone()).unwrap();
        assert_eq!(
            Value::Object(batch.items[0].request_data.clone()),
            values[0]
        );
    }

    #[test]
    fn parsing_stops_at_the_first_item_past_the_limit() {
        let too_many = IngestError::TooManyItems { count: 3, max: 2 };
        for (body, format) in [
            (&b"[{},{},{}]"[..], BodyFormat::Json),
            (br#"{"requests":[{},{},{}],"x":1}"#, BodyFormat::Json),
            (b"{}\n{}\n{}\n", BodyFormat::NdJson),
            (b"a\n1\n2\n3\n", BodyFormat::Csv),
        ] {
            assert_eq!(
                parse_body(body, format, 2),
                Err(too_many.clone()),
                "{format:?}"
            );
            assert_eq!(parse_body(body, format, 3).unwrap().len(), 3, "{format:?}");
        }
        // The rest of the body is never read: what follows the limit's item
        // may be anything.
        assert_eq!(
            parse_body(b"[{},{},{},oops", BodyFormat::Json, 2),
            Err(too_many.clone())
        );
        assert_eq!(
            parse_body(b"{}\n{}\n{}\n{oops", BodyFormat::NdJson, 2),
            Err(too_many)
        );
        // Other members of the wrapper are skipped, not kept.
        assert_eq!(
            parse_body(
                br#"{"x":[[[1]]],"requests":[{"a":1}]}"#,
                BodyFormat::Json,
                5
            )
            .unwrap(),
            vec![json!({"a": 1})]
        );
        assert!(matches!(
            parse_body(br#"{"requests":{"requests":[{}]}}"#, BodyFormat::Json, 5),
            Err(IngestError::InvalidBatch(_))
        ));
        assert!(matches!(
            parse_body(br#"{"requests":[{}],"requests":[{}]}"#, BodyFormat::Json, 5),
            Err(IngestError::DuplicateKey(_))
        ));
    }

    #[test]
    fn parse_cost_counts_small_values() {
        // Small values cost far more than their bytes once parsed.
        let zeros = format!("[{}0]", "0,".repeat(10_000));
        assert!(parse_cost(zeros.as_bytes(), BodyFormat::Json) >= 100 * 10_000);
        // Separators inside strings are text, not values.
        let text = format!("[\"{}\"]", ",".repeat(10_000));
        assert!(parse_cost(text.as_bytes(), BodyFormat::Json) < 2 * text.len());
        let csv = format!("a,b\n{}", ",\n".repeat(10_000));
        assert!(parse_cost(csv.as_bytes(), BodyFormat::Csv) >= 100 * 20_000);
        // A CSV field holding a backslash before its closing quote is one
        // field: the cells after it still count (no JSON escapes in CSV).
        let tricky = format!("a,b\n{}", "\"\\\",\n".repeat(10_000));
        assert!(parse_cost(tricky.as_bytes(), BodyFormat::Csv) >= 100 * 20_000);
    }

    fn claim_checked(above_bytes: Option<u64>, ordering: OrderingKeyMode) -> IngestRules {
        IngestRules {
            ordering,
            claim_check: Some(ClaimCheckRules {
                setting: ClaimCheck {
                    url: "gs://acme-outbox/big".to_owned(),
                    above_bytes,
                },
                location: Location::parse("gs://acme-outbox/big").unwrap(),
                max_item_bytes: 20_000_000,
            }),
            ..IngestRules::default()
        }
    }

    #[test]
    fn with_a_store_an_item_too_large_for_a_message_goes_by_reference() {
        let big = json!({"vendor_name": "acme", "blob": "x".repeat(10_500_000)});
        let rules = claim_checked(None, OrderingKeyMode::Global);
        let batch =
            build_batch(vec![json!({"a": 1}), big.clone()], &rules, None, Utc::now()).unwrap();
        assert_eq!(batch.items[0].stored, None, "what fits stays inline");
        let stored = batch.items[1].stored.as_ref().unwrap();
        let text = serde_json::to_vec(&big).unwrap();
        assert_eq!(stored.reference.bytes, text.len() as u64);
        assert_eq!(stored.reference.sha256, claim_check::sha256_hex(&text));
        assert_eq!(
            stored.reference.url,
            format!("gs://acme-outbox/big/sha256/{}", stored.reference.sha256)
        );
        assert_eq!(
            claim_check::payload_text(&batch.items[1].request_data),
            text
        );
        // Over MAX_ITEM_BYTES: refused, whatever the store.
        let huge = json!({"blob": "x".repeat(20_000_000)});
        assert!(matches!(
            build_batch(vec![huge], &rules, None, Utc::now()),
            Err(IngestError::ItemOverLimit {
                index: 0,
                max: 20_000_000,
                ..
            })
        ));
        // A threshold stores smaller payloads too; a field mode keeps the
        // key taken from the payload.
        let rules = claim_checked(Some(100), "field:/customer".parse().unwrap());
        let items = vec![
            json!({"customer": "c-1", "note": "y".repeat(200)}),
            json!({"customer": "c-2"}),
        ];
        let batch = build_batch(items, &rules, None, Utc::now()).unwrap();
        let stored = batch.items[0].stored.as_ref().unwrap();
        assert_eq!(stored.field_key.as_deref(), Some("c-1"));
        assert_eq!(batch.items[1].stored, None);
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
        let duplicate = parse_body(
            br#"[{"a": 1, "b": {"c": 1, "c": 2}}]"#,
            BodyFormat::Json,
            10_000,
        );
        assert!(
            matches!(&duplicate, Err(IngestError::DuplicateKey(m)) if m.contains("\"c\"") && m.contains("column")),
            "{duplicate:?}"
        );
        let nul = parse_body(
            b"{\"x\": 1}\n{\"a\\u0000b\": 1}",
            BodyFormat::NdJson,
            10_000,
        );
        assert!(
            matches!(&nul, Err(IngestError::InvalidKey(m)) if m.starts_with("line 2")),
            "{nul:?}"
        );
        let fine = parse_body(
            br#"[{"a": 1, "b": {"a": 1}}, {"a": 2}]"#,
            BodyFormat::Json,
            10_000,
        )
        .unwrap();
        assert_eq!(fine.len(), 2);
    }

    fn csv(body: &[u8]) -> Result<Vec<Value>, IngestError> {
        parse_body(body, BodyFormat::Csv, 10_000)
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
