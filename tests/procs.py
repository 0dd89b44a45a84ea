"""Process trees from /proc: who descends from a node, and whether any of them survived it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(fields[1]), fields[0], int(fields[19])


def descendants(pid: int) -> set[Proc]:
    """Every living process below ``pid`` (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
    found: set[Proc] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            stat = _stat(child)
            if stat is not None and stat[1] != "Z":
                found.add((child, stat[2]))
                todo.append(child)
    return found


def alive(procs: set[Proc]) -> set[Proc]:
    """Those of ``procs`` still running (the same process: same pid and start time, not a zombie)."""
    out = set()
    for pid, started in procs:
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[1] != "Z":
            out.add((pid, started))
    return out


def wait_all_gone(procs: set[Proc], timeout: float = 15.0) -> set[Proc]:
    """Wait until none of ``procs`` runs any more; returns the survivors (empty on success)."""
    deadline = time.monotonic() + timeout
    while True:
        left = alive(procs)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; closes its stdout pipe."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


class RecordingReceiver:
    """A test peer run as a child process that prints ``LISTENING <port>`` once bound and
    records each request as one JSON line in ``self.record``; ``stop()`` ends it."""

    kind = "receiver"  # what it receives, for messages

    def __init__(self, folder: Path, prefix: str, command: list[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.record = folder / f"{prefix}-{time.monotonic_ns()}.jsonl"
        self.record.touch()
        self.log = self.record.with_suffix(".log")
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, *command, "--record", str(self.record)],
                                            stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("LISTENING"):
            self.stop()
            raise AssertionError(f"{prefix} did not start: {line}{self.log.read_text()}")
        self.port = int(line.split()[1])

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.record.read_text(encoding="utf-8").splitlines() if line]

    def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.entries()
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{self.kind} got {len(self.entries())} entries, expected {count}")

    def stop(self) -> None:
        stop_process(self.process)
