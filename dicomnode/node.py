"""Composition root: builds every stage from the config, starts and stops them.

No business logic lives here; only wiring, start-up reconciliation and ``run_until_idle``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.analysis import AnalyzeHandler
from dicomnode.assembly import Assembly
from dicomnode.audit import Audit
from dicomnode.config import Config, Peer
from dicomnode.domain import JobState, SeriesState, StoredInstance
from dicomnode.errors import AnalyzerUnavailable
from dicomnode.jobs import JobQueue, LocalExecutor
from dicomnode.ledger import Ledger, RecordOutcome
from dicomnode.metrics import Metrics
from dicomnode.models import build_registry
from dicomnode.notify import Notifier, NotifyHandler
from dicomnode.receiver import Receiver, parse_header, routing_fields
from dicomnode.sender import DeliverHandler
from dicomnode.spool import Spool

if TYPE_CHECKING:
    from dicomnode.admin import AdminServer

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileReport:
    debris_removed: int
    orphans_indexed: int
    missing: tuple[str, ...]


class Node:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        data_dir = config.node.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.spool = Spool(data_dir / "spool", config.node.min_free_mb * 2**20)
        self.ledger = Ledger.sqlite(str(data_dir / "ledger.sqlite3"))
        self.audit = Audit(data_dir / "audit.log", enabled=config.audit.enabled)
        self.metrics = Metrics(self.ledger)
        self.audit.subscribe(self.metrics.observe)
        self.admin: AdminServer | None = None
        self.registry = build_registry(config.analysis)
        self.queue = JobQueue(self.ledger, config.jobs, self.audit)
        self.assembly = Assembly(config, self.ledger, self.queue, self.registry.default_for)
        self.notifier = Notifier(self.ledger, self.queue, config.notify, self._analyzer_info)
        self.executor = LocalExecutor(
            self.queue,
            [
                AnalyzeHandler(self.ledger, self.spool, self.queue, config.analysis, self.audit, self.notifier),
                # Before deliveries: the I/O threads take notifications first, they are the urgent part.
                NotifyHandler(self.ledger, self.spool, self.queue, config, self.audit),
                DeliverHandler(self.ledger, self.spool, self.queue, config.destinations,
                               config.node.ae_title, self.audit),
            ],
            workers=config.jobs.workers,
        )
        self.queue.on_enqueued = self.executor.wake
        self.receiver = Receiver(
            config.node,
            config.peers,
            self.spool,
            self.ledger,
            self.audit,
            on_stored=self._on_stored,
            on_released=lambda _association: self._schedule_sweep(config.assembly.release_grace_s),
        )
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        self.last_reconcile: ReconcileReport | None = None
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.last_reconcile = self.reconcile()
        released = self.queue.release_stale_leases()
        if released:
            self.audit.log("jobs.resumed", jobs=released)
        failures = self.notifier.reconcile()
        if failures:
            self.audit.log("events.reconciled", events=failures)
        self.receiver.start()
        self.executor.start()
        # The scheduler is only a clock: the sweep re-reads the ledger, so a lost timer costs a
        # little latency, never a series.
        sweep_every = min(1.0, self.config.assembly.quiet_period_s / 4)
        self.scheduler.add_job(self.sweep, "interval", seconds=sweep_every, id="assembly-sweep")
        self.scheduler.start()
        if self.config.admin.enabled:
            self._start_admin()
        self._started = True
        self.audit.log("node.started", ae_title=self.config.node.ae_title, port=self.config.node.port)

    def stop(self) -> None:
        if self._started:
            if self.admin is not None:
                self.admin.stop()
                self.admin = None
            self.receiver.stop()
            self.scheduler.shutdown(wait=True)
            self.executor.stop()
            self._started = False
            self.audit.log("node.stopped")
        self.ledger.close()
        self.audit.close()

    def _start_admin(self) -> None:
        # The console is an aid: a taken port must not stop images from being received.
        from dicomnode.admin import AdminServer

        admin = AdminServer(self)
        try:
            admin.start()
        except OSError as exc:
            LOG.error("admin console not started on %s:%s: %s", admin.host, self.config.admin.port, exc)
            self.audit.log("admin.failed", host=admin.host, port=self.config.admin.port, error=str(exc))
            return
        self.admin = admin
        self.audit.log("admin.started", url=admin.url)

    def _analyzer_info(self, name: str) -> tuple[str, str] | None:
        """(kind, version) of an analyzer in the registry, for events about jobs that produced nothing."""
        try:
            spec = self.registry.spec(name)
        except AnalyzerUnavailable:
            return None
        return str(spec.kind), spec.version

    def update_peers(self, peers: list[Peer]) -> None:
        self.receiver.update_peers(peers)
        self.config = self.config.model_copy(update={"peers": peers})

    # --- clock ----------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Complete due series, and set a wake-up for the next one that will be due."""
        completions, next_due = self.assembly.sweep()
        if completions:
            self.executor.wake()
        if next_due is not None:
            self._schedule_sweep(max(0.0, next_due - time.time()))

    def _on_stored(self, _item: StoredInstance, outcome: RecordOutcome) -> None:
        # The headers' expected count is complete evidence: do not wait for the next sweep tick.
        if outcome.expected_reached:
            self._schedule_sweep(0.0)

    def _schedule_sweep(self, delay: float) -> None:
        if not self.scheduler.running:
            return
        self.scheduler.add_job(self.sweep, "date", id="assembly-wakeup", replace_existing=True,
                               run_date=datetime.fromtimestamp(time.time() + delay, UTC))

    def run_until_idle(self, timeout: float = 60.0, poll: float = 0.02) -> None:
        """Drive every stage until nothing is left to do: no series waiting for completeness, no
        job queued, running or waiting to retry. Raises TimeoutError naming what is still open."""
        deadline = time.monotonic() + timeout
        while True:
            self.sweep()
            self.executor.wake()
            receiving = self.ledger.series_in_state(SeriesState.RECEIVING)
            open_jobs = self.ledger.unfinished_jobs()
            if not receiving and not open_jobs and not self.executor.busy:
                return
            if time.monotonic() > deadline:
                states = {f"{k}/{s}": n for (k, s), n in self.ledger.job_counts().items()
                          if s in (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)}
                raise TimeoutError(f"not idle after {timeout}s: {len(receiving)} series receiving, "
                                   f"jobs {states}")
            time.sleep(poll)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- recovery -------------------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Make spool and ledger agree after a crash.

        Temporary files are debris (never acknowledged). A spool file without a ledger row was
        linked but not committed: the sender was not answered, but the bytes are good, so they are
        indexed. A ledger row without its file must never happen; it is reported loudly.
        """
        debris = self.spool.remove_debris()
        indexed_paths = self.ledger.instance_paths()
        on_disk = set(self.spool.files("instances"))
        orphans = 0
        for relative in sorted(on_disk - indexed_paths):
            try:
                data = self.spool.read(relative)
                ds = parse_header(data)
                meta = ds.file_meta
                item = StoredInstance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    transfer_syntax_uid=str(meta.TransferSyntaxUID),
                    path=relative,
                    size=len(data),
                    calling_ae=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
                    peer_host="",
                    received_at=datetime.now(UTC),
                    association_id="reconciled",
                    **routing_fields(ds),
                )
                self.ledger.record_instance(item)
                orphans += 1
            except Exception as exc:  # a file we wrote but cannot read back: keep it, say so
                LOG.error("cannot index spool file %s: %s", relative, exc)
        missing = tuple(sorted(indexed_paths - on_disk))
        for relative in missing:
            LOG.error("ledger row without spool file: %s", relative)
            self.audit.log("instance.missing", path=relative)
        report = ReconcileReport(debris, orphans, missing)
        if debris or orphans or missing:
            self.audit.log("node.reconciled", debris_removed=debris, orphans_indexed=orphans,
                           missing=len(missing))
        return report
