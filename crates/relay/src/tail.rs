//! `tail`: print what a subscription receives, one JSON line a message, in
//! order. Shared by `outbox-relay tail` and `outboxctl tail`.
//!
//! A tail that ends (after `--count`, or on Ctrl-C) leaves the subscription
//! as it found it less what it printed: what it printed is acknowledged
//! before it exits, what it did not print is not held.
//!
//! - On Pub/Sub it reads with Google's streaming client, leasing no more
//!   ahead than it will print (flow control), and shuts the stream down
//!   before it exits: the client sends acknowledgements in the background
//!   every 100 ms, so a process that just exits loses the last ones, and
//!   messages it leased would stay leased until their ack deadline (on an
//!   ordered subscription nothing after them is delivered meanwhile).
//! - Google's emulator ignores a streaming subscriber's flow control (it
//!   sends every waiting message at once), redelivers handed-back messages
//!   of an ordering key in the order the nacks reach it rather than in
//!   publish order, and keeps messages that were on their way to a stream
//!   that closed leased for minutes. So on the emulator `tail` reads with
//!   the unary `pull` of its REST API: exactly the messages it prints,
//!   acknowledged before the next pull.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use google_cloud_pubsub::subscriber::ShutdownBehavior;
use outbox_service::cli;
use serde_json::{Value, json};

use crate::config::{TailSource, VerifyContract};
use crate::pubsub::{self, PubSubConfig};

/// How long setting up the subscription may take before `tail` says it
/// cannot reach Pub/Sub.
const SETUP_LIMIT: Duration = Duration::from_secs(10);
/// After this long without a message, a terminal is told what `tail` waits for.
const QUIET_NOTICE: Duration = Duration::from_secs(10);
/// Between two empty pulls of the emulator.
const EMPTY_PULL_PAUSE: Duration = Duration::from_millis(100);

/// Tails the subscription (created with message ordering when missing) to
/// stdout. Stderr says what it reads and, when nothing comes,
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
    let mut check = source.verify.map(Check::new);
    let stop = async {
        // Ctrl-C ends the tail cleanly: acknowledgements sent, nothing held.
        let _ = tokio::signal::ctrl_c().await;
    };
    match tail(
        &config,
        &source.subscription,
        source.count,
        stop,
        &mut Printer {
            out: &mut out,
            check: check.as_mut(),
        },
    )
    .await
    {
        Ok(()) => match check {
            Some(check) if !check.finish() => ExitCode::FAILURE,
            _ => ExitCode::SUCCESS,
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--verify`: the consumer crate's verifier over what `tail` prints, its
/// findings on stderr as they come.
pub struct Check {
    verifier: outbox_consumer::Verifier,
    not_items: u64,
}

impl Check {
    pub fn new(contract: VerifyContract) -> Self {
        let contract = match contract {
            VerifyContract::Global => outbox_consumer::Contract::Global,
            VerifyContract::PerKey => outbox_consumer::Contract::PerKey,
        };
        Self {
            verifier: outbox_consumer::Verifier::new(contract),
            not_items: 0,
        }
    }

    /// Observes one printed message; a finding, if any, as a line.
    pub fn observe(
        &mut self,
        message_id: &str,
        ordering_key: &str,
        attributes: &std::collections::HashMap<String, String>,
        data: &[u8],
    ) -> Option<String> {
        use outbox_consumer::Verdict;
        let item = match outbox_consumer::Item::parse(message_id, ordering_key, attributes, data) {
            Ok(item) => item,
            Err(e) => {
                self.not_items += 1;
                return Some(format!(
                    "verify: message {message_id} is not an outbox item: {}",
                    e.0
                ));
            }
        };
        let at = format!(
            "item {} (batch {} position {}{})",
            item.item_id,
            item.position.batch_sequence,
            item.position.item_sequence,
            item.replay_id
                .as_ref()
                .map(|r| format!(", replay {r}"))
                .unwrap_or_default()
        );
        match self.verifier.observe(&item) {
            Verdict::First => None,
            Verdict::Duplicate => Some(format!(
                "verify: duplicate of {at} (allowed: delivery is at least once)"
            )),
            Verdict::OutOfOrder { after } => Some(format!(
                "verify: OUT OF ORDER: first delivery of {at} after batch {} position {} on key {:?}",
                after.batch_sequence, after.item_sequence, item.ordering_key
            )),
            Verdict::BatchInterleaved {
                unfinished_batch,
                missing,
            } => Some(format!(
                "verify: BATCH INTERLEAVED: {at} came while batch {unfinished_batch} still missed {missing} items"
            )),
        }
    }

    /// Prints the summary; whether the contract held.
    pub fn finish(&self) -> bool {
        let report = self.verifier.final_report();
        let held = report.held();
        eprintln!(
            "verify: {} items, {} duplicates, {} out of order, {} interleaved, {} incomplete batches, {} batches skipped, {} not outbox items: {}",
            report.firsts,
            report.duplicates,
            report.out_of_order,
            report.interleaved,
            report.incomplete_batches,
            report.skipped_batches,
            self.not_items,
            if held {
                "the order contract held"
            } else {
                "THE ORDER CONTRACT WAS BROKEN"
            }
        );
        held
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

/// One received message as `tail` prints it.
struct Received {
    message_id: String,
    publish_time: Option<String>,
    ordering_key: String,
    attributes: Value,
    data: Vec<u8>,
}

impl Received {
    fn line(&self) -> String {
        let data: Value = serde_json::from_slice(&self.data)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&self.data)));
        let mut line = json!({
            "message_id": self.message_id,
            "publish_time": self.publish_time,
            "ordering_key": self.ordering_key,
            "attributes": self.attributes,
            "data": data,
        });
        // A payload in a claim-check store: the reference, with its size.
        let attribute = |name: &str| self.attributes.get(name).and_then(Value::as_str);
        if let Some(reference) = outbox_core::claim_check::Reference::from_attributes(attribute) {
            line["claim_check"] = match reference {
                Ok(reference) => json!({
                    "url": reference.url,
                    "sha256": reference.sha256,
                    "bytes": reference.bytes,
                    "size": human_bytes(reference.bytes),
                }),
                Err(error) => json!({ "error": error.to_string() }),
            };
        }
        line.to_string()
    }
}

/// A size for people: `25.0 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut size = bytes as f64 / 1024.0;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size:.1} {}", UNITS[unit])
}

/// Where printed messages go: `out`, and with `--verify` the check.
pub struct Printer<'a> {
    pub out: &'a mut dyn Write,
    pub check: Option<&'a mut Check>,
}

impl Printer<'_> {
    /// Prints one message (then checks it); an error when `out` fails,
    /// and the message is then not printed.
    fn print(&mut self, received: &Received) -> std::io::Result<()> {
        writeln!(self.out, "{}", received.line())?;
        self.out.flush()?;
        if let Some(check) = self.check.as_deref_mut() {
            let attributes: std::collections::HashMap<String, String> =
                serde_json::from_value(received.attributes.clone()).unwrap_or_default();
            if let Some(finding) = check.observe(
                &received.message_id,
                &received.ordering_key,
                &attributes,
                &received.data,
            ) {
                eprintln!("{finding}");
            }
        }
        Ok(())
    }
}

/// Writes each message received on `subscription` to `out` as
/// `{message_id, publish_time, ordering_key, attributes, data}` (data parsed as JSON when
/// it is JSON), acknowledging it once written; stops after `count` or when
/// `stop` resolves.
///
/// # Errors
/// When the subscription cannot be created or read within
/// [`SETUP_LIMIT`], or `out` fails.
pub async fn tail(
    config: &PubSubConfig,
    subscription: &str,
    count: Option<u64>,
    stop: impl std::future::Future<Output = ()>,
    printer: &mut Printer<'_>,
) -> anyhow::Result<()> {
    let place = describe(config);
    let hint = if config.emulator_host.is_none() {
        " (PUBSUB_EMULATOR_HOST is not set; after scripts/dev-up.sh, run `source .cache/run/dev.env` first)"
    } else {
        ""
    };
    let exists = tokio::time::timeout(SETUP_LIMIT, pubsub::topic_state(config)).await;
    if let Ok(pubsub::TopicState::Missing) = exists {
        anyhow::bail!(
            "topic {} does not exist on {place}: nothing was published to it yet. A replay with --topic creates it on a relay run with PUBSUB_CREATE_TOPIC (dev-up's); elsewhere `gcloud pubsub topics create {}`",
            config.topic,
            config.topic
        );
    }
    let setup = tokio::time::timeout(
        SETUP_LIMIT,
        pubsub::ensure_subscription(config, subscription, true),
    );
    match setup.await {
        Ok(Ok(created)) => {
            if created {
                eprintln!(
                    "created subscription {subscription} on topic {}: it holds what is published from now on, not the messages published before",
                    config.topic
                );
            }
        }
        Ok(Err(error)) => {
            anyhow::bail!("cannot open subscription {subscription} on {place}: {error:#}{hint}")
        }
        Err(_) => anyhow::bail!(
            "cannot reach {place} within {} s to open subscription {subscription}{hint}",
            SETUP_LIMIT.as_secs()
        ),
    }
    // What tail reads and waits for goes to stderr, whatever stdout is (a
    // file, a pipe): the messages alone go to stdout.
    eprintln!(
        "tailing subscription {subscription} (topic {}) on {place}; Ctrl-C to stop",
        config.topic
    );
    let waiting = || {
        eprintln!(
            "no message for {} s: waiting for messages on {subscription} (it holds what was published to {} since it was created; an ordered subscription delivers a key's messages only after the earlier ones are acknowledged or their ack deadline passes)",
            QUIET_NOTICE.as_secs(),
            config.topic
        );
    };
    match &config.emulator_host {
        Some(host) => {
            tail_emulator(config, host, subscription, count, stop, &waiting, printer).await
        }
        None => tail_stream(config, subscription, count, stop, &waiting, printer).await,
    }
}

/// Pub/Sub: Google's streaming client with flow control, shut down before
/// returning (acknowledgements flushed, the rest handed back).
async fn tail_stream(
    config: &PubSubConfig,
    subscription: &str,
    count: Option<u64>,
    stop: impl std::future::Future<Output = ()>,
    waiting: &dyn Fn(),
    printer: &mut Printer<'_>,
) -> anyhow::Result<()> {
    let client = tokio::time::timeout(SETUP_LIMIT, pubsub::subscriber(config))
        .await
        .map_err(|_| anyhow::anyhow!("the subscriber client did not start in time"))??;
    // Lease no more ahead than will be printed (the server counts this per
    // stream), and hand back what was not printed when the stream ends.
    let outstanding = count.map_or(1000, |n| i64::try_from(n.min(1000)).unwrap_or(1000));
    let mut stream = client
        .subscribe(config.subscription_path(subscription))
        .set_max_outstanding_messages(outstanding)
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let shutdown = stream.shutdown_token();
    let mut stop = std::pin::pin!(stop);
    let mut seen = 0;
    let result = loop {
        let next = tokio::select! {
            () = &mut stop => break Ok(()),
            next = tokio::time::timeout(QUIET_NOTICE, stream.next()) => next,
        };
        let Ok(next) = next else {
            waiting();
            continue;
        };
        let (message, handler) = match next.transpose() {
            Ok(Some(received)) => received,
            Ok(None) => break Ok(()),
            Err(error) => break Err(anyhow::Error::from(error)),
        };
        let received = Received {
            message_id: message.message_id.clone(),
            publish_time: message.publish_time.as_ref().and_then(|t| {
                chrono::DateTime::from_timestamp(t.seconds(), u32::try_from(t.nanos()).unwrap_or(0))
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            }),
            ordering_key: message.ordering_key.clone(),
            attributes: json!(message.attributes),
            data: message.data.to_vec(),
        };
        if let Err(error) = printer.print(&received) {
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

/// The emulator: its REST `pull`, never more than is still to print, each
/// pull's messages acknowledged before the next.
async fn tail_emulator(
    config: &PubSubConfig,
    host: &str,
    subscription: &str,
    count: Option<u64>,
    stop: impl std::future::Future<Output = ()>,
    waiting: &dyn Fn(),
    printer: &mut Printer<'_>,
) -> anyhow::Result<()> {
    use base64::Engine;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = format!(
        "http://{host}/v1/{}",
        config.subscription_path(subscription)
    );
    let mut stop = std::pin::pin!(stop);
    let mut seen = 0_u64;
    let mut quiet_since = tokio::time::Instant::now();
    while count.is_none_or(|n| seen < n) {
        let want = count.map_or(100, |n| (n - seen).min(100));
        let pull = http
            .post(format!("{base}:pull"))
            .json(&json!({ "maxMessages": want, "returnImmediately": true }))
            .send();
        let reply: Value = tokio::select! {
            () = &mut stop => return Ok(()),
            reply = pull => reply?.error_for_status()?.json().await?,
        };
        let received = reply["receivedMessages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if received.is_empty() {
            if quiet_since.elapsed() >= QUIET_NOTICE {
                waiting();
                quiet_since = tokio::time::Instant::now();
            }
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(EMPTY_PULL_PAUSE) => continue,
            }
        }
        quiet_since = tokio::time::Instant::now();
        let mut printed = Vec::with_capacity(received.len());
        let mut failed = None;
        for entry in &received {
            let message = &entry["message"];
            let data = message["data"]
                .as_str()
                .map(|d| base64::engine::general_purpose::STANDARD.decode(d))
                .transpose()?
                .unwrap_or_default();
            let received = Received {
                message_id: message["messageId"].as_str().unwrap_or_default().to_owned(),
                publish_time: message["publishTime"].as_str().map(str::to_owned),
                ordering_key: message["orderingKey"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                attributes: message
                    .get("attributes")
                    .cloned()
                    .unwrap_or_else(|| json!({})),
                data,
            };
            if let Err(error) = printer.print(&received) {
                failed = Some(error);
                break;
            }
            printed.push(entry["ackId"].clone());
        }
        // What was printed is acknowledged; the rest of the pull (after a
        // write failed) is handed back at once, in order.
        let rest: Vec<Value> = received
            .iter()
            .skip(printed.len())
            .map(|entry| entry["ackId"].clone())
            .collect();
        seen += printed.len() as u64;
        if !printed.is_empty() {
            http.post(format!("{base}:acknowledge"))
                .json(&json!({ "ackIds": printed }))
                .send()
                .await?
                .error_for_status()?;
        }
        if !rest.is_empty() {
            http.post(format!("{base}:modifyAckDeadline"))
                .json(&json!({ "ackIds": rest, "ackDeadlineSeconds": 0 }))
                .send()
                .await?
                .error_for_status()?;
        }
        if let Some(error) = failed {
            return Err(error.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_checked_message_is_shown_as_its_reference_with_its_size() {
        let sha256 = "ab".repeat(32);
        let received = Received {
            message_id: "1".to_owned(),
            publish_time: None,
            ordering_key: "batch-outbox".to_owned(),
            attributes: json!({
                "item_id": "x",
                "claim_check_url": format!("file:///objects/sha256/{sha256}"),
                "claim_check_sha256": sha256,
                "claim_check_bytes": (25 * 1024 * 1024).to_string(),
            }),
            data: br#"{"batch_id":"00000000000000aa"}"#.to_vec(),
        };
        let line: Value = serde_json::from_str(&received.line()).unwrap();
        assert_eq!(line["claim_check"]["bytes"], 25 * 1024 * 1024);
        assert_eq!(line["claim_check"]["size"], "25.0 MiB");
        assert_eq!(line["data"]["batch_id"], "00000000000000aa");
        let inline = Received {
            attributes: json!({ "item_id": "x" }),
            ..received
        };
        let line: Value = serde_json::from_str(&inline.line()).unwrap();
        assert!(line.get("claim_check").is_none());
    }
}
