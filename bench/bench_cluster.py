"""Cluster mode throughput: analyses per minute with 1 and 2 worker processes, and ingest with 1
and 2 receiver processes sharing the DICOM port, against references measured in the same run.

Everything runs on this machine as real processes: a PostgreSQL started by the benchmark
(``tests/postgres.py``), ``dicomnode serve`` and ``dicomnode worker`` processes in cluster mode,
DCMTK ``storescu`` as the scanner, a real Orthanc as the PACS.

``analyze``
    10 head CTs of 100 slices 512x512 (each with a painted hyperdense blob, so the embedded default
    route runs ``qc-ct`` and ``demo-hyperdense`` and produces 2 SRs and a SEG) are sent to one
    receiver while no worker runs; once all 10 analyze jobs wait in the ledger, N workers start.
    Analyses per minute = 10 / (last analyze job finished - first started) x 60, from the ledger's
    database-clock timestamps; the time until every result is in Orthanc is reported beside it.
    Reference: 1 worker. The workers' own start-up (imports, model load) overlaps the first jobs.

``ingest``
    A 200-slice 512x512 CT over 4 parallel ``storescu`` associations (4 contiguous groups), timed
    from starting the senders until all have exited, against: Orthanc (``SyncStorageArea: true``,
    restarted empty for each run) as the reference, the embedded node (one process, SQLite), and
    1 and 2 cluster receivers sharing one port (SO_REUSEPORT). Fresh database, spool and processes
    for each run; configurations interleaved for ``--reps`` rounds.

Usage::

    python bench/bench_cluster.py all --json bench/results/cluster.json
    python bench/bench_cluster.py analyze|ingest [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import tomlkit  # noqa: E402
from bench_latency import series_folder  # noqa: E402
from orthanc import free_port  # noqa: E402
from postgres import Postgres  # noqa: E402

from dicomnode.domain import JobKind, JobState  # noqa: E402
from dicomnode.ledger import Ledger  # noqa: E402

STORESCU = "/usr/bin/storescu"
ORTHANC = "/usr/sbin/Orthanc"
DEFAULT_JSON = ROOT / "bench" / "results" / "cluster.json"
ENV = {**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": str(ROOT)}


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version(),
            "host": platform.node()}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll)


class Orthanc:
    """Orthanc with durable storage (SyncStorageArea), its own folder, loopback high ports."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        storage = str(self.folder / "db")
        config = {"Name": "bench", "StorageDirectory": storage, "IndexDirectory": storage,
                  "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                  "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "Plugins": [],
                  "SyncStorageArea": True, "OverwriteInstances": False}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = open(self.folder / "log", "ab")  # noqa: SIM115
        # Orthanc's DCMTK honours TCP_NODELAY too: without it each C-STORE-RSP waits ~40 ms (Nagle).
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=log,
                                        env=ENV)
        wait_for(self._up, 30, "Orthanc")
        return self

    def _up(self) -> bool:
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def destination(self) -> dict[str, Any]:
        return {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.dicom_port}


class Processes:
    """dicomnode processes of one configuration, stopped together."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: str, config: Path, name: str, cpu: int | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        proc = subprocess.Popen([*pin, sys.executable, "-m", "dicomnode.cli", command, "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=ENV)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def node_config(work: Path, name: str, port: int, *, url: str | None, spool: Path, pacs: Orthanc | None,
                **sections: Any) -> Path:
    data: dict[str, Any] = {
        "node": {"port": port, "data_dir": str(work / name), "min_free_mb": 1, "max_associations": 32},
        "peers": [{"ae_title": "STORESCU"}],
        "admin": {"enabled": False},
        "assembly": {"release_grace_s": 0.2},
        **sections,
    }
    if pacs is not None:
        data["destinations"] = {"PACS": pacs.destination()}
    if url is not None:
        data["cluster"] = {"ledger_url": url, "spool_root": str(spool), "node_id": name}
    path = work / f"{name}.toml"
    path.write_text(tomlkit.dumps(data))
    return path


def send(port: int, files: list[Path], parallel: int) -> float:
    groups = [files[i * len(files) // parallel:(i + 1) * len(files) // parallel] for i in range(parallel)]
    started = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                               *map(str, group)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for group in groups]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


# --- analyze -----------------------------------------------------------------------------------------


def analyze_run(pg: Postgres, work: Path, folders: list[Path], workers: int, pinned: bool = False) -> dict[str, Any]:
    url = pg.create_database("bench_analyze")
    pacs = Orthanc(work / "orthanc").start()
    procs = Processes(work)
    spool = work / f"spool-{workers}"
    ledger = Ledger(url)
    try:
        port = free_port()
        rx = node_config(work, f"rx-{workers}", port, url=url, spool=spool, pacs=pacs,
                         jobs={"workers": 1})
        procs.start("serve", rx, f"rx-{workers}")
        wait_for(lambda: listening(port), 120, "receiver")
        for folder in folders:
            send(port, sorted(folder.glob("*.dcm")), 1)
        wait_for(lambda: len(ledger.list_jobs(kind=JobKind.ANALYZE)) >= len(folders), 120, "analyze jobs queued")
        started = time.time()
        for i in range(workers):
            cfg = node_config(work, f"w{i}-{workers}", 0, url=url, spool=spool, pacs=pacs, jobs={"workers": 1})
            procs.start("worker", cfg, f"w{i}-{workers}", cpu=i % (os.cpu_count() or 1) if pinned else None)

        def finished() -> bool:
            analyses = ledger.list_jobs(kind=JobKind.ANALYZE)
            deliveries = ledger.list_jobs(kind=JobKind.DELIVER, limit=1000)
            return (all(j.state == JobState.SUCCEEDED for j in analyses) and len(deliveries) >= 3 * len(folders)
                    and all(d.state == JobState.SUCCEEDED for d in deliveries))

        wait_for(finished, 1800, "all results delivered", poll=0.5)
        wall = time.time() - started
        analyses = ledger.list_jobs(kind=JobKind.ANALYZE)
        first = min(j.started_at or 0 for j in analyses)
        last = max(j.finished_at or 0 for j in analyses)
        per_job = [float(j.outcome.get("worker_s", 0)) for j in analyses]
        span = last - first
        return {"workers": workers, "pinned": pinned, "series": len(folders), "analysis_span_s": round(span, 2),
                "analyses_per_min": round(len(folders) / span * 60, 2),
                "wall_to_all_delivered_s": round(wall, 2), "in_orthanc": pacs.count(),
                "job_worker_s_median": round(statistics.median(per_job), 2),
                "attempts": sorted(j.attempts for j in analyses)}
    finally:
        procs.stop()
        ledger.close()
        pacs.stop()
        shutil.rmtree(spool, ignore_errors=True)


def analyze_mode(args: argparse.Namespace, pg: Postgres, cache: Path, work: Path) -> dict[str, Any]:
    folders = [series_folder(cache, args.slices, 512, f"cluster-{i}", False) for i in range(args.series)]
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    # Pinned: each worker process restricted to one core (taskset), so that a second worker gets a
    # core of its own instead of sharing both with the first (one analysis alone uses every core).
    configs = [(1, False), (2, False)] + ([(1, True), (2, True)] if args.pin else [])
    for rep in range(args.reps):
        for workers, pinned in (configs if rep % 2 == 0 else list(reversed(configs))):
            result = analyze_run(pg, work, folders, workers, pinned)
            print(f"analyze: {workers} worker(s){' pinned' if pinned else ''}: {result['analyses_per_min']} "
                  f"analyses/min (span {result['analysis_span_s']} s, all delivered after "
                  f"{result['wall_to_all_delivered_s']} s)", flush=True)
            runs.append(result)
    summary = {}
    for workers, pinned in configs:
        rates = [r["analyses_per_min"] for r in runs if r["workers"] == workers and r["pinned"] == pinned]
        summary[f"{workers}{'-pinned' if pinned else ''}"] = statistics.median(rates)
    ratios = {"2_to_1": round(summary["2"] / summary["1"], 2)}
    if args.pin:
        ratios["2_to_1_pinned"] = round(summary["2-pinned"] / summary["1-pinned"], 2)
    return {"runs": runs, "median_analyses_per_min": summary, "ratios": ratios, "load_before": load_before,
            "load_after": os.getloadavg()}


# --- ingest ------------------------------------------------------------------------------------------


def ingest_run(pg: Postgres, work: Path, files: list[Path], target: str) -> dict[str, Any]:
    procs = Processes(work)
    spool = work / "spool-ingest"
    shutil.rmtree(spool, ignore_errors=True)
    shutil.rmtree(work / target, ignore_errors=True)
    # Long quiet period: nothing completes (and no job is enqueued) while the clock runs.
    quiet = {"assembly": {"quiet_period_s": 600, "release_grace_s": 600}, "jobs": {"workers": 0}}
    orthanc: Orthanc | None = None
    try:
        if target == "orthanc":
            orthanc = Orthanc(work / "orthanc-ingest").start()
            port = orthanc.dicom_port
            count: Callable[[], int] = orthanc.count
        else:
            port = free_port()
            url = None if target == "embedded" else pg.create_database("bench_ingest")
            receivers = 2 if target == "cluster-2rx" else 1
            for i in range(receivers):
                cfg = node_config(work, f"{target}-{i}", port, url=url, spool=spool, pacs=None, **quiet)
                procs.start("serve", cfg, f"{target}-{i}")
            wait_for(lambda: listening(port), 120, "receiver")
            time.sleep(3.0 if receivers > 1 else 0.5)  # the second receiver binds a moment later
            ledger = Ledger(url or f"sqlite:///{work / f'{target}-0' / 'ledger.sqlite3'}")
            count = ledger.count_instances
        seconds = send(port, files, 4)
        stored = count()
        if target != "orthanc":
            ledger.close()
        if stored != len(files):
            raise RuntimeError(f"{target}: {stored} of {len(files)} stored")
        return {"target": target, "seconds": round(seconds, 3), "inst_per_s": round(len(files) / seconds, 1)}
    finally:
        procs.stop()
        if orthanc is not None:
            orthanc.stop()


def ingest_mode(args: argparse.Namespace, pg: Postgres, cache: Path, work: Path) -> dict[str, Any]:
    from synthetic import ct_series, write_series

    folder = cache / f"ct-{args.ingest_slices}x512-ingest"
    done = folder.with_name(folder.name + ".complete")
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_series(ct_series(args.ingest_slices, 512, 512, seed="bench-cluster-ingest"), folder)
        done.touch()
    files = sorted(folder.glob("*.dcm"))
    targets = ["orthanc", "embedded", "cluster-1rx", "cluster-2rx"]
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for target in (targets if rep % 2 == 0 else list(reversed(targets))):
            result = ingest_run(pg, work, files, target)
            print(f"ingest: {target}: {result['inst_per_s']} inst/s", flush=True)
            runs.append(result)
    medians = {t: statistics.median(r["inst_per_s"] for r in runs if r["target"] == t) for t in targets}
    return {"runs": runs, "median_inst_per_s": medians,
            "ratio_to_orthanc": {t: round(v / medians["orthanc"], 2) for t, v in medians.items()},
            "ratio_2rx_to_1rx": round(medians["cluster-2rx"] / medians["cluster-1rx"], 2),
            "load_before": load_before, "load_after": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["analyze", "ingest", "all"])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--slices", type=int, default=100, help="slices per analysed head CT")
    parser.add_argument("--ingest-slices", type=int, default=200)
    parser.add_argument("--pin", action="store_true", help="also run workers pinned to one core each")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench-cache")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-cluster-"))
    pg = Postgres(durable=True).init().start()
    result: dict[str, Any] = {"machine": machine()}
    try:
        if args.mode in ("ingest", "all"):
            result["ingest"] = ingest_mode(args, pg, args.cache, work)
        if args.mode in ("analyze", "all"):
            result["analyze"] = analyze_mode(args, pg, args.cache, work)
    finally:
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
