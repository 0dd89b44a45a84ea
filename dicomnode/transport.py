"""A hardened acceptor transport for pynetdicom: the DICOM upper layer (PS3.8) as any TCP peer sees it.

pynetdicom 3.0.4's :class:`~pynetdicom.transport.ThreadedAssociationServer` trusts its peers:

* accepted sockets carry no timeout, so a peer that sends part of a PDU and stops holds a reader
  thread blocked in ``recv()`` forever, and ``Association.kill()`` waits on that thread;
* the TLS handshake runs in the single accept thread without a timeout: one silent TCP connection
  to the TLS port stops every TLS client;
* a PDU header may announce up to 4 GiB and the reader buffers whatever follows;
* the association limit counts every live ``Association`` thread, including connections that have
  not sent an A-ASSOCIATE-RQ yet, peers that already hung up (they wait out the ACSE timeout) and
  rejected associations that have not closed yet, so a few idle sockets lock every scanner out.

This module fixes those at the edge, without patching pynetdicom, in a shape that could go
upstream. :class:`EdgeServer` is a drop-in ``server_class`` for :meth:`AE.make_server`:

* **Negotiation has its own bounded pool.** A connection is *negotiating* from TCP accept until its
  A-ASSOCIATE-RQ has been read. At most ``negotiation_slots`` connections negotiate at once, at most
  ``negotiation_per_host`` from one peer address; others are reset at the door by the accept thread
  (no thread, no buffer). Each negotiating connection has ``handshake_timeout`` seconds for TLS and
  the whole A-ASSOCIATE-RQ, enforced by the accept loop, which shuts the socket down at the deadline.
* **Association slots count live associations only.** A slot is taken when the A-ASSOCIATE-RQ has
  been read and the service user let it through, and given back when the association thread ends
  (released, aborted, rejected or never negotiated). Over ``max_associations``: A-ASSOCIATE-RJ
  transient, local limit exceeded (PS3.8 9.3.4).
* **The TLS handshake runs in the connection's own thread**, bounded by the same deadline.
* **Every accepted socket has timeouts**: ``network_timeout`` on each read and write, so a stalled
  peer ends its own association and nothing else.
* **A bounded PDU reader** (:class:`EdgeSocket`): a P-DATA-TF PDU longer than the maximum length we
  announced (PS3.8 D.1), any other PDU longer than :data:`CONTROL_PDU_LIMIT`, or a data set
  streaming past ``max_dataset_bytes`` ends the association at once with an A-ABORT, before any of
  the body is read.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import set_timer_resolution

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity
    from pynetdicom.dimse_primitives import DimsePrimitiveType
    from pynetdicom.presentation import PresentationContext

LOG = logging.getLogger(__name__)

# Largest PDU other than P-DATA-TF we read. An A-ASSOCIATE-RQ holds at most 128 presentation
# contexts (PS3.8 9.3.2.2) and user information such as a User Identity token (2 x 64 KiB); real
# ones are a few KiB. Release and abort PDUs are 4 bytes.
CONTROL_PDU_LIMIT = 2**20

P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L")
_ELEMENT = struct.Struct("<HHI")  # group, element, length: Implicit VR Little Endian
_US = struct.Struct("<H")
_UL = struct.Struct("<I")

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected transient, service provider (presentation related),
# local limit exceeded.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
# A-ABORT (PS3.8 9.3.8): source service provider, reason invalid PDU parameter value.
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_INVALID_PARAMETER = 0x06

_WAIT_SLICE = 0.05  # how often a negotiating association checks that its peer is still there
_REACTOR_WAIT = 0.05  # longest wait of an idle reactor: its ARTIM and idle timers still run
_COLLECT_EVERY = 60.0  # seconds between the accept loop's garbage collections (pynetdicom: 60 loops)


@dataclass(frozen=True)
class EdgeLimits:
    """What one listener allows. Times in seconds, sizes in bytes."""

    max_associations: int
    handshake_timeout: float
    network_timeout: float | None
    negotiation_slots: int
    negotiation_per_host: int
    max_pdu: int  # the Maximum Length we announce for P-DATA-TF (PS3.8 D.1); 0 means unlimited
    max_dataset_bytes: int

    def __post_init__(self) -> None:
        for name in ("max_associations", "negotiation_slots", "negotiation_per_host", "max_dataset_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"EdgeLimits.{name} must be at least 1, not {getattr(self, name)}")
        if self.handshake_timeout <= 0:
            raise ValueError(f"EdgeLimits.handshake_timeout must be positive, not {self.handshake_timeout}")

    @property
    def p_data_limit(self) -> int:
        """Longest P-DATA-TF PDU body we read. With an unlimited maximum length, a PDU can still
        never usefully be longer than the largest data set plus its command."""
        return self.max_pdu or self.max_dataset_bytes + CONTROL_PDU_LIMIT


class Connection:
    """One accepted TCP connection, as admission control sees it."""

    __slots__ = ("host", "key", "socket", "deadline", "negotiating", "associated", "server")

    def __init__(self, host: str, sock: socket.socket, deadline: float, server: object = None) -> None:
        self.host = host
        self.server = server  # the listener that accepted it
        self.key = sock  # the accepted socket object, as the accept loop knows it
        self.socket = sock  # the socket in use: the TLS socket once it is wrapped
        self.deadline = deadline
        self.negotiating = True
        self.associated = False


class Admission:
    """Counts connections that are negotiating (bounded pool, per-host cap) and live associations.

    Every method is cheap and thread-safe; release is idempotent, so each path that can end a
    connection may call it.
    """

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._negotiating: dict[socket.socket, Connection] = {}
        self._per_host: Counter[str] = Counter()
        self._associations = 0
        self.refused: Counter[str] = Counter()  # kind -> connections refused before negotiating

    def admit(self, host: str, sock: socket.socket, now: float, server: object = None) -> Connection | str:
        """A new connection: its :class:`Connection`, or why it is refused."""
        with self._lock:
            if len(self._negotiating) >= self.limits.negotiation_slots:
                kind = "negotiation pool full"
                reason = f"{self.limits.negotiation_slots} connections are already negotiating"
            elif self._per_host[host] >= self.limits.negotiation_per_host:
                kind = "per-host cap"
                reason = f"{self.limits.negotiation_per_host} connections from {host} are already negotiating"
            else:
                connection = Connection(host, sock, now + self.limits.handshake_timeout, server)
                self._negotiating[sock] = connection
                self._per_host[host] += 1
                return connection
            self.refused[kind] += 1
            return reason

    def count_refusal(self, kind: str) -> None:
        with self._lock:
            self.refused[kind] += 1

    def connection(self, sock: socket.socket) -> Connection | None:
        """The negotiating connection accepted as ``sock`` (None once it is settled)."""
        with self._lock:
            return self._negotiating.get(sock)

    def settle(self, connection: Connection) -> None:
        """Negotiation is over: the A-ASSOCIATE-RQ is in, or the connection is gone."""
        with self._lock:
            self._settle(connection)

    def _settle(self, connection: Connection) -> None:
        if connection.negotiating:
            connection.negotiating = False
            self._negotiating.pop(connection.key, None)
            self._per_host[connection.host] -= 1
            if not self._per_host[connection.host]:
                del self._per_host[connection.host]

    def reserve(self, connection: Connection) -> bool:
        """Take an association slot; False when all are in use by live associations."""
        with self._lock:
            if connection.associated:
                return True
            if self._associations >= self.limits.max_associations:
                return False
            connection.associated = True
            self._associations += 1
            return True

    def release(self, connection: Connection) -> None:
        """The connection is over: give back whatever it holds."""
        with self._lock:
            self._settle(connection)
            if connection.associated:
                connection.associated = False
                self._associations -= 1

    def expired(self, now: float) -> list[Connection]:
        with self._lock:
            return [c for c in self._negotiating.values() if c.deadline <= now]

    def negotiating(self) -> list[Connection]:
        with self._lock:
            return list(self._negotiating.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"negotiating": len(self._negotiating), "associations": self._associations,
                    "refused": sum(self.refused.values())}


def hang_up(sock: socket.socket | None) -> None:
    """Shut a socket down in both directions without closing it: a thread blocked on it wakes up
    (its read returns end-of-file) and the owner still closes it once."""
    if sock is None:
        return
    # socket.socket's own shutdown, also for a TLS socket: ssl.SSLSocket.shutdown would drop the
    # TLS object under a handshake running in another thread. Already closed: nothing to do.
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): a connection refused at the door gets an immediate,
    unambiguous answer, and no TIME_WAIT is left behind per refused connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


RefusedCallback = Callable[[str, str], None]  # (host, reason)


class EdgeServer(ThreadedAssociationServer):
    """A ``ThreadedAssociationServer`` whose connections cannot starve each other. See the module
    docstring; use as ``ae.make_server(address, server_class=EdgeServer, admission=...)``. Listeners
    that share one :class:`Admission` share its association slots and negotiation pool."""

    request_queue_size = socket.SOMAXCONN  # TCPServer's 5 drops SYNs of real callers under a flood
    daemon_threads = True  # a stop must not wait for a handshake that is being cut short anyway

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[evt.EventHandlerType] | None = None,
        *,
        admission: Admission,
        on_refused: RefusedCallback | None = None,
        reuse_port: bool = False,
        listening_socket: socket.socket | None = None,
        before_accept: Callable[[], None] | None = None,
    ) -> None:
        self.reuse_port = reuse_port  # several processes share the port; the kernel spreads connections
        # Receiver processes (dicomnode.receivers) adopt the socket their node listens on, instead
        # of binding one: see server_bind/server_activate.
        self._inherited = listening_socket
        self._before_accept = before_accept
        self.admission = admission  # may be shared by several listeners (plain and TLS)
        self.limits = admission.limits
        self._on_refused = on_refused
        self._collected_at = time.monotonic()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=EdgeRequestHandler)

    # --- the accept thread: cheap decisions only ---------------------------------------------------

    def server_bind(self) -> None:
        """An inherited listening socket replaces the one socketserver just created (already bound
        and listening, kept open by the node for its whole life, so that a receiver process that
        dies never resets the connections queued on it). Otherwise: pynetdicom's bind
        (SO_REUSEADDR, listening timeout = network timeout), then a
        non-blocking listening socket: a connection reset between ``select`` and ``accept`` must
        not stall the accept loop for the network timeout. With ``reuse_port``, SO_REUSEPORT is set
        before the bind (pynetdicom's bind ignores socketserver's ``allow_reuse_port``)."""
        if self._inherited is not None:
            cast(socket.socket, self.socket).close()
            self.socket = self._inherited
            self.socket.setblocking(False)  # a sibling process may win the accept: EAGAIN, not a hang
            self.server_address = self.socket.getsockname()
            return
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()
        cast(socket.socket, self.socket).setblocking(False)

    def server_activate(self) -> None:
        if self._inherited is None:  # an inherited socket is listening already
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only. pynetdicom wraps TLS here, in the accept thread, without a timeout; the
        handshake moves to the connection's own thread (:meth:`open_transport`). ``before_accept``
        may delay the accept (a busier receiver process lets an idle sibling take the connection);
        when a sibling did, accept raises BlockingIOError, which socketserver ignores."""
        if self._before_accept is not None:
            self._before_accept()
        sock, address = cast(socket.socket, self.socket).accept()
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        admitted = self.admission.admit(host, request, time.monotonic(), self)
        if isinstance(admitted, str):
            _reset(request)
            if self._on_refused is not None:
                self._on_refused(host, admitted)
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            connection = self.admission.connection(request)
            if connection is not None:
                self.admission.release(connection)
            raise

    def service_actions(self) -> None:
        """Run by the accept loop at least every poll interval (0.5 s): hang up connections whose
        handshake deadline has passed, wherever their thread is blocked. Replaces pynetdicom's
        ``gc.collect()`` every 60 loops, which under a connection flood ran many times a second."""
        now = time.monotonic()
        for connection in self.admission.expired(now):
            if connection.server is self:
                hang_up(connection.socket)
        if now - self._collected_at >= _COLLECT_EVERY:
            self._collected_at = now
            gc.collect()

    def shutdown_request(self, request: Any) -> None:
        # Also called for connections refused by verify_request, already reset and closed.
        if request.fileno() != -1:
            super().shutdown_request(request)

    def server_close(self) -> None:
        # First cut short the handshakes of this listener, whose threads the close then joins.
        for connection in self.admission.negotiating():
            if connection.server is self:
                hang_up(connection.socket)
        super().server_close()

    # --- the connection's thread -----------------------------------------------------------------

    def open_transport(self, connection: Connection) -> socket.socket:
        """Timeouts, TCP_NODELAY and (on a TLS listener) the TLS handshake, all before any DICOM
        is read. Raises OSError (ssl.SSLError, TimeoutError) when the handshake fails."""
        sock = connection.socket
        # A DIMSE message written as several PDUs must not wait for the peer's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._read_timeout())
        if self.ssl_context is None:
            return sock
        tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        connection.socket = tls  # the accept loop hangs it up at the deadline, mid-handshake too
        tls.do_handshake()
        return tls

    def _read_timeout(self) -> float:
        network = self.limits.network_timeout
        return self.limits.handshake_timeout if network is None else min(network, self.limits.handshake_timeout)

    def refused(self, host: str, kind: str, reason: str) -> None:
        self.admission.count_refusal(kind)
        if self._on_refused is not None:
            self._on_refused(host, reason)


class EdgeRequestHandler(RequestHandler):
    """Runs in the connection's own thread: TLS handshake, then an :class:`EdgeAssociation` on an
    :class:`EdgeSocket`."""

    server: EdgeServer

    def handle(self) -> None:
        server = self.server
        connection = server.admission.connection(self.request)
        if connection is None:  # hung up at its deadline before this thread ran
            hang_up(self.request)
            self.request.close()
            return
        self.connection = connection
        try:
            try:
                self.request = server.open_transport(self.connection)
            except (OSError, ValueError) as exc:
                what = "TLS handshake" if server.ssl_context is not None else "connection set-up"
                server.refused(self.connection.host, "handshake failed", f"{what} failed: {exc}")
                server.admission.release(self.connection)
                hang_up(self.connection.socket)
                self.connection.socket.close()
                return
            assoc = self._create_association()
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except BaseException:
            server.admission.release(self.connection)
            raise

    def _create_association(self) -> Association:
        """pynetdicom's ``RequestHandler._create_association``, with our association and socket."""
        server = self.server
        assoc = EdgeAssociation(self.ae, server.admission, self.connection)
        assoc._server = server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        assoc.set_socket(EdgeSocket(assoc, self.request, server.limits))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)  # cheap for SharedContexts
        assoc.requestor.address_info = self.remote

        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *cast(tuple[Callable[..., Any], list[Any] | None], handlers))
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Callable[..., Any], list[Any] | None]], handlers):
                    assoc.bind(event, handler, args)
        return assoc


def _ui(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def c_store_success_command(sop_class: str, message_id: int, sop_instance: str) -> bytes:
    """The command set of a C-STORE-RSP with status Success (PS3.7 9.3.1.2, Implicit VR Little
    Endian): the same bytes as pynetdicom's encoder (pinned by a test), without building and
    encoding a pydicom Dataset twice for it."""
    elements = ((0x0002, _ui(sop_class)),  # Affected SOP Class UID
                (0x0100, _US.pack(0x8001)),  # Command Field: C-STORE-RSP
                (0x0120, _US.pack(message_id)),  # Message ID Being Responded To
                (0x0800, _US.pack(0x0101)),  # Command Data Set Type: no data set
                (0x0900, _US.pack(0x0000)),  # Status: Success
                (0x1000, _ui(sop_instance)))  # Affected SOP Instance UID
    body = b"".join(_ELEMENT.pack(0x0000, tag, len(value)) + value for tag, value in elements)
    return _ELEMENT.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


# C-STORE-RQ command elements (PS3.7 9.3.1.1) that decode_c_store_request accepts; tag -> required.
_C_STORE_RQ_ELEMENTS = {0x0000: True, 0x0002: True, 0x0100: True, 0x0110: True, 0x0700: True,
                        0x0800: True, 0x1000: True}
# A UID as PS3.5 9.1 writes it (no leading zeros, no empty component), padded with one NUL to even.
_UID_VALUE = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\x00?")


def decode_c_store_request(command: bytes) -> C_STORE | None:
    """The C-STORE primitive of a plain C-STORE-RQ command set with a data set (Implicit VR Little
    Endian), decoded by hand: pynetdicom decodes every command set into a pydicom Dataset, then
    sets the primitive's fields from it, ~10x the CPU. ``None`` for anything else or anything odd
    (another command, Move Originator fields, other elements, a wrong group length, UIDs that are
    not plain): the caller then lets pynetdicom decode it, with its own error handling."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if offset + _ELEMENT.size > end:
            return None
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += _ELEMENT.size
        if group != 0x0000 or element not in _C_STORE_RQ_ELEMENTS or element in values or offset + length > end:
            return None
        values[element] = command[offset:offset + length]
        offset += length
    if len(values) != len(_C_STORE_RQ_ELEMENTS):
        return None
    if len(values[0x0000]) != 4 or _UL.unpack(values[0x0000])[0] != end - 12:
        return None
    numbers = {}
    for element in (0x0100, 0x0110, 0x0700, 0x0800):
        if len(values[element]) != 2:
            return None
        numbers[element] = _US.unpack(values[element])[0]
    if numbers[0x0100] != 0x0001 or numbers[0x0800] == 0x0101:  # not C-STORE-RQ, or no data set
        return None
    uids = []
    for element in (0x0002, 0x1000):
        value = values[element]
        if not 0 < len(value) <= 64 or not _UID_VALUE.fullmatch(value):
            return None
        uids.append(value.rstrip(b"\x00").decode("ascii"))
    request = C_STORE()
    try:  # pynetdicom's setters validate as they would after its own decoding
        request.MessageID = numbers[0x0110]
        request.Priority = numbers[0x0700]
        request.AffectedSOPClassUID = uids[0]
        request.AffectedSOPInstanceUID = uids[1]
    except (TypeError, ValueError):
        return None
    return request


class _HandDecodedStoreRequest(C_STORE_RQ):
    """pynetdicom's C-STORE-RQ message whose command set was decoded by
    :func:`decode_c_store_request`; pynetdicom still gathers its data set fragments."""

    def __init__(self, context_id: int, command: bytes, request: C_STORE) -> None:
        # Not pynetdicom's __init__: it names the command set's elements in a pydicom Dataset,
        # which is what this class avoids (and it looks the class up by name).
        self.context_id = context_id
        self.encoded_command_set = BytesIO()
        self.encoded_command_set.write(command)
        self.data_set = BytesIO()
        self.command_set = Dataset()
        self._data_set_path = None
        self._data_set_file = None
        self.request = request

    def message_to_primitive(self) -> DimsePrimitiveType:
        self.request.DataSet = self.data_set
        self.request._context_id = self.context_id
        return self.request


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put: the consumer waits on an event or a socket
    instead of polling the queue."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EdgeDUL(DULServiceProvider):
    """pynetdicom 3.0.4's DUL provider with an event-driven reactor: an idle DUL thread waits in
    ``select`` on its socket and on a wake-up socket that every send (``to_provider_queue``) and
    every kill writes to, instead of sleeping 1 ms per loop; at most :data:`_REACTOR_WAIT`, so the
    ARTIM timer is still checked."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _WakingQueue(self.wake)
        self.on_exit: Callable[[], None] | None = None

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a wake-up is pending already, or the DUL has ended
            self._wake_w.send(b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
            if threading.current_thread() is not self and self.is_alive():
                self.join()
            return True
        return False

    def _wait(self) -> None:
        raw = self.socket.socket if self.socket is not None else None
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes wait in the TLS object, invisible to select
        watched: list[Any] = [self._wake_r]
        if raw is not None and raw.fileno() >= 0:
            watched.append(raw)
        try:
            ready, _, _ = select.select(watched, [], [], _REACTOR_WAIT)
        except (OSError, ValueError):  # the socket was closed meanwhile: the loop notices
            return
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass

    def run_reactor(self) -> None:
        try:
            self._run_events()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            if self.on_exit is not None:
                self.on_exit()

    def _run_events(self) -> None:
        """``DULServiceProvider.run_reactor`` with its 1 ms sleep replaced by :meth:`_wait`."""
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either send one primitive or read one PDU per loop, as pynetdicom does.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                LOG.exception("DUL reactor failed; aborting the association")
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(Exception):
                    cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


class EdgeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, but a C-STORE-RSP Success (one per received instance) is
    encoded by hand: pynetdicom converts the primitive to a pydicom Dataset and encodes it, which
    cost more CPU than storing the instance's ledger row. Any other message, and any response when
    someone listens to EVT_DIMSE_SENT, goes through pynetdicom."""

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status == 0x0000 and primitive.ErrorComment is None
                and primitive.OffendingElement is None and primitive.AffectedSOPClassUID
                and primitive.AffectedSOPInstanceUID
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            command = c_store_success_command(str(primitive.AffectedSOPClassUID),
                                              primitive.MessageIDBeingRespondedTo,
                                              str(primitive.AffectedSOPInstanceUID))
            pdata = P_DATA()
            # Message control header 0x03: a command, last fragment (PS3.8 E.2); a command set
            # of ~130 bytes always fits the smallest maximum PDU length.
            # (a list, not the tuple the annotation says: pynetdicom's setter checks for a list)
            pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]  # type: ignore[list-item]
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom's, but a plain C-STORE-RQ command set that arrives whole in one fragment is
        decoded by hand (:func:`decode_c_store_request`), unless someone listens to EVT_DIMSE_RECV
        (which hands on the decoded pydicom command set). Its data set fragments, and any other
        message, go through pynetdicom."""
        pdvs = primitive.presentation_data_value_list
        if self.message is None and pdvs and pdvs[0][1][0] & 0x03 == 0x03 \
                and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            context_id, data = pdvs[0]
            command = bytes(data[1:])
            request = decode_c_store_request(command)
            if request is not None:
                self.message = _HandDecodedStoreRequest(context_id, command, request)
                if len(pdvs) == 1:
                    return  # the data set follows in the next P-DATA
                rest = P_DATA()
                # (a list, not the tuple the annotation says: pynetdicom's setter checks for a list)
                rest.presentation_data_value_list = pdvs[1:]
                primitive = rest
        super().receive_primitive(primitive)


class EdgeAssociation(Association):
    """An acceptor association whose negotiation is bounded and whose slot is accounted for.

    Replaces the acceptor half of ``Association.run_reactor``: wait for the A-ASSOCIATE-RQ only
    until the handshake deadline or until the peer is gone (pynetdicom waits the whole ACSE timeout
    even after the peer closed), take an association slot only then, and give back everything the
    connection held when the thread ends, whichever way it ends.
    """

    def __init__(self, ae: ApplicationEntity, admission: Admission, connection: Connection) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        # Event-driven reactors (pynetdicom polls with a 1 ms sleep in both threads: thousands of
        # wake-ups a second per idle association, and up to 1 ms of latency at each hand-off).
        self._wake = threading.Event()
        self.dul = EdgeDUL(self)
        self.dul.to_user_queue = _WakingQueue(self._wake.set)
        self.dul.on_exit = self._wake.set
        self.dimse = EdgeDIMSE(self)
        self.dimse.msg_queue = _WakingQueue(self._wake.set)
        # The setters push these into the new DUL's timers.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self._admission = admission
        self._connection = connection

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def run_reactor(self) -> None:
        try:
            self._run_acceptor()
        finally:
            self._admission.release(self._connection)

    def _run_acceptor(self) -> None:
        sock = cast(EdgeSocket, self.dul.socket)
        self.dul.start()
        self._started_dul = True
        self._dul_ready.wait()

        primitive = self._await_request()
        if primitive is None:  # deadline passed, peer gone, or it sent something else
            hang_up(sock.socket)
            self.kill()
            self._close_transport()
            return
        self._admission.settle(self._connection)
        sock.negotiated()

        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        # The service user may have rejected or aborted in EVT_REQUESTED (peer policy).
        if not self.is_aborted and not self.is_rejected:
            if self._admission.reserve(self._connection):
                self.acse.negotiate_association()
            else:
                LOG.info("rejecting association from %s: association limit (%d) reached",
                         self._connection.host, self._admission.limits.max_associations)
                self.acse.send_reject(*REJECT_LOCAL_LIMIT)
                evt.trigger(self, evt.EVT_REJECTED, {})
                self.kill()

        if self.is_established:
            with set_timer_resolution(self._timer_resolution):
                self._run_reactor()
        self._close_transport()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor`` (acceptor loop), waiting on an event set
        by whatever gives it work (a decoded DIMSE message, a release or abort primitive, the DUL
        ending, kill) instead of sleeping 1 ms per loop; at most :data:`_REACTOR_WAIT` so that the
        idle timer is still checked."""
        self._is_paused = False
        busy = False
        while not self._kill:
            if not busy:
                self._wake.wait(_REACTOR_WAIT)
            self._wake.clear()
            busy = False
            # send_*() of the service user may pause the reactor (pynetdicom's checkpoint).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                busy = True  # look again at once: more may have arrived meanwhile
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOG.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def _await_request(self) -> A_ASSOCIATE | None:
        deadline = self._connection.deadline
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            primitive = self.dul.receive_pdu(wait=True, timeout=min(remaining, _WAIT_SLICE))
            if primitive is not None:
                if isinstance(primitive, A_ASSOCIATE) and primitive.result is None:
                    return primitive
                return None
            if not self.dul.is_alive():  # the DUL closed the transport (peer gone, bad PDU)
                return None

    def _close_transport(self) -> None:
        sock = cast(EdgeSocket, self.dul.socket)
        if self._server is not None and sock.socket is not None:
            self._server.shutdown_request(sock.socket)


class EdgeSocket(AssociationSocket):
    """An ``AssociationSocket`` that refuses oversized PDUs from their header and reads with
    ``recv_into`` into one buffer (pynetdicom reads 4 KiB at a time into a growing bytearray).

    pynetdicom's DUL reads each PDU as ``recv(6)`` (the header) then ``recv(length)`` (the body),
    from its own thread; this class follows that rhythm to know which read is which.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, limits: EdgeLimits) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._limits = limits
        self._body_of: int | None = None  # type of the PDU whose body is read next
        self._dataset_bytes = 0  # of the data set being received, over its P-DATA fragments
        self.refusal: str | None = None

    def negotiated(self) -> None:
        """The A-ASSOCIATE-RQ is in: from now on each read and write may take ``network_timeout``."""
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.settimeout(self._limits.network_timeout)

    def recv(self, nr_bytes: int) -> bytearray:
        if self.socket is None or self.refusal is not None:
            return bytearray()
        body_of, self._body_of = self._body_of, None
        data = self._read(nr_bytes)
        if body_of is None:
            if len(data) == _PDU_HEADER.size:
                pdu_type, _, length = _PDU_HEADER.unpack(data)
                if 0x01 <= pdu_type <= 0x07:  # others: pynetdicom reports Evt19, reads no body
                    limit = self._limits.p_data_limit if pdu_type == P_DATA_TF else CONTROL_PDU_LIMIT
                    if length > limit:
                        self._refuse(f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than {limit}")
                        return bytearray()  # pynetdicom: short header -> transport closed (Evt17)
                    self._body_of = pdu_type
        elif body_of == P_DATA_TF:
            self._count_dataset(data)
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``; fewer when the peer closes, resets or times out (pynetdicom treats a
        short read as a closed transport, without logging a traceback for each idle socket)."""
        buffer = bytearray(nr_bytes)
        received = 0
        sock = cast(socket.socket, self.socket)
        with memoryview(buffer) as view:
            try:
                while received < nr_bytes:
                    count = sock.recv_into(view[received:])
                    if not count:
                        break
                    received += count
            except (OSError, ValueError) as exc:  # timeout, reset, closed under us
                LOG.debug("connection from %s ended while reading: %s", self.assoc.requestor.address, exc)
        if received < nr_bytes:
            del buffer[received:]
        return buffer

    def _count_dataset(self, body: bytearray) -> None:
        """Add up the data set fragments of a P-DATA-TF body (PS3.8 9.3.5.1, E.2)."""
        offset, end = 0, len(body)
        while offset + 6 <= end:
            (item_length,) = _PDV_LENGTH.unpack_from(body, offset)
            control = body[offset + 5]
            if not control & 0x01:  # a data set fragment, not a command
                self._dataset_bytes += item_length - 2
                if self._dataset_bytes > self._limits.max_dataset_bytes:
                    self._refuse(f"data set longer than {self._limits.max_dataset_bytes} bytes")
                    return
                if control & 0x02:  # last fragment
                    self._dataset_bytes = 0
            offset += 4 + item_length

    def _refuse(self, reason: str) -> None:
        """A-ABORT (service provider, invalid PDU parameter value), then hang up: the DUL reads
        end-of-file next and ends the association."""
        self.refusal = reason
        LOG.warning("ending association from %s: %s", self.assoc.requestor.address, reason)
        abort = A_ABORT_RQ()
        abort.source = _ABORT_SOURCE_PROVIDER
        abort.reason_diagnostic = _ABORT_INVALID_PARAMETER
        sock = cast(socket.socket, self.socket)
        with contextlib.suppress(OSError, ValueError):
            sock.sendall(abort.encode())
        hang_up(sock)
