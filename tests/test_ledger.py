"""The ledger with several writers, on SQLite and on PostgreSQL alike (every test runs on both).

Each ``Ledger`` object below stands for one process (receiver or worker) with its own connection
pool and its own row in ``nodes``; threads released together by a barrier make them race.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from dicomnode.assembly import Assembly
from dicomnode.audit import Audit
from dicomnode.config import parse_config
from dicomnode.domain import JobKind, JobState, Priority, SeriesState, StoredInstance
from dicomnode.jobs import JobQueue
from dicomnode.ledger import Ledger, RecordOutcome, jobs, nodes, process_identity


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


Factory = Callable[..., Ledger]


@pytest.fixture
def ledgers(url: str) -> Iterator[Factory]:
    """Open one more "process" on the ledger: its own Ledger, registered in ``nodes``."""
    opened: list[Ledger] = []

    def open_one(role: str = "serve", **kwargs: Any) -> Ledger:
        ledger = Ledger(url, **kwargs)
        ledger.register_process(role, f"node{len(opened)}", kwargs.pop("process_id", None))
        opened.append(ledger)
        return ledger

    yield open_one
    for ledger in opened:
        ledger.close()


def instance(series: str, n: int, association: str = "a1", t: float = 1_000_000.0) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=series, study_instance_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"instances/1.2.3/{series}/{series}.{n}.dcm", size=1, calling_ae="SCANNER",
        peer_host="127.0.0.1", received_at=datetime.fromtimestamp(t + n, UTC), modality="CT",
        instance_number=n, association_id=association,
    )


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released at the same moment; returns their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_every_instance_counts_once_whatever_writer_stores_it(ledgers: Factory) -> None:
    writers = [ledgers() for _ in range(4)]
    series = "1.2.3.10"

    def send(w: int) -> list[RecordOutcome]:
        # Overlapping ranges: every instance is sent by two writers, in a different order.
        numbers = list(range(w * 5, w * 5 + 10))[:: (1 if w % 2 else -1)]
        return [writers[w].record_instance(instance(series, n % 20, f"assoc{w}")) for n in numbers]

    outcomes = [o for batch in race(*(lambda w=w: send(w) for w in range(4))) for o in batch]
    assert sum(o.new for o in outcomes) == 20
    row = writers[0].series_row(series)
    assert row is not None and (row.instance_count, row.epoch_count, row.epoch) == (20, 20, 1)
    assert writers[0].count_instances() == 20


def test_late_images_from_several_writers_open_exactly_one_new_epoch(ledgers: Factory) -> None:
    writers = [ledgers() for _ in range(4)]
    series = "1.2.3.11"
    for n in range(3):
        writers[0].record_instance(instance(series, n))
    assert writers[0].mark_series(series, 1, SeriesState.QUEUED)
    late = race(*(lambda w=w: writers[w].record_instance(instance(series, 10 + w, f"late{w}")) for w in range(4)))
    assert [o.epoch for o in late] == [2, 2, 2, 2]
    assert sum(o.reopened for o in late) == 1
    row = writers[0].series_row(series)
    assert row is not None and (row.epoch, row.epoch_count, row.instance_count, row.state) == (
        2, 4, 7, SeriesState.RECEIVING)


def test_of_several_sweepers_exactly_one_completes_a_series(ledgers: Factory) -> None:
    config = parse_config({"assembly": {"quiet_period_s": 1.0}})
    sweepers = []
    for _ in range(3):
        ledger = ledgers()
        sweepers.append(Assembly(config, ledger, JobQueue(ledger, config.jobs, Audit(None)), lambda s: ["qc-ct"]))
    series = "1.2.3.12"
    for n in range(3):
        sweepers[0].ledger.record_instance(instance(series, n))
    now = sweepers[0].ledger.now() + 3600  # past every quiet period
    completions = [c for done, _ in race(*(lambda s=s: s.sweep(now) for s in sweepers)) for c in done]
    assert len(completions) == 1
    assert len(sweepers[0].ledger.list_jobs(series_uid=series)) == 1
    assert sweepers[0].ledger.series_row(series).state == SeriesState.QUEUED  # type: ignore[union-attr]


def _enqueue(ledger: Ledger, key: str = "k1") -> int:
    with ledger.transaction() as conn:
        job_id = ledger.enqueue(conn, kind=JobKind.ANALYZE, dedup_key=key, series_uid="1.2.3.13", epoch=1,
                                payload={"analyzers": ["qc-ct"]}, priority=Priority.ROUTINE, max_attempts=3)
    assert job_id is not None
    return job_id


def test_a_job_is_enqueued_once_and_claimed_by_exactly_one_worker(ledgers: Factory) -> None:
    workers = [ledgers("worker") for _ in range(5)]
    job_id = _enqueue(workers[0])
    with workers[1].transaction() as conn:  # the same dedup key again: nothing new
        assert workers[1].enqueue(conn, kind=JobKind.ANALYZE, dedup_key="k1", series_uid="1.2.3.13", epoch=1,
                                  payload={}, priority=Priority.ROUTINE, max_attempts=3) is None
    claims = race(*(lambda w=w: w.claim_job(job_id, w.process_id, 900) for w in workers))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1 and winners[0].attempts == 1
    assert winners[0].lease_owner in {w.process_id for w in workers}


def test_a_dead_owner_s_job_runs_again_at_once_and_heartbeats_renew_leases(ledgers: Factory) -> None:
    first, second = ledgers("worker"), ledgers("worker")
    job_id = _enqueue(first)
    assert first.claim_job(job_id, first.process_id, 900) is not None
    assert second.claim_job(job_id, second.process_id, 900) is None  # its owner heartbeats
    first.heartbeat("busy", lease_s=1000)
    job = first.job(job_id)
    assert job is not None and job.lease_owner == first.process_id
    with first.engine.connect() as conn:
        lease = conn.execute(sa.select(jobs.c.lease_expires).where(jobs.c.id == job_id)).scalar_one()
    assert lease == pytest.approx(first.now() + 1000, abs=30)
    _silence(first)
    again = second.claim_job(job_id, second.process_id, 900)
    assert again is not None and again.attempts == 2 and again.lease_owner == second.process_id
    # The first owner, back from the dead, cannot finish what is no longer its job.
    with first.transaction() as conn:
        assert not first.finish_job(conn, job_id, first.process_id, JobState.SUCCEEDED)


def _silence(ledger: Ledger, seconds: float = 3600) -> None:
    """Make a process look dead: its last heartbeat long ago."""
    with ledger.transaction() as conn:
        conn.execute(nodes.update().where(nodes.c.process_id == ledger.process_id)
                     .values(heartbeat_at=ledger.now(conn) - seconds))


def test_release_counts_only_when_no_live_association_still_carries_the_series(ledgers: Factory) -> None:
    one, two = ledgers(), ledgers()
    # Two associations on two receivers carry one series: the first release is not evidence.
    one.record_instance(instance("1.2.3.20", 1, "A"))
    two.record_instance(instance("1.2.3.20", 2, "B"))
    assert one.association_released("A") == 0
    assert one.series_row("1.2.3.20").released_at is None  # type: ignore[union-attr]
    assert two.association_released("B") == 1
    assert two.series_row("1.2.3.20").released_at is not None  # type: ignore[union-attr]
    # An aborted association no longer holds the other's release back.
    one.record_instance(instance("1.2.3.21", 1, "C"))
    two.record_instance(instance("1.2.3.21", 2, "D"))
    two.association_aborted("D")
    assert one.association_released("C") == 1
    # A dead receiver's associations count as closed.
    one.record_instance(instance("1.2.3.22", 1, "E"))
    two.record_instance(instance("1.2.3.22", 2, "F"))
    _silence(two)
    assert one.association_released("E") == 1


def test_two_associations_released_at_once_leave_the_evidence(ledgers: Factory) -> None:
    one, two = ledgers(), ledgers()
    for round_ in range(4):
        uid = f"1.2.3.3{round_}"
        a, b = f"A{round_}", f"B{round_}"
        one.record_instance(instance(uid, 1, a))
        two.record_instance(instance(uid, 2, b))
        race(lambda a=a: one.association_released(a), lambda b=b: two.association_released(b))
        assert one.series_row(uid).released_at is not None, f"round {round_}"  # type: ignore[union-attr]


def test_completeness_is_timed_by_the_database_clock(ledgers: Factory) -> None:
    ledger = ledgers()
    ledger.record_instance(instance("1.2.3.40", 1, t=1000.0))  # a receiver whose clock is far off
    row = ledger.series_row("1.2.3.40")
    assert row is not None
    if ledger.dialect == "sqlite":  # a local file: this host's clock is the database's
        assert row.last_received_at == 1001.0
    else:
        assert row.last_received_at == pytest.approx(ledger.now(), abs=60)


def test_leases_of_a_process_gone_from_this_host_are_released_at_start(url: str) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(gone.stdout)
    host = process_identity().split(":")[0]
    old = Ledger(url)
    new = Ledger(url)
    try:
        old.register_process("serve", "n", f"{host}:{dead_pid}:deadbeef")
        job_id = _enqueue(old)
        assert old.claim_job(job_id, old.process_id, 900) is not None
        new.register_process("serve", "n")
        # Its heartbeat is fresh, but its pid no longer exists on this host.
        assert new.release_stale_leases(new.process_id) == 1
        job = new.job(job_id)
        assert job is not None and job.state == JobState.QUEUED and job.lease_owner is None
    finally:
        old.close()
        new.close()


def test_processes_list_alive_stopped_and_dead(ledgers: Factory) -> None:
    alive, stopped, dead = ledgers("serve"), ledgers("worker"), ledgers("worker")
    stopped.process_stopped()
    _silence(dead, 120)
    states = {p.process_id: (p.alive, p.stopped_at is not None) for p in alive.processes()}
    assert states[alive.process_id] == (True, False)
    assert states[stopped.process_id] == (False, True)
    assert states[dead.process_id] == (False, False)
    _silence(dead, 30 * 86400)
    alive.prune(keep_s=86400)
    assert dead.process_id not in {p.process_id for p in alive.processes(recent_s=10**9)}


def test_the_receivers_sqlite_rows_are_those_of_the_sqlalchemy_path(tmp_path: Path) -> None:
    """On SQLite the receiver's rows are written with plain sqlite3 statements (the hot path); they
    must leave exactly the rows, and give exactly the outcomes, of the SQLAlchemy Core path that
    PostgreSQL keeps: new series, several associations, duplicates (same and other series),
    announced counts, and a late image that reopens a handed-on series."""
    fast, core = (Ledger(f"sqlite:///{tmp_path / name}") for name in ("fast.sqlite3", "core.sqlite3"))
    for ledger in (fast, core):
        ledger.register_process("serve", "node0", "host:1:fixed")

    def core_record(item: StoredInstance) -> RecordOutcome:
        with core.write_transaction() as conn:
            return core._record_core(conn, item, core.now(conn))

    items = [
        instance("1.2.3.60", 1, "A"), instance("1.2.3.60", 2, "A"), instance("1.2.3.60", 3, "B"),
        instance("1.2.3.60", 2, "B"),  # duplicate, same series
        instance("1.2.3.61", 1, "B"),
    ]
    # the same SOP Instance under another series
    items.append(dataclasses.replace(instance("1.2.3.62", 1, "C"), sop_instance_uid="1.2.3.60.1"))
    items += [dataclasses.replace(instance("1.2.3.63", n, "C"), images_in_acquisition=3, body_part="CHEST",
                                  series_description="axial", image_type="ORIGINAL\\PRIMARY")
              for n in (1, 2, 3)]
    outcomes_fast = [fast.record_instance(item) for item in items]
    outcomes_core = [core_record(item) for item in items]
    for ledger in (fast, core):  # the series is handed on; a late image opens epoch 2
        with ledger.transaction() as conn:
            conn.execute(sa.text("UPDATE series SET state = 'queued' WHERE series_instance_uid = '1.2.3.60'"))
    late = [instance("1.2.3.60", 4, "D"), instance("1.2.3.60", 5, "D")]
    outcomes_fast += [fast.record_instance(item) for item in late]
    outcomes_core += [core_record(item) for item in late]

    assert outcomes_fast == outcomes_core
    assert [o.new for o in outcomes_fast] == [True, True, True, False, True, False, True, True, True, True, True]
    assert outcomes_fast[8].expected_reached and outcomes_fast[9].reopened and outcomes_fast[9].epoch == 2

    def dump(ledger: Ledger) -> dict[str, list[tuple[Any, ...]]]:
        with ledger.transaction() as conn:
            return {table: [tuple(row) for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2"))]
                    for table in ("instances", "series", "associations", "association_series")}

    rows_fast, rows_core = dump(fast), dump(core)
    assert rows_fast == rows_core
    assert len(rows_fast["instances"]) == 9 and len(rows_fast["associations"]) == 4
    fast.close()
    core.close()
