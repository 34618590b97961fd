//! `outboxctl watch`: follow a batch until it is committed.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;

use crate::client::{Client, Failure, Service};
use crate::progress;

const POLL: Duration = Duration::from_millis(500);
/// How long the writer may stay unreachable once the watch has begun.
const OUTAGE_LIMIT: Duration = Duration::from_secs(60);

/// Polls the writer's status of `batch_id` until the batch is committed
/// (`Ok`, with its last status), failed, or `max_wait` has passed.
pub async fn watch(
    client: &Client,
    batch_id: &str,
    max_wait: Option<Duration>,
    bar: bool,
) -> Result<Value, Failure> {
    let started = Instant::now();
    let path = format!("/api/v1/batch/{batch_id}/status");
    let (progress, width) = progress::line_bar(bar);
    let label = format!("batch {batch_id}");
    let mut meter = progress::Meter::default();
    progress.set_message(progress::line(
        &label,
        0,
        None,
        None,
        "waiting for its status",
        width,
    ));
    let mut outage: Option<Instant> = None;
    let mut seen = false;
    let result = loop {
        let request = client.request(Service::Writer, Method::GET, &path);
        match client.call(Service::Writer, request).await {
            Ok(status) => {
                (outage, seen) = (None, true);
                let count = |name: &str| status[name].as_u64().unwrap_or(0);
                let done = count("sent") + count("failed");
                meter.record(std::time::Instant::now(), done);
                let state = status["status"].as_str().unwrap_or("unknown").to_owned();
                progress.set_message(progress::line(
                    &label,
                    done,
                    status["total"].as_u64(),
                    meter.rate(),
                    &state,
                    width,
                ));
                match state.as_str() {
                    "committed" if count("failed") > 0 => {
                        break Err(Failure::Refused(format!(
                            "batch {batch_id} committed with {} of {} items dead-lettered: {}",
                            count("failed"),
                            count("total"),
                            reason(&status)
                        )));
                    }
                    "committed" => break Ok(status),
                    "failed" => {
                        break Err(Failure::Refused(format!(
                            "batch {batch_id} failed and draining halted on it: {}; \
                             fix the cause, then `outboxctl retry {batch_id}`",
                            reason(&status)
                        )));
                    }
                    _ => {}
                }
            }
            // A watch that never reached the writer, or a batch it does not
            // know, ends at once; a writer lost on the way is waited for.
            Err(Failure::Unavailable(reason)) if seen => {
                let since = *outage.get_or_insert_with(Instant::now);
                progress.set_message(progress::line(
                    &label,
                    0,
                    None,
                    None,
                    &format!("writer unreachable: {reason}"),
                    width,
                ));
                if since.elapsed() > OUTAGE_LIMIT {
                    break Err(Failure::Unavailable(reason));
                }
            }
            Err(failure) => break Err(failure),
        }
        if max_wait.is_some_and(|limit| started.elapsed() >= limit) {
            break Err(Failure::Unavailable(format!(
                "batch {batch_id} is not committed after {:.0} s (--max-wait)",
                started.elapsed().as_secs_f64()
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    progress.finish_and_clear();
    result
}

fn reason(status: &Value) -> &str {
    status["last_error"]
        .as_str()
        .unwrap_or("no reason recorded")
}
