//! `outbox-relay tail`: print what arrives on a subscription, in order.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use outbox_service::cli;
use relay::config::TailArgs;
use relay::pubsub;
use serde_json::json;

/// Tails a subscription; the caller has installed tracing.
pub async fn run(args: TailArgs) -> ExitCode {
    let config = match args
        .pubsub
        .to_config(Duration::from_secs(30), Duration::from_millis(1))
    {
        Ok(config) => config,
        Err(problem) => return cli::config_error(problem),
    };
    match tail(&config, &args.subscription, args.count).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn tail(
    config: &pubsub::PubSubConfig,
    subscription: &str,
    count: Option<u64>,
) -> anyhow::Result<()> {
    pubsub::ensure_subscription(config, subscription, true).await?;
    let client = pubsub::subscriber(config).await?;
    let mut stream = client
        .subscribe(config.subscription_path(subscription))
        .build();
    let mut seen = 0;
    let mut out = std::io::stdout().lock();
    while let Some((message, handler)) = stream.next().await.transpose()? {
        let data: serde_json::Value = serde_json::from_slice(&message.data)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&message.data)));
        let line = json!({
            "message_id": message.message_id,
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
