//! The writer's ingest parser on arbitrary bytes: the first byte picks the
//! format (JSON, NDJSON, CSV), the rest is the body.
//!
//! It must never panic, and whatever it accepts must be stored unchanged:
//! every item's `request_data` is the object parsed at its position, and
//! writing it out as JSON and parsing that again gives the same object (what
//! the relay publishes is what the client sent). A CSV body that is accepted
//! is well quoted by RFC 4180: its quotes come in pairs (a quoted field that
//! never closes would swallow the rows after it into one cell).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_core::ingest::{BodyFormat, IngestRules, build_batch, parse_body};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let format = match selector % 3 {
        0 => BodyFormat::Json,
        1 => BodyFormat::NdJson,
        _ => BodyFormat::Csv,
    };
    let Ok(values) = parse_body(body, format) else {
        return;
    };
    if format == BodyFormat::Csv {
        let quotes = body.iter().filter(|&&b| b == b'"').count();
        assert_eq!(quotes % 2, 0, "a CSV body with an unpaired quote was accepted");
    }
    let Ok(batch) = build_batch(values.clone(), &IngestRules::default(), None, chrono::Utc::now())
    else {
        return;
    };
    assert_eq!(batch.items.len(), values.len());
    for (position, (item, value)) in batch.items.iter().zip(&values).enumerate() {
        assert_eq!(item.item_sequence.0 as usize, position + 1);
        let object = Value::Object(item.request_data.clone());
        assert_eq!(&object, value, "request_data differs from the parsed object");
        let text = serde_json::to_vec(&object).expect("a parsed object serializes");
        let again = parse_body(&[b"[", &text[..], b"]"].concat(), BodyFormat::Json)
            .expect("a serialized item parses again");
        assert_eq!(again, [object], "the item does not round-trip through JSON");
    }
});
