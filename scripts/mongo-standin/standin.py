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
  open, other sessions' data commands wait. SQLite has one connection per
  database here and nested SAVEPOINTs of two sessions would commit each
  other's writes. A transaction idle for longer than 60 s is aborted, as
  MongoDB's `transactionLifetimeLimitSeconds` does.

Known gaps that stay (tests that depend on them are skipped with the reason):
no WriteConflict / TransientTransactionError is ever raised, a write error does
not abort the transaction, DateTime written with `$set` reads back as a string,
Int64 reads back as Int32, and a contended findAndModify upsert returns null
instead of E11000.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import threading
import time

from bson import Int64, ObjectId, Timestamp

from nx_27017.handler import NeoSQLiteHandler
from nx_27017.server import run_server_threaded
from nx_27017.wire_protocol import _extract_session_id

logger = logging.getLogger("standin")

REPLICA_SET = "rs0"
TRANSACTION_LIFETIME_SECONDS = 60.0

# Commands that never touch data and so never wait for the gate. The driver's
# monitors and connection handshakes must not block behind a transaction.
UNGATED = frozenset(
    {
        "hello", "Hello", "ismaster", "isMaster", "ping", "buildinfo", "buildInfo",
        "whatsmyuri", "endSessions", "startSession", "getMore", "killCursors",
        "serverStatus", "listDatabases", "getParameter", "saslStart",
        "saslContinue", "getLog", "hostInfo", "connectionStatus",
    }
)

# Error codes the driver acts on, chosen by the reply's message.
CODES_BY_MESSAGE = (
    ("duplicate key", 11000, "DuplicateKey"),
    ("unique constraint", 11000, "DuplicateKey"),
    ("not found", 26, "NamespaceNotFound"),
)


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
    """One open transaction at a time; plain data commands wait while one is open."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: tuple[str, int] | None = None
        self._owner_lsid: dict | None = None
        self._owner_seen = 0.0
        self._plain_active = 0
        self._txn_waiting = 0

    def enter_transaction(self, key: tuple[str, int], lsid: dict, abort) -> None:
        with self._cond:
            if self._owner == key:
                self._owner_seen = time.monotonic()
                return
            self._txn_waiting += 1
            try:
                while self._owner is not None or self._plain_active:
                    self._expire_abandoned(abort)
                    self._cond.wait(timeout=1.0)
            finally:
                self._txn_waiting -= 1
            self._owner, self._owner_lsid = key, lsid
            self._owner_seen = time.monotonic()

    def touch(self, key: tuple[str, int]) -> None:
        with self._cond:
            if self._owner == key:
                self._owner_seen = time.monotonic()

    def leave_transaction(self, key: tuple[str, int]) -> None:
        with self._cond:
            if self._owner == key:
                self._owner, self._owner_lsid = None, None
                self._cond.notify_all()

    def enter_plain(self, abort) -> None:
        with self._cond:
            while self._owner is not None or self._txn_waiting:
                self._expire_abandoned(abort)
                if self._owner is None and self._txn_waiting:
                    # Let the waiting transaction in first, then follow it.
                    self._cond.wait(timeout=0.05)
                    if self._owner is None and not self._plain_active:
                        break
                    continue
                self._cond.wait(timeout=1.0)
            self._plain_active += 1

    def leave_plain(self) -> None:
        with self._cond:
            self._plain_active -= 1
            self._cond.notify_all()

    def _expire_abandoned(self, abort) -> None:
        """Abort a transaction idle past the lifetime limit (holds the lock)."""
        if self._owner is None:
            return
        if time.monotonic() - self._owner_seen < TRANSACTION_LIFETIME_SECONDS:
            return
        logger.warning("aborting abandoned transaction %s", self._owner)
        lsid = self._owner_lsid
        self._owner, self._owner_lsid = None, None
        self._cond.notify_all()
        if lsid is not None:
            abort(lsid)


class ReplicaSetHandler(NeoSQLiteHandler):
    """The package's handler, presented as a replica-set primary and repaired."""

    def __init__(self, *args, me: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._me = me
        self._election_id = ObjectId()
        self._gate = TransactionGate()

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
        if name in ("hello", "Hello", "ismaster", "isMaster"):
            return msg["request_id"], self._hello()

        lsid = body.get("lsid")
        in_txn = body.get("autocommit") is False and lsid is not None
        if in_txn:
            key = (_extract_session_id(lsid), int(body.get("txnNumber", 0)))
            self._gate.enter_transaction(key, lsid, self._abort_session)
            finishing = name in ("commitTransaction", "abortTransaction")
            try:
                if body.get("startTransaction"):
                    self._open_transaction(body)
                request_id, reply = self._run(msg, run)
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
        self._gate.enter_plain(self._abort_session)
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

    # -- transactions -------------------------------------------------------

    def _open_transaction(self, body: dict) -> None:
        """Open the session's transaction whatever the first command is."""
        db_name = body.get("$db", "test")
        db = self.get_database(db_name)
        with self._lock_for(db_name):
            session = self._find_session(_extract_session_id(body["lsid"]), db_name)
            if session is not None and session.in_transaction:
                # A leftover from a transaction the client gave up on.
                session.abort_transaction()
            self._get_or_create_session(body, db, db_name)

    def _abort_session(self, lsid: dict) -> None:
        session_id = _extract_session_id(lsid)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=27017)
    parser.add_argument(
        "--data-dir",
        default="memory",
        help="directory for one SQLite file per database, or 'memory'",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    handler = ReplicaSetHandler(
        ":memory:", data_dir=args.data_dir, me=f"{args.host}:{args.port}"
    )
    print(f"stand-in replica set {REPLICA_SET} on {args.host}:{args.port}", flush=True)
    run_server_threaded(args.host, args.port, handler, use_threading=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
