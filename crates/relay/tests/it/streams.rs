//! Streams with the real binaries, MongoDB (or its stand-in) and the Pub/Sub
//! emulator: three relays share six streams on six topics, two each; a
//! relay killed mid-drain has its streams led by the others in time, and
//! restarted gets its share back; every topic receives its stream's items
//! complete and, first deliveries, in (batch_sequence, item_sequence) order.
//! A poison batch halts only its own stream.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use relay::pubsub;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::e2e::{Stack, assert_in_order, binary, eventually, firsts, receive_on, start_stack};

const TTL: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(300);

fn relay_vars() -> [(&'static str, &'static str); 3] {
    [
        ("LEASE_TTL_SECONDS", "3"),
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.3"),
        ("OUTBOX_BATCH_SIZE", "50"),
    ]
}

/// Defines `stream` on `topic` through a relay's admin port; makes the
/// topic and an ordered subscription (returned).
async fn define(stack: &Stack, admin: &str, stream: &str, body: Value) -> String {
    let topic = body["topic"].as_str().unwrap().to_owned();
    let on_topic = stack.pubsub.for_topic(&topic);
    pubsub::ensure_topic(&on_topic).await.unwrap();
    let subscription = format!("{topic}-ordered");
    pubsub::ensure_subscription(&on_topic, &subscription, true)
        .await
        .unwrap();
    let response = stack
        .http
        .put(format!("{admin}/api/v1/streams/{stream}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    subscription
}

/// Posts a batch of `n` items to `stream`; the writer must store it.
async fn post(stack: &Stack, stream: &str, n: usize, tag: &str) {
    let body: Vec<Value> = (0..n)
        .map(|i| json!({"request_id": format!("{tag}-{i}"), "vendor_name": "acme", "i": i}))
        .collect();
    let response = stack
        .http
        .post(format!(
            "{}/api/v1/streams/{stream}/batches",
            stack.writer_url
        ))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        201,
        "{stream}: {:?}",
        response.text().await
    );
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["data"]["stream"], stream);
}

/// Which replica leads each stream, as a relay's admin port says.
async fn leaders(stack: &Stack, admin: &str) -> BTreeMap<String, Option<String>> {
    let Ok(response) = stack
        .http
        .get(format!("{admin}/api/v1/streams"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return BTreeMap::new();
    };
    let body: Value = response.json().await.unwrap_or_default();
    body["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["stream"].as_str().unwrap_or_default().to_owned(),
                s["leader"]["relay_id"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// How many of `streams` each replica leads.
fn shares(
    leaders: &BTreeMap<String, Option<String>>,
    streams: &[String],
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for stream in streams {
        if let Some(Some(leader)) = leaders.get(stream) {
            *counts.entry(leader.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// Batch sizes by sequence of `stream`, from the store.
async fn sizes(stack: &Stack, stream: &str) -> BTreeMap<u64, u64> {
    let filter = if stream == "default" {
        doc! { "stream": null }
    } else {
        doc! { "stream": stream }
    };
    let batches: Vec<Document> = stack
        .db
        .collection::<Document>("batches")
        .find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let number = |d: &Document, key: &str| match d.get(key) {
        Some(mongodb::bson::Bson::Int32(v)) => u64::try_from(*v).unwrap(),
        Some(mongodb::bson::Bson::Int64(v)) => u64::try_from(*v).unwrap(),
        other => panic!("{key} {other:?}"),
    };
    batches
        .iter()
        .map(|b| (number(b, "batch_sequence"), number(b, "total_items")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_share_six_streams_and_hand_them_over_in_order() {
    let stack = start_stack().await;
    let vars = relay_vars();
    let mut relays = Vec::new();
    for id in ["relay-a", "relay-b", "relay-c"] {
        relays.push((id, stack.relay(id, &vars)));
    }
    for (_, (_, admin)) in &relays {
        stack.admin_ready(admin).await;
    }
    let admin = relays[0].1.1.clone();
    // The default stream counts too: six named streams and `default`
    // (unused here) make seven, so each relay leads two or three; the
    // named ones are what is checked.
    let streams: Vec<String> = (1..=6).map(|n| format!("s{n}")).collect();
    let mut subscriptions = BTreeMap::new();
    for (n, stream) in streams.iter().enumerate() {
        let topic = format!("{}-t{n}", stack.pubsub.topic);
        let mode = if n % 2 == 0 { "global" } else { "batch" };
        let subscription = define(
            &stack,
            &admin,
            stream,
            json!({"topic": topic, "ordering_key": mode}),
        )
        .await;
        subscriptions.insert(stream.clone(), subscription);
    }
    let all: Vec<String> = streams
        .iter()
        .cloned()
        .chain(["default".to_owned()])
        .collect();

    // Stable: every stream led, 3, 2 and 2 (7 over 3).
    let balanced = |shares: &BTreeMap<String, usize>| {
        let mut counts: Vec<usize> = shares.values().copied().collect();
        counts.sort_unstable();
        counts == [2, 2, 3]
    };
    eventually(
        Duration::from_secs(60),
        "every stream led, 3, 2 and 2",
        || async { balanced(&shares(&leaders(&stack, &admin).await, &all)) },
    )
    .await;

    // Batches to every stream at once.
    let submit = |phase: &'static str| {
        let stack = &stack;
        let streams = streams.clone();
        async move {
            let posts = streams
                .iter()
                .flat_map(|stream| (0..4).map(move |b| post(stack, stream, 3 + b * 5, phase)));
            futures::future::join_all(posts).await;
        }
    };
    submit("before").await;

    // Kill the relay leading s1, mid-drain.
    let seen = std::sync::Mutex::new(BTreeMap::new());
    eventually(Duration::from_secs(30), "s1 led", || async {
        let now = leaders(&stack, &admin).await;
        let led = now.get("s1").is_some_and(Option::is_some);
        *seen.lock().unwrap() = now;
        led
    })
    .await;
    let before = seen.into_inner().unwrap();
    let victim = before["s1"].clone().expect("s1 led");
    let index = relays.iter().position(|(id, _)| *id == victim).unwrap();
    let (_, (mut killed, _)) = relays.remove(index);
    let orphaned: Vec<String> = streams
        .iter()
        .filter(|s| before[*s].as_deref() == Some(victim.as_str()))
        .cloned()
        .collect();
    killed.kill_hard();
    let killed_at = Instant::now();
    let survivor = relays[0].1.1.clone();
    eventually(
        Duration::from_secs(60),
        "the killed relay's streams led again",
        || async {
            let now = leaders(&stack, &survivor).await;
            orphaned
                .iter()
                .all(|s| now.get(s).cloned().flatten().is_some_and(|l| l != victim))
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    // The promise is TTL + poll + 2 s; the extra second is this test's own
    // view of it (the admin request, the 50 ms between looks, a busy machine).
    assert!(
        takeover <= TTL + POLL + Duration::from_secs(2) + Duration::from_secs(1),
        "streams {orphaned:?} led again after {takeover:?}"
    );
    submit("during").await;
    // The killed replica is listed as gone, with when, for a while.
    eventually(
        Duration::from_secs(30),
        "the killed relay shown as gone",
        || async {
            let cluster = stack.get_json(&format!("{survivor}/api/v1/cluster")).await;
            cluster["gone"].as_array().is_some_and(|gone| {
                gone.iter()
                    .any(|g| g["relay_id"] == victim.as_str() && g["gone_at"].is_string())
            })
        },
    )
    .await;

    // Restarted, it gets its share back.
    let (restarted, restarted_admin) = stack.relay(&victim, &vars);
    stack.admin_ready(&restarted_admin).await;
    eventually(
        Duration::from_secs(60),
        "the restarted relay's share",
        || async {
            let shares = shares(&leaders(&stack, &restarted_admin).await, &all);
            balanced(&shares) && shares.get(&victim).is_some_and(|n| *n >= 2)
        },
    )
    .await;
    submit("after").await;

    // Every topic: its stream's items, complete, first deliveries in order.
    for stream in &streams {
        let sizes = sizes(&stack, stream).await;
        let total: u64 = sizes.values().sum();
        assert_eq!(sizes.len(), 12, "{stream}: 12 batches stored");
        let received = receive_on(
            &stack,
            &subscriptions[stream],
            usize::try_from(total).unwrap(),
            Duration::from_secs(120),
            |_| {},
        )
        .await;
        let (firsts, _duplicates) = firsts(&received);
        assert!(
            received.iter().all(|r| r.stream == *stream),
            "{stream}: a message of another stream"
        );
        if stream.trim_start_matches('s').parse::<usize>().unwrap() % 2 == 1 {
            // global: one key, everything in order.
            assert_in_order(&firsts, &sizes);
        } else {
            // batch: each batch's items in order on its own key.
            let mut by_batch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for r in &firsts {
                by_batch.entry(r.position.0).or_default().push(r.position.1);
            }
            for (batch, items) in &by_batch {
                let expected: Vec<u64> = (1..=sizes[batch]).collect();
                assert_eq!(items, &expected, "{stream} batch {batch}");
            }
            assert_eq!(by_batch.len(), 12);
        }
    }
    drop(restarted);
    drop(relays);
}

/// A batch Pub/Sub refuses (stored before the writer checked the limits)
/// halts its own stream; the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_batch_halts_only_its_own_stream() {
    let stack = start_stack().await;
    let (relay, admin) = stack.relay("relay-poison-streams", &relay_vars());
    stack.admin_ready(&admin).await;
    let healthy = define(
        &stack,
        &admin,
        "healthy",
        json!({"topic": format!("{}-healthy", stack.pubsub.topic)}),
    )
    .await;
    define(
        &stack,
        &admin,
        "poisoned",
        json!({"topic": format!("{}-poisoned", stack.pubsub.topic), "on_poison": "halt"}),
    )
    .await;
    let poisoned: outbox_core::stream::StreamName = "poisoned".parse().unwrap();
    stack
        .store_unchecked_in(
            &poisoned,
            &[json!({"request_id": "big", "blob": "x".repeat(11_000_000)})],
        )
        .await;
    eventually(
        Duration::from_secs(60),
        "the poisoned stream halted",
        || async {
            let body: Value = stack
                .http
                .get(format!("{admin}/api/v1/streams/poisoned"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["state"] == "halted"
        },
    )
    .await;
    for b in 0..3 {
        post(&stack, "healthy", 4, &format!("h{b}")).await;
    }
    let received = receive_on(&stack, &healthy, 12, Duration::from_secs(60), |_| {}).await;
    let (firsts, _) = firsts(&received);
    assert_in_order(&firsts, &sizes(&stack, "healthy").await);
    let body: Value = stack
        .http
        .get(format!("{admin}/api/v1/streams/poisoned"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["state"], "halted", "{body}");
    assert!(
        body["halted"]["error"].as_str().unwrap().contains("limit"),
        "{body}"
    );
    drop(relay);
}

/// `outbox-relay shard-plan` names every stored stream's zone over its
/// batches, items and counter (the items of a stream carry its name, the
/// shard key's first field); `--apply` refuses anything but mongos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_plan_covers_every_stream_and_applies_only_through_mongos() {
    let stack = start_stack().await;
    let (_relay, admin) = stack.relay("relay-shard-plan", &relay_vars());
    stack.admin_ready(&admin).await;
    define(
        &stack,
        &admin,
        "orders",
        json!({"topic": format!("{}-orders", stack.pubsub.topic)}),
    )
    .await;
    post(&stack, "orders", 3, "shard").await;
    let items: Vec<Document> = stack
        .db
        .collection::<Document>("batch_items")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(items.len(), 3);
    assert!(
        items.iter().all(|i| i.get_str("stream") == Ok("orders")),
        "{items:?}"
    );

    let run = |apply: bool| {
        let mut command = tokio::process::Command::new(binary("outbox-relay"));
        command
            .arg("shard-plan")
            .env("MONGODB_URL", &stack.mongo_url)
            .env("MONGODB_DATABASE", &stack.database);
        if apply {
            command.arg("--apply");
        }
        command.output()
    };
    let plan = run(false).await.unwrap();
    assert!(plan.status.success(), "{plan:?}");
    let script = String::from_utf8(plan.stdout).unwrap();
    for zone in ["outbox-default", "outbox-orders"] {
        assert_eq!(
            script.matches(&format!("\"zone\":\"{zone}\"")).count(),
            3,
            "{script}"
        );
    }
    assert!(script.contains(&format!(
        "\"shardCollection\":\"{}.batches\"",
        stack.database
    )));
    let applied = run(true).await.unwrap();
    assert_eq!(applied.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&applied.stderr).contains("not a sharded cluster"),
        "{applied:?}"
    );
}
