"""Notify: events from triage findings -> channels (HL7 v2 over MLLP, webhook, DICOM KOS).

A triage result that matters is turned into an **event** in the same ledger transaction as the
results themselves, and each (event, channel) becomes a durable ``notify`` job on the existing
queue: backoff, dead letters and replay work exactly as for deliveries. A re-run (after a crash,
or from the dead letters) re-sends the same event id, never a new one, so a receiver de-duplicates
by MSH-10 or by the CloudEvents id / ``Idempotency-Key``.

Events (:func:`derive_event`, pure):

======================  ============================================================================
``finding.critical``    a triage analyzer's verdict reaches the rule's ``notify_at`` (default urgent:
                        the analyzer says STAT; ``routine``: any finding present)
``finding.updated``     a later epoch of the series (late images) confirms a critical verdict, or
                        turns an earlier ``analysis.failed`` into a result; names the earlier event
``finding.retracted``   a later epoch no longer has the critical finding; names the earlier event
``analysis.failed``     a triage analyzer failed, or the analyze job went dead: silence must never
                        read as "negative"
======================  ============================================================================

Negative results notify nobody. Every event says whether the verdict changed from the previous
epoch (``verdict_changed``, ``previous_verdict``) and which earlier event it revises
(``supersedes``). Event ids are the first 20 hex digits of a SHA-256 of (series UID, epoch,
analyzer, analyzer version, event type): 20 characters is the length of MSH-10 in HL7 v2.5.1.

Channels (``[notify.NAME]``, :mod:`dicomnode.config`):

``hl7``
    ORU^R01 v2.5.1 over MLLP (PyPI ``hl7``'s asyncio MLLP streams, optionally TLS); MSH-10 is the
    event id. ``request_priority`` adds OMI^O23 (ORC-1 ``XO``, TQ1-9 ``S``) for critical findings.
    ACK (original mode, MSA-1): ``AA``/``CA`` delivered; ``AE``/``CE`` dead letter; ``AR``/``CR``,
    no answer within ``timeout_s``, a connection error or a connection closed mid-frame: retried with
    the same MSH-10.
``webhook``
    CloudEvents 1.0 JSON (structured mode) POST with ``Idempotency-Key`` (the event id),
    ``X-Dicomnode-Timestamp`` and ``X-Dicomnode-Signature: sha256=HMAC(secret, timestamp + "." +
    body)``. No patient name, ID, birth date or sex unless ``include_phi``. 2xx delivered; 408, 425,
    429, 5xx, timeouts and connection errors retried (``Retry-After`` honoured, capped at the queue's
    ``backoff_max_s``); any other status (3xx, 4xx) dead letter.
``kos``
    a Key Object Selection "Of Interest" (:func:`dicomnode.results.build_key_object`) flagging the
    slices of the finding and referencing its SR/SEG, C-STOREd to a ``[destinations]`` entry with the
    sender's status classification. Only events with a critical verdict produce one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import enum
import hashlib
import hmac
import http.client
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Connection

from dicomnode.audit import Audit
from dicomnode.config import Config, Hl7Channel, KosChannel, NotifyChannel, WebhookChannel
from dicomnode.domain import Code, JobKind, JobState, Priority
from dicomnode.errors import Permanent, Transient
from dicomnode.jobs import JobQueue
from dicomnode.ledger import JobRow, Ledger
from dicomnode.spool import Spool

LOG = logging.getLogger(__name__)

TEST_EVENT_TYPE = "test"
EVENT_ID_LENGTH = 20  # MSH-10 Message Control ID is ST(20) in HL7 v2.5.1
HL7_VERSION = "2.5.1"
DISCLAIMER = "NOT FOR CLINICAL USE"


class Verdict(enum.StrEnum):
    """What one triage analyzer concluded about one series epoch, judged against ``notify_at``."""

    CRITICAL = "critical"  # reaches notify_at: people are told
    POSITIVE = "positive"  # a finding is present, below notify_at
    NEGATIVE = "negative"  # no finding present
    FAILED = "failed"  # no verdict: the analyzer or its job failed


# --- events (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FindingSummary:
    """One finding of an analyzer, as the analyze job's outcome records it."""

    code: Code | None
    present: bool | None
    probability: float | None
    slices: tuple[str, ...] = ()  # SOP Instance UIDs of the source slices its mask touches

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FindingSummary:
        code = data.get("code")
        meaning = str(data.get("type") or "")
        return cls(
            code=Code(*map(str, code)) if code else (Code("", "", meaning) if meaning else None),
            present=data.get("present"),
            probability=data.get("probability"),
            slices=tuple(data.get("slices") or ()),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"code": [self.code.value, self.code.scheme, self.code.meaning] if self.code else None,
                "present": self.present, "probability": self.probability, "slices": list(self.slices)}


@dataclass(frozen=True)
class AnalyzerReport:
    """What one triage analyzer said about one series epoch (from the analyze job's outcome)."""

    analyzer: str
    version: str
    status: str  # FindingsStatus value
    priority: str | None  # "stat" | "routine" | None
    error: str = ""
    findings: tuple[FindingSummary, ...] = ()
    not_for_clinical_use: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalyzerReport:
        return cls(
            analyzer=str(data["analyzer"]),
            version=str(data.get("version") or "unknown"),
            status=str(data.get("status") or "failed"),
            priority=data.get("priority"),
            error=str(data.get("error") or ""),
            findings=tuple(FindingSummary.from_dict(f) for f in data.get("findings") or ()),
            not_for_clinical_use=bool(data.get("not_for_clinical_use", True)),
        )

    @property
    def main_finding(self) -> FindingSummary | None:
        """The finding a message names: the most probable present one, else the first."""
        present = [f for f in self.findings if f.present]
        if present:
            return max(present, key=lambda f: f.probability if f.probability is not None else -1.0)
        return self.findings[0] if self.findings else None


def verdict_of(report: AnalyzerReport, notify_at: str) -> Verdict:
    """``notify_at="urgent"``: critical when the analyzer's priority is STAT; ``"routine"``: also
    when any finding is present. A failed analysis has no verdict (FAILED)."""
    if report.status == "failed":
        return Verdict.FAILED
    if report.priority == Priority.STAT.name.lower():
        return Verdict.CRITICAL
    if any(f.present for f in report.findings):
        return Verdict.CRITICAL if notify_at == "routine" else Verdict.POSITIVE
    return Verdict.NEGATIVE


def event_id(series_uid: str, epoch: int, analyzer: str, version: str, event_type: str) -> str:
    """Deterministic: the same analysis of the same epoch always gives the same id."""
    text = "\x1f".join(["dicomnode-event", series_uid, str(epoch), analyzer, version, event_type])
    return hashlib.sha256(text.encode()).hexdigest()[:EVENT_ID_LENGTH]


@dataclass(frozen=True)
class PriorEvent:
    """The latest event already told about this series and analyzer."""

    id: str
    type: str
    verdict: Verdict
    epoch: int


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    series_instance_uid: str
    study_instance_uid: str
    epoch: int
    analyzer: str
    version: str
    verdict: Verdict
    previous_verdict: Verdict | None
    verdict_changed: bool | None  # None on a series' first epoch: nothing to compare with
    supersedes: str | None
    created_at: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def critical(self) -> bool:
        return self.verdict is Verdict.CRITICAL


def _event_type(told: Verdict | None, now: Verdict) -> str | None:
    """The event for verdict ``now``, given the verdict of the latest event already sent (``told``)."""
    if now is Verdict.CRITICAL:
        return "finding.updated" if told is Verdict.CRITICAL else "finding.critical"
    if now is Verdict.FAILED:
        return "analysis.failed"
    if told is Verdict.CRITICAL:
        return "finding.retracted"
    if told is Verdict.FAILED:
        return "finding.updated"  # a result after all: whoever heard of the failure hears of it
    return None  # negative or below notify_at, and nobody was told otherwise


def derive_event(
    report: AnalyzerReport,
    *,
    series_uid: str,
    study_uid: str,
    epoch: int,
    notify_at: str,
    previous: Verdict | None,
    last_event: PriorEvent | None,
    created_at: float,
    detail: dict[str, Any] | None = None,
) -> Event | None:
    """The event one triage analyzer's report gives, or None (nothing to tell).

    ``previous`` is the verdict of the series' previous epoch for this analyzer (None on the first
    epoch); ``last_event`` the latest event already created for this series and analyzer. Pure.
    """
    now = verdict_of(report, notify_at)
    kind = _event_type(last_event.verdict if last_event else None, now)
    if kind is None:
        return None
    eid = event_id(series_uid, epoch, report.analyzer, report.version, kind)
    if last_event is not None and last_event.id == eid:
        return None  # the same fact, already told (a dead job's failure, then the re-run failing too)
    main = report.main_finding
    return Event(
        id=eid,
        type=kind,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        epoch=epoch,
        analyzer=report.analyzer,
        version=report.version,
        verdict=now,
        previous_verdict=previous,
        verdict_changed=None if previous is None else previous is not now,
        supersedes=last_event.id if last_event is not None else None,
        created_at=created_at,
        detail={
            "status": report.status,
            "priority": _priority_word(report.priority),
            "error": report.error,
            "finding": main.as_dict() if main else None,
            "findings": [f.as_dict() for f in report.findings],
            "not_for_clinical_use": report.not_for_clinical_use,
            "notify_at": notify_at,
            **(detail or {}),
        },
    )


def _priority_word(priority: str | None) -> str | None:
    """The analyzer's STAT is "urgent" in messages, as in the SR ((103391001, SCT, "Urgent"))."""
    if priority is None:
        return None
    return "urgent" if priority == Priority.STAT.name.lower() else "routine"


def channels_for(event: Event, plan: Sequence[str] | None, channels: dict[str, NotifyChannel]) -> list[str]:
    """The channels that receive ``event``: named by the plan (None: all), still configured, taking
    the event's type; a Key Object only for a critical verdict (it flags the finding's images)."""
    names = sorted(channels) if plan is None else [n for n in plan if n in channels]
    out = []
    for name in names:
        channel = channels[name]
        if event.type not in channel.events:
            continue
        if isinstance(channel, KosChannel) and not event.critical:
            continue
        out.append(name)
    return out


def disclaimer(event: Event) -> str:
    return f"{DISCLAIMER}: produced by {event.analyzer} {event.version}, an unverified algorithm."


def summary_text(event: Event) -> str:
    """One line for people: what was found, how sure, and how it relates to earlier messages."""
    finding = event.detail.get("finding") or {}
    code = finding.get("code") or [None, None, "finding"]
    name = code[2] or "finding"
    probability = finding.get("probability")
    sure = f" (probability {probability:.2f})" if isinstance(probability, (int, float)) else ""
    if event.type == TEST_EVENT_TYPE:
        return "TEST MESSAGE from dicomnode: not a patient result."
    if event.verdict is Verdict.FAILED:
        text = f"Analysis by {event.analyzer} {event.version} failed: {event.detail.get('error') or 'no reason given'}"
    elif event.verdict is Verdict.CRITICAL:
        text = f"{name} present{sure}, priority {event.detail.get('priority') or 'urgent'}"
    elif event.verdict is Verdict.POSITIVE:
        text = f"{name} present{sure}, below the notification threshold"
    else:
        text = f"{name} absent{sure}"
    if event.epoch > 1 or event.supersedes:
        if event.verdict_changed is None:
            change = "revised result"
        elif event.verdict_changed:
            change = f"verdict changed from {event.previous_verdict} to {event.verdict}"
        else:
            change = "verdict unchanged"
        text += f". Revised after late images (epoch {event.epoch}): {change}"
        if event.supersedes:
            text += f"; replaces message {event.supersedes}"
    return text + "."


# --- what the DICOM header says (read from the spool when sending) -------------------------------


@dataclass(frozen=True)
class Subject:
    """Patient and order identifiers of the series, from its first source image. Only HL7 and a
    webhook with ``include_phi`` carry the patient's identity; the ledger never stores it."""

    accession_number: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: tuple[str, ...] = ()  # DICOM PN components: family, given, middle, prefix, suffix
    birth_date: str = ""
    sex: str = ""
    study_date: str = ""
    study_time: str = ""
    modality: str = ""
    study_description: str = ""
    placer_order: str = ""
    requested_procedure_id: str = ""
    scheduled_step_id: str = ""

    @classmethod
    def from_header(cls, ds: Any) -> Subject:
        name = ds.get("PatientName")
        components: tuple[str, ...] = ()
        if name:
            components = (name.family_name, name.given_name, name.middle_name, name.name_prefix,
                          name.name_suffix)
        request = ds.get("RequestAttributesSequence") or []
        first = request[0] if len(request) else None

        def text(keyword: str, source: Any = ds) -> str:
            value = source.get(keyword) if source is not None else None
            return str(value).strip() if value not in (None, "") else ""

        return cls(
            accession_number=text("AccessionNumber"),
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=tuple(str(c) for c in components),
            birth_date=text("PatientBirthDate"),
            sex=text("PatientSex"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime").split(".")[0],
            modality=text("Modality"),
            study_description=text("StudyDescription"),
            placer_order=text("PlacerOrderNumberImagingServiceRequest"),
            requested_procedure_id=text("RequestedProcedureID", first),
            scheduled_step_id=text("ScheduledProcedureStepID", first),
        )


TEST_SUBJECT = Subject(accession_number="DNTEST", patient_id="DICOMNODE-TEST", patient_name=("TEST", "DICOMNODE"),
                       modality="OT", study_description="dicomnode test message")


# --- HL7 v2.5.1 (pure) -------------------------------------------------------------------------------

# HL7 v2 encoding characters (MSH-1, MSH-2) and their escapes (HL7 v2.5.1 2.7.4).
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
# OBR-4 Universal Service Identifier by modality: the LOINC codes of the SR's Procedure Reported.
_SERVICE = {
    "CT": ("25045-6", "CT unspecified body region"),
    "MR": ("25056-3", "MRI unspecified body region"),
    "PT": ("44136-0", "PET unspecified body region"),
    "NM": ("49118-3", "NM unspecified body region"),
    "CR": ("43468-8", "XR unspecified body region"),
    "DX": ("43468-8", "XR unspecified body region"),
}
_PRESENT = ("52101004", "Present", "SCT")  # CID 240, as in the SR
_ABSENT = ("272519000", "Absent", "SCT")
_FINDING = ("121071", "Finding", "DCM")
_PROBABILITY = ("122157", "Probability", "DCM")


def hl7_text(value: object, limit: int | None = None) -> str:
    """A value with the delimiters escaped and line breaks as ``\\.br\\`` (HL7 v2.5.1 2.7.4-2.7.6)."""
    text = str(value if value is not None else "")
    if limit is not None:
        text = text[:limit]
    text = "".join(_ESCAPES.get(c, c) for c in text)
    text = text.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")
    return "".join(c for c in text if c == "\t" or ord(c) >= 0x20)


def _components(*values: object) -> str:
    return "^".join(hl7_text(v) for v in values).rstrip("^")


def _segment(name: str, *fields: str) -> str:
    return "|".join([name, *fields]).rstrip("|")


def hl7_timestamp(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def related_id(eid: str, purpose: str) -> str:
    """A second message about one event (OMI^O23) needs its own MSH-10, derived from the event id."""
    return hashlib.sha256(f"{eid}:{purpose}".encode()).hexdigest()[:EVENT_ID_LENGTH]


@dataclass(frozen=True)
class Hl7Message:
    control_id: str  # MSH-10
    type: str  # e.g. "ORU^R01"
    text: str  # segments separated by CR


def _msh(channel: Hl7Channel, sender: str, when: float, message_type: str, control_id: str, test: bool) -> str:
    return _segment(
        "MSH", "^~\\&", hl7_text(channel.sending_application or sender), hl7_text(channel.sending_facility),
        hl7_text(channel.receiving_application), hl7_text(channel.receiving_facility), hl7_timestamp(when), "",
        message_type, control_id, "T" if test else "P", HL7_VERSION, "", "", "", "", "", "UNICODE UTF-8")


def _pid(subject: Subject) -> str:
    family, given, middle, prefix, suffix = (*subject.patient_name, "", "", "", "", "")[:5]
    identifier = _components(subject.patient_id, "", "", subject.issuer_of_patient_id)
    sex = subject.sex if subject.sex in ("M", "F", "O") else ("U" if subject.sex else "")
    return _segment("PID", "1", "", identifier, "", _components(family, given, middle, suffix, prefix), "",
                    hl7_text(subject.birth_date[:8]), sex)


def _obr(subject: Subject, event: Event, status: str) -> str:
    code, meaning = _SERVICE.get(subject.modality.upper(), ("", subject.study_description or "Imaging study"))
    service = _components(code, meaning, "LN") if code else _components("", meaning)
    observed = (subject.study_date + subject.study_time)[:14]
    fields = [""] * 25
    fields[0] = "1"
    fields[1] = hl7_text(subject.placer_order)
    fields[2] = hl7_text(subject.accession_number)  # OBR-3 filler order number: the accession
    fields[3] = service
    fields[6] = hl7_text(observed)
    fields[21] = hl7_timestamp(event.created_at)  # OBR-22 results report/status change
    fields[23] = "RAD"  # OBR-24 diagnostic service section (HL7 table 0074)
    fields[24] = status  # OBR-25 result status (HL7 table 0123)
    return _segment("OBR", *fields)


def _obx(set_id: int, value_type: str, identifier: str, value: str, *, sub_id: str = "", units: str = "",
         ranges: str = "", flags: str = "", status: str = "P", when: float | None = None,
         method: str = "") -> str:
    fields = [""] * 17
    fields[0] = str(set_id)
    fields[1] = value_type
    fields[2] = identifier
    fields[3] = sub_id
    fields[4] = value
    fields[5] = units
    fields[6] = ranges
    fields[7] = flags  # OBX-8 abnormal flags (HL7 table 0078): AA = critically abnormal
    fields[10] = status  # OBX-11 observation result status (HL7 table 0085)
    if when is not None:
        fields[13] = hl7_timestamp(when)
    fields[16] = method  # OBX-17 observation method: the algorithm
    return _segment("OBX", *fields)


def oru_r01(event: Event, subject: Subject, channel: Hl7Channel, sender: str) -> Hl7Message:
    """ORU^R01 (HL7 v2.5.1 7.3.1): one observation group per event.

    OBR-3 = Accession Number; OBR-25 = ``P`` (preliminary: an unverified algorithm) for a new
    event, ``C`` (correction) for one that revises an earlier message. OBX 1 (CWE): the finding
    code as in the SR, valued Present/Absent (CID 240), OBX-8 ``AA`` when critical; OBX 2 (NM):
    the probability (122157, DCM), unit ``1`` (UCUM); a failed analysis is an ST OBX with
    OBX-11 ``X`` (results cannot be obtained). NTE: the summary and the NOT FOR CLINICAL USE
    disclaimer.
    """
    test = event.type == TEST_EVENT_TYPE
    revision = event.type in ("finding.updated", "finding.retracted")
    status = "C" if revision else "P"
    method = _components("", f"{event.analyzer} {event.version}")
    segments = [_msh(channel, sender, event.created_at, "ORU^R01^ORU_R01", event.id, test), _pid(subject),
                _obr(subject, event, status)]
    finding = event.detail.get("finding") or {}
    code = finding.get("code")
    if test:
        segments.append(_obx(1, "ST", _components(*_FINDING), hl7_text("dicomnode test message"),
                             status="P", when=event.created_at))
    elif event.verdict is Verdict.FAILED:
        error = event.detail.get("error") or "no reason given"
        segments.append(_obx(1, "ST", _components(*_FINDING), hl7_text(f"Analysis failed: {error}", 1000),
                             status="X", when=event.created_at, method=method))
    else:
        identifier = _components(code[0], code[2], code[1]) if code and code[0] else _components(*_FINDING)
        present = finding.get("present")
        value = _components(*_PRESENT) if present else _components(*_ABSENT)
        flags = "AA" if event.critical else ("A" if present else "N")
        segments.append(_obx(1, "CWE", identifier, value, sub_id="1", flags=flags, status=status,
                             when=event.created_at, method=method))
        probability = finding.get("probability")
        if isinstance(probability, (int, float)):
            segments.append(_obx(2, "NM", _components(*_PROBABILITY), f"{probability:.4f}".rstrip("0").rstrip("."),
                                 sub_id="1", units=_components("1", "no units", "UCUM"), ranges="0-1",
                                 status=status, when=event.created_at, method=method))
    notes = [summary_text(event)]
    if event.detail.get("not_for_clinical_use", True) or test:
        notes.append(disclaimer(event) if not test else f"{DISCLAIMER}: test message.")
    segments.extend(_segment("NTE", str(i), "L", hl7_text(n, 65536)) for i, n in enumerate(notes, start=1))
    return Hl7Message(event.id, "ORU^R01", "\r".join(segments) + "\r")  # every segment ends with CR


def omi_o23(event: Event, subject: Subject, channel: Hl7Channel, sender: str) -> Hl7Message:
    """OMI^O23 (HL7 v2.5.1 4.4.10) asking the RIS to raise the order's priority: ORC-1 ``XO``
    (change order request), TQ1-9 ``S`` (stat), IPC with accession, requested procedure, Study
    Instance UID and scheduled step from the header's Request Attributes where present."""
    control = related_id(event.id, "omi")
    orc = [""] * 9
    orc[0] = "XO"
    orc[1] = hl7_text(subject.placer_order)
    orc[2] = hl7_text(subject.accession_number)
    orc[8] = hl7_timestamp(event.created_at)  # ORC-9 date/time of transaction
    tq1 = [""] * 9
    tq1[0] = "1"
    tq1[8] = "S"  # TQ1-9 priority (HL7 table 0485): stat
    obr = _obr(subject, event, "").split("|")[:5]
    ipc = [hl7_text(subject.accession_number), hl7_text(subject.requested_procedure_id or subject.accession_number),
           hl7_text(event.study_instance_uid), hl7_text(subject.scheduled_step_id or subject.accession_number),
           hl7_text(subject.modality)]
    segments = [
        _msh(channel, sender, event.created_at, "OMI^O23^OMI_O23", control, event.type == TEST_EVENT_TYPE),
        _pid(subject), _segment("ORC", *orc), _segment("TQ1", *tq1), "|".join(obr),
        _segment("NTE", "1", "L", hl7_text(f"Priority raise requested: {summary_text(event)} {disclaimer(event)}")),
        _segment("IPC", *ipc),
    ]
    return Hl7Message(control, "OMI^O23", "\r".join(segments) + "\r")


def hl7_messages(event: Event, subject: Subject, channel: Hl7Channel, sender: str) -> list[Hl7Message]:
    messages = [oru_r01(event, subject, channel, sender)]
    if channel.request_priority and event.type == "finding.critical":
        messages.append(omi_o23(event, subject, channel, sender))
    return messages


# --- MLLP transport ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2: the MSH-10 it answers
    text: str = ""  # MSA-3 or ERR, for the operator


def parse_ack(block: bytes) -> Ack:
    """An HL7 ACK from one MLLP block; raises Transient when it is not one."""
    import hl7

    try:
        message = hl7.parse(block.decode("utf-8", errors="replace"))
        msa = message.segment("MSA")
    except Exception as exc:
        raise Transient(f"the answer is not an HL7 ACK: {exc}") from exc
    text = str(msa(3)) if len(msa) > 3 else ""
    with contextlib.suppress(KeyError, IndexError):
        text = text or str(message.segment("ERR")(8) or message.segment("ERR"))
    return Ack(code=str(msa(1)).strip(), control_id=str(msa(2)).strip() if len(msa) > 2 else "", text=text)


def classify_ack(ack: Ack, control_id: str) -> Exception | None:
    """None when delivered; the Transient or Permanent error otherwise (original and enhanced mode)."""
    if ack.control_id != control_id:
        return Transient(f"ACK answers message {ack.control_id!r}, not {control_id!r}")
    detail = f" ({ack.text})" if ack.text else ""
    if ack.code in ("AA", "CA"):
        return None
    if ack.code in ("AR", "CR"):
        return Transient(f"HL7 {ack.code}: message rejected by the receiver, will be re-sent{detail}")
    if ack.code in ("AE", "CE"):
        return Permanent(f"HL7 {ack.code}: the receiver reports an application error{detail}")
    return Permanent(f"HL7 ACK with unknown MSA-1 {ack.code!r}{detail}")


def _client_tls(channel: Hl7Channel) -> ssl.SSLContext | None:
    if not channel.tls:
        return None
    context = ssl.create_default_context(cafile=str(channel.ca_certificates) if channel.ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if channel.certificate is not None and channel.private_key is not None:
        context.load_cert_chain(str(channel.certificate), str(channel.private_key))
    return context


@dataclass(frozen=True)
class Exchange:
    """One channel attempt: when the message left and when it was acknowledged, and the answer."""

    sent_at: float
    acked_at: float
    response: str
    message_ids: tuple[str, ...] = ()


def mllp_send(channel: Hl7Channel, messages: Sequence[Hl7Message]) -> Exchange:
    """Send ``messages`` in order over one MLLP connection, each waiting for its ACK.

    Raises Transient (connection refused, TLS failure, no ACK within ``timeout_s``, connection
    closed mid-frame, AR) or Permanent (AE) for the first message that is not accepted.
    """
    return asyncio.run(_mllp_exchange(channel, messages))


async def _mllp_exchange(channel: Hl7Channel, messages: Sequence[Hl7Message]) -> Exchange:
    from hl7.mllp import InvalidBlockError, open_hl7_connection

    timeout = channel.timeout_s
    where = f"{channel.host}:{channel.port}"
    tls = _client_tls(channel)
    try:
        reader, writer = await asyncio.wait_for(
            open_hl7_connection(channel.host, channel.port, encoding="utf-8", ssl=tls,
                                server_hostname=channel.host if tls else None), timeout)
    except TimeoutError as exc:
        raise Transient(f"MLLP connect to {where}: no answer within {timeout:g} s") from exc
    except (OSError, ssl.SSLError) as exc:
        raise Transient(f"MLLP connect to {where}: {exc}") from exc
    sent_at = acked_at = 0.0
    answers: list[str] = []
    try:
        for message in messages:
            writer.writeblock(message.text.encode("utf-8"))
            if not sent_at:
                sent_at = time.time()
            try:
                await asyncio.wait_for(writer.drain(), timeout)
                block = await asyncio.wait_for(reader.readblock(), timeout)
            except TimeoutError as exc:
                raise Transient(f"no ACK for {message.type} {message.control_id} from {where} within "
                                f"{timeout:g} s") from exc
            except asyncio.IncompleteReadError as exc:
                raise Transient(f"{where} closed the connection before a complete ACK for "
                                f"{message.control_id} ({len(exc.partial)} bytes of a frame)") from exc
            except (InvalidBlockError, ValueError) as exc:
                raise Transient(f"{where} answered with an invalid MLLP frame: {exc}") from exc
            except OSError as exc:
                raise Transient(f"MLLP exchange with {where}: {exc}") from exc
            ack = parse_ack(block)
            error = classify_ack(ack, message.control_id)
            if error is not None:
                raise error
            acked_at = time.time()
            answers.append(f"{message.type} {message.control_id}: {ack.code}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), timeout)
    return Exchange(sent_at, acked_at, "; ".join(answers), tuple(m.control_id for m in messages))


# --- webhook (CloudEvents) -----------------------------------------------------------------------


def _iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloudevent(event: Event, subject: Subject, channel: WebhookChannel, source: str) -> bytes:
    """The CloudEvents 1.0 JSON (structured content mode) body; the same bytes on every attempt."""
    data: dict[str, Any] = {
        "study_instance_uid": event.study_instance_uid,
        "series_instance_uid": event.series_instance_uid,
        "epoch": event.epoch,
        "analyzer": event.analyzer,
        "analyzer_version": event.version,
        "verdict": str(event.verdict),
        "previous_verdict": str(event.previous_verdict) if event.previous_verdict else None,
        "verdict_changed": event.verdict_changed,
        "supersedes": event.supersedes,
        "finding": _finding_json(event.detail.get("finding")),
        "priority": event.detail.get("priority"),
        "accession_number": subject.accession_number,
        "results": event.detail.get("results", []),
        "summary": summary_text(event),
        "disclaimer": disclaimer(event) if event.detail.get("not_for_clinical_use", True) else None,
        "test": event.type == TEST_EVENT_TYPE,
    }
    if event.verdict is Verdict.FAILED:
        data["error"] = event.detail.get("error") or ""
    if channel.include_phi:
        data["patient"] = {"id": subject.patient_id, "issuer": subject.issuer_of_patient_id,
                           "name": "^".join(subject.patient_name).rstrip("^"), "birth_date": subject.birth_date,
                           "sex": subject.sex}
    envelope = {
        "specversion": "1.0",
        "id": event.id,
        "type": f"dicomnode.{event.type}",
        "source": source,
        "time": _iso(event.created_at),
        "subject": event.study_instance_uid,
        "datacontenttype": "application/json",
        "data": data,
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _finding_json(finding: dict[str, Any] | None) -> dict[str, Any] | None:
    if not finding:
        return None
    code = finding.get("code")
    return {
        "code": {"value": code[0], "scheme": code[1], "meaning": code[2]} if code else None,
        "present": finding.get("present"),
        "probability": finding.get("probability"),
    }


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=`` + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 10.2.3): delay-seconds or an HTTP-date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_RETRIED_HTTP = {408, 425, 429}


def classify_http(status: int, retry_after: float | None, max_defer_s: float) -> Exception | None:
    """None when delivered (2xx); Transient for 408/425/429/5xx (``Retry-After`` as the defer hint,
    capped); Permanent for anything else (3xx are not followed: configure the final URL)."""
    if 200 <= status < 300:
        return None
    if status in _RETRIED_HTTP or 500 <= status < 600:
        defer = min(retry_after, max_defer_s) if retry_after is not None else None
        hint = f", Retry-After {retry_after:g} s" if retry_after is not None else ""
        return Transient(f"webhook answered HTTP {status}{hint}", defer=defer)
    return Permanent(f"webhook answered HTTP {status}: not retried")


def post_webhook(channel: WebhookChannel, body: bytes, eid: str, max_defer_s: float) -> Exchange:
    """POST one CloudEvent; raises Transient/Permanent like :func:`classify_http`."""
    parts = urlsplit(channel.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    port = parts.port
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(
            cafile=str(channel.ca_certificates) if channel.ca_certificates else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        connection = http.client.HTTPSConnection(parts.hostname or "", port, timeout=channel.timeout_s,
                                                 context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname or "", port, timeout=channel.timeout_s)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/cloudevents+json; charset=utf-8",
        "Idempotency-Key": eid,
        "X-Dicomnode-Timestamp": timestamp,
        "X-Dicomnode-Signature": signature(channel.secret, timestamp, body),
        "User-Agent": "dicomnode",
    }
    try:
        sent_at = time.time()
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        acked_at = time.time()
        response.read(65536)
        status = response.status
        retry_after = retry_after_s(response.getheader("Retry-After"))
    except TimeoutError as exc:
        raise Transient(f"webhook {parts.hostname}: no answer within {channel.timeout_s:g} s") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(f"webhook {parts.hostname}: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
    error = classify_http(status, retry_after, max_defer_s)
    if error is not None:
        raise error
    return Exchange(sent_at, acked_at, f"HTTP {status}", (eid,))


# --- the notify job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """A source image as the ledger knows it: enough to reference it from a Key Object."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class NotifyTask:
    job_id: int
    event: Event
    channel_name: str
    channel: NotifyChannel
    header_paths: tuple[str, ...]  # the epoch's source images, absolute: the first readable gives the header
    images: tuple[ImageRef, ...]  # the flagged source images (KOS)


class NotifyHandler:
    """Runs ``notify`` jobs in the node process (I/O-bound, like deliveries)."""

    kind = JobKind.NOTIFY
    in_process = True

    def __init__(self, ledger: Ledger, spool: Spool, queue: JobQueue, config: Config, audit: Audit) -> None:
        self.ledger = ledger
        self.spool = spool
        self.queue = queue
        self.config = config
        self.audit = audit

    @property
    def sender(self) -> str:
        return self.config.node.ae_title

    @property
    def source(self) -> str:
        return f"dicomnode://{self.config.node.ae_title}"

    def prepare(self, job: JobRow) -> NotifyTask:
        name = str(job.payload["channel"])
        channel = self.config.notify.get(name)
        if channel is None:
            raise Permanent(f"notify channel {name!r} is no longer configured")
        row = self.ledger.event(str(job.payload["event_id"]))
        if row is None:
            raise Permanent(f"event {job.payload['event_id']} does not exist")
        event = event_from_row(row)
        instances = self.ledger.instance_rows(event.series_instance_uid, max_epoch=event.epoch)
        if not instances:
            raise Permanent(f"series {event.series_instance_uid} has no instances in the ledger")
        flagged = set((event.detail.get("finding") or {}).get("slices") or ())
        images = tuple(ImageRef(r.sop_class_uid, r.sop_instance_uid, r.series_instance_uid, r.study_instance_uid)
                       for r in instances if r.sop_instance_uid in flagged)
        return NotifyTask(job.id, event, name, channel, tuple(str(self.spool.path(r.path)) for r in instances),
                          images)

    def run(self, task: NotifyTask) -> dict[str, Any]:
        exchange = send(task.event, task.channel, header=read_header([Path(p) for p in task.header_paths]),
                        images=task.images, sender=self.sender, source=self.source, spool=self.spool,
                        config=self.config)
        return {"channel": task.channel_name, "kind": task.channel.kind, "event_id": task.event.id,
                "type": task.event.type, "sent_at": exchange.sent_at, "acked_at": exchange.acked_at,
                "response": exchange.response, "message_ids": list(exchange.message_ids)}

    def finish(self, job: JobRow, outcome: dict[str, Any]) -> None:
        with self.ledger.transaction() as conn:
            # Sent and acknowledged were read on this host's clock; the event's other times (last
            # image, result built) are the ledger's: convert, so the differences mean something
            # when the receiver, the worker and this process run on different hosts.
            offset = self.ledger.clock_offset(conn)
            outcome = {**outcome, "sent_at": outcome["sent_at"] + offset, "acked_at": outcome["acked_at"] + offset}
            self.ledger.notification_done(conn, outcome["event_id"], outcome["channel"], job_id=job.id,
                                          sent_at=outcome["sent_at"], acked_at=outcome["acked_at"],
                                          response=outcome["response"], message_ids=outcome["message_ids"])
            if not self.queue.complete(conn, job, outcome):
                raise Transient("lease lost while finishing")
        row = self.ledger.event(outcome["event_id"])
        seconds = None
        if row is not None and row.last_image_at is not None:
            seconds = round(max(0.0, outcome["acked_at"] - row.last_image_at), 3)
        self.audit.log("notify.delivered", job=job.id, event_id=outcome["event_id"], type=outcome["type"],
                       channel=outcome["channel"], kind=outcome["kind"], response=outcome["response"],
                       attempts=job.attempts, seconds=seconds)

    def on_failed(self, job: JobRow) -> None:
        current = self.ledger.job(job.id)
        if current is not None and current.state == JobState.DEAD:
            self.audit.log("notify.dead", job=job.id, event_id=job.payload.get("event_id"),
                           channel=job.payload.get("channel"), reason=current.last_error)


def send(event: Event, channel: NotifyChannel, *, header: Any, images: Sequence[ImageRef], sender: str,
         source: str, spool: Spool | None, config: Config, subject: Subject | None = None) -> Exchange:
    """One attempt of ``event`` on ``channel``. ``header`` is a source image's dataset (None when none
    could be read: the message then goes without patient and order identifiers rather than not at
    all). Raises Transient or Permanent."""
    if subject is None:
        subject = Subject.from_header(header) if header is not None else Subject()
    if isinstance(channel, Hl7Channel):
        return mllp_send(channel, hl7_messages(event, subject, channel, sender))
    if isinstance(channel, WebhookChannel):
        body = cloudevent(event, subject, channel, channel.source or source)
        return post_webhook(channel, body, event.id, config.jobs.backoff_max_s)
    return send_key_object(event, channel, header=header, images=images, sender=sender, spool=spool,
                           config=config)


def read_header(paths: Sequence[Path], tries: int = 10) -> Any:
    """The header of the first of ``paths`` that can be read (a file may have gone since the
    analysis, as when an analyze job died of it); None when none of the first ``tries`` can."""
    import pydicom

    for path in paths[:tries]:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            LOG.warning("source header %s unreadable for a notification: %s", path.name, exc)
    return None


def send_key_object(event: Event, channel: KosChannel, *, header: Any, images: Sequence[ImageRef], sender: str,
                    spool: Spool | None, config: Config) -> Exchange:
    """Build the event's Key Object (deterministic: same UIDs and bytes on every attempt), keep it in
    the spool's results area, and C-STORE it to the channel's destination."""
    from pydicom.dataset import Dataset

    from dicomnode import results
    from dicomnode import sender as storage
    from dicomnode.domain import ResultObject

    destination = config.destinations.get(channel.destination)
    if destination is None:
        raise Permanent(f"destination {channel.destination!r} is no longer configured")
    if header is None:
        raise Transient("no source image of the series can be read for the patient and study modules")
    if spool is None:
        raise Permanent("a Key Object is kept in the spool before it is sent; no spool given")
    references = []
    for image in images:
        ref = Dataset()
        ref.SOPClassUID, ref.SOPInstanceUID = image.sop_class_uid, image.sop_instance_uid
        ref.SeriesInstanceUID, ref.StudyInstanceUID = image.series_instance_uid, image.study_instance_uid
        references.append(ref)
    documents = [ResultObject(analyzer=event.analyzer, version=event.version, kind=r["kind"],
                              sop_class_uid=r["sop_class_uid"], sop_instance_uid=r["sop_instance_uid"],
                              series_instance_uid=r["series_instance_uid"],
                              study_instance_uid=event.study_instance_uid, transfer_syntax_uid="", data=b"")
                 for r in event.detail.get("results", []) if r.get("kind") in ("sr", "seg")]
    description = f"{summary_text(event)} {disclaimer(event) if event.detail.get('not_for_clinical_use', True) else ''}"
    try:
        kos = results.build_key_object(
            header, references, documents, analyzer=event.analyzer, version=event.version, epoch=event.epoch,
            description=description.strip(), not_for_clinical_use=bool(event.detail.get("not_for_clinical_use", True)),
            created=dt.datetime.fromtimestamp(event.created_at), uid_prefix=config.results.uid_root)
    except ValueError as exc:
        raise Permanent(f"cannot build the Key Object: {exc}") from exc
    relative = spool.instance_path(kos.study_instance_uid, kos.series_instance_uid, kos.sop_instance_uid,
                                   area="results")
    spool.write(relative, kos.data)  # False on a retry: same UID, the first copy is kept
    sent_at = time.time()
    status = storage.store(spool.path(relative), destination, sender)
    error = storage.classify(status, destination)
    if error is not None:
        raise error
    return Exchange(sent_at, time.time(), f"C-STORE 0x{status:04X} {kos.sop_instance_uid}", (kos.sop_instance_uid,))


def send_test(name: str, config: Config, *, now: float | None = None) -> tuple[Event, Exchange | str]:
    """``dicomnode notify test NAME``: a clearly marked test event (HL7 MSH-11 ``T``, CloudEvents type
    ``dicomnode.test``, a test patient); for a KOS channel a C-ECHO of its destination, since a Key
    Object needs a real study. Returns the event and the exchange, or raises Transient/Permanent."""
    from dicomnode import sender as storage

    channel = config.notify[name]
    created = time.time() if now is None else now
    eid = hashlib.sha256(f"dicomnode-test\x1f{name}\x1f{created}".encode()).hexdigest()[:EVENT_ID_LENGTH]
    event = Event(id=eid, type=TEST_EVENT_TYPE, series_instance_uid="", study_instance_uid="", epoch=0,
                  analyzer="dicomnode", version="test", verdict=Verdict.NEGATIVE, previous_verdict=None,
                  verdict_changed=None, supersedes=None, created_at=created,
                  detail={"not_for_clinical_use": True, "test": True})
    if isinstance(channel, KosChannel):
        destination = config.destinations[channel.destination]
        status = storage.echo(destination, config.node.ae_title)
        if status != 0:
            raise Transient(f"C-ECHO of {channel.destination} answered 0x{status:04X}")
        return event, f"C-ECHO {channel.destination}: 0x0000 (a Key Object needs a real study; none sent)"
    exchange = send(event, channel, header=None, images=(), sender=config.node.ae_title,
                    source=f"dicomnode://{config.node.ae_title}", spool=None, config=config, subject=TEST_SUBJECT)
    return event, exchange


# --- events in the ledger ------------------------------------------------------------------------


def event_from_row(row: Any) -> Event:
    return Event(
        id=row.id, type=row.type, series_instance_uid=row.series_instance_uid,
        study_instance_uid=row.study_instance_uid, epoch=row.epoch, analyzer=row.analyzer, version=row.version,
        verdict=Verdict(row.verdict), previous_verdict=Verdict(row.previous_verdict) if row.previous_verdict else None,
        verdict_changed=row.verdict_changed, supersedes=row.supersedes, created_at=row.created_at,
        detail=json.loads(row.payload or "{}"),
    )


def report_from_summary(analyzer: str, version: str, summary: dict[str, Any]) -> AnalyzerReport:
    """The report an earlier epoch's result row records (``results.summary``)."""
    return AnalyzerReport.from_dict({"analyzer": analyzer, "version": version, **summary})


class Notifier:
    """Creates events and their notify jobs in the ledger; the analyze handler calls it inside the
    transaction that records the results."""

    def __init__(self, ledger: Ledger, queue: JobQueue, channels: dict[str, NotifyChannel],
                 analyzer_info: Callable[[str], tuple[str, str] | None]) -> None:
        self.ledger = ledger
        self.queue = queue
        self.channels = channels
        # name -> (kind, version) from the registry; None when unknown
        self.analyzer_info = analyzer_info

    def record_analysis(self, conn: Connection, job: JobRow, reports: Sequence[AnalyzerReport],
                        results: Sequence[dict[str, Any]], built_at: float) -> list[Event]:
        """Events for the triage analyzers of a finished analyze job (``reports``: only triage)."""
        created: list[Event] = []
        for report in reports:
            mine = [r for r in results if r.get("analyzer") == report.analyzer]
            event = self._record(conn, job, report, {"results": [{k: v for k, v in r.items() if k != "analyzer"}
                                                                  for r in mine]}, built_at)
            if event is not None:
                created.append(event)
        return created

    def record_dead_analysis(self, conn: Connection, job: JobRow) -> list[Event]:
        """An analyze job went dead: ``analysis.failed`` for each triage analyzer it was to run."""
        created: list[Event] = []
        for name in job.payload.get("analyzers", []):
            info = self.analyzer_info(str(name))
            if info is None or info[0] != "triage":
                continue
            report = AnalyzerReport(analyzer=str(name), version=info[1], status="failed",
                                    priority=None, error=f"analysis job {job.id} failed: {job.last_error}")
            event = self._record(conn, job, report, {"results": [], "job_dead": True}, None)
            if event is not None:
                created.append(event)
        return created

    def _record(self, conn: Connection, job: JobRow, report: AnalyzerReport, detail: dict[str, Any],
                built_at: float | None) -> Event | None:
        uid, epoch = job.series_instance_uid, job.epoch
        notify_at = str(job.payload.get("notify_at") or "urgent")
        previous_summary = self.ledger.previous_summary(conn, uid, report.analyzer, epoch)
        previous = None
        if previous_summary is not None:
            previous = verdict_of(report_from_summary(report.analyzer, report.version, previous_summary), notify_at)
        row = self.ledger.last_event(conn, uid, report.analyzer, epoch)
        last = PriorEvent(row.id, row.type, Verdict(row.verdict), row.epoch) if row is not None else None
        study_uid = self.ledger.study_of(conn, uid)
        detail = {**detail, "rule": job.payload.get("rule", "")}
        event = derive_event(report, series_uid=uid, study_uid=study_uid, epoch=epoch, notify_at=notify_at,
                             previous=previous, last_event=last, created_at=self.ledger.now(conn), detail=detail)
        if event is None:
            return None
        last_image_at = self.ledger.epoch_last_received(conn, uid, epoch)
        if not self.ledger.add_event(
            conn, id=event.id, type=event.type, series_instance_uid=uid, study_instance_uid=study_uid, epoch=epoch,
            analyzer=event.analyzer, version=event.version, verdict=str(event.verdict),
            previous_verdict=str(event.previous_verdict) if event.previous_verdict else None,
            verdict_changed=event.verdict_changed, supersedes=event.supersedes,
            payload=json.dumps(event.detail, sort_keys=True, default=str), created_at=event.created_at,
            last_image_at=last_image_at, series_complete_at=job.created_at, result_built_at=built_at,
        ):
            return None
        plan = job.payload.get("notify")
        for name in channels_for(event, None if plan is None else list(plan), self.channels):
            channel = self.channels[name]
            job_id = self.queue.enqueue(
                conn, JobKind.NOTIFY, series_uid=uid, epoch=epoch,
                payload={"event_id": event.id, "channel": name},
                priority=Priority.STAT if event.critical or event.type == "finding.retracted" else Priority.ROUTINE,
                dedup_key=f"notify:{event.id}:{name}",
            )
            self.ledger.add_notification(conn, event.id, name, kind=channel.kind, job_id=job_id)
        return event

    def announce(self, events: Sequence[Event]) -> None:
        """After the transaction that created ``events`` committed: audit them, wake the executor."""
        for event in events:
            self.queue.audit.log("event.created", event_id=event.id, type=event.type,
                                 series_instance_uid=event.series_instance_uid, epoch=event.epoch,
                                 analyzer=event.analyzer, verdict=str(event.verdict),
                                 verdict_changed=event.verdict_changed, supersedes=event.supersedes)
        if events:
            self.queue.on_enqueued()

    def reconcile(self) -> int:
        """At start-up: dead analyze jobs whose failure was never turned into events (the node died
        between the job's end and ``on_failed``). Returns how many events were created."""
        made: list[Event] = []
        for job in self.ledger.list_jobs(kind=JobKind.ANALYZE, states=[JobState.DEAD], limit=1000):
            with self.ledger.transaction() as conn:
                created = self.record_dead_analysis(conn, job)
            self.announce(created)
            made.extend(created)
        return len(made)


def event_views(ledger: Ledger, limit: int = 50, series_uid: str | None = None) -> list[dict[str, Any]]:
    """Events (newest first) with their notifications per channel and the time from the last image
    to each acknowledgement: what the console and ``dicomnode notify`` show."""
    rows = ledger.list_events(limit=limit, series_uid=series_uid)
    last_image = {r.id: r.last_image_at for r in rows}
    sent: dict[str, list[dict[str, Any]]] = {}
    for n in ledger.notifications_of([r.id for r in rows]):
        start = last_image.get(n.event_id)
        took = n.acked_at - start if n.acked_at is not None and start is not None else None
        sent.setdefault(n.event_id, []).append({
            "channel": n.channel, "kind": n.kind, "job_id": n.job_id, "state": n.state, "attempts": n.attempts,
            "sent_at": n.sent_at, "acked_at": n.acked_at, "response": n.response, "last_error": n.last_error or "",
            "time_to_notification_s": round(max(0.0, took), 3) if took is not None else None,
        })
    return [{
        "id": r.id, "type": r.type, "series_instance_uid": r.series_instance_uid, "epoch": r.epoch,
        "analyzer": r.analyzer, "version": r.version, "verdict": r.verdict, "previous_verdict": r.previous_verdict,
        "verdict_changed": r.verdict_changed, "supersedes": r.supersedes, "created_at": r.created_at,
        "last_image_at": r.last_image_at, "series_complete_at": r.series_complete_at,
        "result_built_at": r.result_built_at, "notifications": sent.get(r.id, []),
    } for r in rows]


def reports_from_outcome(analyzers: Sequence[Any]) -> list[AnalyzerReport]:
    """Triage analyzers' reports from an analyze job's ``AnalyzerOutcome`` list."""
    out = []
    for o in analyzers:
        data = o if isinstance(o, dict) else dict(o.__dict__)
        if data.get("kind") != "triage":
            continue
        out.append(AnalyzerReport.from_dict(data))
    return out

