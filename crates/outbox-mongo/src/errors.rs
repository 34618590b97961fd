//! Driver errors to [`StoreError`]: what is worth retrying and what is not.
//!
//! | condition | becomes | the writer answers |
//! | --- | --- | --- |
//! | no server selectable, network error, pool cleared | `Unavailable` | 503 `store_unavailable` |
//! | a replica-set state change (codes in [`STATE_CHANGE_CODES`]), a `RetryableWriteError` label, a write-concern timeout, `MaxTimeMSExpired` | `Unavailable` | 503 `store_unavailable` |
//! | `TransientTransactionError` label (write conflicts, a primary lost mid-transaction) | `Conflict`: the transaction runs again within the deadline | 503 when the deadline passes |
//! | `UnknownTransactionCommitResult` after the commit's retries | `OutcomeUnknown` | 503 `outcome_unknown` with the `batch_id` |
//! | anything else (a malformed command, a schema problem) | `Other` | 500 |

use mongodb::error::{
    Error, ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use outbox_core::store::StoreError;

const DUPLICATE_KEY: i32 = 11000;
/// `MaxTimeMSExpired`: an operation's server-side time limit passed (for
/// us: it waited on a document another transaction holds).
pub(crate) const MAX_TIME_MS_EXPIRED: i32 = 50;
/// `Unauthorized`: the user lacks a privilege the command needs.
pub(crate) const UNAUTHORIZED: i32 = 13;
const WRITE_CONCERN_FAILED: i32 = 64;
const EXCEEDED_TIME_LIMIT: i32 = 262;
const INDEX_NOT_FOUND: i32 = 27;
const NAMESPACE_NOT_FOUND: i32 = 26;

/// Server error codes that mean "this member cannot take the operation
/// right now" (an election, a step-down, a shutdown): the same list the
/// drivers' retryable-writes specification uses.
pub(crate) const STATE_CHANGE_CODES: [i32; 14] = [
    6,     // HostUnreachable
    7,     // HostNotFound
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    10058, // LegacyNotPrimary
    134,   // ReadConcernMajorityNotAvailableYet
];

/// The server's error code, wherever the driver put it.
pub(crate) fn code(error: &Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .and_then(|w| w.first())
            .map(|w| w.code)
            .or_else(|| e.write_concern_error.as_ref().map(|w| w.code)),
        ErrorKind::BulkWrite(e) => e
            .write_concern_errors
            .first()
            .map(|w| w.code)
            .or_else(|| e.write_errors.values().next().map(|w| w.code)),
        _ => None,
    }
}

pub(crate) fn is_duplicate_key(error: &Error) -> bool {
    code(error) == Some(DUPLICATE_KEY)
}

pub(crate) fn is_missing_index(error: &Error) -> bool {
    matches!(code(error), Some(INDEX_NOT_FOUND | NAMESPACE_NOT_FOUND))
}

pub(crate) fn is_unknown_commit_result(error: &Error) -> bool {
    error.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
}

/// What a server error code and its labels say, before the error kind is
/// looked at: `Some` when they decide.
fn by_code_and_labels(
    code: Option<i32>,
    has_label: impl Fn(&str) -> bool,
    message: String,
) -> Result<StoreError, String> {
    if has_label(TRANSIENT_TRANSACTION_ERROR) {
        return Ok(StoreError::Conflict(message));
    }
    let unavailable = has_label(RETRYABLE_WRITE_ERROR)
        || code.is_some_and(|c| {
            STATE_CHANGE_CODES.contains(&c)
                || matches!(
                    c,
                    MAX_TIME_MS_EXPIRED | WRITE_CONCERN_FAILED | EXCEEDED_TIME_LIMIT
                )
        });
    if unavailable {
        Ok(StoreError::Unavailable(message))
    } else {
        Err(message)
    }
}

/// Maps a driver error. Server selection failures come first: inside a
/// transaction the driver labels them transient too, but retrying a
/// transaction against a database that is down only delays the 503.
pub(crate) fn classify(error: Error) -> StoreError {
    if let ErrorKind::ServerSelection { .. } = error.kind.as_ref() {
        return StoreError::Unavailable(error.to_string());
    }
    let decided = by_code_and_labels(code(&error), |l| error.contains_label(l), error.to_string());
    let message = match decided {
        Ok(store_error) => return store_error,
        Err(message) => message,
    };
    match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => StoreError::Unavailable(message),
        // What the driver says when no replica-set member could be reached
        // (or the server is a standalone): nothing can be stored either way.
        ErrorKind::Transaction { message, .. } if message.contains("not supported") => {
            StoreError::Unavailable(format!(
                "{message} (is MongoDB reachable, and a replica set?)"
            ))
        }
        _ => StoreError::Other(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(code: i32, labels: &[&str]) -> Result<StoreError, String> {
        by_code_and_labels(Some(code), |l| labels.contains(&l), "failed".to_owned())
    }

    #[test]
    fn state_changes_and_timeouts_are_unavailable_not_500() {
        for code in [10107, 11602, 189, 91, 64, 50, 13435] {
            assert!(
                matches!(decide(code, &[]), Ok(StoreError::Unavailable(_))),
                "code {code}"
            );
        }
        assert!(matches!(
            decide(2, &[RETRYABLE_WRITE_ERROR]),
            Ok(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn transient_transaction_errors_are_conflicts() {
        assert!(matches!(
            decide(112, &[TRANSIENT_TRANSACTION_ERROR]),
            Ok(StoreError::Conflict(_))
        ));
        assert!(matches!(
            decide(10107, &[TRANSIENT_TRANSACTION_ERROR]),
            Ok(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn other_command_errors_stay_internal() {
        assert!(decide(2, &[]).is_err());
        let error = Error::from(ErrorKind::Command(
            mongodb::bson::from_document(mongodb::bson::doc! {
                "code": 2, "codeName": "BadValue", "errmsg": "bad",
            })
            .expect("command error"),
        ));
        assert!(matches!(classify(error), StoreError::Other(_)));
    }
}
