//! The lease rules every [`LeaseStore`](crate::store::LeaseStore) follows:
//! what a replica does with a stream's lease as it read it, and when it
//! kills the session its predecessor recorded. The MongoDB adapter, the
//! in-memory store and the simulator's replica set all decide here, so the
//! simulator runs the rules the product runs.
//!
//! A leader runs its fenced transactions on one session, recorded in the
//! lease. If it dies inside one, that transaction stays open, holding the
//! lease document, until the server reaps it (MongoDB's
//! `transactionLifetimeLimitSeconds`, 60 s by default), and every write to
//! the lease waits behind it. So a replica that takes over an expired lease
//! first kills the recorded session (`killSessions`), which aborts the
//! orphan at once. It decides so on a lease it has just read, never on one
//! it read earlier: by now that holder may have renewed, and the kill would
//! abort a live leader's work.

use crate::store::Lease;
use crate::stream::StreamName;

/// What a replica does with a stream's lease, as it just read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseStep {
    /// Its own lease: extend it under the same epoch.
    Renew(Lease),
    /// Another holder's live lease: nothing to do.
    Held,
    /// Free, or another holder's expired lease: take it under the next
    /// epoch, written only if the lease is still as read.
    Take {
        next: Lease,
        /// Kill the session the predecessor recorded first, so a
        /// transaction it left open stops holding the lease.
        kill_predecessor: bool,
    },
}

impl LeaseStep {
    /// The lease to write and whether to kill the predecessor's session
    /// first; `None` when another holder's live lease is left alone.
    pub fn write(self) -> Option<(Lease, bool)> {
        match self {
            Self::Held => None,
            Self::Renew(next) => Some((next, false)),
            Self::Take {
                next,
                kill_predecessor,
            } => Some((next, kill_predecessor)),
        }
    }
}

/// The step for `holder` at `now_ms` (the store's clock), given the lease as
/// read (`None`: never taken).
pub fn step(
    stream: &StreamName,
    current: Option<&Lease>,
    holder: &str,
    now_ms: i64,
    ttl_ms: i64,
) -> LeaseStep {
    let expires_at_ms = now_ms.saturating_add(ttl_ms);
    match current {
        Some(lease) if lease.holder == holder => LeaseStep::Renew(Lease {
            expires_at_ms,
            ..lease.clone()
        }),
        Some(lease) if lease.expires_at_ms > now_ms => LeaseStep::Held,
        current => LeaseStep::Take {
            next: Lease {
                stream: stream.clone(),
                holder: holder.to_owned(),
                epoch: current.map_or(0, |l| l.epoch) + 1,
                expires_at_ms,
                committed: current.and_then(|l| l.committed),
                published: current.map_or(0, |l| l.published),
            },
            kill_predecessor: current.is_some(),
        },
    }
}

/// Whether a replica whose lease read did not answer within its time limit
/// kills the session recorded in the lease it read before (if that lease
/// looks expired). Only on a server whose reads wait for open transactions:
/// there, a blocked read means a transaction holds the lease. MongoDB's
/// reads never wait for a transaction, so a read that timed out says
/// nothing about the holder, and the view it would act on is stale.
pub fn kill_after_unanswered_read(reads_wait_for_transactions: bool) -> bool {
    reads_wait_for_transactions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Sequence;

    fn lease(holder: &str, epoch: u64, expires_at_ms: i64) -> Lease {
        Lease {
            stream: StreamName::default(),
            holder: holder.to_owned(),
            epoch,
            expires_at_ms,
            committed: Some(Sequence(7)),
            published: 70,
        }
    }

    #[test]
    fn a_free_lease_is_taken_at_epoch_one_with_nothing_to_kill() {
        let step = step(&StreamName::default(), None, "a", 1_000, 500);
        let LeaseStep::Take {
            next,
            kill_predecessor,
        } = step
        else {
            panic!("expected a take, got {step:?}");
        };
        assert_eq!(
            (next.epoch, next.expires_at_ms, next.committed),
            (1, 1_500, None)
        );
        assert!(!kill_predecessor);
    }

    #[test]
    fn the_holder_renews_even_an_expired_lease_under_its_epoch() {
        let current = lease("a", 3, 900);
        assert_eq!(
            step(&StreamName::default(), Some(&current), "a", 1_000, 500),
            LeaseStep::Renew(lease("a", 3, 1_500))
        );
    }

    #[test]
    fn another_holders_live_lease_is_left_alone() {
        let current = lease("a", 3, 1_001);
        assert_eq!(
            step(&StreamName::default(), Some(&current), "b", 1_000, 500),
            LeaseStep::Held
        );
    }

    #[test]
    fn an_expired_lease_is_taken_with_its_progress_and_the_predecessor_killed() {
        let current = lease("a", 3, 1_000);
        assert_eq!(
            step(&StreamName::default(), Some(&current), "b", 1_000, 500),
            LeaseStep::Take {
                next: lease("b", 4, 1_500),
                kill_predecessor: true,
            }
        );
    }

    #[test]
    fn only_a_server_whose_reads_wait_makes_an_unanswered_read_kill() {
        assert!(kill_after_unanswered_read(true));
        assert!(!kill_after_unanswered_read(false));
    }
}
