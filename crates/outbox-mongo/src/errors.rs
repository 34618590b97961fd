//! Driver errors to [`StoreError`]: what is worth retrying and what is not.

use mongodb::error::{
    Error, ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use outbox_core::store::StoreError;

const DUPLICATE_KEY: i32 = 11000;

/// The server's error code, wherever the driver put it.
fn code(error: &Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .and_then(|w| w.first())
            .map(|w| w.code),
        _ => None,
    }
}

pub(crate) fn is_duplicate_key(error: &Error) -> bool {
    code(error) == Some(DUPLICATE_KEY)
}

pub(crate) fn is_unknown_commit_result(error: &Error) -> bool {
    error.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
}

/// Maps a driver error. Server selection failures come first: inside a
/// transaction the driver labels them transient too, but retrying a
/// transaction against a database that is down only delays the 503.
pub(crate) fn classify(error: Error) -> StoreError {
    match error.kind.as_ref() {
        ErrorKind::ServerSelection { .. } => StoreError::Unavailable(error.to_string()),
        _ if error.contains_label(TRANSIENT_TRANSACTION_ERROR) => {
            StoreError::Conflict(error.to_string())
        }
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. } => StoreError::Unavailable(error.to_string()),
        // What the driver says when no replica-set member could be reached
        // (or the server is a standalone): nothing can be stored either way.
        ErrorKind::Transaction { message, .. } if message.contains("not supported") => {
            StoreError::Unavailable(format!(
                "{message} (is MongoDB reachable, and a replica set?)"
            ))
        }
        _ => StoreError::Other(error.to_string()),
    }
}
