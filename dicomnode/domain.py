"""The nouns passed between stages.

Stages exchange these frozen dataclasses and string enums, never raw dicts. Anything here is plain
data: no I/O, no database handles, no sockets. ``numpy`` arrays appear only in :class:`Volume` and
:class:`Mask`, which are produced by ``imaging`` and the analyzers and consumed by ``results``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from pydicom.dataset import Dataset

# Ledger ids (jobs, results) are SQL BIGINT (SQLite INTEGER, PostgreSQL bigint): an id read from
# outside (URL, command line) beyond this range names nothing and must be refused before a query.
MAX_ID = 2**63 - 1


class SeriesState(enum.StrEnum):
    """Where a series epoch stands (ledger ``series.state``)."""

    RECEIVING = "receiving"  # instances arriving; waiting for completeness evidence
    QUEUED = "queued"  # complete; analysis job(s) enqueued
    DONE = "done"  # every job of the current epoch ended (succeeded or dead)
    IGNORED = "ignored"  # no rule matched, or late images ignored by policy


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # last attempt failed transiently; will be retried at ``not_before``
    DEAD = "dead"  # permanent failure or attempts exhausted; needs an operator


class JobKind(enum.StrEnum):
    ANALYZE = "analyze"
    DELIVER = "deliver"
    NOTIFY = "notify"  # one event to one notify channel (notify.py)


class Priority(enum.IntEnum):
    """Lower value is served first (claim order)."""

    STAT = 0
    ROUTINE = 1

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown priority {text!r} (known: stat, routine)") from None


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One instance as acknowledged: its bytes are in the spool and its row is committed."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the spool root
    size: int
    calling_ae: str
    peer_host: str
    received_at: datetime
    modality: str = ""
    instance_number: int | None = None
    body_part: str = ""
    series_description: str = ""
    study_description: str = ""
    image_type: str = ""  # backslash-joined, as in the header
    images_in_acquisition: int | None = None
    temporal_positions: int | None = None
    association_id: str = ""


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """What routing needs to know about a complete series epoch; built from ledger rows."""

    series_instance_uid: str
    study_instance_uid: str
    epoch: int
    modality: str
    sop_class_uids: tuple[str, ...]
    body_part: str
    series_description: str
    study_description: str
    calling_ae: str
    instance_count: int
    image_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. ``Code("111052", "DCM", "Quality Finding")``."""

    value: str
    scheme: str
    meaning: str


# --- Analyze stage ------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """Pixels of one series in physical units, sorted along the slice normal.

    ``pixels`` has shape (slices, rows, columns), dtype float32; for CT the values are HU (rescale
    applied). A projection radiograph (CR/DX) is a volume of one slice. ``headers`` keeps one dataset
    per slice in the same order, with Pixel Data removed. ``problems`` lists geometry issues found
    while loading (gaps, duplicate positions, mixed orientation) that the analyzers may report.
    """

    pixels: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]  # (between slices, between rows, between columns), mm
    orientation: tuple[float, float, float, float, float, float]  # Image Orientation (Patient)
    origin: tuple[float, float, float]  # Image Position (Patient) of the first sorted slice
    frame_of_reference_uid: str
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    headers: tuple[Dataset, ...]
    slice_positions: tuple[float, ...] = ()  # position of each slice along the normal, mm
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement with a UCUM unit (TID 300)."""

    name: Code
    value: float
    unit: Code  # scheme "UCUM", e.g. Code("[hnsf'U]", "UCUM", "Hounsfield unit")
    description: str = ""


@dataclass(frozen=True)
class QualitativeEvaluation:
    """A coded verdict, e.g. name=Quality Finding (111052), value=Motion blur."""

    name: Code
    value: Code


@dataclass(frozen=True)
class Mask:
    """A binary segmentation aligned with the source :class:`Volume` (same shape, same order)."""

    array: npt.NDArray[np.bool_]  # (slices, rows, columns)
    label: str  # Segment Label
    category: Code  # Segmented Property Category (CID 7150)
    type: Code  # Segmented Property Type


@dataclass(frozen=True)
class Finding:
    """One TID 1501 (or, with a mask, TID 1411) measurement group.

    ``finding_type`` is what was looked for (e.g. Image quality, Hemorrhage). ``present`` is the
    explicit verdict: ``False`` is a negative finding that is reported, never omitted; ``None`` when
    presence does not apply (a plain measurement group). ``tracking_id`` is stable within a report.
    """

    finding_type: Code
    tracking_id: str
    present: bool | None = None
    probability: float | None = None
    measurements: tuple[Measurement, ...] = ()
    evaluations: tuple[QualitativeEvaluation, ...] = ()
    mask: Mask | None = None


class FindingsStatus(enum.StrEnum):
    COMPLETE = "complete"  # analyzer ran on the whole series
    PARTIAL = "partial"  # ran, but on part of the data or with degraded inputs
    FAILED = "failed"  # did not produce findings; ``error`` says why


class AnalyzerKind(enum.StrEnum):
    QC = "qc"
    TRIAGE = "triage"


@dataclass(frozen=True)
class Findings:
    """Everything one analyzer says about one series epoch."""

    analyzer: str  # registry name, e.g. "qc-ct" or "demo-hyperdense"
    version: str
    kind: AnalyzerKind
    status: FindingsStatus
    findings: tuple[Finding, ...] = ()
    priority: Priority | None = None  # triage priority, when the analyzer assigns one
    error: str = ""
    notes: tuple[str, ...] = ()  # human-readable remarks (e.g. geometry problems seen)
    duration_s: float = 0.0
    not_for_clinical_use: bool = True


@dataclass(frozen=True, slots=True)
class ResultObject:
    """An encoded result (SR or SEG) ready to be spooled and delivered."""

    analyzer: str
    version: str
    kind: str  # "sr" or "seg"
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    data: bytes = field(repr=False)  # DICOM Part 10 file bytes
