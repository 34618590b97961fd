//! `tail`: print what a subscription receives, one JSON line a message, in
//! order. Shared by `outbox-relay tail` and `outboxctl tail`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use outbox_service::cli;
use serde_json::json;

use crate::config::TailSource;
use crate::pubsub::{self, PubSubConfig};

/// Tails the subscription (created with message ordering when missing) to
/// stdout.
pub async fn run(source: &TailSource) -> ExitCode {
    let config = match source
        .pubsub
        .to_config(Duration::from_secs(30), Duration::from_millis(1))
    {
        Ok(config) => config,
        Err(problem) => return cli::config_error(problem),
    };
    let mut out = std::io::stdout().lock();
    match tail(&config, &source.subscription, source.count, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes each message received on `subscription` to `out` as
/// `{message_id, publish_time, ordering_key, attributes, data}` (data parsed as JSON when
/// it is JSON), acknowledging it once written; stops after `count`.
///
/// # Errors
/// When the subscription cannot be created or read, or `out` fails.
pub async fn tail(
    config: &PubSubConfig,
    subscription: &str,
    count: Option<u64>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    pubsub::ensure_subscription(config, subscription, true).await?;
    let client = pubsub::subscriber(config).await?;
    let mut stream = client
        .subscribe(config.subscription_path(subscription))
        .build();
    let mut seen = 0;
    while let Some((message, handler)) = stream.next().await.transpose()? {
        let data: serde_json::Value = serde_json::from_slice(&message.data)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&message.data)));
        let publish_time = message.publish_time.as_ref().and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds(), u32::try_from(t.nanos()).unwrap_or(0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        });
        let line = json!({
            "message_id": message.message_id,
            "publish_time": publish_time,
            "ordering_key": message.ordering_key,
            "attributes": message.attributes,
            "data": data,
        });
        writeln!(out, "{line}")?;
        out.flush()?;
        handler.ack();
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}
