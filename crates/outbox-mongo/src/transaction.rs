//! Transaction plumbing shared by ingest (`batches.rs`) and the fenced
//! writes (`fenced.rs`): options, the commit with its retries while the
//! outcome is unknown, aborts bounded in time, and ending a transaction
//! that was given up on (abort, then `killSessions`).

use std::time::Duration;

use mongodb::ClientSession;
use mongodb::options::{
    Acknowledgment, ReadPreference, SelectionCriteria, TransactionOptions, WriteConcern,
};
use outbox_core::store::StoreError;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::MongoStore;
use crate::errors::{classify, is_unknown_commit_result};

/// Taken off the deadline for the server-side limits (`maxTimeMS`), so the
/// server's answer arrives before the client gives up.
const SERVER_MARGIN: Duration = Duration::from_millis(100);

/// Majority write concern; `timeout` bounds the wait for the majority
/// (`wtimeout`) and the commit (`maxCommitTimeMS`). Transactions always run
/// on the primary.
pub(crate) fn transaction_options(timeout: Duration) -> TransactionOptions {
    TransactionOptions::builder()
        .write_concern(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .w_timeout(timeout)
                .build(),
        )
        .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
        .max_commit_time(timeout)
        .build()
}

/// What is left until `deadline`, less the margin, at least 1 ms.
pub(crate) fn server_budget(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(SERVER_MARGIN)
        .max(Duration::from_millis(1))
}

pub(crate) fn deadline_passed(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "MongoDB did not {what} within the request deadline"
    ))
}

/// How a transaction attempt that did not commit ended.
pub(crate) enum Attempt {
    /// Nothing was committed; the error says whether to run again.
    Failed(StoreError),
    /// The commit was sent; its outcome is unknown.
    Unknown(String),
    /// The deadline cut a step off; the transaction may be open on the
    /// server.
    Abandoned,
}

impl MongoStore {
    /// Commits, retrying while the outcome is unknown, until `deadline`.
    /// A transient failure of the commit itself means the whole transaction
    /// should run again; an outcome still unknown at the deadline is
    /// [`Attempt::Unknown`].
    pub(crate) async fn commit_until(
        session: &mut ClientSession,
        deadline: Instant,
    ) -> Result<(), Attempt> {
        let mut attempt = 0_u32;
        loop {
            attempt += 1;
            let result = tokio::time::timeout_at(deadline, session.commit_transaction()).await;
            match result {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if is_unknown_commit_result(&e) => {
                    if Instant::now() >= deadline {
                        return Err(Attempt::Unknown(e.to_string()));
                    }
                    debug!(message = "commit outcome unknown, retrying", error = %e, attempt);
                    let pause = Duration::from_millis(10 << attempt.min(5));
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                Ok(Err(e)) => return Err(Attempt::Failed(classify(e))),
                Err(_) => {
                    return Err(Attempt::Unknown(
                        "no answer to commitTransaction before the deadline".to_owned(),
                    ));
                }
            }
        }
    }

    /// Commits with the relay's commit timeout (fenced writes).
    pub(crate) async fn commit(&self, session: &mut ClientSession) -> Result<(), StoreError> {
        let deadline = Instant::now() + self.config.commit_timeout;
        match Self::commit_until(session, deadline).await {
            Ok(()) => Ok(()),
            Err(Attempt::Failed(e)) => Err(e),
            Err(Attempt::Unknown(message)) => Err(StoreError::OutcomeUnknown(message)),
            Err(Attempt::Abandoned) => Err(deadline_passed("commit")),
        }
    }

    /// Aborts after a failed step. The step's error is what matters; an
    /// abort failure only means the server will time the transaction out.
    pub(crate) async fn abort(session: &mut ClientSession) {
        Self::abort_until(session, Instant::now() + Duration::from_secs(1)).await;
    }

    /// [`abort`](Self::abort), giving up at `until`. A transaction left open
    /// is aborted by the session's next transaction, or by MongoDB's
    /// transaction lifetime limit.
    pub(crate) async fn abort_until(session: &mut ClientSession, until: Instant) {
        let abort = tokio::time::timeout_at(until, session.abort_transaction());
        match abort.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(message = "abort failed", error = %e),
            Err(_) => debug!(message = "abort timed out"),
        }
    }

    /// Ends the session's transaction in the background, so the client's
    /// answer does not wait for it: abort, then kill (the abort cannot end
    /// a transaction whose commit was sent).
    ///
    /// When the store is unreachable (frozen, partitioned) the statements we
    /// gave up on may still be queued on the way to it and open a
    /// transaction once it is back, holding the sequence counter until
    /// `transactionLifetimeLimitSeconds`. So the kill is retried until it
    /// lands (for up to a minute), and repeated twice shortly after, for a
    /// statement that arrives after the first kill.
    pub(crate) fn end_in_background(&self, mut session: ClientSession) {
        let store = self.clone();
        tokio::spawn(async move {
            Self::abort(&mut session).await;
            let id = session.id().clone();
            let started = Instant::now();
            let mut pause = Duration::from_millis(200);
            while !store.kill_once(&id).await {
                if started.elapsed() > Duration::from_secs(60) {
                    warn!(
                        message = "cannot end our abandoned transaction; MongoDB aborts it after transactionLifetimeLimitSeconds"
                    );
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            for after in [Duration::from_secs(1), Duration::from_secs(3)] {
                tokio::time::sleep(after).await;
                store.kill_once(&id).await;
            }
        });
    }

    async fn kill_once(&self, id: &mongodb::bson::Document) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(2), self.kill_session(id)).await,
            Ok(Ok(()))
        )
    }
}
