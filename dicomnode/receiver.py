"""Storage and Verification SCP: the network edge where scanners push images.

Per connection (:mod:`dicomnode.transport`): a bounded negotiation pool with a per-host cap and a
handshake deadline, timeouts on every read and write, PDUs bounded by the negotiated maximum, and
association slots for live associations only, so no host can lock the scanners out. Per
association: accept or reject (PS3.8 7.1.1.9: permanent reject, calling AE title not recognised
for unknown callers or hosts; called AE title not recognised; transient reject over the association
limit). Per C-STORE: the command must match its presentation context; the data set bytes are
stored exactly as received (Storage Level 2, no coercion) behind a File Meta Information header of
ours, fsynced in the spool, indexed in the ledger and only then answered with Success (PS3.4
B.2.3). The receiver never decodes pixel data, runs models or waits on jobs.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import logging
import socket
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext

from dicomnode import __version__
from dicomnode.audit import Audit
from dicomnode.config import NodeSettings, Peer
from dicomnode.domain import StoredInstance
from dicomnode.errors import (
    CannotUnderstand,
    DataSetMismatch,
    OutOfResources,
    SopClassNotSupported,
    StoreRefused,
)
from dicomnode.ledger import Ledger, RecordOutcome
from dicomnode.spool import Spool, valid_uid
from dicomnode.transport import Admission, EdgeLimits, EdgeServer

LOG = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

IMPLEMENTATION_CLASS_UID = "2.25.198719754172931182594676417443830814155"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (result, source, diagnostic)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised

# pynetdicom's own association limit counts every Association thread, negotiating or dying ones
# too; the limit is enforced by transport.Admission on live associations instead.
_PYNETDICOM_LIMIT_OFF = 2**31 - 1
_REFUSAL_LOG_EVERY = 10.0  # seconds between warnings about connections refused from one host

# Image IODs whose Modality attribute is an enumerated value (PS3.3 A.3, A.4, ...). A data set that
# claims one of these SOP classes with another modality does not match its SOP class.
_MODALITY_OF_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.2": ("CT",),  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": ("CT",),  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4": ("MR",),  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": ("MR",),  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.128": ("PT",),  # PET Image Storage
    "1.2.840.10008.5.1.4.1.1.20": ("NM",),  # NM Image Storage
}
_SMPTE_ST_2110 = "1.2.840.10008.1.2.7."
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float / Double Float Pixel Data


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes we accept, in order of preference.

    pynetdicom accepts the first of *our* syntaxes that the requestor proposed in a context, so the
    order is a policy: uncompressed explicit VR first (no work for the modality), then lossless
    compressions, deflate, implicit VR, and lossy syntaxes last, so that a modality that offers both
    never has to compress a lossless original lossily for us. JPIP-referenced syntaxes (no pixel
    data to analyse) and SMPTE ST 2110 (real-time video streams, not C-STORE) are not accepted.
    """

    def rank(uid: UID) -> int:
        if uid == ExplicitVRLittleEndian:
            return 0
        if uid.is_compressed and "Lossless" in uid.name and "Lossy" not in uid.name:  # not Near-Lossless
            return 1
        if uid == DeflatedExplicitVRLittleEndian:
            return 2
        if uid == ImplicitVRLittleEndian:
            return 3
        if uid == ExplicitVRBigEndian:  # retired, still sent by old equipment
            return 5
        return 4

    usable = [UID(u) for u in AllTransferSyntaxes
              if "JPIP" not in UID(u).name and not u.startswith(_SMPTE_ST_2110)]
    return [str(u) for u in sorted(usable, key=rank)]  # sorted() is stable: pydicom's order within a rank


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (PS3.4 Annex B, Table B.5-1)."""
    from pynetdicom import AllStoragePresentationContexts

    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


class SharedContexts(list[PresentationContext]):
    """The supported presentation contexts, shared read-only by every association.

    pynetdicom 3.0.4 deep-copies the server's contexts for each association it accepts
    (``RequestHandler._create_association``): ~6,700 UIDs for our 171 SOP classes x 39 transfer
    syntaxes, tens of milliseconds per association. Negotiation only reads them
    (``presentation.negotiate_as_acceptor`` builds new contexts for its result), so a shallow copy
    of the list is as safe. The contexts themselves are private copies nobody else can change.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return SharedContexts(self)


def quiet_pynetdicom_event_logging() -> None:
    """Unbind pynetdicom's standard PDU/DIMSE event loggers unless its debug log is wanted.

    They format every PDU and DIMSE message (for DEBUG lines) whatever the log level, at a cost
    per C-STORE comparable to storing it. Warnings, errors and association outcomes are still
    logged. Read when an AE starts a server and when each association is created.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        _config.LOG_HANDLER_LEVEL = "none"


def set_tcp_nodelay(sock: Any) -> None:
    """Disable Nagle's algorithm: a DIMSE message written as several PDUs must not wait for the
    peer's delayed ACK (~40 ms on Linux) between them."""
    raw = getattr(sock, "socket", sock)  # pynetdicom's AssociationSocket wraps the socket
    if raw is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # already closed, or not TCP
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class AccessDecision:
    accepted: bool
    reason: str = ""


class PeerTable:
    """Who may call. Swapped atomically when an admin edits peers; read on every association."""

    def __init__(self, peers: list[Peer]) -> None:
        self._peers = {p.ae_title: p for p in peers}

    def decide(self, calling_ae: str, host: str) -> AccessDecision:
        peer = self._peers.get(calling_ae.strip())
        if peer is None:
            return AccessDecision(False, f"calling AE title {calling_ae.strip()!r} is not configured")
        if peer.hosts and host not in peer.hosts:
            return AccessDecision(
                False, f"calling AE title {peer.ae_title!r} is not allowed from host {host}"
            )
        return AccessDecision(True)


StoredCallback = Callable[[StoredInstance, RecordOutcome], None]


class Receiver:
    """The Storage SCP. ``start()`` opens the listeners; ``stop()`` closes them."""

    def __init__(
        self,
        settings: NodeSettings,
        peers: list[Peer],
        spool: Spool,
        ledger: Ledger,
        audit: Audit,
        on_stored: StoredCallback | None = None,
        on_released: Callable[[str], None] | None = None,
        reuse_port: bool = False,
        admission: Admission | None = None,
        before_accept: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.reuse_port = reuse_port  # cluster: several receiver processes share the DICOM port
        self.spool = spool
        self.ledger = ledger
        self.audit = audit
        self._peers = PeerTable(peers)
        self._on_stored = on_stored
        self._on_released = on_released
        self._servers: list[EdgeServer] = []
        # A receiver process of a pool shares the node-wide association limit (receivers.py).
        self._admission = admission or Admission(edge_limits(settings))
        self._before_accept = before_accept
        # Flushes each new file's directory while the ledger commits its row (see _store).
        self._flusher = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dir-fsync")
        self._refusals: dict[str, tuple[float, int]] = {}  # host -> (last warning, refused since)
        self._association_ids: dict[int, str] = {}
        self._stored_by_association: dict[str, int] = {}
        self._lock = threading.Lock()
        self._contexts: SharedContexts
        self.ae = self._make_ae()

    # --- set-up -------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = _PYNETDICOM_LIMIT_OFF  # see transport.Admission
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_called_aet = True  # wrong called AE title -> A-ASSOCIATE-RJ reason 7
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(VERIFICATION_SOP_CLASS, syntaxes)
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, syntaxes)
        # Private copies: nothing that changes the AE's contexts can reach running associations.
        self._contexts = SharedContexts(copy.deepcopy(ae.supported_contexts))
        return ae

    def update_peers(self, peers: list[Peer]) -> None:
        """Take effect on the very next association."""
        self._peers = PeerTable(peers)

    def start(self, plain_socket: socket.socket | None = None, tls_socket: socket.socket | None = None) -> None:
        """Open the listeners, or adopt the listening sockets a node made for its receiver
        processes (``plain_socket``, ``tls_socket``)."""
        quiet_pynetdicom_event_logging()
        self._servers.append(self._serve(self.settings.port, None, plain_socket))
        tls = self.settings.tls
        if tls is not None:
            context = tls_server_context(tls.certificate, tls.private_key, tls.ca_certificates,
                                         tls.require_client_certificate)
            self._servers.append(self._serve(tls.port, context, tls_socket))
        LOG.info("listening on %s:%s as %s", self.settings.host, self.settings.port, self.settings.ae_title)

    def _serve(self, port: int, ssl_context: ssl.SSLContext | None,
               listening_socket: socket.socket | None = None) -> EdgeServer:
        """One listener (``AE.start_server(block=False)`` with our server class). Both listeners
        share one admission: association slots and the negotiation pool are the node's."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected_by_pynetdicom),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
        ]
        server = self.ae.make_server(
            (self.settings.host, port), evt_handlers=handlers, contexts=self._contexts,
            ssl_context=ssl_context, server_class=EdgeServer, admission=self._admission,
            on_refused=self._on_connection_refused, reuse_port=self.reuse_port,
            listening_socket=listening_socket, before_accept=self._before_accept,
        )
        assert isinstance(server, EdgeServer)
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{port}", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # what AE.start_server does; server.shutdown() removes it
        return server


    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers.clear()
        self._flusher.shutdown(wait=True)
        self._flusher = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dir-fsync")  # no thread until used

    def active_associations(self) -> int:
        return self._admission.snapshot()["associations"]

    def connections(self) -> dict[str, int]:
        """Connections now negotiating, live associations, and connections refused so far at the
        door (negotiation pool or per-host cap full, TLS handshake failed)."""
        return self._admission.snapshot()

    def _on_connection_refused(self, host: str, reason: str) -> None:
        """Log refused connections, at most once per host every few seconds: a port scanner must
        not flood the log (nor the audit log: these are not association decisions)."""
        now = time.monotonic()
        with self._lock:
            last, count = self._refusals.get(host, (0.0, 0))
            if now - last < _REFUSAL_LOG_EVERY:
                self._refusals[host] = (last, count + 1)
                return
            if len(self._refusals) > 10_000:
                self._refusals.clear()
            self._refusals[host] = (now, 0)
        more = f" ({count} more since the last warning)" if count else ""
        LOG.warning("connection from %s refused: %s%s", host, reason, more)

    @property
    def ports(self) -> list[int]:
        return [int(s.server_address[1]) for s in self._servers]

    # --- association --------------------------------------------------------------------------

    def association_id(self, assoc: Association) -> str:
        key = id(assoc)
        with self._lock:
            if key not in self._association_ids:
                self._association_ids[key] = uuid.uuid4().hex
            return self._association_ids[key]

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None
        calling = str(primitive.calling_ae_title).strip()
        host = str(assoc.requestor.address)
        decision = self._peers.decide(calling, host)
        association_id = self.association_id(assoc)
        if decision.accepted:
            self.audit.log("association.requested", association=association_id, calling_ae=calling,
                           host=host, called_ae=str(primitive.called_ae_title).strip())
            return
        self.audit.log("association.rejected", association=association_id, calling_ae=calling,
                       host=host, reason=decision.reason)
        LOG.warning("rejecting association: %s", decision.reason)
        assoc.acse.send_reject(*REJECT_CALLING_AE)
        # Wait until the A-ASSOCIATE-RJ is on the wire: otherwise the acceptor thread closes the
        # socket while the PDU is still queued and the peer sees an abort instead of the reject.
        deadline = time.monotonic() + 5
        while assoc.dul.to_provider_queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.001)
        assoc.kill()
        self._forget(assoc)  # a killed association never reaches EVT_RELEASED/EVT_ABORTED

    def _on_rejected_by_pynetdicom(self, event: evt.Event) -> None:
        """pynetdicom's own rejections, after ours let the caller through: called AE title
        (reason 7) and the association limit (transient, local limit exceeded)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        if called != self.settings.ae_title:
            reason = f"called AE title {called!r} is not {self.settings.ae_title!r}"
        else:
            reason = f"association limit ({self.settings.max_associations}) reached"
        LOG.warning("rejecting association: %s", reason)
        self.audit.log("association.rejected", association=self._forget(assoc),
                       calling_ae=str(assoc.requestor.ae_title).strip(),
                       host=str(assoc.requestor.address), reason=reason)

    def _on_accepted(self, event: evt.Event) -> None:
        # Not at EVT_REQUESTED: pynetdicom may still refuse the caller after our check passed.
        self.audit.log("association.accepted", association=self.association_id(event.assoc))

    def _forget(self, assoc: Association) -> str:
        with self._lock:
            association_id = self._association_ids.pop(id(assoc), "")
            self._stored_by_association.pop(association_id, None)
        return association_id

    def _on_association_end(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            association_id = self._association_ids.pop(id(assoc), None)
            stored = self._stored_by_association.pop(association_id or "", 0)
        if association_id is None:
            return
        released = event.event is evt.EVT_RELEASED
        self.audit.log("association.released" if released else "association.aborted",
                       association=association_id, stored=stored)
        if released and stored:
            # Completeness evidence only: a failure here costs latency (the quiet period still
            # closes the series), so it is logged and the hint still goes to assembly.
            try:
                self.ledger.association_released(association_id)
            except Exception:
                LOG.exception("could not record the release of association %s", association_id)
            if self._on_released is not None:
                try:
                    self._on_released(association_id)
                except Exception:
                    LOG.exception("release hint for association %s failed", association_id)
        elif stored:
            try:  # no longer holds other associations' releases back
                self.ledger.association_aborted(association_id)
            except Exception:
                LOG.exception("could not record the abort of association %s", association_id)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    # --- C-STORE ------------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> Dataset | int:
        assoc = event.assoc
        association_id = self.association_id(assoc)
        calling = str(assoc.requestor.ae_title).strip()
        host = str(assoc.requestor.address)
        try:
            stored, outcome = self._store(event, association_id, calling, host)
        except StoreRefused as exc:
            self.audit.log("instance.refused", association=association_id, calling_ae=calling,
                           status=f"0x{exc.status:04X}", reason=exc.comment)
            LOG.warning("C-STORE refused (0x%04X): %s", exc.status, exc.comment)
            return _status(exc.status, exc.comment)
        except Exception as exc:  # never let one bad instance take the association down
            LOG.exception("C-STORE failed")
            self.audit.log("instance.refused", association=association_id, calling_ae=calling,
                           status="0xC000", reason=f"internal error: {exc}")
            return _status(0xC000, f"internal error: {type(exc).__name__}")
        with self._lock:
            self._stored_by_association[association_id] = (
                self._stored_by_association.get(association_id, 0) + 1
            )
        self.audit.log("instance.stored" if outcome.new else "instance.duplicate",
                       association=association_id, calling_ae=calling,
                       sop_instance_uid=stored.sop_instance_uid,
                       series_instance_uid=stored.series_instance_uid, epoch=outcome.epoch,
                       bytes=stored.size, transfer_syntax=stored.transfer_syntax_uid)
        if self._on_stored is not None:
            # The instance is durable and committed: Success is the truth whatever happens next.
            try:
                self._on_stored(stored, outcome)
            except Exception:
                LOG.exception("after storing %s", stored.sop_instance_uid)
        return 0x0000

    def _store(
        self, event: evt.Event, association_id: str, calling: str, host: str
    ) -> tuple[StoredInstance, RecordOutcome]:
        request = event.request
        assert isinstance(request, C_STORE)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        context = event.context
        if str(context.abstract_syntax) != sop_class:
            # PS3.7 C.4.2 / Annex C: 0122H, Refused: SOP Class not supported. The context was
            # negotiated for another SOP class, so this one was never agreed on it (PS3.8 7.1.1.13);
            # the data set may well match its own class, so A900H would misname the fault.
            LOG.warning("C-STORE of %s on the presentation context of %s", sop_class, context.abstract_syntax)
            raise SopClassNotSupported("SOP Class differs from the presentation context's")
        transfer_syntax = str(context.transfer_syntax)

        raw = event.encoded_dataset(include_meta=False)
        header = file_meta_bytes(sop_class, sop_instance, transfer_syntax, calling)
        ds = parse_received(raw, transfer_syntax, self.settings.max_instance_mb * 2**20)
        study, series = check_dataset(ds, sop_class, sop_instance)

        relative = self.spool.instance_path(study, series, sop_instance)
        # Durable before Success: the file's bytes (fsync), its name (fsync of the folder) and its
        # row (commit). The folder flush runs while the row commits: a crash can still never leave a
        # row without its file, since the link precedes the commit; only a power loss in the instant
        # between the commit and the end of the folder flush could, for an instance not acknowledged
        # (start-up reconciliation reports such rows).
        _, folder = self.spool.write_linked(relative, header, raw)
        flushed = self._flusher.submit(self.spool.sync_folder, folder)
        item = StoredInstance(
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            series_instance_uid=series,
            study_instance_uid=study,
            transfer_syntax_uid=transfer_syntax,
            path=relative,
            size=len(header) + len(raw),
            calling_ae=calling,
            peer_host=host,
            received_at=datetime.now(UTC),
            association_id=association_id,
            **routing_fields(ds),
        )
        try:
            outcome = self.ledger.record_instance(item)
        except Exception as exc:
            cf.wait([flushed])
            raise OutOfResources(f"ledger unavailable: {type(exc).__name__}") from exc
        flushed.result()  # OutOfResources when the folder could not be flushed
        if not outcome.new and outcome.path != item.path:
            # The same SOP Instance UID under another study or series lands at another path; the
            # ledger keeps the first copy, so the second file is removed rather than orphaned. It is
            # already answered for: a failure here is logged, never turned into a refusal.
            try:
                self.spool.discard(item.path)
            except OSError as exc:
                LOG.warning("could not remove duplicate copy %s: %s", item.path, exc)
        return item, outcome


def edge_limits(settings: NodeSettings) -> EdgeLimits:
    """What the listeners allow, from ``[node]`` (see :mod:`dicomnode.transport`)."""
    return EdgeLimits(
        max_associations=settings.max_associations,
        # The A-ASSOCIATE-RQ must arrive within the ACSE timeout whatever the handshake allows.
        handshake_timeout=min(settings.handshake_timeout, settings.acse_timeout),
        network_timeout=settings.network_timeout,
        negotiation_slots=settings.negotiation_slots,
        negotiation_per_host=settings.negotiation_per_host,
        max_pdu=settings.max_pdu,
        max_dataset_bytes=settings.max_instance_mb * 2**20,
    )


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO, PS3.7 C.4.2
    return ds


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, calling: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of a received instance (PS3.10 7.1).

    Encoded by hand: the same bytes as pydicom's ``write_file_meta_info(enforce_standard=True)``
    (pinned by a test) at a fraction of the cost, which matters once per C-STORE.
    """
    if not valid_uid(sop_class) or not valid_uid(sop_instance):
        raise CannotUnderstand("Affected SOP Class/Instance UID is missing or invalid")
    elements = [
        _element(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
        _element(0x0002, b"UI", _padded(sop_class, b"\x00")),
        _element(0x0003, b"UI", _padded(sop_instance, b"\x00")),
        _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if calling:
        elements.append(_element(0x0016, b"AE", _padded(calling, b" ")))
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


# The attributes the receiver, routing and assembly read (check_dataset, routing_fields), and the
# pixel data tags, whose presence is checked but whose values are never read.
HEADER_TAGS = tuple(
    BaseTag(t)
    for t in (
        0x00080008,  # ImageType
        0x00080016,  # SOPClassUID
        0x00080018,  # SOPInstanceUID
        0x00080060,  # Modality
        0x00081030,  # StudyDescription
        0x0008103E,  # SeriesDescription
        0x00180015,  # BodyPartExamined
        0x0020000D,  # StudyInstanceUID
        0x0020000E,  # SeriesInstanceUID
        0x00200013,  # InstanceNumber
        0x00200105,  # NumberOfTemporalPositions
        0x00201002,  # ImagesInAcquisition
        *_PIXEL_TAGS,
    )
)
_DEFER_BYTES = 1024  # longer values (pixel data) are skipped, not copied

# Every VR of PS3.5 6.2 (pydicom's VR enumeration, without its "US or SS" style ambiguous names).
KNOWN_VRS = frozenset(vr.value for vr in VR if len(vr.value) == 2)


def _check_vr(tag: BaseTag, vr: str | None, length: int) -> bool:
    """``stop_when`` of the header walk: called for every top-level element, never stops it.

    An unknown VR (one bit flipped in ``DS`` reads ``DW``) cannot be decoded later: the analysis
    would lose the whole series' results over one instance, after it was acknowledged. pydicom
    walks it with a guessed 2-byte length, so it is refused here, where it costs one set lookup.
    """
    if vr is not None and vr not in KNOWN_VRS:
        raise CannotUnderstand(f"unknown VR {vr[:2]!r} in ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    return False


class _InflatingReader:
    """A read-only file object over raw-deflate bytes (PS3.5 A.5) that inflates on demand.

    Forward seeks inflate and discard, so skipping a 512 MiB Pixel Data value costs CPU, not
    memory; at most :data:`_REWIND` bytes behind the position are kept for pydicom's short look-backs.
    Inflating more than ``limit`` bytes raises :class:`OutOfResources`: the data set is larger than
    the node accepts (a deflate bomb, or simply too big).
    """

    _CHUNK = 2**18
    _REWIND = 2**20

    def __init__(self, data: bytes, limit: int) -> None:
        self._source: memoryview[int] = memoryview(data)
        self._taken = 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._start = 0  # stream offset of _buffer[0]
        self._position = 0
        self._done = False
        self._limit = limit

    @property
    def _produced(self) -> int:
        return self._start + len(self._buffer)

    def _inflate(self) -> bool:
        """Inflate one more chunk; False at the end of the stream."""
        while not self._done:
            pending: bytes | memoryview[int] = self._inflater.unconsumed_tail
            if not pending:
                pending = self._source[self._taken:self._taken + self._CHUNK]
                self._taken += len(pending)
            try:
                out = self._inflater.decompress(pending, self._CHUNK)
            except zlib.error as exc:
                raise CannotUnderstand(f"cannot inflate data set: {exc}"[:64]) from exc
            if self._inflater.eof or (not out and not pending):
                self._done = True
            if out:
                self._buffer += out
                if self._produced > self._limit:
                    raise OutOfResources(f"data set inflates past max_instance_mb ({self._limit // 2**20} MiB)")
                # Forget what lies more than _REWIND behind the position (during a long forward
                # seek: everything inflated so far), in steps of at least _REWIND.
                keep_from = min(self._position - self._REWIND, self._produced)
                if keep_from - self._start > self._REWIND:
                    del self._buffer[: keep_from - self._start]
                    self._start = keep_from
                return True
        return False

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            while self._inflate():
                pass
            size = max(0, self._produced - self._position)
        while self._produced < self._position + size and self._inflate():
            pass
        at = self._position - self._start
        data = bytes(self._buffer[at:at + size])
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._position + offset if whence == 1 else -1
        if target < self._start:
            raise OSError(f"cannot seek back to {target} in an inflating stream")
        self._position = target
        while self._produced < target and self._inflate():
            pass
        return target

    def tell(self) -> int:
        return self._position

    def length(self) -> int:
        """The inflated length of the whole stream (inflates the rest, within the limit)."""
        while self._inflate():
            pass
        return self._produced


def parse_received(raw: bytes, transfer_syntax: str, max_inflated: int = 2**62) -> Dataset:
    """Parse a received data set (no File Meta) for :data:`HEADER_TAGS` only.

    Every top-level element header is walked (undefined-length sequences and values down to their
    delimiters) and its VR checked against :data:`KNOWN_VRS`; the values of other elements are
    skipped unread and never converted, which keeps this cheap per C-STORE. A deflated data set is
    inflated as it is walked, never more than ``max_inflated`` bytes and never all in memory. A data
    set that cannot be walked, or whose last element runs past the end (truncated), raises
    :class:`CannotUnderstand` (0xC000); one that inflates past the limit :class:`OutOfResources`.
    """
    fp: BytesIO | _InflatingReader
    try:
        syntax = UID(transfer_syntax)
        known = syntax.is_transfer_syntax  # else: explicit VR little endian, as pydicom assumes
        implicit = known and bool(syntax.is_implicit_VR)
        little = not known or bool(syntax.is_little_endian)
        fp = _InflatingReader(raw, max_inflated) if known and syntax.is_deflated else BytesIO(raw)
        elements: dict[BaseTag, Any] = {}
        for elem in data_element_generator(cast(BinaryIO, fp), implicit, little, stop_when=_check_vr,
                                           defer_size=_DEFER_BYTES, specific_tags=list(HEADER_TAGS)):
            elements[elem.tag] = elem
        end = fp.tell()  # past the end when a skipped value was longer than the data
        length = fp.length() if isinstance(fp, _InflatingReader) else len(raw)
    except StoreRefused:
        raise
    except Exception as exc:
        raise CannotUnderstand(f"cannot parse data set: {exc}"[:64]) from exc
    for elem in elements.values():
        if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF:
            end = max(end, elem.value_tell + elem.length)
    if end > length:
        raise CannotUnderstand(f"data set truncated: {length} of at least {end} bytes")
    ds = Dataset(elements)
    encoding: str | list[str] = default_encoding
    try:
        if 0x00080005 in elements:
            encoding = convert_encodings(ds.get("SpecificCharacterSet"))
    except Exception as exc:
        raise CannotUnderstand(f"cannot parse data set: {exc}"[:64]) from exc
    ds.set_original_encoding(implicit, little, encoding)
    return ds


def parse_header(data: bytes) -> Dataset:
    """Parse a Part 10 byte string without loading large values (pixel data stays deferred)."""
    try:
        ds = pydicom.dcmread(BytesIO(data), defer_size=256)
        # Touch every element so that truncated or malformed data sets fail here, not later.
        for _ in ds:
            pass
        return ds
    except Exception as exc:
        raise CannotUnderstand(f"cannot parse data set: {exc}"[:64]) from exc


def received_uid(ds: Dataset, tag: int, keyword: str) -> str | None:
    """The UID in element ``tag`` exactly as received: None when absent or empty, else the value,
    which must be a valid UID (PS3.5 9.1) with at most the one trailing pad byte that makes its
    length even (NULL per PS3.5 6.2; a space, which old equipment writes, is tolerated).

    pydicom strips spaces on both sides when it converts a UI value, so ``" 1.2.3"`` would be
    indexed as ``1.2.3`` while the stored bytes say otherwise; the raw bytes are checked instead.
    """
    if tag not in ds:
        return None
    value: object = ds.get_item(tag).value
    if isinstance(value, str):  # converted already: a data set built in memory, not received
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes):  # deferred (longer than any UID) or multi-valued
        raise CannotUnderstand(f"{keyword} is not a valid UID")
    if len(value) % 2 == 0 and value[-1:] in (b"\x00", b" "):
        value = value[:-1]
    if not value:
        return None
    text = value.decode("ascii", "replace")
    if not valid_uid(text):
        raise CannotUnderstand(f"{keyword} {text[:40]!r} is not a valid UID")
    return text


def check_dataset(ds: Dataset, sop_class: str, sop_instance: str) -> tuple[str, str]:
    """Refuse a data set that contradicts its C-STORE command or its SOP class (PS3.4 B.2.3).
    Returns its (Study Instance UID, Series Instance UID), checked as received."""
    ds_instance = received_uid(ds, 0x00080018, "SOPInstanceUID")
    ds_class = received_uid(ds, 0x00080016, "SOPClassUID")
    if not ds_instance:
        raise DataSetMismatch("SOPInstanceUID is missing")
    if ds_instance != sop_instance:
        raise DataSetMismatch("SOPInstanceUID differs from the C-STORE request")
    if (ds_class or "") != sop_class:
        raise DataSetMismatch("SOPClassUID differs from the C-STORE request")
    study = received_uid(ds, 0x0020000D, "StudyInstanceUID")
    series = received_uid(ds, 0x0020000E, "SeriesInstanceUID")
    for keyword, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not uid:
            raise DataSetMismatch(f"{keyword} is missing")
    modalities = _MODALITY_OF_SOP_CLASS.get(sop_class)
    if modalities is not None:
        modality = str(ds.get("Modality", ""))
        if modality not in modalities:
            raise DataSetMismatch(f"Modality {modality!r} does not match the SOP class")
        if not any(tag in ds for tag in _PIXEL_TAGS):
            raise DataSetMismatch("image SOP class without Pixel Data")
    assert study is not None and series is not None
    return study, series


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def routing_fields(ds: Dataset) -> dict[str, Any]:
    """The header fields routing and assembly use, read once at reception."""
    image_type = ds.get("ImageType", "")
    if isinstance(image_type, (list, pydicom.multival.MultiValue)):
        image_type = "\\".join(str(v) for v in image_type)
    return {
        "modality": str(ds.get("Modality", ""))[:16],
        "instance_number": _int(ds.get("InstanceNumber")),
        "body_part": str(ds.get("BodyPartExamined", ""))[:64],
        "series_description": str(ds.get("SeriesDescription", ""))[:200],
        "study_description": str(ds.get("StudyDescription", ""))[:200],
        "image_type": str(image_type)[:200],
        "images_in_acquisition": _int(ds.get("ImagesInAcquisition")),
        "temporal_positions": _int(ds.get("NumberOfTemporalPositions")),
    }


def tls_server_context(
    certificate: Any, private_key: Any, ca_certificates: Any, require_client_certificate: bool
) -> ssl.SSLContext:
    """TLS 1.2+ server context (PS3.15 B.1, BCP 195)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certificate), str(private_key))
    if ca_certificates is not None:
        context.load_verify_locations(str(ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    if ca_certificates is None:
        context.verify_mode = ssl.CERT_NONE
    return context
