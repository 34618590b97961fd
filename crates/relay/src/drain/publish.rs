//! Publishing a group of pages, and what to do with an item Pub/Sub
//! refuses for good.
//!
//! When the next batch may go out before the last acknowledgement of the
//! one before it depends on the ordering key:
//! - `global`: one key for the whole stream. Google's client sends a key's
//!   messages in the order they were handed over, one request at a time,
//!   and after a failed request fails every later message of the key until
//!   it is resumed (which the drain does only after re-reading MongoDB).
//!   So the messages that succeed are always a prefix of those handed
//!   over, and a subscriber with message ordering receives the key in that
//!   order: the whole group, across batches, is handed over at once.
//! - `batch` and `field:`: the keys differ between batches (or between
//!   items), and Pub/Sub orders nothing across keys; a later batch's
//!   message could be delivered while an earlier one is retried. So a
//!   batch is handed over only after every item before it was
//!   acknowledged (the barrier that keeps batches whole and in order).

use std::time::Instant;

use futures::FutureExt;
use outbox_core::model::ItemSequence;
use outbox_core::publish::{OrderingKeyMode, OutboxMessage, PublishError};
use outbox_core::store::{Fence, OutboxItem, PendingBatch, SentMark};
use tracing::warn;

use super::read::Piece;
use super::{BatchEnd, DrainError, Drainer, PassSettings, PoisonPolicy};
use crate::metrics;
use crate::status::Halt;

/// What publishing a group achieved.
pub(super) struct Published {
    /// Each piece's acknowledged items.
    pub marks: Vec<Vec<SentMark>>,
    /// The first item (piece, index in the piece) that failed, and why.
    pub failure: Option<(usize, usize, PublishError)>,
}

impl Drainer {
    /// Publishes the pieces, in order, as the ordering key mode allows (see
    /// the module's documentation), and waits for every answer.
    pub(super) async fn publish_group(
        &self,
        settings: &PassSettings,
        pieces: &[Piece],
    ) -> Published {
        let mut marks: Vec<Vec<SentMark>> = vec![Vec::new(); pieces.len()];
        let mut failure = None;
        let together = matches!(settings.ordering, OrderingKeyMode::Global);
        let mut start = 0;
        while start < pieces.len() && failure.is_none() {
            // Pieces of one batch, or the whole group in `global` mode.
            let end = if together {
                pieces.len()
            } else {
                let batch = &pieces[start].batch.batch_id;
                start
                    + pieces[start..]
                        .iter()
                        .take_while(|p| &p.batch.batch_id == batch)
                        .count()
            };
            failure = self
                .publish_pieces(settings, pieces, start..end, &mut marks)
                .await;
            start = end;
        }
        Published { marks, failure }
    }

    /// Hands every message of `range` to the client at once (stopping at
    /// the first one Pub/Sub would refuse: an item stored before the writer
    /// checked its limits) and waits for all answers.
    async fn publish_pieces(
        &self,
        settings: &PassSettings,
        pieces: &[Piece],
        range: std::ops::Range<usize>,
        marks: &mut [Vec<SentMark>],
    ) -> Option<(usize, usize, PublishError)> {
        let mut messages = Vec::new();
        let mut refused = None;
        'pieces: for p in range {
            let piece = &pieces[p];
            for (i, item) in piece.items.iter().enumerate() {
                let message = OutboxMessage::for_item(item, &piece.batch, &settings.ordering);
                if let Err(violation) = message.check_limits() {
                    ::metrics::counter!(metrics::PUBLISH_ERRORS, "kind" => "over_limit", "stream" => self.label()).increment(1);
                    refused = Some((p, i, PublishError::Permanent(violation.to_string())));
                    break 'pieces;
                }
                messages.push((p, i, message));
            }
        }
        let started = Instant::now();
        let in_flight: Vec<_> = messages
            .into_iter()
            .map(|(p, i, message)| {
                let key = message.ordering_key.clone();
                settings
                    .publisher
                    .publish(message)
                    .map(move |result| (p, i, key, result, started.elapsed()))
            })
            .collect();
        let mut failure = None;
        for (p, i, key, result, latency) in futures::future::join_all(in_flight).await {
            match result {
                Ok(message_id) => {
                    ::metrics::histogram!(metrics::PUBLISH_LATENCY, "stream" => self.label())
                        .record(latency.as_secs_f64());
                    let item = &pieces[p].items[i];
                    marks[p].push(SentMark {
                        item_id: item.item_id,
                        item_sequence: item.item_sequence,
                        publish_id: message_id,
                    });
                }
                Err(error) => {
                    // The client paused this key: resume it before the
                    // next publish on it.
                    if let Some(key) = key {
                        self.paused_keys
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key);
                    }
                    failure.get_or_insert((p, i, error));
                }
            }
        }
        failure.or(refused)
    }

    /// Publishes a rejected item on its own: `Some(message id)` if it goes
    /// through after all, `None` if Pub/Sub rejects it for good.
    pub(super) async fn confirm_poison(
        &self,
        settings: &PassSettings,
        batch: &PendingBatch,
        item: &OutboxItem,
    ) -> Result<Option<String>, DrainError> {
        let message = OutboxMessage::for_item(item, batch, &settings.ordering);
        if message.check_limits().is_err() {
            return Ok(None);
        }
        if let Some(key) = &message.ordering_key {
            settings.publisher.resume(key);
        }
        match settings.publisher.publish(message).await {
            Ok(message_id) => Ok(Some(message_id)),
            Err(PublishError::Permanent(_)) => Ok(None),
            Err(PublishError::Transient(error)) => Err(DrainError::Publish(error)),
        }
    }

    /// An item refused for good: after checking it alone, either marks it
    /// (another message of its request was the problem), halts the stream
    /// on its batch, or sets it aside, as the stream's policy says.
    pub(super) async fn refused(
        &self,
        settings: &PassSettings,
        fence: &Fence,
        batch: &PendingBatch,
        item: &OutboxItem,
        error: &str,
    ) -> Result<BatchEnd, DrainError> {
        if let Some(message_id) = self.confirm_poison(settings, batch, item).await? {
            let mark = SentMark {
                item_id: item.item_id,
                item_sequence: item.item_sequence,
                publish_id: message_id,
            };
            self.store
                .mark_sent(fence, &batch.batch_id, &[mark])
                .await
                .map_err(DrainError::from_store)?;
            return Ok(BatchEnd::Published);
        }
        ::metrics::counter!(metrics::PUBLISH_ERRORS, "kind" => "permanent", "stream" => self.label())
            .increment(1);
        self.poisoned(settings, fence, batch, item, error).await
    }

    async fn poisoned(
        &self,
        settings: &PassSettings,
        fence: &Fence,
        batch: &PendingBatch,
        item: &OutboxItem,
        error: &str,
    ) -> Result<BatchEnd, DrainError> {
        match settings.on_poison {
            PoisonPolicy::Halt => {
                warn!(
                    message = "item rejected for good; halting on this batch until it is retried",
                    batch_id = %batch.batch_id,
                    item_sequence = item.item_sequence.0,
                    %error
                );
                self.store
                    .fail_batch(fence, &batch.batch_id, item.item_sequence, error)
                    .await
                    .map_err(DrainError::from_store)?;
                self.status.update(|s| {
                    s.current_batch = None;
                    s.halted = Some(Halt {
                        batch_id: batch.batch_id.clone(),
                        batch_sequence: batch.batch_sequence,
                        error: Some(format!("item {}: {error}", item.item_sequence)),
                    });
                });
                self.status
                    .record_error(format!("batch {} halted: {error}", batch.batch_id));
                ::metrics::gauge!(metrics::HALTED, "stream" => self.label()).set(1.0);
                Ok(BatchEnd::Halted)
            }
            PoisonPolicy::DeadLetter => {
                warn!(
                    message = "item rejected for good; dead-lettered",
                    batch_id = %batch.batch_id,
                    item_sequence = item.item_sequence.0,
                    %error
                );
                self.store
                    .dead_letter(fence, item, error)
                    .await
                    .map_err(DrainError::from_store)?;
                ::metrics::counter!(metrics::DEAD_LETTERED, "stream" => self.label()).increment(1);
                Ok(BatchEnd::Published)
            }
        }
    }
}

/// The first unsent position of a piece's failed item, for the log.
pub(super) fn failed_at(piece: &Piece, index: usize) -> ItemSequence {
    piece.items[index].item_sequence
}
