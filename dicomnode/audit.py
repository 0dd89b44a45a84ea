"""Audit log: one JSON object per line, append-only.

Events carry identifiers only (AE titles, hosts, UIDs, job ids, statuses). Patient names are never
passed in here unless ``audit.include_patient_names`` is set, and then only by the caller that
knows them. Each line goes to the file with one ``write(2)`` on a descriptor opened with
``O_APPEND``, so several processes may append to it and lines never interleave.

Writing the audit log never fails its caller: on a full disk (or any other I/O error) the line is
dropped, counted in :attr:`Audit.dropped` and reported in the log, and the C-STORE refusal, release
or job transition that was being audited goes on unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"  # in the data folder of every process that audits (node, worker)

Subscriber = Callable[[dict[str, Any]], None]

_REPORT_EVERY = 60.0  # seconds between log lines about dropped audit lines


class Audit:
    def __init__(self, path: Path | None, enabled: bool = True, keep_recent: int = 500,
                 context: dict[str, Any] | None = None) -> None:
        self.path = path
        self.context = context or {}  # fields added to every record (a receiver process: its index)
        self.enabled = enabled and path is not None
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.enabled and path is not None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep_recent)
        self.subscribers: list[Subscriber] = []  # e.g. metrics; called outside the lock
        self.dropped = 0  # lines that could not be written
        self._torn = False  # a partial line was written: start the next one on a new line
        self._reported_at = 0.0

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields, **self.context}
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.recent.append(record)
            if self._fd is not None:
                self._write(line)
        self._notify(record)

    def observe(self, record: dict[str, Any]) -> None:
        """A record another process (a receiver process) already wrote to the log: kept in
        :attr:`recent` and passed to the subscribers, not written again."""
        with self._lock:
            self.recent.append(record)
        self._notify(record)

    def _notify(self, record: dict[str, Any]) -> None:
        for subscriber in self.subscribers:
            try:
                subscriber(record)
            except Exception:
                LOG.exception("audit subscriber failed on %s", record.get("event"))

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        data = b"\n" + line if self._torn else line
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._dropped(exc)
            return
        self._torn = written < len(data)
        if self._torn:
            self._dropped(OSError(f"short write ({written} of {len(data)} bytes)"))

    def _dropped(self, exc: OSError) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._reported_at >= _REPORT_EVERY:
            self._reported_at = now
            LOG.error("audit log %s: line dropped (%d so far): %s", self.path, self.dropped, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
