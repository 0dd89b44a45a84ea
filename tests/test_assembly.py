"""Assembly: property tests over arrival order, duplicates and processing points."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.assembly import Assembly, due_time
from dicomnode.audit import Audit
from dicomnode.config import parse_config
from dicomnode.domain import JobKind, JobState, SeriesState, StoredInstance
from dicomnode.jobs import JobQueue
from dicomnode.ledger import Ledger, SeriesRow


def instance(series: int, n: int, t: float) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=f"1.2.3.{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=f"1.2.3.{series}", study_instance_uid="1.2.3", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"instances/1.2.3/1.2.3.{series}/1.2.3.{series}.{n}.dcm", size=1, calling_ae="SCANNER",
        peer_host="127.0.0.1", received_at=datetime.fromtimestamp(t, UTC), modality="CT", instance_number=n,
    )


# An event is either an arrival (series, instance number) or "process everything that is due".
events = st.lists(
    st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 6)), st.just("process")),
    min_size=1, max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=events)
def test_epochs_follow_new_instances_and_duplicates_never_trigger_work(tmp_path_factory, events) -> None:  # type: ignore[no-untyped-def]
    folder: Path = tmp_path_factory.mktemp("ledger")
    config = parse_config({"assembly": {"quiet_period_s": 1.0}})
    ledger = Ledger.sqlite(str(folder / "l.sqlite3"))
    queue = JobQueue(ledger, config.jobs, Audit(None))
    assembly = Assembly(config, ledger, queue, lambda s: ["qc-ct"])
    now = 1_000_000.0
    seen: set[tuple[int, int]] = set()
    new_since_processing: dict[int, bool] = {}
    expected_epochs: dict[int, int] = {}
    try:
        for event in events:
            now += 0.1
            if event == "process":
                now += 10  # past every quiet period
                completions, _ = assembly.sweep(now)
                for c in completions:
                    with ledger.transaction() as conn:
                        for job in ledger.list_jobs(series_uid=c.series_instance_uid,
                                                    states=[JobState.QUEUED]):
                            claimed = ledger.claim([JobKind.ANALYZE], "t", 60)
                            assert claimed is not None and claimed.id == job.id
                            ledger.finish_job(conn, job.id, "t", JobState.SUCCEEDED)
                    ledger.close_epoch_if_done(c.series_instance_uid, c.epoch)  # as JobQueue.job_ended does
                for s in new_since_processing:
                    new_since_processing[s] = False
                continue
            series, n = event
            outcome = ledger.record_instance(instance(series, n, now))
            is_new = (series, n) not in seen
            assert outcome.new == is_new
            if is_new:
                seen.add(event)
                if series not in expected_epochs:
                    expected_epochs[series] = 1
                elif not new_since_processing.get(series, True):
                    expected_epochs[series] += 1
                new_since_processing[series] = True
        assert ledger.count_instances() == len(seen)
        for series, epoch in expected_epochs.items():
            row = ledger.series_row(f"1.2.3.{series}")
            assert row is not None
            assert row.instance_count == len({n for s, n in seen if s == series})
            assert row.epoch == epoch
            jobs = ledger.list_jobs(series_uid=f"1.2.3.{series}")
            # One job per processed epoch, never more; the current epoch may still be receiving.
            assert sorted(j.epoch for j in jobs) == sorted(set(j.epoch for j in jobs))
            assert len(jobs) == epoch - (1 if row.state == SeriesState.RECEIVING else 0)
    finally:
        ledger.close()


def _row(last: float, released: float | None = None, count: int = 5, expected: int | None = None) -> SeriesRow:
    return SeriesRow(series_instance_uid="1.2", study_instance_uid="1", modality="CT", body_part="",
                     series_description="", study_description="", calling_ae="", instance_count=count,
                     epoch=1, epoch_count=count, state=SeriesState.RECEIVING, expected_count=expected,
                     first_received_at=0.0, last_received_at=last, last_association_id="a",
                     released_at=released, processed_at=None, rule="", note="")


@given(last=st.floats(0, 1e6), quiet=st.floats(0.1, 600), grace=st.floats(0, 10),
       release_delay=st.none() | st.floats(0, 100))
def test_due_time_never_later_than_quiet_period_and_release_brings_it_forward(
    last: float, quiet: float, grace: float, release_delay: float | None
) -> None:
    released = None if release_delay is None else last + release_delay
    due = due_time(_row(last, released), quiet, grace)
    assert due <= last + quiet
    if released is not None:
        assert due <= released + grace


def test_expected_count_completes_without_waiting() -> None:
    assert due_time(_row(100.0, count=10, expected=10), 30, 1) == 100.0
    assert due_time(_row(100.0, count=9, expected=10), 30, 1) == 130.0


def test_expected_count_is_reported_reached_once_and_duplicates_keep_the_first_path(tmp_path: Path) -> None:
    from dataclasses import replace

    ledger = Ledger.sqlite(str(tmp_path / "l.sqlite3"))
    try:
        announced = [replace(instance(7, n, 1000.0 + n), images_in_acquisition=3) for n in range(5)]
        reached = [ledger.record_instance(item).expected_reached for item in announced]
        assert reached == [False, False, True, False, False]  # a late 4th or 5th image wakes nothing
        moved = replace(announced[0], path="instances/1.2.3/9.9/1.2.3.7.0.dcm")
        outcome = ledger.record_instance(moved)
        assert not outcome.new and outcome.path == announced[0].path
    finally:
        ledger.close()
