"""Storage SCU: deliver result objects to destinations, one durable deliver job per (result,
destination). The sender never changes a result: it sends the spooled bytes as they are.

Status classification (PS3.4 B.2.3, PS3.7 C):

=====================================  ==========================================================
Success 0x0000, configured warnings    delivered
0xA7xx Out of Resources, 0x0110,       transient: retried with exponential backoff
0x0213; network errors,
timeouts, aborts, transient rejects
0xA9xx, 0xCxxx, 0x0122 SOP class not   permanent: dead letter with the reason
supported, 0x0212 mistyped argument,
warnings not configured as success,
other failures, permanent
rejects, no accepted presentation
context
=====================================  ==========================================================
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt

from dicomnode.audit import Audit
from dicomnode.config import Destination
from dicomnode.domain import JobKind
from dicomnode.errors import Permanent, Transient
from dicomnode.jobs import JobQueue
from dicomnode.ledger import JobRow, Ledger
from dicomnode.receiver import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    VERIFICATION_SOP_CLASS,
    quiet_pynetdicom_event_logging,
    set_tcp_nodelay,
)
from dicomnode.spool import Spool

LOG = logging.getLogger(__name__)

# Processing failure and resource limitation: the same request may well succeed later.
TRANSIENT_STATUSES = {0x0110, 0x0213}


@dataclass(frozen=True)
class DeliveryTask:
    job_id: int
    result_id: int
    path: str
    destination_name: str
    destination: Destination
    calling_ae: str
    sop_instance_uid: str


def classify(status: int, destination: Destination) -> Exception | None:
    """None when delivered; else the Transient or Permanent error for this status."""
    if status == 0x0000 or status in destination.warning_is_success:
        return None
    text = f"C-STORE status 0x{status:04X}"
    if (status & 0xFF00) == 0xA700 or status in TRANSIENT_STATUSES:
        return Transient(f"{text} (out of resources or processing failure at the destination)")
    if (status & 0xFF00) == 0xA900:
        return Permanent(f"{text} (data set does not match SOP class)")
    if (status & 0xF000) == 0xC000:
        return Permanent(f"{text} (cannot understand)")
    if status == 0x0122:
        return Permanent(f"{text} (SOP class not supported)")
    if (status & 0xF000) == 0xB000:
        return Permanent(f"{text} (warning not configured as success)")
    return Permanent(text)


def _on_connected(event: evt.Event) -> None:
    # Without TCP_NODELAY the data set PDU after a C-STORE-RQ command PDU waits for the peer's
    # delayed ACK: ~40 ms per instance on Linux.
    set_tcp_nodelay(event.assoc.dul.socket)


# Bound to every association we request: EVT_CONN_OPEN fires once the TCP connection is up.
EVENT_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, _on_connected)]


def make_ae(calling_ae: str, destination: Destination | None = None) -> AE:
    """A requesting AE with the destination's SCU settings: the largest PDU we accept (PS3.8
    D.3.3.1; ``AE.associate`` takes it as ``max_pdu``, set here too so the AE states it) and the
    ACSE, DIMSE and network timeouts (the defaults of :class:`Destination` when none is given)."""
    settings = destination or _DEFAULT_SCU
    quiet_pynetdicom_event_logging()
    ae = AE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    return ae


_DEFAULT_SCU = Destination(ae_title="ANY-SCP", host="127.0.0.1", port=104)  # only its SCU settings are read


def tls_arguments(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a TLS destination (PS3.15 B.1, TLS 1.2 or newer): its
    certificate is verified against ``ca_certificates`` (else the system's CAs) and its host name,
    and our client certificate is presented when one is configured. None for plain TCP."""
    if not destination.tls:
        return None
    context = ssl.create_default_context(
        cafile=str(destination.ca_certificates) if destination.ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.certificate is not None and destination.private_key is not None:
        context.load_cert_chain(str(destination.certificate), str(destination.private_key))
    return context, destination.host


def store(path: Path, destination: Destination, calling_ae: str) -> int:
    """Send one Part 10 file; returns the C-STORE status or raises Transient/Permanent."""
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    ae = make_ae(calling_ae, destination)
    ae.add_requested_context(ds.SOPClassUID, [syntax])
    assoc = _associate(ae, destination)
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        result = getattr(rj, "result", None)
        detail = f"association rejected (result {result}, source {getattr(rj, 'result_source', '?')}, " \
                 f"reason {getattr(rj, 'diagnostic', '?')})"
        if result == 0x02:
            raise Transient(detail)
        raise Permanent(detail)
    if not assoc.is_established:
        raise Transient(f"no association with {destination.ae_title}@{destination.host}:{destination.port}"
                        " (connection refused, aborted or timed out)")
    try:
        if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
            raise Permanent(f"destination accepted no presentation context for {ds.SOPClassUID.name}")
        try:
            response = assoc.send_c_store(ds)
        except Exception as exc:
            raise Transient(f"C-STORE failed: {exc}") from exc
        if not response or "Status" not in response:
            raise Transient("no C-STORE response (timeout or abort)")
        return int(response.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def _associate(ae: AE, destination: Destination) -> Any:
    """Request an association; a failure to connect (refused, TLS handshake, unreadable client
    certificate) is Transient: the destination or its files may be fixed while we retry."""
    try:
        return ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                            max_pdu=destination.max_pdu, tls_args=tls_arguments(destination),
                            evt_handlers=EVENT_HANDLERS)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise Transient(f"cannot connect to {destination.host}:{destination.port}: {exc}") from exc


def echo(destination: Destination, calling_ae: str) -> int:
    """C-ECHO a destination; returns the status (raises Transient/Permanent like :func:`store`)."""
    ae = make_ae(calling_ae, destination)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = _associate(ae, destination)
    if not assoc.is_established:
        raise Transient(f"no association with {destination.ae_title}@{destination.host}:{destination.port}")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else -1
    finally:
        assoc.release()


class DeliverHandler:
    kind = JobKind.DELIVER
    in_process = True

    def __init__(self, ledger: Ledger, spool: Spool, queue: JobQueue, destinations: dict[str, Destination],
                 calling_ae: str, audit: Audit) -> None:
        self.ledger = ledger
        self.spool = spool
        self.queue = queue
        self.destinations = destinations
        self.calling_ae = calling_ae
        self.audit = audit

    def prepare(self, job: JobRow) -> DeliveryTask:
        name = job.payload["destination"]
        destination = self.destinations.get(name)
        if destination is None:
            raise Permanent(f"destination {name!r} is no longer configured")
        row = self.ledger.result(int(job.payload["result_id"]))
        if row is None:
            raise Permanent(f"result {job.payload['result_id']} does not exist")
        return DeliveryTask(job.id, row.id, str(self.spool.path(row.path)), name, destination,
                            self.calling_ae, row.sop_instance_uid)

    def run(self, task: DeliveryTask) -> dict[str, Any]:
        status = store(Path(task.path), task.destination, task.calling_ae)
        error = classify(status, task.destination)
        if error is not None:
            raise error
        return {"status": f"0x{status:04X}", "destination": task.destination_name,
                "sop_instance_uid": task.sop_instance_uid}

    def finish(self, job: JobRow, outcome: dict[str, Any]) -> None:
        with self.ledger.transaction() as conn:
            if not self.queue.complete(conn, job, outcome):
                raise Transient("lease lost while finishing")
        self.audit.log("result.delivered", job=job.id, **outcome)

    def on_failed(self, job: JobRow) -> None:
        current = self.ledger.job(job.id)
        if current is not None and current.state == "dead":
            self.audit.log("result.dead", job=job.id, destination=job.payload.get("destination"),
                           reason=current.last_error)

