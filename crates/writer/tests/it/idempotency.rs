use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use outbox_core::memory::MemoryStore;
use outbox_core::model::{BatchId, BatchProgress, BatchSummary, NewBatch};
use outbox_core::store::{BatchStore, StoreError, StreamStore};
use outbox_core::stream::{StreamDefinition, StreamName};
use serde_json::json;

use crate::helpers::{json, objects, spawn_app};

#[tokio::test]
async fn the_same_key_and_body_replays_the_original_response() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&objects(3)).unwrap();
    let first = app
        .post_raw(body.clone(), "application/json", Some("order-42"))
        .await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = json(first).await;

    let again = app
        .post_raw(body, "application/json", Some("order-42"))
        .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again = json(again).await;
    assert_eq!(
        again["data"], first["data"],
        "a replay must return the original response"
    );
    assert_eq!(app.count("batches").await, 1);
    assert_eq!(app.count("batch_items").await, 3);
}

#[tokio::test]
async fn the_same_key_with_another_body_is_rejected() {
    let app = spawn_app().await;
    let first = app
        .post_raw(b"[{\"a\":1}]".to_vec(), "application/json", Some("k-1"))
        .await;
    assert_eq!(first.status(), 201);
    let reused = app
        .post_raw(b"[{\"a\":2}]".to_vec(), "application/json", Some("k-1"))
        .await;
    assert_eq!(reused.status(), 422);
    assert_eq!(json(reused).await["code"], "idempotency_key_reused");
    assert_eq!(app.count("batches").await, 1);
    // Another key stores another batch.
    let other = app
        .post_raw(b"[{\"a\":2}]".to_vec(), "application/json", Some("k-2"))
        .await;
    assert_eq!(other.status(), 201);
    assert_eq!(app.count("batches").await, 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_store_one_batch() {
    let app = spawn_app().await;
    let body = serde_json::to_vec(&json!([{"request_id": "same"}])).unwrap();
    let requests =
        (0..8).map(|_| app.post_raw(body.clone(), "application/json", Some("shared-key")));
    let responses = futures::future::join_all(requests).await;
    let mut batch_ids = Vec::new();
    let mut replays = 0;
    for response in responses {
        assert_eq!(response.status(), 201);
        replays += usize::from(response.headers().contains_key("idempotent-replayed"));
        batch_ids.push(json(response).await["data"]["batch_id"].clone());
    }
    batch_ids.dedup();
    assert_eq!(
        batch_ids.len(),
        1,
        "different batches for one key: {batch_ids:?}"
    );
    assert_eq!(replays, 7);
    assert_eq!(app.count("batches").await, 1);
    assert_eq!(app.count("batch_items").await, 1);
}

/// A store where the idempotency race is lost only after the request's
/// deadline passed (a large, staged batch spends it storing its items):
/// in the `racing` phase the key's first look finds nothing (the winner has
/// not committed yet), and the insert answers `DuplicateIdempotencyKey`
/// past the deadline; later looks find the winner.
struct LateLoser {
    inner: MemoryStore,
    /// 0: as the store is; 1: the next look finds nothing; 2: losing.
    phase: AtomicU8,
}

#[async_trait::async_trait]
impl outbox_core::claim_check::ObjectRefStore for LateLoser {
    async fn pin(
        &self,
        url: &str,
        count: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        self.inner.pin(url, count, deadline).await
    }

    async fn release(
        &self,
        url: &str,
        count: u64,
    ) -> Result<Option<outbox_core::claim_check::Deletion>, StoreError> {
        self.inner.release(url, count).await
    }

    async fn being_deleted(
        &self,
        marked_before_ms: i64,
    ) -> Result<Vec<outbox_core::claim_check::Deletion>, StoreError> {
        self.inner.being_deleted(marked_before_ms).await
    }

    async fn forget(
        &self,
        deletion: &outbox_core::claim_check::Deletion,
    ) -> Result<(), StoreError> {
        self.inner.forget(deletion).await
    }

    async fn abandon(
        &self,
        deletion: &outbox_core::claim_check::Deletion,
    ) -> Result<(), StoreError> {
        self.inner.abandon(deletion).await
    }
}

#[async_trait::async_trait]
impl BatchStore for LateLoser {
    async fn insert_batch(
        &self,
        batch: &NewBatch,
        deadline: tokio::time::Instant,
    ) -> Result<BatchSummary, StoreError> {
        if self.phase.load(Ordering::SeqCst) == 0 {
            return self.inner.insert_batch(batch, deadline).await;
        }
        tokio::time::sleep_until(deadline + Duration::from_millis(50)).await;
        Err(StoreError::DuplicateIdempotencyKey)
    }

    async fn find_idempotent(
        &self,
        stream: &StreamName,
        key: &str,
    ) -> Result<Option<(String, Option<BatchSummary>)>, StoreError> {
        // A real store answers after a round trip, not on the first poll.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if self
            .phase
            .compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Ok(None);
        }
        self.inner.find_idempotent(stream, key).await
    }

    async fn batch_progress(
        &self,
        batch_id: &BatchId,
    ) -> Result<Option<BatchProgress>, StoreError> {
        self.inner.batch_progress(batch_id).await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.inner.ready().await
    }
}

#[async_trait::async_trait]
impl StreamStore for LateLoser {
    async fn streams(&self) -> Result<Vec<StreamDefinition>, StoreError> {
        self.inner.streams().await
    }

    async fn stream(&self, name: &StreamName) -> Result<Option<StreamDefinition>, StoreError> {
        self.inner.stream(name).await
    }

    async fn put_stream(&self, definition: &StreamDefinition) -> Result<bool, StoreError> {
        self.inner.put_stream(definition).await
    }
}

/// A request that loses an idempotency race after its deadline was spent
/// (storing a large batch's items) still answers the winner's batch, as a
/// replay: the lookup after the race has a deadline of its own.
#[tokio::test]
async fn a_request_that_loses_the_race_after_its_deadline_answers_the_winner() {
    let store = Arc::new(LateLoser {
        inner: MemoryStore::new(),
        phase: AtomicU8::new(0),
    });
    let config = crate::helpers::config(&["--request-deadline-seconds", "0.3"]);
    let app = writer::Application::with_store(
        &config,
        Arc::clone(&store),
        Arc::new(AtomicBool::new(true)),
    )
    .expect("writer starts");
    let app = crate::helpers::start(app, None);
    let body = serde_json::to_vec(&objects(3)).unwrap();
    let first = app
        .post_raw(body.clone(), "application/json", Some("race-1"))
        .await;
    assert_eq!(first.status(), 201);
    let winner = json(first).await["data"]["batch_id"].clone();
    store.phase.store(1, Ordering::SeqCst);
    let loser = app.post_raw(body, "application/json", Some("race-1")).await;
    assert_eq!(loser.status(), 201, "{:?}", loser.headers());
    assert_eq!(loser.headers()["idempotent-replayed"], "true");
    assert_eq!(json(loser).await["data"]["batch_id"], winner);
}
