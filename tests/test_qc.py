"""dicomnode.models.qc: classical QC analyzers flag injected defects and pass clean phantoms."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import deid_data  # pip install deid-data (see .ci/run)
import numpy as np
import phantoms as P
import pydantic
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr import _concepts_dict

from dicomnode.domain import AnalyzerKind, Code, Finding, Findings, FindingsStatus, SeriesSummary
from dicomnode.imaging import load_volume
from dicomnode.models import Analyzer, Registry, qc
from dicomnode.models.qc import CtQc, MrQc, QcSettings, XrQc
from dicomnode.models.qc import common as qc_common

pytestmark = pytest.mark.filterwarnings("error")


def _finding(result: Findings, aspect: Code) -> Finding:
    matches = [f for f in result.findings if f.finding_type == aspect]
    assert len(matches) == 1, f"{aspect.meaning} not reported: {[f.finding_type for f in result.findings]}"
    return matches[0]


def _measure(finding: Finding, name: Code) -> float:
    return next(m.value for m in finding.measurements if m.name == name)


def _defects(result: Findings) -> set[str]:
    return {f.finding_type.value for f in result.findings if f.present and f.finding_type != qc.IMAGE_QUALITY}


def _rating(result: Findings) -> float:
    return _measure(_finding(result, qc.IMAGE_QUALITY), qc.IMAGE_QUALITY_RATING)


# --- registry and settings -----------------------------------------------------------------------


def _summary(modality: str) -> SeriesSummary:
    return SeriesSummary("1.2", "1.3", 1, modality, (), "", "", "", "SCU", 10, ())


def test_specs_register_three_analyzers_by_modality() -> None:
    registry = Registry(qc.specs(QcSettings()))
    assert registry.names() == ["qc-ct", "qc-mr", "qc-xr"]
    assert registry.default_for(_summary("CT")) == ["qc-ct"]
    assert registry.default_for(_summary("MR")) == ["qc-mr"]
    assert registry.default_for(_summary("CR")) == ["qc-xr"]
    assert registry.default_for(_summary("DX")) == ["qc-xr"]
    assert registry.default_for(_summary("US")) == []
    analyzer = registry.get("qc-ct")
    assert isinstance(analyzer, Analyzer) and analyzer.kind is AnalyzerKind.QC
    assert qc.specs(QcSettings(enabled=False)) == []


def test_settings_are_validated_and_frozen() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        QcSettings.model_validate({"ct_noise_max": 3})
    with pytest.raises(pydantic.ValidationError):
        QcSettings(ct_noise_max_hu=-1)
    settings = QcSettings(ct_noise_max_hu=40)
    with pytest.raises(pydantic.ValidationError):
        settings.ct_noise_max_hu = 1  # type: ignore[misc]


def test_dcm_and_radlex_constants_match_the_standard_dictionary() -> None:
    """Every DCM/RADLEX code value and meaning equals PS3.16 as shipped in pydicom's dictionary."""
    published: dict[tuple[str, str], str] = {}
    for scheme in ("DCM", "RADLEX"):
        for entries in _concepts_dict.concepts[scheme].values():
            for value, (meaning, _cids) in entries.items():
                published[(scheme, value)] = meaning
    codes = [v for v in vars(qc).values() if isinstance(v, Code) and v.scheme in ("DCM", "RADLEX")]
    assert len(codes) >= 20
    for code in codes:
        assert published.get((code.scheme, code.value)) == code.meaning, code
    dcm = _concepts_dict.concepts["DCM"]
    for code in (qc.MOTION_BLUR, qc.UNDER_EXPOSED, qc.OVER_EXPOSED, qc.POSITIONING, qc.OTHER_FAILURE):
        cids = [cid for entry in dcm.values() if code.value in entry for cid in entry[code.value][1]]
        assert 6135 in cids, f"{code} is not in CID 6135 Image Quality Finding"


# --- CT ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_hu() -> np.ndarray:
    return P.ct_phantom(shape=(16, 128, 128), seed=11)


def test_ct_clean_phantom_passes_with_explicit_negatives(ct_hu: np.ndarray) -> None:
    result = CtQc().analyze(P.volume(ct_hu, "CT"))
    assert result.status is FindingsStatus.COMPLETE, result.notes
    assert result.analyzer == "qc-ct" and result.kind is AnalyzerKind.QC and result.error == ""
    assert _defects(result) == set()
    aspects = [f.finding_type for f in result.findings]
    assert aspects == [
        qc.CT_NUMBER_CALIBRATION,
        qc.IMAGE_NOISE,
        qc.SLICE_COVERAGE,
        qc.FOV_TRUNCATION,
        qc.METAL_ARTIFACT,
        qc.MOTION_ARTIFACT,
        qc.IMAGE_QUALITY,
    ]
    for finding in result.findings:
        assert finding.present is False
        values = {(e.name, e.value) for e in finding.evaluations}
        assert (qc.QUALITY_ASSESSMENT, qc.USABLE_MEETING) in values
        assert (qc.QUALITY_CONTROL_STANDARD, qc.INSTITUTIONAL_STANDARD) in values
    assert len({f.tracking_id for f in result.findings}) == len(result.findings)
    assert _rating(result) == 100.0
    calibration = _finding(result, qc.CT_NUMBER_CALIBRATION)
    assert _measure(calibration, qc.AIR_CT_NUMBER) == pytest.approx(-1000, abs=5)
    assert calibration.measurements[0].unit == Code("[hnsf'U]", "UCUM", "Hounsfield unit")
    assert _measure(_finding(result, qc.IMAGE_NOISE), qc.NOISE_SD) == pytest.approx(8.0, rel=0.15)


def test_ct_head_phantom_without_circular_fov_passes() -> None:
    hu = P.ct_phantom(shape=(8, 128, 128), seed=12, kind="head", circular_fov=False)
    assert _defects(CtQc().analyze(P.volume(hu, "CT"))) == set()


@pytest.mark.parametrize(
    ("inject", "aspect", "defect"),
    [
        (lambda v: P.offset_calibration(v, 200.0), qc.CT_NUMBER_CALIBRATION, qc.INAPPROPRIATE_PROCESSING),
        (lambda v: P.offset_calibration(v, -400.0), qc.CT_NUMBER_CALIBRATION, qc.INAPPROPRIATE_PROCESSING),
        (lambda v: P.add_noise(v, 35.0), qc.IMAGE_NOISE, qc.UNDER_EXPOSED),
        (lambda v: P.truncate(v, 1.6), qc.FOV_TRUNCATION, qc.POSITIONING),
        (lambda v: P.add_metal(v), qc.METAL_ARTIFACT, qc.OTHER_ARTIFACT),
    ],
    ids=["hu+200", "hu-400", "noise", "truncation", "metal"],
)
def test_ct_defects_are_flagged(ct_hu: np.ndarray, inject: object, aspect: Code, defect: Code) -> None:
    result = CtQc().analyze(P.volume(inject(ct_hu), "CT"))  # type: ignore[operator]
    finding = _finding(result, aspect)
    assert finding.present is True
    assert qc.QualitativeEvaluation(qc.QUALITY_FINDING, defect) in finding.evaluations
    assert qc.QualitativeEvaluation(qc.QUALITY_ASSESSMENT, qc.USABLE_NOT_MEETING) in finding.evaluations
    assert _rating(result) < 100.0
    assert _finding(result, qc.IMAGE_QUALITY).present is True


def test_ct_missing_slice_from_positions(ct_hu: np.ndarray) -> None:
    positions = [i * 2.5 for i in range(16)]
    del positions[5]
    result = CtQc().analyze(P.volume(np.delete(ct_hu, 5, axis=0), "CT", positions=positions))
    finding = _finding(result, qc.SLICE_COVERAGE)
    assert finding.present is True
    assert _measure(finding, qc.MISSING_SLICES) == 1
    assert _measure(finding, qc.MEDIAN_SLICE_SPACING) == pytest.approx(2.5)


def test_ct_geometry_problems_become_notes(ct_hu: np.ndarray) -> None:
    result = CtQc().analyze(P.volume(ct_hu, "CT", problems=["series has 2 frames of reference"]))
    assert "geometry: series has 2 frames of reference" in result.notes


def test_ct_cropped_real_image_is_partial_with_a_reason() -> None:
    """CT_small.dcm is a zoomed chest: no external air, so calibration cannot be judged."""
    volume = load_volume([Path(str(get_testdata_file("CT_small.dcm")))])
    result = CtQc().analyze(volume)
    assert result.status is FindingsStatus.PARTIAL
    assert any(n.startswith("CT number calibration: not computed") for n in result.notes)
    assert _finding(result, qc.FOV_TRUNCATION).present is True
    assert _finding(result, qc.IMAGE_NOISE).present is False


# --- CT on real anatomy (the head CT of Debian invesalius-examples) --------------------------------


@pytest.fixture(scope="module")
def head_block() -> tuple[np.ndarray, tuple[float, float, float]]:
    """16 consecutive slices through the orbits and middle cranial fossa, 1.5 mm apart."""
    hu, spacing = P.cranium()
    return hu[40:56].copy(), spacing


def _head(pixels: np.ndarray, spacing: tuple[float, float, float]) -> Findings:
    return CtQc().analyze(P.volume(pixels, "CT", spacing=spacing))


def test_real_head_ct_has_no_quality_flag() -> None:
    hu, spacing = P.cranium()
    result = _head(hu, spacing)
    assert result.status is FindingsStatus.COMPLETE, result.notes
    assert _defects(result) == set()
    motion = _finding(result, qc.MOTION_ARTIFACT)
    assert _measure(motion, qc.MOTION_STREAK_INDEX) < QcSettings().ct_motion_streak_hu
    assert _measure(motion, qc.MOTION_JUMP) < QcSettings().ct_motion_jump_mm


def test_motion_streaks_on_real_head_ct_are_a_motion_quality_finding(
    head_block: tuple[np.ndarray, tuple[float, float, float]],
) -> None:
    pixels, spacing = head_block
    moved = P.add_motion(pixels, range(5, 11), shift_mm=3.0, pixel_mm=spacing[1], seed=3, angles=90)
    finding = _finding(_head(moved, spacing), qc.MOTION_ARTIFACT)
    assert finding.present is True
    assert qc.QualitativeEvaluation(qc.QUALITY_FINDING, qc.MOTION_BLUR) in finding.evaluations
    assert _measure(finding, qc.MOTION_STREAKED_SLICES) >= 25.0
    assert _finding(_head(pixels, spacing), qc.MOTION_ARTIFACT).present is False


def test_slice_to_slice_jump_on_real_head_ct_is_a_motion_quality_finding(
    head_block: tuple[np.ndarray, tuple[float, float, float]],
) -> None:
    pixels, spacing = head_block
    jumped = P.shift_slices(pixels, 8, (2.4, 3.2), spacing[1])  # 4 mm between slices 7 and 8
    finding = _finding(_head(jumped, spacing), qc.MOTION_ARTIFACT)
    assert finding.present is True
    assert _measure(finding, qc.MOTION_JUMP) == pytest.approx(4.0, abs=0.5)


def test_calibration_offset_on_real_head_ct_is_not_metal(
    head_block: tuple[np.ndarray, tuple[float, float, float]],
) -> None:
    """Dense petrous bone reaches 2986 HU here; +150 HU used to cross the 3000 HU metal threshold."""
    pixels, spacing = P.cranium()
    result = _head(pixels + np.float32(150.0), spacing)
    assert _finding(result, qc.CT_NUMBER_CALIBRATION).present is True
    metal = _finding(result, qc.METAL_ARTIFACT)
    assert metal.present is False
    assert _measure(metal, qc.METAL_VOXELS) == 0.0
    block, _ = head_block
    with_metal = P.add_metal(block + np.float32(150.0), seed=1, streak_hu=400.0)
    assert _finding(_head(with_metal, spacing), qc.METAL_ARTIFACT).present is True


# --- MR ------------------------------------------------------------------------------------------


def _mr(pixels: np.ndarray, direction: str | None = "COL") -> Findings:
    attributes = {"InPlanePhaseEncodingDirection": direction} if direction else {}
    return MrQc().analyze(P.volume(pixels, "MR", **attributes))


def test_mr_clean_phantom_passes() -> None:
    result = _mr(P.mr_phantom(shape=(6, 128, 128), seed=21))
    assert result.status is FindingsStatus.COMPLETE, result.notes
    assert _defects(result) == set()
    noise = _finding(result, qc.IMAGE_NOISE)
    assert _measure(noise, qc.SIGNAL_TO_NOISE) > 30
    ghost = _finding(result, qc.GHOST)
    assert 0 < _measure(ghost, qc.EFC) < 1 and _measure(ghost, qc.FBER) > 100


def test_mr_low_snr_is_flagged() -> None:
    result = _mr(P.mr_phantom(shape=(6, 128, 128), seed=22, noise_sigma=120.0))
    assert _finding(result, qc.IMAGE_NOISE).present is True
    assert _finding(result, qc.GHOST).present is False


@pytest.mark.parametrize(("axis", "direction"), [(1, "COL"), (2, "ROW"), (2, None)])
def test_mr_motion_ghosting_is_flagged_along_phase_encoding(axis: int, direction: str | None) -> None:
    result = _mr(P.mr_phantom(shape=(6, 128, 128), seed=23, ghost_shift=4, phase_axis=axis), direction)
    ghost = _finding(result, qc.GHOST)
    assert ghost.present is True
    assert qc.QualitativeEvaluation(qc.QUALITY_FINDING, qc.MOTION_BLUR) in ghost.evaluations
    assert _finding(result, qc.IMAGE_NOISE).present is False
    if direction is None:
        assert any("Phase Encoding Direction absent" in n for n in result.notes)


def test_mr_ghosts_outside_the_declared_phase_axis_are_not_counted() -> None:
    pixels = P.mr_phantom(shape=(6, 128, 128), seed=24, ghost_shift=4, phase_axis=2)
    assert _finding(_mr(pixels, "COL"), qc.GHOST).present is False


# --- CR/DX ---------------------------------------------------------------------------------------


def _xr(image: np.ndarray, **attributes: object) -> Findings:
    return XrQc().analyze(P.volume(image[None], "DX", spacing=(1.0, 0.15, 0.15), **attributes))


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    return P.xr_phantom(shape=(768, 768), seed=31)


def test_xr_clean_phantom_passes(radiograph: np.ndarray) -> None:
    result = _xr(radiograph)
    assert result.status is FindingsStatus.COMPLETE, result.notes
    assert _defects(result) == set()
    assert _measure(_finding(result, qc.COLLIMATION), qc.COLLIMATED_FIELD) == pytest.approx(87.9, abs=1)


@pytest.mark.parametrize(
    ("kwargs", "aspect", "defect"),
    [
        ({"blur_sigma": 8.0}, qc.SHARPNESS, qc.MOTION_BLUR),
        ({"noise": 70.0}, qc.IMAGE_NOISE, qc.UNDER_EXPOSED),
        ({"exposure_gain": 1.8}, qc.DETECTOR_EXPOSURE, None),
    ],
    ids=["blur", "noise", "saturation"],
)
def test_xr_defects_are_flagged(kwargs: dict[str, float], aspect: Code, defect: Code | None) -> None:
    result = _xr(P.xr_phantom(shape=(768, 768), seed=32, **kwargs))
    finding = _finding(result, aspect)
    assert finding.present is True
    codes = {e.value for e in finding.evaluations if e.name == qc.QUALITY_FINDING}
    assert codes <= {qc.OVER_EXPOSED, qc.UNDER_EXPOSED, qc.MOTION_BLUR}
    if defect is not None:
        assert codes == {defect}


@pytest.mark.parametrize(("di", "defect"), [(-3.6, qc.UNDER_EXPOSED), (4.2, qc.OVER_EXPOSED)])
def test_xr_deviation_index_outside_3_is_flagged(radiograph: np.ndarray, di: float, defect: Code) -> None:
    finding = _finding(_xr(radiograph, DeviationIndex=di), qc.DETECTOR_EXPOSURE)
    assert finding.present is True
    assert qc.QualitativeEvaluation(qc.QUALITY_FINDING, defect) in finding.evaluations
    assert _measure(finding, qc.DEVIATION_INDEX) == pytest.approx(di)


def test_xr_deviation_index_is_computed_from_exposure_indices(radiograph: np.ndarray) -> None:
    finding = _finding(_xr(radiograph, ExposureIndex=100.0, TargetExposureIndex=400.0), qc.DETECTOR_EXPOSURE)
    assert _measure(finding, qc.DEVIATION_INDEX) == pytest.approx(10 * np.log10(0.25))
    assert finding.present is True  # DI = -6.0


def test_xr_tight_collimation_is_flagged(radiograph: np.ndarray) -> None:
    image = radiograph.copy()
    image[:200, :] = image[-200:, :] = 3970.0
    image[:, :200] = image[:, -200:] = 3970.0
    finding = _finding(_xr(image), qc.COLLIMATION)
    assert finding.present is True
    assert _measure(finding, qc.COLLIMATED_FIELD) < 25


def test_xr_real_chest_cr_monochrome1_passes() -> None:
    """RG1_UNCR.dcm (pydicom-data, from the NEMA WG04 compression test set): a chest PA CR."""
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pip install pydicom-data"
    result = XrQc().analyze(load_volume([Path(str(path))]))
    assert result.status is FindingsStatus.COMPLETE
    assert _defects(result) == set()
    assert any("Pixel Spacing" in n for n in result.notes)


REAL_RADIOGRAPHS = {
    "RG1_UNCR.dcm": lambda: get_testdata_file("RG1_UNCR.dcm"),  # chest PA CR (pydicom-data)
    "RG3_UNCR.dcm": lambda: get_testdata_file("RG3_UNCR.dcm"),  # extremity CR (pydicom-data)
    "RG1_J2KI.dcm": lambda: get_testdata_file("RG1_J2KI.dcm"),  # the chest, lossy JPEG 2000
    "cat.dcm": lambda: str(Path(deid_data.__file__).parent / "data" / "animals" / "cat.dcm"),  # DX thorax
}


@pytest.mark.parametrize("name", sorted(REAL_RADIOGRAPHS))
def test_gaussian_blur_from_sigma_2_is_flagged_on_real_radiographs_and_originals_pass(name: str) -> None:
    path = REAL_RADIOGRAPHS[name]()
    assert path is not None, "pip install pydicom-data"
    volume = load_volume([Path(str(path))])
    original = _finding(XrQc().analyze(volume), qc.SHARPNESS)
    assert original.present is False
    blurred = replace(volume, pixels=P.blur(volume.pixels, 2.0))
    finding = _finding(XrQc().analyze(blurred), qc.SHARPNESS)
    assert finding.present is True
    assert qc.QualitativeEvaluation(qc.QUALITY_FINDING, qc.MOTION_BLUR) in finding.evaluations
    assert _measure(finding, qc.FINE_DETAIL_RATIO) < QcSettings().xr_fine_detail_min < _measure(
        original, qc.FINE_DETAIL_RATIO
    )


def test_xr_real_dx_thorax_with_exposure_index() -> None:
    """deid-data's animals/cat.dcm: an Agfa DX thorax with EI 297, target 171, DI 2.4."""
    path = Path(deid_data.__file__).parent / "data" / "animals" / "cat.dcm"
    result = XrQc().analyze(load_volume([path]))
    exposure = _finding(result, qc.DETECTOR_EXPOSURE)
    assert _measure(exposure, qc.EXPOSURE_INDEX) == 297
    assert _measure(exposure, qc.TARGET_EXPOSURE_INDEX) == 171
    assert _measure(exposure, qc.DEVIATION_INDEX) == pytest.approx(2.4)
    assert exposure.present is False  # within +/-3
    assert result.status is FindingsStatus.COMPLETE


# --- failures ------------------------------------------------------------------------------------


def test_wrong_modality_fails_with_a_reason(ct_hu: np.ndarray) -> None:
    result = MrQc().analyze(P.volume(ct_hu, "CT"))
    assert result.status is FindingsStatus.FAILED
    assert result.error == "expects modality MR, the series is CT"
    assert result.findings == ()


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.zeros((2, 64, 64), np.float32), "every pixel has the same value"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN or infinity"),
        (np.ones((1, 8, 8), np.float32), "too small"),
    ],
)
def test_unusable_pixels_fail_cleanly(pixels: np.ndarray, message: str) -> None:
    result = CtQc().analyze(P.volume(pixels, "CT"))
    assert result.status is FindingsStatus.FAILED
    assert message in result.error


def test_a_failing_metric_makes_the_result_partial(
    ct_hu: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: CtQc, ctx: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(CtQc, "_metal", broken)
    result = CtQc().analyze(P.volume(ct_hu, "CT"))
    assert result.status is FindingsStatus.PARTIAL
    assert "metal: not computed (ZeroDivisionError: boom)" in result.notes
    assert qc.METAL_ARTIFACT not in [f.finding_type for f in result.findings]
    assert _finding(result, qc.IMAGE_NOISE).present is False


@pytest.mark.parametrize("seed", range(6))
def test_disk_morphology_equals_scipy(seed: int) -> None:
    """The fast erosion/dilation/opening/hole filling used by the QC checks are exactly scipy's."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for _ in range(20):
        shape = (int(rng.integers(1, 48)), int(rng.integers(1, 48)))
        mask = rng.random(shape) < rng.uniform(0.0, 1.0)
        if rng.random() < 0.5:
            mask = ndimage.binary_dilation(mask, iterations=2)  # blobs with holes, not only noise
        for radius in range(0, 7):
            disk = qc_common.disk(radius)
            for border in (False, True):
                assert np.array_equal(qc_common.erode(mask, radius, border),
                                      ndimage.binary_erosion(mask, structure=disk, border_value=border))
            assert np.array_equal(qc_common.dilate(mask, radius), ndimage.binary_dilation(mask, structure=disk))
            assert np.array_equal(qc_common.opening(mask, radius), ndimage.binary_opening(mask, structure=disk))
        assert np.array_equal(qc_common.fill_holes(mask), ndimage.binary_fill_holes(mask))
