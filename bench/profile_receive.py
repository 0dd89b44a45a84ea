"""Where a dicomnode receiver spends its CPU: py-spy over the whole ``dicomnode serve`` process tree
(the node and its receiver processes) while DCMTK storescu sends the benchmark series.

Every sample (a thread on CPU, py-spy's default: idle threads are not sampled) is put in the first
category whose pattern matches one of its frames, from the innermost frame outwards, so the
shares add up to 100 %. The categories follow the receive path of one instance.

Usage: ``python3 bench/profile_receive.py [--slices 200] [--assoc 1] [--receivers 2] [--raw F]``
(py-spy needs ptrace rights: root, or ``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_receive as br  # noqa: E402

# (category, pattern on "function (file)"), innermost match wins; order breaks ties in one frame.
CATEGORIES = [
    ("spool: write + fsync of the file", r"(^|\.)write_linked "),
    ("spool: fsync of the folder", r"(^|\.)(sync_folder|_fsync_dir) "),
    ("ledger commit (SQLAlchemy + SQLite, WAL fsync)", r"ledger\.py|sqlalchemy|sqlite3"),
    ("header walk + checks (pydicom)", r"(^|\.)(parse_received|check_dataset|routing_fields|received_uid) "),
    ("audit line + metrics", r"audit\.py|metrics\.py|prometheus"),
    ("C-STORE data set assembly (encoded_dataset)", r"(^|\.)encoded_dataset "),
    ("DIMSE decode (command set, pydicom)", r"dimse_messages\.py|dimse\.py|dimse_primitives\.py"),
    ("PDU read + decode (DUL, EdgeSocket)", r"dul\.py|pdu\.py|transport\.py|pdu_items\.py"),
    ("association/event plumbing (pynetdicom)", r"association\.py|events\.py|_handlers\.py"),
    ("receiver (dicomnode, other)", r"receiver\.py|receivers\.py|spool\.py"),
    ("thread wake-ups and polling", r"threading\.py|queue\.py|selectors\.py|socketserver\.py"),
    ("start-up imports", r"<frozen importlib|^<module> "),
]


def categorise(raw: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    total = 0
    shares: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    compiled = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r" \((.*?)(:\d+)?\)$", lambda m: f" ({Path(m.group(1)).name})", f)
                  for f in stack.split(";")[1:]]
        if frames:
            leaves[frames[-1]] += count
        for frame in reversed(frames):
            found = next((name for name, pattern in compiled if pattern.search(frame)), None)
            if found is not None:
                shares[found] += count
                break
        else:
            shares["other"] += count
    return total, shares, leaves


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--copies", type=int, default=3, help="send the series this many times")
    parser.add_argument("--assoc", type=int, default=1)
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's raw output here")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="profile-receive-"))
    try:
        files = br.copies(br.generate(work / "series", args.slices), work / "copies", args.slices * args.copies)
        target = br.NodeTarget(work, options={"node": {"receivers": args.receivers}})
        try:
            br.send(target, [files[:10]])  # warm-up: imports, first series folder
            raw = args.raw or work / "profile.raw"
            spy = subprocess.Popen(["py-spy", "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw),
                                    "--pid", str(target.proc.pid), "--subprocesses", "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.5)
            cpu = target.cpu_seconds()
            elapsed = br.send(target, br.split(files[10:], args.assoc))
            cpu = target.cpu_seconds() - cpu
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            sent = len(files) - 10
            print(f"{sent} instances over {args.assoc} association(s), {args.receivers} receiver process(es): "
                  f"{sent / elapsed:.1f} inst/s, {1000 * cpu / sent:.2f} ms CPU/inst (py-spy attached)")
        finally:
            target.close()
        total, shares, leaves = categorise(raw)
        print(f"\n{total} samples on CPU\n\n| where | share |\n|---|---:|")
        for name, count in shares.most_common():
            print(f"| {name} | {100 * count / total:.1f} % |")
        print("\ninnermost frames:")
        for frame, count in leaves.most_common(args.top):
            print(f"{100 * count / total:5.1f} %  {frame}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
