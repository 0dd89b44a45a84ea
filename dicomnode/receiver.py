"""Storage and Verification SCP: the network edge where scanners push images.

Per association: accept or reject (PS3.8 7.1.1.9: permanent reject, calling AE title not recognised
for unknown callers or hosts; called AE title not recognised; transient reject over the association
limit). Per C-STORE: the data set bytes are stored exactly as received (Storage Level 2, no
coercion) behind a File Meta Information header of ours, fsynced in the spool, indexed in the ledger
and only then answered with Success (PS3.4 B.2.3). The receiver never decodes pixel data, runs
models or waits on jobs.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import __version__
from dicomnode.audit import Audit
from dicomnode.config import NodeSettings, Peer
from dicomnode.domain import StoredInstance
from dicomnode.errors import CannotUnderstand, DataSetMismatch, OutOfResources, StoreRefused
from dicomnode.ledger import Ledger, RecordOutcome
from dicomnode.spool import Spool, require_uid, valid_uid

LOG = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

IMPLEMENTATION_CLASS_UID = "2.25.198719754172931182594676417443830814155"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (result, source, diagnostic)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised

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
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float / Double Float Pixel Data


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (PS3.4 Annex B, Table B.5-1)."""
    from pynetdicom import AllStoragePresentationContexts

    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


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
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.audit = audit
        self._peers = PeerTable(peers)
        self._on_stored = on_stored
        self._on_released = on_released
        self._servers: list[ThreadedAssociationServer] = []
        self._association_ids: dict[int, str] = {}
        self._stored_by_association: dict[str, int] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()

    # --- set-up -------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.require_called_aet = True  # wrong called AE title -> A-ASSOCIATE-RJ reason 7
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(VERIFICATION_SOP_CLASS, syntaxes)
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    def update_peers(self, peers: list[Peer]) -> None:
        """Take effect on the very next association."""
        self._peers = PeerTable(peers)

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
        ]
        address = (self.settings.host, self.settings.port)
        self._servers.append(_server(self.ae.start_server(address, block=False, evt_handlers=handlers)))
        tls = self.settings.tls
        if tls is not None:
            context = tls_server_context(tls.certificate, tls.private_key, tls.ca_certificates,
                                         tls.require_client_certificate)
            self._servers.append(_server(
                self.ae.start_server(
                    (self.settings.host, tls.port), block=False, evt_handlers=handlers,
                    ssl_context=context,
                )
            ))
        LOG.info("listening on %s:%s as %s", self.settings.host, self.settings.port, self.settings.ae_title)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
        self._servers.clear()

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
            self.ledger.association_released(association_id)
            if self._on_released is not None:
                self._on_released(association_id)

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
            self._on_stored(stored, outcome)
        return 0x0000

    def _store(
        self, event: evt.Event, association_id: str, calling: str, host: str
    ) -> tuple[StoredInstance, RecordOutcome]:
        request = event.request
        assert isinstance(request, C_STORE)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        self.spool.check_space()

        raw = event.encoded_dataset(include_meta=False)
        meta = DicomBytesIO()
        meta.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(meta, _file_meta(sop_class, sop_instance, transfer_syntax, calling),
                             enforce_standard=True)
        header = meta.getvalue()
        ds = parse_header(header + raw)
        check_dataset(ds, sop_class, sop_instance)

        study = require_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
        series = require_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID"))
        relative = self.spool.instance_path(study, series, sop_instance)
        self.spool.write(relative, header, raw)
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
            raise OutOfResources(f"ledger unavailable: {type(exc).__name__}") from exc
        return item, outcome


def _server(server: ThreadedAssociationServer | None) -> ThreadedAssociationServer:
    assert server is not None, "start_server(block=False) returns the server"
    return server


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO, PS3.7 C.4.2
    return ds


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, calling: str) -> FileMetaDataset:
    if not valid_uid(sop_class) or not valid_uid(sop_instance):
        raise CannotUnderstand("Affected SOP Class/Instance UID is missing or invalid")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if calling:
        meta.SourceApplicationEntityTitle = calling
    return meta


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


def check_dataset(ds: Dataset, sop_class: str, sop_instance: str) -> None:
    """Refuse a data set that contradicts its C-STORE command or its SOP class (PS3.4 B.2.3)."""
    ds_class = ds.get("SOPClassUID")
    ds_instance = ds.get("SOPInstanceUID")
    if not ds_instance:
        raise DataSetMismatch("SOPInstanceUID is missing")
    if str(ds_instance) != sop_instance:
        raise DataSetMismatch("SOPInstanceUID differs from the C-STORE request")
    if str(ds_class or "") != sop_class:
        raise DataSetMismatch("SOPClassUID differs from the C-STORE request")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(keyword):
            raise DataSetMismatch(f"{keyword} is missing")
    modalities = _MODALITY_OF_SOP_CLASS.get(sop_class)
    if modalities is not None:
        modality = str(ds.get("Modality", ""))
        if modality not in modalities:
            raise DataSetMismatch(f"Modality {modality!r} does not match the SOP class")
        if not any(tag in ds for tag in _PIXEL_TAGS):
            raise DataSetMismatch("image SOP class without Pixel Data")


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
