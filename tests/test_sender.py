"""Sender: results reach the PACS exactly once through outages, restarts and refusals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from conftest import NodeFactory, store_successes, storescu
from orthanc import Orthanc
from pki import make_pki
from pynetdicom import AE, AllStoragePresentationContexts, evt
from synthetic import ct_series, write_series
from test_recovery import free_port, start_serving, write_config

from dicomnode.config import Destination, parse_config
from dicomnode.domain import JobKind, JobState
from dicomnode.errors import Permanent, Transient
from dicomnode.node import Node
from dicomnode.sender import classify, echo, store

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


class SlowPacs:
    """A Storage SCP (pynetdicom) that records what the requestor asked for and answers C-STORE
    after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requested_max_pdu: list[int] = []
        self.ae = AE(ae_title="SLOW")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_C_STORE, self._store)])

    def _requested(self, event: evt.Event) -> None:
        self.requested_max_pdu.append(int(event.assoc.requestor.maximum_length))

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_destination_scu_settings_pdu_size_and_dimse_timeout(tmp_path: Path) -> None:
    pacs = SlowPacs(delay=4.0)
    try:
        [path] = write_series(ct_series(1, seed="scu-settings"), tmp_path / "ct")
        slow = Destination(ae_title="SLOW", host="127.0.0.1", port=pacs.port, max_pdu=32768, dimse_timeout=1)
        started = time.monotonic()
        with pytest.raises(Transient, match="no C-STORE response"):
            store(path, slow, "DICOMNODE")
        assert time.monotonic() - started < 3.5, "the destination's dimse_timeout was not applied"
        patient = Destination(ae_title="SLOW", host="127.0.0.1", port=pacs.port, max_pdu=0, dimse_timeout=10)
        assert store(path, patient, "DICOMNODE") == 0x0000
        assert pacs.requested_max_pdu == [32768, 0]
    finally:
        pacs.stop()


def test_destination_acse_timeout_ends_a_silent_peer(tmp_path: Path) -> None:
    """A peer that accepts TCP and never answers A-ASSOCIATE-RQ: the destination's acse_timeout
    bounds the wait (the default is 30 s), and the delivery is retried later (Transient)."""
    [path] = write_series(ct_series(1, seed="acse-timeout"), tmp_path / "ct")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        destination = Destination(ae_title="SILENT", host="127.0.0.1", port=silent.getsockname()[1],
                                  acse_timeout=1)
        started = time.monotonic()
        with pytest.raises(Transient):
            store(path, destination, "DICOMNODE")
        assert time.monotonic() - started < 4.0, "the destination's acse_timeout was not applied"


def test_tls_destination_that_requires_a_client_certificate(make_node: NodeFactory, tmp_path: Path) -> None:
    """Our own node's TLS listener with require_client_certificate is the destination: without a
    client certificate the handshake is refused (Transient, retried); with ours, C-ECHO and C-STORE
    succeed."""
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    receiving = make_node(node={"tls": {"port": tls_port, "certificate": str(pki["server_crt"]),
                                        "private_key": str(pki["server_key"]),
                                        "ca_certificates": str(pki["ca_crt"]),
                                        "require_client_certificate": True}})
    plain = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=tls_port, tls=True,
                        ca_certificates=pki["ca_crt"])
    with pytest.raises(Transient):
        echo(plain, "ECHOSCU")
    with_certificate = plain.model_copy(update={"certificate": pki["client_crt"], "private_key": pki["client_key"]})
    assert echo(with_certificate, "ECHOSCU") == 0x0000
    [path] = write_series(ct_series(1, seed="tls-client"), tmp_path / "ct")
    assert store(path, with_certificate, "ECHOSCU") == 0x0000
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert receiving.ledger.instance(sop) is not None
    # The certificate must match the CA the listener trusts: another CA's client is refused.
    other = make_pki(tmp_path / "other-pki")
    stranger = plain.model_copy(update={"certificate": other["client_crt"], "private_key": other["client_key"]})
    with pytest.raises(Transient):
        echo(stranger, "ECHOSCU")
