//! The scenarios. Each starts its own system, drives load through the
//! writers, injects its faults, waits until everything accepted was
//! delivered, and checks the invariants.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::check::{Invariants, check, check_stream};
use crate::stack::{ADMIN_TOKEN, Consumer, LEASE_TTL, Stack, load, load_into};

/// How long a scenario runs: `Short` for `scripts/test.sh` (seconds),
/// `Full` for the figures in docs/RELIABILITY.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Length {
    Short,
    Full,
}

/// One scenario's outcome.
#[derive(Debug)]
pub struct Report {
    pub scenario: &'static str,
    pub faults: String,
    pub invariants: Invariants,
    /// Named figures: recovery times and the like.
    pub figures: Vec<(String, String)>,
    pub took: Duration,
}

pub const SCENARIOS: [&str; 9] = [
    "leader-kills",
    "streams",
    "frozen-leader",
    "pubsub-outage",
    "mongodb-outage",
    "writer-kills",
    "slow-network",
    "soak",
    "bad-input",
];

/// Runs one scenario by name; `Ok(None)` when it cannot run here (said why
/// on stdout).
///
/// # Errors
/// When the system cannot be started or never recovers.
pub async fn run(name: &str, length: Length) -> anyhow::Result<Option<Report>> {
    let started = Instant::now();
    let report = match name {
        "leader-kills" => leader_kills(length).await?,
        "streams" => streams(length).await?,
        "frozen-leader" => frozen_leader(length).await?,
        "pubsub-outage" => pubsub_outage(length).await?,
        "mongodb-outage" => match mongodb_outage(length).await? {
            Some(report) => report,
            None => return Ok(None),
        },
        "writer-kills" => writer_kills(length).await?,
        "slow-network" => slow_network(length).await?,
        "soak" => soak(length).await?,
        "bad-input" => crate::bad_input::bad_input().await?,
        other => anyhow::bail!("unknown scenario {other:?} (one of {SCENARIOS:?})"),
    };
    Ok(Some(Report {
        took: started.elapsed(),
        ..report
    }))
}

fn summary(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "-".to_owned();
    }
    samples.sort();
    format!(
        "median {:.2} s, max {:.2} s (n={})",
        samples[samples.len() / 2].as_secs_f64(),
        samples[samples.len() - 1].as_secs_f64(),
        samples.len()
    )
}

/// Lets the drain run for a random moment (between `min` and `max`).
async fn random_moment(min: Duration, max: Duration) {
    let ms = rand::rng().random_range(min.as_millis()..=max.as_millis());
    tokio::time::sleep(Duration::from_millis(ms as u64)).await;
}

async fn finish(
    stack: &Stack,
    consumer: &Consumer,
    report: crate::stack::LoadReport,
    limit: Duration,
) -> anyhow::Result<Invariants> {
    let expected: u64 = report.accepted.iter().map(|a| a.items).sum();
    consumer.wait_for(expected as usize, limit).await?;
    let db = stack.db().await?;
    check(&db, &report.accepted, consumer).await
}

/// `kill -9` of whichever relay leads, at random moments during a drain,
/// each killed replica restarted.
async fn leader_kills(length: Length) -> anyhow::Result<Report> {
    // At least 20 kills in full: a takeover that waits for the transaction
    // lifetime limit showed in 1 of 10 before.
    let (kills, batches) = match length {
        Length::Short => (2, 20),
        Length::Full => (24, 2000),
    };
    let mut stack = Stack::start("leader-kills", 1, 3).await?;
    let consumer = Consumer::start(&stack).await?;
    let producer = load(&stack, batches, 100, 4, Duration::ZERO);
    let mut takeovers = Vec::new();
    for _ in 0..kills {
        random_moment(Duration::from_millis(300), Duration::from_millis(1500)).await;
        let (leader, epoch) = stack.leader(Duration::from_secs(30)).await?;
        stack.relays[leader].kill9().await;
        takeovers.push(
            stack
                .new_leader_after(epoch, Duration::from_secs(60))
                .await?,
        );
        stack.relays[leader].restart()?;
    }
    let report = producer.await?;
    let invariants = finish(&stack, &consumer, report, Duration::from_secs(600)).await?;
    Ok(Report {
        scenario: "leader-kills",
        faults: format!(
            "{kills} x kill -9 of the leader (3 relays, TTL {} s)",
            LEASE_TTL.as_secs()
        ),
        invariants,
        figures: vec![("takeover".into(), summary(&mut takeovers))],
        took: Duration::ZERO,
    })
}

/// Several streams on their own topics, shared by three relays, under load;
/// `kill -9` of the relay leading a random stream at random moments, each
/// restarted. Checked stream by stream.
async fn streams(length: Length) -> anyhow::Result<Report> {
    let (kills, batches) = match length {
        Length::Short => (2, 10),
        Length::Full => (8, 200),
    };
    let mut stack = Stack::start("streams", 1, 3).await?;
    let names: Vec<String> = (1..=4).map(|n| format!("s{n}")).collect();
    let admin = stack.relays[0].url.clone();
    let mut consumers = Vec::new();
    for name in &names {
        let topic = format!("{}-{name}", stack.pubsub.topic);
        let on_topic = stack.pubsub.for_topic(&topic);
        relay::pubsub::ensure_topic(&on_topic).await?;
        let subscription = format!("{topic}-ordered");
        relay::pubsub::ensure_subscription(&on_topic, &subscription, true).await?;
        let response = stack
            .http
            .put(format!("{admin}/api/v1/streams/{name}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "topic": topic }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "defining {name}: {}",
            response.status()
        );
        consumers.push(Consumer::start_on(&stack, &subscription).await?);
    }
    let producers: Vec<_> = names
        .iter()
        .map(|name| load_into(&stack, name, batches, 50, 2, Duration::from_millis(20)))
        .collect();
    let mut takeovers = Vec::new();
    for _ in 0..kills {
        random_moment(Duration::from_millis(500), Duration::from_millis(2000)).await;
        let target = &names[rand::rng().random_range(0..names.len())];
        let Some((victim, led)) = stack.stream_leader(target).await else {
            continue;
        };
        stack.relays[victim].kill9().await;
        let killed = Instant::now();
        let victim_id = stack.relays[victim].id.clone();
        // Every stream the killed relay led is led again by another.
        crate::cluster::eventually(
            Duration::from_secs(60),
            "the killed relay's streams led again",
            || {
                let stack = &stack;
                let led = &led;
                let victim_id = &victim_id;
                async move {
                    let leaders = stack.stream_leaders().await;
                    led.iter().all(|s| {
                        leaders
                            .get(s)
                            .is_some_and(|l| l.as_ref().is_some_and(|l| l != victim_id))
                    })
                }
            },
        )
        .await?;
        takeovers.push(killed.elapsed());
        stack.relays[victim].restart()?;
    }
    let mut invariants = Invariants::default();
    let db = stack.db().await?;
    for ((name, producer), consumer) in names.iter().zip(producers).zip(&consumers) {
        let report = producer.await?;
        let expected: u64 = report.accepted.iter().map(|a| a.items).sum();
        consumer
            .wait_for(expected as usize, Duration::from_secs(600))
            .await?;
        invariants.add(&check_stream(&db, name, &report.accepted, consumer).await?);
    }
    Ok(Report {
        scenario: "streams",
        faults: format!(
            "{} streams on their own topics, 3 relays; {kills} x kill -9 of the relay leading a random stream (TTL {} s)",
            names.len(),
            LEASE_TTL.as_secs()
        ),
        invariants,
        figures: vec![(
            "all of the killed relay's streams led again".into(),
            summary(&mut takeovers),
        )],
        took: Duration::ZERO,
    })
}

/// SIGSTOP of the leader for twice the lease TTL, then SIGCONT.
async fn frozen_leader(length: Length) -> anyhow::Result<Report> {
    let (freezes, batches) = match length {
        Length::Short => (1, 15),
        Length::Full => (5, 200),
    };
    let stack = Stack::start("frozen-leader", 1, 2).await?;
    let consumer = Consumer::start(&stack).await?;
    let producer = load(&stack, batches, 100, 2, Duration::from_millis(50));
    let mut takeovers = Vec::new();
    let mut stepped_down = Vec::new();
    for _ in 0..freezes {
        random_moment(Duration::from_millis(300), Duration::from_millis(1000)).await;
        let (leader, epoch) = stack.leader(Duration::from_secs(30)).await?;
        let frozen = &stack.relays[leader];
        if let Some(process) = &frozen.process {
            process.signal("STOP");
        }
        let froze = Instant::now();
        takeovers.push(
            stack
                .new_leader_after(epoch, Duration::from_secs(60))
                .await?,
        );
        let remaining = (LEASE_TTL * 2).saturating_sub(froze.elapsed());
        tokio::time::sleep(remaining).await;
        if let Some(process) = &frozen.process {
            process.signal("CONT");
        }
        // The resumed replica must see it lost the lease.
        let resumed = Instant::now();
        crate::cluster::eventually(
            Duration::from_secs(30),
            "the resumed replica to step down",
            || {
                let status = frozen.status(&stack.http);
                async move { status.await.is_some_and(|s| s["role"] != "leader") }
            },
        )
        .await?;
        stepped_down.push(resumed.elapsed());
    }
    let report = producer.await?;
    let invariants = finish(&stack, &consumer, report, Duration::from_secs(600)).await?;
    Ok(Report {
        scenario: "frozen-leader",
        faults: format!(
            "{freezes} x SIGSTOP of the leader for {} s",
            (LEASE_TTL * 2).as_secs()
        ),
        invariants,
        figures: vec![
            ("takeover".into(), summary(&mut takeovers)),
            (
                "resumed replica reports standby after".into(),
                summary(&mut stepped_down),
            ),
        ],
        took: Duration::ZERO,
    })
}

/// SIGSTOP of the Pub/Sub emulator mid-drain, then SIGCONT; no process
/// restarted.
async fn pubsub_outage(length: Length) -> anyhow::Result<Report> {
    let (outage, batches) = match length {
        Length::Short => (Duration::from_secs(5), 20),
        Length::Full => (Duration::from_secs(60), 300),
    };
    let stack = Stack::start("pubsub-outage", 1, 2).await?;
    let consumer = Consumer::start(&stack).await?;
    let producer = load(&stack, batches, 100, 2, Duration::from_millis(20));
    crate::cluster::eventually(Duration::from_secs(60), "the drain to start", || {
        let n = consumer.distinct();
        async move { n >= 100 }
    })
    .await?;
    stack.emulator.process.signal("STOP");
    tokio::time::sleep(outage).await;
    let before = consumer.distinct();
    stack.emulator.process.signal("CONT");
    let resumed =
        crate::cluster::eventually(Duration::from_secs(120), "deliveries to resume", || {
            let n = consumer.distinct();
            async move { n > before }
        })
        .await?;
    let report = producer.await?;
    let invariants = finish(&stack, &consumer, report, Duration::from_secs(600)).await?;
    Ok(Report {
        scenario: "pubsub-outage",
        faults: format!(
            "emulator frozen (SIGSTOP) for {} s mid-drain",
            outage.as_secs()
        ),
        invariants,
        figures: vec![(
            "first new delivery after the emulator came back".into(),
            format!("{:.2} s", resumed.as_secs_f64()),
        )],
        took: Duration::ZERO,
    })
}

/// MongoDB frozen (SIGSTOP) during load and drain, then killed and
/// restarted on its files.
async fn mongodb_outage(length: Length) -> anyhow::Result<Option<Report>> {
    let (freeze, batches) = match length {
        Length::Short => (Duration::from_secs(4), 20),
        Length::Full => (Duration::from_secs(30), 300),
    };
    let mut stack = Stack::start("mongodb-outage", 1, 2).await?;
    if !stack.mongo.ours() {
        println!(
            "SKIPPED mongodb-outage: the MongoDB at MONGODB_URL is not ours to freeze or kill"
        );
        return Ok(None);
    }
    let consumer = Consumer::start(&stack).await?;
    let producer = load(&stack, batches, 50, 2, Duration::from_millis(100));
    crate::cluster::eventually(Duration::from_secs(60), "the drain to start", || {
        let n = consumer.distinct();
        async move { n >= 50 }
    })
    .await?;
    let signal = |name: &str| {
        if let Some(process) = &stack.mongo.process {
            process.signal(name);
        }
    };
    signal("STOP");
    tokio::time::sleep(freeze).await;
    signal("CONT");
    let before = consumer.distinct();
    let after_freeze =
        crate::cluster::eventually(Duration::from_secs(120), "the drain to resume", || {
            let n = consumer.distinct();
            async move { n > before }
        })
        .await?;
    // Killed and restarted on the same files.
    if let Some(process) = stack.mongo.process.take() {
        process.kill9().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.mongo.restart().await?;
    let before = consumer.distinct();
    let after_restart =
        crate::cluster::eventually(Duration::from_secs(120), "the drain to resume", || {
            let n = consumer.distinct();
            async move { n > before }
        })
        .await;
    let report = producer.await?;
    let mut answers = report.unavailable.clone();
    let invariants = finish(&stack, &consumer, report, Duration::from_secs(600)).await?;
    Ok(Some(Report {
        scenario: "mongodb-outage",
        faults: format!(
            "MongoDB frozen {} s, then killed and restarted",
            freeze.as_secs()
        ),
        invariants,
        figures: vec![
            ("503 answers while down".into(), summary(&mut answers)),
            (
                "drain resumed after the freeze".into(),
                format!("{:.2} s", after_freeze.as_secs_f64()),
            ),
            (
                "drain resumed after the restart".into(),
                after_restart.map_or_else(
                    |_| "already done".to_owned(),
                    |d| format!("{:.2} s", d.as_secs_f64()),
                ),
            ),
        ],
        took: Duration::ZERO,
    }))
}

/// `kill -9` of a writer with requests in flight; the other writer keeps
/// taking batches once MongoDB aborted what the dead one left open.
async fn writer_kills(length: Length) -> anyhow::Result<Report> {
    let (kills, batches) = match length {
        Length::Short => (2, 200),
        Length::Full => (10, 2000),
    };
    let mut stack = Stack::start("writer-kills", 2, 1).await?;
    let consumer = Consumer::start(&stack).await?;
    let producer = load(&stack, batches, 20, 16, Duration::from_millis(20));
    let mut blocked = Vec::new();
    let mut probes = Vec::new();
    for k in 0..kills {
        random_moment(Duration::from_millis(200), Duration::from_millis(800)).await;
        stack.writers[0].kill9().await;
        let killed = Instant::now();
        // How long until the surviving writer stores a batch: a transaction
        // the dead one left open holds the sequence counter until MongoDB
        // aborts it (transactionLifetimeLimitSeconds, 15 s here).
        probes.push(probe(&stack, 1, &format!("probe-{k}")).await?);
        blocked.push(killed.elapsed());
        stack.writers[0].restart()?;
    }
    let mut report = producer.await?;
    report.accepted.extend(probes);
    let invariants = finish(&stack, &consumer, report, Duration::from_secs(600)).await?;
    Ok(Report {
        scenario: "writer-kills",
        faults: format!("{kills} x kill -9 of a writer with 16 requests in flight"),
        invariants,
        figures: vec![(
            "surviving writer stores again after".into(),
            summary(&mut blocked),
        )],
        took: Duration::ZERO,
    })
}

/// POSTs a one-item batch to writer `index` until it is stored.
async fn probe(stack: &Stack, index: usize, key: &str) -> anyhow::Result<crate::stack::Accepted> {
    let url = format!("{}/api/v1/batch/process", stack.writers[index].url);
    let started = Instant::now();
    let submitted = started;
    loop {
        let response = stack
            .http
            .post(&url)
            .header("Idempotency-Key", key)
            .json(&serde_json::json!([{"request_id": key, "vendor_name": "probe"}]))
            .send()
            .await;
        if let Ok(response) = response
            && response.status() == 201
        {
            let answer: serde_json::Value = response.json().await?;
            return Ok(crate::stack::Accepted {
                batch_id: answer["data"]["batch_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                sequence: answer["data"]["batch_sequence"].as_u64().unwrap_or(0),
                items: 1,
                submitted,
            });
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the surviving writer stored nothing for 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pauses draining (admin stop), stores `batches` batches, resumes, and
/// returns the items and how long the relay took to deliver them.
async fn timed_drain(
    stack: &Stack,
    consumer: &Consumer,
    relay: usize,
    batches: usize,
    already: usize,
    accepted: &mut Vec<crate::stack::Accepted>,
) -> anyhow::Result<(usize, Duration)> {
    let admin = |action: &str| {
        stack
            .http
            .post(format!(
                "{}/api/v1/outbox/{action}",
                stack.relays[relay].url
            ))
            .header(
                "authorization",
                format!("Bearer {}", crate::stack::ADMIN_TOKEN),
            )
            .send()
    };
    anyhow::ensure!(admin("stop").await?.status().is_success(), "stop refused");
    let report = load(stack, batches, 100, 2, Duration::ZERO).await?;
    let items: u64 = report.accepted.iter().map(|a| a.items).sum();
    accepted.extend(report.accepted);
    let started = Instant::now();
    anyhow::ensure!(admin("start").await?.status().is_success(), "start refused");
    consumer
        .wait_for(already + items as usize, Duration::from_secs(900))
        .await?;
    Ok((items as usize, started.elapsed()))
}

/// The same backlog drained by a relay on the loopback, then by one whose
/// MongoDB and Pub/Sub connections go through a proxy adding 50-200 ms
/// (jittered) to every chunk each way.
async fn slow_network(length: Length) -> anyhow::Result<Report> {
    let batches = match length {
        Length::Short => 4,
        Length::Full => 30,
    };
    let delay = (Duration::from_millis(50), Duration::from_millis(200));
    let mut stack = Stack::start("slow-network", 1, 1).await?;
    let consumer = Consumer::start(&stack).await?;
    let mut accepted = Vec::new();
    let (direct_items, direct) =
        timed_drain(&stack, &consumer, 0, batches, 0, &mut accepted).await?;

    // The same again through the proxies, by a second relay.
    let (_, epoch) = stack.leader(Duration::from_secs(30)).await?;
    stack.relays[0].kill9().await;
    let mongo_upstream = stack
        .mongo
        .url
        .trim_start_matches("mongodb://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()?;
    let mongo_proxy = crate::proxy::Proxy::start(mongo_upstream, delay).await?;
    let pubsub_proxy = crate::proxy::Proxy::start(stack.emulator.host.parse()?, delay).await?;
    let mongo_url = format!("mongodb://{}/?directConnection=true", mongo_proxy.address);
    let pubsub_host = pubsub_proxy.address.to_string();
    // A lease a few round trips long: with 100-400 ms round trips a 2 s
    // lease lapses between renewals (docs/OPERATIONS.md: LEASE_TTL_SECONDS
    // against the round trip).
    stack.add_relay_via(
        "relay-slow",
        &mongo_url,
        &pubsub_host,
        &[("LEASE_TTL_SECONDS", "10".to_owned())],
    )?;
    stack
        .new_leader_after(epoch, Duration::from_secs(60))
        .await?;
    let (slow_items, slow) =
        timed_drain(&stack, &consumer, 1, batches, direct_items, &mut accepted).await?;

    let db = stack.db().await?;
    let invariants = check(&db, &accepted, &consumer).await?;
    let rate = |items: usize, took: Duration| items as f64 / took.as_secs_f64();
    Ok(Report {
        scenario: "slow-network",
        faults: format!(
            "relay's MongoDB and Pub/Sub connections delayed {}-{} ms per chunk each way",
            delay.0.as_millis(),
            delay.1.as_millis()
        ),
        invariants,
        figures: vec![
            (
                "drain rate on loopback".into(),
                format!(
                    "{:.0} items/s ({direct_items} items)",
                    rate(direct_items, direct)
                ),
            ),
            (
                "drain rate through the proxies".into(),
                format!("{:.0} items/s ({slow_items} items)", rate(slow_items, slow)),
            ),
        ],
        took: Duration::ZERO,
    })
}

/// A steady load for minutes with one leader kill a minute: resident memory
/// of every process at start and end, p95 end-to-end latency per minute.
async fn soak(length: Length) -> anyhow::Result<Report> {
    // About 500 items/s when the writer keeps up: the short form in batches
    // of 100 every 0.2 s, the full one in batches of 500 every 0.9 s plus
    // the write. (Five 100-item batches a second did not keep up on the
    // stand-in, whose one transaction gate serves the writer's five
    // transactions and the relay's per-batch round trips in turn; see
    // docs/RELIABILITY.md.)
    let (minutes, kill_every, size, pace) = match length {
        Length::Short => (
            0.34_f64,
            Duration::from_secs(10),
            100,
            Duration::from_millis(200),
        ),
        Length::Full => (
            10.0,
            Duration::from_secs(60),
            500,
            Duration::from_millis(900),
        ),
    };
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let batches = (duration.as_secs_f64() * 500.0 / size as f64) as usize;
    let mut stack = Stack::start("soak", 1, 2).await?;
    let consumer = Consumer::start(&stack).await?;
    let rss = |stack: &Stack| -> Vec<(String, u64)> {
        stack
            .writers
            .iter()
            .chain(&stack.relays)
            .filter_map(|s| Some((s.id.clone(), s.process.as_ref()?.rss_kib()?)))
            .collect()
    };
    // Warm up before the first sample.
    let warm = load(&stack, 25, 100, 1, Duration::from_millis(200)).await?;
    let start_rss = rss(&stack);
    let began = Instant::now();
    let producer = load(&stack, batches, size, 1, pace);
    let mut kills = 0;
    while began.elapsed() + kill_every <= duration {
        tokio::time::sleep(kill_every).await;
        let (leader, epoch) = stack.leader(Duration::from_secs(30)).await?;
        stack.relays[leader].kill9().await;
        stack
            .new_leader_after(epoch, Duration::from_secs(60))
            .await?;
        stack.relays[leader].restart()?;
        kills += 1;
    }
    let mut report = producer.await?;
    let elapsed = began.elapsed();
    let end_rss = rss(&stack);
    report.accepted.extend(warm.accepted);
    let items: u64 = report.accepted.iter().map(|a| a.items).sum();
    consumer
        .wait_for(items as usize, Duration::from_secs(600))
        .await?;

    // End-to-end: a batch's submission to the first delivery of its last item.
    let deliveries = consumer.snapshot();
    let mut last: std::collections::HashMap<u64, Instant> = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for d in &deliveries {
        if seen.insert(d.item_id.clone()) {
            let at = last.entry(d.batch_sequence).or_insert(d.at);
            *at = (*at).max(d.at);
        }
    }
    let mut per_minute: std::collections::BTreeMap<u64, Vec<Duration>> =
        std::collections::BTreeMap::new();
    for batch in report.accepted.iter().filter(|b| b.submitted >= began) {
        if let Some(at) = last.get(&batch.sequence) {
            let minute = (batch.submitted - began).as_secs() / 60;
            per_minute
                .entry(minute)
                .or_default()
                .push(at.saturating_duration_since(batch.submitted));
        }
    }
    let p95: Vec<String> = per_minute
        .values_mut()
        .map(|samples| {
            samples.sort();
            format!(
                "{:.2}",
                samples[(samples.len() * 95 / 100).min(samples.len() - 1)].as_secs_f64()
            )
        })
        .collect();
    let memory = |samples: &[(String, u64)]| {
        samples
            .iter()
            .map(|(id, kib)| format!("{id} {} MiB", kib / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let db = stack.db().await?;
    let invariants = check(&db, &report.accepted, &consumer).await?;
    Ok(Report {
        scenario: "soak",
        faults: format!(
            "{minutes} min of steady load in batches of {size}, {kills} leader kills (one per {} s)",
            kill_every.as_secs()
        ),
        invariants,
        figures: vec![
            (
                "rate".into(),
                format!(
                    "{:.0} items/s submitted",
                    (items as f64 - 2500.0).max(0.0) / elapsed.as_secs_f64()
                ),
            ),
            ("RSS at start".into(), memory(&start_rss)),
            ("RSS at end".into(), memory(&end_rss)),
            ("p95 end-to-end per minute (s)".into(), p95.join(", ")),
        ],
        took: Duration::ZERO,
    })
}
