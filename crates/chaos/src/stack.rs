//! One scenario's system: MongoDB, the emulator, writers and relays on a
//! fresh database and topic, a load generator and an ordered consumer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use relay::pubsub::{self, PubSubConfig};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::{Emulator, Mongo, Programs, Service, eventually, free_port};

/// Relay settings of every scenario: short lease and small pages, so faults
/// land mid-batch and recovery is quick.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
pub const POLL: Duration = Duration::from_millis(200);
/// The relays' admin token.
pub const ADMIN_TOKEN: &str = "chaos-admin-token-0123456789abcdef";

pub struct Stack {
    pub programs: Programs,
    pub dir: PathBuf,
    pub http: reqwest::Client,
    pub mongo: Mongo,
    pub emulator: Emulator,
    pub database: String,
    pub pubsub: PubSubConfig,
    pub subscription: String,
    pub writers: Vec<Service>,
    pub relays: Vec<Service>,
}

impl Stack {
    /// Starts MongoDB, the emulator, `writers` writers and `relays` relays.
    ///
    /// # Errors
    /// When something does not start.
    pub async fn start(name: &str, writers: usize, relays: usize) -> anyhow::Result<Self> {
        let programs = Programs::from_env()?;
        let dir = std::env::temp_dir().join(format!(
            "outbox-chaos-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir)?;
        let http = reqwest::Client::new();
        let mongo = Mongo::start(&programs, &dir).await?;
        let emulator = Emulator::start(&programs, &dir, &http).await?;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let pubsub = PubSubConfig {
            project_id: "chaos".to_owned(),
            topic: format!("chaos-{suffix}"),
            emulator_host: Some(emulator.host.clone()),
            endpoint: None,
            publish_retry_limit: Duration::from_secs(30),
            batch_delay: Duration::from_millis(1),
        };
        pubsub::ensure_topic(&pubsub).await?;
        let subscription = format!("chaos-ordered-{suffix}");
        pubsub::ensure_subscription(&pubsub, &subscription, true).await?;
        let mut stack = Self {
            programs,
            dir,
            http,
            mongo,
            emulator,
            database: format!("chaos_{suffix}"),
            pubsub,
            subscription,
            writers: Vec::new(),
            relays: Vec::new(),
        };
        for i in 0..writers {
            stack.add_writer(&format!("writer-{i}"))?;
        }
        for i in 0..relays {
            stack.add_relay(&format!("relay-{i}"))?;
        }
        let http = stack.http.clone();
        for writer in &stack.writers {
            let ready = format!("{}/health/ready", writer.url);
            eventually(Duration::from_secs(60), "a writer to be ready", || {
                let get = http.get(&ready).send();
                async move { get.await.is_ok_and(|r| r.status() == 200) }
            })
            .await?;
        }
        stack.leader(Duration::from_secs(60)).await?;
        Ok(stack)
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.programs.bin_dir.join(name)
    }

    fn add_writer(&mut self, id: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        let vars = vec![
            ("WRITER_BIND", format!("127.0.0.1:{port}")),
            ("MONGODB_URL", format!("{}&appName={id}", self.mongo.url)),
            ("MONGODB_DATABASE", self.database.clone()),
            ("LOG_FORMAT", "pretty".to_owned()),
        ];
        let writer = Service::start(&self.dir, id, self.binary("outbox-writer"), port, vars)?;
        self.writers.push(writer);
        Ok(())
    }

    fn add_relay(&mut self, id: &str) -> anyhow::Result<()> {
        let (mongo, emulator) = (self.mongo.url.clone(), self.emulator.host.clone());
        self.add_relay_via(id, &mongo, &emulator, &[])
    }

    /// A relay reaching MongoDB at `mongo_url` and the emulator at
    /// `emulator_host` (a proxy, say), with extra variables.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn add_relay_via(
        &mut self,
        id: &str,
        mongo_url: &str,
        emulator_host: &str,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<()> {
        let port = free_port()?;
        let mut vars = vec![
            ("MONGODB_URL", format!("{mongo_url}&appName={id}")),
            ("MONGODB_DATABASE", self.database.clone()),
            ("PUBSUB_EMULATOR_HOST", emulator_host.to_owned()),
            ("PUBSUB_PROJECT_ID", self.pubsub.project_id.clone()),
            ("PUBSUB_TOPIC", self.pubsub.topic.clone()),
            ("RELAY_ID", id.to_owned()),
            ("RELAY_ADMIN_BIND", format!("127.0.0.1:{port}")),
            ("LEASE_TTL_SECONDS", LEASE_TTL.as_secs().to_string()),
            (
                "OUTBOX_POLL_INTERVAL_SECONDS",
                POLL.as_secs_f64().to_string(),
            ),
            ("OUTBOX_BATCH_SIZE", "100".to_owned()),
            ("OUTBOX_CHANGE_STREAM", (!self.mongo.ours()).to_string()),
            // The stand-in makes reads wait for an open transaction.
            ("LEASE_KILL_ON_BLOCKED_READ", self.mongo.ours().to_string()),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
            ("LOG_FORMAT", "pretty".to_owned()),
        ];
        vars.extend(extra.iter().cloned());
        let relay = Service::start(&self.dir, id, self.binary("outbox-relay"), port, vars)?;
        self.relays.push(relay);
        Ok(())
    }

    /// The index of the relay that says it leads, and its epoch, waiting
    /// up to `limit` for one.
    ///
    /// # Errors
    /// When none leads in time.
    pub async fn leader(&self, limit: Duration) -> anyhow::Result<(usize, u64)> {
        let started = Instant::now();
        loop {
            for (index, relay) in self.relays.iter().enumerate() {
                if let Some(status) = relay.status(&self.http).await
                    && status["role"] == "leader"
                {
                    return Ok((index, status["lease"]["epoch"].as_u64().unwrap_or(0)));
                }
            }
            if started.elapsed() > limit {
                anyhow::bail!("no relay leads after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Which relay (by id) leads each stream, as a live relay says.
    pub async fn stream_leaders(&self) -> std::collections::BTreeMap<String, Option<String>> {
        for relay in &self.relays {
            if relay.process.is_none() {
                continue;
            }
            let Ok(response) = self
                .http
                .get(format!("{}/api/v1/streams", relay.url))
                .bearer_auth(ADMIN_TOKEN)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            else {
                continue;
            };
            let Ok(body) = response.json::<Value>().await else {
                continue;
            };
            return body["streams"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["stream"].as_str().unwrap_or_default().to_owned(),
                        s["leader"]["relay_id"].as_str().map(str::to_owned),
                    )
                })
                .collect();
        }
        std::collections::BTreeMap::new()
    }

    /// The index of the relay leading `stream`, and every stream it leads.
    pub async fn stream_leader(&self, stream: &str) -> Option<(usize, Vec<String>)> {
        let leaders = self.stream_leaders().await;
        let leader = leaders.get(stream)?.clone()?;
        let index = self.relays.iter().position(|r| r.id == leader)?;
        let led = leaders
            .iter()
            .filter(|(_, l)| l.as_deref() == Some(leader.as_str()))
            .map(|(s, _)| s.clone())
            .collect();
        Some((index, led))
    }

    /// Waits until a relay leads with an epoch above `epoch`; returns how
    /// long that took.
    ///
    /// # Errors
    /// When none does in time.
    pub async fn new_leader_after(&self, epoch: u64, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if let Ok((_, current)) = self.leader(Duration::ZERO).await
                && current > epoch
            {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                anyhow::bail!("no new leader after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// # Errors
    /// When the URL is invalid.
    pub async fn db(&self) -> anyhow::Result<mongodb::Database> {
        let client = mongodb::Client::with_uri_str(&self.mongo.url)
            .await
            .context("MongoDB client")?;
        Ok(client.database(&self.database))
    }

    pub fn log_dir(&self) -> &Path {
        &self.dir
    }
}

/// A batch the writer accepted (201).
#[derive(Clone, Debug)]
pub struct Accepted {
    pub batch_id: String,
    pub sequence: u64,
    pub items: u64,
    /// When its first POST was sent.
    pub submitted: Instant,
}

/// What the load generator saw.
#[derive(Default, Debug)]
pub struct LoadReport {
    pub accepted: Vec<Accepted>,
    /// How long each 503 took to arrive.
    pub unavailable: Vec<Duration>,
    /// Other answers (status, code), and connection failures ("-").
    pub other: Vec<(u16, String)>,
}

/// Submits `batches` batches of `size` items, `concurrency` at a time,
/// spread over the writers; each retried with its Idempotency-Key until
/// stored (a 503 is an answer; a refused connection means the writer was
/// killed, and another writer gets the retry).
pub fn load(
    stack: &Stack,
    batches: usize,
    size: usize,
    concurrency: usize,
    pace: Duration,
) -> JoinHandle<LoadReport> {
    load_into(stack, "default", batches, size, concurrency, pace)
}

/// [`load`] into a stream.
pub fn load_into(
    stack: &Stack,
    stream: &str,
    batches: usize,
    size: usize,
    concurrency: usize,
    pace: Duration,
) -> JoinHandle<LoadReport> {
    let stream = stream.to_owned();
    let http = stack.http.clone();
    let writers: Vec<String> = stack.writers.iter().map(|w| w.url.clone()).collect();
    // Keys unique to this load: a second load in one scenario must store
    // new batches, not replay the first one's.
    let run = uuid::Uuid::new_v4().simple().to_string();
    tokio::spawn(async move {
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers = (0..concurrency).map(|worker| {
            let (http, writers, report, next) = (http.clone(), writers.clone(), Arc::clone(&report), Arc::clone(&next));
            let run = run.clone();
            let stream = stream.clone();
            async move {
                loop {
                    let b = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if b >= batches {
                        return;
                    }
                    tokio::time::sleep(pace).await;
                    let key = format!("chaos-{run}-{b}");
                    let body: Vec<Value> = (0..size)
                        .map(|i| json!({"request_id": format!("{b}-{i}"), "vendor_name": format!("v{}", i % 5), "i": i}))
                        .collect();
                    let mut attempt = worker;
                    let submitted = Instant::now();
                    loop {
                        let url = format!("{}/api/v1/streams/{stream}/batches", writers[attempt % writers.len()]);
                        attempt += 1;
                        let started = Instant::now();
                        let response = http.post(url).header("Idempotency-Key", &key).json(&body).timeout(Duration::from_secs(30)).send().await;
                        let took = started.elapsed();
                        match response {
                            Ok(r) if r.status() == 201 => {
                                let answer: Value = r.json().await.unwrap_or_default();
                                report.lock().unwrap_or_else(|e| e.into_inner()).accepted.push(Accepted {
                                    batch_id: answer["data"]["batch_id"].as_str().unwrap_or_default().to_owned(),
                                    sequence: answer["data"]["batch_sequence"].as_u64().unwrap_or(0),
                                    items: size as u64,
                                    submitted,
                                });
                                break;
                            }
                            Ok(r) if r.status() == 503 => {
                                report.lock().unwrap_or_else(|e| e.into_inner()).unavailable.push(took);
                            }
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let body: Value = r.json().await.unwrap_or_default();
                                report.lock().unwrap_or_else(|e| e.into_inner()).other.push((status, body["code"].as_str().unwrap_or("?").to_owned()));
                                break;
                            }
                            Err(_) => {}
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        futures::future::join_all(workers).await;
        Arc::try_unwrap(report).map_or_else(
            |_| LoadReport::default(),
            |m| m.into_inner().unwrap_or_default(),
        )
    })
}

/// One message the consumer received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub item_id: String,
    pub message_id: String,
    pub batch_sequence: u64,
    pub item_sequence: u64,
    pub at: Instant,
    /// The message as the consumer crate reads it (`None`: not an outbox
    /// item), for the checker's verifier.
    pub item: Option<outbox_consumer::Item>,
}

/// An ordered subscriber collecting every delivery until stopped.
pub struct Consumer {
    pub deliveries: Arc<Mutex<Vec<Delivery>>>,
    task: JoinHandle<()>,
}

impl Consumer {
    /// # Errors
    /// When the subscriber cannot be built.
    pub async fn start(stack: &Stack) -> anyhow::Result<Self> {
        Self::start_on(stack, &stack.subscription).await
    }

    /// A consumer of another subscription (of another stream's topic).
    ///
    /// # Errors
    /// When the subscriber cannot be built.
    pub async fn start_on(stack: &Stack, subscription: &str) -> anyhow::Result<Self> {
        let client = pubsub::subscriber(&stack.pubsub).await?;
        let path = stack.pubsub.subscription_path(subscription);
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&deliveries);
        let task = tokio::spawn(async move {
            loop {
                let mut stream = client.subscribe(path.clone()).build();
                while let Some(Ok((message, handler))) = stream.next().await {
                    let number = |key: &str| {
                        message
                            .attributes
                            .get(key)
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    sink.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Delivery {
                            item_id: message
                                .attributes
                                .get("item_id")
                                .cloned()
                                .unwrap_or_default(),
                            message_id: message.message_id.clone(),
                            batch_sequence: number("batch_sequence"),
                            item_sequence: number("item_sequence"),
                            at: Instant::now(),
                            item: outbox_consumer::Item::parse(
                                &message.message_id,
                                &message.ordering_key,
                                &message.attributes,
                                &message.data,
                            )
                            .ok(),
                        });
                    handler.ack();
                }
                // The stream ended (the emulator was frozen or restarted): subscribe again.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Self { deliveries, task })
    }

    pub fn distinct(&self) -> usize {
        let deliveries = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        deliveries
            .iter()
            .map(|d| d.item_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Waits until `expected` distinct items arrived.
    ///
    /// # Errors
    /// When they do not arrive within `limit`.
    pub async fn wait_for(&self, expected: usize, limit: Duration) -> anyhow::Result<Duration> {
        eventually(limit, "every accepted item to be delivered", || {
            let n = self.distinct();
            async move { n >= expected }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e} ({} of {expected} arrived)", self.distinct()))
    }

    /// Everything received so far.
    pub fn snapshot(&self) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a message with this id was received.
    pub fn received(&self, message_id: &str) -> bool {
        self.deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|d| d.message_id == message_id)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Item ids of an accepted batch: derived from its id and positions.
pub fn item_ids(accepted: &[Accepted]) -> HashMap<String, (u64, u64)> {
    let mut ids = HashMap::new();
    for batch in accepted {
        let Ok(batch_id) = batch.batch_id.parse::<outbox_core::model::BatchId>() else {
            continue;
        };
        for n in 1..=batch.items {
            let id = outbox_core::model::ItemId::of(
                &batch_id,
                outbox_core::model::ItemSequence(n as u32),
            );
            ids.insert(id.to_string(), (batch.sequence, n));
        }
    }
    ids
}
