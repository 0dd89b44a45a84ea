"""Nothing acknowledged is ever lost: kill -9 during reception, restart, reconcile."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import tomlkit
from conftest import base_config
from procs import command_line, descendants, wait_all_gone
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from synthetic import ct_series

from dicomnode.config import parse_config
from dicomnode.node import Node


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(tmp_path: Path, **sections: Any) -> tuple[Path, dict[str, Any]]:
    data = base_config(tmp_path, **sections)
    path = tmp_path / "dicomnode.toml"
    path.write_text(tomlkit.dumps(data))
    return path, data


def start_serving(config: Path, port: int, *, new_session: bool = False) -> subprocess.Popen[bytes]:
    """``dicomnode serve`` as a subprocess, once it answers C-ECHO. ``new_session``: in a process
    group of its own, as in a terminal, so that a test can press Ctrl-C (SIGINT to the group)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=new_session,
    )
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if assoc.is_established:
            assoc.release()
            return proc
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("node did not start")


@pytest.mark.parametrize("kill_after", [1, 9, 23])
def test_kill_9_during_reception_loses_no_acknowledged_instance(tmp_path: Path, kill_after: int) -> None:
    port = free_port()
    # The production executor (worker processes), whose processes must die with the node.
    config_path, data = write_config(tmp_path, node={"port": port}, jobs={"workers": 1, "worker_kind": "process"})
    datasets = ct_series(30, 128, 128, seed=f"crash-{kill_after}")
    proc = start_serving(config_path, port)
    deadline = time.monotonic() + 60
    while not descendants(proc.pid):  # the executor starts its worker processes beside the receiver
        assert time.monotonic() < deadline, "no worker process started"
        time.sleep(0.05)
    family: set[tuple[int, int]] = set()
    acknowledged: list[str] = []
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                break
            if not status or status.Status != 0x0000:
                break
            acknowledged.append(ds.SOPInstanceUID)
            if len(acknowledged) == kill_after:
                family = descendants(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
    finally:
        if assoc.is_established:
            assoc.abort()
        proc.wait(timeout=30)
    assert len(acknowledged) >= kill_after
    assert family, "the node had started its worker processes"
    survivors = wait_all_gone(family)
    leftovers = [command_line(pid) for pid, _ in survivors]
    for pid, _ in survivors:  # the test must not leave them running either
        os.kill(pid, signal.SIGKILL)
    assert not survivors, leftovers

    node = Node(parse_config({**data, "jobs": {**data["jobs"], "worker_kind": "thread"}}))
    report = node.reconcile()
    try:
        assert report.missing == ()
        for sop in acknowledged:
            row = node.ledger.instance(sop)
            assert row is not None, f"acknowledged {sop} is not in the ledger"
            stored = pydicom.dcmread(node.spool.path(row.path))
            assert stored.SOPInstanceUID == sop
        assert not list(node.spool.incoming.iterdir()), "temporary debris survived reconciliation"
        on_disk = set(node.spool.files("instances"))
        assert on_disk == node.ledger.instance_paths()
        assert node.ledger.count_instances() <= len(datasets)
    finally:
        node.stop()


def spool_one(node: Node, seed: str) -> tuple[Dataset, str]:
    """Put one CT image in the spool only, as a crash between link and ledger commit leaves it."""
    ds = ct_series(1, seed=seed)[0]
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    relative = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert node.spool.write(relative, buffer.getvalue())
    return ds, relative


def test_reconcile_removes_debris_and_indexes_linked_but_uncommitted_files(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path))
    first = Node(config)
    # The two intermediate states a crash can leave: a temp file, and a linked file with no row.
    ds, relative = spool_one(first, "orphan")
    (first.spool.incoming / "deadbeef.part").write_bytes(b"half an image")
    first.stop()

    second = Node(config)
    try:
        report = second.reconcile()
        assert report.debris_removed == 1
        assert report.orphans_indexed == 1
        row = second.ledger.instance(ds.SOPInstanceUID)
        assert row is not None and row.path == relative
        assert second.ledger.series_row(ds.SeriesInstanceUID).instance_count == 1
        # Running it again changes nothing.
        assert second.reconcile() == type(report)(0, 0, ())
    finally:
        second.stop()


def test_reconcile_reports_ledger_rows_whose_file_vanished(tmp_path: Path) -> None:
    config = parse_config(base_config(tmp_path))
    node = Node(config)
    _, relative = spool_one(node, "vanish")
    node.reconcile()
    node.spool.path(relative).unlink()
    try:
        report = node.reconcile()
        assert report.missing == (relative,)
        assert any(r["event"] == "instance.missing" for r in node.audit.recent)
    finally:
        node.stop()
