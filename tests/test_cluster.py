"""Cluster mode against real components: PostgreSQL (started by the fixtures), Procrastinate
workers, several `dicomnode serve` receivers (two of them sharing one port with SO_REUSEPORT), a
real Orthanc as the PACS, DCMTK and pynetdicom as scanners. The scenarios of issue 11.

The processes of one cluster are shared by the scenarios of this module; the scenarios that kill a
process run last and start it again. Series are small: the point is who does what, not speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
import tomlkit
from conftest import base_config, store_successes, storescu
from orthanc import Orthanc, free_port
from postgres import Postgres
from procs import command_line, descendants, wait_all_gone
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from synthetic import ct_series, write_series

from dicomnode.config import parse_config
from dicomnode.domain import JobKind, JobState, SeriesState
from dicomnode.errors import ConfigError
from dicomnode.ledger import Ledger, association_series, associations
from dicomnode.node import Node

HEARTBEAT_S, DEAD_AFTER_S = 0.5, 3.0
RULES = [
    # Scenario 3 resends a series after a receiver died: its quiet period must outlast the wait.
    {"name": "resent", "match": {"series_description": "RESENT*"},
     "then": {"analyzers": ["qc-ct"], "quiet_period_s": 30}},
    {"name": "ct", "match": {"modality": "CT"}, "then": {"analyzers": ["qc-ct"]}},
]


def cluster_config(tmp: Path, name: str, url: str, spool: Path, port: int, pacs: Orthanc) -> dict[str, Any]:
    data = base_config(tmp / name, node={"port": port}, destinations={"PACS": pacs.destination()}, rules=RULES,
                       assembly={"quiet_period_s": 1.0, "release_grace_s": 0.3},
                       cluster={"ledger_url": url, "spool_root": str(spool), "node_id": name,
                                "heartbeat_s": HEARTBEAT_S, "dead_after_s": DEAD_AFTER_S})
    data["jobs"] = {"workers": 1, "poll_interval_s": 0.3, "backoff_base_s": 0.3, "backoff_max_s": 0.6}
    return data


@dataclass
class Member:
    """One process of the cluster: a receiver (`serve`) or a worker."""

    name: str
    command: str
    config: Path
    port: int = 0
    args: tuple[str, ...] = ()  # e.g. a worker's --queues
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.config.with_suffix(".log")

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", self.command, "--config",
                                          str(self.config), *self.args], stdout=out, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_9(self) -> set[tuple[int, int]]:
        """kill -9; returns the processes it had started, which must not outlive it."""
        assert self.proc is not None
        family = descendants(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return family

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        try:
            return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


@dataclass
class Cluster:
    url: str
    pacs: Orthanc
    spool: Path
    members: dict[str, Member]
    ledger: Ledger

    def port(self, name: str) -> int:
        return self.members[name].port

    def logs(self) -> str:
        return "\n".join(m.tail() for m in self.members.values())

    def wait_ready(self, names: list[str] | None = None, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for member in (self.members[n] for n in names or list(self.members)):
            while True:
                assert member.running, f"{member.name} exited:\n{member.tail()}"
                if member.command == "serve" and echo(member.port):
                    break
                if member.command == "worker" and member.proc is not None and any(
                        p.alive and p.pid == member.proc.pid for p in self.ledger.processes()):
                    break
                assert time.monotonic() < deadline, f"{member.name} did not start:\n{member.tail()}"
                time.sleep(0.2)

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 120, poll: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(poll)

    def series_done(self, uid: str, epoch: int = 1) -> bool:
        row = self.ledger.series_row(uid)
        return row is not None and row.epoch == epoch and row.state == SeriesState.DONE

    def in_pacs(self, study_uid: str) -> Counter[str]:
        """SOP Instance UIDs of our result objects in Orthanc for a study, with how often each
        was stored (Orthanc counts a re-stored instance once; its /changes keeps every store)."""
        counts: Counter[str] = Counter()
        since = 0
        while True:
            page = self.pacs.get(f"/changes?since={since}&limit=1000")
            for change in page["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    tags = self.pacs.get(f"/instances/{change['ID']}/simplified-tags")
                    if tags.get("StudyInstanceUID") == study_uid and tags.get("Modality") in ("SR", "SEG"):
                        counts[tags["SOPInstanceUID"]] += 1
            since = page["Last"]
            if page["Done"]:
                return counts

    def analyze_jobs(self, uid: str) -> list[Any]:
        return self.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=uid)

    def delivered(self, uid: str) -> bool:
        deliveries = self.ledger.list_jobs(kind=JobKind.DELIVER, series_uid=uid)
        return bool(deliveries) and all(d.state == JobState.SUCCEEDED for d in deliveries)


def echo(port: int) -> bool:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if assoc.is_established:
        assoc.release()
        return True
    return False


@pytest.fixture(scope="module")
def cluster(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    url = postgres.create_database("cluster")
    pacs = Orthanc(tmp / "orthanc").start()
    spool = tmp / "shared-spool"
    shared_port = free_port()
    # rx1 and rx2 have a port each; rx3 and rx4 share one (SO_REUSEPORT).
    ports = {"rx1": free_port(), "rx2": free_port(), "rx3": shared_port, "rx4": shared_port, "w1": 0, "w2": 0}
    members: dict[str, Member] = {}
    for name, port in ports.items():
        path = tmp / f"{name}.toml"
        path.write_text(tomlkit.dumps(cluster_config(tmp, name, url, spool, port, pacs)))
        members[name] = Member(name, "worker" if name.startswith("w") else "serve", path, port)
    ledger = Ledger(url, dead_after_s=DEAD_AFTER_S)  # creates the schema before the processes race for it
    result = Cluster(url, pacs, spool, members, ledger)
    try:
        for member in members.values():
            member.start()
        result.wait_ready()
        yield result
    finally:
        for member in members.values():
            member.stop()
        ledger.close()
        pacs.stop()


def send_split(ports: list[int], datasets: list[pydicom.Dataset]) -> list[int]:
    """One series over len(ports) concurrent associations (one per port): each association stores
    its first image before any goes on, so all of them carry the series at once; then each sends
    its share and releases. Returns the statuses."""
    shares = [datasets[i::len(ports)] for i in range(len(ports))]
    started = threading.Barrier(len(ports))
    statuses: list[int] = []
    lock = threading.Lock()

    def send(port: int, share: list[pydicom.Dataset]) -> None:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            for i, ds in enumerate(share):
                status = assoc.send_c_store(ds)
                with lock:
                    statuses.append(int(status.Status))
                if i == 0:
                    started.wait(timeout=60)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(p, s)) for p, s in zip(ports, shares, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return statuses


def carriers(ledger: Ledger, uid: str) -> set[str]:
    """The processes whose associations carried a series."""
    with ledger.engine.connect() as conn:
        return set(conn.execute(
            sa.select(associations.c.process_id)
            .join(association_series, association_series.c.association_id == associations.c.id)
            .where(association_series.c.series_instance_uid == uid)).scalars())


@pytest.mark.slow
def test_one_series_over_three_receivers_is_analysed_once(cluster: Cluster) -> None:
    """Scenario 1, then scenario 6: a late image sent to two receivers at once opens epoch 2 once."""
    series = ct_series(9, 64, 64, seed="cluster-split")
    uid, study = series[0].SeriesInstanceUID, series[0].StudyInstanceUID
    statuses = send_split([cluster.port("rx1"), cluster.port("rx2"), cluster.port("rx3")], series[:-2])
    assert statuses == [0] * 7
    assert len(carriers(cluster.ledger, uid)) == 3  # three receiver processes took part
    cluster.wait(lambda: cluster.series_done(uid) and cluster.delivered(uid), "the series to be delivered")
    jobs = cluster.analyze_jobs(uid)
    assert [(j.epoch, j.state, j.outcome["instances"]) for j in jobs] == [(1, JobState.SUCCEEDED, 7)]
    results = cluster.ledger.results_for_series(uid)
    assert cluster.in_pacs(study) == Counter({r.sop_instance_uid: 1 for r in results})

    # Scenario 6: two late images reach two receivers at the same moment.
    late = send_split([cluster.port("rx1"), cluster.port("rx2")], series[-2:])
    assert late == [0, 0]
    cluster.wait(lambda: cluster.series_done(uid, epoch=2) and cluster.delivered(uid), "epoch 2")
    jobs = cluster.analyze_jobs(uid)
    assert sorted((j.epoch, j.outcome["instances"]) for j in jobs) == [(1, 7), (2, 9)]
    row = cluster.ledger.series_row(uid)
    assert row is not None and (row.epoch, row.epoch_count, row.instance_count) == (2, 2, 9)


@pytest.mark.slow
def test_receivers_share_a_port_and_both_take_associations(cluster: Cluster) -> None:
    series = ct_series(12, 32, 32, seed="cluster-reuseport")
    uid = series[0].SeriesInstanceUID
    for ds in series:  # one association per image: the kernel spreads them over both listeners
        assert send_split([cluster.port("rx3")], [ds]) == [0]
    members = {m.proc.pid for m in (cluster.members["rx3"], cluster.members["rx4"]) if m.proc is not None}
    pids = {int(p.split(":")[1]) for p in carriers(cluster.ledger, uid)}
    assert pids == members, "both receivers on the shared port took associations"
    cluster.wait(lambda: cluster.series_done(uid), "the series")
    assert len(cluster.analyze_jobs(uid)) == 1


def test_nodes_lists_every_receiver_and_worker(cluster: Cluster) -> None:
    listed = subprocess.run([sys.executable, "-m", "dicomnode.cli", "nodes", "--config",
                             str(cluster.members["rx1"].config)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    for member in cluster.members.values():
        assert member.proc is not None
        row = rows[member.name]
        assert row[1] == member.command and row[2] == "alive" and int(row[3]) == member.proc.pid
    assert "worker [analyze-cpu,deliver,notify]" in listed.stdout
    # The other commands read the shared ledger too: the series of the scenarios above.
    series = subprocess.run([sys.executable, "-m", "dicomnode.cli", "series", "--config",
                             str(cluster.members["rx2"].config)], capture_output=True, text=True, timeout=60)
    assert series.returncode == 0, series.stderr
    assert [line.split()[0] for line in series.stdout.splitlines()[1:]] == [
        s.state for s in cluster.ledger.recent_series()] != []


def test_an_unreachable_ledger_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(tomlkit.dumps(base_config(tmp_path, cluster={
        "ledger_url": f"postgresql+psycopg://postgres@/none?host={tmp_path / 'no-socket'}",
        "spool_root": str(tmp_path / "spool")})))
    for command in ("serve", "worker", "db"):
        args = ["db", "upgrade"] if command == "db" else [command]
        started = subprocess.run([sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 1, started.stderr
        lines = started.stderr.strip().splitlines()
        assert len(lines) == 1 and "postgresql+psycopg://postgres@/none" in lines[0], started.stderr


def test_worker_refuses_a_queue_that_is_not_configured(cluster: Cluster) -> None:
    refused = subprocess.run([sys.executable, "-m", "dicomnode.cli", "worker", "--config",
                              str(cluster.members["w1"].config), "--queues", "analyze-cpu,gpu"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "unknown queue(s) gpu (configured: analyze-cpu, deliver, notify)"


@pytest.mark.slow
def test_analyzers_that_ask_for_a_gpu_go_to_the_gpu_queue(pg_url: str, tmp_path: Path) -> None:
    """A model whose manifest says ``gpu = true`` gets its own analyze job on the GPU queue; the
    CPU analyzers of the same series stay on the CPU queue. The reconciler defers both."""
    shipped = Path(__file__).resolve().parent.parent / "dicomnode" / "models" / "shipped" / "demo_hyperdense"
    model = tmp_path / "models" / "gpu-demo"
    shutil.copytree(shipped, model)
    manifest = (model / "manifest.toml").read_text()
    (model / "manifest.toml").write_text(manifest.replace('name = "demo-hyperdense"', 'name = "gpu-demo"\ngpu = true'))
    data = cluster_config(tmp_path, "rx", pg_url, tmp_path / "spool", 0, Orthanc(tmp_path / "orthanc"))
    data["cluster"]["queues"] = {"analyze_gpu": "analyze-gpu"}
    data["analysis"] = {"shipped_models": False, "model_dirs": [str(model)]}
    data["rules"] = [{"name": "both", "match": {"modality": "CT"}, "then": {"analyzers": ["qc-ct", "gpu-demo"]}}]
    node = Node(parse_config(data))
    node.start()
    try:
        files = write_series(ct_series(3, 64, 64, seed="cluster-gpu"), tmp_path / "ct")
        assert store_successes(storescu(node.receiver.ports[0], *files)) == 3
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        deadline = time.monotonic() + 60
        while len(node.ledger.list_jobs(series_uid=uid)) < 2:
            assert time.monotonic() < deadline, "the series was not completed"
            time.sleep(0.1)
        jobs = {tuple(j.payload["analyzers"]): j for j in node.ledger.list_jobs(series_uid=uid)}
        assert {names: j.queue for names, j in jobs.items()} == {("qc-ct",): "analyze-cpu",
                                                                 ("gpu-demo",): "analyze-gpu"}

        def engine_queues() -> dict[str, str]:
            with node.ledger.engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT queueing_lock, queue_name FROM procrastinate_jobs"))
                return {str(r[0]): str(r[1]) for r in rows}

        while len(engine_queues()) < 2:
            assert time.monotonic() < deadline, "the jobs were not deferred to the engine"
            time.sleep(0.1)
        assert engine_queues() == {f"dicomnode-job-{j.id}": j.queue for j in jobs.values()}
    finally:
        node.stop()


@pytest.mark.slow
def test_a_positive_result_is_told_to_the_ris_by_the_workers(pg_url: str, tmp_path: Path) -> None:
    """Notify in cluster mode: the receiver runs no jobs; the worker of the analyze queue raises
    ``finding.critical`` in the results' transaction and the worker of the notify queue (the only
    one listening there) sends the ORU to a real MLLP listener, which acknowledges it once. The
    event's times, read on different processes, are on the ledger's clock and in order."""
    from mllp_listener import MllpListener
    from notify_fixtures import head_ct, write_model

    listener = MllpListener(tmp_path / "mllp")
    data = base_config(tmp_path / "rx", assembly={"quiet_period_s": 1.0, "release_grace_s": 0.3},
                       cluster={"ledger_url": pg_url, "spool_root": str(tmp_path / "spool"), "node_id": "rx",
                                "heartbeat_s": HEARTBEAT_S, "dead_after_s": DEAD_AFTER_S},
                       analysis={"shipped_models": False, "model_dirs": [str(write_model(tmp_path / "models"))]},
                       rules=[{"name": "head", "match": {"body_part": "HEAD"},
                               "then": {"analyzers": ["test-bleed"], "notify": ["RIS"]}}],
                       notify={"RIS": listener.channel()})
    data["jobs"] = {"workers": 1, "poll_interval_s": 0.3, "backoff_base_s": 0.3, "backoff_max_s": 0.6}
    config = tmp_path / "cluster.toml"
    config.write_text(tomlkit.dumps(data))
    workers = [Member("w-analyze", "worker", config, args=("--queues", "analyze-cpu")),
               Member("w-notify", "worker", config.with_name("notify.toml"), args=("--queues", "notify"))]
    shutil.copy(config, workers[1].config)
    node = Node(parse_config(data))  # the receiver: in cluster mode it runs no jobs itself
    node.start()
    try:
        for worker in workers:
            worker.start()
        files = write_series(head_ct("cluster-notify")[:8], tmp_path / "ct")
        assert store_successes(storescu(node.receiver.ports[0], *files)) == 8
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        deadline = time.monotonic() + 180
        while not (notify := node.ledger.list_jobs(kind=JobKind.NOTIFY, series_uid=uid,
                                                   states=[JobState.SUCCEEDED, JobState.DEAD])):
            assert all(w.running for w in workers), "\n".join(w.tail() for w in workers)
            assert time.monotonic() < deadline, "no notification ended\n" + "\n".join(w.tail() for w in workers)
            time.sleep(0.3)
        (job,) = notify
        assert job.state == JobState.SUCCEEDED and job.queue == "notify", job
        (event,) = node.ledger.list_events(series_uid=uid)
        assert (event.type, event.analyzer, event.epoch) == ("finding.critical", "test-bleed", 1)
        (oru,) = listener.wait_for(1)
        assert oru["control_id"] == event.id and oru["answer"] == "AA"
        (sent,) = node.ledger.notifications_of([event.id])
        assert sent.channel == "RIS" and sent.job_id == job.id and sent.response.endswith("AA")
        assert event.last_image_at <= event.series_complete_at <= event.result_built_at <= event.created_at
        assert event.result_built_at <= sent.sent_at <= sent.acked_at
        assert (analyze := node.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=uid)) and \
            analyze[0].queue == "analyze-cpu"
        time.sleep(1.0)
        assert len(listener.messages()) == 1  # delivered once, not once per worker
        # The workers audit into the same JSON-lines file as the node.
        data_dir = Path(data["node"]["data_dir"])
        audited = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines() if line]
        assert any(a.get("event") == "job.succeeded" and a.get("kind") == "notify" for a in audited), audited[-5:]
        assert not (data_dir / "audit.log").exists()
    finally:
        for worker in workers:
            worker.stop()
        node.stop()
        listener.stop()


@pytest.mark.slow
def test_pacs_down_then_up_every_result_delivered_once(cluster: Cluster, tmp_path: Path) -> None:
    """Scenario 5."""
    cluster.pacs.stop()
    try:
        files = write_series(ct_series(4, 64, 64, seed="cluster-pacs-down"), tmp_path / "ct")
        assert store_successes(storescu(cluster.port("rx2"), *files)) == 4
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        cluster.wait(lambda: any(d.attempts >= 2 for d in cluster.ledger.list_jobs(
            kind=JobKind.DELIVER, series_uid=uid, states=[JobState.FAILED])), "failed delivery attempts")
    finally:
        cluster.pacs.start()
    cluster.wait(lambda: cluster.delivered(uid) and cluster.series_done(uid), "deliveries after the outage")
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    results = cluster.ledger.results_for_series(uid)
    assert results and cluster.in_pacs(study) == Counter({r.sop_instance_uid: 1 for r in results})


@pytest.mark.slow
def test_kill_9_of_a_receiver_mid_association(cluster: Cluster) -> None:
    """Scenario 3 (and 7 for a receiver): what was answered Success is in the spool and the ledger;
    the sender's resend to another receiver is absorbed; the series completes once; nothing of the
    killed receiver survives it."""
    series = ct_series(10, 64, 64, seed="cluster-kill-rx", series_description="RESENT AFTER A CRASH")
    uid = series[0].SeriesInstanceUID
    victim = cluster.members["rx2"]
    acknowledged: list[str] = []
    family: set[tuple[int, int]] = set()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", victim.port, ae_title="DICOMNODE")
    assert assoc.is_established
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
                family = victim.kill_9()
    finally:
        if assoc.is_established:
            assoc.abort()
    assert len(acknowledged) >= 4
    assert not wait_all_gone(family), [command_line(pid) for pid, _ in family]
    for sop in acknowledged:
        row = cluster.ledger.instance(sop)
        assert row is not None, f"acknowledged {sop} is not in the ledger"
        assert (cluster.spool / row.path).is_file()
    # The sender tries again, on another receiver, once the dead one is seen dead.
    cluster.wait(lambda: not any(p.alive for p in cluster.ledger.processes() if p.node_id == "rx2"),
                 "rx2 to be seen dead")
    assert send_split([cluster.port("rx1")], series) == [0] * 10
    cluster.wait(lambda: cluster.series_done(uid), "the resent series", timeout=60)
    jobs = cluster.analyze_jobs(uid)
    assert [(j.epoch, j.outcome["instances"]) for j in jobs] == [(1, 10)]
    victim.start()
    cluster.wait_ready(["rx2"])


@pytest.mark.slow
def test_kill_9_of_a_worker_while_its_job_runs(cluster: Cluster) -> None:
    """Scenario 2 (and 7 for a worker): another worker runs the job again; each result SOP
    Instance UID reaches the PACS once; nothing of the killed worker survives it."""
    series = ct_series(60, 256, 256, seed="cluster-kill-worker")
    uid, study = series[0].SeriesInstanceUID, series[0].StudyInstanceUID
    assert send_split([cluster.port("rx1")], series) == [0] * 60

    def running_owner() -> str | None:
        jobs = cluster.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=uid, states=[JobState.RUNNING])
        return jobs[0].lease_owner if jobs else None

    owner = cluster.wait(running_owner, "the analysis to start", timeout=60, poll=0.01)
    pid = int(owner.split(":")[1])
    victim = next(m for m in cluster.members.values() if m.proc is not None and m.proc.pid == pid)
    assert victim.command == "worker"
    family = victim.kill_9()
    assert not wait_all_gone(family), [command_line(p) for p, _ in family]
    cluster.wait(lambda: cluster.series_done(uid) and cluster.delivered(uid), "the re-run", timeout=120)
    jobs = cluster.analyze_jobs(uid)
    assert len(jobs) == 1 and jobs[0].attempts == 2 and jobs[0].state == JobState.SUCCEEDED
    assert int((jobs[0].outcome or {}).get("instances", 0)) == 60
    results = cluster.ledger.results_for_series(uid)
    assert results and cluster.in_pacs(study) == Counter({r.sop_instance_uid: 1 for r in results})
    victim.start()
    cluster.wait_ready([victim.name])


@pytest.mark.slow
def test_postgresql_stopped_during_reception(tmp_path: Path) -> None:
    """Scenario 4: while the shared ledger is down nothing is answered Success (0xA7xx, transient,
    instead), the receiver keeps its association, and it resumes once PostgreSQL is back."""
    pg = Postgres().init().start()  # its own cluster: this one is stopped and started
    node: Node | None = None
    try:
        data = cluster_config(tmp_path, "rx", pg.create_database("outage"), tmp_path / "spool", 0,
                              Orthanc(tmp_path / "orthanc"))
        node = Node(parse_config(data))
        node.start()
        series = ct_series(9, 64, 64, seed="cluster-pg-down")
        uid = series[0].SeriesInstanceUID
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.receiver.ports[0], ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            before = [int(assoc.send_c_store(ds).Status) for ds in series[:3]]
            pg.stop("immediate")
            during = [int(assoc.send_c_store(ds).Status) for ds in series[3:6]]
            pg.start()
            after = [int(assoc.send_c_store(ds).Status) for ds in series[3:]]  # the refused ones again
            assert assoc.is_established
        finally:
            assoc.release()
        assert before == [0, 0, 0]
        assert during and all(status & 0xFF00 == 0xA700 for status in during), [hex(s) for s in during]
        assert after == [0] * 6
        for ds in series:  # every instance answered Success is committed
            assert node.ledger.instance(ds.SOPInstanceUID) is not None
        deadline = time.monotonic() + 60
        while node.ledger.series_row(uid).state != SeriesState.QUEUED:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the series never completed after the outage"
            time.sleep(0.2)
        jobs = node.ledger.list_jobs(kind=JobKind.ANALYZE, series_uid=uid)
        assert [(j.epoch, j.state) for j in jobs] == [(1, JobState.QUEUED)]  # no worker runs here
    finally:
        if node is not None:
            node.stop()
        pg.destroy()


def test_cluster_config_is_checked_with_one_line_per_problem(tmp_path: Path) -> None:
    def problems(cluster: dict[str, Any]) -> list[str]:
        try:
            parse_config({"cluster": {"spool_root": "/srv/spool", **cluster}})
        except ConfigError as exc:
            return exc.problems
        return []

    unix = "postgresql+psycopg://dicomnode@/dicomnode?host=/run/postgresql"
    assert problems({"ledger_url": unix}) == []
    assert parse_config({"cluster": {"ledger_url": unix, "spool_root": "/s"}}).ledger_url == unix
    assert problems({"ledger_url": "mysql://u@h/db"})[0].startswith("cluster.ledger_url: 'mysql' is not supported")
    assert problems({"ledger_url": "postgresql+psycopg://u@/"}) == ["cluster.ledger_url: names no database"]
    assert problems({"ledger_url": unix, "node_id": "rx 1", "queues": {"deliver": ""}}) == [
        "cluster.node_id: 'rx 1' is not a node id (letters, digits, '.', '_', '-'; at most 100)",
        "cluster.queues: deliver: must not be empty",
    ]
    assert problems({"ledger_url": unix, "heartbeat_s": 20}) == [
        "cluster: dead_after_s must be more than twice heartbeat_s"]
    config = tmp_path / "bad.toml"
    config.write_text('[cluster]\nledger_url = "postgres://x"\nspool_root = "/srv/spool"\n')
    checked = subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2
    assert checked.stdout.strip().splitlines() == [
        f"{config}: cluster.ledger_url: 'postgres' is not supported: use postgresql+psycopg://user@host/db "
        "(or ...@/db?host=/run/postgresql for a Unix socket)"]


def test_the_ledger_url_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "postgresql+psycopg://dicomnode:s3cret@db.example.org/dicomnode"
    monkeypatch.setenv("DICOMNODE_LEDGER_URL", secret)
    assert parse_config({"cluster": {"spool_root": "/srv/spool"}}).ledger_url == secret
    monkeypatch.setenv("DICOMNODE_LEDGER_URL", "sqlite:///x")
    with pytest.raises(ConfigError) as error:
        parse_config({"cluster": {"spool_root": "/srv/spool"}})
    assert error.value.problems[0].startswith("cluster.ledger_url: 'sqlite' is not supported")
