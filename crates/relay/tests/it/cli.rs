//! `outboxctl` against the real writer, relay, MongoDB (or its stand-in) and
//! the Pub/Sub emulator: what a user types, what they read, and the exit code.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::e2e::{binary, free_port, start_stack, start_stack_on};

/// What one `outboxctl` run printed, and how it ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not one JSON document ({e}): {self:?}"))
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {self:?}")))
            .collect()
    }
}

/// Runs `outboxctl` with the writer and admin URLs of a test, and nothing
/// from the calling environment that would change what it does.
async fn outboxctl(writer: &str, admin: &str, args: &[&str], vars: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(binary("outboxctl"));
    command
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .env_remove("OUTBOX_API_KEY")
        .env_remove("PUBSUB_SUBSCRIPTION")
        .env("OUTBOX_WRITER_URL", writer)
        .env("OUTBOX_ADMIN_URL", admin)
        .envs(vars.iter().copied())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .unwrap_or_else(|_| panic!("outboxctl {args:?} did not end in 180 s"))
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `outboxctl` pointed at one writer and one admin port.
struct Ctl {
    writer: String,
    admin: String,
}

impl Ctl {
    async fn run(&self, args: &[&str], vars: &[(&str, &str)]) -> Run {
        outboxctl(&self.writer, &self.admin, args, vars).await
    }
}

/// A directory of the test's own for the files it submits.
fn files(name: &str, contents: &[(&str, &str)]) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    contents
        .iter()
        .map(|(file, text)| {
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxctl_submits_three_formats_waits_for_them_and_reads_them_back() {
    let stack = start_stack().await;
    let (relay, admin) = stack.relay("relay-cli", &[("OUTBOX_POLL_INTERVAL_SECONDS", "0.2")]);
    let paths = files(
        "cli-submit",
        &[
            (
                "orders.json",
                r#"[{"request_id": "j1", "vendor_name": "acme"}, {"request_id": "j2"}, {"request_id": "j3"}]"#,
            ),
            (
                "events.ndjson",
                "{\"request_id\": \"n1\"}\n{\"request_id\": \"n2\", \"vendor_name\": \"globex\"}\n",
            ),
            (
                "rows.csv",
                "request_id,vendor_name\r\nc1,acme\r\nc2,\"initech, inc\"\r\n",
            ),
        ],
    );
    let paths: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    stack.admin_ready(&admin).await;
    let ctl = Ctl {
        writer: stack.writer_url.clone(),
        admin: admin.clone(),
    };

    let submitted = ctl
        .run(&[&["--json", "submit", "--wait"], &paths[..]].concat(), &[])
        .await;
    assert_eq!(submitted.code, 0, "{submitted:?}\n{}", relay.tail());
    let lines = submitted.json_lines();
    // One line a file as it is stored, then one a batch once committed.
    assert_eq!(lines.len(), 6, "{submitted:?}");
    let sequences: Vec<u64> = lines[..3]
        .iter()
        .map(|l| l["batch_sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [1, 2, 3]);
    assert_eq!(
        lines[..3]
            .iter()
            .map(|l| l["items"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 2, 2]
    );
    for (stored, done) in lines[..3].iter().zip(&lines[3..]) {
        assert_eq!(stored["replayed"], false);
        assert!(
            stored["idempotency_key"]
                .as_str()
                .unwrap()
                .starts_with("outboxctl-sha256-")
        );
        assert_eq!(done["batch_id"], stored["batch_id"]);
        assert_eq!(done["status"], "committed");
        assert_eq!(done["sent"], stored["items"]);
    }

    // The same command again stores nothing: the key comes from the content.
    let again = ctl.run(&["submit", paths[0]], &[]).await;
    assert_eq!(again.code, 0, "{again:?}");
    let first = lines[0]["batch_id"].as_str().unwrap();
    assert!(
        again.stdout.contains(&format!(
            "already stored: batch {first} as sequence 1 (3 items)"
        )),
        "{again:?}"
    );

    let status = ctl.run(&["status", "--json"], &[]).await.json();
    assert_eq!(status["role"], "leader");
    assert_eq!(status["lease"]["holder"], "relay-cli");
    let table = ctl.run(&["status"], &[]).await;
    assert_eq!(table.code, 0);
    // The stream, this replica's part, and who leads what.
    for expected in [
        "leader of this stream",
        "Leader",
        "Epoch",
        "running",
        "relay-cli (this one)",
        "1 stream over 1 replica: each leads at most 1",
    ] {
        assert!(
            table.stdout.contains(expected),
            "{expected} missing: {table:?}"
        );
    }

    let batch = ctl.run(&["batch", first], &[]).await;
    assert!(
        batch.stdout.contains("committed") && batch.stdout.contains("3 total, 3 sent"),
        "{batch:?}"
    );
    let items = ctl
        .run(&["items", first, "--limit", "2", "--json"], &[])
        .await
        .json();
    let page: Vec<&Value> = items["items"].as_array().unwrap().iter().collect();
    assert_eq!(page.len(), 2);
    assert!(
        page.iter()
            .all(|i| i["status"] == "sent" && i["publish_id"].is_string())
    );
    let cursor = items["next_cursor"].as_str().unwrap().to_owned();
    let rest = ctl.run(&["items", first, "--cursor", &cursor], &[]).await;
    assert!(
        rest.stdout.contains("j3") && !rest.stdout.contains("j1"),
        "{rest:?}"
    );
    let pending = ctl.run(&["pending", "--json"], &[]).await.json();
    assert_eq!(pending["batches"], json!([]));

    // `tail` reads what the subscription received, with the relay's code,
    // and leaves the rest for the next: run twice on one subscription, each
    // run gets the next messages at once. (Before, the first run's
    // acknowledgements were lost at exit and the messages it had leased
    // were held for their one-minute ack deadline.)
    let tail_args = |count: &'static str| {
        vec![
            "tail".to_owned(),
            "--count".to_owned(),
            count.to_owned(),
            "--subscription".to_owned(),
            stack.subscription.clone(),
            "--project-id".to_owned(),
            stack.pubsub.project_id.clone(),
            "--topic".to_owned(),
            stack.pubsub.topic.clone(),
            "--emulator-host".to_owned(),
            stack.pubsub.emulator_host.clone().unwrap(),
        ]
    };
    let mut request_ids = Vec::new();
    for count in ["3", "4"] {
        let mut args = tail_args(count);
        if count == "4" {
            // The second run checks the deliveries against the contract.
            args.push("--verify".to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tail = tokio::time::timeout(Duration::from_secs(30), ctl.run(&args, &[]))
            .await
            .unwrap_or_else(|_| {
                panic!("tail --count {count} waited over 30 s for messages that were there")
            });
        assert_eq!(tail.code, 0, "{tail:?}");
        if count == "4" {
            assert!(
                tail.stderr
                    .contains("verify: 4 items, 0 duplicates, 0 out of order")
                    && tail.stderr.contains("the order contract held"),
                "{tail:?}"
            );
        }
        request_ids.extend(
            tail.json_lines()
                .iter()
                .map(|m| m["data"]["request_id"].as_str().unwrap_or("?").to_owned()),
        );
    }
    assert_eq!(
        request_ids,
        ["j1", "j2", "j3", "n1", "n2", "c1", "c2"],
        "each message once, in order, over two runs"
    );

    // A replay of the first batch, started and followed to its end; a
    // finished job cannot be paused.
    let started = ctl
        .run(
            &["replay", "start", "--from", "1", "--to", "1", "--json"],
            &[],
        )
        .await;
    assert_eq!(started.code, 0, "{started:?}");
    let id = started.json()["replay_id"].as_str().unwrap().to_owned();
    let watched = ctl.run(&["replay", "watch", &id], &[]).await;
    assert_eq!(watched.code, 0, "{watched:?}");
    assert!(
        watched.stdout.contains(&format!("replay {id} done")),
        "{watched:?}"
    );
    let list = ctl.run(&["replay", "list"], &[]).await;
    assert!(
        list.stdout.contains(&id) && list.stdout.contains("done"),
        "{list:?}"
    );
    let refused = ctl.run(&["replay", "pause", &id], &[]).await;
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("replay_state_conflict"),
        "{refused:?}"
    );
    let bad = ctl.run(&["replay", "show", "../status"], &[]).await;
    assert_eq!(bad.code, 2, "{bad:?}");

    // A slow replay paused while it is watched: the watch goes on, says the
    // job is paused, and ends with 0 once the job is resumed and done.
    let slow = ctl
        .run(
            &[
                "replay",
                "start",
                "--from",
                "1",
                "--to",
                "2",
                "--max-items-per-second",
                "1",
                "--json",
            ],
            &[],
        )
        .await;
    assert_eq!(slow.code, 0, "{slow:?}");
    let slow_id = slow.json()["replay_id"].as_str().unwrap().to_owned();
    let mut watch = tokio::process::Command::new(binary("outboxctl"))
        .args(["replay", "watch", &slow_id])
        .env_remove("ADMIN_TOKEN")
        .env("OUTBOX_WRITER_URL", &ctl.writer)
        .env("OUTBOX_ADMIN_URL", &ctl.admin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let paused = ctl.run(&["replay", "pause", &slow_id], &[]).await;
    assert_eq!(paused.code, 0, "{paused:?}");
    // The watch says so, and goes on.
    let mut stderr = tokio::io::BufReader::new(watch.stderr.take().unwrap());
    let mut said = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncBufReadExt;
        while !said.contains("is paused") {
            assert!(
                stderr.read_line(&mut said).await.unwrap() > 0,
                "the watch ended: {said}"
            );
        }
    })
    .await
    .expect("the watch says the job is paused");
    assert!(
        watch.try_wait().unwrap().is_none(),
        "the watch goes on through a pause"
    );
    let resumed = ctl.run(&["replay", "resume", &slow_id], &[]).await;
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let watched = tokio::time::timeout(Duration::from_secs(60), watch.wait_with_output())
        .await
        .expect("the watch ends once the job is done")
        .unwrap();
    assert_eq!(watched.status.code(), Some(0), "{said}");
    let out = String::from_utf8_lossy(&watched.stdout);
    assert!(out.contains(&format!("replay {slow_id} done")), "{out}");

    // A tail that cannot reach Pub/Sub says so, and what to do, in seconds.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let unreachable = tokio::time::timeout(
        Duration::from_secs(30),
        ctl.run(&["tail", "--emulator-host", &nowhere], &[]),
    )
    .await
    .expect("tail gives up on an unreachable emulator");
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    assert!(
        unreachable
            .stderr
            .contains(&format!("the Pub/Sub emulator at {nowhere}")),
        "{unreachable:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxctl_pauses_resumes_and_retries_a_halted_batch() {
    let stack = start_stack().await;
    let token = [("ADMIN_TOKEN", "s3cret-admin-token-0123456789abcdef")];
    let relay_vars = [
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        ("ADMIN_TOKEN", "s3cret-admin-token-0123456789abcdef"),
    ];
    let (relay, admin) = stack.relay("relay-halts", &relay_vars);
    let writer = stack.writer_url.clone();
    stack.admin_ready(&admin).await;
    let ctl = Ctl {
        writer: writer.clone(),
        admin: admin.clone(),
    };

    // Pause needs the token; the answer names the problem's code.
    let refused = ctl.run(&["pause"], &[]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("(unauthorized, HTTP 401)"),
        "{refused:?}"
    );
    assert_eq!(refused.stderr.lines().count(), 1, "one line: {refused:?}");
    // Paused, resumed and paused again: the pause holds (the stand-in
    // reads a flag set with `$set` back as 1).
    for command in ["pause", "resume", "pause"] {
        let run = ctl.run(&[command], &token).await;
        assert_eq!(run.code, 0, "{run:?}");
    }
    let status = ctl.run(&["status", "--json"], &token).await.json();
    assert_eq!(status["paused"], true, "{status}");

    // 11 MB: over Pub/Sub's 10 MB message limit, so the writer refuses it
    // with the item's index, in one line.
    let huge = json!([
        {"request_id": "first"},
        {"request_id": "huge", "blob": "x".repeat(11_000_000)},
        {"request_id": "last"},
    ]);
    let paths = files("cli-halt", &[("huge.json", &huge.to_string())]);
    let refused = ctl
        .run(&["submit", paths[0].to_str().unwrap()], &token)
        .await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("(item_too_large, HTTP 413); index 1"),
        "{refused:?}"
    );
    // A batch stored before the writer checked Pub/Sub's limits: the relay
    // (OUTBOX_ON_POISON=halt) halts on it once resumed. Stored while
    // paused, behind a small batch submitted while paused: both stay
    // pending, however many passes the relay makes.
    let small = files("cli-small", &[("small.json", r#"[{"request_id": "s1"}]"#)]);
    let submitted = ctl
        .run(&["--json", "submit", small[0].to_str().unwrap()], &token)
        .await;
    assert_eq!(submitted.code, 0, "{submitted:?}");
    let batch_id = stack.store_unchecked(huge.as_array().unwrap()).await;
    let pending = ctl.run(&["pending", "--json"], &token).await.json();
    assert_eq!(pending["batches"].as_array().unwrap().len(), 2, "{pending}");
    assert_eq!(pending["batches"][1]["batch_id"], batch_id.as_str());
    // The relay reports the backlog it read after the pause: two passes
    // later (its oldest-pending age moved on), nothing was drained.
    let ages = std::sync::Mutex::new(std::collections::BTreeSet::new());
    crate::e2e::eventually(
        Duration::from_secs(30),
        "two relay passes while paused",
        || {
            let status = ctl.run(&["status", "--json"], &token);
            let ages = &ages;
            async move {
                let status = status.await.json();
                let mut ages = ages.lock().unwrap();
                if status["pending_batches"] == 2 {
                    ages.insert(status["oldest_pending_age_seconds"].to_string());
                }
                ages.len() >= 3
            }
        },
    )
    .await;
    let pending = ctl.run(&["pending", "--json"], &token).await.json();
    assert_eq!(
        pending["batches"][0]["status"],
        "pending",
        "paused: still pending\n{}",
        relay.tail()
    );
    assert_eq!(
        ctl.run(&["status", "--json"], &token).await.json()["paused"],
        true
    );

    let resumed = ctl.run(&["resume"], &token).await;
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let watched = ctl.run(&["watch", &batch_id], &token).await;
    assert_eq!(watched.code, 1, "{watched:?}\n{}", relay.tail());
    assert!(
        watched.stderr.contains("failed and draining halted"),
        "{watched:?}"
    );
    assert!(
        watched
            .stderr
            .contains(&format!("outboxctl retry {batch_id}")),
        "{watched:?}"
    );
    let status = ctl.run(&["status"], &token).await;
    assert!(
        status
            .stdout
            .contains(&format!("halted on batch 2 ({batch_id})")),
        "{status:?}"
    );

    // Retried on a relay that dead-letters instead: the batch commits, and
    // `watch` says one item did not make it.
    drop(relay);
    let (relay, admin) = stack.relay(
        "relay-dead-letters",
        &[
            ("OUTBOX_ON_POISON", "dead-letter"),
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        ],
    );
    stack.admin_ready(&admin).await;
    let retried = outboxctl(&stack.writer_url, &admin, &["retry", &batch_id], &token).await;
    assert_eq!(retried.code, 0, "{retried:?}\n{}", relay.tail());
    assert!(retried.stdout.contains("draining again"), "{retried:?}");
    let watched = outboxctl(&stack.writer_url, &admin, &["watch", &batch_id], &token).await;
    assert_eq!(watched.code, 1, "{watched:?}");
    assert!(
        watched
            .stderr
            .contains("committed with 1 of 3 items dead-lettered"),
        "{watched:?}"
    );
    let again = outboxctl(&stack.writer_url, &admin, &["retry", &batch_id], &token).await;
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.contains("(batch_not_failed, HTTP 409)"),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxctl_says_what_went_wrong_in_one_line_with_its_exit_code() {
    let standin = std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin");
    let writer_vars = [
        ("REQUEST_DEADLINE_SECONDS", "30".to_owned()),
        (
            "WRITER_API_KEYS",
            "cli:k3y-for-the-cli-0123456789".to_owned(),
        ),
    ];
    let stack = start_stack_on(&crate::e2e::env("MONGODB_URL"), standin, &writer_vars).await;
    let (_relay, admin) = stack.relay("relay-errors", &[]);
    let key = [("OUTBOX_API_KEY", "k3y-for-the-cli-0123456789")];
    stack.admin_ready(&admin).await;
    let ctl = Ctl {
        writer: stack.writer_url.clone(),
        admin: admin.clone(),
    };
    let paths = files(
        "cli-errors",
        &[
            ("ok.json", r#"[{"request_id": "a"}]"#),
            ("empty.json", "[]"),
            ("bad.csv", "a,b\r\n1\r\n"),
            ("notes.txt", "hello"),
        ],
    );
    let path = |i: usize| paths[i].to_str().unwrap();
    let expect = |run: &Run, code: i32, text: &str| {
        assert_eq!(run.code, code, "{run:?}");
        assert!(run.stderr.contains(text), "{text:?} missing: {run:?}");
        assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {run:?}");
        assert!(
            !run.stderr.contains('\x1b'),
            "no colour off a terminal: {run:?}"
        );
    };

    // 401 without the writer's key, 201 with it.
    expect(
        &ctl.run(&["submit", path(0)], &[]).await,
        1,
        "(unauthorized, HTTP 401)",
    );
    assert_eq!(ctl.run(&["submit", path(0)], &key).await.code, 0);
    // 422 with the writer's code (and where, for CSV).
    expect(
        &ctl.run(&["submit", path(1)], &key).await,
        1,
        "(empty_batch, HTTP 422)",
    );
    expect(
        &ctl.run(&["submit", path(2)], &key).await,
        1,
        "line 2: 1 fields, but the header has 2 (csv_field_count, HTTP 422)",
    );
    // 404 from the writer and from the admin port.
    expect(
        &ctl.run(&["batch", "00000000000000ff"], &key).await,
        1,
        "(batch_not_found, HTTP 404)",
    );
    expect(
        &ctl.run(&["items", "00000000000000ff"], &[]).await,
        1,
        "(batch_not_found, HTTP 404)",
    );
    expect(
        &ctl.run(&["watch", "00000000000000ff"], &key).await,
        1,
        "(batch_not_found, HTTP 404)",
    );
    // Nothing listening: exit 3, after the submit's retries.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let unreachable = outboxctl(
        &nowhere,
        &nowhere,
        &["submit", "--retries", "1", path(0)],
        &key,
    )
    .await;
    assert_eq!(unreachable.code, 3, "{unreachable:?}");
    assert!(
        unreachable
            .stderr
            .contains(&format!("cannot reach the writer at {nowhere}")),
        "{unreachable:?}"
    );
    assert!(
        unreachable
            .stderr
            .contains("trying again in 0.5 s (1 of 1)"),
        "{unreachable:?}"
    );
    expect(
        &outboxctl(&nowhere, &nowhere, &["status"], &[]).await,
        3,
        "cannot reach the relay's admin port",
    );
    // Wrong usage and unreadable input: exit 2, nothing sent.
    expect(
        &ctl.run(&["batch", "not-a-batch"], &key).await,
        2,
        "is not a batch id",
    );
    expect(
        &ctl.run(&["submit", path(3)], &key).await,
        2,
        "cannot tell the format",
    );
    expect(
        &ctl.run(&["submit", "/nonexistent/x.json"], &key).await,
        2,
        "cannot read /nonexistent/x.json",
    );
    let usage = ctl.run(&["pending", "--limit", "0"], &[]).await;
    assert_eq!(usage.code, 2, "{usage:?}");
    let help = ctl.run(&["--help"], &[]).await;
    assert_eq!(help.code, 0);
    assert!(
        help.stdout.contains("Examples:") && help.stdout.contains("Exit codes:"),
        "{help:?}"
    );
    let completions = ctl.run(&["completions", "bash"], &[]).await;
    assert_eq!(completions.code, 0, "{completions:?}");
    assert!(
        completions.stdout.contains("_outboxctl()") && completions.stdout.contains("submit"),
        "{completions:?}"
    );
}

/// `outboxctl stream apply -f` makes a declared set of streams true: the
/// first run creates them, a second one changes nothing, an edit updates
/// only the stream edited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxctl_applies_a_declared_set_of_streams_once() {
    let stack = start_stack().await;
    let (_relay, admin) = stack.relay(
        "relay-apply",
        &[("ADMIN_TOKEN", "s3cret-admin-token-0123456789abcdef")],
    );
    stack.admin_ready(&admin).await;
    let ctl = Ctl {
        writer: stack.writer_url.clone(),
        admin,
    };
    let token = [("ADMIN_TOKEN", "s3cret-admin-token-0123456789abcdef")];
    let topic = &stack.pubsub.topic;
    let declaration = |orders_topic: &str| {
        format!(
            "streams:\n\
             - name: orders\n  topic: {orders_topic}\n  ordering_key: field:/vendor_name\n  ordering_key_default: none\n\
             - name: audit\n  topic: {topic}-audit\n  ordering_key: global\n  ordering_key_default: ignored\n  on_poison: dead-letter\n"
        )
    };
    let file = files(
        "apply",
        &[
            ("streams.yaml", &declaration(&format!("{topic}-orders"))),
            ("edited.yaml", &declaration(&format!("{topic}-orders-2"))),
        ],
    );
    let path = |i: usize| file[i].to_str().unwrap().to_owned();
    let outcomes = |run: &Run| -> Vec<(String, String)> {
        assert_eq!(run.code, 0, "{run:?}");
        run.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["stream"].as_str().unwrap().to_owned(),
                    a["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let pair = |s: &str, o: &str| (s.to_owned(), o.to_owned());
    let first = ctl
        .run(&["stream", "apply", "-f", &path(0), "--json"], &token)
        .await;
    assert_eq!(
        outcomes(&first),
        [pair("orders", "created"), pair("audit", "created")]
    );
    let again = ctl
        .run(&["stream", "apply", "-f", &path(0), "--json"], &token)
        .await;
    assert_eq!(
        outcomes(&again),
        [pair("orders", "unchanged"), pair("audit", "unchanged")]
    );
    let edited = ctl
        .run(&["stream", "apply", "-f", &path(1), "--json"], &token)
        .await;
    assert_eq!(
        outcomes(&edited),
        [pair("orders", "updated"), pair("audit", "unchanged")]
    );
    let shown = ctl
        .run(&["stream", "show", "orders", "--json"], &token)
        .await
        .json();
    assert_eq!(shown["topic"], format!("{topic}-orders-2"), "{shown}");
}

/// Several files: a refused one is named, the others are still sent, and a
/// summary says what was stored and what was not (exit 1); `--fail-fast`
/// stops at the first. An empty file is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxctl_submits_the_other_files_when_one_is_refused() {
    let stack = start_stack().await;
    let ctl = Ctl {
        writer: stack.writer_url.clone(),
        admin: "http://127.0.0.1:9".to_owned(),
    };
    let paths = files(
        "cli-many",
        &[
            ("a.json", r#"[{"request_id": "a"}]"#),
            ("bad.csv", "a,b,c\r\n1,2,3\r\n4,5\r\n"),
            ("c.json", r#"[{"request_id": "c1"}, {"request_id": "c2"}]"#),
            ("empty.json", " \n"),
        ],
    );
    let path = |i: usize| paths[i].to_str().unwrap();
    let run = ctl.run(&["submit", path(0), path(1), path(2)], &[]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "{}: line 3: 2 fields, but the header has 3",
            path(1)
        )),
        "{run:?}"
    );
    assert!(
        run.stdout.contains(&format!("{}: stored batch", path(2))),
        "c.json still sent: {run:?}"
    );
    assert!(
        run.stdout.contains(&format!(
            "2 of 3 files stored (3 items); not stored: {}",
            path(1)
        )),
        "{run:?}"
    );
    let fast = ctl
        .run(&["submit", "--fail-fast", path(1), path(2)], &[])
        .await;
    assert_eq!(fast.code, 1, "{fast:?}");
    assert!(
        !fast.stdout.contains("stored batch"),
        "nothing after the first refusal: {fast:?}"
    );
    let empty = ctl.run(&["submit", path(3)], &[]).await;
    assert_eq!(empty.code, 2, "{empty:?}");
    assert!(
        empty.stderr.contains("is empty") && empty.stderr.contains("empty_body"),
        "{empty:?}"
    );
}

/// `OUTBOX_ADMIN_URL` takes a list: with the first relay gone, outboxctl
/// uses the next that answers and says so; with none, it names every URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outboxctl_goes_on_with_the_next_relay_when_the_first_is_gone() {
    let stack = start_stack().await;
    let (_relay, admin) = stack.relay("relay-list", &[]);
    stack.admin_ready(&admin).await;
    let gone = format!("http://127.0.0.1:{}", free_port());
    let list = format!("{gone},{admin}");
    let status = outboxctl(&stack.writer_url, &list, &["status", "--json"], &[]).await;
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        status
            .stderr
            .contains(&format!("using the relay at {admin}")),
        "{status:?}"
    );
    assert!(status.json()["relay_id"].is_string(), "{status:?}");
    let none = format!("{gone},http://127.0.0.1:{}", free_port());
    let failed = outboxctl(&stack.writer_url, &none, &["status"], &[]).await;
    assert_eq!(failed.code, 3, "{failed:?}");
    assert!(
        failed
            .stderr
            .contains("cannot reach any relay's admin port")
            && failed.stderr.contains(&gone),
        "{failed:?}"
    );
}
