//! `tail`: print what a subscription receives, one JSON line a message, in
//! order. Shared by `outbox-relay tail` and `outboxctl tail`.
//!
//! Two things make a tail that ends (after `--count`, or on Ctrl-C) leave
//! the subscription as it found it:
//! - acknowledgements are sent by the client in the background, every
//!   100 ms: the stream is shut down (which flushes them) before the
//!   process exits, or the printed messages come again;
//! - the client leases messages ahead of what it hands out (1,000 by
//!   default). Left alone, those stay leased until their ack deadline, and
//!   on an ordered subscription nothing after them is delivered meanwhile:
//!   the next `tail` would wait, silent, for up to a minute. So the stream
//!   leases no more than `--count` ahead and nacks what it did not print
//!   when it shuts down.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use google_cloud_pubsub::subscriber::ShutdownBehavior;
use outbox_service::cli;
use serde_json::json;

use crate::config::TailSource;
use crate::pubsub::{self, PubSubConfig};

/// How long setting up the subscription may take before `tail` says it
/// cannot reach Pub/Sub.
const SETUP_LIMIT: Duration = Duration::from_secs(10);
/// After this long without a message, a terminal is told what `tail` waits for.
const QUIET_NOTICE: Duration = Duration::from_secs(10);

/// Tails the subscription (created with message ordering when missing) to
/// stdout. On a terminal, stderr says what it reads and, when nothing comes,
/// what it is waiting for.
pub async fn run(source: &TailSource) -> ExitCode {
    let config = match source
        .pubsub
        .to_config(Duration::from_secs(30), Duration::from_millis(1))
    {
        Ok(config) => config,
        Err(problem) => return cli::config_error(problem),
    };
    let mut out = std::io::stdout().lock();
    let notices = std::io::stderr().is_terminal();
    let stop = async {
        // Ctrl-C ends the tail cleanly: acknowledgements flushed, the rest
        // handed back.
        let _ = tokio::signal::ctrl_c().await;
    };
    match tail(
        &config,
        &source.subscription,
        source.count,
        notices,
        stop,
        &mut out,
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where `tail` reads from, for its messages to the user.
fn describe(config: &PubSubConfig) -> String {
    match (&config.emulator_host, &config.endpoint) {
        (Some(host), _) => format!("the Pub/Sub emulator at {host}"),
        (None, Some(endpoint)) => format!("Pub/Sub at {endpoint}"),
        (None, None) => "Pub/Sub at pubsub.googleapis.com".to_owned(),
    }
}

/// Writes each message received on `subscription` to `out` as
/// `{message_id, publish_time, ordering_key, attributes, data}` (data parsed as JSON when
/// it is JSON), acknowledging it once written; stops after `count` or when
/// `stop` resolves, and then shuts the stream down (acknowledgements sent,
/// the messages it leased but did not print handed back at once).
///
/// # Errors
/// When the subscription cannot be created or read within
/// [`SETUP_LIMIT`], or `out` fails.
pub async fn tail(
    config: &PubSubConfig,
    subscription: &str,
    count: Option<u64>,
    notices: bool,
    stop: impl std::future::Future<Output = ()>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let place = describe(config);
    let setup = async {
        pubsub::ensure_subscription(config, subscription, true).await?;
        pubsub::subscriber(config).await
    };
    let hint = if config.emulator_host.is_none() {
        " (PUBSUB_EMULATOR_HOST is not set; after scripts/dev-up.sh, run `source .cache/run/dev.env` first)"
    } else {
        ""
    };
    let client = match tokio::time::timeout(SETUP_LIMIT, setup).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            anyhow::bail!("cannot open subscription {subscription} on {place}: {error:#}{hint}")
        }
        Err(_) => anyhow::bail!(
            "cannot reach {place} within {} s to open subscription {subscription}{hint}",
            SETUP_LIMIT.as_secs()
        ),
    };
    // Lease no more ahead than will be printed (the server counts this per
    // stream), and hand back what was not printed when the stream ends.
    let outstanding = count.map_or(1000, |n| i64::try_from(n.min(1000)).unwrap_or(1000));
    let mut stream = client
        .subscribe(config.subscription_path(subscription))
        .set_max_outstanding_messages(outstanding)
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let shutdown = stream.shutdown_token();
    if notices {
        eprintln!(
            "tailing subscription {subscription} (topic {}) on {place}; Ctrl-C to stop",
            config.topic
        );
    }
    let mut stop = std::pin::pin!(stop);
    let mut seen = 0;
    let result = loop {
        let next = tokio::select! {
            () = &mut stop => break Ok(()),
            next = tokio::time::timeout(QUIET_NOTICE, stream.next()) => next,
        };
        let Ok(next) = next else {
            if notices {
                eprintln!(
                    "no message for {} s: waiting for messages on {subscription} (it holds what was published to {} since it was created; an ordered subscription delivers a key's messages only after the earlier ones are acknowledged or their ack deadline passes)",
                    QUIET_NOTICE.as_secs(),
                    config.topic
                );
            }
            continue;
        };
        let (message, handler) = match next.transpose() {
            Ok(Some(received)) => received,
            Ok(None) => break Ok(()),
            Err(error) => break Err(anyhow::Error::from(error)),
        };
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
        if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            // Not printed (a closed pipe): handed back, not acknowledged.
            handler.nack();
            break Err(error.into());
        }
        handler.ack();
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break Ok(());
        }
    };
    // Flushes the acknowledgements and nacks the rest; bounded, so an
    // unreachable service cannot hold the exit.
    if tokio::time::timeout(Duration::from_secs(5), shutdown.shutdown())
        .await
        .is_err()
    {
        eprintln!("warning: the last acknowledgements may not have reached Pub/Sub");
    }
    result
}
