"""Queue: completeness, epochs, dedup and crash-safe jobs, end to end with DCMTK storescu."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import NodeFactory, run_dcmtk, store_successes, storescu
from procs import command_line, descendants, wait_all_gone
from synthetic import ct_series, write_series
from test_recovery import free_port, start_serving, write_config

from dicomnode.config import parse_config
from dicomnode.domain import JobKind, JobState, SeriesState
from dicomnode.node import Node


def analyze_jobs(node: Node, series_uid: str | None = None) -> list:
    return node.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=series_uid)


def test_two_series_interleaved_over_parallel_associations_make_two_jobs(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    running = make_node()
    a = write_series(ct_series(10, seed="inter-a", series_number=1), tmp_path / "a")
    b = write_series(ct_series(10, seed="inter-b", series_number=2), tmp_path / "b")
    # Each association carries half of each series, alternating, so arrivals interleave.
    halves = [[p for pair in zip(a[:5], b[:5], strict=True) for p in pair],
              [p for pair in zip(a[5:], b[5:], strict=True) for p in pair]]
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=lambda files=files: results.append(storescu(running.port, *files)))
               for files in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(store_successes(r) for r in results) == 20
    running.node.run_until_idle(timeout=60)
    jobs = analyze_jobs(running.node)
    assert len(jobs) == 2
    assert {j.state for j in jobs} == {JobState.SUCCEEDED}
    for job in jobs:
        assert job.outcome["instances"] == 10
        assert running.ledger.series_row(job.series_instance_uid).state == SeriesState.DONE


def test_late_instance_opens_one_new_epoch_and_resend_makes_no_job(make_node: NodeFactory,
                                                                  tmp_path: Path) -> None:
    running = make_node()
    files = write_series(ct_series(8, seed="late"), tmp_path / "late")
    assert store_successes(storescu(running.port, *files[:7])) == 7
    running.node.run_until_idle(timeout=60)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert [j.epoch for j in analyze_jobs(running.node, series_uid)] == [1]

    assert store_successes(storescu(running.port, files[7])) == 1  # late image
    running.node.run_until_idle(timeout=60)
    jobs = analyze_jobs(running.node, series_uid)
    assert sorted(j.epoch for j in jobs) == [1, 2]
    assert max(jobs, key=lambda j: j.epoch).outcome["instances"] == 8
    row = running.ledger.series_row(series_uid)
    assert (row.epoch, row.instance_count, row.state) == (2, 8, SeriesState.DONE)

    assert store_successes(storescu(running.port, *files)) == 8  # the whole series again
    running.node.run_until_idle(timeout=60)
    assert len(analyze_jobs(running.node, series_uid)) == 2
    assert running.ledger.series_row(series_uid).epoch == 2


def test_late_policy_ignore(make_node: NodeFactory, tmp_path: Path) -> None:
    running = make_node(assembly={"late_policy": "ignore", "late_window_min": 0})
    files = write_series(ct_series(4, seed="ignore"), tmp_path / "ign")
    storescu(running.port, *files[:3])
    running.node.run_until_idle(timeout=60)
    storescu(running.port, files[3])
    running.node.run_until_idle(timeout=60)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert len(analyze_jobs(running.node, series_uid)) == 1
    row = running.ledger.series_row(series_uid)
    assert row.state == SeriesState.IGNORED and "late images ignored" in row.note


def test_no_matching_rule_ignores_series_and_stat_rule_is_claimed_first(make_node: NodeFactory,
                                                                       tmp_path: Path) -> None:
    running = make_node(rules=[
        {"name": "stat heads", "match": {"modality": "CT", "series_description": "*STAT*"},
         "then": {"analyzers": ["qc-ct"], "priority": "stat"}},
        {"name": "routine CT", "match": {"modality": "CT", "series_description": "re:^ROUTINE"},
         "then": {"analyzers": ["qc-ct"]}},
    ])
    running.node.executor.stop()  # hold the queue so both jobs wait, then look at claim order
    files = {name: write_series(ct_series(3, seed=name, series_description=desc), tmp_path / name)
             for name, desc in [("r", "ROUTINE HEAD"), ("s", "HEAD STAT"), ("x", "SCOUT")]}
    for name in ("r", "s", "x"):
        storescu(running.port, *files[name])
    deadline = time.monotonic() + 30
    while running.ledger.series_in_state(SeriesState.RECEIVING) and time.monotonic() < deadline:
        running.node.sweep()
        time.sleep(0.05)
    ignored = [s for s in running.ledger.recent_series() if s.state == SeriesState.IGNORED]
    assert [s.series_description for s in ignored] == ["SCOUT"]
    claimed = running.node.queue.claim([JobKind.ANALYZE])
    assert claimed is not None and claimed.payload["rule"] == "stat heads"


def test_kill_9_while_job_runs_reruns_it_once_after_restart(tmp_path: Path) -> None:
    port = free_port()
    config_path, data = write_config(tmp_path, node={"port": port}, jobs={"workers": 1, "worker_kind": "process"},
                                     assembly={"quiet_period_s": 0.3})
    proc = start_serving(config_path, port)
    files = write_series(ct_series(60, 256, 256, seed="killjob"), tmp_path / "kj")
    try:
        assert store_successes(storescu(port, *files)) == 60
        ledger_path = Path(data["node"]["data_dir"]) / "ledger.sqlite3"
        from dicomnode.ledger import Ledger

        watcher = Ledger.sqlite(str(ledger_path))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if watcher.list_jobs(kind=JobKind.ANALYZE, states=[JobState.RUNNING]):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the analyze job never started")
        family = descendants(proc.pid)
        assert family, "the node runs its analysis in a worker process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        watcher.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Its worker processes die with it (issue 10 item 2): none is left to finish the job late.
    survivors = wait_all_gone(family)
    leftovers = [command_line(pid) for pid, _ in survivors]
    for pid, _ in survivors:  # the test must not leave them running either
        os.kill(pid, signal.SIGKILL)
    assert not survivors, leftovers
    node = Node(parse_config({**data, "jobs": {**data["jobs"], "worker_kind": "thread"}}))
    node.start()
    try:
        node.run_until_idle(timeout=120)
        jobs = analyze_jobs(node)
        assert len(jobs) == 1
        assert jobs[0].state == JobState.SUCCEEDED and jobs[0].attempts == 2
        results = node.ledger.results_for_series(jobs[0].series_instance_uid)
        assert len({r.sop_instance_uid for r in results}) == len(results) > 0
        assert sum(1 for r in node.audit.recent if r["event"] == "jobs.resumed") == 1
    finally:
        node.stop()


def test_ctrl_c_during_an_analysis_stops_the_node_and_its_workers_quietly(tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to the whole process group: each worker process used to
    die mid-job with a KeyboardInterrupt traceback. The node alone decides when its workers stop."""
    port = free_port()
    config_path, data = write_config(tmp_path, node={"port": port, "receivers": 2},
                                     jobs={"workers": 1, "worker_kind": "process"}, assembly={"quiet_period_s": 0.3})
    proc = start_serving(config_path, port, new_session=True)
    files = write_series(ct_series(60, 256, 256, seed="ctrl-c"), tmp_path / "series")
    try:
        assert store_successes(storescu(port, *files)) == 60
        from dicomnode.ledger import Ledger

        watcher = Ledger.sqlite(str(Path(data["node"]["data_dir"]) / "ledger.sqlite3"))
        deadline = time.monotonic() + 60
        while not watcher.list_jobs(kind=JobKind.ANALYZE, states=[JobState.RUNNING]):
            assert time.monotonic() < deadline, "the analyze job never started"
            time.sleep(0.01)
        watcher.close()
        family = descendants(proc.pid)
        assert family, "the node runs its analysis in a worker process"
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert not wait_all_gone(family)


def test_ctrl_c_while_a_worker_process_is_still_starting_is_ignored(capfd: pytest.CaptureFixture[str]) -> None:
    """A CI run pressed Ctrl-C while the node's worker was still importing (before its initializer
    could ignore SIGINT): KeyboardInterrupt traceback, broken pool. Signalled from its first
    instruction to its last, a worker finishes its task and prints nothing."""
    import concurrent.futures as cf

    from dicomnode.jobs import _InterruptProofSpawnContext, _worker_init

    pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=_InterruptProofSpawnContext(),
                                  initializer=_worker_init, initargs=(os.getpid(), None, ()))
    try:
        task = pool.submit(time.sleep, 1.0)  # returns once the worker is exec'd: it is starting now
        (worker,) = pool._processes.values()
        signalled = 0
        while not task.done():
            os.kill(worker.pid, signal.SIGINT)
            signalled += 1
            time.sleep(0.02)
        assert task.result() is None
    finally:
        pool.shutdown()
    assert signalled > 10
    assert "KeyboardInterrupt" not in capfd.readouterr().err


STOP_WAITER = """
import signal, sys, threading, time
from dicomnode.jobs import StopRequest
stop = StopRequest(signal.SIGTERM, signal.SIGINT)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # only that thread can take them
if sys.argv[1] == "request":
    threading.Thread(target=stop.request).start()
print("waiting", flush=True)
print(stop.wait(), flush=True)
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "request"])
def test_a_stop_reaches_the_main_thread_whichever_thread_the_kernel_hands_the_signal(how: str) -> None:
    """A Ctrl-C pressed while the node started its workers was lost: the kernel gave SIGINT to
    another thread, and the main thread slept in Event.wait() without running the handler. Here the
    main thread blocks the signals, so the kernel must hand them to the other thread."""
    waiter = subprocess.Popen([sys.executable, "-c", STOP_WAITER, how], stdout=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout is not None and waiter.stdout.readline() == "waiting\n"
        if how != "request":
            waiter.send_signal(getattr(signal, how))
        waiter.wait(timeout=30)  # TimeoutExpired: the stop never reached the main thread
        output = waiter.stdout.read()
    finally:
        waiter.kill()
    expected = 0 if how == "request" else int(getattr(signal, how))
    assert (waiter.returncode, output) == (0, f"{expected}\n")


def test_cli_lists_jobs_and_series_and_retries(make_node: NodeFactory, tmp_path: Path) -> None:
    running = make_node()
    files = write_series(ct_series(3, seed="cli"), tmp_path / "cli")
    storescu(running.port, *files)
    running.node.run_until_idle(timeout=60)
    config_path, _ = write_config(tmp_path)
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "jobs", "--config", str(config_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "analyze" in out and "succeeded" in out
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "series", "--config", str(config_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "done" in out and "HEAD ROUTINE" in out
    job = analyze_jobs(running.node)[0]
    retry = subprocess.run([sys.executable, "-m", "dicomnode.cli", "jobs", "retry", str(job.id),
                            "--config", str(config_path)], capture_output=True, text=True)
    assert retry.returncode == 1 and "not failed or dead" in retry.stdout
    run_dcmtk("echoscu", "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1", str(running.port))


def test_analysis_runs_in_a_worker_process_with_the_default_executor(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """jobs.workers >= 1 (the default) pickles the task and the handler's ``run`` into a process
    pool; a handler bound to the ledger cannot travel, so this pins the production path."""
    running = make_node(jobs={"workers": 1, "worker_kind": "process"})
    files = write_series(ct_series(4, seed="worker-process"), tmp_path / "wp")
    assert store_successes(storescu(running.port, *files)) == 4
    running.node.run_until_idle(timeout=120)
    jobs = analyze_jobs(running.node)
    assert [j.state for j in jobs] == [JobState.SUCCEEDED], [j.last_error for j in jobs]
    assert running.ledger.results_for_series(pydicom.dcmread(files[0]).SeriesInstanceUID)


def test_announced_count_completes_a_series_while_its_association_is_still_open(
    make_node: NodeFactory,
) -> None:
    """Images in Acquisition is evidence enough: no quiet period, no release needed."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    running = make_node(assembly={"quiet_period_s": 600, "release_grace_s": 600})
    series = ct_series(6, seed="announced", images_in_acquisition=True)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for ds in series[:-1]:
            assert assoc.send_c_store(ds).Status == 0x0000
        time.sleep(1.5)  # several sweep ticks: five of six announced images complete nothing
        assert analyze_jobs(running.node) == []
        assert assoc.send_c_store(series[-1]).Status == 0x0000
        deadline = time.monotonic() + 10
        while not analyze_jobs(running.node) and time.monotonic() < deadline:
            time.sleep(0.02)
        jobs = analyze_jobs(running.node, series[0].SeriesInstanceUID)
        assert len(jobs) == 1, "the sixth announced image did not complete the series"
    finally:
        assoc.release()
