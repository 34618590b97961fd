//! `outboxctl`: submit batches to batch-outbox, follow them, and inspect
//! and steer the relay. Talks to the writer's and a relay's HTTP APIs; `tail`
//! reads Pub/Sub with the relay's own code.

/// `println!` that lets a closed stdout (`outboxctl pending | head`) end
/// the output quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        print_out(format!($($arg)*))
    };
}

mod cli;
mod client;
mod progress;
mod render;
mod replays;
mod streams;
mod submit;
mod watch;

use std::io::IsTerminal;
use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use clap::Parser;
use cli::{Cli, Command, PageArgs, StreamCommand};
use client::{Client, Failure, Service};

/// The global flags a subcommand does not use, hidden from its `--help`
/// (they are still accepted, so that a shell's exported settings never
/// make a command fail): the writer's for admin commands, the relay's for
/// writer commands, none of them for `tail` and `completions`.
const UNUSED_FLAGS: &[(&str, &[&str])] = &[
    ("submit", &["admin_url", "admin_token"]),
    ("watch", &["admin_url", "admin_token", "stream"]),
    ("batch", &["admin_url", "admin_token", "stream"]),
    ("status", &["writer_url", "api_key"]),
    ("pending", &["writer_url", "api_key"]),
    ("items", &["writer_url", "api_key", "stream"]),
    ("retry", &["writer_url", "api_key", "stream"]),
    ("pause", &["writer_url", "api_key"]),
    ("resume", &["writer_url", "api_key"]),
    ("stream", &["writer_url", "api_key", "stream"]),
    ("replay", &["writer_url", "api_key"]),
    (
        "tail",
        &[
            "writer_url",
            "admin_url",
            "api_key",
            "admin_token",
            "timeout",
            "stream",
            "json",
        ],
    ),
    (
        "completions",
        &[
            "writer_url",
            "admin_url",
            "api_key",
            "admin_token",
            "timeout",
            "stream",
            "json",
        ],
    ),
];

/// Hides `flags` in `command` and every subcommand of it.
fn hide(command: clap::Command, flags: &[&str]) -> clap::Command {
    let mut command = command;
    for flag in flags {
        if command.get_arguments().any(|a| a.get_id() == *flag) {
            command = command.mut_arg(*flag, |a| a.hide(true));
        }
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |sub| hide(sub, flags));
    }
    command
}

/// The command line, each subcommand's help showing the flags it uses:
/// for rendering help only (an argument changed after `build` is not
/// parsed right; parsing uses `Cli` itself).
fn command() -> clap::Command {
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    for (name, flags) in UNUSED_FLAGS {
        command = command.mut_subcommand(*name, |sub| hide(sub, flags));
    }
    command
}

/// The help of the subcommand `args` name, from [`command`] (where each
/// subcommand shows only the flags it uses).
fn subcommand_help(args: &[String], long: bool) -> String {
    let mut command = command();
    let mut current = &mut command;
    for arg in args {
        if current.find_subcommand(arg).is_some() {
            current = current.find_subcommand_mut(arg).expect("found");
        }
    }
    if long {
        current.render_long_help().to_string()
    } else {
        current.render_help().to_string()
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if error.kind() == clap::error::ErrorKind::DisplayHelp => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let long = args.iter().any(|a| a == "--help");
            print!("{}", subcommand_help(&args, long));
            return ExitCode::SUCCESS;
        }
        Err(error) => error.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "outboxctl", &mut script);
        print_out(String::from_utf8_lossy(&script).trim_end());
        return ExitCode::SUCCESS;
    }
    if let Command::Tail(source) = &cli.command {
        return runtime.block_on(relay::tail::run(source));
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let stderr = std::io::stderr();
            let colour = stderr.is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let prefix = if colour {
                "\x1b[1;31merror:\x1b[0m"
            } else {
                "error:"
            };
            eprintln!("{prefix} {failure}");
            failure.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    // Progress bars only for a person watching, never in a pipe or for --json.
    let bars = !json && std::io::stderr().is_terminal();
    let stream = stream_name(&cli.connection.stream)?.to_owned();
    // Everything about batches, pause and status is the stream's.
    let scoped = |rest: &str| format!("/api/v1/streams/{stream}{rest}");
    let client = Client::new(cli.connection)?;
    match cli.command {
        Command::Submit(args) => {
            if args.idempotency_key.is_some() && args.files.len() > 1 {
                return Err(Failure::Usage(
                    "--idempotency-key names one batch: give one file".to_owned(),
                ));
            }
            // Every file is read (and its format settled) before anything
            // is sent; a file that cannot be, or that the writer refuses,
            // is named and the others go on (unless --fail-fast).
            let mut failed: Vec<(String, Failure)> = Vec::new();
            let mut uploads = Vec::with_capacity(args.files.len());
            for path in &args.files {
                match submit::Upload::read(path, args.format, args.idempotency_key.as_deref()) {
                    Ok(upload) => uploads.push(upload),
                    Err(failure) if args.fail_fast || args.files.len() == 1 => return Err(failure),
                    Err(failure) => {
                        eprintln!("error: {failure}");
                        failed.push((path.display().to_string(), failure));
                    }
                }
            }
            let mut stored = Vec::with_capacity(uploads.len());
            for upload in &uploads {
                let batch = match submit::submit(&client, &stream, upload, args.retries, bars).await
                {
                    Ok(batch) => batch,
                    Err(failure) => {
                        let failure = failure.about(&upload.name);
                        if args.fail_fast || args.files.len() == 1 {
                            return Err(failure);
                        }
                        eprintln!("error: {failure}");
                        failed.push((upload.name.clone(), failure));
                        continue;
                    }
                };
                if json {
                    out!("{}", batch.to_json(upload));
                } else {
                    out!(
                        "{}: {} batch {} as sequence {} ({})",
                        upload.name,
                        if batch.replayed {
                            "already stored:"
                        } else {
                            "stored"
                        },
                        batch.batch_id,
                        batch.batch_sequence,
                        items(batch.items)
                    );
                }
                stored.push(batch);
            }
            if args.files.len() > 1 && !json {
                let total: u64 = stored.iter().map(|b| b.items).sum();
                let mut summary = format!(
                    "{} of {} files stored ({})",
                    stored.len(),
                    args.files.len(),
                    items(total)
                );
                if !failed.is_empty() {
                    let names: Vec<&str> = failed.iter().map(|(name, _)| name.as_str()).collect();
                    summary.push_str(&format!("; not stored: {}", names.join(", ")));
                }
                out!("{summary}");
            }
            if let Some(failure) = Failure::worst(failed) {
                return Err(failure);
            }
            if args.wait {
                for batch in &stored {
                    finished(
                        &watch::watch(&client, &batch.batch_id, None, bars).await?,
                        json,
                    );
                }
            }
        }
        Command::Watch(args) => {
            let batch_id = batch_id(&args.batch_id)?;
            finished(
                &watch::watch(&client, batch_id, args.max_wait, bars).await?,
                json,
            );
        }
        Command::Status => {
            let status = admin_get(&client, &scoped("/status"), &[]).await?;
            let streams = admin_get(&client, "/api/v1/streams", &[]).await?;
            let cluster = admin_get(&client, "/api/v1/cluster", &[]).await?;
            if json {
                // The stream's status, with every stream and the replicas.
                let mut all = status;
                if let Some(object) = all.as_object_mut() {
                    object.insert("streams".to_owned(), streams["streams"].clone());
                    object.insert("cluster".to_owned(), cluster);
                }
                out!("{all}");
            } else {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                out!("{}", render::status(&status, now_ms));
                out!("{}", render::streams(&streams, &cluster));
            }
        }
        Command::Pending(page) => {
            let page = admin_get(&client, &scoped("/pending-batches"), &query(&page)).await?;
            print(&page, json, render::pending);
        }
        Command::Batch { batch_id: id } => {
            let path = format!("/api/v1/batch/{}/status", batch_id(&id)?);
            let request = client.request(Service::Writer, Method::GET, &path);
            print(
                &client.call(Service::Writer, request).await?,
                json,
                render::batch,
            );
        }
        Command::Items { batch_id: id, page } => {
            let path = scoped(&format!("/batch/{}/items", batch_id(&id)?));
            print(
                &admin_get(&client, &path, &query(&page)).await?,
                json,
                render::items,
            );
        }
        Command::Retry { batch_id: id } => {
            let path = scoped(&format!("/batch/{}/retry", batch_id(&id)?));
            let answer = admin_post(&client, &path).await?;
            say(&answer, json, || {
                format!("batch {id} is draining again from its first unsent item")
            });
        }
        Command::Pause => {
            let answer = admin_post(&client, &scoped("/pause")).await?;
            say(&answer, json, || {
                format!("draining of stream {stream} paused, on every replica")
            });
        }
        Command::Resume => {
            let answer = admin_post(&client, &scoped("/resume")).await?;
            say(&answer, json, || {
                format!("draining of stream {stream} resumed")
            });
        }
        Command::Stream(command) => stream_command(&client, command, json).await?,
        Command::Replay(command) => replays::run(&client, command, &stream, json, bars).await?,
        Command::Tail(_) | Command::Completions { .. } => {
            unreachable!("handled before the client is built")
        }
    }
    Ok(())
}

async fn stream_command(
    client: &Client,
    command: StreamCommand,
    json: bool,
) -> Result<(), Failure> {
    match command {
        StreamCommand::List => {
            let streams = admin_get(client, "/api/v1/streams", &[]).await?;
            let cluster = admin_get(client, "/api/v1/cluster", &[]).await?;
            if json {
                out!("{streams}");
            } else {
                out!("{}", render::streams(&streams, &cluster));
            }
        }
        StreamCommand::Show { name } => {
            stream_name(&name)?;
            let stream = streams::get(client, &name)
                .await?
                .ok_or_else(|| Failure::Refused(format!("no stream {name}")))?;
            print(&stream, json, render::stream);
        }
        StreamCommand::Create { name, definition } => {
            stream_name(&name)?;
            let stream = streams::create(client, &name, &definition).await?;
            say(&stream, json, || format!("stream {name} created"));
        }
        StreamCommand::Update { name, definition } => {
            stream_name(&name)?;
            let stream = streams::update(client, &name, &definition).await?;
            say(&stream, json, || format!("stream {name} updated"));
        }
        StreamCommand::Apply { file } => {
            let applied = streams::apply(client, &file).await?;
            if json {
                let lines: Vec<Value> = applied
                    .iter()
                    .map(|a| serde_json::json!({ "stream": a.name, "outcome": a.outcome }))
                    .collect();
                out!("{}", Value::Array(lines));
            } else {
                for a in &applied {
                    out!("stream {}: {}", a.name, a.outcome);
                }
            }
        }
    }
    Ok(())
}

/// A stream name as the services take it.
fn stream_name(raw: &str) -> Result<&str, Failure> {
    raw.parse::<outbox_core::stream::StreamName>()
        .map(|_| raw)
        .map_err(|e| Failure::Usage(e.to_string()))
}

/// A batch id as the services print it; checked here so that nothing else
/// ends up in a URL path.
fn batch_id(raw: &str) -> Result<&str, Failure> {
    if raw.len() == 16
        && raw
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(raw)
    } else {
        Err(Failure::Usage(format!(
            "{raw:?} is not a batch id (16 lowercase hex digits, as `submit` prints)"
        )))
    }
}

fn query(page: &PageArgs) -> Vec<(&'static str, String)> {
    let mut query = vec![("limit", page.limit.to_string())];
    if let Some(cursor) = &page.cursor {
        query.push(("cursor", cursor.clone()));
    }
    query
}

async fn admin_get(
    client: &Client,
    path: &str,
    query: &[(&str, String)],
) -> Result<Value, Failure> {
    let request = client
        .request(Service::Admin, Method::GET, path)
        .query(query);
    client.call(Service::Admin, request).await
}

async fn admin_post(client: &Client, path: &str) -> Result<Value, Failure> {
    let request = client.request(Service::Admin, Method::POST, path);
    client.call(Service::Admin, request).await
}

fn print(value: &Value, json: bool, table: fn(&Value) -> String) {
    if json {
        out!("{value}");
    } else {
        out!("{}", table(value));
    }
}

fn say(answer: &Value, json: bool, sentence: impl FnOnce() -> String) {
    if json {
        out!("{answer}");
    } else {
        out!("{}", sentence());
    }
}

fn finished(status: &Value, json: bool) {
    if json {
        out!("{status}");
    } else {
        out!(
            "batch {} committed: {} sent",
            status["batch_id"].as_str().unwrap_or("?"),
            items(status["sent"].as_u64().unwrap_or(0))
        );
    }
}

fn items(n: u64) -> String {
    if n == 1 {
        "1 item".to_owned()
    } else {
        format!("{n} items")
    }
}

fn print_out(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

#[cfg(test)]
mod help_tests {
    /// Each subcommand's help shows the connection flags it uses, and not
    /// the others'.
    #[test]
    fn each_subcommand_shows_only_the_flags_it_uses() {
        let mut command = super::command();
        let help = |command: &mut clap::Command, name: &str| {
            command
                .find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string()
        };
        let tail = help(&mut command, "tail");
        for flag in ["--api-key", "--admin-token", "--writer-url", "--admin-url"] {
            assert!(!tail.contains(flag), "tail shows {flag}:\n{tail}");
        }
        let submit = help(&mut command, "submit");
        assert!(
            submit.contains("--api-key") && submit.contains("--writer-url"),
            "{submit}"
        );
        assert!(!submit.contains("--admin-token"), "{submit}");
        let pause = help(&mut command, "pause");
        assert!(
            pause.contains("--admin-token") && pause.contains("--admin-url"),
            "{pause}"
        );
        assert!(!pause.contains("--api-key"), "{pause}");
        let list = command
            .find_subcommand_mut("stream")
            .unwrap()
            .find_subcommand_mut("list")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(
            list.contains("--admin-token") && !list.contains("--api-key"),
            "{list}"
        );
    }
}
