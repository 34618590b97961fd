"""Launcher for the nx-27017 MongoDB stand-in, presented as replica-set primary.

There is no mongod on the development machines of this project, so when no real
MongoDB is available the scripts start PyPI's `nx-27017` (a MongoDB wire-protocol
server over SQLite) through this launcher. It subclasses the package's handler
(installed files are never edited) and fixes what the Rust driver needs:

* `hello` answers as the primary of a single-node replica set, so the driver
  allows transactions (no `topologyVersion`, so no streaming monitor);
* replies the driver rejects are repaired: `ok: 0` without `code`, cursor ids
  encoded as Int32, change events whose `clusterTime` is not a Timestamp;
* a transaction whose first command is not one that opens it (count,
  aggregate, ...) is opened anyway, and a failed commit no longer leaves the
  session stuck "in transaction";
* transactions are serialized by a gate: while one session's transaction is
  open, other sessions' transactions and writes wait (and so do reads inside
  a transaction). SQLite has one write connection per database here and
  nested SAVEPOINTs of two sessions would commit each other's writes. A
  transaction idle for longer than `transactionLifetimeLimitSeconds` (60 s by
  default, as on MongoDB) is aborted; a command with `maxTimeMS` waits for the
  gate at most that long and then fails with MaxTimeMSExpired (50), as it
  would waiting for a lock;
* reads outside a transaction never wait for the gate, as on MongoDB: find,
  aggregate (without $out, $merge or $changeStream), count, distinct,
  listCollections and listIndexes (and the getMore of their cursors, which
  are kept in memory) are served by a read-only connection from the last
  committed state, so an open transaction's writes are not seen until it
  commits, and never if it aborts. Every read concern (local, majority,
  available, snapshot) reads that state. (Until issue 27 these reads waited
  for the gate too, and a read blocked past its `maxTimeMS` meant a
  transaction was open; it no longer does: LEASE_KILL_ON_BLOCKED_READ has
  nothing left to act on here.) For this every database is a SQLite file in
  WAL mode: `--data-dir memory` (the default) puts the files in a temporary
  directory, on /dev/shm when it has room, removed when the stand-in is gone,
  even by SIGKILL. A count, distinct or plain aggregate of a collection that
  does not exist answers empty without creating it, as MongoDB does; the few
  reads that would create one on the package's write path (listIndexes, a
  $lookup of a missing collection) and GridFS reads take the gated way, as
  before. Fail points (`blockConnection` included) apply to these reads as to
  any command;
* MongoDB's own test commands, with MongoDB's syntax, so the same fault
  injection runs against a real `mongod --setParameter enableTestCommands=1`:
  `configureFailPoint` for the `failCommand` fail point (`mode` alwaysOn, off,
  {times: n}, {skip: n}; `data.failCommands`, `errorCode`, `errorLabels`,
  `closeConnection`, `blockConnection` + `blockTimeMS`, `writeConcernError`,
  `appName`), `waitForFailPoint`, `killSessions` (aborts the session's open
  transaction and frees the gate), and `setParameter` / `getParameter` for
  `transactionLifetimeLimitSeconds` (also `--setParameter NAME=VALUE`);
* a retried `commitTransaction` of a transaction that already committed
  answers ok, as MongoDB's does.

Known gaps that stay (tests that depend on them are skipped with the reason):
no WriteConflict / TransientTransactionError is ever raised on its own (a
fail point can inject one), a write error does
not abort the transaction, DateTime written with `$set` reads back as a string,
Int64 reads back as Int32, and a contended findAndModify upsert returns null
instead of E11000. What the stand-in cannot show at all: two transactions at
once (the gate runs one at a time, so no two ever conflict or interleave),
replication (majority is the one node: no secondary lags, no acknowledged
write is ever rolled back after an election), and a read at a point in time
other than the last commit. Reads outside transactions do not purge
TTL-expired documents (the package purges lazily when it reads on the write
connection; MongoDB's TTL monitor is lazy too). A read may see a
multi-document write command (an insert of many documents, an update with
`multi`) partly applied, as on MongoDB; each document's write is atomic.

test_standin.py, beside this file, pins the gate and the reads beside it
against a stand-in of its own; scripts/test.sh runs it before the Rust tests.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import fcntl
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict

from bson import Int64, ObjectId, Timestamp

from neosqlite import Connection
from nx_27017.handler import NeoSQLiteHandler
from nx_27017.server import run_server_threaded
from nx_27017.wire_protocol import _extract_session_id

logger = logging.getLogger("standin")

REPLICA_SET = "rs0"
DEFAULT_TRANSACTION_LIFETIME_SECONDS = 60

# Commands the failCommand fail point never applies to (they drive it).
NOT_FAILABLE = frozenset(
    {
        "hello", "Hello", "ismaster", "isMaster", "configureFailPoint",
        "waitForFailPoint", "killSessions", "setParameter", "getParameter",
        "endSessions",
    }
)

# Commands that never touch data and so never wait for the gate. The driver's
# monitors and connection handshakes must not block behind a transaction.
# (Reads outside a transaction do not wait either: see SNAPSHOT_READS.)
UNGATED = frozenset(
    {
        "hello", "Hello", "ismaster", "isMaster", "ping", "buildinfo", "buildInfo",
        "whatsmyuri", "endSessions", "startSession", "getMore", "killCursors",
        "serverStatus", "listDatabases", "getParameter", "saslStart",
        "saslContinue", "getLog", "hostInfo", "connectionStatus",
        "configureFailPoint", "waitForFailPoint", "killSessions", "setParameter",
    }
)

# Reads that, outside a transaction, are answered from the last committed
# state (a read-only connection) without waiting for the gate.
SNAPSHOT_READS = frozenset(
    {"find", "aggregate", "count", "distinct", "listCollections", "listIndexes"}
)

# Aggregation stages that keep an aggregate on the gated way: they write, or
# the package serves them from the write connection.
GATED_STAGES = frozenset({"$out", "$merge", "$changeStream", "$listSearchIndexes"})

# Stages whose output is empty on an empty input: an aggregate of only these
# over a collection that does not exist is answered with an empty cursor, as
# MongoDB does. Any other stage ($lookup, $unionWith, $facet, ...) takes the
# gated way there, as before.
EMPTY_ON_EMPTY_STAGES = frozenset(
    {
        "$match", "$group", "$sort", "$limit", "$skip", "$project", "$count",
        "$addFields", "$set", "$unset", "$unwind", "$replaceRoot",
        "$replaceWith", "$sortByCount", "$sample",
    }
)

# How many idle read-only connections are kept, over all databases.
IDLE_READERS = 16

# `--data-dir memory`: the databases are files in a directory of this name
# (on /dev/shm when it has room), removed when the stand-in is gone.
EPHEMERAL_PREFIX = "batch-outbox-standin-"
EPHEMERAL_LOCK = ".owner.lock"

# Error codes the driver acts on, chosen by the reply's message.
CODES_BY_MESSAGE = (
    ("duplicate key", 11000, "DuplicateKey"),
    ("unique constraint", 11000, "DuplicateKey"),
    ("not found", 26, "NamespaceNotFound"),
)


def _session_id(lsid: dict) -> str | None:
    """The session's id as hex. The package stores a UUID (binary subtype 4)
    and reads it back as plain bytes (subtype 0): both name one session."""
    value = lsid.get("id") if isinstance(lsid, dict) else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return _extract_session_id(lsid)


def _command_name(doc: dict) -> str:
    for key in doc:
        return key
    return ""


def _body(msg: dict) -> dict | None:
    for section_type, data in msg.get("sections", []):
        if section_type == "body" and isinstance(data, dict):
            return data
    return None


def _error_code(message: str) -> tuple[int, str]:
    lowered = message.lower()
    for needle, code, name in CODES_BY_MESSAGE:
        if needle in lowered:
            return code, name
    return 8, "UnknownError"


class TransactionGate:
    """One open transaction at a time; writes (and reads inside a
    transaction) wait while one is open. Reads outside a transaction do not
    come here: they are served from the last committed state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.lifetime_seconds = float(DEFAULT_TRANSACTION_LIFETIME_SECONDS)
        self._owner: tuple[str, int] | None = None
        self._owner_lsid: dict | None = None
        self._owner_seen = 0.0
        self._plain_active = 0
        self._txn_waiting = 0

    def enter_transaction(
        self, key: tuple[str, int], lsid: dict, abort, deadline: float | None = None
    ) -> bool:
        """False when `deadline` (monotonic) passed before the gate was free."""
        with self._cond:
            if self._owner == key:
                self._owner_seen = time.monotonic()
                return True
            if self._owner is not None and self._owner[0] == key[0] and self._owner[1] < key[1]:
                # A higher txnNumber on the same session aborts the open
                # transaction, as on MongoDB (a client that lost its
                # connection mid-transaction starts the next one).
                stale, stale_lsid = self._owner, self._owner_lsid
                self._owner, self._owner_lsid = None, None
                self._cond.notify_all()
                abort(stale_lsid, stale)
            self._txn_waiting += 1
            try:
                while self._owner is not None or self._plain_active:
                    self._expire_abandoned(abort)
                    if not self._wait(deadline, 1.0):
                        return False
            finally:
                self._txn_waiting -= 1
            self._owner, self._owner_lsid = key, lsid
            self._owner_seen = time.monotonic()
            return True

    def _wait(self, deadline: float | None, step: float) -> bool:
        if deadline is None:
            self._cond.wait(timeout=step)
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._cond.wait(timeout=min(step, left))
        return True

    def kill(self, session_id: str, abort) -> tuple[str, int] | None:
        """Aborts the transaction of `session_id` when it owns the gate, then
        frees the gate; returns the freed key.

        The abort runs before the gate is free: every session's transaction
        is a SAVEPOINT on the one SQLite connection, and rolling back an
        older savepoint also discards any opened after it, so a transaction
        let in before the abort would lose its own savepoint and run on
        outside it, half committed."""
        with self._cond:
            if self._owner is not None and self._owner[0] == session_id:
                key, lsid = self._owner, self._owner_lsid
                abort(lsid, key)
                self._owner, self._owner_lsid = None, None
                self._cond.notify_all()
                return key
            return None

    def touch(self, key: tuple[str, int]) -> None:
        with self._cond:
            if self._owner == key:
                self._owner_seen = time.monotonic()

    def leave_transaction(self, key: tuple[str, int]) -> None:
        with self._cond:
            if self._owner == key:
                self._owner, self._owner_lsid = None, None
                self._cond.notify_all()

    def enter_plain(self, abort, deadline: float | None = None) -> bool:
        """False when `deadline` (monotonic) passed before the gate was free."""
        with self._cond:
            while self._owner is not None or self._txn_waiting:
                self._expire_abandoned(abort)
                if self._owner is None and self._txn_waiting:
                    # Let the waiting transaction in first, then follow it.
                    if not self._wait(deadline, 0.05):
                        return False
                    if self._owner is None and not self._plain_active:
                        break
                    continue
                if not self._wait(deadline, 1.0):
                    return False
            self._plain_active += 1
            return True

    def leave_plain(self) -> None:
        with self._cond:
            self._plain_active -= 1
            self._cond.notify_all()

    def _expire_abandoned(self, abort) -> None:
        """Abort a transaction idle past the lifetime limit (holds the lock)."""
        if self._owner is None:
            return
        if time.monotonic() - self._owner_seen < self.lifetime_seconds:
            return
        logger.warning("aborting abandoned transaction %s", self._owner)
        key, lsid = self._owner, self._owner_lsid
        self._owner, self._owner_lsid = None, None
        self._cond.notify_all()
        if lsid is not None:
            abort(lsid, key)

class CloseConnection(BaseException):
    """Raised through the package's server loop to drop the connection
    without a reply (BaseException, so its `except Exception` lets it pass)."""


def _ignore_close(args) -> None:
    if not issubclass(args.exc_type, CloseConnection):
        threading.__excepthook__(args)


class FailCommand:
    """MongoDB's `failCommand` fail point, configured with its own syntax."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._mode: object = "off"
        self._data: dict = {}
        self._times_entered = 0

    def configure(self, body: dict) -> dict:
        mode = body.get("mode", "off")
        data = body.get("data", {}) or {}
        if not (mode in ("alwaysOn", "off") or (isinstance(mode, dict) and (
                "times" in mode or "skip" in mode))):
            return {"ok": 0, "code": 2, "codeName": "BadValue",
                    "errmsg": f"unsupported fail point mode {mode!r}"}
        if mode != "off" and not isinstance(data.get("failCommands"), list):
            return {"ok": 0, "code": 2, "codeName": "BadValue",
                    "errmsg": "failCommand needs data.failCommands"}
        with self._cond:
            count = self._times_entered
            self._mode = dict(mode) if isinstance(mode, dict) else mode
            self._data = dict(data)
        return {"count": count, "ok": 1.0}

    def wait(self, times_entered: int, max_time_ms: int | None) -> dict:
        deadline = None if max_time_ms is None else time.monotonic() + max_time_ms / 1000
        with self._cond:
            while self._times_entered < times_entered:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return {"ok": 0, "code": 50, "codeName": "MaxTimeMSExpired",
                            "errmsg": "waitForFailPoint timed out"}
                self._cond.wait(timeout=1.0 if left is None else min(1.0, left))
        return {"ok": 1.0}

    def take(self, command: str, app_name: str | None) -> dict | None:
        """The fail point's data when it fires for this command, else None."""
        with self._cond:
            mode, data = self._mode, self._data
            if mode == "off" or command not in data.get("failCommands", ()):
                return None
            wanted_app = data.get("appName")
            if wanted_app is not None and wanted_app != app_name:
                return None
            if isinstance(mode, dict) and "skip" in mode:
                if mode["skip"] > 0:
                    mode["skip"] -= 1
                    return None
            elif isinstance(mode, dict) and "times" in mode:
                if mode["times"] <= 0:
                    self._mode = "off"
                    return None
                mode["times"] -= 1
                if mode["times"] == 0:
                    self._mode = "off"
            self._times_entered += 1
            self._cond.notify_all()
            return data


def _failure(data: dict) -> dict:
    reply = {
        "ok": 0.0,
        "code": int(data["errorCode"]),
        "codeName": CODE_NAMES.get(int(data["errorCode"]), "FailPointError"),
        "errmsg": "Failing command via 'failCommand' failpoint",
    }
    if "errorLabels" in data:
        reply["errorLabels"] = list(data["errorLabels"])
    return reply


CODE_NAMES = {
    50: "MaxTimeMSExpired", 64: "WriteConcernFailed", 91: "ShutdownInProgress",
    112: "WriteConflict", 189: "PrimarySteppedDown", 251: "NoSuchTransaction",
    10107: "NotWritablePrimary", 11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange", 13435: "NotPrimaryNoSecondaryOk",
}


class ReadConnection(Connection):
    """A read-only connection to one database's file (SQLite in WAL mode).

    Outside an explicit transaction, WAL gives each read the state of the
    last commit, whatever the write connection has open. The package's
    connection setup writes (auto_vacuum, journal_mode: both already set in
    the file by the write connection), so it is skipped here; and reads do
    not purge TTL-expired documents, which a read-only connection cannot
    delete (MongoDB's TTL monitor is lazy too: it runs once a minute)."""

    def _configure_connection(self) -> None:
        self.db.isolation_level = None
        self._register_custom_functions()

    def _check_and_migrate_autovacuum(self, *args, **kwargs) -> None:
        pass

    def __getitem__(self, name: str):
        collection = super().__getitem__(name)
        collection._auto_purge_ttl = _no_purge
        return collection


def _no_purge() -> None:
    pass


class SnapshotReaders:
    """Read-only connections, one per command being served, per database.

    A connection is lent to one thread for one command and then kept idle
    for the next (at most IDLE_READERS idle over all databases, least
    recently used closed first). Dropping a database waits for its lent
    connections, closes its idle ones and lends none meanwhile, so no
    reader outlives the file it reads."""

    def __init__(self, idle_limit: int = IDLE_READERS) -> None:
        self._cond = threading.Condition()
        self._idle_limit = idle_limit
        self._idle: OrderedDict[str, list[ReadConnection]] = OrderedDict()
        self._lent: dict[str, int] = {}
        self._dropping: set[str] = set()

    def borrow(self, db_name: str, open_database) -> ReadConnection:
        """A read connection to `db_name`. `open_database()` opens the
        database's write connection (creating its file) and returns the
        file's path; it runs while no drop of the database can (a drop
        waits for the connections lent, and none is lent while it runs)."""
        with self._cond:
            while db_name in self._dropping:
                self._cond.wait()
            self._lent[db_name] = self._lent.get(db_name, 0) + 1
            idle = self._idle.get(db_name)
            conn = idle.pop() if idle else None
        try:
            path = open_database()
            if conn is None:
                uri = f"file:{urllib.parse.quote(path)}?mode=ro"
                conn = ReadConnection(uri, uri=True, check_same_thread=False, timeout=5.0)
            return conn
        except BaseException:
            if conn is not None:
                _close_quietly(conn)
            self._returned(db_name)
            raise

    def give_back(self, db_name: str, conn: ReadConnection, reusable: bool) -> None:
        surplus: list[ReadConnection] = []
        with self._cond:
            if reusable and db_name not in self._dropping and not conn.db.in_transaction:
                self._idle.setdefault(db_name, []).append(conn)
                self._idle.move_to_end(db_name)
                total = sum(len(conns) for conns in self._idle.values())
                while total > self._idle_limit:
                    oldest = next(iter(self._idle))
                    surplus.append(self._idle[oldest].pop(0))
                    if not self._idle[oldest]:
                        del self._idle[oldest]
                    total -= 1
            else:
                surplus.append(conn)
        for idle in surplus:
            _close_quietly(idle)
        self._returned(db_name)

    def _returned(self, db_name: str) -> None:
        with self._cond:
            self._lent[db_name] -= 1
            if not self._lent[db_name]:
                del self._lent[db_name]
            self._cond.notify_all()

    @contextlib.contextmanager
    def dropping(self, db_name: str):
        """Closes the database's readers and lends none until the drop is done."""
        with self._cond:
            while db_name in self._dropping:
                self._cond.wait()
            self._dropping.add(db_name)
            while self._lent.get(db_name):
                self._cond.wait()
            idle = self._idle.pop(db_name, [])
        try:
            for conn in idle:
                _close_quietly(conn)
            yield
        finally:
            with self._cond:
                self._dropping.discard(db_name)
                self._cond.notify_all()

    def close_all(self) -> None:
        with self._cond:
            idle = [conn for conns in self._idle.values() for conn in conns]
            self._idle.clear()
        for conn in idle:
            _close_quietly(conn)


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:
        logger.debug("closing a read connection failed", exc_info=True)


class NotFromSnapshot(Exception):
    """A snapshot read asked for something only the gated way serves."""


class ReplicaSetHandler(NeoSQLiteHandler):
    """The package's handler, presented as a replica-set primary and repaired."""

    def __init__(self, *args, me: str, ephemeral: bool = False, **kwargs) -> None:
        # Set first: the package's constructor may open databases.
        self._ephemeral = ephemeral
        self._readers = SnapshotReaders()
        # The read connection lent to this thread's command, if any.
        self._lent = threading.local()
        super().__init__(*args, **kwargs)
        # One file per database is what a read-only connection can open.
        self._snapshot_reads = self._mode == "files"
        self._me = me
        self._election_id = ObjectId()
        self._gate = TransactionGate()
        self._fail = FailCommand()
        self._state_lock = threading.Lock()
        # Connection id -> the client's appName from its handshake.
        self._app_names: dict[str, str] = {}
        # Transactions killed by killSessions, and the last committed
        # transaction of each session (for commit retries); both bounded.
        self._killed: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._committed: OrderedDict[str, int] = OrderedDict()

    def set_lifetime(self, seconds: float) -> None:
        self._gate.lifetime_seconds = float(seconds)

    # -- entry points -------------------------------------------------------

    def handle_command(self, msg):
        return self._dispatch(msg, super().handle_command)

    def handle_insert(self, msg):
        return self._dispatch(msg, super().handle_insert)

    def _dispatch(self, msg, run):
        body = _body(msg)
        if body is None:
            return run(msg)
        name = _command_name(body)
        conn_id = msg.get("_conn_id")
        if name in ("hello", "Hello", "ismaster", "isMaster"):
            app = (body.get("client") or {}).get("application") or {}
            if conn_id is not None and isinstance(app.get("name"), str):
                with self._state_lock:
                    self._app_names[conn_id] = app["name"]
            return msg["request_id"], self._hello()
        admin = self._admin_command(name, body)
        if admin is not None:
            return msg["request_id"], admin

        write_concern_error = None
        if name not in NOT_FAILABLE:
            with self._state_lock:
                app_name = self._app_names.get(conn_id)
            fail = self._fail.take(name, app_name)
            if fail is not None:
                if fail.get("blockConnection"):
                    time.sleep(int(fail.get("blockTimeMS", 0)) / 1000)
                if fail.get("closeConnection"):
                    raise CloseConnection()
                if "errorCode" in fail:
                    return msg["request_id"], _failure(fail)
                write_concern_error = fail.get("writeConcernError")

        request_id, reply = self._dispatch_gated(msg, run, body, name)
        if write_concern_error is not None and reply.get("ok") == 1:
            reply["writeConcernError"] = dict(write_concern_error)
        return request_id, reply

    def _dispatch_gated(self, msg, run, body, name):
        max_time_ms = body.get("maxTimeMS")
        deadline = (
            time.monotonic() + int(max_time_ms) / 1000 if max_time_ms else None
        )
        lsid = body.get("lsid")
        in_txn = body.get("autocommit") is False and lsid is not None
        if in_txn:
            key = (_session_id(lsid), int(body.get("txnNumber", 0)))
            with self._state_lock:
                killed = key in self._killed
                committed = self._committed.get(key[0]) == key[1]
            if killed and name != "abortTransaction":
                return msg["request_id"], {
                    "ok": 0.0, "code": 251, "codeName": "NoSuchTransaction",
                    "errmsg": "transaction was aborted by killSessions",
                    "errorLabels": ["TransientTransactionError"],
                }
            if killed or (committed and name == "commitTransaction"):
                return msg["request_id"], {"ok": 1.0}
            if not self._gate.enter_transaction(key, lsid, self._end_transaction, deadline):
                return msg["request_id"], _max_time_expired()
            finishing = name in ("commitTransaction", "abortTransaction")
            try:
                if body.get("startTransaction"):
                    self._open_transaction(body)
                request_id, reply = self._run(msg, run)
                if name == "commitTransaction" and reply.get("ok") == 1:
                    with self._state_lock:
                        self._committed[key[0]] = key[1]
                        self._committed.move_to_end(key[0])
                        while len(self._committed) > 10_000:
                            self._committed.popitem(last=False)
                if name == "commitTransaction" and reply.get("ok") != 1:
                    self._abort_session(lsid)
                if name == "abortTransaction" and reply.get("ok") != 1:
                    # Nothing was open (e.g. the first command failed): aborting
                    # nothing succeeds on MongoDB too.
                    reply = {"ok": 1}
                return request_id, reply
            finally:
                if finishing:
                    self._gate.leave_transaction(key)
                else:
                    self._gate.touch(key)

        if name in UNGATED:
            return self._run(msg, run)
        if self._snapshot_reads and _snapshot_read(name, body):
            served = self._read_snapshot(msg, body, name)
            if served is not None:
                return served[0], _repair(served[1])
        if not self._gate.enter_plain(self._end_transaction, deadline):
            return msg["request_id"], _max_time_expired()
        try:
            return self._run(msg, run)
        finally:
            self._gate.leave_plain()

    def _run(self, msg, run):
        try:
            request_id, reply = run(msg)
        except Exception as exc:  # the package lets some errors escape
            logger.exception("command failed")
            request_id, reply = msg.get("request_id", 0), {"ok": 0, "errmsg": str(exc)}
        return request_id, _repair(reply)

    # -- reads from the last committed state --------------------------------

    def _read_snapshot(self, msg, body: dict, name: str):
        """Serves a read outside a transaction on a read-only connection,
        which sees the last committed state and never waits for the gate:
        as on MongoDB, an open transaction neither blocks it nor shows it
        its uncommitted writes. None when the read must take the gated way
        (it would create a collection, touch GridFS, ...): as before."""
        db_name = body.get("$db", "test")

        def open_database() -> str:
            # Opens (creates) the database's file, as the gated way would.
            NeoSQLiteHandler.get_database(self, db_name)
            return self._db_file(db_name)

        try:
            reader = self._readers.borrow(db_name, open_database)
        except Exception:
            logger.debug("no snapshot read for %s on %r", name, db_name, exc_info=True)
            return None
        reusable = False
        try:
            # One read transaction: the whole command sees one commit.
            reader.db.execute("BEGIN")
            try:
                served = self._snapshot_command(reader, msg, body, name, db_name)
            finally:
                if reader.db.in_transaction:
                    reader.db.execute("COMMIT")
            reusable = True
        except Exception:
            logger.debug("snapshot read of %s failed; taking the gated way", name, exc_info=True)
            return None
        finally:
            self._readers.give_back(db_name, reader, reusable)
        if served is None:
            logger.debug("%s on %r takes the gated way", name, db_name)
        return served

    def _snapshot_command(self, reader: ReadConnection, msg, body: dict, name: str, db_name: str):
        coll_name = body.get(name)
        if name != "listCollections":
            if not isinstance(coll_name, str) or self._is_gridfs_collection(coll_name):
                return None
            exists = reader.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                (coll_name,),
            ).fetchone()
            if exists is None:
                # The package would create the collection (find does not).
                if name == "count":
                    return msg["request_id"], {"n": 0, "ok": 1.0}
                if name == "distinct":
                    return msg["request_id"], {"values": [], "ok": 1.0}
                if name == "aggregate" and all(
                    key in EMPTY_ON_EMPTY_STAGES
                    for stage in body.get("pipeline") or []
                    for key in stage
                ):
                    return msg["request_id"], {
                        "cursor": {"id": 0, "ns": f"{db_name}.{coll_name}", "firstBatch": []},
                        "ok": 1.0,
                    }
                if name != "find":
                    return None
        # Without the session: it is not needed outside a transaction, and
        # the package would bind a new session to the read connection.
        read = dict(msg)
        read["sections"] = [
            (kind, {k: v for k, v in data.items() if k != "lsid"})
            if kind == "body" and isinstance(data, dict)
            else (kind, data)
            for kind, data in msg["sections"]
        ]
        self._lent.reader = (db_name, reader)
        self._lent.refused = False
        try:
            # The package's handler without its per-database lock: the read
            # connection is this thread's alone.
            request_id, reply = NeoSQLiteHandler.handle_command.__wrapped__(self, read)
        finally:
            self._lent.reader = None
        if self._lent.refused:
            return None
        if isinstance(reply, dict) and reply.get("ok") in (0, 0.0, False):
            message = str(reply.get("errmsg", "")).lower()
            if "readonly" in message or "no such table" in message:
                return None
        return request_id, reply

    def get_database(self, db_name: str):
        lent = getattr(self._lent, "reader", None)
        if lent is not None:
            if lent[0] == db_name:
                return lent[1]
            self._lent.refused = True
            raise NotFromSnapshot(f"a snapshot read of {lent[0]!r} asked for {db_name!r}")
        return super().get_database(db_name)

    def _evict_lru_locked(self) -> None:
        # `--data-dir memory` keeps every database open, as the package's
        # memory mode does (its LRU eviction can close a connection another
        # thread is using).
        if not self._ephemeral:
            super()._evict_lru_locked()

    def _drop_file_db(self, db_name: str) -> None:
        with self._readers.dropping(db_name):
            super()._drop_file_db(db_name)

    def close_all(self) -> None:
        self._readers.close_all()
        super().close_all()

    # -- MongoDB's test and administration commands -------------------------

    def _admin_command(self, name: str, body: dict) -> dict | None:
        """Answers the commands this launcher implements itself, else None."""
        if name == "configureFailPoint":
            if body["configureFailPoint"] != "failCommand":
                return {"ok": 0, "code": 2, "codeName": "BadValue",
                        "errmsg": "only the failCommand fail point exists here"}
            return self._fail.configure(body)
        if name == "waitForFailPoint":
            return self._fail.wait(int(body.get("timesEntered", 1)), body.get("maxTimeMS"))
        if name == "killSessions":
            for lsid in body.get("killSessions") or []:
                self._kill_session(lsid)
            return {"ok": 1.0}
        if name == "setParameter" and "transactionLifetimeLimitSeconds" in body:
            was = self._gate.lifetime_seconds
            value = body["transactionLifetimeLimitSeconds"]
            if not isinstance(value, (int, float)) or value < 1:
                return {"ok": 0, "code": 2, "codeName": "BadValue",
                        "errmsg": "transactionLifetimeLimitSeconds must be >= 1"}
            self.set_lifetime(value)
            return {"was": int(was), "ok": 1.0}
        if name == "getParameter" and "transactionLifetimeLimitSeconds" in body:
            return {
                "transactionLifetimeLimitSeconds": int(self._gate.lifetime_seconds),
                "ok": 1.0,
            }
        return None

    def _kill_session(self, lsid: dict) -> None:
        """Aborts the session's open transaction, as MongoDB's killSessions."""
        session_id = _session_id(lsid)
        freed = self._gate.kill(
            session_id, lambda owner, key: self._end_transaction(owner or lsid, key)
        )
        if freed is not None:
            logger.warning("killSessions: aborted the transaction of %s", freed)
        else:
            self._abort_session(lsid)

    def _end_transaction(self, lsid: dict, key: tuple[str, int]) -> None:
        """Aborts a transaction the gate let go of (killed, reaped or
        superseded); later commands of it fail with NoSuchTransaction."""
        with self._state_lock:
            self._killed[key] = None
            while len(self._killed) > 10_000:
                self._killed.popitem(last=False)
        self._abort_session(lsid)

    # -- transactions -------------------------------------------------------

    def _open_transaction(self, body: dict) -> None:
        """Open the session's transaction whatever the first command is."""
        db_name = body.get("$db", "test")
        db = self.get_database(db_name)
        with self._lock_for(db_name):
            session = self._find_session(_session_id(body["lsid"]), db_name)
            if session is not None and session.in_transaction:
                # A leftover from a transaction the client gave up on.
                session.abort_transaction()
            self._get_or_create_session(body, db, db_name)

    def _abort_session(self, lsid: dict) -> None:
        session_id = _session_id(lsid)
        with self._sessions_lock:
            open_sessions = [
                (scope, sess)
                for (sid, scope), sess in self._sessions.items()
                if sid == session_id and sess.in_transaction
            ]
        for scope, session in open_sessions:
            try:
                with self._lock_for(scope or "admin"):
                    session.abort_transaction()
            except Exception:
                logger.exception("abort failed; clearing the session state")
            if getattr(session, "in_transaction", False):
                session._in_transaction = False

    # -- replies ------------------------------------------------------------

    def _hello(self) -> dict:
        now = dt.datetime.now(dt.timezone.utc)
        reply = {
            "ismaster": True,
            "isWritablePrimary": True,
            "secondary": False,
            "setName": REPLICA_SET,
            "setVersion": 1,
            "hosts": [self._me],
            "primary": self._me,
            "me": self._me,
            "electionId": self._election_id,
            "lastWrite": {
                "opTime": {"ts": Timestamp(int(now.timestamp()), 1), "t": Int64(1)},
                "lastWriteDate": now,
            },
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": now,
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "readOnly": False,
            "ok": 1.0,
        }
        return reply


def _snapshot_read(name: str, body: dict) -> bool:
    """Whether a command (outside a transaction) only reads, so that the
    last committed state can answer it."""
    if name not in SNAPSHOT_READS:
        return False
    if name == "aggregate":
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, list):
            return False
        for stage in pipeline:
            if not isinstance(stage, dict) or any(key in GATED_STAGES for key in stage):
                return False
    return True


def _max_time_expired() -> dict:
    return {
        "ok": 0.0,
        "code": 50,
        "codeName": "MaxTimeMSExpired",
        "errmsg": "operation exceeded time limit (waiting for a transaction)",
    }


def _repair(reply: dict) -> dict:
    if not isinstance(reply, dict):
        return reply
    if reply.get("ok") in (0, 0.0, False) and "code" not in reply:
        code, name = _error_code(str(reply.get("errmsg", "")))
        reply["code"] = code
        reply.setdefault("codeName", name)
    for error in reply.get("writeErrors", []) or []:
        if isinstance(error, dict):
            if not isinstance(error.get("code"), int):
                error["code"] = _error_code(str(error.get("errmsg", "")))[0]
            error.setdefault("errmsg", "write error")
    cursor = reply.get("cursor")
    if isinstance(cursor, dict):
        if "id" in cursor:
            cursor["id"] = Int64(int(cursor["id"] or 0))
        for batch in ("firstBatch", "nextBatch"):
            for event in cursor.get(batch, []) or []:
                if isinstance(event, dict) and "clusterTime" in event and not isinstance(
                    event["clusterTime"], Timestamp
                ):
                    value = event["clusterTime"]
                    seconds = int(value.timestamp()) if hasattr(value, "timestamp") else int(time.time())
                    event["clusterTime"] = Timestamp(seconds, 1)
    return reply


def _ephemeral_data_dir() -> str:
    """The directory of `--data-dir memory`: on /dev/shm when it has room,
    else in the temporary directory, removed when this process is gone,
    however it ends (tests stop their stand-ins with SIGKILL)."""
    base = tempfile.gettempdir()
    try:
        shm = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK) and shm.f_bavail * shm.f_frsize >= 1 << 30:
            base = "/dev/shm"
    except OSError:
        pass
    _remove_abandoned(base)
    path = tempfile.mkdtemp(prefix=f"{EPHEMERAL_PREFIX}{os.getpid()}-", dir=base)
    # Held for this process's life; the lock file appears only once held.
    lock = os.open(os.path.join(path, EPHEMERAL_LOCK + ".new"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.rename(os.path.join(path, EPHEMERAL_LOCK + ".new"), os.path.join(path, EPHEMERAL_LOCK))
    _remove_when_gone(path, lock)
    atexit.register(shutil.rmtree, path, True)
    return path


def _remove_abandoned(base: str) -> None:
    """Removes directories of earlier stand-ins whose process and cleaner
    are both gone (nobody holds their lock)."""
    try:
        entries = os.listdir(base)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(EPHEMERAL_PREFIX):
            continue
        path = os.path.join(base, entry)
        try:
            lock = os.open(os.path.join(path, EPHEMERAL_LOCK), os.O_RDWR)
        except FileNotFoundError:
            # Died between mkdtemp and its lock, or still starting.
            with contextlib.suppress(OSError):
                if time.time() - os.stat(path).st_mtime > 3600:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # alive
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(lock)


def _remove_when_gone(path: str, lock: int) -> None:
    """Forks a cleaner that removes `path` when this process is gone: it
    waits on a pipe whose only write end this process holds. It leaves the
    process group, so signals to the group do not stop it first."""
    read_end, write_end = os.pipe()
    if os.fork() != 0:
        os.close(read_end)
        return
    try:
        os.setsid()
        os.close(write_end)
        os.close(lock)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        keep = sorted({0, 1, 2, read_end})
        for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        while os.read(read_end, 1):
            pass
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os._exit(0)


def _raise_open_files_limit() -> None:
    """Three descriptors a database (file, WAL, shared memory) and more per
    read connection: the soft limit up to the hard one (at most 65536)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=27017)
    parser.add_argument(
        "--data-dir",
        default="memory",
        help="directory for one SQLite file per database, or 'memory' (files in a"
        " temporary directory, on /dev/shm when it has room, removed at exit)",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--setParameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="as mongod's; only transactionLifetimeLimitSeconds is known",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.excepthook = _ignore_close
    data_dir = args.data_dir
    # Reads outside transactions need files (a read-only connection beside
    # the write one), so 'memory' is a temporary directory.
    ephemeral = data_dir.strip() in ("memory", ":memory:")
    if ephemeral:
        data_dir = _ephemeral_data_dir()
    _raise_open_files_limit()
    handler = ReplicaSetHandler(
        ":memory:", data_dir=data_dir, me=f"{args.host}:{args.port}", ephemeral=ephemeral
    )
    for setting in args.setParameter:
        name, _, value = setting.partition("=")
        if name != "transactionLifetimeLimitSeconds" or not value.isdigit():
            parser.error(f"unsupported --setParameter {setting!r}")
        handler.set_lifetime(int(value))
    print(f"stand-in replica set {REPLICA_SET} on {args.host}:{args.port}", flush=True)
    run_server_threaded(args.host, args.port, handler, use_threading=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
