"""Model runtime: a model is a folder holding ``manifest.toml`` and a ``torch.export`` (.pt2) or TorchScript file.

The manifest says what the model looks at (filter), how to prepare pixels (input), what comes out
(output: coded labels, optionally masks) and how probabilities map to a triage priority. The runtime
is generic: a new model needs a folder, not code. Outputs are coded so that ``results`` can write
them as TID 1500 measurement groups (PS3.16 TID 1501 / TID 1411) and a Segmentation (PS3.3 A.51),
with Segmented Property Category and Type taken from CID 7150 / CID 7151.

Inference streams the volume through the network in batches of slices, so memory is bounded by
one batch of float tensors plus the outputs (a boolean mask and one score per slice), whatever the
series length. Bad input never raises out of :meth:`TorchAnalyzer.analyze`: it gives FAILED findings
whose ``error`` says what was wrong.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import tomllib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.domain import (
    AnalyzerKind,
    Code,
    Finding,
    Findings,
    FindingsStatus,
    Mask,
    Measurement,
    Priority,
    SeriesSummary,
    Volume,
)
from dicomnode.imaging import Reorientation, canonical_reorientation
from dicomnode.models import Analyzer, AnalyzerSpec

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

    from dicomnode.config import AnalysisSettings

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MANIFEST_NAME = "manifest.toml"

# On CPU a 2-D model is streamed in batches of at most this many bytes of source pixels (float32),
# or the manifest's batch_size if smaller: every intermediate of a small batch (windows, resampled
# input, activations, probabilities back on the source grid) stays in the CPU caches. Demo model,
# 200 slices of 512x512 on one core: 4.1 s in batches of 16 slices, 2.5 s in batches of 4.
CPU_BATCH_BYTES = 4 * 2**20

#: SNOMED CT 118565006 "Volume" and UCUM "ml" for the lesion volume (PS3.16 TID 1411 row 8).
VOLUME_CODE = Code("118565006", "SCT", "Volume")
MILLILITER = Code("ml", "UCUM", "milliliter")


# --- manifest ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept (PS3.3 8.8): code value, coding scheme designator ("SCT", "DCM"), meaning."""

    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    meaning: str = Field(min_length=1)

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class FilterSpec(_Strict):
    """Which series the model applies to. Each non-empty list must match (case-insensitive globs,
    or regular expressions with a ``re:`` prefix); ``modalities`` is compared exactly."""

    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] = Field(default_factory=list)
    series_descriptions: list[str] = Field(default_factory=list)

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.strip().upper() for m in value]

    @field_validator("body_parts", "series_descriptions")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            try:
                _pattern(pattern)
            except re.error as exc:
                raise ValueError(f"[{i}] invalid regular expression {pattern!r}: {exc}") from None
        return value


class WindowSpec(_Strict):
    """A VOI window (PS3.3 C.11.2.1.2, linear): values map to [0, 1], clipped outside."""

    center: float
    width: float = Field(gt=0)


class NormalizeSpec(_Strict):
    """Z-score normalisation ``(x - mean) / std``; without mean/std, per-series statistics."""

    mean: float | None = None
    std: float | None = Field(default=None, gt=0)


class InputSpec(_Strict):
    """How to turn Volume pixels (HU for CT) into network input.

    ``orientation="canonical"`` (default): the volume is first transposed and flipped to axial
    slices from inferior to superior, rows from anterior to posterior and columns from patient
    right to left (:func:`dicomnode.imaging.canonical_reorientation`, from Image Orientation
    (Patient)), and masks are mapped back, so one anatomy gets one verdict however the scanner
    encoded it; ``"stored"`` feeds the stored order unchanged. ``antialias``: when shrinking
    in-plane, average the source pixels (torch ``antialias=True``) instead of sampling them
    bilinearly, so that a 0.4 mm series is not fed noisier pixels than a 1 mm one.
    ``mode="2d"``: one slice at a time, resampled in-plane to ``spacing`` (mm, rows x columns) or
    to ``size`` (pixels); ``windows`` give one channel each. ``mode="3d"``: the whole volume
    resampled to ``size`` (slices, rows, columns), so memory is bounded by ``size``.
    """

    mode: Literal["2d", "3d"] = "2d"
    orientation: Literal["canonical", "stored"] = "canonical"
    antialias: bool = False
    spacing: list[float] | None = None
    size: list[int] | None = None
    windows: list[WindowSpec] = Field(default_factory=list)
    normalize: NormalizeSpec | None = None
    channels: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1, le=4096)

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if self.windows and self.normalize is not None:
            raise ValueError("give either windows or normalize, not both")
        if not self.windows and self.normalize is None:
            raise ValueError("give windows or normalize")
        wanted = len(self.windows) if self.windows else 1
        if self.channels != wanted:
            raise ValueError(f"channels is {self.channels} but the intensity settings give {wanted}")
        dims = 2 if self.mode == "2d" else 3
        if self.spacing is not None and self.size is not None:
            raise ValueError("give either spacing or size, not both")
        if self.spacing is not None and (len(self.spacing) != 2 or self.mode != "2d"):
            raise ValueError("spacing must be [rows, columns] in mm and is for mode '2d' only")
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ValueError("spacing must be positive")
        if self.size is not None and (len(self.size) != dims or min(self.size) < 1):
            raise ValueError(f"size must be {dims} positive integers for mode {self.mode!r}")
        if self.mode == "3d" and self.size is None:
            raise ValueError("mode '3d' needs size, so that memory is bounded")
        return self


class LabelSpec(_Strict):
    """One output channel: the finding looked for, coded, plus SEG properties for masks.

    ``code`` is the finding type (e.g. SCT 50960005 Hemorrhage); ``category``/``type`` are the
    Segmented Property Category (CID 7150) and Type (CID 7151) of the mask; ``threshold`` is the
    series probability at or above which the finding is reported present.
    """

    name: str = Field(min_length=1, max_length=64)
    code: CodeSpec
    category: CodeSpec | None = None
    type: CodeSpec | None = None
    threshold: float = Field(default=0.5, ge=0, le=1)


class OutputSpec(_Strict):
    """What the network returns: ``classification`` -> logits (N, labels); ``segmentation`` ->
    logits (N, labels, rows, columns) in 2D or (1, labels, slices, rows, columns) in 3D.

    For segmentation, a slice's score is the mean of its ``top_k`` highest pixel probabilities
    (robust to single-pixel spikes) and the series probability is the highest slice score; the
    mask is the pixels whose probability reaches ``mask_threshold``.

    With ``min_lesion_ml`` > 0 (2-D segmentation only) the series decision is made in 3-D
    instead: the thresholded probability map is split into connected regions (26-connected, on
    the network's grid), and a region counts only when its volume reaches ``min_lesion_ml``. Its
    score is the mean of its ``top_k`` highest probabilities; a smaller region's score is scaled by
    ``volume / min_lesion_ml x threshold`` so that it stays below the label's threshold. The series
    probability is the highest region score, and the mask keeps only the regions that count: a
    lone bright voxel on one slice no longer decides a series.

    ``min_lesion_extent_mm`` adds agreement across adjacent slices: a region counts only when it
    also spans at least this distance along the slice axis (slices it touches x slice spacing), so
    a flat spot on one or two thin slices cannot decide a series while a single slice that is
    itself that thick still can. A region failing either rule is scaled by the smaller of its two
    fractions (volume / min_lesion_ml, extent / min_lesion_extent_mm).

    ``min_intracranial_fraction`` (CT head models) adds where: a region counts only when at least
    this fraction of its voxels lies in the cranial cavity (:func:`cranial_cavity`), so tissue of
    the face, neck or scalp that looks like the target (muscle is as dense as a small bleed) cannot
    decide a series, however a network trained on brain slices reacts to it. A region failing it
    is scaled by fraction / min_intracranial_fraction like the others.
    """

    kind: Literal["classification", "segmentation"]
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    labels: list[LabelSpec] = Field(min_length=1)
    mask_threshold: float = Field(default=0.5, gt=0, lt=1)
    top_k: int = Field(default=1, ge=1)
    min_lesion_ml: float = Field(default=0.0, ge=0)
    min_lesion_extent_mm: float = Field(default=0.0, ge=0)
    min_intracranial_fraction: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _masks_need_codes(self) -> OutputSpec:
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("labels: names must be unique")
        if self.kind == "segmentation":
            for i, label in enumerate(self.labels):
                if label.category is None or label.type is None:
                    raise ValueError(f"labels[{i}]: segmentation labels need category and type")
        elif self.min_lesion_ml > 0:
            raise ValueError("min_lesion_ml: applies to segmentation models only")
        if self.min_lesion_extent_mm > 0 and self.min_lesion_ml == 0:
            raise ValueError("min_lesion_extent_mm: needs min_lesion_ml (the 3-D region decision)")
        if self.min_intracranial_fraction > 0 and self.min_lesion_ml == 0:
            raise ValueError("min_intracranial_fraction: needs min_lesion_ml (the 3-D region decision)")
        return self


class ThresholdSpec(_Strict):
    """Series probability of ``label`` at or above ``probability`` -> triage ``priority``."""

    label: str
    probability: float = Field(ge=0, le=1)
    priority: Literal["stat", "routine"]


class Manifest(_Strict):
    """``manifest.toml`` of one model folder."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    kind: Literal["triage", "qc"] = "triage"
    not_for_clinical_use: bool
    model_file: str = "model.pt"
    model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    gpu: bool = Field(default=False, description="run on a cluster's GPU queue when one is configured")
    filter: FilterSpec
    input: InputSpec
    output: OutputSpec
    thresholds: list[ThresholdSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _threshold_labels(self) -> Manifest:
        if self.output.min_lesion_ml > 0 and self.input.mode != "2d":
            raise ValueError("output.min_lesion_ml: applies to mode '2d' models only")
        if self.output.min_intracranial_fraction > 0 and self.filter.modalities != ["CT"]:
            raise ValueError(
                "output.min_intracranial_fraction: finds the skull in HU, so filter.modalities must be [\"CT\"]"
            )
        names = {label.name for label in self.output.labels}
        for i, threshold in enumerate(self.thresholds):
            if threshold.label not in names:
                known = ", ".join(sorted(names))
                raise ValueError(f"thresholds[{i}].label: unknown label {threshold.label!r} (known: {known})")
        return self


class ManifestError(ValueError):
    """A model folder is unusable; the message is one line naming the file and the bad key."""


def _location(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not str(part).startswith("function-"):
            text += ("." if text else "") + str(part)
    return text


def _validation_lines(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors():
        loc = _location(tuple(item["loc"]))
        if item["type"] == "missing":
            message = "missing"
        elif item["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
        # Nested validators may address a sub-item themselves ("labels[0]: ..." / "[0] ...").
        if message.startswith("[") and loc:
            index, _, rest = message.partition(" ")
            lines.append(f"{loc}{index}: {rest}")
        elif ": " in message and message.split(":", 1)[0].split("[")[0].split(".")[0].isidentifier() and loc:
            lines.append(f"{loc}.{message}")
        elif loc:
            lines.append(f"{loc}: {message}")
        else:
            lines.append(message)
    return lines


def load_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/manifest.toml`` and check the model file exists.

    Raises :class:`ManifestError` with one line, e.g. ``manifest.toml: output.labels[0].code: missing``.
    """
    path = folder / MANIFEST_NAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"{MANIFEST_NAME}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{MANIFEST_NAME}: not valid TOML: {exc}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{MANIFEST_NAME}: " + "; ".join(_validation_lines(exc))) from None
    if not (folder / manifest.model_file).is_file():
        raise ManifestError(f"{MANIFEST_NAME}: model_file: {manifest.model_file!r} not found in {folder}")
    return manifest


def _pattern(text: str) -> re.Pattern[str]:
    from dicomnode.config import compile_pattern

    return compile_pattern(text)


def _applies_to(manifest: Manifest) -> Any:
    body = [_pattern(p) for p in manifest.filter.body_parts]
    desc = [_pattern(p) for p in manifest.filter.series_descriptions]

    def applies(series: SeriesSummary) -> bool:
        if body and not any(p.fullmatch(series.body_part.strip()) for p in body):
            return False
        return not (desc and not any(p.fullmatch(series.series_description.strip()) for p in desc))

    return applies


# --- device -------------------------------------------------------------------------------------


def select_device(preference: str) -> str:
    """``"cuda"`` when CUDA is available and ``preference`` allows it ("auto" or "cuda"), else "cpu"."""
    import torch

    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


# --- analyzer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Raw model output. ``probabilities`` is the series probability of each label (what the
    findings report); ``slice_scores`` one score per slice and label along the slice axis the
    network saw (the canonical axial axis unless ``input.orientation = "stored"``; 3D models repeat
    the series score); ``masks`` one boolean mask per label on the source grid (segmentation)."""

    probabilities: npt.NDArray[np.float32]  # (labels,)
    slice_scores: npt.NDArray[np.float32]  # (slices as seen by the network, labels)
    masks: list[npt.NDArray[np.bool_]] | None  # one (slices, rows, columns) per label, source order
    components: tuple[tuple[Component, ...], ...] = ()  # per label, with output.min_lesion_ml


@dataclass(frozen=True)
class Component:
    """One connected region of the thresholded probability map (``output.min_lesion_ml`` > 0)."""

    volume_ml: float
    score: float  # mean of the top_k probabilities inside the region
    kept: bool  # counts: volume, extent and intracranial fraction reach their minimums
    extent_mm: float = 0.0  # along the slice axis: slices it touches x slice spacing
    intracranial_fraction: float = 1.0  # of its voxels in the cranial cavity (1 when not asked)


def region_fraction(
    volume_ml: float, extent_mm: float, min_lesion_ml: float, min_lesion_extent_mm: float,
    intracranial_fraction: float = 1.0, min_intracranial_fraction: float = 0.0,
) -> float:
    """How far a region reaches towards counting (OutputSpec): the smallest of volume /
    min_lesion_ml, extent / min_lesion_extent_mm and intracranial fraction /
    min_intracranial_fraction, each 1 when there is no such minimum; it counts at >= 1."""
    volume = volume_ml / min_lesion_ml if min_lesion_ml > 0 else 1.0
    extent = extent_mm / min_lesion_extent_mm if min_lesion_extent_mm > 0 else 1.0
    inside = intracranial_fraction / min_intracranial_fraction if min_intracranial_fraction > 0 else 1.0
    return min(volume, extent, inside)


BONE_HU = 250.0  # above cancellous and partial-volume skull, below cortical bone


def convex_fill(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The filled convex hull of a 2D mask (half-plane test against each hull edge)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(mask)
    if points.shape[0] < 3:
        return np.zeros_like(mask)
    try:
        hull = ConvexHull(points)
    except QhullError:
        return np.zeros_like(mask)
    grid = np.indices(mask.shape).reshape(2, -1).T.astype(np.float64)
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    result: npt.NDArray[np.bool_] = inside.reshape(mask.shape)
    return result


def cranial_cavity(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """(slices, rows, columns) HU, axial -> where the cranial cavity may be: on each slice the
    filled convex hull of the largest connected bone component (> BONE_HU), less that bone.

    The hull rather than the holes of a closed skull ring, because a ring is open at foramina, at
    the skull base and after a craniotomy (the one real head CT here has a frontal defect 2 cm
    wide). Below the skull base the largest bone is the mandible or a vertebra, and the muscles of
    the face and neck lie mostly outside its hull; a slice without bone has no cavity."""
    return np.stack([_cavity_of_bone(slice_ > BONE_HU) for slice_ in hu]) if len(hu) else np.zeros(hu.shape, bool)


def _cavity_of_bone(bone: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """One slice of :func:`cranial_cavity` from its bone mask."""
    from dicomnode.models.qc.common import largest_component

    skull = largest_component(bone)
    cavity: npt.NDArray[np.bool_] = convex_fill(skull) & ~skull
    return cavity


class TorchAnalyzer:
    """A loaded TorchScript model plus its manifest; implements the ``Analyzer`` protocol."""

    def __init__(self, manifest: Manifest, module: torch.nn.Module, device: str) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.kind = AnalyzerKind(manifest.kind)
        self.device = device
        self._module = module

    # The public entry point: never raises for bad input.
    def analyze(self, volume: Volume) -> Findings:
        start = time.monotonic()
        problem = self._refuse(volume)
        if problem:
            return self._failed(problem, start)
        notes = tuple(volume.problems)
        try:
            scores = self.predict(volume)
        except Exception as exc:  # a model error must become FAILED findings, not a dead worker
            return self._failed(f"inference failed: {type(exc).__name__}: {exc}", start)
        findings = self._findings(volume, scores)
        priority = self._priority(findings)
        return Findings(
            analyzer=self.name,
            version=self.version,
            kind=self.kind,
            status=FindingsStatus.PARTIAL if notes else FindingsStatus.COMPLETE,
            findings=findings,
            priority=priority,
            notes=notes,
            duration_s=time.monotonic() - start,
            not_for_clinical_use=self.manifest.not_for_clinical_use,
        )

    def warm_up(self) -> None:
        """Run the network twice on a small blank 2-D batch: TorchScript's profiling executor
        and oneDNN prepare their kernels on the first calls, which would otherwise slow the
        first series a worker analyses. 3-D models are left alone (their input is large)."""
        import torch

        spec = self.manifest.input
        if spec.mode != "2d":
            return
        x = torch.zeros((2, spec.channels, 64, 64), device=self.device)
        if self.device == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(2):
                self._module(x)

    def _failed(self, error: str, start: float) -> Findings:
        return Findings(
            analyzer=self.name,
            version=self.version,
            kind=self.kind,
            status=FindingsStatus.FAILED,
            error=error,
            duration_s=time.monotonic() - start,
            not_for_clinical_use=self.manifest.not_for_clinical_use,
        )

    def _refuse(self, volume: Volume) -> str:
        modalities = self.manifest.filter.modalities
        if volume.modality.upper() not in modalities:
            return (
                f"modality {volume.modality or '(none)'!r} is not handled by {self.name} "
                f"(expects {', '.join(modalities)})"
            )
        pixels = volume.pixels
        if pixels.ndim != 3:
            return f"pixels must be (slices, rows, columns), got {pixels.ndim} dimensions"
        if 0 in pixels.shape:
            return f"empty volume (shape {tuple(pixels.shape)})"
        for problem in volume.problems:
            text = problem.lower()
            if "frame of reference" in text or "frames of reference" in text:
                return f"inconsistent geometry: {problem}"
        if not all(math.isfinite(s) and s > 0 for s in volume.spacing):
            return f"invalid pixel spacing {volume.spacing}"
        return ""

    # -- inference ---------------------------------------------------------------------------

    def _intensity(self, x: torch.Tensor, volume_stats: tuple[float, float] | None) -> torch.Tensor:
        """(N, H, W) HU -> (N, C, H, W) network input per the manifest's windows/normalisation."""
        import torch

        spec = self.manifest.input
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if spec.windows:
            # Written straight into the (N, C, H, W) result: the same values as stacking the
            # channels, without a second full-resolution copy.
            out = x.new_empty((x.shape[0], len(spec.windows), *x.shape[1:]))
            for k, w in enumerate(spec.windows):
                channel = out[:, k]
                torch.sub(x, w.center - w.width / 2, out=channel)
                channel.div_(w.width).clamp_(0.0, 1.0)
            return out
        norm = spec.normalize
        assert norm is not None
        mean = norm.mean if norm.mean is not None else (volume_stats[0] if volume_stats else 0.0)
        std = norm.std if norm.std is not None else (volume_stats[1] if volume_stats else 1.0)
        return ((x - mean) / max(std, 1e-6)).unsqueeze(1)

    def _volume_stats(self, volume: Volume) -> tuple[float, float] | None:
        norm = self.manifest.input.normalize
        if norm is None or (norm.mean is not None and norm.std is not None):
            return None
        mean = 0.0
        sq = 0.0
        n = 0
        for k in range(volume.pixels.shape[0]):  # per slice, so no float64 copy of the volume
            s = np.nan_to_num(volume.pixels[k].astype(np.float64))
            mean += float(s.sum())
            sq += float((s * s).sum())
            n += s.size
        mean /= n
        return mean, math.sqrt(max(sq / n - mean * mean, 1e-12))

    def _target_hw(self, rows: int, cols: int, spacing: tuple[float, float, float]) -> tuple[int, int]:
        spec = self.manifest.input
        if spec.size is not None:
            return spec.size[-2], spec.size[-1]
        if spec.spacing is not None:
            return (
                max(1, round(rows * spacing[1] / spec.spacing[0])),
                max(1, round(cols * spacing[2] / spec.spacing[1])),
            )
        return rows, cols

    def reorientation(self, volume: Volume) -> Reorientation:
        """How the volume is transposed/flipped before inference (identity with ``orientation =
        "stored"`` or without usable Image Orientation (Patient))."""
        if self.manifest.input.orientation == "stored":
            return Reorientation()
        return canonical_reorientation(volume.orientation)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        act = self.manifest.output.activation
        if act == "sigmoid":
            return torch.sigmoid(logits)
        if act == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def _batches(self, n: int, slice_bytes: int = 0) -> Iterator[slice]:
        """Slices of the volume fed together: ``batch_size`` from the manifest, fewer on CPU for
        large slices (see :data:`CPU_BATCH_BYTES`); each slice is independent in an eval-mode
        network, so the outputs do not depend on it (up to float rounding order)."""
        size = self.manifest.input.batch_size
        if self.device == "cpu" and slice_bytes > 0:
            size = max(1, min(size, CPU_BATCH_BYTES // slice_bytes))
        for first in range(0, n, size):
            yield slice(first, min(n, first + size))

    def predict(self, volume: Volume) -> Prediction:
        """Run the network over ``volume`` (already checked), streaming batches of slices.

        The volume is seen in canonical orientation (see :class:`InputSpec`); slice scores follow
        that order and masks are mapped back to the source grid. Memory: one batch of float
        tensors, a boolean mask per label and, with ``output.min_lesion_ml``, the probability map
        on the network's grid as float16 (200 slices at 128 x 128: 6.6 MB), plus a bone mask on that
        grid (1 byte a voxel) with ``output.min_intracranial_fraction``."""
        import torch
        from torch.nn.functional import interpolate

        if self.manifest.input.mode == "3d":
            return self._infer_3d(volume)
        out = self.manifest.output
        reorientation = self.reorientation(volume)
        pixels = reorientation.apply(volume.pixels)  # a view: no copy of the volume
        spacing = reorientation.spacing(volume.spacing)
        n, rows, cols = pixels.shape
        n_labels = len(out.labels)
        target = self._target_hw(rows, cols, spacing)
        stats = self._volume_stats(volume)
        slice_scores = np.zeros((n, n_labels), dtype=np.float32)
        segmentation = out.kind == "segmentation"
        by_component = segmentation and out.min_lesion_ml > 0
        masks = (
            [np.zeros((n, rows, cols), dtype=np.bool_) for _ in range(n_labels)]
            if segmentation and not by_component
            else None
        )
        grid = np.zeros((n_labels, n, *target), dtype=np.float16) if by_component else None
        # Bone on the network's grid, for the cranial cavity of the slices a region touches.
        bone = np.zeros((n, *target), dtype=np.bool_) if by_component and out.min_intracranial_fraction > 0 else None
        with torch.inference_mode():
            for batch in self._batches(n, rows * cols * 4):
                x = torch.from_numpy(np.ascontiguousarray(pixels[batch], dtype=np.float32))
                if bone is not None:
                    hu = x[:, None] if (rows, cols) == target else self._resize(x[:, None], target)
                    bone[batch] = (hu[:, 0] > BONE_HU).numpy()
                x = self._intensity(x.to(self.device), stats)
                if (rows, cols) != target:
                    x = self._resize(x, target)
                if x.device.type == "cpu":
                    # oneDNN's NHWC convolutions are about twice as fast on CPU as NCHW for small
                    # 2-D networks; the values differ only by float rounding order.
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self._module(x)
                expected = 4 if segmentation else 2
                if not isinstance(y, torch.Tensor) or y.ndim != expected or y.shape[1] != n_labels:
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(
                        f"model output {shape} does not match output.kind={out.kind!r} "
                        f"with {n_labels} label(s)"
                    )
                p = self._activate(y.float())
                if not segmentation:
                    slice_scores[batch] = p.cpu().numpy()
                    continue
                flat = p.flatten(2)
                k = min(out.top_k, flat.shape[2])
                slice_scores[batch] = flat.topk(k, dim=2).values.mean(dim=2).cpu().numpy()
                if grid is not None:
                    if tuple(p.shape[2:]) != target:
                        raise ValueError(f"model output {tuple(p.shape)} is not on its input grid {target}")
                    grid[:, batch] = p.transpose(0, 1).cpu().numpy()
                    continue
                assert masks is not None
                if tuple(p.shape[2:]) != (rows, cols):
                    p = interpolate(p, size=(rows, cols), mode="bilinear", align_corners=False)
                binary = (p >= out.mask_threshold).cpu().numpy()
                for j in range(n_labels):
                    masks[j][batch] = binary[:, j]
        if not segmentation:
            return Prediction(slice_scores.max(axis=0), slice_scores, None)
        components: tuple[tuple[Component, ...], ...] = ()
        if grid is not None:
            voxel_ml = spacing[0] * (rows * spacing[1] / target[0]) * (cols * spacing[2] / target[1]) / 1000.0
            masks, probabilities, components = self._components(grid, voxel_ml, spacing[0], (rows, cols), bone)
        else:
            assert masks is not None
            probabilities = slice_scores.max(axis=0)
        source_masks = [np.ascontiguousarray(reorientation.undo(m)) for m in masks]
        return Prediction(probabilities.astype(np.float32), slice_scores, source_masks, components)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resampling; anti-aliased when shrinking if ``input.antialias``."""
        from torch.nn.functional import interpolate

        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        antialias = shrink and self.manifest.input.antialias
        return interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)

    def _components(
        self, grid: npt.NDArray[np.float16], voxel_ml: float, slice_mm: float, source_hw: tuple[int, int],
        bone: npt.NDArray[np.bool_] | None = None,
    ) -> tuple[list[npt.NDArray[np.bool_]], npt.NDArray[np.float32], tuple[tuple[Component, ...], ...]]:
        """Series decision from connected regions (``output.min_lesion_ml``), see OutputSpec.

        Returns the canonical-order masks on the source in-plane grid (only regions that count),
        the series probability of each label and every region found."""
        import torch
        from scipy import ndimage
        from torch.nn.functional import interpolate

        out = self.manifest.output
        n_labels, n = grid.shape[:2]
        masks = []
        probabilities = np.zeros(n_labels, dtype=np.float32)
        found: list[tuple[Component, ...]] = []
        structure = np.ones((3, 3, 3), dtype=bool)
        cavity: dict[int, npt.NDArray[np.bool_]] = {}  # slice -> its cranial cavity, when a region needs it

        def intracranial(box: tuple[slice, ...], region: npt.NDArray[np.bool_]) -> float:
            if bone is None:
                return 1.0
            for k in range(box[0].start, box[0].stop):
                if k not in cavity:
                    cavity[k] = _cavity_of_bone(bone[k])
            inside = np.stack([cavity[k][box[1:]] for k in range(box[0].start, box[0].stop)])
            return float(inside[region].mean())

        for j, label in enumerate(out.labels):
            prob = grid[j]
            labels, count = ndimage.label(prob >= out.mask_threshold, structure=structure)
            regions: list[Component] = []
            keep = np.zeros(count + 1, dtype=bool)
            for index, box in enumerate(ndimage.find_objects(labels), start=1):
                if box is None:
                    continue
                region = labels[box] == index
                values = prob[box][region].astype(np.float32)
                volume_ml = float(values.size) * voxel_ml
                score = float(np.sort(values)[-out.top_k :].mean())
                extent_mm = (box[0].stop - box[0].start) * slice_mm
                inside = intracranial(box, region)
                fraction = region_fraction(volume_ml, extent_mm, out.min_lesion_ml, out.min_lesion_extent_mm,
                                           inside, out.min_intracranial_fraction)
                kept = fraction >= 1.0
                keep[index] = kept
                regions.append(Component(round(volume_ml, 4), score, kept, round(extent_mm, 3), round(inside, 4)))
                scaled = score if kept else score * fraction * label.threshold
                probabilities[j] = max(probabilities[j], scaled)
            found.append(tuple(regions))
            mask = np.zeros((n, *source_hw), dtype=np.bool_)
            kept_map = keep[labels]
            if kept_map.any():
                with torch.inference_mode():
                    for batch in self._batches(n):
                        if not kept_map[batch].any():
                            continue
                        p = torch.from_numpy(prob[batch].astype(np.float32))[:, None]
                        k = torch.from_numpy(kept_map[batch].astype(np.float32))[:, None]
                        if tuple(p.shape[2:]) != source_hw:
                            p = interpolate(p, size=source_hw, mode="bilinear", align_corners=False)
                            k = interpolate(k, size=source_hw, mode="nearest")
                        mask[batch] = ((p >= out.mask_threshold) & (k > 0.5))[:, 0].numpy()
            masks.append(mask)
        return masks, probabilities, tuple(found)

    def _infer_3d(self, volume: Volume) -> Prediction:
        import torch
        from torch.nn.functional import interpolate

        out = self.manifest.output
        size = self.manifest.input.size
        assert size is not None
        reorientation = self.reorientation(volume)
        pixels = reorientation.apply(volume.pixels)
        n, rows, cols = pixels.shape
        n_labels = len(out.labels)
        stats = self._volume_stats(volume)
        with torch.inference_mode():
            # Resample slab by slab in-plane first, so no full-resolution float copy is made.
            planes = []
            for batch in self._batches(n):
                x = torch.from_numpy(np.ascontiguousarray(pixels[batch], dtype=np.float32))
                x = self._intensity(x.to(self.device), stats)
                planes.append(self._resize(x, (size[1], size[2])))
            x = torch.cat(planes).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, n, h, w)
            x = interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)
            y = self._module(x)
            segmentation = out.kind == "segmentation"
            expected = 5 if segmentation else 2
            if not isinstance(y, torch.Tensor) or y.ndim != expected or y.shape[1] != n_labels:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"model output {shape} does not match output.kind={out.kind!r} (3d)")
            p = self._activate(y.float())[0]
        if not segmentation:
            series = p.cpu().numpy().astype(np.float32)
            return Prediction(series, np.repeat(series[None, :], n, axis=0), None)
        prob = p.cpu().numpy()  # (labels, d, h, w), bounded by manifest size
        k = min(out.top_k, prob[0].size)
        series = np.sort(prob.reshape(n_labels, -1), axis=1)[:, -k:].mean(axis=1).astype(np.float32)
        # Nearest-neighbour map back to the source grid, one source slice at a time.
        zi = np.minimum(((np.arange(n) + 0.5) * size[0] / n).astype(int), size[0] - 1)
        ri = np.minimum(((np.arange(rows) + 0.5) * size[1] / rows).astype(int), size[1] - 1)
        ci = np.minimum(((np.arange(cols) + 0.5) * size[2] / cols).astype(int), size[2] - 1)
        masks = []
        for j in range(n_labels):
            binary = prob[j] >= out.mask_threshold
            mask = np.zeros((n, rows, cols), dtype=np.bool_)
            for z in range(n):
                mask[z] = binary[zi[z]][np.ix_(ri, ci)]
            masks.append(np.ascontiguousarray(reorientation.undo(mask)))
        return Prediction(series, np.repeat(series[None, :], n, axis=0), masks)

    # -- findings ------------------------------------------------------------------------------

    def _findings(self, volume: Volume, scores: Prediction) -> tuple[Finding, ...]:
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        findings = []
        for j, label in enumerate(self.manifest.output.labels):
            probability = float(scores.probabilities[j])
            present = probability >= label.threshold
            mask = None
            measurements: tuple[Measurement, ...] = ()
            if scores.masks is not None and present and scores.masks[j].any():
                assert label.category is not None and label.type is not None
                array = scores.masks[j]
                mask = Mask(
                    array=array, label=label.name, category=label.category.code(), type=label.type.code()
                )
                measurements = (
                    Measurement(
                        name=VOLUME_CODE,
                        value=round(float(array.sum()) * voxel_ml, 3),
                        unit=MILLILITER,
                        description=f"{label.name} volume",
                    ),
                )
            findings.append(
                Finding(
                    finding_type=label.code.code(),
                    tracking_id=f"{self.name}/{label.name}",
                    present=present,
                    probability=round(probability, 6),
                    measurements=measurements,
                    mask=mask,
                )
            )
        if any(f.mask is not None for f in findings):
            # Once a SEG is written, every label gets its segment (empty when absent), so every
            # measurement group of the report is a TID 1411 one: a report mixing TID 1411 and
            # TID 1501 groups is valid, but validators that judge the template choice over the
            # whole Imaging Measurements container (PixelMed) reject it.
            shape = volume.pixels.shape
            for j, (label, finding) in enumerate(zip(self.manifest.output.labels, findings, strict=True)):
                if finding.mask is None and label.category is not None and label.type is not None:
                    empty = Mask(np.zeros(shape, dtype=np.bool_), label.name, label.category.code(), label.type.code())
                    findings[j] = replace(finding, mask=empty)
        return tuple(findings)

    def _priority(self, findings: tuple[Finding, ...]) -> Priority:
        by_label = {label.name: f for label, f in zip(self.manifest.output.labels, findings, strict=True)}
        priority = Priority.ROUTINE
        for threshold in self.manifest.thresholds:
            probability = by_label[threshold.label].probability or 0.0
            if probability >= threshold.probability:
                priority = min(priority, Priority.parse(threshold.priority))
        return priority


_DEFAULT_CPU_THREADS: int | None = None


def set_cpu_threads(threads: int | None) -> None:
    """Intra-op threads torch may use on CPU from now on in this process; ``None`` restores torch's
    own default (one per physical core). The analysis job lowers it while other analyzers run
    beside a model, so that the cores are shared instead of oversubscribed."""
    import torch

    global _DEFAULT_CPU_THREADS
    if _DEFAULT_CPU_THREADS is None:
        _DEFAULT_CPU_THREADS = torch.get_num_threads()
    wanted = _DEFAULT_CPU_THREADS if threads is None else max(1, threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


#: File suffixes read with ``torch.export.load`` (an ExportedProgram); anything else is TorchScript.
EXPORT_SUFFIXES = (".pt2",)


def load_model(folder: Path, device: str = "cpu") -> TorchAnalyzer:
    """Load a model folder: validate the manifest, check the file hash if given, load the network.

    ``model_file`` ending in ``.pt2`` is a ``torch.export`` program (``torch.export.save``), run
    through ``ExportedProgram.module()``; any other file is TorchScript (``torch.jit.save``),
    deprecated upstream since torch 2.10 but still loaded, so existing user models keep working.
    """
    import torch

    manifest = load_manifest(folder)
    path = folder / manifest.model_file
    if manifest.model_sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != manifest.model_sha256:
            raise ManifestError(f"{MANIFEST_NAME}: model_sha256: {manifest.model_file} has sha256 {digest}")
    module: Any
    if path.suffix in EXPORT_SUFFIXES:
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ManifestError(
                f"{MANIFEST_NAME}: model_file: {manifest.model_file} is not a torch.export program "
                f"({type(exc).__name__}: {exc})"
            ) from None
        module = program.module()
        if device != "cpu":
            module = module.to(device)
    else:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript in favour of torch.export, but still loads it;
            # the warning would otherwise fire once per worker process (an error under pytest).
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning
            )
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        module.eval()
    return TorchAnalyzer(manifest, module, device)


# --- discovery ----------------------------------------------------------------------------------


def model_folders(settings: AnalysisSettings) -> list[Path]:
    """Shipped model folders (when enabled) then ``settings.model_dirs``; a configured folder is
    either a model folder itself or a folder of model folders."""
    folders: list[Path] = []
    roots: list[Path] = [SHIPPED_DIR] if settings.shipped_models and SHIPPED_DIR.is_dir() else []
    for root in roots:
        folders += sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    for configured in settings.model_dirs:
        path = Path(configured)
        if (path / MANIFEST_NAME).is_file() or not path.is_dir():
            folders.append(path)
        else:
            folders += sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    return folders


def _unavailable(name: str, reason: str) -> AnalyzerSpec:
    def load() -> Analyzer:
        raise ManifestError(reason)

    return AnalyzerSpec(
        name=name,
        version="",
        kind=AnalyzerKind.TRIAGE,
        modalities=frozenset(),
        load=load,
        unavailable=reason,
    )


def spec_for(folder: Path, device_preference: str = "auto") -> AnalyzerSpec:
    """A spec for one model folder; a malformed folder gives a spec whose ``unavailable`` says why.
    Reads only the manifest: torch is imported and the device chosen when ``load`` runs."""
    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:
        return _unavailable(folder.name, f"{folder}: {exc}")

    def load() -> Analyzer:
        return load_model(folder, select_device(device_preference))

    clinical = "" if not manifest.not_for_clinical_use else "NOT FOR CLINICAL USE. "
    return AnalyzerSpec(
        name=manifest.name,
        version=manifest.version,
        kind=AnalyzerKind(manifest.kind),
        modalities=frozenset(manifest.filter.modalities),
        load=load,
        description=clinical + manifest.description,
        applies_to=_applies_to(manifest),
        gpu=manifest.gpu,
    )


def specs(settings: AnalysisSettings) -> list[AnalyzerSpec]:
    """Specs of the shipped models and of ``settings.model_dirs``. Nothing is loaded here."""
    result: list[AnalyzerSpec] = []
    seen: dict[str, Path] = {}
    for folder in model_folders(settings):
        if not folder.is_dir():
            result.append(_unavailable(folder.name or str(folder), f"{folder}: model folder not found"))
            continue
        spec = spec_for(folder, settings.device)
        if spec.name in seen:
            reason = f"{folder}: model name {spec.name!r} is already provided by {seen[spec.name]}"
            spec = _unavailable(f"{spec.name}@{len(result)}", reason)
        seen.setdefault(spec.name, folder)
        result.append(spec)
    return result
