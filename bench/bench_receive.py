"""Receive throughput of dicomnode against DCMTK storescp, Orthanc and a bare pynetdicom SCP, in one run.

A deterministic 512x512 CT series (tests/synthetic.py) is written to a temporary folder once. Then,
interleaved for ``--reps`` repetitions (the order of the targets rotates every repetition), DCMTK
``storescu`` sends it over one association and over four parallel associations (the files split
into four contiguous groups, four ``storescu`` processes at once) to each target, every one a
separate process started fresh, on a free loopback port, with an empty folder, for every run:

* ``dicomnode``: ``python3 -m dicomnode.cli serve`` with ``PYTHONPATH`` set to the tree being
  measured (``--node LABEL=TREE`` adds other trees, e.g. a prototype, to the same rounds), in its
  production durability (temp file, fsync, link, directory fsync, SQLite WAL commit with
  ``synchronous=FULL`` before Success), audit log on, no analysis (the assembly quiet period is an
  hour and ``jobs.workers = 0``), console off;
* ``orthanc``: Debian's Orthanc with ``SyncStorageArea: true`` (it fsyncs each file before
  answering) and its SQLite index in the run's folder;
* ``bare``: ``bench/bare_scp.py``, pynetdicom answering Success after writing and fsyncing the data
  set to one file, nothing else;
* ``storescp``: DCMTK storescp with default options (it does not fsync).

A run's time is from starting the ``storescu`` processes until all have exited; instances/s is the
number of slices over that time. Every run checks that every instance was stored (dicomnode: ledger
rows and spool files; Orthanc: its instance count). CPU per instance is the user + system time of
the target's whole process tree (``/proc/<pid>/stat`` of the server and every descendant, reaped
children included) over the run, divided by the instances.

Also: the whole ``echoscu`` process against every target and against a closed port (``echo -
closed`` is each server's per-association cost); dicomnode's durability floor (``Spool.write`` and
``Ledger.record_instance`` alone, no network); and the resident memory of each dicomnode tree while
it takes ``--rss`` instances (10 series of 200) over four associations.

Usage: ``python3 bench/bench_receive.py [--reps 5] [--slices 200] [--rss 2000] [--json F]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# pynetdicom installs console scripts with the same names earlier on PATH: always use DCMTK's.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
# Debian's DCMTK leaves Nagle on; without TCP_NODELAY each DIMSE exchange stalls ~40 ms.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
HOST = "127.0.0.1"
CALLING = "STORESCU"
PARALLEL = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
COPY_PREFIX = "1.2.826.0.1.3680043.10.511.9."

_children: list[subprocess.Popen[bytes]] = []


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    kwargs.setdefault("env", DCMTK_ENV)
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(argv, **kwargs)
    _children.append(proc)
    return proc


def _reap(proc: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    if proc.poll() is None and grace > 0:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):
        proc.communicate(timeout=10)
    with contextlib.suppress(ValueError):
        _children.remove(proc)


def _kill_children() -> None:
    for proc in list(_children):
        _reap(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}: {err}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout} s")


# --- a process tree's CPU time and memory, from /proc ------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; the name may hold spaces


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live (or not yet reaped) descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of a process tree: every live process's own time plus the time of the
    children it has reaped (cutime, cstime), so nothing is counted twice or lost."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over a process tree (shared pages are counted once per process)."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


# --- targets ----------------------------------------------------------------------------------------


class Target:
    """A receiver in its own process, started fresh with an empty folder."""

    name = ""
    called = ""
    port = 0
    proc: subprocess.Popen[bytes]
    dir: Path

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.proc.pid)

    def received(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        _reap(self.proc, grace=30)
        shutil.rmtree(self.dir, ignore_errors=True)


class StorescpTarget(Target):
    """DCMTK storescp with default options (no fsync) writing into a fresh folder."""

    called = "STORESCP"

    def __init__(self, workdir: Path, name: str = "storescp") -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="storescp-", dir=workdir))
        self.port = _free_port()
        self.proc = _popen([STORESCP, "-aet", self.called, "-od", str(self.dir), str(self.port)])
        _wait_listening(self.port, self.proc)

    def received(self) -> int:
        return sum(1 for p in self.dir.iterdir() if p.is_file())


class BareTarget(Target):
    """``bench/bare_scp.py``: pynetdicom writing and fsyncing each data set, nothing else."""

    called = "BARE"

    def __init__(self, workdir: Path, name: str = "bare", mode: str = "fsync") -> None:
        self.name = name
        self.mode = mode
        self.dir = Path(tempfile.mkdtemp(prefix="bare-", dir=workdir))
        self.port = _free_port()
        self.proc = _popen([sys.executable, str(ROOT / "bench" / "bare_scp.py"), str(self.port),
                            str(self.dir / "files"), "--mode", mode, "--ae", self.called],
                           env=os.environ)
        _wait_listening(self.port, self.proc)

    def received(self) -> int:
        if self.mode == "null":
            return -1  # nothing is written: not checked
        return sum(1 for _ in (self.dir / "files").iterdir())


class OrthancTarget(Target):
    """Debian's Orthanc with ``SyncStorageArea: true`` and its own storage and SQLite index."""

    called = "ORTHANC"

    def __init__(self, workdir: Path, name: str = "orthanc") -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=workdir))
        self.port = _free_port()
        self.http_port = _free_port()
        config = {
            "Name": "bench", "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "storage"), "DicomAet": self.called,
            "DicomPort": self.port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "Plugins": [], "HttpServerEnabled": True,
            "DicomServerEnabled": True, "SyncStorageArea": True, "StableAge": 3600,
        }
        (self.dir / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.dir / "orthanc.log", "ab")  # noqa: SIM115
        # Orthanc's DICOM server is DCMTK: Debian's DCMTK leaves Nagle on unless told otherwise.
        self.proc = _popen([ORTHANC, str(self.dir / "orthanc.json")], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                self._get("/system")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start: "
                                       + (self.dir / "orthanc.log").read_text()[-1000:]) from None
                time.sleep(0.05)
        _wait_listening(self.port, self.proc)

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def received(self) -> int:
        return int(self._get("/statistics")["CountInstances"])

    def close(self) -> None:
        super().close()
        self.log.close()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


class NodeTarget(Target):
    """``dicomnode serve`` from ``tree`` (its PYTHONPATH), with a fresh data folder."""

    called = "DICOMNODE"

    def __init__(self, workdir: Path, name: str = "dicomnode", tree: Path = ROOT,
                 options: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        self.port = _free_port()
        sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": self.called, "host": HOST, "port": self.port,
                     "data_dir": str(self.dir / "data"), "min_free_mb": 1},
            # Nothing but reception while the clock runs: the series never looks complete.
            "assembly": {"quiet_period_s": 3600.0, "release_grace_s": 3600.0},
            "jobs": {"workers": 0},
            "admin": {"enabled": False},
        }
        for section, values in (options or {}).items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        for ae in (CALLING, "ECHOSCU"):
            lines += ["[[peers]]", f"ae_title = {json.dumps(ae)}"]
        config = self.dir / "node.toml"
        config.write_text("\n".join(lines) + "\n")
        self.log_path = self.dir / "node.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        run_env = {**os.environ, "PYTHONPATH": str(tree), **(env or {})}
        self.proc = _popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
                           env=run_env, cwd=self.dir, stdout=self.log, stderr=self.log)
        # serve prints its "listening" line once every listener (and receiver process) is up.
        deadline = time.monotonic() + 120
        while b"listening on" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: " + self.log_path.read_text()[-2000:])
            time.sleep(0.05)

    def received(self) -> int:
        data = self.dir / "data"
        with contextlib.closing(sqlite3.connect(f"file:{data / 'ledger.sqlite3'}?mode=ro", uri=True)) as db:
            rows = int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
        files = sum(1 for _ in (data / "spool" / "instances").rglob("*.dcm"))
        if files != rows:
            raise RuntimeError(f"{self.name}: {rows} ledger rows but {files} spool files")
        return rows

    def close(self) -> None:
        super().close()
        self.log.close()


class TargetFactory:
    def __init__(self, name: str, kind: str, **kwargs: Any) -> None:
        self.name, self.kind, self.kwargs = name, kind, kwargs

    def __call__(self, workdir: Path) -> Target:
        cls = {"storescp": StorescpTarget, "orthanc": OrthancTarget, "bare": BareTarget,
               "node": NodeTarget}[self.kind]
        # A free port can be taken by another process between probing and binding (the machine is
        # shared): try again on another port before giving up.
        for attempt in range(3):
            try:
                return cls(workdir, name=self.name, **self.kwargs)  # type: ignore[no-any-return]
            except RuntimeError as exc:
                if attempt == 2:
                    raise
                print(f"  {self.name} did not start ({exc}); retrying", flush=True)
        raise AssertionError("unreachable")


@contextlib.contextmanager
def started(factory: TargetFactory, workdir: Path) -> Iterator[Target]:
    t = factory(workdir)
    try:
        yield t
    finally:
        t.close()


# --- measurements ---------------------------------------------------------------------------------


def send(t: Target, groups: list[list[Path]]) -> float:
    """Seconds from starting one storescu per group until all have exited."""
    start = time.perf_counter()
    procs = [_popen([STORESCU, "-aet", CALLING, "-aec", t.called, HOST, str(t.port), *map(str, g)])
             for g in groups]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=1200)
        if proc.returncode != 0:
            errors.append(f"storescu exit {proc.returncode}: {err.decode(errors='replace')[-300:]}")
        _children.remove(proc)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("; ".join(errors))
    return elapsed


def echo_seconds(called: str, port: int) -> float:
    start = time.perf_counter()
    subprocess.run([ECHOSCU, "-aet", "ECHOSCU", "-aec", called, HOST, str(port)], env=DCMTK_ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def durability_floor(workdir: Path, files: list[Path]) -> tuple[list[float], list[float]]:
    """Seconds per instance of dicomnode's own durable steps alone, no network: ``Spool.write``
    (temp file, fsync, link, directory fsync) and ``Ledger.record_instance`` (SQLite WAL commit,
    ``synchronous=FULL``). Their sum bounds what one association can reach on this disk."""
    from datetime import UTC, datetime

    from dicomnode.domain import StoredInstance
    from dicomnode.ledger import Ledger
    from dicomnode.spool import Spool

    folder = Path(tempfile.mkdtemp(prefix="floor-", dir=workdir))
    spool, ledger = Spool(folder / "spool"), Ledger.sqlite(str(folder / "ledger.sqlite3"))
    writes, commits = [], []
    try:
        for i, path in enumerate(files):
            data = path.read_bytes()
            relative = spool.instance_path("1.2.3", "1.2.3.4", f"1.2.3.4.{i + 1}")
            start = time.perf_counter()
            spool.write(relative, data)
            middle = time.perf_counter()
            ledger.record_instance(StoredInstance(
                sop_instance_uid=f"1.2.3.4.{i + 1}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid="1.2.3.4", study_instance_uid="1.2.3",
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=relative, size=len(data),
                calling_ae=CALLING, peer_host=HOST, received_at=datetime.now(UTC)))
            writes.append(middle - start)
            commits.append(time.perf_counter() - middle)
    finally:
        ledger.close()
        shutil.rmtree(folder, ignore_errors=True)
    return writes, commits


def rss_profile(factory: TargetFactory, workdir: Path, warm: list[Path], files: list[Path]) -> dict[str, Any]:
    """Resident memory of a target's process tree while it takes ``files`` over four associations,
    after ``warm`` (one association) has warmed it up. Sampled every 0.2 s."""
    with started(factory, workdir) as t:
        send(t, [warm])
        after_warm = t.rss_bytes()
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            start = time.perf_counter()
            while not done.wait(0.2):
                samples.append((time.perf_counter() - start, t.rss_bytes()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            elapsed = send(t, split(files, PARALLEL))
        finally:
            done.set()
            sampler.join()
        end = t.rss_bytes()
        got = t.received()
    expected = len(warm) + len(files)
    if got not in (expected, -1):
        raise RuntimeError(f"{factory.name} rss run: {got} of {expected} instances stored")
    values = [rss for _, rss in samples] or [end]
    half = values[len(values) // 2:]
    mib = 2**20
    return {
        "instances": len(files), "seconds": elapsed,
        "after_warm_mib": after_warm / mib, "peak_mib": max(values) / mib, "end_mib": end / mib,
        # Flat means the second half of the run holds no more than its first half.
        "first_half_max_mib": max(values[: max(1, len(values) // 2)]) / mib,
        "second_half_max_mib": max(half) / mib,
        "samples_mib": [(round(s, 2), round(r / mib, 1)) for s, r in samples],
    }


def split(files: list[Path], n: int) -> list[list[Path]]:
    return [files[len(files) * k // n: len(files) * (k + 1) // n] for k in range(n)]


def generate(folder: Path, slices: int) -> list[Path]:
    from synthetic import ct_series, write_series

    # Generated in chunks of 20 slices (seed per chunk) to keep memory flat; deterministic.
    paths: list[Path] = []
    for first in range(0, slices, 20):
        n = min(20, slices - first)
        datasets = ct_series(n, 512, 512, seed=f"bench-receive-{first}",
                             study_uid="1.2.826.0.1.3680043.10.511.1", noise_hu=8.0)
        for i, ds in enumerate(datasets):
            # One series: the chunks share the series and continue its numbering and geometry.
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.511.2"
            ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.511.3"
            ds.InstanceNumber = first + i + 1
            z = -1.25 * (slices - 1) + (first + i) * 2.5
            ds.ImagePositionPatient = [-179.2, -179.2, z]
            ds.SliceLocation = z
        paths += write_series(datasets, folder)
    return paths


def copies(files: list[Path], folder: Path, count: int) -> list[Path]:
    """``count`` distinct instances: the series again and again, each copy with its own series and
    SOP Instance UIDs (derived from the original and the copy number)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    k = 0
    while len(out) < count:
        for path in files:
            if len(out) == count:
                break
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = generate_uid(COPY_PREFIX, entropy_srcs=[ds.SOPInstanceUID, str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID = generate_uid(COPY_PREFIX, entropy_srcs=[ds.SeriesInstanceUID, str(k)])
            target = folder / f"{k:03d}-{path.name}"
            ds.save_as(target, enforce_file_format=True)
            out.append(target)
        k += 1
    return out


def _versions() -> dict[str, str]:
    import pydicom
    import pynetdicom

    from dicomnode import __version__

    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""

    return {
        "dicomnode": __version__,
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dcmtk": first_line([STORESCU, "--version"]),
        "orthanc": first_line([ORTHANC, "--version"]),
        "kernel": platform.release(),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _paired(rates: dict[str, list[float]], reference: str) -> dict[str, float]:
    if reference not in rates:
        return {}
    return {n: _median([a / b for a, b in zip(v, rates[reference], strict=True)]) for n, v in rates.items()}


def _git_head(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip()


def run(args: argparse.Namespace, workdir: Path, factories: list[TargetFactory]) -> dict[str, Any]:
    series_dir = workdir / "series"
    t0 = time.perf_counter()
    files = sorted(generate(series_dir, args.slices))
    size = sum(p.stat().st_size for p in files)
    print(f"generated {len(files)} slices, {size / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s "
          f"({series_dir})", flush=True)
    configs = {"1 assoc": [files], f"{PARALLEL} assoc": split(files, PARALLEL)}
    names = [f.name for f in factories]
    seconds: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in configs}
    cpu: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in configs}
    floor_write: list[float] = []
    floor_commit: list[float] = []

    # Warm the page cache and every server's code path once, untimed.
    for factory in factories:
        with started(factory, workdir) as t:
            send(t, [files[:10]])

    for rep in range(args.reps):
        if args.floor:
            w, c = durability_floor(workdir, files[:20])
            floor_write += w
            floor_commit += c
        # Rotate the order so that no target always runs right after another.
        shift = rep % len(factories)
        order = factories[shift:] + factories[:shift]
        for config, groups in configs.items():
            for factory in order:
                with started(factory, workdir) as t:
                    cpu_before = t.cpu_seconds()
                    elapsed = send(t, groups)
                    cpu_after = t.cpu_seconds()
                    got = t.received()
                if got not in (len(files), -1):
                    raise RuntimeError(f"{factory.name} {config}: {got} of {len(files)} instances stored")
                seconds[config][factory.name].append(elapsed)
                cpu[config][factory.name].append((cpu_after - cpu_before) / len(files))
                print(f"  rep {rep + 1} {config:8} {factory.name:14} {len(files) / elapsed:7.1f} inst/s "
                      f"{(cpu_after - cpu_before) / len(files) * 1000:6.2f} ms CPU/inst", flush=True)

    echo: dict[str, list[float]] = {n: [] for n in [*names, "closed port"]}
    if args.echoes:
        with contextlib.ExitStack() as stack:
            running = [stack.enter_context(started(f, workdir)) for f in factories]
            closed = _free_port()
            for t in running:  # warm-up
                for _ in range(3):
                    echo_seconds(t.called, t.port)
            for _ in range(args.echoes):
                for t in running:
                    echo[t.name].append(echo_seconds(t.called, t.port))
                echo["closed port"].append(echo_seconds("NOBODY", closed))

    rss: dict[str, Any] = {}
    if args.rss:
        rss_files = copies(files, workdir / "rss", args.rss)
        for factory in factories:
            if factory.kind == "node" or factory.name in args.rss_targets:
                rss[factory.name] = rss_profile(factory, workdir, files, rss_files)
                r = rss[factory.name]
                print(f"  rss {factory.name:14} warm {r['after_warm_mib']:.0f} MiB, first half max "
                      f"{r['first_half_max_mib']:.0f}, second half max {r['second_half_max_mib']:.0f}, "
                      f"end {r['end_mib']:.0f} MiB over {r['instances']} instances", flush=True)
        shutil.rmtree(workdir / "rss", ignore_errors=True)

    throughput: dict[str, Any] = {}
    for config in configs:
        rates = {n: [len(files) / s for s in seconds[config][n]] for n in names}
        med = {n: _median(v) for n, v in rates.items()}
        throughput[config] = {
            "associations": len(configs[config]),
            "instances_per_s": rates,
            "median_instances_per_s": med,
            "ratio_to_storescp": {n: med[n] / med["storescp"] for n in names} if "storescp" in med else {},
            "ratio_to_orthanc": {n: med[n] / med["orthanc"] for n in names} if "orthanc" in med else {},
            # Runs of one repetition are minutes apart at most: the median of per-repetition ratios
            # is steadier than the ratio of medians when other jobs load the machine.
            "paired_ratio_to_storescp": _paired(rates, "storescp"),
            "paired_ratio_to_orthanc": _paired(rates, "orthanc"),
            "cpu_ms_per_instance": {n: _median(cpu[config][n]) * 1000 for n in names},
            "cpu_ms_per_instance_all": {n: [x * 1000 for x in cpu[config][n]] for n in names},
        }
    echo_ms = {k: _median(v) * 1000 for k, v in echo.items()}
    return {
        "slices": len(files),
        "bytes": size,
        "reps": args.reps,
        "targets": {f.name: {"kind": f.kind, **{k: str(v) for k, v in f.kwargs.items()}} for f in factories},
        "throughput": throughput,
        "durability_floor_ms": {
            "spool_write": _median(floor_write) * 1000,
            "ledger_commit": _median(floor_commit) * 1000,
            "n": len(floor_write),
        },
        "echo_ms": {"median": echo_ms, "all": {k: [x * 1000 for x in v] for k, v in echo.items()},
                    "n": args.echoes},
        "rss": rss,
    }


def print_table(result: dict[str, Any]) -> None:
    print()
    print(f"{result['slices']} slices 512x512 CT, {result['bytes'] / 2**20:.1f} MiB; "
          f"median of {result['reps']} runs; nproc {result['nproc']}, "
          f"load {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}")
    print()
    print("| associations | target | inst/s | x storescp | x Orthanc | x Orthanc, paired | CPU ms/inst |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for config, row in result["throughput"].items():
        for name, rate in row["median_instances_per_s"].items():
            to_scp = row["ratio_to_storescp"].get(name, float("nan"))
            to_orthanc = row["ratio_to_orthanc"].get(name, float("nan"))
            paired = row["paired_ratio_to_orthanc"].get(name, float("nan"))
            print(f"| {config} | {name} | {rate:.1f} | {to_scp:.2f} | {to_orthanc:.2f} | {paired:.2f} | "
                  f"{row['cpu_ms_per_instance'][name]:.2f} |")
    floor = result["durability_floor_ms"]
    if floor["n"]:
        total = floor["spool_write"] + floor["ledger_commit"]
        print()
        print(f"durability floor (no network, median of {floor['n']}): spool write {floor['spool_write']:.2f} ms "
              f"+ ledger commit {floor['ledger_commit']:.2f} ms = {total:.2f} ms per instance")
    e = result["echo_ms"]
    if e["n"]:
        print()
        print(f"| whole echoscu process (median of {e['n']}) | ms | - closed port |")
        print("|---|---:|---:|")
        closed = e["median"]["closed port"]
        for k, v in e["median"].items():
            print(f"| {k} | {v:.1f} | {v - closed:+.1f} |")
    for name, r in result["rss"].items():
        print(f"\nRSS of {name} (process tree) over {r['instances']} instances, 4 associations: after warm-up "
              f"{r['after_warm_mib']:.0f} MiB, max first half {r['first_half_max_mib']:.0f} MiB, max second half "
              f"{r['second_half_max_mib']:.0f} MiB, end {r['end_mib']:.0f} MiB")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parse_assignment(text: str, flag: str) -> tuple[str, str, str]:
    """``LABEL:KEY=VALUE`` -> (label, key, value)."""
    label, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not key:
        raise SystemExit(f"{flag} {text!r}: expected LABEL:KEY=VALUE")
    return label, key, value


def build_factories(args: argparse.Namespace) -> list[TargetFactory]:
    nodes = dict(n.split("=", 1) for n in args.node) if args.node else {"dicomnode": str(ROOT)}
    options: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in nodes}
    envs: dict[str, dict[str, str]] = {label: {} for label in nodes}
    for text in args.node_option:
        label, key, value = _parse_assignment(text, "--node-option")
        section, _, name = key.rpartition(".")
        options[label].setdefault(section or "node", {})[name] = json.loads(value)
    for text in args.node_env:
        label, key, value = _parse_assignment(text, "--node-env")
        envs[label][key] = value
    factories = []
    for kind in args.targets.split(","):
        if kind == "dicomnode":
            factories += [TargetFactory(label, "node", tree=Path(tree).resolve(), options=options[label],
                                        env=envs[label]) for label, tree in nodes.items()]
        elif kind == "bare-null":
            factories.append(TargetFactory(kind, "bare", mode="null"))
        elif kind in ("storescp", "orthanc", "bare"):
            factories.append(TargetFactory(kind, kind))
        else:
            raise SystemExit(f"--targets: unknown target {kind!r}")
    return factories


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--echoes", type=int, default=20)
    parser.add_argument("--rss", type=int, default=2000, help="instances for the memory run (0: none)")
    parser.add_argument("--rss-targets", default="", help="other targets measured in the memory run, e.g. orthanc")
    parser.add_argument("--targets", default="storescp,orthanc,bare,dicomnode",
                        help="comma-separated: storescp, orthanc, bare, bare-null, dicomnode")
    parser.add_argument("--node", action="append", default=[], metavar="LABEL=TREE",
                        help="a dicomnode tree to measure (repeatable; default: dicomnode=this tree)")
    parser.add_argument("--node-option", action="append", default=[], metavar="LABEL:SECTION.KEY=JSON",
                        help="a config value for one dicomnode target, e.g. dicomnode:node.receivers=4")
    parser.add_argument("--node-env", action="append", default=[], metavar="LABEL:VAR=VALUE",
                        help="an environment variable for one dicomnode target")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the in-process durability floor samples")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "receive.json")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    for tool in (STORESCU, ECHOSCU, STORESCP, ORTHANC):
        if not Path(tool).exists():
            print(f"{tool} is missing: apt-get install dcmtk orthanc", file=sys.stderr)
            return 2
    factories = build_factories(args)
    signal.signal(signal.SIGTERM, _interrupt)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench-receive-", dir=args.workdir))
    try:
        result = run(args, workdir, factories)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    result.update({
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "versions": _versions(),
        "trees": {f.name: _git_head(Path(f.kwargs["tree"])) for f in factories if f.kind == "node"},
        "storescp_argv": [STORESCP, "-aet", "STORESCP", "-od", "<fresh dir>", "<port>"],
        "storescu_env": {"TCP_NODELAY": "1"},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
