"""Receive throughput of dicomnode against DCMTK's storescp, measured in the same run.

A deterministic 512x512 CT series (tests/synthetic.py) is written to a temporary folder once. Then,
interleaved for ``--reps`` repetitions, DCMTK ``storescu`` sends it over one association and over
four parallel associations (the files split into four contiguous groups, four ``storescu``
processes at once) to

* dicomnode: a real :class:`~dicomnode.node.Node` with a fresh data folder per run, production
  durability (temp file, fsync, link, directory fsync, ledger commit in SQLite WAL with
  ``synchronous=FULL`` before Success) and the audit log on; the assembly quiet period is long so
  that no analysis runs while the clock runs;
* DCMTK ``storescp`` (defaults; a fresh output folder per run; note that it does not fsync).

Each run's time is from starting the ``storescu`` processes until all have exited; instances/s is
the number of slices over that time. Every run checks that every instance arrived. The median per
target and configuration is reported with the ratio dicomnode/storescp.

It also times a whole ``echoscu`` process (``--echoes`` times, interleaved) against dicomnode,
against storescp and against a closed port; the last one is the bare cost of starting echoscu, so
``echo - closed`` is the per-association cost of each server.

Usage: ``python3 bench/bench_receive.py [--reps 5] [--slices 200] [--json bench/results/receive.json]``
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from dicomnode import __version__  # noqa: E402
from dicomnode.config import parse_config  # noqa: E402
from dicomnode.node import Node  # noqa: E402

# pynetdicom installs console scripts with the same names earlier on PATH: always use DCMTK's.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
# Debian's DCMTK leaves Nagle on; without TCP_NODELAY each DIMSE exchange stalls ~40 ms.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
HOST = "127.0.0.1"
CALLING = "STORESCU"
PARALLEL = 4

_children: list[subprocess.Popen[bytes]] = []


def _popen(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _children.append(proc)
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
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


def _wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout} s")


# --- targets --------------------------------------------------------------------------------------


class NodeTarget:
    """A real dicomnode Node on an ephemeral port with its own data folder."""

    name = "dicomnode"
    called = "DICOMNODE"

    max_pdu: int | None = None  # None: the configuration default

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="node-", dir=workdir))
        node: dict[str, Any] = {"port": 0, "data_dir": str(self.dir / "data"), "min_free_mb": 1}
        if self.max_pdu is not None:
            node["max_pdu"] = self.max_pdu
        config = parse_config({
            "node": node,
            "peers": [{"ae_title": CALLING, "hosts": [HOST]}, {"ae_title": "ECHOSCU"}],
            # Nothing but reception while the clock runs: the series never looks complete.
            "assembly": {"quiet_period_s": 3600, "release_grace_s": 3600},
            "jobs": {"workers": 0},
            "admin": {"enabled": False},
        })
        self.node = Node(config)
        self.node.start()
        self.port = self.node.receiver.ports[0]

    def received(self) -> int:
        return sum(1 for _ in self.node.spool.files())

    def close(self) -> None:
        self.node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class StorescpTarget:
    """DCMTK storescp with default options writing into a fresh folder."""

    name = "storescp"
    called = "STORESCP"

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="storescp-", dir=workdir))
        self.port = _free_port()
        self.argv = [STORESCP, "-aet", self.called, "-od", str(self.dir), str(self.port)]
        self.proc = _popen(self.argv)
        _wait_listening(self.port, self.proc)

    def received(self) -> int:
        return sum(1 for p in self.dir.iterdir() if p.is_file())

    def close(self) -> None:
        _reap(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


Target = NodeTarget | StorescpTarget
TARGETS: dict[str, Callable[[Path], Target]] = {"dicomnode": NodeTarget, "storescp": StorescpTarget}


@contextlib.contextmanager
def target(kind: str, workdir: Path) -> Iterator[Target]:
    t = TARGETS[kind](workdir)
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
        _, err = proc.communicate(timeout=600)
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


def _versions() -> dict[str, str]:
    import pydicom
    import pynetdicom

    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""

    return {
        "dicomnode": __version__,
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dcmtk": first_line([STORESCU, "--version"]),
        "kernel": platform.release(),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    series_dir = workdir / "series"
    t0 = time.perf_counter()
    files = sorted(generate(series_dir, args.slices))
    size = sum(p.stat().st_size for p in files)
    print(f"generated {len(files)} slices, {size / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s "
          f"({series_dir})", flush=True)
    configs = {"1 assoc": [files], f"{PARALLEL} assoc": split(files, PARALLEL)}
    seconds: dict[str, dict[str, list[float]]] = {c: {k: [] for k in TARGETS} for c in configs}
    node_cpu: dict[str, list[float]] = {c: [] for c in configs}  # dicomnode process CPU s / instance
    floor_write: list[float] = []
    floor_commit: list[float] = []

    # Warm the page cache and both servers' code paths once, untimed.
    for kind in TARGETS:
        with target(kind, workdir) as t:
            send(t, [files[:10]])

    for rep in range(args.reps):
        w, c = durability_floor(workdir, files[:20])
        floor_write += w
        floor_commit += c
        # Alternate the order so neither target always runs right after the other.
        kinds = list(TARGETS) if rep % 2 == 0 else list(reversed(TARGETS))
        for config, groups in configs.items():
            for kind in kinds:
                with target(kind, workdir) as t:
                    # The node runs in this process (the storescu processes are children): the
                    # process CPU time while sending is the node's.
                    cpu_before = os.times()
                    elapsed = send(t, groups)
                    cpu_after = os.times()
                    got = t.received()
                if got != len(files):
                    raise RuntimeError(f"{kind} {config}: {got} of {len(files)} instances stored")
                seconds[config][kind].append(elapsed)
                if kind == "dicomnode":
                    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
                    node_cpu[config].append(cpu / len(files))
                print(f"  rep {rep + 1} {config:8} {kind:10} {len(files) / elapsed:7.1f} inst/s", flush=True)

    echo: dict[str, list[float]] = {"dicomnode": [], "storescp": [], "closed port": []}
    with target("dicomnode", workdir) as node, target("storescp", workdir) as scp:
        closed = _free_port()
        for _ in range(3):  # warm-up
            echo_seconds(node.called, node.port)
            echo_seconds(scp.called, scp.port)
        for _ in range(args.echoes):
            echo["dicomnode"].append(echo_seconds(node.called, node.port))
            echo["storescp"].append(echo_seconds(scp.called, scp.port))
            echo["closed port"].append(echo_seconds("NOBODY", closed))

    throughput = {}
    for config in configs:
        rates = {k: [len(files) / s for s in seconds[config][k]] for k in TARGETS}
        med = {k: _median(v) for k, v in rates.items()}
        throughput[config] = {
            "instances_per_s": rates,
            "median_instances_per_s": med,
            "ratio_dicomnode_over_storescp": med["dicomnode"] / med["storescp"],
            "associations": len(configs[config]),
            "dicomnode_cpu_ms_per_instance": _median(node_cpu[config]) * 1000,
        }
    echo_ms = {k: _median(v) * 1000 for k, v in echo.items()}
    return {
        "slices": len(files),
        "bytes": size,
        "reps": args.reps,
        "throughput": throughput,
        "durability_floor_ms": {
            "spool_write": _median(floor_write) * 1000,
            "ledger_commit": _median(floor_commit) * 1000,
            "n": len(floor_write),
        },
        "echo_ms": {"median": echo_ms, "all": {k: [x * 1000 for x in v] for k, v in echo.items()},
                    "n": args.echoes,
                    "dicomnode_minus_storescp": echo_ms["dicomnode"] - echo_ms["storescp"],
                    "dicomnode_minus_closed": echo_ms["dicomnode"] - echo_ms["closed port"],
                    "storescp_minus_closed": echo_ms["storescp"] - echo_ms["closed port"]},
    }


def print_table(result: dict[str, Any]) -> None:
    print()
    print(f"{result['slices']} slices 512x512 CT, {result['bytes'] / 2**20:.1f} MiB; "
          f"median of {result['reps']} runs; nproc {result['nproc']}, "
          f"load {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}")
    print()
    print("| associations | dicomnode inst/s | storescp inst/s | dicomnode/storescp | dicomnode CPU ms/inst |")
    print("|---|---:|---:|---:|---:|")
    for config, row in result["throughput"].items():
        med = row["median_instances_per_s"]
        print(f"| {config} | {med['dicomnode']:.1f} | {med['storescp']:.1f} | "
              f"{row['ratio_dicomnode_over_storescp']:.2f}x | {row['dicomnode_cpu_ms_per_instance']:.1f} |")
    floor = result["durability_floor_ms"]
    total = floor["spool_write"] + floor["ledger_commit"]
    print()
    print(f"durability floor (no network, median of {floor['n']}): spool write {floor['spool_write']:.1f} ms "
          f"+ ledger commit {floor['ledger_commit']:.1f} ms = {total:.1f} ms per instance, "
          f"at most {1000 / total:.0f} inst/s over one association")
    e = result["echo_ms"]
    print()
    print(f"| whole echoscu process (median of {e['n']}) | ms |")
    print("|---|---:|")
    for k, v in e["median"].items():
        print(f"| {k} | {v:.1f} |")
    print(f"| dicomnode - storescp | {e['dicomnode_minus_storescp']:+.1f} |")
    print(f"| dicomnode - closed port (association cost) | {e['dicomnode_minus_closed']:+.1f} |")
    print(f"| storescp - closed port (association cost) | {e['storescp_minus_closed']:+.1f} |")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--echoes", type=int, default=20)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "receive.json")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    for tool in (STORESCU, ECHOSCU, STORESCP):
        if not Path(tool).exists():
            print(f"{tool} is missing: apt-get install dcmtk", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _interrupt)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench-receive-", dir=args.workdir))
    try:
        result = run(args, workdir)
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
