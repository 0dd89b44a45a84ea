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

from dicomnode.assembly import Assembly
from dicomnode.audit import AUDIT_FILE, Audit
from dicomnode.cluster import Heartbeat, default_node_id, heartbeat_settings
from dicomnode.config import Config, Peer
from dicomnode.domain import JobState, SeriesState, StoredInstance
from dicomnode.handlers import job_handlers, make_notifier
from dicomnode.jobs import Executor, JobQueue, LocalExecutor, NoExecutor
from dicomnode.ledger import RECONCILED_ASSOCIATION, Ledger, RecordOutcome
from dicomnode.metrics import Metrics
from dicomnode.models import build_registry
from dicomnode.receiver import Receiver, parse_header, routing_fields
from dicomnode.receivers import ReceiverPool
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
    """One dicomnode process. ``receive=False`` runs only jobs (``dicomnode worker`` without a
    cluster); with ``[cluster]`` the node receives and sweeps, and Procrastinate workers run the
    jobs (``dicomnode worker``)."""

    def __init__(self, config: Config, config_path: Path | None = None, *, receive: bool = True) -> None:
        self.config = config
        self.config_path = config_path
        cluster = config.cluster
        self.role = "serve" if receive else "worker"
        data_dir = config.node.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.node_id = default_node_id(config, self.role)
        spool_root = cluster.spool_root if cluster is not None else data_dir / "spool"
        # A shared spool: each node writes its temporary files in a folder of its own.
        self.spool = Spool(spool_root, config.node.min_free_mb * 2**20,
                           node_id=self.node_id if cluster is not None else "")
        heartbeat_s, dead_after_s = heartbeat_settings(config)
        self.ledger = Ledger(config.ledger_url, dead_after_s=dead_after_s)
        self.audit = Audit(data_dir / AUDIT_FILE, enabled=config.audit.enabled)
        self.metrics = Metrics(self.ledger)
        self.audit.subscribe(self.metrics.observe)
        self.admin: AdminServer | None = None
        self.registry = build_registry(config.analysis)
        self.queue = JobQueue(self.ledger, config.jobs, self.audit,
                              queues=cluster.queues if cluster is not None else None)
        self.assembly = Assembly(config, self.ledger, self.queue, self.registry.default_for,
                                 self.registry.wants_gpu)
        self.notifier = make_notifier(config, self.ledger, self.queue, self.registry)
        self.executor: Executor = self._executor()
        self.queue.on_enqueued = self.executor.wake
        self.receiver: Receiver | ReceiverPool
        if receive and config.node.receiver_processes > 1:
            # Receiver processes on the node's listening socket (dicomnode.receivers).
            self.receiver = ReceiverPool(config, self.ledger, self.audit, self.node_id,
                                         on_sweep=self._schedule_sweep)
        else:
            self.receiver = Receiver(
                config.node,
                config.peers,
                self.spool,
                self.ledger,
                self.audit,
                on_stored=self._on_stored,
                on_released=lambda _association: self._schedule_sweep(config.assembly.release_grace_s),
                reuse_port=cluster is not None,
            )
        self.heartbeat = Heartbeat(self.ledger, heartbeat_s, config.jobs.lease_s, self.describe)
        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        self.last_reconcile: ReconcileReport | None = None
        self._started = False

    def _executor(self) -> Executor:
        """Who runs the jobs this process enqueues: Procrastinate workers (cluster), worker
        processes of this node (embedded), or someone else (``[jobs] workers = 0``)."""
        if self.config.cluster is not None:
            if not self.receive_role:
                return NoExecutor()
            from dicomnode.cluster import ClusterDispatcher

            return ClusterDispatcher(self.ledger, self.queue, self.config.jobs.poll_interval_s)
        if self.config.jobs.workers == 0:
            return NoExecutor()
        handlers = job_handlers(self.config, self.ledger, self.spool, self.queue, self.audit, self.notifier)
        return LocalExecutor(self.queue, handlers, workers=self.config.jobs.workers,
                             worker_kind=self.config.jobs.worker_kind)

    @property
    def receive_role(self) -> bool:
        return self.role == "serve"

    def describe(self) -> str:
        """What this process is doing, for ``dicomnode nodes``."""
        jobs = self.executor.busy
        what = "receiver+sweeper" if self.receive_role else "worker"
        if self.config.cluster is None and self.config.jobs.workers:
            what += f" + {self.config.jobs.workers} local worker(s)"
        return f"{what}: {jobs} job(s) running" if jobs else what

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.ledger.register_process(self.role, self.node_id)
        self.heartbeat.start()
        if self.receive_role:
            self.last_reconcile = self.reconcile()
        released = self.queue.release_stale_leases()
        if released:
            self.audit.log("jobs.resumed", jobs=released)
        if self.receive_role:
            failures = self.notifier.reconcile()
            if failures:
                self.audit.log("events.reconciled", events=failures)
            self.receiver.start()
        self.executor.start()
        if self.receive_role:
            # The scheduler is only a clock: the sweep re-reads the ledger, so a lost timer costs a
            # little latency, never a series.
            sweep_every = min(1.0, self.config.assembly.quiet_period_s / 4)
            self.scheduler.add_job(self.sweep, "interval", seconds=sweep_every, id="assembly-sweep")
            self.scheduler.start()
        if self.config.admin.enabled and self.receive_role:
            self._start_admin()
        self._started = True
        self.audit.log("node.started", ae_title=self.config.node.ae_title, port=self.config.node.port,
                       node_id=self.node_id, process=self.ledger.process_id, role=self.role)

    def stop(self) -> None:
        if self._started:
            if self.admin is not None:
                self.admin.stop()
                self.admin = None
            if self.receive_role:
                self.receiver.stop()
                self.scheduler.shutdown(wait=True)
            self.executor.stop()
            self.heartbeat.stop()
            try:
                self.ledger.process_stopped()
            except Exception as exc:  # the database is away; the missing heartbeats say it anyway
                LOG.warning("could not record the stop in the ledger: %s", exc)
            self._started = False
            self.audit.log("node.stopped")
        self.ledger.close()
        self.audit.close()

    def _start_admin(self) -> None:
        # The console is an aid: a taken port must not stop images from being received. Imported
        # here so that FastAPI and uvicorn load only when the console is on.
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
        # A shared spool holds files that other nodes linked a moment ago and are committing now:
        # only files older than that are orphans.
        settled_before = time.time() - 60.0 if self.config.cluster is not None else None
        for relative in sorted(on_disk - indexed_paths):
            if settled_before is not None and self._modified_after(relative, settled_before):
                continue
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
                    association_id=RECONCILED_ASSOCIATION,
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

    def _modified_after(self, relative: str, moment: float) -> bool:
        try:
            return self.spool.path(relative).stat().st_mtime > moment
        except OSError:
            return True
