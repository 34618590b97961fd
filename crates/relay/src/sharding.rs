//! `outbox-relay shard-plan`: the shard keys and zones of a sharded
//! cluster (`outbox_mongo::sharding`) for every stored stream.

use anyhow::Context;
use outbox_core::store::StreamStore;
use outbox_core::stream::StreamName;
use outbox_mongo::{MongoStore, sharding};

use crate::config::ShardPlanArgs;

/// Reads the stored streams and returns the plan as a mongosh script, or,
/// with `--apply`, runs it through mongos and returns what it did.
///
/// # Errors
/// When MongoDB cannot be reached, or (with `--apply`) is not mongos or
/// refuses a command.
pub async fn run(args: &ShardPlanArgs) -> anyhow::Result<String> {
    let config = args
        .mongo
        .to_config("outbox-relay")
        .map_err(|e| anyhow::anyhow!(e))?;
    let store = MongoStore::connect(config.clone())
        .await
        .context("connecting to MongoDB")?;
    let mut streams: Vec<StreamName> = store
        .streams()
        .await
        .context("reading the streams")?
        .into_iter()
        .map(|d| d.name)
        .collect();
    if !streams.iter().any(StreamName::is_default) {
        streams.insert(0, StreamName::default_stream());
    }
    if args.apply {
        let steps = store.shard(&streams).await?;
        let mut out = String::new();
        for step in steps {
            out += &format!("done: {}\n", step.what);
        }
        out += "assign each zone to a shard: addShardToZone (docs/OPERATIONS.md)\n";
        return Ok(out);
    }
    Ok(sharding::script(
        &sharding::plan(&config, &streams),
        &streams,
    ))
}
