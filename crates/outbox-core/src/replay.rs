//! Replay jobs: publishing a range of a stream's committed batches again,
//! in their original order, to the stream's topic or another one.
//!
//! A job is stored (so it survives leader changes), run by the stream's
//! leader beside the live drain, and records its position with the stream's
//! fence: a new leader resumes where the last recorded write left it
//! (a page may be published twice; nothing is published out of order).
//!
//! Its copies keep every attribute of the originals and add `replay_id`;
//! their ordering keys are the original ones behind `replay:<replay_id>:`,
//! so a replay never shares a key with the live messages nor with another
//! replay (docs/CONSUMING.md).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::model::{ItemSequence, Sequence};
use crate::publish::{MAX_ORDERING_KEY_BYTES, OrderingKeyMode, OutboxMessage};
use crate::stream::StreamName;

/// A replay job's id: a random UUID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ReplayId(String);

impl ReplayId {
    pub fn random() -> Self {
        Self(
            uuid::Builder::from_random_bytes(crate::world::random_bytes())
                .into_uuid()
                .to_string(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ReplayId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(|u| Self(u.to_string()))
            .map_err(|_| format!("{s:?} is not a replay id (a UUID)"))
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayState {
    /// The stream's leader publishes it.
    Running,
    /// Stopped by an operator; `resume` carries on from its position.
    Paused,
    /// Every batch of the range was published.
    Done,
    /// Stopped for good by an operator.
    Cancelled,
    /// Stopped by an error it cannot get past (a batch of the range removed
    /// by retention, a message Pub/Sub refuses); `resume` tries again.
    Failed,
}

impl ReplayState {
    pub const ALL: [Self; 5] = [
        Self::Running,
        Self::Paused,
        Self::Done,
        Self::Cancelled,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    /// Nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Cancelled)
    }
}

impl fmt::Display for ReplayState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplayState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown replay state {s:?}"))
    }
}

/// What an operator asks of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayAction {
    Pause,
    Resume,
    Cancel,
}

impl ReplayAction {
    /// The states the action applies to, and the state it leads to.
    pub fn transition(self) -> (&'static [ReplayState], ReplayState) {
        use ReplayState::*;
        match self {
            Self::Pause => (&[Running], Paused),
            Self::Resume => (&[Paused, Failed], Running),
            Self::Cancel => (&[Running, Paused, Failed], Cancelled),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Cancel => "cancel",
        }
    }
}

/// The next thing a job publishes: the batch at `batch_sequence`, from the
/// position after `after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReplayPosition {
    pub batch_sequence: Sequence,
    pub after: ItemSequence,
}

/// Progress as a job records it, under the stream's fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayProgress {
    pub replay_id: ReplayId,
    pub position: ReplayPosition,
    pub items_sent: u64,
    pub batches_sent: u64,
    /// The range is published: the job is done (if it is still running).
    pub done: bool,
}

/// What `POST /api/v1/outbox/replays` asks for, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayRequest {
    pub stream: StreamName,
    pub from_sequence: Sequence,
    pub to_sequence: Sequence,
    pub topic: String,
    pub ordering: OrderingKeyMode,
    /// Items per second at most; `None`: as fast as Pub/Sub takes them.
    pub max_items_per_second: Option<u32>,
}

/// Why a replay cannot be started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayRefused {
    /// `from_sequence` is 0 or after `to_sequence`.
    #[error("{0}")]
    InvalidRange(String),
    /// Part of the range is not committed (yet).
    #[error(
        "batches up to {to} are not all committed: the stream has committed through {committed}"
    )]
    NotCommitted { to: Sequence, committed: u64 },
    /// Retention removed the start of the range.
    #[error(
        "batch {from} is no longer held: retention removed it; the first batch held is {first_available}"
    )]
    Removed {
        from: Sequence,
        first_available: Sequence,
    },
}

/// What the store holds of a stream's committed batches, for a replay's
/// range check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldRange {
    /// The lowest batch sequence still stored (retention removes from the
    /// bottom); `None` when no batch is.
    pub first: Option<Sequence>,
    /// The highest committed sequence; every batch up to it is committed.
    pub committed_through: u64,
}

impl HeldRange {
    /// Checks `from ..= to` against what is held.
    ///
    /// # Errors
    /// When the range is empty, not all committed, or partly removed.
    pub fn check(&self, from: Sequence, to: Sequence) -> Result<(), ReplayRefused> {
        if from.0 == 0 || from > to {
            return Err(ReplayRefused::InvalidRange(format!(
                "from_sequence ({}) must be at least 1 and at most to_sequence ({})",
                from.0, to.0
            )));
        }
        if to.0 > self.committed_through {
            return Err(ReplayRefused::NotCommitted {
                to,
                committed: self.committed_through,
            });
        }
        let first_available = self.first.unwrap_or(Sequence(self.committed_through + 1));
        if from < first_available {
            return Err(ReplayRefused::Removed {
                from,
                first_available,
            });
        }
        Ok(())
    }
}

/// A replay job as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayJob {
    pub replay_id: ReplayId,
    pub stream: StreamName,
    pub from_sequence: Sequence,
    pub to_sequence: Sequence,
    pub topic: String,
    #[serde(serialize_with = "display")]
    pub ordering: OrderingKeyMode,
    pub max_items_per_second: Option<u32>,
    pub state: ReplayState,
    pub position: ReplayPosition,
    pub items_sent: u64,
    pub items_total: u64,
    pub batches_sent: u64,
    pub batches_total: u64,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When it last started running (created or resumed), and how many
    /// items it had sent then: its rate is measured from there.
    pub running_since: DateTime<Utc>,
    pub items_at_running_since: u64,
}

fn display<S: serde::Serializer>(value: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

impl ReplayJob {
    /// A new running job over `request`, whose range holds `items_total`
    /// items.
    pub fn new(request: ReplayRequest, items_total: u64, now: DateTime<Utc>) -> Self {
        Self {
            replay_id: ReplayId::random(),
            position: ReplayPosition {
                batch_sequence: request.from_sequence,
                after: ItemSequence(0),
            },
            batches_total: request.to_sequence.0 - request.from_sequence.0 + 1,
            stream: request.stream,
            from_sequence: request.from_sequence,
            to_sequence: request.to_sequence,
            topic: request.topic,
            ordering: request.ordering,
            max_items_per_second: request.max_items_per_second,
            state: ReplayState::Running,
            items_sent: 0,
            items_total,
            batches_sent: 0,
            error: None,
            created_at: now,
            updated_at: now,
            running_since: now,
            items_at_running_since: 0,
        }
    }

    /// Items per second since it last started running, while it runs.
    pub fn rate(&self) -> Option<f64> {
        if self.state != ReplayState::Running {
            return None;
        }
        let seconds = (self.updated_at - self.running_since).num_milliseconds() as f64 / 1000.0;
        let items = self.items_sent.saturating_sub(self.items_at_running_since);
        (seconds > 0.0 && items > 0).then(|| items as f64 / seconds)
    }

    /// Seconds until done at [`rate`](Self::rate).
    pub fn eta_seconds(&self) -> Option<f64> {
        let rate = self.rate()?;
        Some(self.items_total.saturating_sub(self.items_sent) as f64 / rate)
    }

    /// The copy of a live message this job publishes: the same data and
    /// attributes plus `replay_id`, the ordering key behind
    /// `replay:<replay_id>:` (its SHA-256 when that is longer than Pub/Sub
    /// takes).
    pub fn copy_of(&self, mut message: OutboxMessage) -> OutboxMessage {
        message
            .attributes
            .insert("replay_id".to_owned(), self.replay_id.to_string());
        message.ordering_key = message.ordering_key.map(|key| {
            let prefixed = format!("replay:{}:{key}", self.replay_id);
            if prefixed.len() <= MAX_ORDERING_KEY_BYTES {
                prefixed
            } else {
                use sha2::Digest;
                format!(
                    "replay:{}:sha256:{}",
                    self.replay_id,
                    hex::encode(sha2::Sha256::digest(key.as_bytes()))
                )
            }
        });
        message
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn request(from: u64, to: u64) -> ReplayRequest {
        ReplayRequest {
            stream: StreamName::default_stream(),
            from_sequence: Sequence(from),
            to_sequence: Sequence(to),
            topic: "t".into(),
            ordering: OrderingKeyMode::Global,
            max_items_per_second: None,
        }
    }

    #[test]
    fn a_range_is_checked_against_what_is_held() {
        let held = HeldRange {
            first: Some(Sequence(5)),
            committed_through: 10,
        };
        assert!(held.check(Sequence(5), Sequence(10)).is_ok());
        assert_eq!(
            held.check(Sequence(4), Sequence(6)),
            Err(ReplayRefused::Removed {
                from: Sequence(4),
                first_available: Sequence(5)
            })
        );
        assert!(matches!(
            held.check(Sequence(6), Sequence(11)),
            Err(ReplayRefused::NotCommitted { committed: 10, .. })
        ));
        assert!(matches!(
            held.check(Sequence(0), Sequence(3)),
            Err(ReplayRefused::InvalidRange(_))
        ));
        assert!(matches!(
            held.check(Sequence(7), Sequence(6)),
            Err(ReplayRefused::InvalidRange(_))
        ));
        // Everything removed: the first available is the next to commit.
        let empty = HeldRange {
            first: None,
            committed_through: 10,
        };
        assert_eq!(
            empty.check(Sequence(1), Sequence(10)),
            Err(ReplayRefused::Removed {
                from: Sequence(1),
                first_available: Sequence(11)
            })
        );
    }

    #[test]
    fn a_copy_adds_the_replay_id_and_keys_of_its_own() {
        let job = ReplayJob::new(request(1, 2), 10, Utc::now());
        let original = OutboxMessage {
            data: b"{}".to_vec(),
            attributes: BTreeMap::from([("item_id".to_owned(), "x".to_owned())]),
            ordering_key: Some("batch-outbox".to_owned()),
        };
        let copy = job.copy_of(original.clone());
        assert_eq!(copy.data, original.data);
        assert_eq!(copy.attributes["item_id"], "x");
        assert_eq!(copy.attributes["replay_id"], job.replay_id.as_str());
        assert_eq!(
            copy.ordering_key.as_deref(),
            Some(format!("replay:{}:batch-outbox", job.replay_id).as_str())
        );
        // A key at Pub/Sub's limit still fits once prefixed.
        let long = OutboxMessage {
            ordering_key: Some("k".repeat(MAX_ORDERING_KEY_BYTES)),
            ..original.clone()
        };
        let copy = job.copy_of(long);
        assert!(copy.check_limits().is_ok());
        // No key stays no key.
        let unkeyed = job.copy_of(OutboxMessage {
            ordering_key: None,
            ..original
        });
        assert_eq!(unkeyed.ordering_key, None);
    }

    #[test]
    fn actions_move_between_states() {
        let (from, to) = ReplayAction::Resume.transition();
        assert!(from.contains(&ReplayState::Failed));
        assert_eq!(to, ReplayState::Running);
        assert!(
            !ReplayAction::Pause
                .transition()
                .0
                .contains(&ReplayState::Done)
        );
        for state in ReplayState::ALL {
            assert_eq!(state.as_str().parse::<ReplayState>(), Ok(state));
        }
    }

    #[test]
    fn the_rate_counts_from_the_last_start() {
        let start = Utc::now();
        let mut job = ReplayJob::new(request(1, 10), 1000, start);
        job.items_sent = 300;
        job.items_at_running_since = 100;
        job.updated_at = start + chrono::Duration::seconds(2);
        assert_eq!(job.rate(), Some(100.0));
        assert_eq!(job.eta_seconds(), Some(7.0));
        job.state = ReplayState::Paused;
        assert_eq!(job.rate(), None);
    }
}
