"""The ledger: the one source of truth for instances, series, jobs and results.

SQLAlchemy Core over SQLite (WAL, ``synchronous=FULL``, so a committed row survives power loss) by
default, or PostgreSQL for a multi-node site. Every stage after the receiver is a state transition
here, so a restarted node resumes from the ledger, never from memory. The ledger stores what it is
given; it never parses DICOM.

Receiver writes go through :class:`_GroupCommitter`: rows of concurrent associations that wait
while a commit is in progress are committed together in the next transaction, so N parallel stores
share one fsync; a lone association commits in its own thread.

Many writers are normal (several receivers and workers, several processes, one ledger): inserts are
``ON CONFLICT DO NOTHING``, the series row is locked before an epoch is decided, every transition is a
conditional update that exactly one writer wins, and the clock that decides completeness, leases and
retries is the database's (:meth:`Ledger.now`). The schema is created and upgraded by the Alembic
migrations in :mod:`dicomnode.migrations`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from dicomnode.domain import (
    JobKind,
    JobState,
    Priority,
    SeriesState,
    SeriesSummary,
    StoredInstance,
)
from dicomnode.spool import process_exists

metadata = sa.MetaData()

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.String(300), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("peer_host", sa.String(64), nullable=False),
    sa.Column("association_id", sa.String(40), nullable=False, default=""),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("instance_number", sa.Integer),
    sa.Column("image_type", sa.String(200), nullable=False, default=""),
)

series = sa.Table(
    "series",
    metadata,
    sa.Column("series_instance_uid", sa.String(64), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("modality", sa.String(16), nullable=False, default=""),
    sa.Column("body_part", sa.String(64), nullable=False, default=""),
    sa.Column("series_description", sa.String(200), nullable=False, default=""),
    sa.Column("study_description", sa.String(200), nullable=False, default=""),
    sa.Column("calling_ae", sa.String(16), nullable=False, default=""),
    sa.Column("instance_count", sa.Integer, nullable=False, default=0),
    sa.Column("epoch", sa.Integer, nullable=False, default=1),
    sa.Column("epoch_count", sa.Integer, nullable=False, default=0),  # instances in current epoch
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("expected_count", sa.Integer),
    sa.Column("first_received_at", sa.Float, nullable=False),
    sa.Column("last_received_at", sa.Float, nullable=False),
    sa.Column("last_association_id", sa.String(40), nullable=False, default=""),
    sa.Column("released_at", sa.Float),  # the association that carried the last instance ended
    sa.Column("processed_at", sa.Float),  # when the last epoch was handed to jobs
    sa.Column("rule", sa.String(100), nullable=False, default=""),
    sa.Column("note", sa.String(500), nullable=False, default=""),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("dedup_key", sa.String(400), nullable=False, unique=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("not_before", sa.Float, nullable=False),
    sa.Column("lease_owner", sa.String(100)),
    sa.Column("lease_expires", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("outcome", sa.Text, nullable=False, default=""),
    # The engine queue that carries the job in cluster mode ("" in embedded mode).
    sa.Column("queue", sa.String(64), nullable=False, default="", server_default=""),
    # First transient failure of the current run of failures: the retry horizon counts from here.
    sa.Column("failing_since", sa.Float),
    sa.Index("ix_jobs_claim", "state", "kind", "priority", "not_before"),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, nullable=False, index=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("analyzer", sa.String(100), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("result_series_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.String(300), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("summary", sa.Text, nullable=False, default="{}"),
)

# --- notify (issue 13): events and their notifications per channel ------------------------------
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String(20), primary_key=True),  # notify.event_id(): a hash, so inserts are idempotent
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("analyzer", sa.String(100), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("previous_verdict", sa.String(16)),
    sa.Column("verdict_changed", sa.Boolean),
    sa.Column("supersedes", sa.String(20)),
    sa.Column("payload", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    # time to notification: last image of the epoch, series complete, result built (recorded)
    sa.Column("last_image_at", sa.Float),
    sa.Column("series_complete_at", sa.Float),
    sa.Column("result_built_at", sa.Float),
)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("event_id", sa.String(20), primary_key=True),
    sa.Column("channel", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("job_id", sa.Integer, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float),  # the message of the successful attempt left
    sa.Column("acked_at", sa.Float),  # ACK AA / HTTP 2xx / C-STORE success received
    sa.Column("response", sa.Text, nullable=False, default=""),
    sa.Column("message_ids", sa.Text, nullable=False, default="[]"),
)


# One row per process that takes part (receiver/sweeper, worker): its heartbeat says it is alive.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("process_id", sa.String(100), primary_key=True),  # host:pid:random, also the lease owner
    sa.Column("node_id", sa.String(100), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("stopped_at", sa.Float),
    sa.Column("running", sa.String(500), nullable=False, default=""),
)

# Associations that stored something, written with their first instance (no commit of their own).
associations = sa.Table(
    "associations",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("process_id", sa.String(100), nullable=False, index=True),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("peer_host", sa.String(64), nullable=False),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("closed_at", sa.Float),
    sa.Column("state", sa.String(16), nullable=False),  # open, released, aborted
)

# Which series each association carried: release evidence needs "no other open association".
association_series = sa.Table(
    "association_series",
    metadata,
    sa.Column("association_id", sa.String(40), primary_key=True),
    sa.Column("series_instance_uid", sa.String(64), primary_key=True, index=True),
)

ASSOCIATION_OPEN, ASSOCIATION_RELEASED, ASSOCIATION_ABORTED = "open", "released", "aborted"
# Not a real association: instances indexed by start-up reconciliation.
RECONCILED_ASSOCIATION = "reconciled"

_SELECT_INSTANCE_EPOCH = sa.select(instances.c.epoch, instances.c.path).where(
    instances.c.sop_instance_uid == sa.bindparam("sop")
)
_SELECT_SERIES_STATE = sa.select(
    series.c.epoch, series.c.state, series.c.instance_count, series.c.expected_count,
    series.c.last_association_id,
).where(
    series.c.series_instance_uid == sa.bindparam("uid")
)
# The row lock that serialises epoch decisions of concurrent writers (no-op on SQLite, whose
# writers are serialised by the database lock taken first, see Ledger._lock_for_write).
_LOCK_SERIES_STATE = _SELECT_SERIES_STATE.with_for_update()
_SERIES_TOUCHED = {
    "instance_count": series.c.instance_count + 1,
    "last_received_at": sa.bindparam("received"),
    "last_association_id": sa.bindparam("association"),
    "released_at": None,
    # expected_count is set from a header that states it; None keeps the value it had
    "expected_count": sa.func.coalesce(sa.bindparam("expected", type_=sa.Integer), series.c.expected_count),
}
# Same epoch: one more instance in it.
_UPDATE_SERIES = (
    series.update()
    .where(series.c.series_instance_uid == sa.bindparam("uid"))
    .values(**_SERIES_TOUCHED, epoch_count=series.c.epoch_count + 1)
)
# A late instance reopens a series already handed on: a new epoch starts with it.
_UPDATE_SERIES_REOPEN = (
    series.update()
    .where(series.c.series_instance_uid == sa.bindparam("uid"))
    .values(**_SERIES_TOUCHED, epoch=sa.bindparam("new_epoch"), epoch_count=1, state=SeriesState.RECEIVING,
            note="")
)

# The receiver's row on SQLite (Ledger._record_sqlite): the statements above, as plain SQL.
_SQLITE_SELECT_INSTANCE = "SELECT epoch, path FROM instances WHERE sop_instance_uid = ?"
_SQLITE_SELECT_SERIES = (
    "SELECT epoch, state, instance_count, expected_count, last_association_id FROM series "
    "WHERE series_instance_uid = ?"
)
_SQLITE_INSERT_SERIES = (
    "INSERT INTO series (series_instance_uid, study_instance_uid, modality, body_part, series_description, "
    "study_description, calling_ae, instance_count, epoch, epoch_count, state, expected_count, "
    "first_received_at, last_received_at, last_association_id, released_at, rule, note) "
    f"VALUES (?, ?, ?, ?, ?, ?, ?, 0, 1, 0, '{SeriesState.RECEIVING.value}', ?, ?, ?, '', NULL, '', '') "
    "ON CONFLICT DO NOTHING"
)
_SQLITE_INSERT_INSTANCE = (
    "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid, "
    "transfer_syntax_uid, path, size, calling_ae, peer_host, association_id, received_at, epoch, "
    "instance_number, image_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_SQLITE_SERIES_TOUCHED = (
    "instance_count = instance_count + 1, last_received_at = ?, last_association_id = ?, "
    "released_at = NULL, expected_count = coalesce(?, expected_count)"
)
_SQLITE_UPDATE_SERIES = (
    f"UPDATE series SET {_SQLITE_SERIES_TOUCHED}, epoch_count = epoch_count + 1 WHERE series_instance_uid = ?"
)
_SQLITE_UPDATE_SERIES_REOPEN = (
    f"UPDATE series SET {_SQLITE_SERIES_TOUCHED}, epoch = ?, epoch_count = 1, "
    f"state = '{SeriesState.RECEIVING.value}', note = '' WHERE series_instance_uid = ?"
)
_SQLITE_INSERT_ASSOCIATION = (
    "INSERT INTO associations (id, process_id, calling_ae, peer_host, opened_at, closed_at, state) "
    f"VALUES (?, ?, ?, ?, ?, NULL, '{ASSOCIATION_OPEN}') ON CONFLICT DO NOTHING"
)
_SQLITE_INSERT_ASSOCIATION_SERIES = (
    "INSERT INTO association_series (association_id, series_instance_uid) VALUES (?, ?) ON CONFLICT DO NOTHING"
)


def _now() -> float:
    return time.time()


def process_identity() -> str:
    """A process id unique across hosts and restarts: ``host:pid:random``. It names the process in
    ``nodes`` and is the lease owner of the jobs it runs."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _host_and_pid(process_id: str) -> tuple[str, int | None]:
    host, _, rest = process_id.partition(":")
    pid, _, _ = rest.partition(":")
    return host, int(pid) if pid.isdigit() else None


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    kind: JobKind
    series_instance_uid: str
    epoch: int
    payload: dict[str, Any]
    priority: Priority
    state: JobState
    attempts: int
    max_attempts: int
    not_before: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    last_error: str
    outcome: dict[str, Any]
    lease_owner: str | None = None
    queue: str = ""
    failing_since: float | None = None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> JobRow:
        m = row._mapping
        return cls(
            id=m["id"],
            kind=JobKind(m["kind"]),
            series_instance_uid=m["series_instance_uid"],
            epoch=m["epoch"],
            payload=json.loads(m["payload"]),
            priority=Priority(m["priority"]),
            state=JobState(m["state"]),
            attempts=m["attempts"],
            max_attempts=m["max_attempts"],
            not_before=m["not_before"],
            created_at=m["created_at"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
            last_error=m["last_error"] or "",
            outcome=json.loads(m["outcome"]) if m["outcome"] else {},
            lease_owner=m["lease_owner"],
            queue=m["queue"] or "",
            failing_since=m["failing_since"],
        )


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """A receiver/sweeper or worker process, as its heartbeats describe it."""

    process_id: str
    node_id: str
    role: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    running: str
    alive: bool

    @classmethod
    def from_row(cls, row: sa.Row[Any], now: float, dead_after_s: float) -> ProcessRow:
        m = dict(row._mapping)
        alive = m["stopped_at"] is None and m["heartbeat_at"] >= now - dead_after_s
        return cls(**m, alive=alive)


@dataclass(frozen=True, slots=True)
class SeriesRow:
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part: str
    series_description: str
    study_description: str
    calling_ae: str
    instance_count: int
    epoch: int
    epoch_count: int
    state: SeriesState
    expected_count: int | None
    first_received_at: float
    last_received_at: float
    last_association_id: str
    released_at: float | None
    processed_at: float | None
    rule: str
    note: str

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> SeriesRow:
        m = dict(row._mapping)
        m["state"] = SeriesState(m["state"])
        return cls(**m)


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    new: bool  # False: the SOP Instance was already in the ledger (duplicate)
    epoch: int
    reopened: bool  # True: this instance reopened an already processed series
    # The series has just reached as many instances as its headers announce (once, not per late image).
    expected_reached: bool = False
    path: str = ""  # for a duplicate: the spool path of the copy the ledger already holds


_MAX_BATCH = 256
DEFAULT_DEAD_AFTER_S = 30.0  # embedded mode: a process without a heartbeat for this long is dead


class _GroupCommitter:
    """Group commit of the receivers' rows, without a writer thread.

    Each caller queues its row, then takes the commit lock; whoever holds it commits every queued
    row in one transaction (one fsync), its own included, and wakes their owners. A lone
    association therefore commits in its own thread with no hand-off between threads, while rows
    of concurrent associations that queue during a commit share the next one. The lock also keeps
    two commits of this process from racing each other's series upserts; other processes are kept
    apart by the database (series row lock, or SQLite's write lock).
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._pending: list[tuple[StoredInstance, _Slot]] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def submit(self, item: StoredInstance) -> RecordOutcome:
        slot = _Slot()
        with self._pending_lock:
            self._pending.append((item, slot))
        with self._commit_lock:
            # Rows leave the queue in order, so ours is committed after a bounded number of rounds,
            # by us or by the holder of the lock before us.
            while not slot.done:
                with self._pending_lock:
                    batch = self._pending[:_MAX_BATCH]
                    del self._pending[:_MAX_BATCH]
                self._commit(batch)
        return slot.wait()

    def close(self) -> None:
        with self._commit_lock:  # let a commit in progress finish
            pass

    def _commit(self, batch: list[tuple[StoredInstance, _Slot]]) -> None:
        try:
            try:
                # Series rows are locked in one global order (by UID), so two writers' batches that
                # share series cannot deadlock; rows of one series keep their arrival order.
                order = sorted(range(len(batch)), key=lambda i: batch[i][0].series_instance_uid)
                committed = self._ledger._record_rows([batch[i][0] for i in order])
                outcomes = dict(zip(order, committed, strict=True))
            except Exception:
                # One bad row must not refuse its neighbours: redo them one transaction each.
                for item, slot in batch:
                    self._commit_one(item, slot)
            else:
                for i, (_, slot) in enumerate(batch):
                    slot.set(outcomes[i])
        finally:
            # Whatever escaped (KeyboardInterrupt, MemoryError...), no row that left the queue may be
            # left unanswered: its owner would wait for it for ever, holding the commit lock.
            for _, slot in batch:
                if not slot.done:
                    slot.fail(RuntimeError("ledger commit interrupted"))

    def _commit_one(self, item: StoredInstance, slot: _Slot) -> None:
        try:
            slot.set(self._ledger._record_rows([item])[0])
        except Exception as exc:
            slot.fail(exc)


class _Slot:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: RecordOutcome | None = None
        self._error: BaseException | None = None

    def set(self, value: RecordOutcome) -> None:
        self._value = value
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> RecordOutcome:
        self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class _WriterLock:
    """Serialises SQLite write transactions across the processes sharing one ledger file (the node
    and its receiver processes): an ``flock`` on ``<ledger>.writer-lock`` taken before BEGIN and
    released after COMMIT/ROLLBACK. A blocked writer is woken the moment the lock is free, where
    SQLite's busy handler sleeps 1, 2, 5, 10 ... ms between retries: with 2-4 processes committing
    (synchronous=FULL) it gave worst-case waits of 0.5-2.8 s, the flock 35-137 ms at equal or better
    throughput (notes/ingest.md 5.2). Threads of one process queue on a lock first (an flock is held
    by the open file, which they share). Re-entrant within a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._threads = threading.RLock()
        self._depth = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            if self._depth == 0:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            fd = self._fd
            assert fd is not None
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class _Unchanged:
    pass


_UNCHANGED = _Unchanged()


class Ledger:
    """State transitions on the ledger database. Thread-safe; one instance per process.

    ``url`` is a SQLAlchemy URL: ``sqlite:///path`` (embedded) or ``postgresql+psycopg://...``
    (cluster). The schema is created or upgraded on open unless ``migrate`` is False.
    """

    def __init__(self, url: str, *, dead_after_s: float = DEFAULT_DEAD_AFTER_S, migrate: bool = True) -> None:
        self.url = url
        self.dead_after_s = dead_after_s
        if url.startswith("sqlite"):
            self.engine: Engine = sa.create_engine(url, pool_pre_ping=False)
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # pre-ping: after a database restart, pooled connections are replaced, not used and failed.
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
        database = self.engine.url.database if url.startswith("sqlite") else None
        self._writer_lock = (_WriterLock(database + ".writer-lock")
                             if database and database != ":memory:" else None)
        self.dialect = self.engine.dialect.name
        # SQLite is a local file: this host's clock is the database's. Elsewhere ask the server.
        self._db_clock = self.dialect != "sqlite"
        if migrate:
            from dicomnode.migrations import upgrade

            upgrade(self.engine)
        self.process_id = ""  # set by register_process; names this process in nodes and leases
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._insert_series = insert(series).on_conflict_do_nothing()
        # RETURNING says whether the row went in: an insert's rowcount is not reliable across drivers
        # (psycopg through SQLAlchemy reports -1).
        self._insert_instance = insert(instances).on_conflict_do_nothing().returning(instances.c.epoch)
        self._insert_association = insert(associations).on_conflict_do_nothing()
        self._insert_association_series = insert(association_series).on_conflict_do_nothing()
        self._insert_job = insert(jobs).on_conflict_do_nothing().returning(jobs.c.id)
        self._insert_result = insert(results).on_conflict_do_nothing().returning(results.c.id)
        self._insert_event = insert(events).on_conflict_do_nothing().returning(events.c.id)
        self._insert_notification = insert(notifications).on_conflict_do_nothing()
        # Created on first use; the lock matters: two committers would race each other's series
        # upserts.
        self._committer: _GroupCommitter | None = None
        self._committer_lock = threading.Lock()
        # The receivers' rows on a SQLite file: a sqlite3 connection of their own (see _record_rows),
        # used under the committer's lock only.
        self._rows_db: sqlite3.Connection | None = None

    @classmethod
    def sqlite(cls, path: str) -> Ledger:
        return cls(f"sqlite:///{path}")

    def close(self) -> None:
        with self._committer_lock:
            if self._committer is not None:
                self._committer.close()
                self._committer = None
            if self._rows_db is not None:
                self._rows_db.close()
                self._rows_db = None
        self.engine.dispose()
        if self._writer_lock is not None:
            self._writer_lock.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def write_transaction(self) -> Iterator[Connection]:
        """A transaction that reads, then decides, then writes. On SQLite the write lock is taken
        first, so that what it read cannot change before it writes, even from another process."""
        if self._writer_lock is None:
            with self.engine.begin() as conn:
                self._lock_for_write(conn)
                yield conn
            return
        with self._writer_lock.held(), self.engine.begin() as conn:
            self._lock_for_write(conn)
            yield conn

    def _lock_for_write(self, conn: Connection) -> None:
        if self.dialect == "sqlite":
            # A write that changes nothing makes pysqlite BEGIN and SQLite take the RESERVED lock
            # (waiting up to busy_timeout), before any read of this transaction.
            conn.exec_driver_sql("UPDATE nodes SET pid = pid WHERE 0")

    def now(self, conn: Connection | None = None) -> float:
        """The clock that decides completeness, leases and retries: the database server's
        (``clock_timestamp()``), so that hosts with skewed clocks agree; on SQLite, this host's."""
        if not self._db_clock:
            return time.time()
        query = sa.select(sa.extract("epoch", sa.func.clock_timestamp()))
        if conn is None:
            with self.engine.connect() as own:
                return float(own.execute(query).scalar_one())
        return float(conn.execute(query).scalar_one())

    def clock_offset(self, conn: Connection | None = None) -> float:
        """The ledger's clock minus this host's (0 on SQLite, where they are the same clock): turns a
        time read on this host into one comparable with times other hosts recorded."""
        return self.now(conn) - time.time() if self._db_clock else 0.0

    # --- instances and series ---------------------------------------------------------------

    def record_instance(self, item: StoredInstance) -> RecordOutcome:
        """Commit an instance row and its series upsert durably; safe to call from many threads."""
        with self._committer_lock:
            if self._committer is None:
                self._committer = _GroupCommitter(self)
            committer = self._committer
        return committer.submit(item)

    def _record_rows(self, items: Sequence[StoredInstance]) -> list[RecordOutcome]:
        """Commit these receiver rows in one write transaction (in this order); the caller holds the
        group committer's lock. On a SQLite file the transaction runs on a sqlite3 connection kept
        for it, under the same writer flock, BEGIN IMMEDIATE (the write lock before any read) and
        COMMIT with synchronous=FULL as :meth:`write_transaction`: SQLAlchemy's connection checkout,
        begin and commit cost more CPU than the rows' SQL itself, once per C-STORE."""
        if self._writer_lock is None or self.dialect != "sqlite":
            with self.write_transaction() as conn:
                now = self.now(conn)
                return [self._record(conn, item, now) for item in items]
        with self._writer_lock.held():
            if self._rows_db is None:
                database = self.engine.url.database
                assert database is not None
                db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
                _sqlite_pragmas(db, None)
                self._rows_db = db
            db = self._rows_db
            try:
                db.execute("BEGIN IMMEDIATE")
                now = time.time()
                outcomes = [self._record_sqlite(db, item, now) for item in items]
                db.execute("COMMIT")
            except BaseException:
                self._rows_db = None
                try:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                finally:
                    # A fresh connection next time: nothing of a failed commit can linger in it.
                    db.close()
                raise
            return outcomes

    def _record(self, conn: Connection, item: StoredInstance, now: float) -> RecordOutcome:
        if self.dialect == "sqlite":
            db = conn.connection.driver_connection
            assert isinstance(db, sqlite3.Connection)
            return self._record_sqlite(db, item, now)
        return self._record_core(conn, item, now)

    def _record_core(self, conn: Connection, item: StoredInstance, now: float) -> RecordOutcome:
        # Prebuilt statements (module level or __init__): building and cache-keying a fresh Core
        # statement per row cost more than executing it, once per C-STORE.
        existing = conn.execute(_SELECT_INSTANCE_EPOCH, {"sop": item.sop_instance_uid}).first()
        if existing is not None:
            return RecordOutcome(new=False, epoch=existing.epoch, reopened=False, path=existing.path)
        received = now if self._db_clock else item.received_at.timestamp()
        expected = item.images_in_acquisition or None
        if item.temporal_positions and expected:
            expected *= item.temporal_positions
        # The series row is locked before the epoch is decided: two writers must never both open
        # epoch N+1, nor both count the same epoch's instances.
        current = conn.execute(_LOCK_SERIES_STATE, {"uid": item.series_instance_uid}).first()
        if current is None:
            conn.execute(self._insert_series, {
                "series_instance_uid": item.series_instance_uid,
                "study_instance_uid": item.study_instance_uid,
                "modality": item.modality,
                "body_part": item.body_part,
                "series_description": item.series_description,
                "study_description": item.study_description,
                "calling_ae": item.calling_ae,
                "instance_count": 0,
                "epoch": 1,
                "epoch_count": 0,
                "state": SeriesState.RECEIVING,
                "expected_count": expected,
                "first_received_at": received,
                "last_received_at": received,
                "last_association_id": "",
                "released_at": None,
            })
            current = conn.execute(_LOCK_SERIES_STATE, {"uid": item.series_instance_uid}).one()
        epoch = current.epoch
        reopened = current.state != SeriesState.RECEIVING
        if reopened:
            # A late image for a series already handed on: it opens a new epoch.
            epoch += 1
        inserted = conn.execute(self._insert_instance, {
            "sop_instance_uid": item.sop_instance_uid,
            "series_instance_uid": item.series_instance_uid,
            "study_instance_uid": item.study_instance_uid,
            "sop_class_uid": item.sop_class_uid,
            "transfer_syntax_uid": item.transfer_syntax_uid,
            "path": item.path,
            "size": item.size,
            "calling_ae": item.calling_ae,
            "peer_host": item.peer_host,
            "association_id": item.association_id,
            "received_at": received,
            "epoch": epoch,
            "instance_number": item.instance_number,
            "image_type": item.image_type,
        }).first()
        if inserted is None:
            # Another writer committed the same SOP Instance (under another series) meanwhile.
            first = conn.execute(_SELECT_INSTANCE_EPOCH, {"sop": item.sop_instance_uid}).one()
            return RecordOutcome(new=False, epoch=first.epoch, reopened=False, path=first.path)
        # Mirrors assembly.due_time's expected-count rule, so the node can sweep at once.
        count = current.instance_count + 1
        announced = expected or current.expected_count
        values = {"uid": item.series_instance_uid, "received": received,
                  "association": item.association_id, "expected": expected}
        if reopened:
            conn.execute(_UPDATE_SERIES_REOPEN, {**values, "new_epoch": epoch})
        else:
            conn.execute(_UPDATE_SERIES, values)
        if (current.last_association_id != item.association_id and self.process_id
                and item.association_id not in ("", RECONCILED_ASSOCIATION)):
            # First instance of this series on this association: the association carries the series.
            conn.execute(self._insert_association, {
                "id": item.association_id, "process_id": self.process_id, "calling_ae": item.calling_ae,
                "peer_host": item.peer_host[:64], "opened_at": received, "closed_at": None,
                "state": ASSOCIATION_OPEN,
            })
            conn.execute(self._insert_association_series, {
                "association_id": item.association_id, "series_instance_uid": item.series_instance_uid,
            })
        return RecordOutcome(new=True, epoch=epoch, reopened=reopened,
                             expected_reached=bool(announced) and count == announced)

    def _record_sqlite(self, db: sqlite3.Connection, item: StoredInstance, now: float) -> RecordOutcome:
        """:meth:`_record_core` on SQLite, written straight to the sqlite3 connection of the same
        transaction (same statements, same order, same values; pinned by a test against the Core
        path). One row per C-STORE through SQLAlchemy's execution machinery cost ~7x the SQL itself;
        sqlite3 keeps these statements prepared in its statement cache. Series rows need no lock
        here: the write transaction already holds SQLite's write lock."""
        existing = db.execute(_SQLITE_SELECT_INSTANCE, (item.sop_instance_uid,)).fetchone()
        if existing is not None:
            return RecordOutcome(new=False, epoch=existing[0], reopened=False, path=existing[1])
        received = item.received_at.timestamp()
        expected = item.images_in_acquisition or None
        if item.temporal_positions and expected:
            expected *= item.temporal_positions
        current = db.execute(_SQLITE_SELECT_SERIES, (item.series_instance_uid,)).fetchone()
        if current is None:
            db.execute(_SQLITE_INSERT_SERIES, (
                item.series_instance_uid, item.study_instance_uid, item.modality, item.body_part,
                item.series_description, item.study_description, item.calling_ae, expected, received,
                received,
            ))
            current = db.execute(_SQLITE_SELECT_SERIES, (item.series_instance_uid,)).fetchone()
        epoch, state, instance_count, expected_count, last_association_id = current
        reopened = state != SeriesState.RECEIVING
        if reopened:
            # A late image for a series already handed on: it opens a new epoch.
            epoch += 1
        inserted = db.execute(_SQLITE_INSERT_INSTANCE, (
            item.sop_instance_uid, item.series_instance_uid, item.study_instance_uid, item.sop_class_uid,
            item.transfer_syntax_uid, item.path, item.size, item.calling_ae, item.peer_host,
            item.association_id, received, epoch, item.instance_number, item.image_type,
        )).rowcount
        if inserted != 1:
            # Not reachable while this transaction holds the write lock; kept as in the Core path.
            first = db.execute(_SQLITE_SELECT_INSTANCE, (item.sop_instance_uid,)).fetchone()
            return RecordOutcome(new=False, epoch=first[0], reopened=False, path=first[1])
        count = instance_count + 1
        announced = expected or expected_count
        if reopened:
            db.execute(_SQLITE_UPDATE_SERIES_REOPEN, (
                received, item.association_id, expected, epoch, item.series_instance_uid))
        else:
            db.execute(_SQLITE_UPDATE_SERIES, (
                received, item.association_id, expected, item.series_instance_uid))
        if (last_association_id != item.association_id and self.process_id
                and item.association_id not in ("", RECONCILED_ASSOCIATION)):
            db.execute(_SQLITE_INSERT_ASSOCIATION, (
                item.association_id, self.process_id, item.calling_ae, item.peer_host[:64], received))
            db.execute(_SQLITE_INSERT_ASSOCIATION_SERIES, (item.association_id, item.series_instance_uid))
        return RecordOutcome(new=True, epoch=epoch, reopened=reopened,
                             expected_reached=bool(announced) and count == announced)

    def _live_processes(self, now: float) -> sa.Select[tuple[str]]:
        return sa.select(nodes.c.process_id).where(
            nodes.c.stopped_at.is_(None), nodes.c.heartbeat_at >= now - self.dead_after_s)

    def _dead_processes(self, now: float) -> sa.Select[tuple[str]]:
        return sa.select(nodes.c.process_id).where(
            sa.or_(nodes.c.stopped_at.is_not(None), nodes.c.heartbeat_at < now - self.dead_after_s))

    def association_released(self, association_id: str, at: float | None = None) -> int:
        """Evidence for completeness: the sender released an association that carried these series,
        and no other open association of a live process (on any node) still carries them. Returns
        how many series were marked."""
        with self.write_transaction() as conn:
            now = at if at is not None else self.now(conn)
            conn.execute(associations.update().where(associations.c.id == association_id)
                         .values(state=ASSOCIATION_RELEASED, closed_at=now))
            carried = sa.select(association_series.c.series_instance_uid).where(
                association_series.c.association_id == association_id)
            # Lock the candidates in one global order; an association releasing at the same time
            # on another node then sees this one closed once it gets the lock (no write skew).
            candidates = list(conn.execute(
                sa.select(series.c.series_instance_uid)
                .where(series.c.state == SeriesState.RECEIVING)
                .where(sa.or_(series.c.series_instance_uid.in_(carried),
                              series.c.last_association_id == association_id))
                .order_by(series.c.series_instance_uid)
                .with_for_update()
            ).scalars())
            if not candidates:
                return 0
            other_open = (
                sa.select(association_series.c.association_id)
                .join(associations, associations.c.id == association_series.c.association_id)
                .where(association_series.c.series_instance_uid == series.c.series_instance_uid)
                .where(associations.c.id != association_id)
                .where(associations.c.state == ASSOCIATION_OPEN)
                .where(associations.c.process_id.in_(self._live_processes(now)))
                .exists()
            )
            result = conn.execute(
                series.update()
                .where(series.c.series_instance_uid.in_(candidates))
                .where(series.c.state == SeriesState.RECEIVING)
                .where(~other_open)
                .values(released_at=now)
            )
            return int(result.rowcount or 0)

    def association_aborted(self, association_id: str) -> None:
        """An association that stored something ended without a release: no completeness evidence,
        but it no longer keeps other associations' releases from counting."""
        with self.transaction() as conn:
            conn.execute(associations.update().where(associations.c.id == association_id)
                         .where(associations.c.state == ASSOCIATION_OPEN)
                         .values(state=ASSOCIATION_ABORTED, closed_at=self.now(conn)))

    def instance(self, sop_instance_uid: str) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(instances).where(instances.c.sop_instance_uid == sop_instance_uid)
            ).first()

    def instance_rows(self, series_uid: str, max_epoch: int | None = None) -> list[sa.Row[Any]]:
        query = sa.select(instances).where(instances.c.series_instance_uid == series_uid)
        if max_epoch is not None:
            query = query.where(instances.c.epoch <= max_epoch)
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(instances.c.instance_number, instances.c.path)))

    def epoch_started_at(self, series_uid: str, epoch: int) -> float:
        with self.engine.connect() as conn:
            return float(
                conn.execute(
                    sa.select(sa.func.min(instances.c.received_at))
                    .where(instances.c.series_instance_uid == series_uid)
                    .where(instances.c.epoch == epoch)
                ).scalar_one()
            )

    def instance_paths(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(instances.c.path)).scalars())

    def count_instances(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar_one())

    def series_row(self, series_uid: str) -> SeriesRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(series).where(series.c.series_instance_uid == series_uid)).first()
        return SeriesRow.from_row(row) if row else None

    def series_in_state(self, *states: SeriesState) -> list[SeriesRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(series).where(series.c.state.in_([s.value for s in states])))
            return [SeriesRow.from_row(r) for r in rows]

    def recent_series(self, limit: int = 50) -> list[SeriesRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(series).order_by(series.c.last_received_at.desc()).limit(limit))
            return [SeriesRow.from_row(r) for r in rows]

    def series_summary(self, row: SeriesRow) -> SeriesSummary:
        with self.engine.connect() as conn:
            sop_classes = conn.execute(
                sa.select(instances.c.sop_class_uid)
                .where(instances.c.series_instance_uid == row.series_instance_uid)
                .distinct()
            ).scalars()
            image_types = conn.execute(
                sa.select(instances.c.image_type)
                .where(instances.c.series_instance_uid == row.series_instance_uid)
                .distinct()
            ).scalars()
            return SeriesSummary(
                series_instance_uid=row.series_instance_uid,
                study_instance_uid=row.study_instance_uid,
                epoch=row.epoch,
                modality=row.modality,
                sop_class_uids=tuple(sorted(sop_classes)),
                body_part=row.body_part,
                series_description=row.series_description,
                study_description=row.study_description,
                calling_ae=row.calling_ae,
                instance_count=row.instance_count,
                image_types=tuple(sorted(t for t in image_types if t)),
            )

    def mark_series(
        self, series_uid: str, epoch: int, state: SeriesState, *, rule: str = "", note: str = "",
        instance_count: int | None = None,
    ) -> bool:
        """Move the series to ``state`` if it is still at ``epoch`` (a newer epoch wins). With
        ``instance_count``, only a receiving series that still has exactly that many instances moves:
        the sweep's transition then rests on exactly the evidence it evaluated, and of several
        sweepers exactly one wins."""
        with self.transaction() as conn:
            values: dict[str, Any] = {"state": state, "note": note[:500]}
            if state in (SeriesState.QUEUED, SeriesState.IGNORED):
                values["processed_at"] = self.now(conn)
                values["rule"] = rule[:100]
            query = (series.update()
                     .where(series.c.series_instance_uid == series_uid)
                     .where(series.c.epoch == epoch))
            if instance_count is not None:
                query = (query.where(series.c.state == SeriesState.RECEIVING)
                         .where(series.c.instance_count == instance_count))
            result = conn.execute(query.values(**values))
            return bool(result.rowcount)

    def close_epoch_if_done(self, series_uid: str, epoch: int) -> bool:
        """After a job of the epoch ended: the series is DONE when none of its jobs is still open
        (analysis, delivery, notification alike)."""
        with self.transaction() as conn:
            if self.epoch_jobs_open(conn, series_uid, epoch):
                return False
            return bool(
                conn.execute(
                    series.update()
                    .where(series.c.series_instance_uid == series_uid)
                    .where(series.c.epoch == epoch)
                    .where(series.c.state == SeriesState.QUEUED)
                    .values(state=SeriesState.DONE)
                ).rowcount
            )

    # --- processes ------------------------------------------------------------------------------

    def register_process(self, role: str, node_id: str, process_id: str | None = None) -> str:
        """Record this process in ``nodes``; its id becomes the owner of the leases it takes."""
        process_id = process_id or process_identity()
        host, pid = _host_and_pid(process_id)
        with self.transaction() as conn:
            now = self.now(conn)
            conn.execute(nodes.insert().values(
                process_id=process_id, node_id=node_id[:100], role=role[:16], host=host, pid=pid or os.getpid(),
                started_at=now, heartbeat_at=now, stopped_at=None, running=""))
        self.process_id = process_id
        return process_id

    def heartbeat(self, running: str | None = None, lease_s: float | None = None) -> None:
        """This process is alive; with ``lease_s``, the leases it holds are renewed for that long."""
        if not self.process_id:
            return
        with self.transaction() as conn:
            now = self.now(conn)
            values: dict[str, Any] = {"heartbeat_at": now}
            if running is not None:
                values["running"] = running[:500]
            conn.execute(nodes.update().where(nodes.c.process_id == self.process_id).values(**values))
            if lease_s is not None:
                conn.execute(jobs.update()
                             .where(jobs.c.lease_owner == self.process_id)
                             .where(jobs.c.state == JobState.RUNNING)
                             .values(lease_expires=now + lease_s))

    def process_stopped(self, process_id: str | None = None) -> None:
        """A clean stop: this process (or ``process_id``: a receiver process its node saw die) is
        no longer alive, and its open associations are over, so they hold no release back for the
        ``dead_after_s`` a missing heartbeat would take."""
        process_id = process_id or self.process_id
        if not process_id:
            return
        with self.transaction() as conn:
            now = self.now(conn)
            conn.execute(nodes.update().where(nodes.c.process_id == process_id)
                         .values(stopped_at=now, running=""))
            conn.execute(associations.update()
                         .where(associations.c.process_id == process_id)
                         .where(associations.c.state == ASSOCIATION_OPEN)
                         .values(state=ASSOCIATION_ABORTED, closed_at=now))

    def processes(self, recent_s: float = 3600.0) -> list[ProcessRow]:
        """Processes alive, and those stopped or silent for less than ``recent_s``."""
        with self.engine.connect() as conn:
            now = self.now(conn)
            rows = conn.execute(
                sa.select(nodes)
                .where(sa.func.coalesce(nodes.c.stopped_at, nodes.c.heartbeat_at) >= now - recent_s)
                .order_by(nodes.c.role, nodes.c.node_id, nodes.c.started_at)
            )
            return [ProcessRow.from_row(r, now, self.dead_after_s) for r in rows]

    def prune(self, keep_s: float = 7 * 86400.0) -> int:
        """Forget closed associations and stopped processes older than ``keep_s``."""
        with self.transaction() as conn:
            cutoff = self.now(conn) - keep_s
            old = conn.execute(associations.delete().where(sa.or_(
                sa.and_(associations.c.state != ASSOCIATION_OPEN, associations.c.closed_at < cutoff),
                sa.and_(associations.c.opened_at < cutoff,
                        associations.c.process_id.not_in(self._live_processes(cutoff + keep_s))),
            ))).rowcount or 0
            conn.execute(association_series.delete().where(
                association_series.c.association_id.not_in(sa.select(associations.c.id))))
            conn.execute(nodes.delete().where(
                sa.func.coalesce(nodes.c.stopped_at, nodes.c.heartbeat_at) < cutoff))
            return int(old)

    # --- jobs -------------------------------------------------------------------------------

    def enqueue(
        self,
        conn: Connection,
        *,
        kind: JobKind,
        dedup_key: str,
        series_uid: str,
        epoch: int,
        payload: dict[str, Any],
        priority: Priority,
        max_attempts: int,
        not_before: float | None = None,
        queue: str = "",
    ) -> int | None:
        """Insert a job unless one with ``dedup_key`` exists; returns the new id or None."""
        now = self.now(conn)
        new_id = conn.execute(self._insert_job, {
            "kind": kind,
            "dedup_key": dedup_key,
            "series_instance_uid": series_uid,
            "epoch": epoch,
            "payload": json.dumps(payload, sort_keys=True),
            "priority": int(priority),
            "state": JobState.QUEUED,
            "attempts": 0,
            "max_attempts": max_attempts,
            "not_before": not_before if not_before is not None else now,
            "created_at": now,
            "last_error": "",
            "outcome": "",
            "queue": queue,
        }).scalar()
        return int(new_id) if new_id is not None else None

    def _runnable(self, now: float) -> sa.ColumnElement[bool]:
        """Queued or failed and due; or running while its lease expired or its owner is dead."""
        return sa.or_(
            sa.and_(jobs.c.state.in_([JobState.QUEUED, JobState.FAILED]), jobs.c.not_before <= now),
            sa.and_(jobs.c.state == JobState.RUNNING,
                    sa.or_(jobs.c.lease_expires < now, jobs.c.lease_owner.in_(self._dead_processes(now)))),
        )

    def claim(self, kinds: Sequence[JobKind], owner: str, lease_s: float) -> JobRow | None:
        """Take the most urgent runnable job: queued or failed-and-due, or running with an expired
        lease or a dead owner (its worker died). Priority first, then age."""
        with self.write_transaction() as conn:
            now = self.now(conn)
            row = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.kind.in_([k.value for k in kinds]))
                .where(self._runnable(now))
                .order_by(jobs.c.priority, jobs.c.not_before, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            return self._take(conn, row.id, owner, lease_s, now)

    def claim_job(self, job_id: int, owner: str, lease_s: float) -> JobRow | None:
        """Take this job if it is runnable now (see :meth:`claim`); None if another writer has it,
        it is not due yet, or it is finished. Exactly one of several concurrent claimers wins."""
        with self.write_transaction() as conn:
            now = self.now(conn)
            taken = conn.execute(
                sa.select(jobs.c.id).where(jobs.c.id == job_id).where(self._runnable(now))
                .with_for_update(skip_locked=True)
            ).first()
            if taken is None:
                return None
            return self._take(conn, job_id, owner, lease_s, now)

    def _take(self, conn: Connection, job_id: int, owner: str, lease_s: float, now: float) -> JobRow:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(
                state=JobState.RUNNING,
                attempts=jobs.c.attempts + 1,
                lease_owner=owner,
                lease_expires=now + lease_s,
                started_at=now,
            )
        )
        return JobRow.from_row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

    def finish_job(
        self,
        conn: Connection,
        job_id: int,
        owner: str,
        state: JobState,
        *,
        error: str = "",
        outcome: dict[str, Any] | None = None,
        retry_in_s: float | None = None,
        failing_since: float | None | _Unchanged = _UNCHANGED,
    ) -> bool:
        """End an attempt; only the lease owner may (a job re-claimed after lease expiry wins)."""
        now = self.now(conn)
        values: dict[str, Any] = {
            "state": state,
            "last_error": error[:4000],
            "lease_owner": None,
            "lease_expires": None,
        }
        if state in (JobState.SUCCEEDED, JobState.DEAD):
            values["finished_at"] = now
        if state is JobState.SUCCEEDED:
            values["failing_since"] = None
        elif not isinstance(failing_since, _Unchanged):
            values["failing_since"] = failing_since
        if outcome is not None:
            values["outcome"] = json.dumps(outcome, sort_keys=True, default=str)
        if retry_in_s is not None:
            values["not_before"] = now + retry_in_s
        result = conn.execute(
            jobs.update().where(jobs.c.id == job_id).where(jobs.c.lease_owner == owner).values(**values)
        )
        return bool(result.rowcount)

    def retry_job(self, job_id: int) -> bool:
        """Operator action: put a dead or failed job back in the queue, due now, with a fresh retry
        horizon."""
        with self.transaction() as conn:
            result = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .where(jobs.c.state.in_([JobState.DEAD, JobState.FAILED]))
                .values(state=JobState.QUEUED, not_before=self.now(conn), attempts=0, last_error="",
                        failing_since=None)
            )
            return bool(result.rowcount)

    def release_stale_leases(self, owner: str) -> int:
        """At start-up: running jobs whose owner is dead run again at once. Dead means stopped or
        silent in ``nodes``, or a process of this host that no longer exists (or whose pid is now
        ours: a restarted container). Owners on other hosts that still heartbeat keep their jobs."""
        host = socket.gethostname()[:60]
        with self.transaction() as conn:
            now = self.now(conn)
            owners = set(conn.execute(
                sa.select(jobs.c.lease_owner).where(jobs.c.state == JobState.RUNNING)
                .where(jobs.c.lease_owner.is_not(None)).where(jobs.c.lease_owner != owner).distinct()
            ).scalars())
            if not owners:
                return 0
            known = {r.process_id: r for r in conn.execute(sa.select(nodes).where(nodes.c.process_id.in_(owners)))}
            dead: list[str] = []
            for candidate in owners:
                row = known.get(candidate)
                owner_host, pid = _host_and_pid(candidate)
                silent = row is not None and (row.stopped_at is not None
                                              or row.heartbeat_at < now - self.dead_after_s)
                gone_here = owner_host == host and pid is not None and (pid == os.getpid()
                                                                        or not process_exists(pid))
                if silent or gone_here:
                    dead.append(candidate)
            if not dead:
                return 0
            result = conn.execute(
                jobs.update()
                .where(jobs.c.state == JobState.RUNNING)
                .where(jobs.c.lease_owner.in_(dead))
                .values(state=JobState.QUEUED, lease_owner=None, lease_expires=None, not_before=now)
            )
            return int(result.rowcount or 0)

    def job(self, job_id: int) -> JobRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return JobRow.from_row(row) if row else None

    def list_jobs(
        self,
        *,
        kind: JobKind | None = None,
        states: Iterable[JobState] = (),
        series_uid: str | None = None,
        limit: int = 100,
    ) -> list[JobRow]:
        query = sa.select(jobs)
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        state_values = [s.value for s in states]
        if state_values:
            query = query.where(jobs.c.state.in_(state_values))
        if series_uid is not None:
            query = query.where(jobs.c.series_instance_uid == series_uid)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(jobs.c.id.desc()).limit(limit))
            return [JobRow.from_row(r) for r in rows]

    def job_counts(self) -> dict[tuple[str, str], int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs.c.kind, jobs.c.state, sa.func.count()).group_by(jobs.c.kind, jobs.c.state)
            )
            return {(r[0], r[1]): int(r[2]) for r in rows}

    def next_due(self, kinds: Sequence[JobKind]) -> float | None:
        """When the next waiting job becomes runnable (for scheduling a wake-up)."""
        with self.engine.connect() as conn:
            due = conn.execute(
                sa.select(sa.func.min(jobs.c.not_before))
                .where(jobs.c.kind.in_([k.value for k in kinds]))
                .where(jobs.c.state.in_([JobState.QUEUED, JobState.FAILED]))
            ).scalar()
            lease = conn.execute(
                sa.select(sa.func.min(jobs.c.lease_expires))
                .where(jobs.c.kind.in_([k.value for k in kinds]))
                .where(jobs.c.state == JobState.RUNNING)
            ).scalar()
        candidates = [t for t in (due, lease) if t is not None]
        return min(candidates) if candidates else None

    def unfinished_jobs(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(jobs)
                    .where(jobs.c.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.FAILED]))
                ).scalar_one()
            )

    def epoch_jobs_open(self, conn: Connection, series_uid: str, epoch: int) -> int:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(jobs)
                .where(jobs.c.series_instance_uid == series_uid)
                .where(jobs.c.epoch == epoch)
                .where(jobs.c.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.FAILED]))
            ).scalar_one()
        )

    # --- results ----------------------------------------------------------------------------

    def add_result(self, conn: Connection, **values: Any) -> int:
        """Insert a result row (idempotent on SOP Instance UID); returns its id."""
        values.setdefault("created_at", self.now(conn))
        new_id = conn.execute(self._insert_result, values).scalar()
        if new_id is not None:
            return int(new_id)
        return int(conn.execute(
            sa.select(results.c.id).where(results.c.sop_instance_uid == values["sop_instance_uid"])
        ).scalar_one())

    def result(self, result_id: int) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(results).where(results.c.id == result_id)).first()

    def results_for_series(self, series_uid: str, epoch: int | None = None) -> list[sa.Row[Any]]:
        query = sa.select(results).where(results.c.series_instance_uid == series_uid)
        if epoch is not None:
            query = query.where(results.c.epoch == epoch)
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(results.c.id)))

    def result_paths(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(results.c.path)).scalars())

    # --- notify: events and notifications -------------------------------------------------------

    def add_event(self, conn: Connection, **values: Any) -> bool:
        """Insert an event unless its (deterministic) id exists; True when inserted. Two workers
        recording the same event race on the primary key: exactly one inserts it."""
        return conn.execute(self._insert_event, values).first() is not None

    def event(self, event_id: str) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(events).where(events.c.id == event_id)).first()

    def last_event(self, conn: Connection, series_uid: str, analyzer: str, epoch: int) -> sa.Row[Any] | None:
        """The latest event of (series, analyzer) before ``epoch``, or a failure of ``epoch`` itself
        (its analyze job went dead before being replayed)."""
        return conn.execute(
            sa.select(events)
            .where(events.c.series_instance_uid == series_uid)
            .where(events.c.analyzer == analyzer)
            .where(sa.or_(events.c.epoch < epoch,
                          sa.and_(events.c.epoch == epoch, events.c.type == "analysis.failed")))
            .order_by(events.c.epoch.desc(), events.c.created_at.desc())
            .limit(1)
        ).first()

    def previous_summary(self, conn: Connection, series_uid: str, analyzer: str, epoch: int) -> dict[str, Any] | None:
        """The result summary of ``analyzer``'s SR in the latest epoch before ``epoch``."""
        row = conn.execute(
            sa.select(results.c.summary)
            .where(results.c.series_instance_uid == series_uid)
            .where(results.c.analyzer == analyzer)
            .where(results.c.kind == "sr")
            .where(results.c.epoch < epoch)
            .order_by(results.c.epoch.desc(), results.c.id.desc())
            .limit(1)
        ).first()
        return json.loads(row.summary or "{}") if row is not None else None

    def study_of(self, conn: Connection, series_uid: str) -> str:
        value = conn.execute(
            sa.select(series.c.study_instance_uid).where(series.c.series_instance_uid == series_uid)
        ).scalar()
        return str(value or "")

    def epoch_last_received(self, conn: Connection, series_uid: str, epoch: int) -> float | None:
        value = conn.execute(
            sa.select(sa.func.max(instances.c.received_at))
            .where(instances.c.series_instance_uid == series_uid)
            .where(instances.c.epoch == epoch)
        ).scalar()
        return float(value) if value is not None else None

    def add_notification(self, conn: Connection, event_id: str, channel: str, *, kind: str,
                         job_id: int | None) -> None:
        conn.execute(self._insert_notification, {
            "event_id": event_id, "channel": channel, "kind": kind, "job_id": job_id,
            "created_at": self.now(conn), "response": "", "message_ids": "[]"})

    def notification_done(self, conn: Connection, event_id: str, channel: str, *, job_id: int, sent_at: float,
                          acked_at: float, response: str, message_ids: Sequence[str]) -> None:
        conn.execute(
            notifications.update()
            .where(notifications.c.event_id == event_id)
            .where(notifications.c.channel == channel)
            .values(job_id=job_id, sent_at=sent_at, acked_at=acked_at, response=response[:2000],
                    message_ids=json.dumps(list(message_ids)))
        )

    def list_events(self, limit: int = 50, series_uid: str | None = None) -> list[sa.Row[Any]]:
        query = sa.select(events)
        if series_uid is not None:
            query = query.where(events.c.series_instance_uid == series_uid)
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(events.c.created_at.desc()).limit(limit)))

    def notifications_of(self, event_ids: Sequence[str]) -> list[sa.Row[Any]]:
        """Notifications of these events, with their job's state, attempts and last error."""
        if not event_ids:
            return []
        query = (
            sa.select(notifications, jobs.c.state, jobs.c.attempts, jobs.c.last_error)
            .select_from(notifications.outerjoin(jobs, jobs.c.id == notifications.c.job_id))
            .where(notifications.c.event_id.in_(list(event_ids)))
            .order_by(notifications.c.event_id, notifications.c.channel)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit fsyncs the WAL, so an acknowledged row survives power loss.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
