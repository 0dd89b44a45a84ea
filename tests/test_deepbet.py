"""Pins the deepbet provider on a real T1 brain MRI.

The real data is the Colin27 single-subject T1 template with its brain-extracted version, shipped
by Debian ``mricron-data`` (``/usr/share/mricron/templates/ch2.nii.gz`` and ``ch2bet.nii.gz``,
BSD-3-clause per ``/usr/share/doc/mricron-data/copyright``; CI installs the package). The NIfTI
arrays are turned into a :class:`Volume` with DICOM (LPS) geometry, so the test also pins the
RAS <-> LPS handling of the provider. Reference masks were made by FSL BET, not by hand, so the
Dice measures agreement between two tools.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.config import AnalysisSettings
from dicomnode.domain import FindingsStatus, SeriesSummary, Volume
from dicomnode.models import deepbet

T1 = Path("/usr/share/mricron/templates/ch2.nii.gz")
T1_BRAIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

if importlib.util.find_spec("deepbet") is None:  # the provider's own behaviour without it is pinned below
    pytest.fail("deepbet is not installed: pip install --no-deps deepbet==1.0.2 (see .ci/run)")
if not T1.is_file():
    pytest.fail(f"{T1} missing: apt-get install mricron-data (see .ci/run)")


def _nifti_to_volume(image: Any, data: np.ndarray, *, drop_top: int = 0) -> Volume:
    """RAS NIfTI (i=R, j=A, k=S) -> axial Volume: columns toward patient left, rows toward
    posterior, slices toward superior, IOP 1\\0\\0\\0\\1\\0 (PS3.3 C.7.6.2.1.1)."""
    pixels = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0), dtype=np.float32)
    if drop_top:
        pixels = np.ascontiguousarray(pixels[:-drop_top])
    n_i, n_j, _ = image.shape
    corner = image.affine @ np.array([n_i - 1, n_j - 1, 0, 1.0])  # RAS of pixels[0, 0, 0]
    zoom = [float(z) for z in image.header.get_zooms()[:3]]
    return Volume(
        pixels=pixels,
        spacing=(zoom[2], zoom[1], zoom[0]),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(-float(corner[0]), -float(corner[1]), float(corner[2])),
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.10",
        modality="MR",
        series_instance_uid="1.2.826.0.1.3680043.8.498.11",
        study_instance_uid="1.2.826.0.1.3680043.8.498.12",
        headers=(),
        slice_positions=tuple(float(corner[2]) + zoom[2] * k for k in range(pixels.shape[0])),
    )


@pytest.fixture(scope="module")
def colin() -> tuple[Volume, np.ndarray, Any]:
    import nibabel as nib

    image = nib.load(str(T1))
    truth_image = nib.load(str(T1_BRAIN))
    volume = _nifti_to_volume(image, np.asarray(image.dataobj, dtype=np.float32))
    truth = _nifti_to_volume(truth_image, np.asarray(truth_image.dataobj, dtype=np.float32)).pixels > 0
    return volume, truth, image


@pytest.fixture(scope="module")
def analyzer() -> Iterator[deepbet.DeepbetAnalyzer]:
    # No download at run time: loading must work with the network unreachable.
    real_connect = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        raise OSError(f"network disabled in this test (tried {address})")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    try:
        yield deepbet.DeepbetAnalyzer("cpu")
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]


def test_brain_mask_matches_the_shipped_mask_and_volume_is_in_ml(
    analyzer: deepbet.DeepbetAnalyzer, colin: tuple[Volume, np.ndarray, Any]
) -> None:
    volume, truth, _ = colin
    findings = analyzer.analyze(volume)
    assert findings.status is FindingsStatus.COMPLETE, findings.error
    (brain,) = findings.findings  # one TID 1411 group: the brain segment, its volume and coverage
    assert brain.finding_type == deepbet.BRAIN_COVERAGE
    assert brain.mask is not None and brain.mask.array.shape == volume.pixels.shape
    mask = brain.mask.array
    dice = 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())
    print(f"deepbet vs ch2bet Dice = {dice:.4f}")  # measured 0.936 on torch 2.13 CPU
    assert dice > 0.9
    ml, inferior_area, other_area = brain.measurements
    assert ml.unit.value == "ml"
    assert ml.value == pytest.approx(mask.sum() / 1000.0, rel=1e-3)  # 1 mm isotropic voxels
    assert 1200 < ml.value < 2300  # Colin27 lives in MNI space, which is larger than a real head
    # Only the brainstem meets the (inferior) edge of the MNI box: not counted as cut off.
    assert brain.present is False
    assert (inferior_area.name, other_area.name) == (deepbet.INFERIOR_EDGE_AREA, deepbet.EDGE_AREA)
    assert 0 < inferior_area.value < deepbet.INFERIOR_TOLERANCE_MM2 and other_area.value == 0


def test_a_vertex_outside_the_field_of_view_is_reported_cut_off(
    analyzer: deepbet.DeepbetAnalyzer, colin: tuple[Volume, np.ndarray, Any]
) -> None:
    volume, _, image = colin
    cut = _nifti_to_volume(image, np.asarray(image.dataobj, dtype=np.float32), drop_top=50)
    findings = analyzer.analyze(cut)
    assert findings.status is FindingsStatus.COMPLETE, findings.error
    (coverage,) = findings.findings
    assert coverage.present is True
    assert coverage.evaluations and coverage.evaluations[0].value.meaning == "Positioning"
    assert any("brain cut off" in note for note in findings.notes)


def test_geometry_helpers_follow_dicom_conventions(colin: tuple[Volume, np.ndarray, Any]) -> None:
    volume, _, image = colin
    affine = deepbet.volume_affine(volume)
    # Voxel (column, row, slice) -> RAS must equal the NIfTI affine after our flips.
    n_i, n_j, _ = image.shape
    for c, r, k in [(0, 0, 0), (10, 20, 30), (n_i - 1, n_j - 1, 5)]:
        nifti_voxel = np.array([n_i - 1 - c, n_j - 1 - r, k, 1.0])
        assert np.allclose(affine @ [c, r, k, 1.0], image.affine @ nifti_voxel)
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[0, 2, 3] = True  # inferior face (slice 0 is the lowest: positions increase)
    mask[2, 0, 3] = True  # anterior face
    small = Volume(
        **{**volume.__dict__, "pixels": np.zeros((4, 5, 6), np.float32), "slice_positions": (0, 1, 2, 3)}
    )
    inferior, other = deepbet.edge_contact(small, mask)
    assert inferior == pytest.approx(1.0) and other == pytest.approx(1.0)


def test_bad_input_gives_failed_findings(
    analyzer: deepbet.DeepbetAnalyzer, colin: tuple[Volume, np.ndarray, Any]
) -> None:
    volume, _, _ = colin
    ct = Volume(**{**volume.__dict__, "modality": "CT"})
    assert "modality 'CT' is not handled by deepbet-brain" in analyzer.analyze(ct).error
    thin = Volume(**{**volume.__dict__, "pixels": np.ascontiguousarray(volume.pixels[:4])})
    result = analyzer.analyze(thin)
    assert result.status is FindingsStatus.FAILED and "needs a 3D volume" in result.error
    two = Volume(**{**volume.__dict__, "problems": ("2 frames of reference",)})
    assert "inconsistent geometry" in analyzer.analyze(two).error


def _series(description: str) -> SeriesSummary:
    return SeriesSummary("1", "2", 1, "MR", (), "BRAIN", description, "", "AE", 176, ())


def test_spec_routes_t1_mr_and_says_how_to_install_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    (spec,) = deepbet.specs(AnalysisSettings())
    assert spec.name == "deepbet-brain" and spec.unavailable == "" and spec.version == "1.0.2"
    assert spec.matches(_series("Sag T1 MPRAGE")) and not spec.matches(_series("Ax FLAIR"))
    monkeypatch.setattr(deepbet, "_installed", lambda: False)
    (missing,) = deepbet.specs(AnalysisSettings())
    assert missing.unavailable == "deepbet is not installed (pip install dicomnode[deepbet])"
