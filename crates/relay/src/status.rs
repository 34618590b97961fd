//! What this replica reports about itself on the admin port.

use std::collections::VecDeque;
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

/// How many errors the board keeps for the dashboard.
pub const RECENT_ERRORS: usize = 20;

/// An error the replica met, and when.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorEntry {
    pub at: DateTime<Utc>,
    pub message: String,
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
    /// The last [`RECENT_ERRORS`] errors, newest first.
    pub recent_errors: VecDeque<ErrorEntry>,
}

/// How often [`StatusBoard::sample`] is called, and how many samples are
/// kept: ten minutes for the dashboard's charts.
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
pub const SAMPLES: usize = 300;

/// The replica's counters at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub published_total: u64,
    pub pending_batches: Option<u64>,
    pub oldest_pending_age_seconds: Option<f64>,
}

/// Shared between the drain loop and the admin handlers.
#[derive(Default)]
pub struct StatusBoard {
    state: Mutex<RelayState>,
    history: Mutex<VecDeque<Sample>>,
}

impl StatusBoard {
    pub fn update<R>(&self, change: impl FnOnce(&mut RelayState) -> R) -> R {
        change(&mut self.lock())
    }

    pub fn snapshot(&self) -> RelayState {
        self.lock().clone()
    }

    pub fn record_error(&self, error: impl ToString) {
        let (message, at) = (error.to_string(), outbox_core::world::now());
        self.update(|s| {
            s.last_error = Some(message.clone());
            s.last_error_at = Some(at);
            s.recent_errors.push_front(ErrorEntry { at, message });
            s.recent_errors.truncate(RECENT_ERRORS);
        });
    }

    /// Records the counters now, dropping the oldest beyond [`SAMPLES`].
    pub fn sample(&self) {
        let state = self.snapshot();
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        history.push_back(Sample {
            at: outbox_core::world::now(),
            published_total: state.published_total,
            pending_batches: state.pending_batches,
            oldest_pending_age_seconds: state.oldest_pending_age_seconds,
        });
        while history.len() > SAMPLES {
            history.pop_front();
        }
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
