//! `outboxctl replay`: start, list, follow, pause, resume and cancel
//! replay jobs (`/api/v1/outbox/replays` on a relay's admin port).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::cli::{ReplayCommand, ReplayStartArgs};
use crate::client::{Client, Failure, Service};
use crate::print_out;
use crate::progress;

const POLL: Duration = Duration::from_millis(500);
const BASE: &str = "/api/v1/outbox/replays";

/// A replay id as the relay prints it (a UUID), checked before it goes in
/// a URL path.
fn replay_id(raw: &str) -> Result<&str, Failure> {
    let ok = raw.len() == 36
        && raw.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if ok {
        Ok(raw)
    } else {
        Err(Failure::Usage(format!(
            "{raw:?} is not a replay id (a UUID, as `replay start` and `replay list` print)"
        )))
    }
}

fn body(args: &ReplayStartArgs, stream: &str) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("stream".to_owned(), json!(stream));
    body.insert("from_sequence".to_owned(), json!(args.from));
    body.insert("to_sequence".to_owned(), json!(args.to));
    if let Some(topic) = &args.topic {
        body.insert("topic".to_owned(), json!(topic));
    }
    if let Some(mode) = &args.ordering_key {
        body.insert("ordering_key".to_owned(), json!(mode));
    }
    if let Some(rate) = args.max_items_per_second {
        body.insert("max_items_per_second".to_owned(), json!(rate));
    }
    body
}

/// One job on one line: `<id>  <state>  <stream> <from>..<to> -> <topic>  <items>/<total>`.
pub fn line(job: &Value) -> String {
    let n = |field: &str| job[field].as_u64().unwrap_or(0);
    let mut text = format!(
        "{}  {:<9}  {} {}..{} -> {}  {}/{} batches  {}/{} items",
        job["replay_id"].as_str().unwrap_or("?"),
        job["state"].as_str().unwrap_or("?"),
        job["stream"].as_str().unwrap_or("?"),
        n("from_sequence"),
        n("to_sequence"),
        job["topic"].as_str().unwrap_or("?"),
        progress::thousands(n("batches_sent")),
        progress::thousands(n("batches_total")),
        progress::thousands(n("items_sent")),
        progress::thousands(n("items_total")),
    );
    if let Some(rate) = job["rate_items_per_second"].as_f64() {
        text.push_str(&format!("  {}/s", progress::thousands(rate.round() as u64)));
    }
    if let Some(error) = job["error"].as_str() {
        text.push_str(&format!("  error: {error}"));
    }
    text
}

fn list_text(list: &Value) -> String {
    let jobs = list["replays"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        return "no replays".to_owned();
    }
    jobs.iter().map(line).collect::<Vec<_>>().join("\n")
}

async fn get(client: &Client, path: &str) -> Result<Value, Failure> {
    let request = client.request(Service::Admin, Method::GET, path);
    client.call(Service::Admin, request).await
}

/// Follows a job until it is done (`Ok`), or failed or cancelled (`Err`,
/// with its state). A paused job is watched on, shown paused (on stderr,
/// once, without a terminal's bar), until it is resumed and done.
async fn watch(client: &Client, id: &str, bar: bool) -> Result<Value, Failure> {
    let path = format!("{BASE}/{id}");
    let (progress, width) = progress::line_bar(bar);
    let label = format!("replay {}", &id[..8]);
    let mut meter = progress::Meter::default();
    let mut said_paused = false;
    let result = loop {
        let job = get(client, &path).await?;
        let sent = job["items_sent"].as_u64().unwrap_or(0);
        meter.record(std::time::Instant::now(), sent);
        let state = job["state"].as_str().unwrap_or("unknown").to_owned();
        let shown = format!(
            "{}/{} batches  {state}",
            progress::thousands(job["batches_sent"].as_u64().unwrap_or(0)),
            progress::thousands(job["batches_total"].as_u64().unwrap_or(0)),
        );
        progress.set_message(progress::line(
            &label,
            sent,
            job["items_total"].as_u64(),
            meter.rate(),
            &shown,
            width,
        ));
        match state.as_str() {
            "done" => break Ok(job),
            "running" => said_paused = false,
            "paused" => {
                if !bar && !said_paused {
                    eprintln!(
                        "replay {id} is paused at batch {}; watching until it is resumed (`outboxctl replay resume {id}`)",
                        job["position"]["batch_sequence"]
                    );
                }
                said_paused = true;
            }
            "failed" => {
                break Err(Failure::Refused(format!(
                    "replay {id} failed: {}; fix the cause, then `outboxctl replay resume {id}`",
                    job["error"].as_str().unwrap_or("no reason recorded")
                )));
            }
            other => break Err(Failure::Refused(format!("replay {id} is {other}"))),
        }
        tokio::time::sleep(POLL).await;
    };
    progress.finish_and_clear();
    result
}

pub async fn run(
    client: &Client,
    command: ReplayCommand,
    stream: &str,
    json: bool,
    bars: bool,
) -> Result<(), Failure> {
    let say = |job: &Value, sentence: String| {
        if json {
            out!("{job}");
        } else {
            out!("{sentence}");
        }
    };
    match command {
        ReplayCommand::Start(args) => {
            let request = client
                .request(Service::Admin, Method::POST, BASE)
                .json(&body(&args, stream));
            let job = client.call(Service::Admin, request).await?;
            let id = job["replay_id"].as_str().unwrap_or("?").to_owned();
            say(
                &job,
                format!(
                    "replay {id} started: batches {}..{} of stream {stream} ({} items) to {}",
                    args.from,
                    args.to,
                    progress::thousands(job["items_total"].as_u64().unwrap_or(0)),
                    job["topic"].as_str().unwrap_or("?")
                ),
            );
            if args.watch {
                let job = watch(client, replay_id(&id)?, bars).await?;
                say(&job, format!("replay {id} done: {}", line(&job)));
            }
        }
        ReplayCommand::List => {
            let list = get(client, &format!("{BASE}?stream={stream}")).await?;
            if json {
                out!("{list}");
            } else {
                out!("{}", list_text(&list));
            }
        }
        ReplayCommand::Show { replay_id: id } => {
            let job = get(client, &format!("{BASE}/{}", replay_id(&id)?)).await?;
            say(&job, line(&job));
        }
        ReplayCommand::Watch { replay_id: id } => {
            let job = watch(client, replay_id(&id)?, bars).await?;
            say(&job, format!("replay {id} done: {}", line(&job)));
        }
        ReplayCommand::Pause { replay_id: id } => {
            let job = act(client, &id, "pause").await?;
            say(
                &job,
                format!(
                    "replay {id} paused at batch {}",
                    job["position"]["batch_sequence"]
                ),
            );
        }
        ReplayCommand::Resume { replay_id: id } => {
            let job = act(client, &id, "resume").await?;
            say(&job, format!("replay {id} running again"));
        }
        ReplayCommand::Cancel { replay_id: id } => {
            let job = act(client, &id, "cancel").await?;
            say(&job, format!("replay {id} cancelled"));
        }
    }
    Ok(())
}

async fn act(client: &Client, id: &str, action: &str) -> Result<Value, Failure> {
    let path = format!("{BASE}/{}/{action}", replay_id(id)?);
    let request = client.request(Service::Admin, Method::POST, &path);
    client.call(Service::Admin, request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_ids_are_checked_before_they_reach_a_path() {
        assert!(replay_id("0b5e3c1a-8f2d-4c6b-9a7e-1d2f3a4b5c6d").is_ok());
        for bad in [
            "",
            "../status",
            "0b5e3c1a8f2d4c6b9a7e1d2f3a4b5c6d",
            "0b5e3c1a-8f2d-4c6b-9a7e-1d2f3a4b5c6g",
        ] {
            assert!(replay_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_job_line_shows_progress_and_error() {
        let job = json!({
            "replay_id": "0b5e3c1a-8f2d-4c6b-9a7e-1d2f3a4b5c6d", "state": "failed",
            "stream": "default", "from_sequence": 3, "to_sequence": 9, "topic": "orders-replay",
            "batches_sent": 2, "batches_total": 7, "items_sent": 2000, "items_total": 7000,
            "rate_items_per_second": null, "error": "batch 5 of the range is no longer held",
        });
        let text = line(&job);
        assert!(text.contains("failed"), "{text}");
        assert!(text.contains("default 3..9 -> orders-replay"), "{text}");
        assert!(text.contains("2/7 batches  2,000/7,000 items"), "{text}");
        assert!(
            text.ends_with("error: batch 5 of the range is no longer held"),
            "{text}"
        );
        assert_eq!(list_text(&json!({"replays": []})), "no replays");
    }
}
