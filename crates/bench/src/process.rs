//! The release binaries as child processes, and waiting for them.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Peak resident memory of a running child in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib(child: &Child) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn mib(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0} MiB"))
}

/// `peak_rss_mib` for printing.
pub fn peak_rss(child: &Child) -> String {
    mib(peak_rss_mib(child))
}

/// The relay's id under benchmark (its lease holder).
pub const RELAY_ID: &str = "bench-relay";

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `bin_dir/name` with `vars`, its output in `name.log` next to it;
/// killed when dropped.
pub fn spawn(bin_dir: &Path, name: &str, vars: &[(&str, String)]) -> anyhow::Result<Child> {
    spawn_logged(bin_dir, name, name, vars)
}

/// [`spawn`] with its output in `outbox-bench-{log}.log`.
pub fn spawn_logged(
    bin_dir: &Path,
    name: &str,
    log: &str,
    vars: &[(&str, String)],
) -> anyhow::Result<Child> {
    let program = bin_dir.join(name);
    let log = std::env::temp_dir().join(format!("outbox-bench-{log}.log"));
    let file = std::fs::File::create(&log)?;
    Command::new(&program)
        .env("LOG_FORMAT", "json")
        // The benchmarks' relays run without ADMIN_TOKEN.
        .env("ADMIN_INSECURE_NO_TOKEN", "true")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with cargo build --release)",
                program.display()
            )
        })
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Starts a writer on a free port against `database`; returns it and its URL
/// once it is ready.
pub async fn writer(
    env: &crate::Env,
    database: &str,
    http: &reqwest::Client,
) -> anyhow::Result<(Child, String)> {
    writer_with(env, database, http, &[]).await
}

/// [`writer`] with more environment variables.
pub async fn writer_with(
    env: &crate::Env,
    database: &str,
    http: &reqwest::Client,
    extra: &[(&str, String)],
) -> anyhow::Result<(Child, String)> {
    let port = free_port()?;
    let mut vars = vec![
        ("WRITER_BIND", format!("127.0.0.1:{port}")),
        ("MONGODB_URL", env.mongodb_url.clone()),
        ("MONGODB_DATABASE", database.to_owned()),
    ];
    vars.extend(extra.iter().cloned());
    let child = spawn(&env.bin_dir, "outbox-writer", &vars)?;
    let url = format!("http://127.0.0.1:{port}");
    let ready = format!("{url}/health/ready");
    wait_for(Duration::from_secs(60), "the writer to be ready", || {
        let request = http.get(&ready).send();
        async move { request.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await?;
    Ok((child, url))
}

/// Starts a relay against `database` and `topic`; returns it and its admin
/// URL once it leads.
pub async fn relay(
    env: &crate::Env,
    database: &str,
    topic: &str,
    ordering: &str,
    http: &reqwest::Client,
) -> anyhow::Result<(Child, String)> {
    let port = free_port()?;
    let child = spawn(
        &env.bin_dir,
        "outbox-relay",
        &[
            ("MONGODB_URL", env.mongodb_url.clone()),
            ("MONGODB_DATABASE", database.to_owned()),
            ("PUBSUB_EMULATOR_HOST", env.pubsub_emulator_host.clone()),
            ("PUBSUB_PROJECT_ID", crate::relay_drain::PROJECT.to_owned()),
            ("PUBSUB_TOPIC", topic.to_owned()),
            ("PUBSUB_ORDERING_KEY_MODE", ordering.to_owned()),
            ("RELAY_ID", RELAY_ID.to_owned()),
            ("RELAY_ADMIN_BIND", format!("127.0.0.1:{port}")),
            ("OUTBOX_CHANGE_STREAM", env.change_stream().to_string()),
            (
                "LEASE_KILL_ON_BLOCKED_READ",
                (!env.change_stream()).to_string(),
            ),
            // Without a change stream the poll interval bounds the wake-up.
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.05".to_owned()),
        ],
    )?;
    let admin = format!("http://127.0.0.1:{port}");
    let status = format!("{admin}/api/v1/outbox/status");
    wait_for(Duration::from_secs(300), "the relay to lead", || {
        let request = http.get(&status).send();
        async move {
            match request.await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|s| s["role"] == "leader"),
                Err(_) => false,
            }
        }
    })
    .await?;
    Ok((child, admin))
}
