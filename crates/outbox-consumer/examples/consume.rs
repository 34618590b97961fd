//! An example consumer: prints each item of an ordered subscription once,
//! or each whole batch, and acknowledges it after printing.
//!
//! ```text
//! PUBSUB_EMULATOR_HOST=127.0.0.1:8085 \
//!   cargo run -p outbox-consumer --example consume -- batch-outbox-project batch-outbox-ordered [--whole-batches]
//! ```
//!
//! Ctrl-C stops it after the delivery in hand; what was not acknowledged
//! comes again to the next consumer.

use anyhow::Context;
use outbox_consumer::{Consumer, ConsumerConfig, Delivery, Handler, MemorySeen};

struct Print;

#[async_trait::async_trait]
impl Handler for Print {
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        match delivery {
            Delivery::Item(item) => println!(
                "{} batch {} item {}{}: {}",
                item.stream,
                item.position.batch_sequence,
                item.position.item_sequence,
                item.replay_id
                    .map(|r| format!(" (replay {r})"))
                    .unwrap_or_default(),
                item.payload
            ),
            Delivery::Batch(items) => {
                let first = items.first().context("a batch has items")?;
                println!(
                    "{} batch {} ({} items): {}",
                    first.stream,
                    first.position.batch_sequence,
                    items.len(),
                    items
                        .iter()
                        .map(|i| i.payload.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(project), Some(subscription)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: consume PROJECT SUBSCRIPTION [--whole-batches]");
    };
    let mut config = ConsumerConfig::new(project, subscription);
    config.emulator_host = std::env::var("PUBSUB_EMULATOR_HOST").ok();
    config.whole_batches = args.iter().any(|a| a == "--whole-batches");
    // A batch is handed over whole only once all of it is leased.
    config.max_outstanding = 10_000;
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = Consumer::run(&config, MemorySeen::default(), Print, stop).await?;
    eprintln!(
        "{} items, {} duplicates skipped; order {}",
        report.firsts,
        report.duplicates,
        if report.held() { "held" } else { "NOT held" }
    );
    Ok(())
}
