"""Tests of the stand-in launcher (standin.py) against a stand-in of its own.

Run with the stand-in's venv (it has pymongo):

    python scripts/mongo-standin/test_standin.py [-v] [unittest arguments]

scripts/test.sh runs it before the Rust tests when MongoDB is the stand-in.
What it pins: a read outside a transaction is answered at once from the last
committed state while another session's transaction is open (it never sees
that transaction's writes until the commit, and never after an abort), for
every read concern; a read inside a transaction and every write still wait
for the gate; fail points, killSessions, the transaction lifetime and the
temporary data directory keep working. Every read has `maxTimeMS` and every
client socket a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from pymongo import MongoClient
from pymongo.errors import ExecutionTimeout, OperationFailure
from pymongo.read_concern import ReadConcern

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, "standin.py")

# A read the gate does not hold answers well within this.
PROMPT = 1.0
# The time limit every read carries: a read that waits for the gate fails
# after it (MaxTimeMSExpired) instead of hanging.
READ_MS = 3000
# How long a command that should wait for the gate is given.
GATED_MS = 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StandIn:
    """A stand-in process on a free port, stopped with SIGKILL (as the Rust
    tests stop theirs) unless told otherwise."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="standin-test-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, LAUNCHER, "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"mongodb://127.0.0.1:{self.port}/?replicaSet=rs0"
        deadline = time.monotonic() + 30
        while True:
            try:
                with MongoClient(self.url, serverSelectionTimeoutMS=300) as probe:
                    probe.admin.command("ping")
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.output()
                    self.stop()
                    raise RuntimeError(f"the stand-in did not start:\n{output}")
                time.sleep(0.1)

    def client(self, app: str) -> MongoClient:
        return MongoClient(
            self.url,
            appname=app,
            serverSelectionTimeoutMS=5000,
            connectTimeoutMS=5000,
            socketTimeoutMS=15000,
        )

    def data_dirs(self) -> list[str]:
        pattern = f"batch-outbox-standin-{self.process.pid}-*"
        return glob.glob(os.path.join("/dev/shm", pattern)) + glob.glob(
            os.path.join(tempfile.gettempdir(), pattern)
        )

    def output(self) -> str:
        with open(self.log.name, errors="replace") as log:
            return log.read()[-4000:]

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stops it (again: a no-op)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)


STANDIN: StandIn | None = None


def setUpModule() -> None:
    global STANDIN
    STANDIN = StandIn("--setParameter", "transactionLifetimeLimitSeconds=60")


def tearDownModule() -> None:
    if STANDIN is not None:
        STANDIN.stop()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


class Base(unittest.TestCase):
    def setUp(self) -> None:
        assert STANDIN is not None
        self.a = STANDIN.client("session-a")
        self.b = STANDIN.client("session-b")
        self.admin = STANDIN.client("admin").admin
        self.db_name = f"t_{self.id().rsplit('.', 1)[-1]}"[:60]
        self.a.drop_database(self.db_name)
        self.coll_a = self.a[self.db_name].c
        self.coll_b = self.b[self.db_name].c
        self.coll_a.insert_many([{"_id": 0, "v": "base", "n": 1}, {"_id": 1, "v": "other", "n": 2}])
        self.sessions = []

    def tearDown(self) -> None:
        self.admin.command("configureFailPoint", "failCommand", mode="off")
        for session in self.sessions:
            if session.in_transaction:
                session.abort_transaction()
            session.end_session()
        for client in (self.a, self.b, self.admin.client):
            client.close()

    def open_transaction(self):
        """A session of A with an open transaction that inserted {_id: 2}
        and changed {_id: 0}, not committed."""
        session = self.a.start_session()
        self.sessions.append(session)
        session.start_transaction()
        self.coll_a.insert_one({"_id": 2, "v": "uncommitted", "n": 4}, session=session)
        self.coll_a.update_one({"_id": 0}, {"$set": {"v": "changed"}}, session=session)
        return session

    def committed_view(self, coll) -> dict:
        """Every read kind of B, each prompt; returns what they saw."""
        seen = {}
        checks = {
            "find": lambda: sorted(
                (d["_id"], d["v"]) for d in coll.find({}, max_time_ms=READ_MS)
            ),
            "find_one": lambda: coll.find_one({"_id": 0}, max_time_ms=READ_MS)["v"],
            "count_documents": lambda: coll.count_documents({}, maxTimeMS=READ_MS),
            "estimated_document_count": lambda: coll.estimated_document_count(maxTimeMS=READ_MS),
            "aggregate": lambda: list(
                coll.aggregate(
                    [{"$group": {"_id": None, "total": {"$sum": "$n"}}}], maxTimeMS=READ_MS
                )
            )[0]["total"],
            "distinct": lambda: sorted(coll.distinct("v", maxTimeMS=READ_MS)),
            "list_collections": lambda: sorted(
                coll.database.list_collection_names(maxTimeMS=READ_MS)
            ),
            "list_indexes": lambda: sorted(
                i["name"]
                for i in coll.database.command("listIndexes", coll.name, maxTimeMS=READ_MS)[
                    "cursor"
                ]["firstBatch"]
            ),
        }
        for name, check in checks.items():
            value, took = timed(check)
            self.assertLess(took, PROMPT, f"{name} waited {took:.2f}s")
            seen[name] = value
        return seen

    BEFORE = {
        "find": [(0, "base"), (1, "other")],
        "find_one": "base",
        "count_documents": 2,
        "estimated_document_count": 2,
        "aggregate": 3,
        "distinct": ["base", "other"],
        "list_collections": ["c"],
        "list_indexes": ["_id_"],
    }
    AFTER = {
        "find": [(0, "changed"), (1, "other"), (2, "uncommitted")],
        "find_one": "changed",
        "count_documents": 3,
        "estimated_document_count": 3,
        "aggregate": 7,
        "distinct": ["changed", "other", "uncommitted"],
        "list_collections": ["c"],
        "list_indexes": ["_id_"],
    }


class ReadsOutsideTransactions(Base):
    def test_a_read_does_not_wait_for_an_open_transaction_nor_see_it(self) -> None:
        session = self.open_transaction()
        self.assertEqual(self.committed_view(self.coll_b), self.BEFORE)
        # The transaction sees its own writes meanwhile.
        self.assertEqual(self.coll_a.count_documents({}, session=session), 3)
        session.commit_transaction()
        self.assertEqual(self.committed_view(self.coll_b), self.AFTER)

    def test_an_aborted_transaction_is_never_seen(self) -> None:
        session = self.open_transaction()
        self.assertEqual(self.committed_view(self.coll_b), self.BEFORE)
        session.abort_transaction()
        self.assertEqual(self.committed_view(self.coll_b), self.BEFORE)

    def test_a_majority_read_sees_only_committed_data(self) -> None:
        for level in ("majority", "local", "available"):
            with self.subTest(level=level):
                coll = self.coll_b.with_options(read_concern=ReadConcern(level))
                session = self.open_transaction()
                self.assertEqual(self.committed_view(coll), self.BEFORE)
                session.commit_transaction()
                self.assertEqual(self.committed_view(coll), self.AFTER)
                self.coll_a.delete_one({"_id": 2})
                self.coll_a.update_one({"_id": 0}, {"$set": {"v": "base"}})

    def test_a_causal_session_reads_its_own_write_beside_a_transaction(self) -> None:
        with self.b.start_session(causal_consistency=True) as own:
            self.coll_b.insert_one({"_id": 9, "v": "own", "n": 0}, session=own)
            session = self.open_transaction()
            found, took = timed(
                lambda: self.coll_b.find_one({"_id": 9}, session=own, max_time_ms=READ_MS)
            )
            self.assertLess(took, PROMPT)
            self.assertEqual(found["v"], "own")
        session.commit_transaction()

    def test_get_more_of_a_read_cursor_is_prompt(self) -> None:
        self.coll_a.insert_many([{"_id": 10 + i, "v": "many", "n": 0} for i in range(20)])
        session = self.open_transaction()
        cursor = self.coll_b.find({}, batch_size=3, max_time_ms=READ_MS).sort("_id", 1)
        ids, took = timed(lambda: [d["_id"] for d in cursor])
        self.assertLess(took, PROMPT)
        self.assertEqual(ids, [0, 1] + [10 + i for i in range(20)])
        session.commit_transaction()

    def test_a_read_of_a_missing_collection_answers_empty_at_once(self) -> None:
        session = self.open_transaction()
        missing = self.b[self.db_name].missing
        (count, estimated, total, values, found), took = timed(
            lambda: (
                missing.count_documents({}, maxTimeMS=READ_MS),
                missing.estimated_document_count(maxTimeMS=READ_MS),
                list(missing.aggregate([{"$match": {"n": 1}}], maxTimeMS=READ_MS)),
                missing.distinct("v", maxTimeMS=READ_MS),
                list(missing.find({}, max_time_ms=READ_MS)),
            )
        )
        self.assertLess(took, PROMPT)
        self.assertEqual((count, estimated, total, values, found), (0, 0, [], [], []))
        # And it was not created by reading it.
        self.assertNotIn("missing", self.b[self.db_name].list_collection_names())
        session.commit_transaction()

    def test_a_read_sees_each_commit_whole(self) -> None:
        # A transaction moves a unit between two documents again and again;
        # every concurrent read outside it sees the total unchanged.
        self.coll_a.delete_many({})
        self.coll_a.insert_many([{"_id": "x", "n": 100}, {"_id": "y", "n": 0}])
        stop = threading.Event()
        moved = [0]

        def mover() -> None:
            with STANDIN.client("mover") as client:
                coll = client[self.db_name].c
                while not stop.is_set():
                    with client.start_session() as session:
                        with session.start_transaction():
                            coll.update_one({"_id": "x"}, {"$inc": {"n": -1}}, session=session)
                            time.sleep(0.005)
                            coll.update_one({"_id": "y"}, {"$inc": {"n": 1}}, session=session)
                    moved[0] += 1

        thread = threading.Thread(target=mover)
        thread.start()
        try:
            totals = set()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                docs = list(self.coll_b.find({}, max_time_ms=READ_MS))
                totals.add(sum(d["n"] for d in docs))
                total = [{"$group": {"_id": None, "t": {"$sum": "$n"}}}]
                totals.add(list(self.coll_b.aggregate(total))[0]["t"])
        finally:
            stop.set()
            thread.join(timeout=15)
        self.assertFalse(thread.is_alive())
        self.assertGreater(moved[0], 5)
        self.assertEqual(totals, {100})

    def test_reads_after_a_dropped_database_see_the_new_one(self) -> None:
        self.assertEqual(self.coll_b.count_documents({}), 2)
        self.a.drop_database(self.db_name)
        self.assertEqual(self.coll_b.count_documents({}), 0)
        self.coll_a.insert_one({"_id": "new", "v": "again", "n": 0})
        self.assertEqual([d["_id"] for d in self.coll_b.find({})], ["new"])


class TheGateStays(Base):
    def test_a_read_inside_another_transaction_waits(self) -> None:
        session = self.open_transaction()
        with self.b.start_session() as other:
            other.start_transaction()
            started = time.monotonic()
            with self.assertRaises(ExecutionTimeout) as raised:
                list(self.coll_b.find({}, session=other, max_time_ms=GATED_MS))
            took = time.monotonic() - started
            self.assertEqual(raised.exception.code, 50)
            self.assertGreaterEqual(took, GATED_MS / 1000 * 0.9)
            # (Its abort would wait for the gate too: A finishes first.)
            session.commit_transaction()
            other.abort_transaction()

    def test_a_write_outside_a_transaction_waits(self) -> None:
        session = self.open_transaction()
        with self.assertRaises(ExecutionTimeout):
            self.b[self.db_name].command(
                "insert", "c", documents=[{"_id": 5}], maxTimeMS=GATED_MS
            )
        session.commit_transaction()
        # Free again once the transaction is over.
        self.coll_b.insert_one({"_id": 5, "v": "later", "n": 0})
        self.assertEqual(self.coll_b.count_documents({}), 4)

    def test_a_second_transaction_waits_for_the_first(self) -> None:
        session = self.open_transaction()
        result = {}

        def second() -> None:
            with self.b.start_session() as other:
                started = time.monotonic()
                with other.start_transaction():
                    self.coll_b.insert_one({"_id": 7, "v": "second", "n": 0}, session=other)
                result["waited"] = time.monotonic() - started

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        self.assertTrue(thread.is_alive(), "the second transaction did not wait")
        session.commit_transaction()
        thread.join(timeout=10)
        self.assertFalse(thread.is_alive())
        self.assertGreaterEqual(result["waited"], 0.45)
        self.assertEqual(self.coll_b.count_documents({}), 4)


class TestCommandsStay(Base):
    def test_block_connection_still_blocks_a_read(self) -> None:
        session = self.open_transaction()
        self.admin.command(
            "configureFailPoint", "failCommand", mode={"times": 1},
            data={"failCommands": ["find"], "appName": "session-b",
                  "blockConnection": True, "blockTimeMS": 600},
        )
        docs, took = timed(lambda: list(self.coll_b.find({}, max_time_ms=READ_MS)))
        self.assertGreaterEqual(took, 0.55)
        self.assertLess(took, 0.6 + PROMPT)
        self.assertEqual(len(docs), 2)
        # The fail point fired once: the next find is prompt again.
        _, took = timed(lambda: list(self.coll_b.find({}, max_time_ms=READ_MS)))
        self.assertLess(took, PROMPT)
        session.commit_transaction()

    def test_an_error_fail_point_fails_a_read(self) -> None:
        self.admin.command(
            "configureFailPoint", "failCommand", mode={"times": 1},
            data={"failCommands": ["aggregate"], "appName": "session-b", "errorCode": 2},
        )
        with self.assertRaises(OperationFailure) as raised:
            self.coll_b.count_documents({})
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(self.coll_b.count_documents({}), 2)

    def test_kill_sessions_aborts_an_open_transaction(self) -> None:
        session = self.open_transaction()
        self.admin.command("killSessions", [session.session_id])
        # The gate is free: a write goes through at once.
        _, took = timed(lambda: self.b[self.db_name].command(
            "insert", "c", documents=[{"_id": 6, "v": "after", "n": 0}], maxTimeMS=READ_MS
        ))
        self.assertLess(took, PROMPT)
        with self.assertRaises(OperationFailure) as raised:
            session.commit_transaction()
        self.assertEqual(raised.exception.code, 251)
        self.assertEqual(
            sorted(d["_id"] for d in self.coll_b.find({})), [0, 1, 6]
        )
        self.assertEqual(self.coll_b.find_one({"_id": 0})["v"], "base")

    def test_an_idle_transaction_is_aborted_after_its_lifetime(self) -> None:
        was = self.admin.command("setParameter", 1, transactionLifetimeLimitSeconds=1)["was"]
        try:
            session = self.open_transaction()
            # Reads never waited for it; a write waits until it is reaped.
            self.assertEqual(self.committed_view(self.coll_b), self.BEFORE)
            _, took = timed(lambda: self.b[self.db_name].command(
                "insert", "c", documents=[{"_id": 8, "v": "x", "n": 0}], maxTimeMS=5000
            ))
            self.assertLess(took, 4.0)
            with self.assertRaises(OperationFailure) as raised:
                session.commit_transaction()
            self.assertEqual(raised.exception.code, 251)
            self.assertEqual(self.coll_b.count_documents({}), 3)
        finally:
            self.admin.command("setParameter", 1, transactionLifetimeLimitSeconds=was)


class DataDirectory(unittest.TestCase):
    def test_memory_data_is_removed_when_the_stand_in_is_killed(self) -> None:
        for sig in (signal.SIGKILL, signal.SIGTERM):
            with self.subTest(signal=sig.name):
                standin = StandIn()
                self.addCleanup(standin.stop)
                with standin.client("dir") as client:
                    client.d.c.insert_one({"_id": 1})
                    self.assertEqual(client.d.c.count_documents({}), 1)
                dirs = standin.data_dirs()
                self.assertEqual(len(dirs), 1, dirs)
                self.assertTrue(os.path.exists(os.path.join(dirs[0], "d.db")))
                standin.stop(sig)
                deadline = time.monotonic() + 5
                while os.path.exists(dirs[0]) and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.assertFalse(os.path.exists(dirs[0]), f"{dirs[0]} left after {sig.name}")

    def test_a_data_dir_keeps_its_files(self) -> None:
        with tempfile.TemporaryDirectory() as data:
            standin = StandIn("--data-dir", data)
            self.addCleanup(standin.stop)
            try:
                with standin.client("dir") as client:
                    client.d.c.insert_one({"_id": 1})
                    session = client.start_session()
                    session.start_transaction()
                    client.d.c.insert_one({"_id": 2}, session=session)
                    with standin.client("reader") as reader:
                        found = reader.d.c.find({}, max_time_ms=READ_MS)
                        ids, took = timed(lambda: [d["_id"] for d in found])
                    self.assertLess(took, PROMPT)
                    self.assertEqual(ids, [1])
                    session.commit_transaction()
                    session.end_session()
            finally:
                standin.stop()
            self.assertTrue(os.path.exists(os.path.join(data, "d.db")))


if __name__ == "__main__":
    unittest.main()
