"""Shared parts of the classical QC analyzers: codes, settings, the check framework, metrics.

Encoding follows PS3.16 TID 1500 with the concepts of TID 4014 "CAD Image Quality": every checked
aspect is one measurement group (TID 1501) whose Finding (121071, DCM) is the aspect, with its
measurements (TID 300) and qualitative evaluations: ``(111052, DCM, "Quality Finding")`` from
CID 6135 "Image Quality Finding" when a defect is present, ``(111050, DCM, "Quality Assessment")``
from CID 6044 and the ``(111051, DCM, "Quality Control Standard")`` it was judged against. An
overall finding carries ``(111029, DCM, "Image Quality Rating")`` 0-100 (0 worst, 100 best).
Standard codes are used wherever PS3.16 or a coding scheme it references has one; the remaining
aspects and metrics use the private scheme ``99DCMNODE`` (PS3.16 section 8), each listed with the
reason in docs/conformance.md. docs/qc.md lists every metric, formula, source, threshold and code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.domain import (
    AnalyzerKind,
    Code,
    Finding,
    Findings,
    FindingsStatus,
    Measurement,
    QualitativeEvaluation,
    Volume,
)
from dicomnode.models import private_code
from dicomnode.models.qc_settings import QcSettings as QcSettings  # part of this package's API

VERSION = "1.0.0"
F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

# --- codes ---------------------------------------------------------------------------------------
# Meanings are exactly those of PS3.16 as pydicom's copy of its dictionary gives them
# (tests/test_qc.py checks every standard code here against it).
# TID 4014 "CAD Image Quality" concept names and the overall aspect (PS3.16 Annex D)
QUALITY_FINDING = Code("111052", "DCM", "Quality Finding")
QUALITY_ASSESSMENT = Code("111050", "DCM", "Quality Assessment")
QUALITY_CONTROL_STANDARD = Code("111051", "DCM", "Quality Control Standard")
IMAGE_QUALITY_RATING = Code("111029", "DCM", "Image Quality Rating")
IMAGE_QUALITY = Code("111101", "DCM", "Image Quality")
# CID 6135 Image Quality Finding: the defect, given as the Quality Finding
POSITIONING = Code("111209", "DCM", "Positioning")
MOTION_BLUR = Code("111210", "DCM", "Motion blur")
UNDER_EXPOSED = Code("111211", "DCM", "Under exposed")
OVER_EXPOSED = Code("111212", "DCM", "Over exposed")
OTHER_ARTIFACT = Code("111215", "DCM", "Artifact(s) other than grid or detector artifact")
INAPPROPRIATE_PROCESSING = Code("111219", "DCM", "Inappropriate image processing")
OTHER_FAILURE = Code("111220", "DCM", "Other failure")
# CID 6044 Types of Image Quality Assessment
UNUSABLE = Code("111235", "DCM", "Unusable - Quality renders image unusable")
USABLE_NOT_MEETING = Code("111236", "DCM", "Usable - Does not meet the quality control standard")
USABLE_MEETING = Code("111237", "DCM", "Usable - Meets the quality control standard")
# CID 6326/6136 Quality Control Standard
INSTITUTIONAL_STANDARD = Code("111240", "DCM", "Institutionally defined quality control standard")
# Aspects (Finding, TID 1501 row 3b) with a standard concept
POOR_SNR = Code("130578", "DCM", "Poor SNR")  # CID 6315: noise checks of every modality
POOR_FOV_SELECTION = Code("130577", "DCM", "Poor FOV selection")  # CID 6315: CT truncation, XR collimation
GHOST = Code("RID11426", "RADLEX", "Ghost")  # CID 6316
MOTION_ARTIFACT = Code("RID11423", "RADLEX", "Motion related artifact")  # CID 6316
# Measurements with a standard concept
EXPOSURE_INDEX = Code("113845", "DCM", "Exposure Index")  # IEC 62494-1; PS3.3 (0018,1411)
TARGET_EXPOSURE_INDEX = Code("113846", "DCM", "Target Exposure Index")  # (0018,1412)
DEVIATION_INDEX = Code("113847", "DCM", "Deviation Index")  # (0018,1413)
SIGNAL_TO_NOISE = Code("113060", "DCM", "Signal to noise")  # CID 7180
SPACING_BETWEEN_SLICES = Code("112226", "DCM", "Spacing between slices")
COLLIMATED_FIELD_AREA = Code("113790", "DCM", "Collimated Field Area")  # TID 10003, in m2

_NONE = "no concept in PS3.16 or in the SNOMED CT, LOINC, RadLex, NCIt and UMLS codes DICOM's dictionary carries"
# Aspects without a standard concept
CT_NUMBER_CALIBRATION = private_code(
    "QC-HU-CAL", "CT number calibration",
    "no concept for the accuracy of the CT number scale; the defect is coded as the Quality Finding "
    "(111219, DCM, \"Inappropriate image processing\")",
)
SLICE_COVERAGE = private_code(
    "QC-SLICES", "Slice coverage and spacing",
    "no concept for missing or duplicate slice positions ((130576, DCM, \"Anatomy coverage incomplete\") is "
    "about anatomy, not about gaps); the defect is coded (111220, DCM, \"Other failure\")",
)
METAL_ARTIFACT = private_code(
    "QC-METAL", "Metal streak artifact",
    "no concept for metal artifact; (RID11327, RADLEX, \"Beam-hardening artifact\") of CID 6135 names only one "
    "of its two causes (photon starvation is the other); the defect is coded (111215, DCM, \"Artifact(s) "
    "other than grid or detector artifact\")",
)
DETECTOR_EXPOSURE = private_code(
    "QC-EXPOSURE", "Detector exposure",
    "no concept for the exposure assessment as a whole; its measurements are the standard (113845-113847, DCM) "
    "indices and the verdict is (111211, DCM, \"Under exposed\") or (111212, DCM, \"Over exposed\")",
)
SHARPNESS = private_code(
    "QC-SHARP", "Image sharpness",
    _NONE + "; the defect is coded (111210, DCM, \"Motion blur\"), the only blur in CID 6135",
)
# Measurements without a standard concept
AIR_CT_NUMBER = private_code(
    "QC-AIR-HU", "Median CT number of air",
    "(112182, DCM, \"Median Attenuation Coefficient\") would need a finding site 'air outside the patient', "
    "which has no code either",
)
SOFT_TISSUE_CT_NUMBER = private_code("QC-TISSUE-HU", "Modal CT number of soft tissue", _NONE)
NOISE_SD = private_code(
    "QC-NOISE-SD", "Noise standard deviation (wavelet MAD)",
    "(112183, DCM, \"Standard Deviation of Attenuation Coefficient\") is the spread of CT numbers in a region, "
    "anatomy included; this is the noise alone (finest wavelet subband)",
)
RELATIVE_NOISE = private_code("QC-NOISE-REL", "Noise relative to signal range", _NONE)
MISSING_SLICES = private_code("QC-MISSING", "Estimated missing slices", _NONE)
DUPLICATE_POSITIONS = private_code("QC-DUPLICATE", "Images sharing a position", _NONE)
TRUNCATED_SLICES = private_code("QC-TRUNC-PCT", "Slices touching the field of view edge", _NONE)
METAL_VOXELS = private_code("QC-METAL-PPM", "Metal voxel fraction", _NONE)
STREAK_INDEX = private_code("QC-STREAK", "Streak index around metal", _NONE)
CNR = private_code("QC-CNR", "Contrast-to-noise ratio", _NONE)
EFC = private_code("QC-EFC", "Entropy focus criterion", _NONE + " (an MRIQC metric)")
FBER = private_code("QC-FBER", "Foreground-background energy ratio", _NONE + " (an MRIQC metric)")
GHOST_RATIO = private_code("QC-GHOST", "Ghost-to-signal ratio along phase encoding", _NONE + " (MRIQC gsr)")
CLIPPED_FRACTION = private_code("QC-CLIPPED", "Saturated pixel fraction", _NONE)
BLUR_METRIC = private_code("QC-BLUR", "Blur metric (Crete)", _NONE)
LAPLACIAN_VARIANCE = private_code("QC-LAPV", "Normalised variance of the Laplacian", _NONE)
FINE_DETAIL_RATIO = private_code("QC-FINE-DETAIL", "Finest to next scale detail ratio (Haar)", _NONE)
COLLIMATED_FIELD = private_code(
    "QC-FIELD", "Exposed field fraction",
    "a fraction of the image; the area itself is reported as (113790, DCM, \"Collimated Field Area\")",
)
MOTION_STREAK_INDEX = private_code("QC-MOTION-STREAK", "Streak index of the air around the body", _NONE)
MOTION_STREAKED_SLICES = private_code("QC-MOTION-SLICES", "Slices with motion streaks", _NONE)
MOTION_JUMP = private_code("QC-MOTION-JUMP", "Body outline shift between slices", _NONE)
# Former names of aspects that now have standard codes
IMAGE_NOISE = POOR_SNR
FOV_TRUNCATION = POOR_FOV_SELECTION
COLLIMATION = POOR_FOV_SELECTION
MEDIAN_SLICE_SPACING = SPACING_BETWEEN_SLICES
# UCUM units, with the meanings PS3.16 gives them
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = Code("1", "UCUM", "no units")
PERCENT = Code("%", "UCUM", "Percent")
PPM = Code("[ppm]", "UCUM", "parts per million")
MM = Code("mm", "UCUM", "mm")
SQUARE_METER = Code("m2", "UCUM", "square meter")
RATING_UNITS = Code("{0:100}", "UCUM", "range: 0:100")

MAD_TO_SIGMA = 0.6745  # median(|N(0,1)|)



# --- framework -----------------------------------------------------------------------------------


class NotComputable(Exception):
    """A metric could not be computed on this input (the result becomes PARTIAL)."""


class NotApplicable(Exception):
    """An aspect does not apply to this input (a note, the result stays COMPLETE)."""


@dataclass
class Outcome:
    aspect: Code
    present: bool
    measurements: list[Measurement]
    defect: Code | None = None  # CID 6135 value when present
    penalty: float = 0.0  # rating points lost when present
    notes: list[str] = field(default_factory=list)


def measurement(name: Code, value: float, unit: Code, description: str = "") -> Measurement:
    return Measurement(name=name, value=float(round(value, 6)), unit=unit, description=description)


class QcAnalyzer:
    """Runs each check in isolation; a failing check becomes a note, never an exception."""

    name = ""
    version = VERSION
    kind = AnalyzerKind.QC
    modalities: frozenset[str] = frozenset()

    def __init__(self, settings: QcSettings | None = None) -> None:
        self.settings = settings or QcSettings()

    def checks(self) -> list[tuple[str, Callable[[Context], Outcome]]]:
        raise NotImplementedError

    def analyze(self, volume: Volume) -> Findings:
        start = time.perf_counter()
        try:
            ctx = Context.build(volume, self.modalities, self.settings)
        except Unusable as exc:
            return self._findings(FindingsStatus.FAILED, [], [], start, error=str(exc))
        outcomes: list[Outcome] = []
        notes = [f"geometry: {p}" for p in volume.problems]
        partial = False
        for label, check in self.checks():
            try:
                outcome = check(ctx)
            except NotApplicable as exc:
                notes.append(f"{label}: not applicable ({exc})")
                continue
            except NotComputable as exc:
                notes.append(f"{label}: not computed ({exc})")
                partial = True
                continue
            except Exception as exc:  # a failing metric must never sink the analyzer
                notes.append(f"{label}: not computed ({type(exc).__name__}: {exc})")
                partial = True
                continue
            notes += [f"{label}: {n}" for n in outcome.notes]
            outcomes.append(outcome)
        if not outcomes:
            return self._findings(
                FindingsStatus.FAILED, [], notes, start, error="no quality metric could be computed"
            )
        findings = [self._finding(o) for o in outcomes]
        findings.append(self._overall(outcomes))
        status = FindingsStatus.PARTIAL if partial else FindingsStatus.COMPLETE
        return self._findings(status, findings, notes, start)

    def _findings(
        self,
        status: FindingsStatus,
        findings: Sequence[Finding],
        notes: Sequence[str],
        start: float,
        error: str = "",
    ) -> Findings:
        return Findings(
            analyzer=self.name,
            version=self.version,
            kind=self.kind,
            status=status,
            findings=tuple(findings),
            error=error,
            notes=tuple(notes),
            duration_s=time.perf_counter() - start,
        )

    def _finding(self, outcome: Outcome) -> Finding:
        evaluations = []
        if outcome.present and outcome.defect is not None:
            evaluations.append(QualitativeEvaluation(QUALITY_FINDING, outcome.defect))
        assessment = USABLE_NOT_MEETING if outcome.present else USABLE_MEETING
        evaluations += [
            QualitativeEvaluation(QUALITY_ASSESSMENT, assessment),
            QualitativeEvaluation(QUALITY_CONTROL_STANDARD, INSTITUTIONAL_STANDARD),
        ]
        return Finding(
            finding_type=outcome.aspect,
            tracking_id=f"{self.name}/{outcome.aspect.value.lower()}",
            present=outcome.present,
            measurements=tuple(outcome.measurements),
            evaluations=tuple(evaluations),
        )

    def _overall(self, outcomes: list[Outcome]) -> Finding:
        rating = max(0.0, 100.0 - sum(o.penalty for o in outcomes if o.present))
        defective = any(o.present for o in outcomes)
        if rating < self.settings.unusable_rating:
            assessment = UNUSABLE
        elif defective:
            assessment = USABLE_NOT_MEETING
        else:
            assessment = USABLE_MEETING
        return Finding(
            finding_type=IMAGE_QUALITY,
            tracking_id=f"{self.name}/overall",
            present=defective,
            measurements=(
                measurement(IMAGE_QUALITY_RATING, rating, RATING_UNITS, "100 minus the penalty of each defect"),
            ),
            evaluations=(
                QualitativeEvaluation(QUALITY_ASSESSMENT, assessment),
                QualitativeEvaluation(QUALITY_CONTROL_STANDARD, INSTITUTIONAL_STANDARD),
            ),
        )


class Unusable(Exception):
    """The volume cannot be analysed at all (FAILED findings)."""


@dataclass
class Context:
    volume: Volume
    settings: QcSettings
    sampled: npt.NDArray[np.intp]  # indices of the slices used by the costlier metrics
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, volume: Volume, modalities: frozenset[str], settings: QcSettings) -> Context:
        pixels = volume.pixels
        if volume.modality.upper() not in modalities:
            raise Unusable(
                f"expects modality {' or '.join(sorted(modalities))}, the series is "
                f"{volume.modality or 'of unknown modality'}"
            )
        if pixels.ndim != 3 or pixels.size == 0:
            raise Unusable(f"pixels must be a non-empty (slices, rows, columns) array, got {pixels.shape}")
        if min(pixels.shape[1:]) < 16:
            raise Unusable(f"images of {pixels.shape[1]}x{pixels.shape[2]} pixels are too small to assess")
        if not np.isfinite(pixels).all():
            raise Unusable("pixel values contain NaN or infinity")
        if float(pixels.max()) == float(pixels.min()):
            raise Unusable(f"every pixel has the same value ({float(pixels.min()):g}): no image content")
        n = pixels.shape[0]
        sampled = np.unique(np.round(np.linspace(0, n - 1, min(n, settings.max_slices))).astype(np.intp))
        return cls(volume=volume, settings=settings, sampled=sampled)

    def header_value(self, keyword: str) -> Any:
        for header in self.volume.headers[:1]:
            value = header.get(keyword)
            if value is not None and str(value).strip() != "":
                return value
        return None


# --- shared metrics ------------------------------------------------------------------------------


def otsu_threshold(values: npt.NDArray[Any], bins: int = 256) -> float:
    """Otsu's threshold (Otsu 1979, IEEE SMC-9:62) on the 0.5-99.5 percentile range of ``values``."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(values, bins=bins, range=(float(lo), float(hi)))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def wavelet_noise_sigma(image: F32, mask: Mask | None = None) -> float:
    """Gaussian noise sigma from the finest diagonal Haar subband: ``median(|HH|) / 0.6745``
    (Donoho & Johnstone 1994, Biometrika 81:425; the estimator of skimage ``estimate_sigma``).
    Only 2x2 blocks entirely inside ``mask`` count. Returns NaN when no block qualifies."""
    rows, cols = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    a = image[0:rows:2, 0:cols:2]
    b = image[0:rows:2, 1:cols:2]
    c = image[1:rows:2, 0:cols:2]
    d = image[1:rows:2, 1:cols:2]
    hh = (a - b - c + d) / 2.0
    if mask is not None:
        m = mask[:rows, :cols]
        keep = m[0::2, 0::2] & m[0::2, 1::2] & m[1::2, 0::2] & m[1::2, 1::2]
        hh = hh[keep]
    if hh.size < 64:
        return float("nan")
    return float(np.median(np.abs(hh)) / MAD_TO_SIGMA)


def largest_component(mask: Mask) -> Mask:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def disk(radius: int) -> Mask:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(x * x + y * y <= radius * radius)


# --- morphology with a disk ------------------------------------------------------------------------
# Exactly scipy.ndimage's binary_erosion / binary_dilation / binary_opening with ``disk(radius)``
# and binary_fill_holes (tests/test_qc.py compares them), but 5-20x faster on 512x512 slices: the
# disk is a stack of horizontal runs, so erosion is an AND of at most 2r+1 shifted copies of the
# image eroded by a run, and each run erosion extends the previous one by two shifted ANDs.


def _runs(mask: Mask, radius: int, border_value: bool, combine: Any) -> Mask:
    rows, cols = mask.shape
    r = radius
    padded = np.pad(mask, r, constant_values=border_value)
    run = padded[:, r : r + cols]
    runs = [run]
    for w in range(1, r + 1):
        run = combine(combine(run, padded[:, r - w : r - w + cols]), padded[:, r + w : r + w + cols])
        runs.append(run)
    out = runs[r][r : r + rows].copy()  # dy = 0: the widest run
    for dy in range(1, r + 1):
        w = math.isqrt(r * r - dy * dy)
        combine(out, runs[w][r - dy : r - dy + rows], out=out)
        combine(out, runs[w][r + dy : r + dy + rows], out=out)
    return out


def erode(mask: Mask, radius: int, border_value: bool = False) -> Mask:
    """``ndimage.binary_erosion(mask, structure=disk(radius), border_value=border_value)``."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    return _runs(mask, radius, border_value, np.logical_and)


def dilate(mask: Mask, radius: int) -> Mask:
    """``ndimage.binary_dilation(mask, structure=disk(radius))`` (outside the image is False)."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    return _runs(mask, radius, False, np.logical_or)


def opening(mask: Mask, radius: int) -> Mask:
    """``ndimage.binary_opening(mask, structure=disk(radius))``."""
    return dilate(erode(mask, radius), radius)


def fill_holes(mask: Mask) -> Mask:
    """``ndimage.binary_fill_holes(mask)``: background not 4-connected to the image border is
    filled. One labelling of the background instead of scipy's iterated conditional dilation."""
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask.copy()
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    outside[0] = False
    return np.asarray(mask | ~outside[labels] & (labels > 0))


def slice_coverage(ctx: Context, penalty: float) -> Outcome:
    """Missing slices and duplicates from the sorted positions along the normal (imaging)."""
    positions = np.asarray(ctx.volume.slice_positions, dtype=np.float64)
    if positions.size < 3:
        raise NotApplicable(f"{positions.size} slice position(s): a series of 3 or more is needed")
    steps = np.diff(positions)
    positive = steps[steps > 1e-3]
    if positive.size == 0:
        raise NotComputable("every image shares one position")
    median = float(np.median(positive))
    duplicates = int(np.count_nonzero(steps <= max(1e-3, 0.01 * median)))
    gaps = steps[steps > ctx.settings.gap_factor * median]
    missing = int(sum(max(1, round(g / median) - 1) for g in gaps))
    present = missing > 0 or duplicates > 0
    return Outcome(
        aspect=SLICE_COVERAGE,
        present=present,
        measurements=[
            measurement(MISSING_SLICES, missing, NO_UNITS, f"steps > {ctx.settings.gap_factor:g} x median spacing"),
            measurement(DUPLICATE_POSITIONS, duplicates, NO_UNITS),
            measurement(MEDIAN_SLICE_SPACING, median, MM),
        ],
        defect=OTHER_FAILURE,
        penalty=penalty,
    )


