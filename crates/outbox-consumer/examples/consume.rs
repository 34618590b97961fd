//! An example consumer: prints each item of an ordered subscription once,
//! or each whole batch, and acknowledges it after printing. After
//! `scripts/dev-up.sh` and `source .cache/run/dev.env` it needs no argument:
//!
//! ```text
//! cargo run -p outbox-consumer --example consume -- [--whole-batches] [--subscription NAME] [--project ID]
//! ```
//!
//! The project is `PUBSUB_PROJECT_ID` (dev-up's `local-project` when unset),
//! the subscription `batch-outbox-consume` (ordered; dev-up makes it), and
//! the emulator `PUBSUB_EMULATOR_HOST` (without it, Google's Pub/Sub with
//! the default credentials). With `CLAIM_CHECK_URL` (dev-up's
//! `.cache/claim-check`), items stored by reference are resolved and
//! verified before they print. Copies published by a replay job print with
//! their replay id: each replay is a lane of its own, ordered within itself.
//!
//! Ctrl-C stops it after the delivery in hand; what was not acknowledged
//! comes again to the next consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use outbox_consumer::{Consumer, ConsumerConfig, Delivery, Handler, Item, MemorySeen};

struct Print {
    received: Arc<AtomicBool>,
}

/// Where an item's copy comes from: the stream, or a replay of it.
fn lane(item: &Item) -> String {
    match &item.replay_id {
        Some(replay) => format!("{} (copy from replay {replay})", item.stream),
        None => item.stream.clone(),
    }
}

fn payloads(items: &[Item]) -> String {
    items
        .iter()
        .map(|i| i.payload.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[async_trait::async_trait]
impl Handler for Print {
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        self.received.store(true, Ordering::Relaxed);
        match delivery {
            Delivery::Item(item) => println!(
                "{} batch {} item {}: {}",
                lane(&item),
                item.position.batch_sequence,
                item.position.item_sequence,
                item.payload
            ),
            Delivery::Batch(items) => {
                let first = items.first().context("a batch has items")?;
                println!(
                    "{} batch {} ({} items): {}",
                    lane(first),
                    first.position.batch_sequence,
                    items.len(),
                    payloads(&items)
                );
            }
            Delivery::Partial { items, missing } => {
                let first = items.first().context("a batch has items")?;
                println!(
                    "{} batch {} ({} of {} items; never came: {missing:?}): {}",
                    lane(first),
                    first.position.batch_sequence,
                    items.len(),
                    first.batch_total_items,
                    payloads(&items)
                );
            }
        }
        Ok(())
    }
}

/// The value after `flag` in `args`.
fn option(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: consume [--whole-batches] [--subscription NAME] [--project ID]\n\
             defaults: PUBSUB_PROJECT_ID or local-project, batch-outbox-consume, PUBSUB_EMULATOR_HOST"
        );
        return Ok(());
    }
    let project = option(&args, "--project")
        .or_else(|| std::env::var("PUBSUB_PROJECT_ID").ok())
        .unwrap_or_else(|| "local-project".to_owned());
    let subscription =
        option(&args, "--subscription").unwrap_or_else(|| "batch-outbox-consume".to_owned());
    let mut config = ConsumerConfig::new(&project, &subscription);
    config.emulator_host = std::env::var("PUBSUB_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.is_empty());
    config.whole_batches = args.iter().any(|a| a == "--whole-batches");
    // A batch is handed over whole only once all of it is leased.
    config.max_outstanding = 10_000;
    // Items stored by reference (claim-check) are fetched from the store
    // the writers use, verified, and printed with their payload.
    if let Ok(url) = std::env::var("CLAIM_CHECK_URL") {
        let limit = outbox_core::claim_check::DEFAULT_MAX_ITEM_BYTES;
        config.claim_checks = Some(
            outbox_consumer::ClaimCheckResolver::new(limit)
                .allow(&url)
                .with_context(|| format!("CLAIM_CHECK_URL={url}"))?,
        );
    }
    let source = match &config.emulator_host {
        Some(host) => format!("the Pub/Sub emulator at {host}"),
        None => "Google's Pub/Sub with the default credentials (PUBSUB_EMULATOR_HOST is not set; \
                 `source .cache/run/dev.env` reads dev-up's emulator)"
            .to_owned(),
    };
    eprintln!(
        "consuming projects/{project}/subscriptions/{subscription} from {source}{}; Ctrl-C stops",
        if config.whole_batches {
            ", whole batches"
        } else {
            ""
        }
    );
    let received = Arc::new(AtomicBool::new(false));
    let quiet = Arc::clone(&received);
    let hint = source.clone();
    let watch = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if !quiet.load(Ordering::Relaxed) {
            eprintln!(
                "no message in 10 s from {hint}: is it reachable, does the subscription exist, \
                 and is anything published? (dev-up makes batch-outbox-consume; a subscription \
                 holds only what was published after it was made)"
            );
        }
    });
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = Consumer::run(&config, MemorySeen::default(), Print { received }, stop).await;
    watch.abort();
    let report = result.with_context(|| format!("reading from {source}"))?;
    eprintln!(
        "{} items, {} duplicates skipped; order {}",
        report.firsts,
        report.duplicates,
        if report.held() { "held" } else { "NOT held" }
    );
    Ok(())
}
