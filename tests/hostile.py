"""Hostile peers for the edge tests: raw sockets and SCUs that misbehave on purpose.

Everything here talks to a real node over loopback. ``127.0.0.2`` is a second host: Linux answers
on all of 127.0.0.0/8, so a socket bound there is, to the node, another machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

ATTACKER = "127.0.0.2"
HALF_OPEN_RQ = b"\x01\x00\x00"  # the first bytes of an A-ASSOCIATE-RQ, never completed


def pdu_header(pdu_type: int, length: int) -> bytes:
    """PS3.8 9.3: PDU type, reserved byte, 32-bit big-endian length of the rest."""
    return struct.pack(">BBL", pdu_type, 0, length)


def connect_from(source: str, port: int, timeout: float = 5) -> socket.socket:
    """A connection from ``source``. A node that resets it before ``connect`` has even returned
    (the per-host cap can act that fast on loopback) gives a socket its peer has already closed,
    so callers see the same "closed by peer" as when the reset comes a moment later."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    except ConnectionResetError:
        sock, peer = socket.socketpair()
        peer.close()
        return sock
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """True when the node closes (FIN or RST) or aborts the connection within ``wait`` seconds.
    Whatever the node sends first (an A-ABORT, say) counts as an answer too: read until EOF."""
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionError, OSError):
            return True


# --- raw-socket floods ---------------------------------------------------------------------------


@dataclass
class SocketHold:
    """Keep ``count`` connections from ``source`` open, each having sent ``prefix`` (nothing: an
    idle socket; ``HALF_OPEN_RQ``: a half-open association request). Every connection the node
    closes is opened again at once, like a port scanner or a stuck modality that retries."""

    port: int
    count: int
    prefix: bytes = b""
    source: str = ATTACKER
    opened: int = 0
    closed_by_node: list[float] = field(default_factory=list)  # seconds each lived
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> SocketHold:
        self._live: dict[socket.socket, float] = {}
        for _ in range(self.count):
            self._open()
        self._thread = threading.Thread(target=self._run, name="socket-hold", daemon=True)
        self._thread.start()
        return self

    def _open(self) -> None:
        try:
            sock = connect_from(self.source, self.port)
            if self.prefix:
                sock.sendall(self.prefix)
        except OSError:
            return  # refused at once (backlog full): try again on the next round
        self._live[sock] = time.monotonic()
        self.opened += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._live:
                time.sleep(0.02)
            else:
                readable, _, _ = select.select(list(self._live), [], [], 0.02)
                for sock in readable:
                    with contextlib.suppress(OSError):
                        if sock.recv(4096):
                            continue  # the node said something (an A-ABORT, say); wait for EOF
                    self.closed_by_node.append(time.monotonic() - self._live.pop(sock))
                    sock.close()
            while len(self._live) < self.count and not self._stop.is_set():
                self._open()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for sock in self._live:
            sock.close()


@dataclass
class ConnectCloseFlood:
    """``rate`` TCP connections per second from ``source``, each closed right after connecting."""

    port: int
    rate: float
    source: str = ATTACKER
    done: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ConnectCloseFlood:
        self._thread = threading.Thread(target=self._run, name="connect-close", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                connect_from(self.source, self.port).close()
                self.done += 1
            next_at = start + (self.done + 1) / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


# --- data sets -----------------------------------------------------------------------------------


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    """A data set's bytes without File Meta, as a C-STORE carries them."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def flip_vr(raw: bytes, tag: int, new_vr: bytes) -> bytes:
    """Overwrite the VR of top-level element ``tag`` in Explicit VR Little Endian bytes."""
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    at = raw.index(key)
    return raw[: at + 4] + new_vr + raw[at + 6 :]


def replace_uid_bytes(raw: bytes, tag: int, value: bytes) -> bytes:
    """Replace the value of top-level UI element ``tag`` (Explicit VR LE) with ``value`` as is."""
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"UI"
    at = raw.index(key)
    (old_length,) = struct.unpack_from("<H", raw, at + 6)
    return raw[:at] + key + struct.pack("<H", len(value)) + value + raw[at + 8 + old_length :]


@lru_cache(maxsize=2)
def deflate_bomb(expanded_mib: int, sop_instance: str = "1.2.826.0.1.3680043.8.498.9001") -> bytes:
    """A CT data set in Deflated Explicit VR Little Endian whose Pixel Data is ``expanded_mib``
    MiB of zeros: about 1 KiB per MiB on the wire."""
    from synthetic import ct_series

    ds = ct_series(1, seed="bomb")[0]
    del ds.PixelData
    side = int((expanded_mib * 2**20 // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.SOPInstanceUID = sop_instance
    header = encode(ds)
    pixels = side * side * 2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [compressor.compress(header + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels))]
    chunk = bytes(2**20)
    for _ in range(pixels // len(chunk)):
        out.append(compressor.compress(chunk))
    out.append(compressor.compress(bytes(pixels % len(chunk))))
    out.append(compressor.flush())
    return b"".join(out)


# --- a C-STORE with bytes and a context of our choosing ------------------------------------------


def raw_c_store(port: int, sop_class: str, sop_instance: str, payload: bytes,
                syntax: str = ExplicitVRLittleEndian, context_for: str | None = None,
                also_propose: tuple[str, ...] = (), source: str = "127.0.0.1") -> Dataset:
    """Send ``payload`` as the data set of a C-STORE-RQ for ``sop_class``, on the presentation
    context negotiated for ``context_for`` (default: ``sop_class``). pynetdicom encodes nothing:
    the bytes go out as given. Returns the response status (and ErrorComment)."""
    ae = AE(ae_title="PYNETDICOM")
    for abstract in dict.fromkeys((context_for or sop_class, *also_propose)):
        ae.add_requested_context(abstract, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(source, 0))
    assert assoc.is_established, "association not established"
    try:
        return _send_store(assoc, sop_class, sop_instance, payload, context_for or sop_class, syntax)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_store(assoc: Association, sop_class: str, sop_instance: str, payload: bytes,
                context_for: str, syntax: str) -> Dataset:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    context = assoc._get_valid_context(context_for, syntax, "scu")
    # Pause the association reactor, as pynetdicom's own send_c_store does, so the response comes
    # to us rather than to the reactor.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    status = Dataset()
    if rsp is None:
        status.Status = -1  # no response: the association was aborted
        status.ErrorComment = "no response"
        return status
    status.Status = rsp.Status
    status.ErrorComment = getattr(rsp, "ErrorComment", "") or ""
    return status


# --- process memory -------------------------------------------------------------------------------


def reset_peak_rss(pid: int | None = None) -> None:
    """Reset VmHWM (peak resident set) of a process (Linux >= 4.0, /proc/PID/clear_refs = 5)."""
    with open(f"/proc/{pid or os.getpid()}/clear_refs", "w") as fp:
        fp.write("5")


def peak_rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as fp:
        for line in fp:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as fp:
        for line in fp:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def tls_client_context(ca: str, certificate: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.check_hostname = False
    if certificate and key:
        context.load_cert_chain(certificate, key)
    return context
