"""A durable job queue on the ledger, and the executor that runs its jobs.

The seam is :class:`JobQueue`: ``enqueue``, ``claim`` (with a lease), ``complete`` and ``fail``.
Everything a job needs is in its ledger row, so a crashed worker's job is claimed again once its
lease expires (or at once, on the restart of the node that held it). A site that outgrows one
machine replaces :class:`LocalExecutor` with an existing distributed engine (e.g. Celery or Dask
workers calling the same handlers) behind the same queue; nothing else changes.

Failure classes: :class:`~dicomnode.errors.Transient` is retried with exponential backoff until
``max_attempts``; :class:`~dicomnode.errors.Permanent` (and anything unexpected after the last
attempt) goes to ``dead`` with its reason.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Connection

from dicomnode.audit import Audit
from dicomnode.config import JobsSettings
from dicomnode.domain import JobKind, JobState, Priority
from dicomnode.errors import Permanent, Transient
from dicomnode.ledger import JobRow, Ledger, jobs

LOG = logging.getLogger(__name__)


def owner_prefix() -> str:
    return f"{socket.gethostname()}:"


class JobQueue:
    """The narrow interface every executor uses."""

    def __init__(self, ledger: Ledger, settings: JobsSettings, audit: Audit) -> None:
        self.ledger = ledger
        self.settings = settings
        self.audit = audit
        self.owner = f"{owner_prefix()}{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_enqueued: Callable[[], None] = lambda: None

    def enqueue(
        self,
        conn: Connection,
        kind: JobKind,
        *,
        series_uid: str,
        epoch: int,
        payload: dict[str, Any],
        priority: Priority,
        dedup_key: str,
    ) -> int | None:
        """Insert a job in the caller's transaction; a duplicate ``dedup_key`` is a no-op."""
        job_id = self.ledger.enqueue(
            conn,
            kind=kind,
            dedup_key=dedup_key,
            series_uid=series_uid,
            epoch=epoch,
            payload=payload,
            priority=priority,
            max_attempts=self.settings.max_attempts,
        )
        if job_id is not None:
            self.audit.log("job.queued", job=job_id, kind=kind, series_instance_uid=series_uid,
                           epoch=epoch, priority=priority.name.lower())
        return job_id

    def claim(self, kinds: list[JobKind]) -> JobRow | None:
        job = self.ledger.claim(kinds, self.owner, self.settings.lease_s)
        if job is not None:
            self.audit.log("job.running", job=job.id, kind=job.kind, attempt=job.attempts)
        return job

    def complete(self, conn: Connection, job: JobRow, outcome: dict[str, Any]) -> bool:
        done = self.ledger.finish_job(conn, job.id, self.owner, JobState.SUCCEEDED, outcome=outcome)
        if done:
            self.audit.log("job.succeeded", job=job.id, kind=job.kind,
                           seconds=round(time.time() - (job.started_at or time.time()), 3))
        return done

    def backoff(self, attempts: int) -> float:
        s = self.settings
        return float(min(s.backoff_max_s, s.backoff_base_s * 2 ** max(0, attempts - 1)))

    def fail(self, job: JobRow, error: BaseException) -> JobState:
        """Record a failed attempt: retry later (``failed``) or give up (``dead``)."""
        if isinstance(error, Permanent):
            state, reason, delay = JobState.DEAD, error.reason, 0.0
        else:
            reason = error.reason if isinstance(error, Transient) else f"{type(error).__name__}: {error}"
            if job.attempts >= job.max_attempts:
                state, delay = JobState.DEAD, 0.0
                reason = f"{reason} (gave up after {job.attempts} attempts)"
            else:
                state = JobState.FAILED
                hint = error.defer if isinstance(error, Transient) else None
                delay = hint if hint is not None else self.backoff(job.attempts)
        with self.ledger.transaction() as conn:
            self.ledger.finish_job(conn, job.id, self.owner, state, error=reason,
                                   not_before=time.time() + delay if state is JobState.FAILED else None)
        self.audit.log(f"job.{state.value}", job=job.id, kind=job.kind, attempt=job.attempts,
                       reason=reason, retry_in_s=round(delay, 3) if state is JobState.FAILED else None)
        return state

    def release_stale_leases(self) -> int:
        """At start-up: jobs leased by an earlier process on this host are orphans; run them again."""
        import sqlalchemy as sa

        with self.ledger.transaction() as conn:
            result = conn.execute(
                jobs.update()
                .where(jobs.c.state == JobState.RUNNING)
                .where(jobs.c.lease_owner.like(owner_prefix() + "%"))
                .where(jobs.c.lease_owner != self.owner)
                .values(state=JobState.QUEUED, lease_owner=None, lease_expires=None,
                        not_before=sa.literal(time.time()))
            )
            return int(result.rowcount or 0)


class JobHandler(Protocol):
    """What a job kind does. ``prepare`` and ``finish`` run in the node process (ledger, spool);
    ``run`` runs in an executor worker and must be picklable work on plain data."""

    kind: JobKind
    in_process: bool  # True: run in a thread (I/O-bound); False: in a worker process (CPU-bound)

    def prepare(self, job: JobRow) -> Any: ...

    def run(self, task: Any) -> Any: ...

    def finish(self, job: JobRow, result: Any) -> None: ...


@dataclass
class _InFlight:
    job: JobRow
    handler: JobHandler


class LocalExecutor:
    """Claims jobs from the ledger and runs them: CPU work in a process pool, I/O in threads.

    ``workers = 0`` runs analysis in a thread of the node process (tests, tiny sites).
    """

    def __init__(self, queue: JobQueue, handlers: list[JobHandler], workers: int,
                 worker_initializer: Callable[..., None] | None = None,
                 initializer_args: tuple[Any, ...] = ()) -> None:
        self.queue = queue
        self.handlers = {h.kind: h for h in handlers}
        self.workers = workers
        self._threads = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="job-io")
        self._cpu_threads = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-cpu")
        self._processes: cf.ProcessPoolExecutor | None = None
        self._initializer = worker_initializer
        self._initargs = initializer_args
        self._in_flight: dict[int, _InFlight] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.workers > 0:
            self._processes = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=self._initializer,
                initargs=self._initargs,
            )
            self._warm_up(self._processes)
        self._thread = threading.Thread(target=self._loop, name="job-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._cpu_threads.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)

    def _warm_up(self, pool: cf.ProcessPoolExecutor) -> None:
        """Start the worker processes now and let each CPU-bound handler preload what its jobs
        need (imports, models), so that the first job after start-up does not pay for it. A
        handler offers this with ``worker_warm_up() -> (picklable function, args)``; a failure is
        logged and otherwise ignored: the first job then loads what it needs itself."""
        for handler in self.handlers.values():
            offer = getattr(handler, "worker_warm_up", None)
            if handler.in_process or offer is None:
                continue
            function, args = offer()
            for _ in range(self.workers):
                pool.submit(function, *args).add_done_callback(_log_warm_up_failure)

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._in_flight)

    # --- dispatch -----------------------------------------------------------------------------

    def _capacity(self, handler: JobHandler) -> int:
        with self._lock:
            running = [f for f in self._in_flight.values() if f.handler.in_process == handler.in_process]
        limit = 4 if handler.in_process else max(1, self.workers)
        return limit - len(running)

    def _loop(self) -> None:
        interval = self.queue.settings.poll_interval_s
        while not self._stop.is_set():
            try:
                claimed = self.dispatch_once()
            except Exception:
                LOG.exception("job dispatcher error")
                claimed = 0
            if not claimed:
                self._wake.wait(timeout=interval)
                self._wake.clear()

    def dispatch_once(self) -> int:
        """Claim and start as many jobs as there is capacity for; returns how many."""
        started = 0
        for handler in sorted(self.handlers.values(), key=lambda h: h.in_process):
            while self._capacity(handler) > 0 and not self._stop.is_set():
                job = self.queue.claim([handler.kind])
                if job is None:
                    break
                self._start(job, handler)
                started += 1
        return started

    def _start(self, job: JobRow, handler: JobHandler) -> None:
        with self._lock:
            self._in_flight[job.id] = _InFlight(job, handler)
        try:
            task = handler.prepare(job)
        except BaseException as exc:
            self._done(job, handler, None, exc)
            return
        if handler.in_process:
            future = self._threads.submit(handler.run, task)
        elif self._processes is not None:
            future = self._processes.submit(handler.run, task)
        else:
            future = self._cpu_threads.submit(handler.run, task)
        future.add_done_callback(lambda f: self._collect(job, handler, f))

    def _collect(self, job: JobRow, handler: JobHandler, future: cf.Future[Any]) -> None:
        try:
            result = future.result()
        except BaseException as exc:  # worker raised, or the worker process died
            if isinstance(exc, cf.process.BrokenProcessPool):
                exc = Transient("analysis worker process died")
                self._restart_pool()
            self._done(job, handler, None, exc)
            return
        self._done(job, handler, result, None)

    def _restart_pool(self) -> None:
        with self._lock:
            if self._processes is not None:
                self._processes.shutdown(wait=False, cancel_futures=True)
                self._processes = cf.ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=self._initializer, initargs=self._initargs)
                self._warm_up(self._processes)

    def _done(self, job: JobRow, handler: JobHandler, result: Any, error: BaseException | None) -> None:
        try:
            if error is None:
                try:
                    handler.finish(job, result)
                except BaseException as exc:
                    error = exc
            if error is not None:
                if not isinstance(error, (Transient, Permanent)):
                    LOG.error("job %s failed: %s", job.id, "".join(traceback.format_exception(error)))
                self.queue.fail(job, error)
                on_failed = getattr(handler, "on_failed", None)
                if on_failed is not None:
                    on_failed(job)
        except Exception:
            LOG.exception("could not record the end of job %s", job.id)
        finally:
            with self._lock:
                self._in_flight.pop(job.id, None)
            self._wake.set()


def _log_warm_up_failure(future: cf.Future[Any]) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        LOG.warning("worker warm-up failed (the first job will load what it needs): %s", error)
