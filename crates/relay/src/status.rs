//! What this replica reports about itself on the admin port.

use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use outbox_core::model::{BatchId, Sequence};
use serde::Serialize;

/// The batch being drained.
#[derive(Clone, Debug, Serialize)]
pub struct CurrentBatch {
    pub batch_id: BatchId,
    pub batch_sequence: Sequence,
    pub total_items: u64,
    /// Items marked sent by this replica in this pass.
    pub published: u64,
}

/// A batch that stopped the relay.
#[derive(Clone, Debug, Serialize)]
pub struct Halt {
    pub batch_id: BatchId,
    pub batch_sequence: Sequence,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayState {
    pub paused: bool,
    pub current_batch: Option<CurrentBatch>,
    pub halted: Option<Halt>,
    pub pending_batches: Option<u64>,
    pub oldest_pending_age_seconds: Option<f64>,
    pub published_total: u64,
    pub batches_committed_total: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// Shared between the drain loop and the admin handlers.
#[derive(Default)]
pub struct StatusBoard {
    state: Mutex<RelayState>,
}

impl StatusBoard {
    pub fn update<R>(&self, change: impl FnOnce(&mut RelayState) -> R) -> R {
        change(&mut self.lock())
    }

    pub fn snapshot(&self) -> RelayState {
        self.lock().clone()
    }

    pub fn record_error(&self, error: impl ToString) {
        self.update(|s| {
            s.last_error = Some(error.to_string());
            s.last_error_at = Some(Utc::now());
        });
    }

    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
