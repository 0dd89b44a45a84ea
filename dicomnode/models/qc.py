"""Classical image-quality control: ``qc-ct``, ``qc-mr`` and ``qc-xr``.

Each analyzer checks a few quality aspects of one :class:`~dicomnode.domain.Volume` with published,
reference-free metrics and returns one :class:`~dicomnode.domain.Finding` per aspect, negatives
included (``present=False``), plus an overall finding carrying the Image Quality Rating.

Encoding follows PS3.16 TID 4014 "CAD Image Quality": a defect is a ``(111052, DCM, "Quality
Finding")`` evaluation whose value comes from CID 6135 "Image Quality Finding"; every aspect has a
``(111050, DCM, "Quality Assessment")`` from CID 6044 "Types of Image Quality Assessment" with the
``(111051, DCM, "Quality Control Standard")`` it was judged against; the overall finding carries
``(111029, DCM, "Image Quality Rating")`` 0-100 (0 worst, 100 best) in UCUM ``{0:100}``. Aspects and
metrics without a standard concept use the private scheme ``99DCMNODE`` (PS3.16 section 8: a
Coding Scheme Designator starting "99" is local). docs/qc.md lists every metric, formula, source,
default threshold and code.

Thresholds live in :class:`QcSettings` (``[analysis.qc]`` in the TOML configuration).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
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
from dicomnode.models import Analyzer, AnalyzerSpec

__all__ = [
    "QcSettings",
    "specs",
    "CtQc",
    "MrQc",
    "XrQc",
    "VERSION",
]

VERSION = "1.0.0"
F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

# --- codes ---------------------------------------------------------------------------------------
# TID 4014 concept names (PS3.16 Annex A; DCM definitions in PS3.16 Annex D)
QUALITY_FINDING = Code("111052", "DCM", "Quality Finding")
QUALITY_ASSESSMENT = Code("111050", "DCM", "Quality Assessment")
QUALITY_CONTROL_STANDARD = Code("111051", "DCM", "Quality Control Standard")
IMAGE_QUALITY_RATING = Code("111029", "DCM", "Image Quality Rating")
IMAGE_QUALITY = Code("111101", "DCM", "Image Quality")
# CID 6135 Image Quality Finding
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
# Projection X-ray exposure indices (IEC 62494-1; PS3.3 C.8.11.7 attributes (0018,1411..1413))
EXPOSURE_INDEX = Code("113845", "DCM", "Exposure Index")
TARGET_EXPOSURE_INDEX = Code("113846", "DCM", "Target Exposure Index")
DEVIATION_INDEX = Code("113847", "DCM", "Deviation Index")
SIGNAL_TO_NOISE = Code("113060", "DCM", "Signal to noise")
GHOST = Code("RID11426", "RADLEX", "Ghost")

_PRIVATE = "99DCMNODE"
# aspects (finding types) without a standard concept
CT_NUMBER_CALIBRATION = Code("QC-HU-CAL", _PRIVATE, "CT number calibration")
IMAGE_NOISE = Code("QC-NOISE", _PRIVATE, "Image noise")
SLICE_COVERAGE = Code("QC-SLICES", _PRIVATE, "Slice coverage and spacing")
FOV_TRUNCATION = Code("QC-TRUNC", _PRIVATE, "Field of view truncation")
METAL_ARTIFACT = Code("QC-METAL", _PRIVATE, "Metal streak artifact")
DETECTOR_EXPOSURE = Code("QC-EXPOSURE", _PRIVATE, "Detector exposure")
SHARPNESS = Code("QC-SHARP", _PRIVATE, "Image sharpness")
COLLIMATION = Code("QC-COLLIM", _PRIVATE, "Collimation")
# measurements without a standard concept
AIR_CT_NUMBER = Code("QC-AIR-HU", _PRIVATE, "Median CT number of air")
SOFT_TISSUE_CT_NUMBER = Code("QC-TISSUE-HU", _PRIVATE, "Modal CT number of soft tissue")
NOISE_SD = Code("QC-NOISE-SD", _PRIVATE, "Noise standard deviation (wavelet MAD)")
RELATIVE_NOISE = Code("QC-NOISE-REL", _PRIVATE, "Noise relative to signal range")
MISSING_SLICES = Code("QC-MISSING", _PRIVATE, "Estimated missing slices")
DUPLICATE_POSITIONS = Code("QC-DUPLICATE", _PRIVATE, "Images sharing a position")
MEDIAN_SLICE_SPACING = Code("QC-SPACING", _PRIVATE, "Median slice spacing")
TRUNCATED_SLICES = Code("QC-TRUNC-PCT", _PRIVATE, "Slices touching the field of view edge")
METAL_VOXELS = Code("QC-METAL-PPM", _PRIVATE, "Metal voxel fraction")
STREAK_INDEX = Code("QC-STREAK", _PRIVATE, "Streak index around metal")
CNR = Code("QC-CNR", _PRIVATE, "Contrast-to-noise ratio")
EFC = Code("QC-EFC", _PRIVATE, "Entropy focus criterion")
FBER = Code("QC-FBER", _PRIVATE, "Foreground-background energy ratio")
GHOST_RATIO = Code("QC-GHOST", _PRIVATE, "Ghost-to-signal ratio along phase encoding")
CLIPPED_FRACTION = Code("QC-CLIPPED", _PRIVATE, "Saturated pixel fraction")
BLUR_METRIC = Code("QC-BLUR", _PRIVATE, "Blur metric (Crete)")
LAPLACIAN_VARIANCE = Code("QC-LAPV", _PRIVATE, "Normalised variance of the Laplacian")
COLLIMATED_FIELD = Code("QC-FIELD", _PRIVATE, "Exposed field fraction")
# UCUM units
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = Code("1", "UCUM", "no units")
PERCENT = Code("%", "UCUM", "percent")
PPM = Code("[ppm]", "UCUM", "parts per million")
MM = Code("mm", "UCUM", "millimeter")
RATING_UNITS = Code("{0:100}", "UCUM", "range: 0:100")

_MAD_TO_SIGMA = 0.6745  # median(|N(0,1)|)
_RAYLEIGH = math.sqrt(2.0 / (4.0 - math.pi))  # Dietrich 2007 eq. A.12 correction


class QcSettings(BaseModel):
    """Thresholds of the classical QC analyzers (``[analysis.qc]``). See docs/qc.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="register qc-ct, qc-mr and qc-xr")
    max_slices: int = Field(default=48, ge=1, description="slices sampled for the costlier metrics")
    gap_factor: float = Field(default=1.5, gt=1.0, description="a step > this x median spacing is a gap")
    unusable_rating: float = Field(
        default=40.0, ge=0, le=100, description="rating below which the series is called unusable"
    )
    # CT
    ct_air_hu: float = -1000.0
    ct_air_tolerance_hu: float = Field(default=60.0, gt=0)
    ct_soft_tissue_min_hu: float = -150.0
    ct_soft_tissue_max_hu: float = 100.0
    ct_noise_max_hu: float = Field(default=25.0, gt=0)
    ct_truncated_slices_max_percent: float = Field(default=10.0, ge=0, le=100)
    ct_metal_hu: float = 3000.0
    ct_metal_min_voxels: int = Field(default=5, ge=1, description="per slice")
    ct_streak_min_hu: float = Field(default=60.0, gt=0)
    # MR
    mr_snr_min: float = Field(default=10.0, gt=0)
    mr_ghost_ratio_max: float = Field(default=0.01, gt=0)
    # CR/DX
    xr_deviation_index_max: float = Field(default=3.0, gt=0)
    xr_clipped_max_percent: float = Field(default=5.0, ge=0, le=100)
    xr_blur_max: float = Field(default=0.78, gt=0, lt=1)
    xr_noise_max_percent: float = Field(default=1.0, gt=0)
    xr_field_min_percent: float = Field(default=25.0, ge=0, le=100)


def specs(settings: QcSettings) -> list[AnalyzerSpec]:
    """The three QC analyzers with their modality filters; nothing is loaded here."""
    if not settings.enabled:
        return []

    def loader(cls: type[_QcAnalyzer]) -> Callable[[], Analyzer]:
        return lambda: cls(settings)

    return [
        AnalyzerSpec(
            name=CtQc.name,
            version=VERSION,
            kind=AnalyzerKind.QC,
            modalities=CtQc.modalities,
            load=loader(CtQc),
            description="CT: HU calibration, noise, missing slices, truncation, metal streaks",
        ),
        AnalyzerSpec(
            name=MrQc.name,
            version=VERSION,
            kind=AnalyzerKind.QC,
            modalities=MrQc.modalities,
            load=loader(MrQc),
            description="MR: SNR, CNR, EFC, FBER, ghosting along phase encoding, missing slices",
        ),
        AnalyzerSpec(
            name=XrQc.name,
            version=VERSION,
            kind=AnalyzerKind.QC,
            modalities=XrQc.modalities,
            load=loader(XrQc),
            description="CR/DX: exposure (EI/DI, saturation), blur, noise, collimation",
        ),
    ]


# --- framework -----------------------------------------------------------------------------------


class _NotComputable(Exception):
    """A metric could not be computed on this input (the result becomes PARTIAL)."""


class _NotApplicable(Exception):
    """An aspect does not apply to this input (a note, the result stays COMPLETE)."""


@dataclass
class _Outcome:
    aspect: Code
    present: bool
    measurements: list[Measurement]
    defect: Code | None = None  # CID 6135 value when present
    penalty: float = 0.0  # rating points lost when present
    notes: list[str] = field(default_factory=list)


def _m(name: Code, value: float, unit: Code, description: str = "") -> Measurement:
    return Measurement(name=name, value=float(round(value, 6)), unit=unit, description=description)


class _QcAnalyzer:
    """Runs each check in isolation; a failing check becomes a note, never an exception."""

    name = ""
    version = VERSION
    kind = AnalyzerKind.QC
    modalities: frozenset[str] = frozenset()

    def __init__(self, settings: QcSettings | None = None) -> None:
        self.settings = settings or QcSettings()

    def checks(self) -> list[tuple[str, Callable[[_Context], _Outcome]]]:
        raise NotImplementedError

    def analyze(self, volume: Volume) -> Findings:
        start = time.perf_counter()
        try:
            ctx = _Context.build(volume, self.modalities, self.settings)
        except _Unusable as exc:
            return self._findings(FindingsStatus.FAILED, [], [], start, error=str(exc))
        outcomes: list[_Outcome] = []
        notes = [f"geometry: {p}" for p in volume.problems]
        partial = False
        for label, check in self.checks():
            try:
                outcome = check(ctx)
            except _NotApplicable as exc:
                notes.append(f"{label}: not applicable ({exc})")
                continue
            except _NotComputable as exc:
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

    def _finding(self, outcome: _Outcome) -> Finding:
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

    def _overall(self, outcomes: list[_Outcome]) -> Finding:
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
                _m(IMAGE_QUALITY_RATING, rating, RATING_UNITS, "100 minus the penalty of each defect"),
            ),
            evaluations=(
                QualitativeEvaluation(QUALITY_ASSESSMENT, assessment),
                QualitativeEvaluation(QUALITY_CONTROL_STANDARD, INSTITUTIONAL_STANDARD),
            ),
        )


class _Unusable(Exception):
    """The volume cannot be analysed at all (FAILED findings)."""


@dataclass
class _Context:
    volume: Volume
    settings: QcSettings
    sampled: npt.NDArray[np.intp]  # indices of the slices used by the costlier metrics
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, volume: Volume, modalities: frozenset[str], settings: QcSettings) -> _Context:
        pixels = volume.pixels
        if volume.modality.upper() not in modalities:
            raise _Unusable(
                f"expects modality {' or '.join(sorted(modalities))}, the series is "
                f"{volume.modality or 'of unknown modality'}"
            )
        if pixels.ndim != 3 or pixels.size == 0:
            raise _Unusable(f"pixels must be a non-empty (slices, rows, columns) array, got {pixels.shape}")
        if min(pixels.shape[1:]) < 16:
            raise _Unusable(f"images of {pixels.shape[1]}x{pixels.shape[2]} pixels are too small to assess")
        if not np.isfinite(pixels).all():
            raise _Unusable("pixel values contain NaN or infinity")
        if float(pixels.max()) == float(pixels.min()):
            raise _Unusable(f"every pixel has the same value ({float(pixels.min()):g}): no image content")
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
    return float(np.median(np.abs(hh)) / _MAD_TO_SIGMA)


def _touches_fov_edge(body: Mask, padding: Mask) -> bool:
    """Whether the body touches the reconstruction circle (next to padding) or the image edge
    over at least 5 pixels or 1 % of that edge."""
    if not body.any():
        return False
    # The rim next to the padding (outside the reconstruction circle) plus the image border.
    edge = _dilate(padding, 2) & ~padding if padding.any() else np.zeros_like(body)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    contact = int(np.count_nonzero(body & edge))
    return contact >= max(5, int(0.01 * np.count_nonzero(edge)))


def _largest_component(mask: Mask) -> Mask:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def _disk(radius: int) -> Mask:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(x * x + y * y <= radius * radius)


# --- morphology with a disk ------------------------------------------------------------------------
# Exactly scipy.ndimage's binary_erosion / binary_dilation / binary_opening with ``_disk(radius)``
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


def _erode(mask: Mask, radius: int, border_value: bool = False) -> Mask:
    """``ndimage.binary_erosion(mask, structure=_disk(radius), border_value=border_value)``."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    return _runs(mask, radius, border_value, np.logical_and)


def _dilate(mask: Mask, radius: int) -> Mask:
    """``ndimage.binary_dilation(mask, structure=_disk(radius))`` (outside the image is False)."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    return _runs(mask, radius, False, np.logical_or)


def _open(mask: Mask, radius: int) -> Mask:
    """``ndimage.binary_opening(mask, structure=_disk(radius))``."""
    return _dilate(_erode(mask, radius), radius)


def _fill_holes(mask: Mask) -> Mask:
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


def _slice_coverage(ctx: _Context, penalty: float) -> _Outcome:
    """Missing slices and duplicates from the sorted positions along the normal (imaging)."""
    positions = np.asarray(ctx.volume.slice_positions, dtype=np.float64)
    if positions.size < 3:
        raise _NotApplicable(f"{positions.size} slice position(s): a series of 3 or more is needed")
    steps = np.diff(positions)
    positive = steps[steps > 1e-3]
    if positive.size == 0:
        raise _NotComputable("every image shares one position")
    median = float(np.median(positive))
    duplicates = int(np.count_nonzero(steps <= max(1e-3, 0.01 * median)))
    gaps = steps[steps > ctx.settings.gap_factor * median]
    missing = int(sum(max(1, round(g / median) - 1) for g in gaps))
    present = missing > 0 or duplicates > 0
    return _Outcome(
        aspect=SLICE_COVERAGE,
        present=present,
        measurements=[
            _m(MISSING_SLICES, missing, NO_UNITS, f"steps > {ctx.settings.gap_factor:g} x median spacing"),
            _m(DUPLICATE_POSITIONS, duplicates, NO_UNITS),
            _m(MEDIAN_SLICE_SPACING, median, MM),
        ],
        defect=OTHER_FAILURE,
        penalty=penalty,
    )


# --- CT ------------------------------------------------------------------------------------------


class CtQc(_QcAnalyzer):
    """``qc-ct``: CT number calibration, noise, slice coverage, truncation, metal streaks."""

    name = "qc-ct"
    modalities = frozenset({"CT"})

    def checks(self) -> list[tuple[str, Callable[[_Context], _Outcome]]]:
        return [
            ("CT number calibration", self._calibration),
            ("noise", self._noise),
            ("slice coverage", lambda ctx: _slice_coverage(ctx, penalty=30.0)),
            ("truncation", self._truncation),
            ("metal", self._metal),
        ]

    # Segmentation shared by the checks: padding outside the reconstruction circle, the body.
    def _segment(self, ctx: _Context) -> dict[str, Any]:
        if "ct" in ctx.cache:
            return dict(ctx.cache["ct"])
        vol = ctx.volume.pixels
        sample = vol[ctx.sampled]
        lowest = float(sample.min())
        padding = sample == lowest
        # Values below -1024 HU are not tissue or air; a large exact pile-up there is padding.
        if not (lowest < -1024.5 and padding.mean() >= 0.005):
            padding = np.zeros_like(padding)
        valid_values = sample[~padding]
        threshold = otsu_threshold(valid_values[:: max(1, valid_values.size // 2_000_000)])
        bodies = np.zeros(sample.shape, dtype=bool)
        for i, image in enumerate(sample):
            fg = (image > threshold) & ~padding[i]
            fg = _open(fg, 2)
            if fg.any():
                bodies[i] = _fill_holes(_largest_component(fg))
        truncated = np.array([_touches_fov_edge(bodies[i], padding[i]) for i in range(len(sample))])
        seg = {
            "sample": sample,
            "padding": padding,
            "threshold": threshold,
            "bodies": bodies,
            "truncated": truncated,
        }
        ctx.cache["ct"] = seg
        return dict(seg)

    def _calibration(self, ctx: _Context) -> _Outcome:
        """Air outside the body ~ -1000 HU (CT number of air by definition of the HU scale),
        soft tissue mode within a plausible range (ACR CT accreditation phantom: water 0 +/- 7 HU)."""
        s = ctx.settings
        seg = self._segment(ctx)
        sample, padding, bodies = seg["sample"], seg["padding"], seg["bodies"]
        air_values: list[npt.NDArray[np.float32]] = []
        tissue_values: list[npt.NDArray[np.float32]] = []
        truncated = seg["truncated"]
        for i, image in enumerate(sample):
            inner = _erode(bodies[i], 3)
            tissue_values.append(image[inner & (image > -300) & (image < 300)])
            if truncated[i]:
                continue  # air seen there may be lung or bowel gas, not air outside the patient
            near_body = _dilate(bodies[i], 5)
            valid = _erode(~padding[i], 3, border_value=True)
            air = valid & ~near_body & (image <= seg["threshold"])
            air_values.append(image[air])
        air_all = np.concatenate(air_values) if air_values else np.zeros(0, np.float32)
        if air_all.size < 500:
            raise _NotComputable(
                "fewer than 500 air pixels outside an untruncated body (zoomed or truncated field of view)"
            )
        air = float(np.median(air_all))
        measurements = [_m(AIR_CT_NUMBER, air, HU, "outside the body, inside the field of view")]
        notes: list[str] = []
        present = abs(air - s.ct_air_hu) > s.ct_air_tolerance_hu
        tissue_all = np.concatenate(tissue_values)
        if tissue_all.size >= 1000:
            hist, edges = np.histogram(tissue_all, bins=150, range=(-300.0, 300.0))
            hist = ndimage.uniform_filter1d(hist.astype(np.float64), 5)
            mode = float((edges[int(np.argmax(hist))] + edges[int(np.argmax(hist)) + 1]) / 2)
            measurements.append(_m(SOFT_TISSUE_CT_NUMBER, mode, HU, "mode of body voxels in [-300, 300] HU"))
            present |= not (s.ct_soft_tissue_min_hu <= mode <= s.ct_soft_tissue_max_hu)
        else:
            notes.append("too few soft-tissue voxels in [-300, 300] HU for the tissue check")
        return _Outcome(CT_NUMBER_CALIBRATION, present, measurements, INAPPROPRIATE_PROCESSING, 40.0, notes)

    def _noise(self, ctx: _Context) -> _Outcome:
        seg = self._segment(ctx)
        sample, bodies = seg["sample"], seg["bodies"]
        metal = (sample > ctx.settings.ct_metal_hu).reshape(len(sample), -1).sum(axis=1)
        use = [i for i in range(len(sample)) if metal[i] < ctx.settings.ct_metal_min_voxels] or list(
            range(len(sample))
        )
        sigmas = []
        for i in use:
            inner = _erode(bodies[i], 4)
            sigma = wavelet_noise_sigma(sample[i], inner)
            if math.isfinite(sigma):
                sigmas.append(sigma)
        if not sigmas:
            raise _NotComputable("no body region large enough to estimate noise")
        sigma = float(np.median(sigmas))
        present = sigma > ctx.settings.ct_noise_max_hu
        return _Outcome(
            IMAGE_NOISE,
            present,
            [_m(NOISE_SD, sigma, HU, "median over sampled slices, inside the body")],
            UNDER_EXPOSED,
            20.0,
        )

    def _truncation(self, ctx: _Context) -> _Outcome:
        """Body touching the edge of the reconstructed field of view (circle edge, else image edge)."""
        seg = self._segment(ctx)
        bodies = seg["bodies"]
        counted = int(sum(1 for b in bodies if b.any()))
        truncated = int(np.count_nonzero(seg["truncated"]))
        if counted == 0:
            raise _NotComputable("no body found in the sampled slices")
        percent = 100.0 * truncated / counted
        present = percent > ctx.settings.ct_truncated_slices_max_percent
        return _Outcome(
            FOV_TRUNCATION,
            present,
            [_m(TRUNCATED_SLICES, percent, PERCENT, f"of {counted} sampled slices")],
            POSITIONING,
            15.0,
        )

    def _metal(self, ctx: _Context) -> _Outcome:
        """Voxels above ``ct_metal_hu`` and the angular variation of CT numbers on rings around them
        (radial streaks from photon starvation and beam hardening; Barrett & Keat 2004)."""
        s = ctx.settings
        vol = ctx.volume.pixels
        per_slice = np.count_nonzero((vol > s.ct_metal_hu).reshape(vol.shape[0], -1), axis=1)
        fraction_ppm = 1e6 * float(per_slice.sum()) / vol.size
        metal_slices = np.flatnonzero(per_slice >= s.ct_metal_min_voxels)
        measurements = [_m(METAL_VOXELS, fraction_ppm, PPM, f"voxels > {s.ct_metal_hu:g} HU")]
        if metal_slices.size == 0:
            return _Outcome(METAL_ARTIFACT, False, measurements, OTHER_ARTIFACT, 20.0)
        picks = metal_slices[np.unique(np.round(np.linspace(0, metal_slices.size - 1, 8)).astype(int))]
        pixel_mm = float(np.mean(ctx.volume.spacing[1:])) or 1.0
        indices = []
        for z in picks:
            indices.append(self._streak_index(vol[z], s.ct_metal_hu, pixel_mm))
        streak = float(np.nanmedian(indices)) if np.isfinite(indices).any() else 0.0
        measurements.append(_m(STREAK_INDEX, streak, HU, "median angular SD on rings 8-24 mm from metal"))
        present = streak >= s.ct_streak_min_hu
        return _Outcome(METAL_ARTIFACT, present, measurements, OTHER_ARTIFACT, 20.0)

    @staticmethod
    def _streak_index(image: F32, metal_hu: float, pixel_mm: float) -> float:
        metal = image > metal_hu
        labels, count = ndimage.label(metal)
        if count == 0:
            return float("nan")
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        cy, cx = ndimage.center_of_mass(labels == int(np.argmax(sizes)))
        smooth = ndimage.median_filter(image, size=3)
        angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
        sds = []
        for radius_mm in (8.0, 12.0, 16.0, 24.0):
            r = radius_mm / pixel_mm
            ys, xs = cy + r * np.sin(angles), cx + r * np.cos(angles)
            inside = (ys >= 0) & (ys <= image.shape[0] - 1) & (xs >= 0) & (xs <= image.shape[1] - 1)
            if inside.sum() < 90:
                continue
            values = ndimage.map_coordinates(smooth, [ys[inside], xs[inside]], order=1)
            values = values[(values > -500) & (values < metal_hu)]  # tissue only
            if values.size >= 60:
                sds.append(float(np.std(values)))
        return float(np.median(sds)) if sds else float("nan")


# --- MR ------------------------------------------------------------------------------------------


class MrQc(_QcAnalyzer):
    """``qc-mr``: SNR and CNR, EFC and FBER, ghosting along the phase-encoding direction, slices."""

    name = "qc-mr"
    modalities = frozenset({"MR"})

    def checks(self) -> list[tuple[str, Callable[[_Context], _Outcome]]]:
        return [
            ("signal-to-noise", self._snr),
            ("ghosting", self._ghosting),
            ("slice coverage", lambda ctx: _slice_coverage(ctx, penalty=30.0)),
        ]

    def _segment(self, ctx: _Context) -> dict[str, Any]:
        if "mr" in ctx.cache:
            return dict(ctx.cache["mr"])
        sample = ctx.volume.pixels[ctx.sampled]
        threshold = _mr_foreground_threshold(sample)
        fg = np.zeros(sample.shape, dtype=bool)
        for i, image in enumerate(sample):
            mask = _open(image > threshold, 2)
            if mask.any():
                fg[i] = _fill_holes(_largest_component(mask))
        air = np.zeros_like(fg)
        for i in range(len(fg)):
            air[i] = ~_dilate(fg[i], 4)
            air[i][[0, -1], :] = False
            air[i][:, [0, -1]] = False
        seg = {"sample": sample, "fg": fg, "air": air}
        ctx.cache["mr"] = seg
        return dict(seg)

    def _phase_axes(self, ctx: _Context) -> tuple[list[int], str]:
        direction = str(ctx.header_value("InPlanePhaseEncodingDirection") or "").upper()
        if direction == "COL":  # phase encoded along columns: ghosts run vertically (rows axis)
            return [1], ""
        if direction == "ROW":
            return [2], ""
        return [1, 2], "In-plane Phase Encoding Direction absent: both in-plane axes checked"

    def _bands(self, ctx: _Context, axis: int) -> tuple[Mask, Mask]:
        """Background inside / outside the object's extent across the phase-encoding axis
        (ghosts of a moving object are replicated along the phase-encoding axis only)."""
        seg = self._segment(ctx)
        fg, air = seg["fg"], seg["air"]
        readout_extent = fg.any(axis=axis)  # (slices, readout positions)
        margin = 3
        extent = ndimage.binary_dilation(readout_extent, structure=np.ones((1, 2 * margin + 1), bool))
        band = np.expand_dims(extent, axis=axis)
        band = np.broadcast_to(band, fg.shape)
        outside = ~ndimage.binary_dilation(readout_extent, structure=np.ones((1, 4 * margin + 1), bool))
        outside_b = np.broadcast_to(np.expand_dims(outside, axis=axis), fg.shape)
        return air & band, air & outside_b

    def _air_sigma(self, ctx: _Context) -> float:
        """Noise sigma from the Rayleigh-distributed air, away from the ghost band when possible."""
        seg = self._segment(ctx)
        sample = seg["sample"]
        axes, _ = self._phase_axes(ctx)
        quiet = seg["air"]
        for axis in axes:  # away from any possible ghost band
            quiet = quiet & self._bands(ctx, axis)[1]
        region = quiet if np.count_nonzero(quiet) >= 1000 else seg["air"]
        values = sample[region]
        if values.size < 200:
            raise _NotComputable("too little background (air) around the object")
        sd = float(np.std(values))
        if sd <= 1e-6:
            raise _NotComputable("the background is zero-filled, noise cannot be measured in air")
        return sd * _RAYLEIGH

    def _snr(self, ctx: _Context) -> _Outcome:
        """SNR after Dietrich et al. 2007 (JMRI 26:375, eq. A.12), as MRIQC ``snrd``: mean
        foreground over the Rayleigh-corrected air SD. CNR after Magnotta & Friedman 2006 with the
        two foreground classes split by Otsu instead of a GM/WM segmentation."""
        seg = self._segment(ctx)
        sample, fg = seg["sample"], seg["fg"]
        inner = np.stack([_erode(m, 2) for m in fg])
        fg_values = sample[inner]
        if fg_values.size < 200:
            raise _NotComputable("foreground too small")
        sigma = self._air_sigma(ctx)
        snr = float(fg_values.mean()) / sigma
        split = otsu_threshold(fg_values)
        hi, lo = fg_values[fg_values > split], fg_values[fg_values <= split]
        measurements = [_m(SIGNAL_TO_NOISE, snr, NO_UNITS, "Dietrich SNR: mean(F) / sigma(air)")]
        if hi.size and lo.size:
            measurements.append(_m(CNR, abs(float(hi.mean()) - float(lo.mean())) / sigma, NO_UNITS))
        present = snr < ctx.settings.mr_snr_min
        return _Outcome(IMAGE_NOISE, present, measurements, OTHER_FAILURE, 20.0)

    def _ghosting(self, ctx: _Context) -> _Outcome:
        """Ghost-to-signal ratio (Giannelli et al. 2010, JACMP 11:170; MRIQC ``gsr``) with the
        ghost ROI = air within the object's extent across the phase-encoding axis and the
        non-ghost ROI = the rest of the air; plus EFC (Atkinson 1997) and FBER (Shehzad 2015)."""
        seg = self._segment(ctx)
        sample, fg, air = seg["sample"], seg["fg"], seg["air"]
        axes, note = self._phase_axes(ctx)
        signal = float(sample[fg].mean())
        ratios = []
        for axis in axes:
            ghost_roi, quiet = self._bands(ctx, axis)
            if np.count_nonzero(ghost_roi) >= 200 and np.count_nonzero(quiet) >= 200:
                ratios.append((float(sample[ghost_roi].mean()) - float(sample[quiet].mean())) / signal)
        if not ratios:
            raise _NotComputable("the object fills the field of view across the phase-encoding axis")
        ratio = max(ratios)
        measurements = [_m(GHOST_RATIO, ratio, NO_UNITS, "(mean ghost ROI - mean other air) / mean signal")]
        measurements.append(_m(EFC, _efc(sample), NO_UNITS, "normalised entropy focus criterion"))
        air_energy = float(np.mean(np.square(sample[air], dtype=np.float64))) if air.any() else 0.0
        if air_energy > 1e-3:
            fber = float(np.mean(np.square(sample[fg], dtype=np.float64))) / air_energy
            measurements.append(_m(FBER, fber, NO_UNITS, "mean |F|^2 / mean |B|^2"))
        present = ratio > ctx.settings.mr_ghost_ratio_max
        return _Outcome(GHOST, present, measurements, MOTION_BLUR, 30.0, [note] if note else [])


def _mr_foreground_threshold(sample: F32) -> float:
    """Air/tissue threshold of a magnitude MR image: 5 sigma of the Rayleigh air noise, sigma taken
    as the mode of the histogram below Otsu's threshold (the Rayleigh mode equals sigma), so that
    dark tissue is not mistaken for air. Bounded by 5 % and 100 % of Otsu's threshold."""
    values = sample.ravel()[:: max(1, sample.size // 4_000_000)]
    otsu = otsu_threshold(values)
    low = values[values <= otsu]
    if low.size < 100 or otsu <= 0:
        return otsu
    hist, edges = np.histogram(low, bins=128, range=(float(low.min()), otsu))
    peak = int(np.argmax(ndimage.uniform_filter1d(hist.astype(np.float64), 3)))
    sigma = float((edges[peak] + edges[peak + 1]) / 2) - float(low.min())
    return float(min(otsu, max(5.0 * sigma + float(low.min()), 0.05 * otsu)))


def _efc(image: npt.NDArray[Any]) -> float:
    """Entropy focus criterion (Atkinson et al. 1997, IEEE TMI 16:903), normalised by its maximum
    as in MRIQC so that images of different sizes compare: 0 = all energy in one voxel."""
    x = np.abs(image.astype(np.float64)).ravel()
    n = x.size
    b_max = math.sqrt(float(np.sum(x * x)))
    if b_max == 0:
        return float("nan")
    efc_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    ratio = x / b_max
    return float(np.sum(ratio * np.log(ratio + 1e-16)) / efc_max)


# --- CR/DX ---------------------------------------------------------------------------------------


class XrQc(_QcAnalyzer):
    """``qc-xr``: exposure (EI/DI, saturation), sharpness, noise and collimation of radiographs."""

    name = "qc-xr"
    # "DR" is not a Modality defined term but some devices send it for DX images.
    modalities = frozenset({"CR", "DX", "RG", "DR"})

    def checks(self) -> list[tuple[str, Callable[[_Context], _Outcome]]]:
        return [
            ("exposure", self._exposure),
            ("sharpness", self._sharpness),
            ("noise", self._noise),
            ("collimation", self._collimation),
        ]

    def _field(self, ctx: _Context) -> dict[str, Any]:
        """The exposed field inside uniform collimator shutter bands, per image."""
        if "xr" in ctx.cache:
            return dict(ctx.cache["xr"])
        images = ctx.volume.pixels[ctx.sampled]
        boxes = [_shutter_box(image) for image in images]
        seg = {"images": images, "boxes": boxes}
        ctx.cache["xr"] = seg
        return dict(seg)

    def _exposure(self, ctx: _Context) -> _Outcome:
        """Deviation Index DI = 10 log10(EI / EI_T) (IEC 62494-1; AAPM TG-116, Shepard 2009):
        |DI| > 3 means under (-) or over (+) exposure by a factor of 2. Without DI, the fraction of
        field pixels saturated at an end of the stored range decides; with DI it is only reported
        (presentation processing routinely burns the directly exposed background out)."""
        s = ctx.settings
        from dicomnode.imaging import stored_value_range

        measurements: list[Measurement] = []
        verdicts: list[Code] = []
        notes: list[str] = []
        ei = _float(ctx.header_value("ExposureIndex"))
        target = _float(ctx.header_value("TargetExposureIndex"))
        di = _float(ctx.header_value("DeviationIndex"))
        if ei is not None:
            measurements.append(_m(EXPOSURE_INDEX, ei, NO_UNITS))
        if target is not None:
            measurements.append(_m(TARGET_EXPOSURE_INDEX, target, NO_UNITS))
        if di is None and ei is not None and target is not None and ei > 0 and target > 0:
            di = 10.0 * math.log10(ei / target)
            notes.append("Deviation Index computed from Exposure Index and Target Exposure Index")
        if di is not None:
            measurements.append(_m(DEVIATION_INDEX, di, NO_UNITS))
            if di > s.xr_deviation_index_max:
                verdicts.append(OVER_EXPOSED)
            elif di < -s.xr_deviation_index_max:
                verdicts.append(UNDER_EXPOSED)
        seg = self._field(ctx)
        low_fraction = high_fraction = 0.0
        header = ctx.volume.headers[0] if ctx.volume.headers else None
        value_range = stored_value_range(header) if header is not None else None
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            inside = image[r0:r1, c0:c1]
            lo, hi = value_range if value_range is not None else (float(image.min()), float(image.max()))
            tol = 0.002 * (hi - lo)
            low_fraction = max(low_fraction, float(np.mean(inside <= lo + tol)))
            high_fraction = max(high_fraction, float(np.mean(inside >= hi - tol)))
        if value_range is None:
            notes.append("Bits Stored absent: saturation judged at the image minimum and maximum")
        clipped = 100.0 * max(low_fraction, high_fraction)
        measurements.append(_m(CLIPPED_FRACTION, clipped, PERCENT, "field pixels at an end of the range"))
        if di is not None:
            notes.append("Deviation Index present: it alone decides the exposure verdict")
        elif clipped > s.xr_clipped_max_percent:
            # Which end receives the most X-rays: Pixel Intensity Relationship Sign (0028,1041)
            # refers to stored values; MONOCHROME1 images were inverted by imaging.load_volume.
            sign = _float(ctx.header_value("PixelIntensityRelationshipSign"))
            inverted = str(ctx.header_value("PhotometricInterpretation") or "").upper() == "MONOCHROME1"
            # without the sign, assume presentation: direct exposure is displayed dark
            high_end_is_over = False if sign is None else (sign > 0) != inverted
            saturated_high = high_fraction >= low_fraction
            verdicts.append(OVER_EXPOSED if saturated_high == high_end_is_over else UNDER_EXPOSED)
        present = bool(verdicts)
        return _Outcome(
            DETECTOR_EXPOSURE,
            present,
            measurements,
            verdicts[0] if verdicts else OVER_EXPOSED,
            30.0,
            notes,
        )

    def _sharpness(self, ctx: _Context) -> _Outcome:
        """No-reference blur metric of Crete et al. 2007 (Proc. SPIE 6492, 64920I): how little the
        neighbour differences drop when the image is re-blurred (0 sharp, 1 blurred), computed on
        a median-filtered image of <= 512 pixels so that noise does not pass for detail. The
        normalised variance of the Laplacian (Pech-Pacheco et al. 2000) is reported alongside."""
        seg = self._field(ctx)
        blurs, lapvs = [], []
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            inside = image[r0:r1, c0:c1].astype(np.float32)
            work = _downsample(inside, 512)
            if min(work.shape) < 32:
                continue
            work = ndimage.median_filter(work, size=3)
            blurs.append(_crete_blur(work[4:-4, 4:-4]))
            lap = ndimage.laplace(work)[4:-4, 4:-4]
            variance = float(np.var(work))
            lapvs.append(float(np.var(lap)) / variance if variance > 0 else float("nan"))
        if not blurs:
            raise _NotComputable("exposed field too small")
        blur_value = max(blurs)
        present = blur_value > ctx.settings.xr_blur_max
        return _Outcome(
            SHARPNESS,
            present,
            [
                _m(BLUR_METRIC, blur_value, NO_UNITS, "0 sharp .. 1 blurred"),
                _m(LAPLACIAN_VARIANCE, float(np.nanmin(lapvs)), NO_UNITS, "var(Laplacian) / var(image)"),
            ],
            MOTION_BLUR,
            30.0,
        )

    def _noise(self, ctx: _Context) -> _Outcome:
        """Wavelet-MAD noise sigma inside the field relative to its 1-99 percentile range."""
        seg = self._field(ctx)
        worst = 0.0
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            inside = image[r0:r1, c0:c1]
            p1, p99 = np.percentile(inside[:: max(1, inside.shape[0] // 512)], [1, 99])
            if p99 <= p1:
                continue
            sigma = wavelet_noise_sigma(inside)
            if math.isfinite(sigma):
                worst = max(worst, 100.0 * sigma / float(p99 - p1))
        present = worst > ctx.settings.xr_noise_max_percent
        return _Outcome(
            IMAGE_NOISE,
            present,
            [_m(RELATIVE_NOISE, worst, PERCENT, "wavelet MAD sigma / (P99 - P1) of the field")],
            UNDER_EXPOSED,
            20.0,
        )

    def _collimation(self, ctx: _Context) -> _Outcome:
        """Exposed field inside uniform shutter bands; a small field means the anatomy is likely cut."""
        seg = self._field(ctx)
        fractions = []
        sides = []
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            fractions.append(100.0 * (r1 - r0) * (c1 - c0) / image.size)
            sides.append(int(r0 > 0) + int(r1 < image.shape[0]) + int(c0 > 0) + int(c1 < image.shape[1]))
        field_percent = min(fractions)
        present = field_percent < ctx.settings.xr_field_min_percent
        return _Outcome(
            COLLIMATION,
            present,
            [_m(COLLIMATED_FIELD, field_percent, PERCENT, f"shutter borders seen on {max(sides)} side(s)")],
            POSITIONING,
            15.0,
        )


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _downsample(image: F32, longest: int) -> F32:
    """Block mean by the smallest integer factor that brings the longest side to <= ``longest``."""
    factor = max(1, math.ceil(max(image.shape) / longest))
    if factor == 1:
        return image
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return np.asarray(blocks.mean(axis=(1, 3), dtype=np.float32), dtype=np.float32)


def _crete_blur(image: F32) -> float:
    """Crete et al. 2007 blur metric: max over directions of (s_F - s_V) / s_F (0 sharp, 1 blurry)."""
    values = []
    for axis in (0, 1):
        reblurred = ndimage.uniform_filter1d(image, size=9, axis=axis)
        d_f = np.abs(np.diff(image, axis=axis))
        d_b = np.abs(np.diff(reblurred, axis=axis))
        s_f = float(d_f.sum())
        if s_f <= 0:
            continue
        s_v = float(np.maximum(0.0, d_f - d_b).sum())
        values.append((s_f - s_v) / s_f)
    return max(values) if values else 1.0


def _shutter_box(image: F32) -> tuple[int, int, int, int]:
    """Rows and columns at the image border that are uniform (SD < 0.5 % of the image range) are
    collimator shutters burnt into the image; returns the exposed field as (row0, row1, col0,
    col1), half-open. At most 40 % of the image is taken from each side."""
    lo, hi = float(image.min()), float(image.max())
    flat = 0.005 * (hi - lo)
    rows, cols = image.shape
    row_sd, col_sd = image.std(axis=1), image.std(axis=0)

    def run(sd: npt.NDArray[Any], limit: int) -> int:
        count = 0
        while count < limit and sd[count] <= flat:
            count += 1
        return count

    return (
        run(row_sd, int(0.4 * rows)),
        rows - run(row_sd[::-1], int(0.4 * rows)),
        run(col_sd, int(0.4 * cols)),
        cols - run(col_sd[::-1], int(0.4 * cols)),
    )
