"""Audit log: one JSON object per line, append-only.

Events carry identifiers only (AE titles, hosts, UIDs, job ids, statuses). Patient names are never
passed in here unless ``audit.include_patient_names`` is set, and then only by the caller that
knows them. Each line is flushed immediately; the file is opened in append mode so that several
processes may write to it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

Subscriber = Callable[[dict[str, Any]], None]


class Audit:
    def __init__(self, path: Path | None, enabled: bool = True, keep_recent: int = 500) -> None:
        self.path = path
        self.enabled = enabled and path is not None
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8") if self.enabled and path else None  # noqa: SIM115
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep_recent)
        self.subscribers: list[Subscriber] = []  # e.g. metrics; called outside the lock

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        with self._lock:
            self.recent.append(record)
            if self._file is not None:
                self._file.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
                self._file.flush()
        for subscriber in self.subscribers:
            subscriber(record)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
