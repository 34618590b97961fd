//! The consumer crate against the real relay and the Pub/Sub emulator: its
//! handler gets each batch once, whole and in order, although a batch
//! fails once (and is redelivered) and copies of its messages are
//! published again (duplicates, as after a frozen leader).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_consumer::{Consumer, ConsumerConfig, Delivery, Handler, MemorySeen};
use outbox_core::publish::OutboxMessage;
use relay::drain::Publishers;
use relay::pubsub;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::e2e::{eventually, start_stack};

/// Batches handed over: each one's sequence and its items' positions.
type Handled = Arc<Mutex<Vec<(u64, Vec<u32>)>>>;

/// Records each batch handed over; fails batch 2 the first time.
#[derive(Clone, Default)]
struct Recorder {
    batches: Handled,
    failed_once: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Handler for Recorder {
    async fn handle(&self, delivery: Delivery) -> anyhow::Result<()> {
        let Delivery::Batch(items) = delivery else {
            anyhow::bail!("whole batches were asked for");
        };
        let sequence = items[0].position.batch_sequence;
        if sequence == 2 && !self.failed_once.swap(true, Ordering::SeqCst) {
            anyhow::bail!("the application fails batch 2 once");
        }
        let positions = items.iter().map(|i| i.position.item_sequence).collect();
        self.batches.lock().unwrap().push((sequence, positions));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_crate_hands_over_each_batch_once_whole_and_in_order() {
    let stack = start_stack().await;
    // The consumer's own ordered subscription, before anything is published.
    let subscription = format!("consumer-{}", uuid::Uuid::new_v4().simple());
    pubsub::ensure_subscription(&stack.pubsub, &subscription, true)
        .await
        .unwrap();
    let (_relay, admin) = stack.relay(
        "relay-consumer",
        &[
            ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
            ("LEASE_TTL_SECONDS", "3"),
        ],
    );
    stack.admin_ready(&admin).await;
    for (b, n) in [3_usize, 4, 2].into_iter().enumerate() {
        let body: Vec<Value> = (0..n)
            .map(|i| json!({"request_id": format!("c{b}-{i}"), "vendor_name": "acme", "i": i}))
            .collect();
        stack.post_batch(&json!(body)).await;
    }

    // Batch 2's messages as published, read from the stack's subscription,
    // published again: duplicates after the originals on the same key.
    let client = pubsub::subscriber(&stack.pubsub).await.unwrap();
    let mut stream = client
        .subscribe(stack.pubsub.subscription_path(&stack.subscription))
        .build();
    let shutdown = stream.shutdown_token();
    let mut originals: HashMap<String, OutboxMessage> = HashMap::new();
    let mut received = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received < 9 {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(Some(Ok((message, handler)))) = next else {
            panic!("received {received} of 9");
        };
        if message.attributes["batch_sequence"] == "2" {
            originals.insert(
                message.attributes["item_id"].clone(),
                OutboxMessage {
                    data: message.data.to_vec(),
                    attributes: message.attributes.clone().into_iter().collect(),
                    ordering_key: Some(message.ordering_key.clone()),
                },
            );
        }
        received += 1;
        handler.ack();
    }
    shutdown.shutdown().await;
    assert_eq!(originals.len(), 4);
    let publishers = pubsub::PubSubClient::connect(&stack.pubsub).await.unwrap();
    let publisher = publishers.for_topic(&stack.pubsub.topic);
    let copies: Vec<_> = originals
        .into_values()
        .map(|m| publisher.publish(m))
        .collect();
    for copy in futures::future::join_all(copies).await {
        copy.unwrap();
    }
    // A fourth batch after the copies: once it is handled, so were they.
    stack
        .post_batch(&json!([{"vendor_name": "acme", "last": true}]))
        .await;

    let recorder = Recorder::default();
    let mut config = ConsumerConfig::new(&stack.pubsub.project_id, &subscription);
    config.emulator_host = stack.pubsub.emulator_host.clone();
    config.whole_batches = true;
    let batches = Arc::clone(&recorder.batches);
    let stop = async move {
        eventually(
            Duration::from_secs(60),
            "the fourth batch to be handled",
            || {
                let done = batches.lock().unwrap().iter().any(|(s, _)| *s == 4);
                async move { done }
            },
        )
        .await;
    };
    let report = Consumer::run(&config, MemorySeen::default(), recorder.clone(), stop)
        .await
        .unwrap();
    assert!(recorder.failed_once.load(Ordering::SeqCst));
    assert_eq!(
        *recorder.batches.lock().unwrap(),
        vec![
            (1, vec![1, 2, 3]),
            (2, vec![1, 2, 3, 4]),
            (3, vec![1, 2]),
            (4, vec![1]),
        ]
    );
    assert!(report.held(), "{report:?}");
    assert!(report.duplicates >= 4, "{report:?}");
}
