//! Retention, per stream: its leader removes committed batches, with their items, once
//! their commit is older than `RETENTION_SECONDS`, dead letters older than
//! `DEAD_LETTER_RETENTION_SECONDS`, and the items of large batches staged
//! over an hour ago whose transaction never made them visible.
//!
//! A sweep rather than MongoDB TTL indexes: a TTL index removes documents
//! one collection at a time, so a batch's items would need a date of their
//! own written when the batch commits (one more write per item on the hot
//! path), and a batch could vanish before its items. The sweep removes a
//! batch's items by primary key and then the batch, off the hot path, and
//! never looks at a batch that is not committed.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::claim_check::ObjectRefStore;
use outbox_core::store::{OutboxStore, Removed, StoreError};
use outbox_core::stream::StreamName;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lease::Leadership;
use crate::metrics::{
    RETENTION_REMOVED_BATCHES, RETENTION_REMOVED_DEAD_LETTERS, RETENTION_REMOVED_ITEMS,
    RETENTION_REMOVED_OBJECTS,
};

/// Batches one store call removes at most.
const PASS_LIMIT: u32 = 100;

#[derive(Clone, Debug)]
pub struct RetentionSettings {
    /// How long committed batches are kept; `None` keeps them forever.
    pub committed: Option<Duration>,
    /// How long dead letters are kept; `None` keeps them forever.
    pub dead_letters: Option<Duration>,
    /// How often the leader sweeps.
    pub interval: Duration,
    /// A large batch staged this long ago whose transaction never made it
    /// visible was abandoned by its writer: its items are removed.
    pub abandoned: Duration,
    /// The claim-check stores objects are deleted from (opened as the
    /// references retention releases name them).
    pub objects: outbox_claim_check::Stores,
}

/// Sweeps every `interval` while this replica leads, until `token` is cancelled.
pub async fn run(
    store: Arc<dyn OutboxStore>,
    objects: Arc<dyn ObjectRefStore>,
    stream: StreamName,
    leadership: Leadership,
    settings: RetentionSettings,
    token: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = token.cancelled() => return,
            () = tokio::time::sleep(settings.interval) => {}
        }
        if !leadership.is_leader() {
            continue;
        }
        match sweep(store.as_ref(), objects.as_ref(), &stream, &settings).await {
            Ok(removed) if removed != Removed::default() => info!(
                message = "retention removed expired data",
                batches = removed.batches,
                items = removed.items,
                dead_letters = removed.dead_letters,
                claim_check_objects = removed.object_refs.len()
            ),
            Ok(_) => {}
            Err(error) => warn!(message = "retention sweep failed; trying again later", %error),
        }
    }
}

/// One sweep: everything expired now, a bounded number of batches per store call.
///
/// # Errors
/// The store's, when a call fails; what was removed before stays removed.
pub async fn sweep(
    store: &dyn OutboxStore,
    objects: &dyn ObjectRefStore,
    stream: &StreamName,
    settings: &RetentionSettings,
) -> Result<Removed, StoreError> {
    let now = outbox_core::world::now();
    let before = |keep: Option<Duration>| {
        keep.and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| now - d)
    };
    let committed_before = before(settings.committed);
    let mut dead_letters_before = before(settings.dead_letters);
    let abandoned_before = before(Some(settings.abandoned)).unwrap_or(now);
    let mut total = Removed::default();
    loop {
        let removed = store
            .remove_expired(
                stream,
                committed_before,
                dead_letters_before,
                abandoned_before,
                PASS_LIMIT,
            )
            .await?;
        total.abandoned_batches += removed.abandoned_batches;
        // The objects the removed items referred to, once nothing refers
        // to them any more; a failure here leaves them for the next pass
        // (or for good, if the relay dies now: kept, never lost).
        let deleted = outbox_claim_check::release_and_delete(
            objects,
            &settings.objects,
            &removed.object_refs,
            true,
            outbox_core::world::now().timestamp_millis(),
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("claim-check retention: {e}")))?;
        metrics::counter!(RETENTION_REMOVED_OBJECTS).increment(deleted);
        for (url, count) in &removed.object_refs {
            *total.object_refs.entry(url.clone()).or_default() += count;
        }
        metrics::counter!(RETENTION_REMOVED_BATCHES).increment(removed.batches);
        metrics::counter!(RETENTION_REMOVED_ITEMS).increment(removed.items);
        metrics::counter!(RETENTION_REMOVED_DEAD_LETTERS).increment(removed.dead_letters);
        total.batches += removed.batches;
        total.items += removed.items;
        total.dead_letters += removed.dead_letters;
        dead_letters_before = None;
        if removed.batches < u64::from(PASS_LIMIT) || committed_before.is_none() {
            return Ok(total);
        }
    }
}
