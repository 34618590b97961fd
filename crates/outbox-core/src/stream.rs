//! Streams: independent, strictly ordered outboxes sharing one store.
//!
//! A stream has its own gap-free `batch_sequence`, its own fenced lease and
//! epoch, its Pub/Sub topic, ordering-key mode and poison policy, optionally
//! a JSON Schema every item must satisfy and the API key names allowed to
//! write it, and a paused flag. Streams run in parallel; within one, every
//! ordering and fencing rule of the outbox holds as before. The stream
//! `default` always exists: it is what the endpoints, variables and
//! documents without a stream mean.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::claim_check::ClaimCheck;
use crate::publish::OrderingKeyMode;

pub use crate::model::{InvalidStreamName, StreamName};

/// What to do with an item Pub/Sub will never accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoisonPolicy {
    /// Mark the batch failed and stop the stream until an operator retries it.
    #[default]
    Halt,
    /// Set the item aside in the dead-letter collection and go on.
    DeadLetter,
}

impl FromStr for PoisonPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "halt" => Ok(Self::Halt),
            "dead-letter" => Ok(Self::DeadLetter),
            other => Err(format!(
                "unknown poison policy {other:?} (halt or dead-letter)"
            )),
        }
    }
}

impl fmt::Display for PoisonPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Halt => "halt",
            Self::DeadLetter => "dead-letter",
        })
    }
}

/// How many streams a deployment may define (and so how many values the
/// `stream` label of a metric can take).
pub const DEFAULT_MAX_STREAMS: usize = 1000;

/// A stream's definition, as stored and as the admin API takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamDefinition {
    pub name: StreamName,
    /// The Pub/Sub topic (a name in the relay's project).
    pub topic: String,
    pub ordering: OrderingKeyMode,
    pub on_poison: PoisonPolicy,
    /// A JSON Schema every item must satisfy, when set.
    pub schema: Option<Value>,
    /// The API key names allowed to write the stream; `None`: any caller
    /// the writer admits.
    pub writers: Option<Vec<String>>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Where payloads too large for a message go (`claim_check`); `None`:
    /// the writers' `CLAIM_CHECK_URL`, if they have one.
    pub claim_check: Option<ClaimCheck>,
}

/// Why a definition cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidDefinition(pub String);

/// Pub/Sub's rule for a topic name: 3 to 255 characters, a letter first,
/// then letters, digits and `-_.~+%`, not starting with `goog`.
pub fn valid_topic(topic: &str) -> bool {
    (3..=255).contains(&topic.len())
        && topic.as_bytes()[0].is_ascii_alphabetic()
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+%".contains(&b))
        && !topic.to_ascii_lowercase().starts_with("goog")
}

impl StreamDefinition {
    /// Checks everything but the schema's compilation (see
    /// [`StreamDefinition::compile_schema`]).
    ///
    /// # Errors
    /// The first problem, in a sentence.
    pub fn validate(&self) -> Result<(), InvalidDefinition> {
        if !valid_topic(&self.topic) {
            return Err(InvalidDefinition(format!(
                "topic {:?} is not a Pub/Sub topic name (3 to 255 characters: a letter, then letters, digits and -_.~+%, not starting with goog)",
                self.topic
            )));
        }
        if let Some(writers) = &self.writers {
            if writers.is_empty() {
                return Err(InvalidDefinition(
                    "writers, when given, names at least one API key name (leave it out to let any writer in)".to_owned(),
                ));
            }
            if let Some(bad) = writers.iter().find(|w| {
                w.is_empty()
                    || w.contains(':')
                    || w.contains(',')
                    || w.chars().any(char::is_whitespace)
            }) {
                return Err(InvalidDefinition(format!(
                    "writer {bad:?} is not an API key name"
                )));
            }
        }
        if let Some(schema) = &self.schema
            && !schema.is_object()
            && !schema.is_boolean()
        {
            return Err(InvalidDefinition(
                "schema must be a JSON Schema (an object or a boolean)".to_owned(),
            ));
        }
        if let Some(claim_check) = &self.claim_check {
            claim_check
                .validate()
                .map_err(|e| InvalidDefinition(e.to_string()))?;
        }
        self.compile_schema().map(drop)
    }

    /// The schema, compiled; `None` without one. Only self-contained
    /// schemas: references to other documents (files, URLs) are not
    /// fetched. `pattern` and `patternProperties` run on the linear-time
    /// `regex` engine: a pattern that needs backtracking (look-around,
    /// back-references) is refused, and no item can make a pattern take
    /// more than time linear in its length.
    ///
    /// # Errors
    /// When the schema is not a valid JSON Schema.
    pub fn compile_schema(&self) -> Result<Option<Arc<ItemSchema>>, InvalidDefinition> {
        let Some(schema) = &self.schema else {
            return Ok(None);
        };
        jsonschema::options()
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(schema)
            .map(|validator| Some(Arc::new(ItemSchema { validator })))
            .map_err(|e| InvalidDefinition(format!("schema is not a valid JSON Schema: {e}")))
    }

    /// Whether `writer` (an API key name; `None` without keys) may write.
    pub fn admits(&self, writer: Option<&str>) -> bool {
        match &self.writers {
            None => true,
            Some(names) => writer.is_some_and(|w| names.iter().any(|n| n == w)),
        }
    }
}

/// A stream's compiled JSON Schema.
pub struct ItemSchema {
    validator: jsonschema::Validator,
}

impl fmt::Debug for ItemSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ItemSchema")
    }
}

/// An item that breaks its stream's schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("item {index} does not match the stream's schema at {pointer:?}: {message}")]
pub struct SchemaViolation {
    /// The item's position in the batch, from 0.
    pub index: usize,
    /// JSON Pointer into the item to what failed ("" for the item itself).
    pub pointer: String,
    /// JSON Pointer into the schema to the rule it broke.
    pub schema_pointer: String,
    pub message: String,
}

impl ItemSchema {
    /// Checks every item, in order.
    ///
    /// # Errors
    /// The first item that does not match, with where and why.
    pub fn check<'a>(
        &self,
        items: impl IntoIterator<Item = &'a Map<String, Value>>,
    ) -> Result<(), SchemaViolation> {
        for (index, item) in items.into_iter().enumerate() {
            let value = Value::Object(item.clone());
            if let Some(error) = self.validator.iter_errors(&value).next() {
                return Err(SchemaViolation {
                    index,
                    pointer: error.instance_path().to_string(),
                    schema_pointer: error.schema_path().to_string(),
                    message: error.to_string().chars().take(500).collect(),
                });
            }
        }
        Ok(())
    }
}

/// What a 404 for an unknown stream says: the closest known name when one
/// is close (a typo), and how to define the stream.
pub fn unknown_stream<'a>(name: &StreamName, known: impl IntoIterator<Item = &'a str>) -> String {
    let close = known
        .into_iter()
        .map(|k| (edit_distance(name.as_str(), k), k))
        .filter(|(d, k)| *d <= 2 && *k != name.as_str())
        .min();
    let hint = close.map_or_else(String::new, |(_, k)| format!(" (did you mean {k}?)"));
    format!(
        "no stream {name}{hint}: define it with `outboxctl stream create {name} --topic TOPIC` \
         (PUT /api/v1/streams/{name} on a relay's admin port)"
    )
}

/// Levenshtein distance, for names of at most 63 characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn definition(schema: Option<Value>) -> StreamDefinition {
        StreamDefinition {
            name: "orders".parse().unwrap(),
            topic: "orders-topic".into(),
            ordering: OrderingKeyMode::Global,
            on_poison: PoisonPolicy::Halt,
            schema,
            writers: None,
            created_at: None,
            updated_at: None,
            claim_check: None,
        }
    }

    #[test]
    fn stream_names_follow_the_rule() {
        for good in ["default", "a", "orders-eu-1", "0x", &"a".repeat(63)] {
            assert!(good.parse::<StreamName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "Orders",
            "a_b",
            "a.b",
            "é",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(bad.parse::<StreamName>().is_err(), "{bad}");
        }
        assert!(StreamName::default().is_default());
    }

    #[test]
    fn topics_follow_pubsub_rules() {
        assert!(valid_topic("batch-outbox"));
        assert!(valid_topic("a.b~c+d%e_f"));
        for bad in ["ab", "1abc", "goog-x", "has space", &"a".repeat(256)] {
            assert!(!valid_topic(bad), "{bad}");
        }
    }

    #[test]
    fn a_schema_names_the_item_and_the_pointer_that_failed() {
        let def = definition(Some(json!({
            "type": "object",
            "required": ["amount"],
            "properties": {"amount": {"type": "integer", "minimum": 0}, "customer": {"type": "object", "properties": {"id": {"type": "string"}}}}
        })));
        def.validate().unwrap();
        let schema = def.compile_schema().unwrap().unwrap();
        let items: Vec<Map<String, Value>> = [
            json!({"amount": 3}),
            json!({"amount": 4, "customer": {"id": 7}}),
        ]
        .into_iter()
        .map(|v| v.as_object().unwrap().clone())
        .collect();
        let violation = schema.check(&items).unwrap_err();
        assert_eq!(violation.index, 1);
        assert_eq!(violation.pointer, "/customer/id");
        assert!(violation.schema_pointer.contains("type"), "{violation:?}");
        let missing = vec![json!({"x": 1}).as_object().unwrap().clone()];
        assert_eq!(schema.check(&missing).unwrap_err().pointer, "");
        assert!(schema.check(&items[..1]).is_ok());
    }

    /// Patterns run on the linear-time engine: one that needs backtracking
    /// is refused when the stream is defined, and a pattern that would
    /// backtrack exponentially on a backtracking engine checks at once.
    #[test]
    fn patterns_run_in_linear_time_and_backtracking_ones_are_refused() {
        let look_ahead = definition(Some(json!({"properties": {"a": {"pattern": "^(?=x)x$"}}})));
        assert!(look_ahead.validate().is_err());
        let def = definition(Some(
            json!({"properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}),
        ));
        let schema = def.compile_schema().unwrap().unwrap();
        let evil = vec![
            json!({"a": format!("{}b", "a".repeat(5_000))})
                .as_object()
                .unwrap()
                .clone(),
        ];
        assert_eq!(schema.check(&evil).unwrap_err().pointer, "/a");
        let fine = vec![json!({"a": "aaaa"}).as_object().unwrap().clone()];
        assert!(schema.check(&fine).is_ok());
    }

    #[test]
    fn an_unknown_stream_suggests_a_close_name_and_how_to_define_it() {
        let name: StreamName = "order".parse().unwrap();
        let detail = unknown_stream(&name, ["orders", "audit", "default"]);
        assert!(detail.contains("did you mean orders?"), "{detail}");
        assert!(
            detail.contains("outboxctl stream create order --topic TOPIC"),
            "{detail}"
        );
        let far: StreamName = "payments".parse().unwrap();
        assert!(!unknown_stream(&far, ["orders"]).contains("did you mean"));
    }

    #[test]
    fn bad_definitions_say_why() {
        assert!(
            definition(Some(json!({"type": "no-such-type"})))
                .validate()
                .is_err()
        );
        assert!(definition(Some(json!(3))).validate().is_err());
        let mut def = definition(None);
        def.topic = "goog".into();
        assert!(def.validate().is_err());
        let mut def = definition(None);
        def.writers = Some(vec![]);
        assert!(def.validate().is_err());
        def.writers = Some(vec!["billing".into()]);
        assert!(def.validate().is_ok());
        assert!(def.admits(Some("billing")) && !def.admits(Some("other")) && !def.admits(None));
        assert!(definition(None).admits(None));
    }

    #[test]
    fn poison_policies_parse_and_print() {
        for policy in [PoisonPolicy::Halt, PoisonPolicy::DeadLetter] {
            assert_eq!(policy.to_string().parse::<PoisonPolicy>(), Ok(policy));
        }
        assert!("sometimes".parse::<PoisonPolicy>().is_err());
    }
}
