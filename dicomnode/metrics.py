"""Prometheus metrics, fed by the audit log and read from the ledger at scrape time.

Counters and histograms are driven by audit events (:meth:`Metrics.observe` is an
:meth:`Audit.subscribe` callback), so every number here has an audit line behind it. Gauges that
describe state (jobs by kind and state, dead letters) are read from the ledger when scraped, so they
are right after a restart, when the counters start again from zero (as Prometheus expects).

Each :class:`Metrics` has its own registry: several nodes in one process (tests) never share
counters. Exposition is the Prometheus text format 0.0.4.

=============================================  ============================================================
``dicomnode_associations_total{outcome}``      A-ASSOCIATE requests accepted / rejected (PS3.8 7.1)
``dicomnode_instances_total{outcome}``         C-STORE requests: stored, duplicate, refused
``dicomnode_received_bytes_total``             bytes of newly stored instances
``dicomnode_cstore_responses_total{status}``   C-STORE response statuses sent (PS3.4 B.2.3), e.g. 0x0000
``dicomnode_jobs{kind,state}``                 jobs in the ledger by kind and state (scrape time)
``dicomnode_analysis_duration_seconds``        per analyzer and findings status
``dicomnode_time_to_result_seconds``           last image of a series epoch received -> result delivered
``dicomnode_deliveries_total``                 results delivered, by destination
``dicomnode_delivery_failures_total``          failed delivery attempts by destination and outcome
                                               (``retry``: will be retried, ``dead``: dead letter)
``dicomnode_time_to_notification_seconds``     last image of the epoch -> notification acknowledged,
                                               by channel and event type
``dicomnode_notify_attempts_total``            notification attempts by channel and outcome
                                               (``delivered``, ``retry``, ``dead``)
=============================================  ============================================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dicomnode.ledger import Ledger

LOG = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Analyzers take from tens of milliseconds (QC on a radiograph) to minutes (a 3D model on CPU).
ANALYSIS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Time to result includes the quiet period (seconds) and queueing behind other series.
LATENCY_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# Time to notification: the same range, finer at the short end where a well-run node sits.
NOTIFY_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600)


class _LedgerCollector(Collector):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the ledger by kind and state",
                                 labels=["kind", "state"])
        for (kind, state), count in sorted(self.ledger.job_counts().items()):
            jobs.add_metric([kind, state], count)
        yield jobs


class Metrics:
    """Counters fed by :meth:`observe` (an audit subscriber) plus ledger gauges at scrape time."""

    def __init__(self, ledger: Ledger | None = None, window_s: float = 60.0) -> None:
        self.ledger = ledger
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations = Counter("dicomnode_associations", "Association requests by outcome",
                                    ["outcome"], registry=r)
        self.instances = Counter("dicomnode_instances", "C-STORE requests by outcome", ["outcome"],
                                 registry=r)
        self.received_bytes = Counter("dicomnode_received_bytes", "Bytes of newly stored instances",
                                      registry=r)
        self.cstore_responses = Counter("dicomnode_cstore_responses", "C-STORE response statuses sent",
                                        ["status"], registry=r)
        self.analysis_duration = Histogram("dicomnode_analysis_duration_seconds",
                                           "Analyzer run time per series epoch", ["analyzer", "status"],
                                           buckets=ANALYSIS_BUCKETS, registry=r)
        self.time_to_result = Histogram("dicomnode_time_to_result_seconds",
                                        "Last image of a series epoch received -> result delivered",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.deliveries = Counter("dicomnode_deliveries", "Results delivered", ["destination"],
                                  registry=r)
        self.delivery_failures = Counter("dicomnode_delivery_failures", "Failed delivery attempts",
                                         ["destination", "outcome"], registry=r)
        self.time_to_notification = Histogram(
            "dicomnode_time_to_notification_seconds",
            "Last image of a series epoch received -> notification acknowledged", ["channel", "event"],
            buckets=NOTIFY_BUCKETS, registry=r)
        self.notify_attempts = Counter("dicomnode_notify_attempts", "Notification attempts by outcome",
                                       ["channel", "outcome"], registry=r)
        if ledger is not None:
            r.register(_LedgerCollector(ledger))
        self.window_s = window_s
        self._lock = threading.Lock()
        self._stored_at: deque[float] = deque()
        self._latencies: deque[float] = deque(maxlen=200)

    # --- audit subscriber ----------------------------------------------------------------------

    def observe(self, record: dict[str, Any]) -> None:
        """Count one audit record. Never raises: a metrics bug must not fail a C-STORE."""
        try:
            self._observe(record)
        except Exception:
            LOG.exception("metrics could not count audit event %r", record.get("event"))

    def _observe(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "association.accepted":
            self.associations.labels("accepted").inc()
        elif event == "association.rejected":
            self.associations.labels("rejected").inc()
        elif event in ("instance.stored", "instance.duplicate"):
            outcome = "stored" if event == "instance.stored" else "duplicate"
            self.instances.labels(outcome).inc()
            self.cstore_responses.labels("0x0000").inc()
            if outcome == "stored":
                self.received_bytes.inc(int(record.get("bytes") or 0))
                with self._lock:
                    self._stored_at.append(float(record.get("ts") or time.time()))
                    self._trim(time.time())
        elif event == "instance.refused":
            self.instances.labels("refused").inc()
            self.cstore_responses.labels(str(record.get("status", "0xC000"))).inc()
        elif event == "analysis.done":
            self.analysis_duration.labels(str(record.get("analyzer")), str(record.get("status"))).observe(
                float(record.get("seconds") or 0.0))
        elif event == "result.delivered":
            self.deliveries.labels(str(record.get("destination", ""))).inc()
            latency = self._latency(record)
            if latency is not None:
                self.time_to_result.observe(latency)
                with self._lock:
                    self._latencies.append(latency)
        elif event == "result.dead":
            self.delivery_failures.labels(str(record.get("destination", "")), "dead").inc()
        elif event == "job.failed" and record.get("kind") == "deliver":
            self.delivery_failures.labels(self._destination(record), "retry").inc()
        elif event == "notify.delivered":
            channel = str(record.get("channel", ""))
            self.notify_attempts.labels(channel, "delivered").inc()
            if record.get("seconds") is not None:
                self.time_to_notification.labels(channel, str(record.get("type", ""))).observe(
                    float(record["seconds"]))
        elif event == "notify.dead":
            self.notify_attempts.labels(str(record.get("channel", "")), "dead").inc()
        elif event == "job.failed" and record.get("kind") == "notify":
            self.notify_attempts.labels(self._payload(record, "channel"), "retry").inc()

    def _destination(self, record: dict[str, Any]) -> str:
        return self._payload(record, "destination")

    def _payload(self, record: dict[str, Any], key: str) -> str:
        job = self.ledger.job(int(record["job"])) if self.ledger is not None and "job" in record else None
        return str(job.payload.get(key, "")) if job is not None else ""

    def _latency(self, record: dict[str, Any]) -> float | None:
        """From the last image of the delivered epoch to now. A result of an older epoch (the series
        was reopened meanwhile) has no last-image time in the series row; it is not counted."""
        if self.ledger is None or "job" not in record:
            return None
        job = self.ledger.job(int(record["job"]))
        if job is None:
            return None
        series = self.ledger.series_row(job.series_instance_uid)
        if series is None or series.epoch != job.epoch:
            return None
        return max(0.0, float(record.get("ts") or time.time()) - series.last_received_at)

    def _trim(self, now: float) -> None:
        while self._stored_at and self._stored_at[0] < now - self.window_s:
            self._stored_at.popleft()

    # --- reading -------------------------------------------------------------------------------

    def images_per_second(self) -> float:
        """Newly stored instances per second over the last ``window_s`` seconds."""
        with self._lock:
            self._trim(time.time())
            return len(self._stored_at) / self.window_s

    def recent_times_to_result(self) -> list[float]:
        """The last (at most 200) time-to-result values seen by this process, oldest first."""
        with self._lock:
            return list(self._latencies)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
