"""Receiver processes ([node] receivers > 1): one listening socket made by the node, N processes
accepting on it, writing the one ledger, dying with the node."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from conftest import NodeFactory, RunningNode
from procs import command_line, descendants, wait_all_gone
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage
from synthetic import ct_series
from test_recovery import free_port, start_serving, write_config

from dicomnode.config import ConfigError, parse_config
from dicomnode.domain import JobKind, SeriesState
from dicomnode.ledger import association_series, associations


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def associate(port: int) -> Association:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def carriers(node: RunningNode, uid: str) -> dict[str, str]:
    """association id -> process id, for the associations that carried a series."""
    with node.ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(associations.c.id, associations.c.process_id)
            .join(association_series, association_series.c.association_id == associations.c.id)
            .where(association_series.c.series_instance_uid == uid))
        return {row.id: row.process_id for row in rows}


def pid_of(process_id: str) -> int:
    return int(process_id.split(":")[1])


def audit_events(node: RunningNode, event: str) -> list[dict[str, Any]]:
    path = node.node.data_dir / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["event"] == event]


def receivers_node(make_node: NodeFactory, count: int = 2, node: dict[str, Any] | None = None,
                   **sections: Any) -> RunningNode:
    running = make_node(node={"receivers": count, **(node or {})}, **sections)
    assert len(running.node.receiver.pids()) == count
    return running


def test_receivers_setting_is_validated() -> None:
    base = {"node": {"data_dir": "/tmp/unused"}}
    for bad in (0, 17):
        with pytest.raises(ConfigError, match="node.receivers"):
            parse_config({**base, "node": {**base["node"], "receivers": bad}})
    with pytest.raises(ConfigError, match="node.listen_backlog"):
        parse_config({**base, "node": {**base["node"], "listen_backlog": 0}})
    config = parse_config(base)
    assert config.node.receivers is None and 1 <= config.node.receiver_processes <= 4
    assert config.node.listen_backlog == 128


def test_fifty_simultaneous_associations_all_succeed_and_are_indexed(make_node: NodeFactory) -> None:
    node = receivers_node(make_node, 2, node={"max_associations": 64, "negotiation_slots": 64,
                                             "negotiation_per_host": 64})
    datasets = ct_series(50, 16, 16, seed="burst")
    uid = datasets[0].SeriesInstanceUID
    together = threading.Barrier(len(datasets))
    statuses: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def send(ds: pydicom.Dataset) -> None:
        try:
            ae = AE(ae_title="PYNETDICOM")
            ae.add_requested_context(CTImageStorage)
            ae.acse_timeout = ae.network_timeout = 60
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            if not assoc.is_established:
                with lock:
                    failures.append("association not established")
                together.abort()
                return
            together.wait(timeout=120)  # all fifty are open at once
            status = assoc.send_c_store(ds)
            with lock:
                statuses.append(int(status.Status) if status else -1)
            assoc.release()
        except Exception as exc:
            with lock:
                failures.append(repr(exc))

    threads = [threading.Thread(target=send, args=(ds,)) for ds in datasets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not failures
    assert statuses == [0] * 50
    for ds in datasets:
        row = node.ledger.instance(ds.SOPInstanceUID)
        assert row is not None and node.node.spool.exists(row.path)
    assert len(set(carriers(node, uid).values())) == 2  # both receiver processes took associations


def test_one_series_over_two_receiver_processes_is_assembled_and_analysed_once(make_node: NodeFactory) -> None:
    # Only the release evidence may complete the series: a long quiet period, no expected count.
    node = receivers_node(make_node, 2, assembly={"quiet_period_s": 60})
    series = ct_series(8, 32, 32, seed="split-processes")
    uid = series[0].SeriesInstanceUID
    opened: list[Association] = []
    try:
        # Associations stay open until two receiver processes carry the series (the load-aware
        # accept makes the second one land in the idle process almost always).
        for ds in series:
            opened.append(associate(node.port))
            assert opened[-1].send_c_store(ds).Status == 0
            if len(set(carriers(node, uid).values())) == 2:
                break
        processes = set(carriers(node, uid).values())
        assert len(processes) == 2, "both receiver processes carry the series"
        assert {pid_of(p) for p in processes} == set(node.node.receiver.pids())
        for i, ds in enumerate(series[len(opened):]):
            assert opened[i % len(opened)].send_c_store(ds).Status == 0
        # Every association but the last is released, those of the other process among them: the
        # series must wait for the one still open in a live process.
        for assoc in opened[:-1]:
            assoc.release()
        time.sleep(2.0)  # release grace (0.1 s) and two sweeps
        row = node.ledger.series_row(uid)
        assert row is not None and row.state == SeriesState.RECEIVING and row.released_at is None
        opened[-1].release()
    finally:
        for assoc in opened:
            if assoc.is_established:
                assoc.abort()
    wait_for(lambda: (r := node.ledger.series_row(uid)) is not None and r.state != SeriesState.RECEIVING,
             "the series to complete on its release", timeout=20)
    node.node.run_until_idle(120)
    jobs = node.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=uid)
    assert [(j.epoch, j.outcome["instances"]) for j in jobs] == [(1, len(series))]
    row = node.ledger.series_row(uid)
    assert row is not None and (row.epoch, row.instance_count) == (1, len(series))


def test_kill_9_of_a_receiver_process_loses_nothing_acknowledged_and_it_is_restarted(
    make_node: NodeFactory,
) -> None:
    # The resend must find the series still receiving (then only its release completes it). With a
    # 30 s quiet period, one full run on a loaded machine completed epoch 1 with the 4 acknowledged
    # instances before the resend: the wait must not depend on how fast a restart is.
    node = receivers_node(make_node, 2, assembly={"quiet_period_s": 600})
    pool = node.node.receiver
    series = ct_series(12, 64, 64, seed="kill-receiver")
    uid = series[0].SeriesInstanceUID
    acknowledged: list[str] = []
    victim = 0
    assoc = associate(node.port)
    try:
        for ds in series:
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                break
            if not status or status.Status != 0:
                break
            acknowledged.append(ds.SOPInstanceUID)
            if len(acknowledged) == 4:
                (process_id,) = set(carriers(node, uid).values())
                victim = pid_of(process_id)
                os.kill(victim, signal.SIGKILL)
    finally:
        if assoc.is_established:
            assoc.abort()
    assert victim and len(acknowledged) >= 4
    assert len(acknowledged) < len(series), "the association died with its receiver process"
    for sop in acknowledged:
        row = node.ledger.instance(sop)
        assert row is not None, f"acknowledged {sop} is not in the ledger"
        assert pydicom.dcmread(node.node.spool.path(row.path)).SOPInstanceUID == sop
    # The node restarts it, and closes the dead process's association at once.
    wait_for(lambda: len(pool.pids()) == 2 and victim not in pool.pids(), "the receiver to be restarted")
    wait_for(lambda: bool(audit_events(node, "receiver.died")), "receiver.died in the audit log")
    with node.ledger.engine.connect() as conn:
        states = set(conn.execute(sa.select(associations.c.state)
                                  .where(associations.c.process_id.like(f"%:{victim}:%"))).scalars())
    assert states == {"aborted"}
    # The sender tries again: everything is answered Success, the series completes once.
    assoc = associate(node.port)
    try:
        assert [assoc.send_c_store(ds).Status for ds in series] == [0] * len(series)
    finally:
        assoc.release()
    node.node.run_until_idle(120)
    jobs = node.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=uid)
    assert [(j.epoch, j.outcome["instances"]) for j in jobs] == [(1, len(series))]
    assert node.node.reconcile().missing == ()


def test_kill_9_of_the_node_leaves_no_receiver_process(tmp_path: Path) -> None:
    port = free_port()
    config_path, _ = write_config(tmp_path, node={"port": port, "receivers": 2})
    proc = start_serving(config_path, port)
    try:
        wait_for(lambda: len(descendants(proc.pid)) >= 2, "two receiver processes")
        family = descendants(proc.pid)
        assert all("dicomnode.receivers" in command_line(pid) for pid, _ in family)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    survivors = wait_all_gone(family)
    leftovers = [command_line(pid) for pid, _ in survivors]
    for pid, _ in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, leftovers
