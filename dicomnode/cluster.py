"""Cluster mode: several receivers and workers on one PostgreSQL ledger, with Procrastinate.

The ledger stays the one source of truth for every job (attempts, retries, dead letters, replay).
Procrastinate (PostgreSQL-native: ``SKIP LOCKED``, LISTEN/NOTIFY, priorities, queues, worker
heartbeats) only carries a job's id to a worker process and runs the same handlers there.

- :class:`ClusterDispatcher` is the outbox: Procrastinate cannot join the ledger transaction that
  creates a job, so after every commit (``wake``) and every ``poll_interval_s`` it defers each
  ledger job that is due (queued, or failed and past ``not_before``, or running while its owner is
  dead or its lease expired) and that has no engine job waiting or running on a live worker. One
  engine job per ledger job is kept by a queueing lock; a duplicate delivery is harmless because a
  worker must win the ledger claim (a conditional update) before it runs anything. Procrastinate's
  own retries are off: the ledger decides.
- :func:`run_worker` is ``dicomnode worker``: a Procrastinate worker whose one task claims the
  ledger job it was given and runs its handler in this process, so a GPU worker keeps its models
  loaded between jobs.
- :class:`Heartbeat` keeps this process's row in ``nodes`` fresh (receivers and workers, in every
  mode): a process without heartbeats for ``dead_after_s`` is dead, its open associations no longer
  hold back completeness evidence, and its jobs run again.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from dicomnode.audit import AUDIT_FILE, Audit
from dicomnode.config import Config
from dicomnode.domain import JobKind
from dicomnode.jobs import JobQueue, run_attempt
from dicomnode.ledger import DEFAULT_DEAD_AFTER_S, Ledger

if TYPE_CHECKING:
    import procrastinate

LOG = logging.getLogger(__name__)

TASK_NAME = "dicomnode.run_job"
DEFAULT_HEARTBEAT_S = 5.0  # embedded mode (no [cluster] section)
_DEFER_BATCH = 200
_ENGINE_CLEANUP_S = 60.0


def queueing_lock(job_id: int) -> str:
    return f"dicomnode-job-{job_id}"


def default_node_id(config: Config, role: str = "serve") -> str:
    """``[cluster] node_id``, else the host name and DICOM port (a worker: ``<host>-worker``)."""
    if config.cluster is not None and config.cluster.node_id:
        return config.cluster.node_id
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:80] or "host"
    if role != "serve":
        return f"{host}-{role}"
    return f"{host}-{config.node.port}"


def heartbeat_settings(config: Config) -> tuple[float, float]:
    """(heartbeat interval, dead after) in seconds."""
    if config.cluster is not None:
        return config.cluster.heartbeat_s, config.cluster.dead_after_s
    return DEFAULT_HEARTBEAT_S, DEFAULT_DEAD_AFTER_S


def conninfo(ledger_url: str) -> str:
    """The libpq URI of a SQLAlchemy ``postgresql+psycopg`` URL (Procrastinate speaks psycopg)."""
    url = sa.engine.make_url(ledger_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class Heartbeat:
    """Renews this process's ``nodes`` row (and the leases of its running jobs) every interval; a
    database outage is logged and outlived."""

    def __init__(self, ledger: Ledger, interval_s: float, lease_s: float,
                 describe: Callable[[], str] = lambda: "") -> None:
        self.ledger = ledger
        self.interval_s = interval_s
        self.lease_s = lease_s
        self.describe = describe
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def beat(self) -> None:
        self.ledger.heartbeat(self.describe(), lease_s=self.lease_s)
        if time.monotonic() - self._last_prune > 3600:
            self._last_prune = time.monotonic()
            self.ledger.prune()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as exc:  # the database is away: the next beat tries again
                LOG.warning("heartbeat failed: %s", exc)


# --- the engine ---------------------------------------------------------------------------------

_runtime: WorkerRuntime | None = None


def run_job(job_id: int) -> None:
    """The one Procrastinate task: run ledger job ``job_id`` here if this worker wins its claim."""
    if _runtime is None:
        raise RuntimeError("dicomnode.run_job runs only in `dicomnode worker`")
    _runtime.run(job_id)


def make_app(ledger_url: str, *, sync: bool) -> procrastinate.App:
    """A Procrastinate app on the ledger database: ``sync`` for deferring from threads, async for
    running a worker."""
    import procrastinate

    connector: procrastinate.BaseConnector
    if sync:
        connector = procrastinate.SyncPsycopgConnector(conninfo=conninfo(ledger_url), min_size=1, max_size=2)
    else:
        connector = procrastinate.PsycopgConnector(conninfo=conninfo(ledger_url))
    app = procrastinate.App(connector=connector)
    # retry=False: a failed attempt is the ledger's business (backoff, horizon, dead letters).
    app.task(name=TASK_NAME, retry=False, pass_context=False)(run_job)
    return app


# Due ledger jobs without an engine job that is waiting, or running on a worker that still
# heartbeats. PostgreSQL only (the engine's tables live in the ledger database).
_DUE_WITHOUT_ENGINE_JOB = sa.text("""
SELECT j.id, j.kind, j.queue, j.priority, j.payload FROM jobs j
WHERE ((j.state IN ('queued', 'failed') AND j.not_before <= :now)
       OR (j.state = 'running' AND (j.lease_expires < :now OR j.lease_owner IN (
            SELECT process_id FROM nodes WHERE stopped_at IS NOT NULL OR heartbeat_at < :dead))))
  AND NOT EXISTS (
      SELECT 1 FROM procrastinate_jobs p
      WHERE p.queueing_lock = 'dicomnode-job-' || j.id
        AND (p.status = 'todo'
             OR (p.status = 'doing' AND p.worker_id IN (
                 SELECT w.id FROM procrastinate_workers w
                 WHERE w.last_heartbeat > now() - make_interval(secs => :stall)))))
ORDER BY j.priority, j.not_before, j.id
LIMIT :limit
""")

# Engine jobs left 'doing' by a worker that died: finished as failed, so the engine's tables do not
# grow with them (the ledger job was already re-deferred above).
_STALLED_ENGINE_JOBS = sa.text("""
SELECT p.id FROM procrastinate_jobs p
WHERE p.task_name = :task AND p.status = 'doing'
  AND (p.worker_id IS NULL OR p.worker_id NOT IN (
       SELECT w.id FROM procrastinate_workers w
       WHERE w.last_heartbeat > now() - make_interval(secs => :stall)))
""")


class ClusterDispatcher:
    """The outbox-style reconciler (see the module doc). An :class:`~dicomnode.jobs.Executor`
    that runs no job itself: ``busy`` is always 0 here."""

    busy = 0

    def __init__(self, ledger: Ledger, queue: JobQueue, poll_interval_s: float) -> None:
        self.ledger = ledger
        self.queue = queue
        self.poll_interval_s = poll_interval_s
        self._app: procrastinate.App | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_cleanup = 0.0
        self.deferred = 0  # engine jobs deferred by this process (for tests and `nodes`)

    def start(self) -> None:
        self._app = make_app(self.ledger.url, sync=True)
        self._app.open()
        self._thread = threading.Thread(target=self._loop, name="cluster-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._app is not None:
            self._app.close()
            self._app = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception as exc:  # the database is away: try again next round
                LOG.warning("job reconciler: %s", exc)
            self._wake.wait(timeout=self.poll_interval_s)
            self._wake.clear()

    def reconcile(self) -> int:
        """Defer every due ledger job that has no live engine job; returns how many."""
        import procrastinate.exceptions

        assert self._app is not None, "start() first"
        stall = self.ledger.dead_after_s
        with self.ledger.engine.connect() as conn:
            now = self.ledger.now(conn)
            due = list(conn.execute(_DUE_WITHOUT_ENGINE_JOB, {
                "now": now, "dead": now - stall, "stall": stall, "limit": _DEFER_BATCH}))
            stalled = []
            if time.monotonic() - self._last_cleanup > _ENGINE_CLEANUP_S:
                self._last_cleanup = time.monotonic()
                stalled = list(conn.execute(_STALLED_ENGINE_JOBS, {"task": TASK_NAME, "stall": stall}).scalars())
        deferred = 0
        for row in due:
            queue = row.queue or self.queue.queue_for(JobKind(row.kind), _json(row.payload))
            try:
                self._app.configure_task(
                    TASK_NAME, queue=queue, priority=-int(row.priority), queueing_lock=queueing_lock(row.id),
                ).defer(job_id=int(row.id))
                deferred += 1
            except procrastinate.exceptions.AlreadyEnqueued:
                pass  # another reconciler deferred it a moment ago
        if stalled:
            with self.ledger.engine.begin() as conn:
                for engine_job in stalled:
                    conn.execute(sa.text("SELECT procrastinate_finish_job_v1(:id, 'failed', true)"),
                                 {"id": int(engine_job)})
        self.deferred += deferred
        return deferred


def _json(text: str) -> dict[str, Any]:
    import json

    value = json.loads(text)
    return value if isinstance(value, dict) else {}


# --- `dicomnode worker` -------------------------------------------------------------------------


class WorkerRuntime:
    """What a worker process holds between jobs: ledger, spool, handlers (and their loaded models)."""

    def __init__(self, config: Config, queues: list[str]) -> None:
        from dicomnode.handlers import job_handlers, make_notifier
        from dicomnode.models import build_registry
        from dicomnode.spool import Spool

        cluster = config.cluster
        assert cluster is not None, "cluster mode only"
        self.config = config
        self.queues = queues
        self.node_id = default_node_id(config, role="worker")
        heartbeat_s, dead_after_s = heartbeat_settings(config)
        self.ledger = Ledger(config.ledger_url, dead_after_s=dead_after_s)
        self.spool = Spool(cluster.spool_root, config.node.min_free_mb * 2**20, node_id=self.node_id)
        data_dir = config.node.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.audit = Audit(data_dir / AUDIT_FILE, enabled=config.audit.enabled)
        self.queue = JobQueue(self.ledger, config.jobs, self.audit, queues=cluster.queues)
        # Events of analyses run here are raised here, in the results' transaction, as in a node.
        self.notifier = make_notifier(config, self.ledger, self.queue, build_registry(config.analysis))
        handlers = job_handlers(config, self.ledger, self.spool, self.queue, self.audit, self.notifier)
        self.handlers = {h.kind: h for h in handlers}
        self.dispatcher = ClusterDispatcher(self.ledger, self.queue, config.jobs.poll_interval_s)
        self.queue.on_enqueued = self.dispatcher.wake
        self.heartbeat = Heartbeat(self.ledger, heartbeat_s, config.jobs.lease_s, self.describe)
        self._running: dict[int, str] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        with self._lock:
            jobs = ", ".join(f"{kind} job {job_id}" for job_id, kind in sorted(self._running.items()))
        return f"worker [{','.join(self.queues)}]: {jobs or 'idle'}"

    def start(self) -> None:
        self.ledger.register_process("worker", self.node_id)
        released = self.queue.release_stale_leases()
        if released:
            self.audit.log("jobs.resumed", jobs=released)
        self.heartbeat.start()
        self.dispatcher.start()
        self.audit.log("worker.started", node_id=self.node_id, process=self.ledger.process_id,
                       queues=self.queues)

    def warm_up(self) -> None:
        """Load the analyzers once, before the first job (a GPU worker keeps them loaded)."""
        from dicomnode.analysis import warm_up

        analyze_queues = {self.config.cluster.queues.analyze, self.config.cluster.queues.analyze_gpu} \
            if self.config.cluster is not None else set()
        if analyze_queues & set(self.queues):
            try:
                warm_up(self.config.analysis)
            except Exception as exc:
                LOG.warning("warm-up failed (the first job will load what it needs): %s", exc)

    def stop(self) -> None:
        self.dispatcher.stop()
        self.heartbeat.stop()
        try:
            self.ledger.process_stopped()
        except Exception as exc:
            LOG.warning("could not record the stop in the ledger: %s", exc)
        self.audit.log("worker.stopped", process=self.ledger.process_id)
        self.ledger.close()
        self.audit.close()

    def run(self, job_id: int) -> None:
        job = self.queue.claim_job(job_id)
        if job is None:
            return  # finished, not due yet, or another worker holds it: nothing to do here
        handler = self.handlers.get(job.kind)
        if handler is None:
            from dicomnode.errors import Permanent

            self.queue.fail(job, Permanent(f"this worker has no handler for {job.kind} jobs"))
            return
        with self._lock:
            self._running[job.id] = job.kind.value
        try:
            run_attempt(self.queue, handler, job, handler.run)
        finally:
            with self._lock:
                self._running.pop(job.id, None)


def run_worker(config: Config, queues: list[str] | None = None, concurrency: int | None = None) -> int:
    """``dicomnode worker``: run jobs from ``queues`` (all configured ones by default) until SIGTERM
    or SIGINT, which let the running jobs finish first."""
    global _runtime
    cluster = config.cluster
    assert cluster is not None, "cluster mode only"
    names = queues or cluster.queues.all()
    runtime = WorkerRuntime(config, names)
    runtime.start()
    _runtime = runtime
    logging.getLogger("procrastinate").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        threading.Thread(target=runtime.warm_up, name="warm-up", daemon=True).start()
        print(f"dicomnode worker {runtime.node_id} ({runtime.ledger.process_id}) on queues "
              f"{', '.join(names)}", flush=True)
        heartbeat_s, dead_after_s = heartbeat_settings(config)
        app = make_app(config.ledger_url, sync=False)
        app.run_worker(
            queues=names,
            concurrency=concurrency or max(1, config.jobs.workers),
            name=runtime.ledger.process_id,
            wait=True,
            delete_jobs="always",
            listen_notify=True,
            fetch_job_polling_interval=config.jobs.poll_interval_s,
            update_heartbeat_interval=heartbeat_s,
            stalled_worker_timeout=dead_after_s,
            install_signal_handlers=True,
        )
    finally:
        _runtime = None
        runtime.stop()
    return 0


def spool_root(config: Config) -> Path:
    return config.cluster.spool_root if config.cluster is not None else config.node.data_dir / "spool"
