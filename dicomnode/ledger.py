"""The ledger: the one source of truth for instances, series, jobs and results.

SQLAlchemy Core over SQLite (WAL, ``synchronous=FULL``, so a committed row survives power loss) by
default, or PostgreSQL for a multi-node site. Every stage after the receiver is a state transition
here, so a restarted node resumes from the ledger, never from memory. The ledger stores what it is
given; it never parses DICOM.

Receiver writes go through :class:`_GroupCommitter`: rows of concurrent associations that wait
while a commit is in progress are committed together in the next transaction, so N parallel stores
share one fsync; a lone association commits in its own thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dicomnode.domain import (
    JobKind,
    JobState,
    Priority,
    SeriesState,
    SeriesSummary,
    StoredInstance,
)

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


_SELECT_INSTANCE_EPOCH = sa.select(instances.c.epoch, instances.c.path).where(
    instances.c.sop_instance_uid == sa.bindparam("sop")
)
_SELECT_SERIES_STATE = sa.select(
    series.c.epoch, series.c.state, series.c.instance_count, series.c.expected_count
).where(
    series.c.series_instance_uid == sa.bindparam("uid")
)
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


def _now() -> float:
    return time.time()


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
        )


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


class _GroupCommitter:
    """Group commit of the receivers' rows, without a writer thread.

    Each caller queues its row, then takes the commit lock; whoever holds it commits every queued
    row in one transaction (one fsync), its own included, and wakes their owners. A lone
    association therefore commits in its own thread with no hand-off between threads, while rows
    of concurrent associations that queue during a commit share the next one. The lock also keeps
    two commits from racing each other's series upserts.
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
                with self._ledger.engine.begin() as conn:
                    outcomes = [self._ledger._record(conn, item) for item, _ in batch]
            except Exception:
                # One bad row must not refuse its neighbours: redo them one transaction each.
                for item, slot in batch:
                    self._commit_one(item, slot)
            else:
                for (_, slot), outcome in zip(batch, outcomes, strict=True):
                    slot.set(outcome)
        finally:
            # Whatever escaped (KeyboardInterrupt, MemoryError...), no row that left the queue may be
            # left unanswered: its owner would wait for it for ever, holding the commit lock.
            for _, slot in batch:
                if not slot.done:
                    slot.fail(RuntimeError("ledger commit interrupted"))

    def _commit_one(self, item: StoredInstance, slot: _Slot) -> None:
        try:
            with self._ledger.engine.begin() as conn:
                slot.set(self._ledger._record(conn, item))
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


class Ledger:
    """State transitions on the ledger database. Thread-safe; one instance per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = sa.create_engine(url, future=True, pool_pre_ping=False)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        # Created on first use; the lock matters: two committers would race each other's series
        # upserts.
        self._committer: _GroupCommitter | None = None
        self._committer_lock = threading.Lock()

    @classmethod
    def sqlite(cls, path: str) -> Ledger:
        return cls(f"sqlite:///{path}")

    def close(self) -> None:
        with self._committer_lock:
            if self._committer is not None:
                self._committer.close()
                self._committer = None
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- instances and series ---------------------------------------------------------------

    def record_instance(self, item: StoredInstance) -> RecordOutcome:
        """Commit an instance row and its series upsert durably; safe to call from many threads."""
        with self._committer_lock:
            if self._committer is None:
                self._committer = _GroupCommitter(self)
            committer = self._committer
        return committer.submit(item)

    def _record(self, conn: Connection, item: StoredInstance) -> RecordOutcome:
        # Prebuilt statements (module level): building and cache-keying a fresh Core statement per
        # row cost more than executing it, once per C-STORE.
        existing = conn.execute(_SELECT_INSTANCE_EPOCH, {"sop": item.sop_instance_uid}).first()
        if existing is not None:
            return RecordOutcome(new=False, epoch=existing.epoch, reopened=False, path=existing.path)
        current = conn.execute(_SELECT_SERIES_STATE, {"uid": item.series_instance_uid}).first()
        received = item.received_at.timestamp()
        expected = item.images_in_acquisition or None
        if item.temporal_positions and expected:
            expected *= item.temporal_positions
        reopened = False
        # Mirrors assembly.due_time's expected-count rule, so the node can sweep at once.
        count = 1 if current is None else current.instance_count + 1
        announced = expected or (current.expected_count if current is not None else None)
        if current is None:
            epoch = 1
            conn.execute(
                series.insert(),
                {
                    "series_instance_uid": item.series_instance_uid,
                    "study_instance_uid": item.study_instance_uid,
                    "modality": item.modality,
                    "body_part": item.body_part,
                    "series_description": item.series_description,
                    "study_description": item.study_description,
                    "calling_ae": item.calling_ae,
                    "instance_count": 1,
                    "epoch": 1,
                    "epoch_count": 1,
                    "state": SeriesState.RECEIVING,
                    "expected_count": expected,
                    "first_received_at": received,
                    "last_received_at": received,
                    "last_association_id": item.association_id,
                    "released_at": None,
                },
            )
        else:
            epoch = current.epoch
            if current.state != SeriesState.RECEIVING:
                # A late image for a series already handed on: it opens a new epoch.
                epoch = current.epoch + 1
                reopened = True
            values = {"uid": item.series_instance_uid, "received": received,
                      "association": item.association_id, "expected": expected}
            if reopened:
                conn.execute(_UPDATE_SERIES_REOPEN, {**values, "new_epoch": epoch})
            else:
                conn.execute(_UPDATE_SERIES, values)
        conn.execute(
            instances.insert(),
            {
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
            },
        )
        return RecordOutcome(new=True, epoch=epoch, reopened=reopened,
                             expected_reached=bool(announced) and count == announced)

    def association_released(self, association_id: str, at: float | None = None) -> int:
        """Evidence for completeness: the sender ended the association that carried the last
        instance of these series. Returns how many series were marked."""
        with self.engine.begin() as conn:
            result = conn.execute(
                series.update()
                .where(series.c.last_association_id == association_id)
                .where(series.c.state == SeriesState.RECEIVING)
                .values(released_at=at if at is not None else _now())
            )
            return int(result.rowcount or 0)

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
        self, series_uid: str, epoch: int, state: SeriesState, *, rule: str = "", note: str = ""
    ) -> bool:
        """Move the series to ``state`` if it is still at ``epoch`` (a newer epoch wins)."""
        values: dict[str, Any] = {"state": state, "note": note[:500]}
        if state in (SeriesState.QUEUED, SeriesState.IGNORED):
            values["processed_at"] = _now()
            values["rule"] = rule[:100]
        with self.engine.begin() as conn:
            result = conn.execute(
                series.update()
                .where(series.c.series_instance_uid == series_uid)
                .where(series.c.epoch == epoch)
                .values(**values)
            )
            return bool(result.rowcount)

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
    ) -> int | None:
        """Insert a job unless one with ``dedup_key`` exists; returns the new id or None."""
        exists = conn.execute(sa.select(jobs.c.id).where(jobs.c.dedup_key == dedup_key)).first()
        if exists is not None:
            return None
        now = _now()
        result = conn.execute(
            jobs.insert().values(
                kind=kind,
                dedup_key=dedup_key,
                series_instance_uid=series_uid,
                epoch=epoch,
                payload=json.dumps(payload, sort_keys=True),
                priority=int(priority),
                state=JobState.QUEUED,
                attempts=0,
                max_attempts=max_attempts,
                not_before=not_before if not_before is not None else now,
                created_at=now,
                last_error="",
                outcome="",
            )
        )
        return _new_id(result)

    def claim(self, kinds: Sequence[JobKind], owner: str, lease_s: float) -> JobRow | None:
        """Take the most urgent runnable job: queued or failed-and-due, or running with an expired
        lease (its worker died). Priority first, then age."""
        now = _now()
        runnable = sa.or_(
            sa.and_(jobs.c.state.in_([JobState.QUEUED, JobState.FAILED]), jobs.c.not_before <= now),
            sa.and_(jobs.c.state == JobState.RUNNING, jobs.c.lease_expires < now),
        )
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "sqlite":
                # Take the write lock first so two claimers cannot pick the same row.
                conn.exec_driver_sql("UPDATE jobs SET id = id WHERE 0")
            row = conn.execute(
                sa.select(jobs)
                .where(jobs.c.kind.in_([k.value for k in kinds]))
                .where(runnable)
                .order_by(jobs.c.priority, jobs.c.not_before, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            conn.execute(
                jobs.update()
                .where(jobs.c.id == row.id)
                .values(
                    state=JobState.RUNNING,
                    attempts=jobs.c.attempts + 1,
                    lease_owner=owner,
                    lease_expires=now + lease_s,
                    started_at=now,
                )
            )
            claimed = conn.execute(sa.select(jobs).where(jobs.c.id == row.id)).one()
        return JobRow.from_row(claimed)

    def finish_job(
        self,
        conn: Connection,
        job_id: int,
        owner: str,
        state: JobState,
        *,
        error: str = "",
        outcome: dict[str, Any] | None = None,
        not_before: float | None = None,
    ) -> bool:
        """End an attempt; only the lease owner may (a job re-claimed after lease expiry wins)."""
        values: dict[str, Any] = {
            "state": state,
            "last_error": error[:4000],
            "lease_owner": None,
            "lease_expires": None,
        }
        if state in (JobState.SUCCEEDED, JobState.DEAD):
            values["finished_at"] = _now()
        if outcome is not None:
            values["outcome"] = json.dumps(outcome, sort_keys=True, default=str)
        if not_before is not None:
            values["not_before"] = not_before
        result = conn.execute(
            jobs.update().where(jobs.c.id == job_id).where(jobs.c.lease_owner == owner).values(**values)
        )
        return bool(result.rowcount)

    def retry_job(self, job_id: int) -> bool:
        """Operator action: put a dead or failed job back in the queue, due now."""
        with self.engine.begin() as conn:
            result = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .where(jobs.c.state.in_([JobState.DEAD, JobState.FAILED]))
                .values(state=JobState.QUEUED, not_before=_now(), attempts=0, last_error="")
            )
            return bool(result.rowcount)

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
        existing = conn.execute(
            sa.select(results.c.id).where(results.c.sop_instance_uid == values["sop_instance_uid"])
        ).first()
        if existing is not None:
            return int(existing.id)
        values.setdefault("created_at", _now())
        return _new_id(conn.execute(results.insert().values(**values)))

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
        """Insert an event unless its (deterministic) id exists; True when inserted."""
        if conn.execute(sa.select(events.c.id).where(events.c.id == values["id"])).first() is not None:
            return False
        conn.execute(events.insert().values(**values))
        return True

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
        exists = conn.execute(
            sa.select(notifications.c.event_id)
            .where(notifications.c.event_id == event_id)
            .where(notifications.c.channel == channel)
        ).first()
        if exists is None:
            conn.execute(notifications.insert().values(event_id=event_id, channel=channel, kind=kind, job_id=job_id,
                                                       created_at=_now(), response="", message_ids="[]"))

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


def _new_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit fsyncs the WAL, so an acknowledged row survives power loss.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
