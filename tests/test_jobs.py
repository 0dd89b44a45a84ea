"""Job lifecycle: a series is done when its last job ends; transient failures are retried for a
horizon (not a handful of attempts), so results survive a long PACS outage. Real Orthanc, DCMTK."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
from conftest import NodeFactory, store_successes, storescu
from orthanc import Orthanc
from synthetic import ct_series, write_series
from test_recovery import write_config
from test_sender import delivered_counts, wait_for

from dicomnode.config import parse_config
from dicomnode.domain import JobKind, JobState, SeriesState

QC_ONLY = [{"name": "ct", "match": {"modality": "CT"}, "then": {"analyzers": ["qc-ct"]}}]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_series_is_done_when_its_last_delivery_ends(make_node: NodeFactory, tmp_path: Path) -> None:
    """Issue 10 item 1: the analysis ends first; the series is done only once every delivery of
    its results has ended, and the CLI says so."""
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        sections = {"destinations": {"PACS": pacs.destination()}, "rules": QC_ONLY}
        running = make_node(**sections)
        config_path, _ = write_config(tmp_path, **sections)
        files = write_series(ct_series(4, seed="done"), tmp_path / "ct")
        assert store_successes(storescu(running.port, *files)) == 4
        running.node.run_until_idle(timeout=120)
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        jobs = running.ledger.list_jobs(series_uid=uid)
        assert {j.kind for j in jobs} == {JobKind.ANALYZE, JobKind.DELIVER}
        assert {j.state for j in jobs} == {JobState.SUCCEEDED}
        assert running.ledger.series_row(uid).state == SeriesState.DONE
        listed = cli("series", "--config", str(config_path))
        assert listed.returncode == 0, listed.stderr
        line = next(row for row in listed.stdout.splitlines() if uid in row)
        assert line.split()[0] == "done", listed.stdout
    finally:
        pacs.stop()


def test_a_pacs_down_far_longer_than_the_attempts_allow_still_gets_every_result(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """Issue 10 item 8: with 3 attempts and 0.2-0.4 s backoff, the old budget was spent in 0.6 s;
    the PACS stays down for many times that, and every result still arrives, once."""
    pacs = Orthanc(tmp_path / "orthanc")  # configured, not started: the PACS is down
    running = make_node(destinations={"PACS": pacs.destination()}, rules=QC_ONLY,
                        jobs={"max_attempts": 3, "backoff_base_s": 0.2, "backoff_max_s": 0.4,
                              "retry_for_h": 1})
    files = write_series(ct_series(4, seed="long-outage"), tmp_path / "ct")
    assert store_successes(storescu(running.port, *files)) == 4

    def attempts() -> int:
        deliveries = running.ledger.list_jobs(kind=JobKind.DELIVER)
        assert not [d for d in deliveries if d.state == JobState.DEAD], "dead-lettered during the outage"
        return min((d.attempts for d in deliveries), default=0)

    wait_for(lambda: attempts() >= 8)  # each delivery has failed 8 times: far past 3 attempts
    pacs.start()
    try:
        running.node.run_until_idle(timeout=120)
        deliveries = running.ledger.list_jobs(kind=JobKind.DELIVER)
        assert deliveries and {d.state for d in deliveries} == {JobState.SUCCEEDED}
        assert all(d.failing_since is None for d in deliveries)
        counts = delivered_counts(pacs)
        assert set(counts) == {running.ledger.result(d.payload["result_id"]).sop_instance_uid for d in deliveries}
        assert set(counts.values()) == {1}
    finally:
        pacs.stop()


def test_after_the_retry_horizon_a_delivery_is_a_dead_letter_that_can_be_replayed(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    sections = {"destinations": {"PACS": pacs.destination()}, "rules": QC_ONLY,
                # a horizon of 1.8 s, and many more attempts than max_attempts fit in it
                "jobs": {"max_attempts": 2, "backoff_base_s": 0.1, "backoff_max_s": 0.2, "retry_for_h": 0.0005}}
    running = make_node(**sections)
    config_path, _ = write_config(tmp_path, **sections)
    files = write_series(ct_series(3, seed="horizon"), tmp_path / "ct")
    started = time.monotonic()
    assert store_successes(storescu(running.port, *files)) == 3
    running.node.run_until_idle(timeout=60)
    deliveries = running.ledger.list_jobs(kind=JobKind.DELIVER)
    assert deliveries and {d.state for d in deliveries} == {JobState.DEAD}
    assert time.monotonic() - started >= 1.8
    for dead in deliveries:
        assert "gave up: still failing after" in dead.last_error and "retry_for_h = 0.0005" in dead.last_error
        assert dead.attempts > 2  # the horizon ended it, not max_attempts
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert running.ledger.series_row(uid).state == SeriesState.DONE  # dead is an end too

    pacs.start()
    try:
        for dead in deliveries:
            replay = cli("results", "retry", str(dead.id), "--config", str(config_path))
            assert replay.returncode == 0, replay.stdout + replay.stderr
        running.node.run_until_idle(timeout=60)
        assert {d.state for d in running.ledger.list_jobs(kind=JobKind.DELIVER)} == {JobState.SUCCEEDED}
        assert set(delivered_counts(pacs).values()) == {1}
    finally:
        pacs.stop()


def test_retry_settings_default_to_a_day_and_reject_negative_horizons() -> None:
    assert parse_config({}).jobs.retry_for_h >= 24
    assert parse_config({"jobs": {"workers": 0}}).jobs.workers == 0  # valid: this process runs no jobs
    import pytest

    from dicomnode.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        parse_config({"jobs": {"retry_for_h": -1}})
    assert error.value.problems == ["jobs.retry_for_h: Input should be greater than or equal to 0"]


def test_a_node_with_no_workers_runs_no_jobs_and_a_worker_process_runs_them(make_node: NodeFactory,
                                                                           tmp_path: Path) -> None:
    """``[jobs] workers = 0``: this process receives and completes series but runs no job; a
    ``dicomnode worker`` on the same ledger (here in-process, receive=False) runs them."""
    from conftest import base_config

    from dicomnode.node import Node

    receiver = make_node(jobs={"workers": 0}, rules=QC_ONLY)
    files = write_series(ct_series(3, seed="no-workers"), tmp_path / "ct")
    assert store_successes(storescu(receiver.port, *files)) == 3
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    wait_for(lambda: receiver.ledger.series_row(uid).state == SeriesState.QUEUED)
    time.sleep(1.0)  # several dispatch periods: nobody here takes the job
    assert [j.state for j in receiver.ledger.list_jobs(series_uid=uid)] == [JobState.QUEUED]

    worker = Node(parse_config(base_config(tmp_path, rules=QC_ONLY)), receive=False)
    worker.start()
    try:
        wait_for(lambda: receiver.ledger.series_row(uid).state == SeriesState.DONE)
        job = receiver.ledger.list_jobs(series_uid=uid)[0]
        assert job.state == JobState.SUCCEEDED and job.lease_owner is None
        roles = {p.role for p in receiver.ledger.processes() if p.alive}
        assert roles == {"serve", "worker"}
    finally:
        worker.stop()
