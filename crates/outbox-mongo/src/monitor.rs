//! What the store sends to MongoDB, command by command, from the driver's
//! command monitoring: the read and write concern of each command and
//! whether it ran inside a transaction. Tests use it to check properties
//! the development stand-in ignores (read concerns), and the benchmarks to
//! count round trips, the figure that carries over to a real replica set.

use std::sync::{Arc, Mutex};

use mongodb::bson::{Bson, Document};
use mongodb::event::EventHandler;
use mongodb::event::command::CommandEvent;

/// One command as it was sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// `find`, `update`, `commitTransaction`, ...
    pub name: String,
    /// The collection it names (`find: "batches"`), if any.
    pub collection: Option<String>,
    /// `readConcern.level`, when the command carries one.
    pub read_concern: Option<String>,
    /// `writeConcern.w`, when the command carries one.
    pub write_concern: Option<String>,
    /// Part of a transaction (it carries `txnNumber` with `autocommit: false`).
    pub in_transaction: bool,
    /// The command's own argument when it is not a collection name (the
    /// sessions of a `killSessions`).
    pub argument: Option<Bson>,
}

impl Command {
    fn from_started(command: &Document, name: &str) -> Self {
        let collection = command.get_str(name).ok().map(str::to_owned);
        let argument = match command.get(name) {
            Some(Bson::String(_)) | None => None,
            Some(other) => Some(other.clone()),
        };
        let read_concern = command
            .get_document("readConcern")
            .ok()
            .and_then(|rc| rc.get_str("level").ok())
            .map(str::to_owned);
        let write_concern = command
            .get_document("writeConcern")
            .ok()
            .and_then(|wc| wc.get("w"))
            .map(|w| match w {
                Bson::String(s) => s.clone(),
                other => other.to_string(),
            });
        let in_transaction = command.contains_key("txnNumber")
            && command
                .get_bool("autocommit")
                .is_ok_and(|autocommit| !autocommit);
        Self {
            name: name.to_owned(),
            collection,
            read_concern,
            write_concern,
            in_transaction,
            argument,
        }
    }

    /// A command that reads data and is not the driver's own housekeeping.
    pub fn is_read(&self) -> bool {
        matches!(
            self.name.as_str(),
            "find" | "aggregate" | "count" | "distinct" | "getMore"
        )
    }
}

/// Driver commands that are housekeeping, not the store's own round trips.
const HOUSEKEEPING: [&str; 8] = [
    "hello",
    "isMaster",
    "ismaster",
    "ping",
    "endSessions",
    "saslStart",
    "saslContinue",
    "buildInfo",
];

/// Records every command a client sends (housekeeping aside). Cheap to
/// clone; clones share the record.
#[derive(Clone, Default)]
pub struct CommandLog {
    commands: Arc<Mutex<Vec<Command>>>,
}

impl std::fmt::Debug for CommandLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandLog")
            .field("commands", &self.lock().len())
            .finish()
    }
}

impl CommandLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// The handler to set as the client's `command_event_handler`.
    pub fn handler(&self) -> EventHandler<CommandEvent> {
        let log = self.clone();
        EventHandler::callback(move |event| {
            if let CommandEvent::Started(started) = event
                && !HOUSEKEEPING.contains(&started.command_name.as_str())
            {
                log.lock().push(Command::from_started(
                    &started.command,
                    &started.command_name,
                ));
            }
        })
    }

    /// Everything recorded so far.
    pub fn commands(&self) -> Vec<Command> {
        self.lock().clone()
    }

    /// Everything recorded so far, and a fresh start.
    pub fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *self.lock())
    }

    /// How many commands were recorded.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Command>> {
        self.commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
