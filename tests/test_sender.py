"""Sender: results reach the PACS exactly once through outages, restarts and refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import NodeFactory, store_successes, storescu
from orthanc import Orthanc
from pynetdicom import AE, AllStoragePresentationContexts, evt
from synthetic import ct_series, write_series
from test_recovery import free_port, start_serving, write_config

from dicomnode.config import Destination, parse_config
from dicomnode.domain import JobKind, JobState
from dicomnode.errors import Permanent, Transient
from dicomnode.node import Node
from dicomnode.sender import classify

DEST = Destination(ae_title="PACS", host="127.0.0.1", port=104)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(0x0000, None), (0xB000, None), (0xB007, None), (0xA700, Transient), (0xA7FF, Transient),
     (0x0110, Transient), (0xA900, Permanent), (0xC000, Permanent), (0xC123, Permanent),
     (0x0122, Permanent), (0xB00A, Permanent), (0x0124, Permanent), (0x0107, None), (0x0116, None),
     (0x0001, None), (0x0213, Transient), (0x0212, Permanent)],
)
def test_status_classification(status: int, expected: type[Exception] | None) -> None:
    error = classify(status, DEST)
    assert (type(error) if error is not None else None) is expected


def wait_for(predicate, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def delivered_counts(pacs: Orthanc) -> Counter[str]:
    return Counter(i["sop_instance_uid"] for i in pacs.instances())


def test_pacs_down_then_up_results_arrive_once(make_node: NodeFactory, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")  # configured, not started: the PACS is down
    running = make_node(destinations={"PACS": pacs.destination()},
                        jobs={"max_attempts": 50, "backoff_base_s": 0.2, "backoff_max_s": 0.5})
    files = write_series(ct_series(8, seed="down"), tmp_path / "ct")
    assert store_successes(storescu(running.port, *files)) == 8
    wait_for(lambda: running.ledger.list_jobs(kind=JobKind.DELIVER, states=[JobState.FAILED]))
    pacs.start()
    try:
        running.node.run_until_idle(timeout=120)
        deliveries = running.ledger.list_jobs(kind=JobKind.DELIVER)
        assert deliveries and {d.state for d in deliveries} == {JobState.SUCCEEDED}
        assert max(d.attempts for d in deliveries) >= 2
        counts = delivered_counts(pacs)
        assert set(counts) == {running.ledger.result(d.payload["result_id"]).sop_instance_uid
                               for d in deliveries}
        assert set(counts.values()) == {1}
    finally:
        pacs.stop()


def test_node_killed_during_backoff_still_delivers_once(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc")
    port = free_port()
    config_path, data = write_config(
        tmp_path, node={"port": port}, destinations={"PACS": pacs.destination()},
        jobs={"max_attempts": 50, "backoff_base_s": 5, "backoff_max_s": 5})
    proc = start_serving(config_path, port)
    from dicomnode.ledger import Ledger

    try:
        files = write_series(ct_series(6, seed="killbackoff"), tmp_path / "ct")
        assert store_successes(storescu(port, *files)) == 6
        watcher = Ledger.sqlite(str(Path(data["node"]["data_dir"]) / "ledger.sqlite3"))
        wait_for(lambda: watcher.list_jobs(kind=JobKind.DELIVER, states=[JobState.FAILED]))
        watcher.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    pacs.start()
    node = Node(parse_config({**data, "jobs": {**data["jobs"], "backoff_base_s": 0.2, "backoff_max_s": 0.2}}))
    node.start()
    try:
        node.run_until_idle(timeout=120)
        deliveries = node.ledger.list_jobs(kind=JobKind.DELIVER)
        assert deliveries and {d.state for d in deliveries} == {JobState.SUCCEEDED}
        counts = delivered_counts(pacs)
        assert len(counts) == len(deliveries) and set(counts.values()) == {1}
    finally:
        node.stop()
        pacs.stop()


class RefusingPacs:
    """A Storage SCP (pynetdicom) that answers every C-STORE with a fixed status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.received: list[str] = []
        self.ae = AE(ae_title="REFUSER")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def destination(self) -> dict[str, object]:
        return {"ae_title": "REFUSER", "host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        self.server.shutdown()


def test_a900_refusal_is_a_dead_letter_and_retry_requeues(make_node: NodeFactory, tmp_path: Path) -> None:
    pacs = RefusingPacs(0xA900)
    running = make_node(destinations={"PACS": pacs.destination()})
    try:
        files = write_series(ct_series(4, seed="a900"), tmp_path / "ct")
        assert store_successes(storescu(running.port, *files)) == 4
        running.node.run_until_idle(timeout=120)
        dead = running.ledger.list_jobs(kind=JobKind.DELIVER, states=[JobState.DEAD])
        assert dead and all("0xA900" in d.last_error and d.attempts == 1 for d in dead)
        assert any(r["event"] == "result.dead" for r in running.node.audit.recent)
        config_path, _ = write_config(tmp_path, destinations={"PACS": pacs.destination()})
        listing = subprocess.run([sys.executable, "-m", "dicomnode.cli", "results", "--config",
                                  str(config_path)], capture_output=True, text=True, check=True).stdout
        assert "dead" in listing and "0xA900" in listing
        pacs.status = 0x0000  # the PACS was fixed; the operator replays the dead letter
        retry = subprocess.run([sys.executable, "-m", "dicomnode.cli", "results", "retry", str(dead[0].id),
                                "--config", str(config_path)], capture_output=True, text=True)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        running.node.run_until_idle(timeout=60)
        assert running.ledger.job(dead[0].id).state == JobState.SUCCEEDED
    finally:
        pacs.stop()


def test_association_reject_is_permanent(make_node: NodeFactory, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        wrong = {**pacs.destination(), "ae_title": "NOT_ORTHANC"}
        running = make_node(destinations={"PACS": wrong})
        files = write_series(ct_series(3, seed="reject"), tmp_path / "ct")
        storescu(running.port, *files)
        running.node.run_until_idle(timeout=60)
        dead = running.ledger.list_jobs(kind=JobKind.DELIVER, states=[JobState.DEAD])
        assert dead and all("association rejected" in d.last_error for d in dead)
        assert pacs.instances() == []
    finally:
        pacs.stop()
