//! The processes a scenario runs and breaks: a MongoDB stand-in of its own
//! (file-backed, so it survives a kill) or the `MONGODB_URL` server, a Pub/Sub
//! emulator of its own, writers and relays built from this workspace.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Where the programs are; read from the environment `scripts/test.sh` and
/// `scripts/chaos.sh` set.
#[derive(Clone, Debug)]
pub struct Programs {
    /// `outbox-writer` and `outbox-relay`.
    pub bin_dir: PathBuf,
    /// Python and launcher of the stand-in, when there is no `MONGODB_URL`
    /// of a real server to use.
    pub standin: Option<(PathBuf, PathBuf)>,
    /// A real MongoDB replica set to use instead (`MONGODB_FLAVOR` not
    /// `standin`): the scenarios that freeze or kill MongoDB are skipped.
    pub external_mongodb: Option<String>,
    pub emulator: PathBuf,
}

impl Programs {
    /// # Errors
    /// When a program is missing.
    pub fn from_env() -> anyhow::Result<Self> {
        let bin_dir = PathBuf::from(
            std::env::var("OUTBOX_BIN_DIR").unwrap_or_else(|_| "target/debug".into()),
        );
        for name in ["outbox-writer", "outbox-relay"] {
            if !bin_dir.join(name).exists() {
                bail!(
                    "{} is missing: build the workspace (OUTBOX_BIN_DIR={})",
                    name,
                    bin_dir.display()
                );
            }
        }
        let standin_flavor = std::env::var("MONGODB_FLAVOR").as_deref() == Ok("standin");
        let external_mongodb = std::env::var("MONGODB_URL")
            .ok()
            .filter(|_| !standin_flavor);
        let standin = match (
            std::env::var("STANDIN_PYTHON"),
            std::env::var("STANDIN_SCRIPT"),
        ) {
            (Ok(python), Ok(script)) => Some((python.into(), script.into())),
            _ => None,
        };
        if external_mongodb.is_none() && standin.is_none() {
            bail!(
                "no MongoDB: set MONGODB_URL, or STANDIN_PYTHON and STANDIN_SCRIPT (scripts/lib/services.sh does)"
            );
        }
        let emulator = std::env::var("PUBSUB_EMULATOR_BIN").map_or_else(
            |_| {
                PathBuf::from(
                    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
                )
            },
            PathBuf::from,
        );
        if !emulator.exists() {
            bail!(
                "the Pub/Sub emulator is missing at {} (set PUBSUB_EMULATOR_BIN)",
                emulator.display()
            );
        }
        Ok(Self {
            bin_dir,
            standin,
            external_mongodb,
            emulator,
        })
    }
}

/// A child process, its output in a log file; killed when dropped.
pub struct Proc {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// # Errors
    /// When the program cannot be started.
    pub fn spawn(
        dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
        vars: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(program)
            .args(args)
            // Relays without ADMIN_TOKEN (a stack that wants one sets it).
            .env("ADMIN_INSECURE_NO_TOKEN", "true")
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`, `TERM`) to the process and
    /// its children (the emulator's launcher script starts a JVM).
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-s", name, "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Resident memory in KiB, from /proc (the process itself, not children).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// `kill -9`, and waits for the exit.
    pub async fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait().await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be able to die.
        self.signal("CONT");
        self.signal("KILL");
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(outbox_service::ports::free_port())
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(
    limit: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(started.elapsed())
}

/// The MongoDB a scenario runs on.
pub struct Mongo {
    pub url: String,
    /// Ours to freeze and kill (the stand-in); `None` for an external server.
    pub process: Option<Proc>,
    port: u16,
    data_dir: PathBuf,
    dir: PathBuf,
    python_script: Option<(PathBuf, PathBuf)>,
}

impl Mongo {
    /// # Errors
    /// When it does not start.
    pub async fn start(programs: &Programs, dir: &Path) -> anyhow::Result<Self> {
        if let Some(url) = &programs.external_mongodb {
            return Ok(Self {
                url: url.clone(),
                process: None,
                port: 0,
                data_dir: dir.into(),
                dir: dir.into(),
                python_script: None,
            });
        }
        let (python, script) = programs.standin.clone().context("no stand-in")?;
        let port = free_port()?;
        let data_dir = dir.join("mongo-data");
        std::fs::create_dir_all(&data_dir)?;
        let mut mongo = Self {
            url: format!("mongodb://127.0.0.1:{port}/?replicaSet=rs0"),
            process: None,
            port,
            data_dir,
            dir: dir.into(),
            python_script: Some((python, script)),
        };
        mongo.restart().await?;
        Ok(mongo)
    }

    pub fn ours(&self) -> bool {
        self.python_script.is_some()
    }

    /// Starts (again) the stand-in on the same port and data.
    ///
    /// # Errors
    /// When it does not answer within 30 s.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let (python, script) = self.python_script.clone().context("not ours to restart")?;
        let args = vec![
            script.display().to_string(),
            "--port".into(),
            self.port.to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--setParameter".into(),
            "transactionLifetimeLimitSeconds=15".into(),
        ];
        self.process = Some(Proc::spawn(&self.dir, "mongo", &python, &args, &[])?);
        let admin = mongodb::Client::with_uri_str(&self.url)
            .await?
            .database("admin");
        eventually(Duration::from_secs(30), "MongoDB to answer", || {
            let ping = admin.run_command(mongodb::bson::doc! { "ping": 1 });
            async move { ping.await.is_ok() }
        })
        .await?;
        Ok(())
    }
}

/// A Pub/Sub emulator of the scenario's own, so that it can be frozen.
pub struct Emulator {
    pub host: String,
    pub process: Proc,
}

impl Emulator {
    /// # Errors
    /// When it does not answer within 60 s.
    pub async fn start(
        programs: &Programs,
        dir: &Path,
        http: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let process = Proc::spawn(
            dir,
            "pubsub",
            &programs.emulator,
            &["--host=127.0.0.1".into(), format!("--port={port}")],
            // The emulator keeps every message, acknowledged or not, in its
            // heap (about 1.7 KiB each): 256 MiB (the scripts' setting) ran
            // out after about 120,000 messages of the 10-minute soak, which
            // then saw only publish timeouts; the soak publishes 300,000.
            &[("JAVA_OPTS", "-Xmx3g".into())],
        )?;
        let host = format!("127.0.0.1:{port}");
        let root = format!("http://{host}/");
        eventually(Duration::from_secs(60), "the Pub/Sub emulator", || {
            let get = http.get(&root).send();
            async move {
                match get.await {
                    Ok(r) => r.text().await.is_ok_and(|t| t.contains("Ok")),
                    Err(_) => false,
                }
            }
        })
        .await?;
        Ok(Self { host, process })
    }
}

/// A service of ours: a writer or a relay, restartable on the same port.
pub struct Service {
    pub id: String,
    pub url: String,
    pub process: Option<Proc>,
    program: PathBuf,
    vars: Vec<(&'static str, String)>,
    dir: PathBuf,
    restarts: u32,
}

impl Service {
    /// # Errors
    /// When it cannot be started.
    pub fn start(
        dir: &Path,
        id: &str,
        program: PathBuf,
        port: u16,
        vars: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let mut service = Self {
            id: id.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            process: None,
            program,
            vars,
            dir: dir.into(),
            restarts: 0,
        };
        service.restart()?;
        Ok(service)
    }

    /// # Errors
    /// When it cannot be started.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let name = format!("{}-{}", self.id, self.restarts);
        self.restarts += 1;
        let vars: Vec<(&str, String)> = self.vars.iter().map(|(k, v)| (*k, v.clone())).collect();
        self.process = Some(Proc::spawn(&self.dir, &name, &self.program, &[], &vars)?);
        Ok(())
    }

    /// `kill -9`; returns when the process is gone.
    pub async fn kill9(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill9().await;
        }
    }

    /// The relay's admin status, if it answers.
    pub async fn status(&self, http: &reqwest::Client) -> Option<Value> {
        self.process.as_ref()?;
        let response = http
            .get(format!("{}/api/v1/outbox/status", self.url))
            .bearer_auth(crate::stack::ADMIN_TOKEN)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }
}
