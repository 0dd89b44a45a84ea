"""Receiver processes: N processes accept associations on the listening socket(s) of their node,
so that N associations use N cores (``[node] receivers``).

* **One socket, made once.** The node binds and listens (``listen_backlog``) before it starts any
  receiver; every receiver process inherits the socket and accepts on it (non-blocking: when a
  sibling wins the accept, the loser gets EAGAIN). The node holds the socket open for its whole life,
  so a receiver that dies, even by kill -9, never resets the connections queued on it. (One
  SO_REUSEPORT socket per process would: the kernel queues a connection on one listener, and
  closing that listener resets its queue; it also spreads connections unevenly.)
* **A load board** (a small mmap'd file in the data folder): per process, the connections it holds
  and its live associations. A process holding more connections than its least busy sibling
  waits a moment before it accepts, so the idle one takes the connection; ``max_associations``
  counts the associations of every process (node-wide, as with one process; concurrent
  reservations in two processes can pass it by at most one each).
* **The ledger is written directly** by every process: SQLite write transactions are serialised
  by the ledger's writer lock, completeness evidence is the cluster's ``associations`` table (a
  release counts only when no open association of a live process carries the series), and each
  receiver registers a ``nodes`` row (role ``receiver``) with its own heartbeat. When a receiver
  dies the node closes that process's open associations at once (aborted) and starts it again.
* **Receivers die with their node**: parent-death signal (SIGKILL) plus a watch thread, the same as
  job workers (:func:`dicomnode.jobs.die_with_parent`); and a receiver stops when its control pipe
  (stdin) reaches end-of-file.
* **Channel to the node** (the receiver's stdout, JSON lines): sweep wake-ups (a release, an
  expected count reached: at once) and audit records (batched) that the node passes to metrics and
  to the console's recent list; the receivers append their audit lines to the log themselves,
  with ``"receiver": <index>``. Node to receiver (stdin): the start-up spec, then peer updates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dicomnode.audit import AUDIT_FILE, Audit
from dicomnode.config import Config, Peer
from dicomnode.ledger import Ledger
from dicomnode.transport import Admission, Connection, EdgeLimits

LOG = logging.getLogger(__name__)

_FIELDS = 3  # per process: negotiating connections, live associations, connections refused
_SLOT = struct.Struct(f"<{_FIELDS}i")
_ACCEPT_DEFER_S = 0.002  # per connection more than the least busy sibling
_ACCEPT_DEFER_MAX_S = 0.02
_AUDIT_BATCH = 64
_AUDIT_EVERY_S = 0.2
_STOP_GRACE_S = 5.0  # a stopping receiver lets associations in progress finish this long
_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 30.0
_STABLE_S = 60.0  # a receiver that ran this long restarts at once after its next death
_READY_TIMEOUT_S = 60.0


def make_listener(host: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    """The node's listening socket, shared by its receiver processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # cluster: several nodes' processes on one host share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class LoadBoard:
    """Connections and associations of each receiver process, in a file every process maps. Each
    process writes only its own slot; readers tolerate a slot being written."""

    def __init__(self, path: Path, slots: int, create: bool = False) -> None:
        self.slots = slots
        if create:
            path.write_bytes(b"\0" * _SLOT.size * slots)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, _SLOT.size * slots)
        finally:
            os.close(fd)

    def publish(self, index: int, negotiating: int, associations: int, refused: int) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * index, negotiating, associations, refused)

    def clear(self, index: int) -> None:
        self.publish(index, 0, 0, 0)

    def slot(self, index: int) -> tuple[int, int, int]:
        values = _SLOT.unpack_from(self._map, _SLOT.size * index)
        return int(values[0]), int(values[1]), int(values[2])

    def all(self) -> list[tuple[int, int, int]]:
        return [self.slot(i) for i in range(self.slots)]

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()


class SharedAdmission(Admission):
    """:class:`Admission` of one receiver process, publishing its counts on the board and counting
    the other processes' live associations against ``max_associations``."""

    def __init__(self, limits: EdgeLimits, board: LoadBoard, index: int) -> None:
        super().__init__(limits)
        self.board = board
        self.index = index

    def _publish(self) -> None:
        counts = self.snapshot()
        self.board.publish(self.index, counts["negotiating"], counts["associations"], counts["refused"])

    def admit(self, host: str, sock: socket.socket, now: float, server: object = None) -> Connection | str:
        admitted = super().admit(host, sock, now, server)
        self._publish()
        return admitted

    def count_refusal(self, kind: str) -> None:
        super().count_refusal(kind)
        self._publish()

    def settle(self, connection: Connection) -> None:
        super().settle(connection)
        self._publish()

    def reserve(self, connection: Connection) -> bool:
        if not connection.associated:
            elsewhere = sum(a for i, (_, a, _) in enumerate(self.board.all()) if i != self.index)
            if elsewhere + self.snapshot()["associations"] >= self.limits.max_associations:
                return False
        reserved = super().reserve(connection)
        self._publish()
        return reserved

    def release(self, connection: Connection) -> None:
        super().release(connection)
        self._publish()

    def defer_accept(self) -> None:
        """Run before each accept: a process holding more connections than its least busy sibling
        waits a little, so that the sibling takes the connection (it still accepts if nobody did)."""
        loads = [n + a for n, a, _ in self.board.all()]
        others = [load for i, load in enumerate(loads) if i != self.index]
        if others and loads[self.index] > min(others):
            time.sleep(min(_ACCEPT_DEFER_S * (loads[self.index] - min(others)), _ACCEPT_DEFER_MAX_S))


# --- the node's side ------------------------------------------------------------------------------


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.process_id = ""
        self.started_at = 0.0
        self.restart_at = 0.0
        self.backoff = _RESTART_MIN_S
        self.ready = threading.Event()
        self.reader: threading.Thread | None = None
        self.write_lock = threading.Lock()


class ReceiverPool:
    """The node's receiver processes: makes the listening sockets, starts one process per
    ``[node] receivers``, restarts any that dies, stops them with the node.

    Processes are started from one supervisor thread that lives as long as the pool: Linux sends
    the parent-death signal when the *thread* that started a child ends.
    """

    def __init__(self, config: Config, ledger: Ledger, audit: Audit, node_id: str,
                 on_sweep: Callable[[float], None]) -> None:
        self.config = config
        self.count = config.node.receiver_processes
        self.ledger = ledger
        self.audit = audit
        self.node_id = node_id
        self.on_sweep = on_sweep
        self._sockets: list[socket.socket] = []  # made by start()
        self.board_path = config.node.data_dir.resolve() / "receivers.board"
        self.board: LoadBoard | None = None
        self._children = [_Child(i) for i in range(self.count)]
        self._peers: list[Peer] = list(config.peers)
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._failed: BaseException | None = None

    @property
    def ports(self) -> list[int]:
        return [int(s.getsockname()[1]) for s in self._sockets]

    def connections(self) -> dict[str, int]:
        """Summed over the receiver processes (see :meth:`Receiver.connections`)."""
        slots = self.board.all() if self.board is not None else []
        return {"negotiating": sum(s[0] for s in slots), "associations": sum(s[1] for s in slots),
                "refused": sum(s[2] for s in slots)}

    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children if c.process is not None and c.process.poll() is None]

    def start(self) -> None:
        node = self.config.node
        reuse_port = self.config.cluster is not None
        self._sockets = [make_listener(node.host, node.port, node.listen_backlog, reuse_port)]
        if node.tls is not None:
            self._sockets.append(make_listener(node.host, node.tls.port, node.listen_backlog, reuse_port))
        self.board = LoadBoard(self.board_path, self.count, create=True)
        self._stop.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="receiver-pool", daemon=True)
        self._supervisor.start()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for child in self._children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())) or self._failed is not None:
                self.stop()
                raise RuntimeError(f"receiver process {child.index} did not start"
                                   + (f": {self._failed}" if self._failed else ""))

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=_STOP_GRACE_S + 30)
            self._supervisor = None
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self.board is not None:
            self.board.close()
            self.board = None

    def update_peers(self, peers: list[Peer]) -> None:
        self._peers = list(peers)
        for child in self._children:
            self._send(child, {"peers": [p.model_dump(mode="json") for p in peers]})

    # --- supervisor thread ------------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            for child in self._children:
                self._spawn(child)
        except BaseException as exc:  # tell start(); stop the ones that did start
            self._failed = exc
            for child in self._children:
                child.ready.set()
            self._stop_children()
            return
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for child in self._children:
                process = child.process
                if process is not None and process.poll() is not None:
                    self._died(child, process.returncode, now)
                elif process is None and now >= child.restart_at:
                    try:
                        self._spawn(child)
                    except Exception as exc:
                        LOG.error("receiver process %d could not start: %s", child.index, exc)
                        self._schedule_restart(child, now)
        self._stop_children()

    def _spawn(self, child: _Child) -> None:
        assert self.board is not None
        fds = [s.fileno() for s in self._sockets]
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.receivers"], pass_fds=fds,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            process_group=0,  # Ctrl-C signals the terminal's group: the node stops its receivers itself
        )
        child.process = process
        child.process_id = f"{socket.gethostname()[:60]}:{process.pid}:{uuid.uuid4().hex[:8]}"
        child.started_at = time.monotonic()
        child.ready.clear()
        self.board.clear(child.index)
        spec = {
            "config": self.config.model_copy(update={"peers": self._peers}).model_dump(mode="json"),
            "index": child.index, "count": self.count, "parent": os.getpid(), "fds": fds,
            "process_id": child.process_id, "node_id": self.node_id, "board": str(self.board_path),
        }
        self._send(child, spec)
        assert process.stdout is not None
        child.reader = threading.Thread(target=self._read, args=(child, process.stdout),
                                        name=f"receiver-{child.index}-channel", daemon=True)
        child.reader.start()

    def _send(self, child: _Child, message: dict[str, Any]) -> None:
        process = child.process
        if process is None or process.stdin is None:
            return
        line = (json.dumps(message, default=str) + "\n").encode()
        with child.write_lock, contextlib.suppress(OSError, ValueError):  # it died: the supervisor sees it
            process.stdin.write(line)
            process.stdin.flush()

    def _read(self, child: _Child, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "sweep" in message:
                self.on_sweep(float(message["sweep"]))
            for record in message.get("audit", ()):
                self.audit.observe(record)
            if "ready" in message:
                child.ready.set()
                self.audit.log("receiver.started", receiver=child.index, pid=message.get("pid"),
                               process=child.process_id)

    def _died(self, child: _Child, returncode: int, now: float) -> None:
        pid = child.process.pid if child.process is not None else None
        if child.process is not None and child.process.stdin is not None:
            with contextlib.suppress(OSError):
                child.process.stdin.close()
        child.process = None
        if child.reader is not None:
            child.reader.join(timeout=5)  # its last audit records and wake-ups first
        if self.board is not None:
            self.board.clear(child.index)
        LOG.error("receiver process %d (pid %s) died with status %s; restarting it", child.index, pid, returncode)
        self.audit.log("receiver.died", receiver=child.index, pid=pid, status=returncode,
                       process=child.process_id)
        try:
            # Its open associations are over now: they must not hold releases back until its
            # heartbeat goes stale.
            self.ledger.process_stopped(child.process_id)
        except Exception as exc:
            LOG.warning("could not record the death of receiver %d: %s", child.index, exc)
        self.on_sweep(self.config.assembly.release_grace_s)
        if now - child.started_at >= _STABLE_S:
            child.backoff = _RESTART_MIN_S
        self._schedule_restart(child, now)

    def _schedule_restart(self, child: _Child, now: float) -> None:
        child.restart_at = now + child.backoff
        child.backoff = min(child.backoff * 2, _RESTART_MAX_S)

    def _stop_children(self) -> None:
        """SIGTERM: stop accepting, let associations in progress finish for a few seconds."""
        running = [c for c in self._children if c.process is not None]
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S + 15
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOG.warning("receiver process %d did not stop; killing it", child.index)
                child.process.kill()
                child.process.wait()
            if child.process.stdin is not None:
                with contextlib.suppress(OSError):
                    child.process.stdin.close()
            if child.reader is not None:
                child.reader.join(timeout=5)
            child.process = None


# --- the receiver process -------------------------------------------------------------------------


class _Channel:
    """The receiver's side of the channel: JSON lines on the original stdout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._records_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="channel", daemon=True)
        self._thread.start()

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock, contextlib.suppress(OSError, ValueError):  # the node is gone: we die soon
            self._stream.write(line)
            self._stream.flush()

    def record(self, record: dict[str, Any]) -> None:
        with self._records_lock:
            self._records.append(record)
            if len(self._records) >= _AUDIT_BATCH:
                self._wake.set()

    def _flush(self) -> None:
        with self._records_lock:
            batch, self._records = self._records, []
        if batch:
            self.send({"audit": batch})

    def _flush_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(_AUDIT_EVERY_S)
            self._wake.clear()
            self._flush()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._flush()


def child_main() -> int:
    """``python -m dicomnode.receivers``: one receiver process (started by :class:`ReceiverPool`)."""
    from dicomnode.cluster import Heartbeat, heartbeat_settings
    from dicomnode.jobs import StopRequest, die_with_parent
    from dicomnode.receiver import Receiver, edge_limits
    from dicomnode.spool import Spool

    # The channel is the original stdout; anything else printed goes to stderr.
    channel = _Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    spec = json.loads(sys.stdin.buffer.readline())
    die_with_parent(int(spec["parent"]))
    index = int(spec["index"])
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s receiver[{index}] %(levelname)s %(name)s: %(message)s")
    config = Config.model_validate(spec["config"])
    stop = StopRequest(signal.SIGTERM)  # the node's stop; the process ends by os._exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us

    node = config.node
    data_dir = node.data_dir.resolve()
    cluster = config.cluster
    spool_root = cluster.spool_root if cluster is not None else data_dir / "spool"
    spool = Spool(spool_root, node.min_free_mb * 2**20, node_id=spec["node_id"] if cluster is not None else "")
    heartbeat_s, dead_after_s = heartbeat_settings(config)
    ledger = Ledger(config.ledger_url, dead_after_s=dead_after_s, migrate=False)  # the node migrated it
    audit = Audit(data_dir / AUDIT_FILE, enabled=config.audit.enabled, context={"receiver": index})
    audit.subscribe(channel.record)
    board = LoadBoard(Path(spec["board"]), int(spec["count"]))
    admission = SharedAdmission(edge_limits(node), board, index)
    release_grace_s = config.assembly.release_grace_s

    def on_stored(_item: Any, outcome: Any) -> None:
        if outcome.expected_reached:
            channel.send({"sweep": 0.0})

    receiver = Receiver(node, config.peers, spool, ledger, audit, on_stored=on_stored,
                        on_released=lambda _association: channel.send({"sweep": release_grace_s}),
                        admission=admission, before_accept=admission.defer_accept)
    ledger.register_process("receiver", spec["node_id"], spec["process_id"])
    heartbeat = Heartbeat(ledger, heartbeat_s, config.jobs.lease_s,
                          lambda: f"receiver {index}: {admission.snapshot()['associations']} association(s)")
    heartbeat.start()
    spool.remove_debris()  # temporary files of a receiver that died (never acknowledged)
    sockets = [socket.socket(fileno=fd) for fd in spec["fds"]]
    receiver.start(sockets[0], sockets[1] if len(sockets) > 1 else None)
    channel.send({"ready": True, "pid": os.getpid()})

    def control() -> None:  # the node's commands; end-of-file: the node is gone or stops us
        for line in sys.stdin.buffer:
            with contextlib.suppress(Exception):
                message = json.loads(line)
                if "peers" in message:
                    receiver.update_peers([Peer.model_validate(p) for p in message["peers"]])
        stop.request()

    threading.Thread(target=control, name="control", daemon=True).start()
    stop.wait()
    receiver.stop()  # no new connections
    deadline = time.monotonic() + _STOP_GRACE_S
    while receiver.active_associations() and time.monotonic() < deadline:
        time.sleep(0.05)
    heartbeat.stop()
    try:
        ledger.process_stopped()
    except Exception as exc:
        LOG.warning("could not record the stop in the ledger: %s", exc)
    board.clear(index)
    channel.close()
    ledger.close()
    audit.close()
    # Not sys.exit: the control thread is blocked reading stdin, which interpreter shutdown
    # would wait for (and abort on).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(child_main())
