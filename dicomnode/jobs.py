"""A durable job queue on the ledger, and the executors that run its jobs.

The seam is :class:`JobQueue`: ``enqueue``, ``claim`` (with a lease), ``complete`` and ``fail``.
Everything a job needs is in its ledger row, so a crashed worker's job is claimed again once its
owner is seen dead (no heartbeat, or its process is gone) or its lease expires. Two executors run
the same handlers: :class:`LocalExecutor` (embedded: worker processes of the node) and, in cluster
mode, Procrastinate workers fed by :class:`dicomnode.cluster.ClusterDispatcher`. The ledger's jobs
table stays the truth (attempts, retries, dead letters, replay); an engine only carries and runs.

Failure classes: :class:`~dicomnode.errors.Transient` is retried with capped exponential backoff for
``retry_for_h`` hours after the first failure (a PACS that is down for a night still gets its
results); :class:`~dicomnode.errors.Permanent` goes to ``dead`` at once with its reason; anything
unexpected (a bug, a worker process that died) is retried up to ``max_attempts``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Connection

from dicomnode.audit import Audit
from dicomnode.config import JobsSettings, QueueNames
from dicomnode.domain import JobKind, JobState, Priority
from dicomnode.errors import DicomNodeError, Permanent, Transient
from dicomnode.ledger import JobRow, Ledger, process_identity

LOG = logging.getLogger(__name__)


class WorkerDied(DicomNodeError):
    """The process running a job died (killed, out of memory): retried up to ``max_attempts``, as
    an analysis that kills its worker every time must not be retried for a whole day."""


class JobQueue:
    """The narrow interface every executor uses."""

    def __init__(self, ledger: Ledger, settings: JobsSettings, audit: Audit,
                 queues: QueueNames | None = None) -> None:
        self.ledger = ledger
        self.settings = settings
        self.audit = audit
        self.queues = queues  # cluster mode: the engine queue of each job kind
        self._fallback_owner = process_identity()
        self.on_enqueued: Callable[[], None] = lambda: None

    @property
    def owner(self) -> str:
        """The lease owner: this process's id in ``nodes`` once registered."""
        return self.ledger.process_id or self._fallback_owner

    def queue_for(self, kind: JobKind, payload: dict[str, Any]) -> str:
        """The engine queue that carries a job ("" in embedded mode)."""
        if self.queues is None:
            return ""
        if kind is JobKind.ANALYZE:
            if payload.get("gpu") and self.queues.analyze_gpu:
                return self.queues.analyze_gpu
            return self.queues.analyze
        name = getattr(self.queues, kind.value, "")
        if not name:
            raise ValueError(f"no queue is configured for {kind.value} jobs ([cluster.queues])")
        return str(name)

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
            queue=self.queue_for(kind, payload),
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

    def claim_job(self, job_id: int) -> JobRow | None:
        """Take one given job if it is runnable (an engine delivered its id); None otherwise."""
        job = self.ledger.claim_job(job_id, self.owner, self.settings.lease_s)
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
        s = self.settings
        now = self.ledger.now()
        failing_since: float | None = job.failing_since
        delay = 0.0
        if isinstance(error, Permanent):
            state, reason = JobState.DEAD, error.reason
        elif isinstance(error, Transient):
            reason = error.reason
            failing_since = failing_since if failing_since is not None else now
            left = failing_since + s.retry_for_h * 3600 - now
            if left <= 0:
                state = JobState.DEAD
                reason = (f"{reason} (not retried: retry_for_h = 0)" if s.retry_for_h == 0 else
                          f"{reason} (gave up: still failing after {_duration(now - failing_since)}, "
                          f"{job.attempts} attempts; retry_for_h = {s.retry_for_h:g})")
            else:
                state = JobState.FAILED
                delay = min(error.defer if error.defer is not None else self.backoff(job.attempts), left)
        else:
            reason = str(error) if isinstance(error, WorkerDied) else f"{type(error).__name__}: {error}"
            if job.attempts >= job.max_attempts:
                state = JobState.DEAD
                reason = f"{reason} (gave up after {job.attempts} attempts)"
            else:
                state, delay = JobState.FAILED, self.backoff(job.attempts)
        with self.ledger.transaction() as conn:
            self.ledger.finish_job(conn, job.id, self.owner, state, error=reason,
                                   retry_in_s=delay if state is JobState.FAILED else None,
                                   failing_since=failing_since)
        self.audit.log(f"job.{state.value}", job=job.id, kind=job.kind, attempt=job.attempts,
                       reason=reason, retry_in_s=round(delay, 3) if state is JobState.FAILED else None)
        return state

    def job_ended(self, job: JobRow) -> None:
        """After any attempt of any kind: the series epoch is done once none of its jobs is open."""
        self.ledger.close_epoch_if_done(job.series_instance_uid, job.epoch)

    def release_stale_leases(self) -> int:
        """At start-up: jobs leased by a process that is gone run again at once."""
        return self.ledger.release_stale_leases(self.owner)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


class JobHandler(Protocol):
    """What a job kind does. ``prepare`` and ``finish`` run in the process that claimed the job
    (ledger, spool); ``run`` may run in another process and must be picklable work on plain data."""

    kind: JobKind
    in_process: bool  # True: run in a thread (I/O-bound); False: in a worker process (CPU-bound)

    def prepare(self, job: JobRow) -> Any: ...

    def run(self, task: Any) -> Any: ...

    def finish(self, job: JobRow, result: Any) -> None: ...


def run_attempt(queue: JobQueue, handler: JobHandler, job: JobRow, run: Callable[[Any], Any]) -> None:
    """One attempt of a claimed job, start to end, in the calling thread: prepare, run (through
    ``run``), finish, or record the failure; then close the epoch if it was the last open job."""
    try:
        result = run(handler.prepare(job))
        handler.finish(job, result)
    except BaseException as exc:
        end_attempt(queue, handler, job, exc)
    else:
        end_attempt(queue, handler, job, None)


def end_attempt(queue: JobQueue, handler: JobHandler, job: JobRow, error: BaseException | None) -> None:
    """Record how an attempt ended (the handler's ``finish`` already ran on success)."""
    try:
        if error is not None:
            if not isinstance(error, (Transient, Permanent, WorkerDied)):
                LOG.error("job %s failed: %s", job.id, "".join(traceback.format_exception(error)))
            queue.fail(job, error)
            on_failed = getattr(handler, "on_failed", None)
            if on_failed is not None:
                on_failed(job)
        queue.job_ended(job)
    except Exception:
        LOG.exception("could not record the end of job %s", job.id)


class Executor(Protocol):
    """What the node starts, stops and wakes: runs jobs here, hands them to an engine, or neither."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wake(self) -> None: ...

    @property
    def busy(self) -> int: ...


class NoExecutor:
    """``[jobs] workers = 0``: this process runs no jobs (another process does)."""

    busy = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def wake(self) -> None:
        pass


# --- process life: stop requests, and worker processes that die with their node ------------------------

class StopRequest:
    """What a process's main thread waits on until it should stop: one of ``signums`` (handled
    from construction on) or :meth:`request` from any thread.

    CPython runs signal handlers in the main thread, between bytecodes. A handler that sets an
    Event the main thread waits on without a timeout is lost when the kernel hands the signal to
    another thread (a node ignored a Ctrl-C pressed while it was starting its workers), and
    ``Event.set()`` inside a handler can deadlock on the Event's own lock. Instead the C-level
    handler writes each signal's number to a wake-up socket, whichever thread receives it, and the
    main thread sleeps on that socket. Construct it in the main thread.
    """

    def __init__(self, *signums: signal.Signals) -> None:
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._signums = {int(s) for s in signums}
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, _note_signal) for s in signums}

    def request(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a stop is already pending
            self._writer.send(b"\0")

    def wait(self) -> int:
        """Block until a stop is due; the signal's number, or 0 for :meth:`request`."""
        while True:
            for value in self._reader.recv(256):
                if value == 0 or value in self._signums:
                    return value

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._reader.close()
        self._writer.close()

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _note_signal(_signum: int, _frame: object) -> None:
    """Python-level half of a :class:`StopRequest` handler: the wake-up socket carries the news."""


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Run first in every worker process: when the node dies, even by kill -9, its workers die too.

    On Linux the kernel sends SIGKILL when the parent goes (``prctl(PR_SET_PDEATHSIG)``); everywhere
    a watch thread ends the process once it has been re-parented. Without this, the workers of a
    killed node ran on, orphaned, holding hundreds of MB each, and a restarted node could not tell
    their late work from its own.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watch thread below still applies
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent_pid:
            os._exit(1)


class _InterruptProofSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker that Ctrl-C cannot interrupt, from its first instruction on.

    Ctrl-C in a terminal signals the whole foreground group, and a worker still importing (seconds,
    with torch) died with a KeyboardInterrupt traceback. Moving the child to a group of its own
    cannot close that window: ``setpgid`` on a child that has already exec'd fails (EACCES), and a
    spawned child has exec'd by the time ``Popen`` returns. A blocked signal stays blocked across
    fork and exec, so the child is started with SIGINT blocked and ``_worker_init`` ignores it
    before unblocking it. The node stops its workers itself (pool shutdown).
    """

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _InterruptProofSpawnContext(multiprocessing.context.SpawnContext):
    Process = _InterruptProofSpawnProcess


def _worker_init(parent_pid: int, initializer: Callable[..., None] | None, args: tuple[Any, ...]) -> None:
    # Ignoring a blocked SIGINT discards one already pending (POSIX), so unblocking is then safe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*args)


@dataclass
class _InFlight:
    job: JobRow
    handler: JobHandler


class LocalExecutor:
    """Claims jobs from the ledger and runs them: CPU work in worker processes (or threads, with
    ``worker_kind = "thread"``), I/O in threads of this process.

    Every worker process is started from the dispatcher thread, which lives as long as the
    executor: Linux delivers the parent-death signal when the *thread* that started a child ends.
    """

    def __init__(self, queue: JobQueue, handlers: list[JobHandler], workers: int,
                 worker_initializer: Callable[..., None] | None = None,
                 initializer_args: tuple[Any, ...] = (), worker_kind: str = "process") -> None:
        self.queue = queue
        self.handlers = {h.kind: h for h in handlers}
        self.workers = max(1, workers)
        self.use_processes = worker_kind == "process"
        self._threads = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="job-io")
        self._cpu_threads = cf.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="job-cpu")
        self._processes: cf.ProcessPoolExecutor | None = None
        self._pool_broken = False
        self._initializer = worker_initializer
        self._initargs = initializer_args
        self._in_flight: dict[int, _InFlight] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()  # it shuts the worker processes down before it ends
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._cpu_threads.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=_InterruptProofSpawnContext(),
            initializer=_worker_init,
            initargs=(os.getpid(), self._initializer, self._initargs),
        )
        self._warm_up(pool)
        return pool

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
        limit = 4 if handler.in_process else self.workers
        return limit - len(running)

    def _loop(self) -> None:
        interval = self.queue.settings.poll_interval_s
        try:
            if self.use_processes and any(not h.in_process for h in self.handlers.values()):
                self._processes = self._new_pool()
            while not self._stop.is_set():
                if self._pool_broken:
                    self._restart_pool()
                try:
                    claimed = self.dispatch_once()
                except Exception:
                    LOG.exception("job dispatcher error")
                    claimed = 0
                if not claimed:
                    self._wake.wait(timeout=interval)
                    self._wake.clear()
        finally:
            if self._processes is not None:
                self._processes.shutdown(wait=True, cancel_futures=True)

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
        try:
            if handler.in_process:
                future = self._threads.submit(handler.run, task)
            elif self._processes is not None:
                future = self._processes.submit(handler.run, task)
            else:
                future = self._cpu_threads.submit(handler.run, task)
        except cf.process.BrokenProcessPool:
            self._pool_broken = True
            self._done(job, handler, None, WorkerDied("analysis worker process died"))
            return
        future.add_done_callback(lambda f: self._collect(job, handler, f))

    def _collect(self, job: JobRow, handler: JobHandler, future: cf.Future[Any]) -> None:
        try:
            result = future.result()
        except BaseException as exc:  # worker raised, or the worker process died
            if isinstance(exc, cf.process.BrokenProcessPool):
                exc = WorkerDied("analysis worker process died")
                self._pool_broken = True  # the dispatcher thread starts a new pool (see class doc)
            self._done(job, handler, None, exc)
            return
        self._done(job, handler, result, None)

    def _restart_pool(self) -> None:
        with self._lock:
            self._pool_broken = False
            old, self._processes = self._processes, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        self._processes = self._new_pool()

    def _done(self, job: JobRow, handler: JobHandler, result: Any, error: BaseException | None) -> None:
        try:
            if error is None:
                try:
                    handler.finish(job, result)
                except BaseException as exc:
                    error = exc
            end_attempt(self.queue, handler, job, error)
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
