"""How long a scanner waits while another host floods the DICOM port (issue 9, "done when").

A real ``dicomnode serve`` (shipped defaults: 16 associations, 30 s ACSE timeout, 5 s handshake
deadline, 64 negotiation slots, 8 per host; plus a TLS listener) is started in a subprocess. Then,
interleaved for ``--reps`` repetitions, DCMTK ``echoscu`` and ``storescu`` (one 512x512 CT
instance) are timed as whole processes from 127.0.0.1, on the plain and on the TLS port,

* **quiet**: nothing else happens (the reference, same run);
* **flood**: 127.0.0.2 keeps 25 idle and 25 half-open sockets open on the port under test (each
  one the node closes is opened again at once) and makes 17 connect-and-close per second.

It reports the median, 90th percentile and maximum per case, the flood/quiet ratio of the medians,
how many connections the flood opened, and the node's peak resident set (VmHWM) at the end. The
goal is that a scanner gets through within 1 s under the flood.

Usage: ``python3 bench/bench_edge.py [--reps 15] [--json bench/results/edge.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import tomlkit  # noqa: E402
from hostile import HALF_OPEN_RQ, ConnectCloseFlood, SocketHold, peak_rss_mb, reset_peak_rss  # noqa: E402
from pki import dcmtk_tls_args, make_pki, tls_node_settings  # noqa: E402
from synthetic import ct_series, write_series  # noqa: E402

from dicomnode import __version__  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
GOAL_S = 1.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_node(folder: Path, port: int, tls_port: int, pki: dict[str, Path]) -> subprocess.Popen[bytes]:
    config = {
        "node": {"port": port, "data_dir": str(folder / "data"), "min_free_mb": 1,
                 "tls": tls_node_settings(pki, tls_port)},
        "peers": [{"ae_title": "STORESCU", "hosts": ["127.0.0.1"]}, {"ae_title": "ECHOSCU"}],
        # Nothing is analysed: with workers = 0 the analysis would run (and load torch) in the node
        # process, whose RSS is measured here.
        "assembly": {"quiet_period_s": 3600, "release_grace_s": 3600},
        "jobs": {"workers": 0},
        "admin": {"enabled": False},
    }
    path = folder / "dicomnode.toml"
    path.write_text(tomlkit.dumps(config))
    log = (folder / "node.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("node did not start")


def timed(argv: list[str], expect: str) -> float:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    elapsed = time.monotonic() - started
    if expect not in result.stdout + result.stderr:
        raise SystemExit(f"{argv[0]} failed:\n{result.stdout}{result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        folder = Path(tmp)
        pki = make_pki(folder / "pki")
        instance = write_series(ct_series(1, seed="bench-edge"), folder / "series")[0]
        port, tls_port = free_port(), free_port()
        load_before = os.getloadavg()
        proc = start_node(folder, port, tls_port, pki)
        samples: dict[str, list[float]] = {}
        opened: dict[str, int] = {}
        peaks: dict[str, float] = {}  # node peak RSS (MB) per case
        try:
            for rep in range(args.reps):
                for transport, target, extra in (("plain", port, ()), ("tls", tls_port, dcmtk_tls_args(pki))):
                    commands = {
                        "echoscu": (["/usr/bin/echoscu", *extra, "-aet", "ECHOSCU", "-aec", "DICOMNODE",
                                     "127.0.0.1", str(target)], ""),
                        "storescu": (["/usr/bin/storescu", "-v", *extra, "-aet", "STORESCU", "-aec", "DICOMNODE",
                                      "127.0.0.1", str(target), str(instance)], "Received Store Response (Success)"),
                    }
                    order = ("quiet", "flood") if rep % 2 == 0 else ("flood", "quiet")
                    for condition in order:
                        for tool, (argv, expect) in commands.items():
                            key = f"{transport} {tool} {condition}"
                            reset_peak_rss(proc.pid)
                            if condition == "quiet":
                                samples.setdefault(key, []).append(timed(argv, expect))
                            else:
                                with SocketHold(target, 25) as idle, SocketHold(target, 25, HALF_OPEN_RQ) as half, \
                                        ConnectCloseFlood(target, 17) as flood:
                                    time.sleep(0.5)  # steady state: holders at their count, node resetting
                                    samples.setdefault(key, []).append(timed(argv, expect))
                                opened[key] = opened.get(key, 0) + idle.opened + half.opened + flood.done
                            peaks[key] = max(peaks.get(key, 0.0), peak_rss_mb(proc.pid))
            rss = max(peaks.values())
        finally:
            proc.terminate()
            proc.wait(30)
        log = (folder / "node.log").read_text(errors="replace")

    rows = []
    report: dict[str, Any] = {}
    for transport in ("plain", "tls"):
        for tool in ("echoscu", "storescu"):
            quiet = samples[f"{transport} {tool} quiet"]
            flood = samples[f"{transport} {tool} flood"]
            q, f = statistics.median(quiet), statistics.median(flood)
            p90 = statistics.quantiles(flood, n=10, method="inclusive")[-1] if len(flood) >= 2 else flood[0]
            rows.append((f"{transport} {tool}", q, f, p90, max(flood), f / q))
            report[f"{transport} {tool}"] = {"quiet_s": quiet, "flood_s": flood, "median_quiet_s": q,
                                             "median_flood_s": f, "p90_flood_s": p90, "max_flood_s": max(flood),
                                             "ratio": f / q,
                                             "node_peak_rss_mb_quiet": peaks[f"{transport} {tool} quiet"],
                                             "node_peak_rss_mb_flood": peaks[f"{transport} {tool} flood"],
                                             "flood_connections": opened[f"{transport} {tool} flood"]}
    print(f"{'case':<18} {'quiet med':>10} {'flood med':>10} {'flood p90':>10} {'flood max':>10} {'ratio':>6}")
    for name, q, f, p90, worst, ratio in rows:
        print(f"{name:<18} {q:>9.3f}s {f:>9.3f}s {p90:>9.3f}s {worst:>9.3f}s {ratio:>5.2f}x"
              f"   peak RSS quiet/flood {peaks[name + ' quiet']:.0f}/{peaks[name + ' flood']:.0f} MB")
    worst_case = max(r[4] for r in rows)
    print(f"goal: every flood run within {GOAL_S:g} s -> {'met' if worst_case <= GOAL_S else 'NOT met'} "
          f"(worst {worst_case:.3f} s); node peak RSS {rss:.0f} MB")
    print(f"connections the flood opened per run (median over cases): "
          f"{statistics.median(v / args.reps for v in opened.values()):.0f}")
    refused = log.count("refused:")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "version": __version__, "reps": args.reps, "nproc": os.cpu_count(), "platform": platform.platform(),
            "load_before": load_before, "load_after": os.getloadavg(), "node_peak_rss_mb": rss,
            "refusal_warnings_in_log": refused, "goal_s": GOAL_S, "cases": report,
        }, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
