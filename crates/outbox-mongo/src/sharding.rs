//! MongoDB beyond one replica set: the shard keys of a sharded cluster.
//!
//! A batch is written in one transaction that touches three collections:
//! the stream's counter, the batch document and its items. For that
//! transaction to stay on one shard, every document it writes is keyed by
//! the stream first:
//!
//! | collection | shard key | why |
//! |---|---|---|
//! | `batches` | `{stream: 1, batch_sequence: 1}` | a stream's batches in sequence order, in ranges |
//! | `batch_items` | `{stream: 1, batch_id: 1}` | a batch's items together, next to their stream |
//! | `outbox_counters` | `{_id: 1}` | one counter per stream, `batch_sequence:<stream>` |
//!
//! The default stream's documents have no `stream` field; MongoDB keys a
//! missing shard key field as null, so they shard like any other stream.
//! One zone per stream (`outbox-<stream>`), covering the stream's range in
//! all three collections, is what keeps them on one shard: the operator
//! assigns each zone to a shard (`addShardToZone`), and may give a busy
//! stream a shard of its own. Without zones the balancer may put a stream's
//! counter and its batches on different shards, and the ingest transaction
//! becomes a distributed one (correct, with a two-phase commit's cost).
//!
//! What changes on a sharded cluster (mongos):
//! - a unique index must start with the shard key: `batches.batch_id` is
//!   indexed, not unique (batch ids are 64 random bits the writer draws), and the
//!   items' uniqueness is `{stream, batch_id, item_sequence}`;
//!   [`crate::MongoStore::ensure_schema`] builds those when it talks to mongos;
//! - the relay's marks update items by `_id`, which mongos sends to every
//!   shard holding the collection; its reads of a batch's items name the
//!   batch, not the stream, and go to every shard too;
//! - fencing, read concerns and change streams work through mongos as on a
//!   replica set; `killSessions` goes through mongos to every shard.
//!
//! [`plan`] returns the admin commands; `outbox-relay shard-plan` prints
//! them for the stored streams, and with `--apply` runs them through mongos.

use mongodb::bson::{Bson, Document, doc};
use outbox_core::stream::StreamName;

use crate::MongoConfig;

/// The zone holding one stream's documents.
pub fn zone(stream: &StreamName) -> String {
    format!("outbox-{stream}")
}

/// One admin command of the plan, and what it does.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub what: String,
    pub command: Document,
}

/// The commands that shard the outbox's collections and give each of
/// `streams` a zone covering its documents. Run against mongos's `admin`
/// database; `shardCollection` of a collection already sharded with the
/// same key succeeds, so the plan may run again as streams are added.
pub fn plan(config: &MongoConfig, streams: &[StreamName]) -> Vec<Step> {
    let db = &config.database;
    let ns = |collection: &str| format!("{db}.{collection}");
    let mut steps = vec![
        Step {
            what: format!("enable sharding for {db}"),
            command: doc! { "enableSharding": db.as_str() },
        },
        Step {
            what: "batches by stream, then sequence".to_owned(),
            command: doc! {
                "shardCollection": ns(&config.batches_collection),
                "key": { "stream": 1, "batch_sequence": 1 },
            },
        },
        Step {
            what: "items by stream, then batch".to_owned(),
            command: doc! {
                "shardCollection": ns(&config.items_collection),
                "key": { "stream": 1, "batch_id": 1 },
            },
        },
        Step {
            what: "the counters, one per stream".to_owned(),
            command: doc! {
                "shardCollection": ns(&config.counters_collection),
                "key": { "_id": 1 },
            },
        },
    ];
    for stream in streams {
        let name = zone(stream);
        let value = crate::ids::field(stream);
        let counter = crate::ids::counter(stream);
        steps.push(Step {
            what: format!("stream {stream}'s batches in zone {name}"),
            command: zone_range(
                &ns(&config.batches_collection),
                doc! { "stream": value.clone(), "batch_sequence": Bson::MinKey },
                doc! { "stream": value.clone(), "batch_sequence": Bson::MaxKey },
                &name,
            ),
        });
        steps.push(Step {
            what: format!("stream {stream}'s items in zone {name}"),
            command: zone_range(
                &ns(&config.items_collection),
                doc! { "stream": value.clone(), "batch_id": Bson::MinKey },
                doc! { "stream": value, "batch_id": Bson::MaxKey },
                &name,
            ),
        });
        // Exactly the one id: the range's upper bound is exclusive.
        steps.push(Step {
            what: format!("stream {stream}'s counter in zone {name}"),
            command: zone_range(
                &ns(&config.counters_collection),
                doc! { "_id": counter.as_str() },
                doc! { "_id": format!("{counter}\u{0}") },
                &name,
            ),
        });
    }
    steps
}

fn zone_range(namespace: &str, min: Document, max: Document, zone: &str) -> Document {
    doc! { "updateZoneKeyRange": namespace, "min": min, "max": max, "zone": zone }
}

/// The plan as a mongosh script, with the `addShardToZone` lines the
/// operator fills in (which shard holds which stream is theirs to choose).
pub fn script(steps: &[Step], streams: &[StreamName]) -> String {
    let mut out =
        String::from("// Run with mongosh against mongos: mongosh \"$MONGOS_URL\" shard-plan.js\n");
    out += "const admin = db.getSiblingDB(\"admin\");\n";
    out += "// Assign each stream's zone to a shard first, for example:\n";
    for stream in streams {
        out += &format!(
            "// admin.runCommand({{ addShardToZone: \"<shard>\", zone: \"{}\" }});\n",
            zone(stream)
        );
    }
    for step in steps {
        // mongosh spells the bounds MinKey() and MaxKey().
        let command = Bson::Document(step.command.clone())
            .into_relaxed_extjson()
            .to_string()
            .replace(r#"{"$minKey":1}"#, "MinKey()")
            .replace(r#"{"$maxKey":1}"#, "MaxKey()");
        out += &format!("// {}\nadmin.runCommand({command});\n", step.what);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str) -> StreamName {
        name.parse().unwrap()
    }

    #[test]
    fn every_stream_gets_one_zone_over_its_three_collections() {
        let config = MongoConfig::new("mongodb://x", "outbox");
        let streams = [StreamName::default_stream(), stream("orders")];
        let steps = plan(&config, &streams);
        assert_eq!(steps.len(), 4 + 3 * streams.len());
        assert_eq!(steps[0].command, doc! { "enableSharding": "outbox" });
        assert_eq!(
            steps[1].command,
            doc! { "shardCollection": "outbox.batches", "key": { "stream": 1, "batch_sequence": 1 } }
        );
        let orders: Vec<&Document> = steps
            .iter()
            .map(|s| &s.command)
            .filter(|c| c.get_str("zone") == Ok("outbox-orders"))
            .collect();
        assert_eq!(orders.len(), 3);
        assert_eq!(
            orders[0].get_document("min").unwrap(),
            &doc! { "stream": "orders", "batch_sequence": Bson::MinKey }
        );
        // The counter's range is its one id.
        assert_eq!(
            orders[2].get_document("min").unwrap(),
            &doc! { "_id": "batch_sequence:orders" }
        );
        assert_eq!(
            orders[2].get_document("max").unwrap(),
            &doc! { "_id": "batch_sequence:orders\u{0}" }
        );
        // The default stream's documents have no `stream` field: null.
        let default: Vec<&Document> = steps
            .iter()
            .map(|s| &s.command)
            .filter(|c| c.get_str("zone") == Ok("outbox-default"))
            .collect();
        assert_eq!(
            default[0].get_document("min").unwrap(),
            &doc! { "stream": Bson::Null, "batch_sequence": Bson::MinKey }
        );
        assert_eq!(
            default[2].get_document("min").unwrap(),
            &doc! { "_id": "batch_sequence" }
        );
    }

    #[test]
    fn the_script_names_every_zone_and_command() {
        let config = MongoConfig::new("mongodb://x", "outbox");
        let streams = [stream("orders")];
        let script = script(&plan(&config, &streams), &streams);
        assert!(script.contains("addShardToZone: \"<shard>\", zone: \"outbox-orders\""));
        assert!(script.contains("\"shardCollection\":\"outbox.batch_items\""));
        assert_eq!(script.matches("admin.runCommand(").count(), 4 + 3 + 1);
        assert!(script.contains(r#""min":{"stream":"orders","batch_id":MinKey()}"#));
        assert!(!script.contains("$minKey"));
    }
}
