//! The share rule over the in-memory store, on tokio's paused clock: two
//! replicas whose rounds fall together, as in the simulator.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::memory::MemoryStore;
use outbox_core::publish::OrderingKeyMode;
use outbox_core::store::{LeaseStore, StreamStore};
use outbox_core::stream::{PoisonPolicy, StreamDefinition};
use relay::drain::OnePublisher;
use relay::retention::RetentionSettings;
use relay::{Cluster, ClusterSettings, ClusterStores};
use tokio_util::sync::CancellationToken;

use crate::fakes::FakePublisher;

fn stream(name: &str) -> StreamDefinition {
    StreamDefinition {
        name: name.parse().unwrap(),
        topic: name.to_owned(),
        ordering: OrderingKeyMode::Global,
        on_poison: PoisonPolicy::DeadLetter,
        schema: None,
        writers: None,
        created_at: None,
        updated_at: None,
        claim_check: None,
    }
}

fn replica(id: &str, store: &MemoryStore) -> Arc<Cluster> {
    Arc::new(Cluster::new(
        ClusterSettings {
            relay_id: id.to_owned(),
            admin_url: String::new(),
            page_size: 10,
            ttl: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(5),
            retention: RetentionSettings {
                committed: None,
                dead_letters: None,
                interval: Duration::from_secs(60),
                abandoned: Duration::from_secs(3600),
                objects: Default::default(),
            },
            default_stream: stream("default"),
            max_streams: 10,
            admin_token: None,
        },
        ClusterStores::all(store.clone()),
        Arc::new(OnePublisher(Arc::new(FakePublisher::new(id)))),
    ))
}

async fn holders(store: &MemoryStore) -> Vec<(String, String)> {
    let mut leases: Vec<(String, String)> = store
        .leases()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.expires_at_ms > 0)
        .map(|l| (l.stream.to_string(), l.holder))
        .collect();
    leases.sort();
    leases
}

/// A replica joins one that leads every stream, on the same poll grid, so
/// the first hands the excess over in a round that falls with the other's. The
/// one it hands a stream to must get it: before, the first took a stream
/// it had just released back at its next round (it renewed its own
/// released lease before the other's standby read it), every second.
#[tokio::test(start_paused = true)]
async fn a_stream_handed_over_goes_to_the_replica_it_was_handed_to() {
    let store = MemoryStore::new();
    store.put_stream(&stream("orders")).await.unwrap();
    let stop = CancellationToken::new();
    let first = replica("relay-a", &store);
    let second = replica("relay-b", &store);
    tokio::spawn(Arc::clone(&first).run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(holders(&store).await.len(), 2, "relay-a alone leads both");
    // relay-b joins on relay-a's poll grid.
    tokio::spawn(Arc::clone(&second).run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(8)).await;
    let leases = holders(&store).await;
    let by = |id: &str| leases.iter().filter(|(_, h)| h == id).count();
    assert_eq!(
        (by("relay-a"), by("relay-b")),
        (1, 1),
        "each leads one of the two streams: {leases:?}"
    );
    stop.cancel();
}

/// A replica whose share a stream is, alive (it announces itself) but
/// unable to lead it: after a TTL without a leader, the other takes the
/// stream above its share, and does not hand it back each round.
#[tokio::test(start_paused = true)]
async fn a_stream_no_one_leads_for_a_ttl_is_taken_above_the_share() {
    let store = MemoryStore::new();
    store.put_stream(&stream("orders")).await.unwrap();
    let stop = CancellationToken::new();
    let second = replica("relay-b", &store);
    tokio::spawn(Arc::clone(&second).run(stop.clone()));
    // relay-a announces itself but never leads: its share (one of the two
    // streams) stays free.
    let announce = {
        let store = store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let now_ms = store.now_ms().await.unwrap();
                outbox_core::store::MemberStore::heartbeat(
                    &store,
                    &outbox_core::store::Member {
                        id: "relay-a".to_owned(),
                        admin_url: String::new(),
                        host: String::new(),
                        pid: 1,
                        version: String::new(),
                        started_at: chrono::Utc::now(),
                        expires_at_ms: now_ms + 10_000,
                        published: Default::default(),
                        admin_token: None,
                    },
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holders(&store).await.len(),
        1,
        "relay-b leads its share only"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    for _ in 0..20 {
        let leases = holders(&store).await;
        assert_eq!(leases.len(), 2, "both streams led after a TTL: {leases:?}");
        assert!(leases.iter().all(|(_, h)| h == "relay-b"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    announce.await.unwrap();
}
