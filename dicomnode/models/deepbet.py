"""deepbet brain extraction on T1-weighted brain MR: brain mask, brain volume, coverage check.

deepbet (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI using Convolutional
Neural Networks", Computers in Biology and Medicine 2024; MIT licence) ships its two TorchScript
networks inside the wheel, so nothing is downloaded at run time. It is an optional extra
(``pip install dicomnode[deepbet]``); without it the spec is registered as unavailable with that
sentence, so the registry says exactly what is missing.

Outputs, as TID 1500 content (PS3.16): one measurement group for the brain with its mask (SEG,
Segmented Property Category "Anatomical Structure", Type "Brain") and its volume in ml (UCUM), and
one quality finding "brain cut off by the field of view" (explicitly present or absent) that is
present when the mask touches the edge of the imaged volume, i.e. part of the brain was not imaged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.domain import (
    AnalyzerKind,
    Code,
    Finding,
    Findings,
    FindingsStatus,
    Mask,
    Measurement,
    QualitativeEvaluation,
    SeriesSummary,
    Volume,
)
from dicomnode.models import Analyzer, AnalyzerSpec, private_code

if TYPE_CHECKING:
    import numpy.typing as npt

    from dicomnode.config import AnalysisSettings

NAME = "deepbet-brain"
NOT_INSTALLED = "deepbet is not installed (pip install dicomnode[deepbet])"

BRAIN = Code("12738006", "SCT", "Brain")  # CID 7151 / 7153
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")  # CID 7150
VOLUME = Code("118565006", "SCT", "Volume")
MILLILITER = Code("ml", "UCUM", "milliliter")
QUALITY_FINDING = Code("111052", "DCM", "Quality Finding")
POSITIONING = Code("111209", "DCM", "Positioning")  # CID 6135
BRAIN_COVERAGE = Code("130576", "DCM", "Anatomy coverage incomplete")  # CID 6315
INFERIOR_EDGE_AREA = private_code(
    "QC-BRAIN-EDGE-INF", "Brain mask area on the inferior face of the volume",
    "no concept for the area of a mask on a face of the imaged volume",
)
EDGE_AREA = private_code(
    "QC-BRAIN-EDGE", "Brain mask area on the other faces of the volume",
    "no concept for the area of a mask on a face of the imaged volume",
)
SQUARE_MM = Code("mm2", "UCUM", "square millimeter")

#: Mask area (mm2) allowed on the outer faces before the brain counts as cut off: the inferior
#: face may carry the brainstem's cross-section; the others only a little partial volume.
INFERIOR_TOLERANCE_MM2 = 400.0
EDGE_TOLERANCE_MM2 = 25.0
MIN_SLICES = 16

_T1_DESCRIPTIONS = r"re:.*(t1|mprage|mp-rage|mp_rage|spgr|bravo|tfl3d|tfe|fspgr|ir-fspgr).*"


def _installed() -> bool:
    return importlib.util.find_spec("deepbet") is not None


def _version() -> str:
    try:
        return importlib.metadata.version("deepbet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def volume_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """4x4 affine from voxel (column, row, slice) to RAS mm, from the DICOM geometry.

    PS3.3 C.7.6.2.1.1: the first IOP triplet is the direction of increasing column index, the
    second of increasing row index; slices advance along their cross product (the volume is sorted
    along the normal). DICOM patient space is LPS; NIfTI/deepbet use RAS, so x and y flip sign.
    """
    row_dir = np.array(volume.orientation[:3], dtype=np.float64)
    col_dir = np.array(volume.orientation[3:], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    positions = volume.slice_positions
    if len(positions) >= 2 and positions[-1] < positions[0]:
        normal = -normal
    slice_gap, row_gap, col_gap = volume.spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_gap
    lps[:3, 1] = col_dir * row_gap
    lps[:3, 2] = normal * slice_gap
    lps[:3, 3] = volume.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def edge_contact(volume: Volume, mask: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Area (mm2) of the mask on the volume's inferior outer face, and on the five other faces.

    The inferior face is told apart because the brainstem runs on into the spinal cord: a complete
    brain mask may legitimately meet the lower edge over a brainstem's cross-section (~1-3 cm2),
    whereas a cerebellum or vertex that was cut off meets it over tens of cm2.
    """
    affine = volume_affine(volume)  # voxel (column, row, slice) -> RAS; z is superior in both
    axes_zyx = (2, 1, 0)  # voxel axis i of the affine is array axis axes_zyx[i] of (slice, row, col)
    superior = [float(affine[2, i]) for i in range(3)]
    vertical = int(np.argmax(np.abs(superior)))
    spacing = volume.spacing
    inferior_area = 0.0
    other_area = 0.0
    for axis in range(3):
        face_area = float(np.prod([spacing[a] for a in range(3) if a != axis]))
        for end in (0, -1):
            area = float(np.take(mask, end, axis=axis).sum()) * face_area
            is_inferior = axis == axes_zyx[vertical] and (end == 0) == (superior[vertical] > 0)
            if is_inferior:
                inferior_area += area
            else:
                other_area += area
    return inferior_area, other_area


class DeepbetAnalyzer:
    """Brain mask, brain volume and brain coverage for one T1 MR volume."""

    name = NAME
    kind = AnalyzerKind.QC

    def __init__(self, device: str = "cpu") -> None:
        from deepbet import BrainExtraction

        self.version = _version()
        with warnings.catch_warnings():
            # deepbet loads TorchScript, deprecated (not removed) in torch >= 2.10.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning
            )
            self._bet: Any = BrainExtraction(no_gpu=device == "cpu")

    def brain_mask(self, volume: Volume, threshold: float = 0.5) -> npt.NDArray[np.bool_]:
        """deepbet's mask on the Volume's own grid (slices, rows, columns)."""
        nib: Any = importlib.import_module("nibabel")  # a deepbet dependency; untyped
        data = np.ascontiguousarray(volume.pixels.transpose(2, 1, 0), dtype=np.float32)  # (col, row, slice)
        ornt = nib.io_orientation(volume_affine(volume))
        ras = np.ascontiguousarray(nib.apply_orientation(data, ornt), dtype=np.float32)
        prob = self._bet.run_model(ras)
        mask = self._bet.postprocess(prob > threshold)
        back = nib.apply_orientation(mask, nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], ornt))
        return np.ascontiguousarray(np.asarray(back, dtype=bool).transpose(2, 1, 0))

    def analyze(self, volume: Volume) -> Findings:
        start = time.monotonic()
        problem = self._refuse(volume)
        if problem:
            return self._failed(problem, start)
        try:
            mask = self.brain_mask(volume)
        except Exception as exc:  # deepbet asserts on degenerate input; report, never raise
            return self._failed(f"deepbet failed: {type(exc).__name__}: {exc}", start)
        if not mask.any():
            return self._failed("deepbet found no brain in this series", start)
        ml = float(mask.sum()) * float(np.prod(volume.spacing)) / 1000.0
        inferior, other = edge_contact(volume, mask)
        cut_off = inferior > INFERIOR_TOLERANCE_MM2 or other > EDGE_TOLERANCE_MM2
        # One measurement group (TID 1411) about the brain segment: its volume, where it meets the
        # edges of the imaged volume, and the coverage verdict as the group's finding.
        brain = Finding(
            finding_type=BRAIN_COVERAGE,
            tracking_id=f"{NAME}/brain",
            present=cut_off,
            measurements=(
                Measurement(VOLUME, round(ml, 2), MILLILITER, "Brain volume (deepbet mask)"),
                Measurement(INFERIOR_EDGE_AREA, round(inferior, 1), SQUARE_MM, "the brainstem may meet it"),
                Measurement(EDGE_AREA, round(other, 1), SQUARE_MM, "superior, anterior, posterior, left, right"),
            ),
            evaluations=(QualitativeEvaluation(QUALITY_FINDING, POSITIONING),) if cut_off else (),
            mask=Mask(array=mask, label="Brain", category=ANATOMICAL_STRUCTURE, type=BRAIN),
        )
        notes = tuple(volume.problems)
        if cut_off:
            notes += (
                f"brain mask meets the field-of-view edge over {inferior:.0f} mm2 inferiorly and "
                f"{other:.0f} mm2 elsewhere: brain cut off",
            )
        return Findings(
            analyzer=NAME,
            version=self.version,
            kind=self.kind,
            status=FindingsStatus.PARTIAL if volume.problems else FindingsStatus.COMPLETE,
            findings=(brain,),
            notes=notes,
            duration_s=time.monotonic() - start,
            not_for_clinical_use=True,
        )

    def _refuse(self, volume: Volume) -> str:
        if volume.modality.upper() != "MR":
            return f"modality {volume.modality or '(none)'!r} is not handled by {NAME} (expects MR)"
        if volume.pixels.ndim != 3 or 0 in volume.pixels.shape:
            return f"empty volume (shape {tuple(volume.pixels.shape)})"
        if volume.pixels.shape[0] < MIN_SLICES:
            return (
                f"{volume.pixels.shape[0]} slices: deepbet needs a 3D volume (at least {MIN_SLICES} slices)"
            )
        for problem in volume.problems:
            if "frame of reference" in problem.lower() or "frames of reference" in problem.lower():
                return f"inconsistent geometry: {problem}"
        return ""

    def _failed(self, error: str, start: float) -> Findings:
        return Findings(
            analyzer=NAME,
            version=self.version,
            kind=self.kind,
            status=FindingsStatus.FAILED,
            error=error,
            duration_s=time.monotonic() - start,
        )


def _applies_to(series: SeriesSummary) -> bool:
    from dicomnode.config import compile_pattern

    return bool(compile_pattern(_T1_DESCRIPTIONS).fullmatch(series.series_description.strip()))


def specs(settings: AnalysisSettings) -> list[AnalyzerSpec]:
    """``deepbet-brain`` for T1 brain MR; unavailable (with the pip command) when not installed."""
    from dicomnode.models.torch_runtime import select_device

    installed = _installed()
    preference = settings.device

    def load() -> Analyzer:
        return DeepbetAnalyzer(select_device(preference))

    return [
        AnalyzerSpec(
            name=NAME,
            version=_version() if installed else "",
            kind=AnalyzerKind.QC,
            modalities=frozenset({"MR"}),
            load=load,
            description="Brain mask, brain volume (ml) and brain coverage on T1 MR (deepbet, MIT)",
            applies_to=_applies_to,
            unavailable="" if installed else NOT_INSTALLED,
        )
    ]
