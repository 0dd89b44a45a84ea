"""dicomnode.imaging: spool files of one series -> sorted Volume in physical units."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import phantoms as P
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomnode.errors import Permanent
from dicomnode.imaging import load_volume, stored_value_range


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(str(path))


@pytest.fixture
def ct_hu() -> np.ndarray:
    return P.ct_phantom(shape=(8, 64, 64), seed=3)


def test_sorts_shuffled_files_along_the_normal(tmp_path: Path, ct_hu: np.ndarray) -> None:
    paths = P.write_ct_series(ct_hu, tmp_path, spacing=(2.5, 0.7, 0.7))
    shuffled = paths[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != paths
    vol = load_volume(shuffled)
    assert vol.slice_positions == tuple(i * 2.5 for i in range(8))
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert vol.pixels.dtype == np.float32 and vol.pixels.shape == (8, 64, 64)
    # HU after Rescale Intercept -1024: stored values were clipped to 0..4095 and rounded
    expected = np.clip(np.round(ct_hu + 1024), 0, 4095) - 1024
    np.testing.assert_array_equal(vol.pixels, expected.astype(np.float32))
    assert vol.origin == pytest.approx((-100.0, -100.0, 0.0))
    assert vol.modality == "CT" and vol.problems == ()
    assert all("PixelData" not in h for h in vol.headers)
    assert [int(h.InstanceNumber) for h in vol.headers] == list(range(1, 9))


def test_reports_a_gap_with_the_number_of_missing_slices(tmp_path: Path, ct_hu: np.ndarray) -> None:
    positions = [0.0, 2.5, 5.0, 12.5, 15.0, 17.5, 20.0, 22.5]  # 7.5 and 10.0 missing
    vol = load_volume(P.write_ct_series(ct_hu, tmp_path, positions=positions))
    assert vol.spacing[0] == pytest.approx(2.5)
    assert len(vol.problems) == 1
    assert "gap of 7.5 mm" in vol.problems[0] and "about 2 slices missing" in vol.problems[0]


def test_reports_duplicate_positions(tmp_path: Path, ct_hu: np.ndarray) -> None:
    positions = [0.0, 2.5, 5.0, 5.0, 7.5, 10.0, 12.5, 15.0]
    vol = load_volume(P.write_ct_series(ct_hu, tmp_path, positions=positions))
    assert vol.pixels.shape[0] == 8
    assert vol.problems == ("2 images share position 5 mm along the slice normal",)


def test_reports_mixed_frames_of_reference(tmp_path: Path, ct_hu: np.ndarray) -> None:
    frames = ["1.2.3.1"] * 5 + ["1.2.3.2"] * 3
    vol = load_volume(P.write_ct_series(ct_hu, tmp_path, frame_of_reference=frames))
    assert "series has 2 frames of reference" in vol.problems
    assert vol.frame_of_reference_uid == "1.2.3.1"


def test_different_image_sizes_cannot_make_a_volume(tmp_path: Path) -> None:
    image = P.mr_phantom(shape=(1, 64, 64), seed=1)[0]
    paths = [P.write_mr_slice(image, tmp_path / f"{z}.dcm", z) for z in range(3)]
    paths.append(P.write_mr_slice(image, tmp_path / "small.dcm", 3, size=32))
    with pytest.raises(Permanent, match=r"mixes image sizes.*64x64 \(3 images\), 32x32 \(1 images\)"):
        load_volume(paths)


def test_unreadable_files_are_reported_and_skipped(tmp_path: Path, ct_hu: np.ndarray) -> None:
    paths = P.write_ct_series(ct_hu[:4], tmp_path)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    vol = load_volume([*paths, junk])
    assert vol.pixels.shape[0] == 4
    assert any(p.startswith("junk.dcm is not a readable DICOM file") for p in vol.problems)
    with pytest.raises(Permanent, match="no readable image in 1 file"):
        load_volume([junk])
    with pytest.raises(Permanent, match="no files given"):
        load_volume([])


def test_truncated_pixel_data_is_reported(tmp_path: Path, ct_hu: np.ndarray) -> None:
    paths = P.write_ct_series(ct_hu[:3], tmp_path)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[1])
    vol = load_volume(paths)
    assert vol.pixels.shape[0] == 2
    assert any("could not decode the pixel data" in p for p in vol.problems)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_decodes_compressed_transfer_syntaxes_losslessly(name: str) -> None:
    reference = load_volume([_testdata("MR_small.dcm")])
    vol = load_volume([_testdata(name)])
    np.testing.assert_array_equal(vol.pixels, reference.pixels)
    assert vol.spacing == reference.spacing


def test_rle_written_series_round_trips(tmp_path: Path, ct_hu: np.ndarray) -> None:
    plain = load_volume(P.write_ct_series(ct_hu[:3], tmp_path / "plain"))
    rle = load_volume(P.write_ct_series(ct_hu[:3], tmp_path / "rle", rle=True))
    assert rle.headers[0].file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(rle.pixels, plain.pixels)


def test_jpeg2000_chest_cr_monochrome1_matches_uncompressed() -> None:
    raw = load_volume([_testdata("RG1_UNCR.dcm")])
    j2k = load_volume([_testdata("RG1_J2KR.dcm")])
    np.testing.assert_array_equal(j2k.pixels, raw.pixels)
    stored = pydicom.dcmread(_testdata("RG1_UNCR.dcm")).pixel_array.astype(np.float32)
    # MONOCHROME1 inverted within the 15-bit stored range so that brighter is higher
    np.testing.assert_array_equal(raw.pixels[0], np.float32(2**15 - 1) - stored)
    assert "Pixel Spacing and Imager Pixel Spacing are missing or zero; 1 mm assumed" in raw.problems


def test_monochrome1_equals_monochrome2_after_inversion(tmp_path: Path) -> None:
    image = P.xr_phantom(shape=(64, 64), seed=2, collimated=False)
    m2 = load_volume([P.write_dx(image, tmp_path / "m2.dcm")])
    m1 = load_volume([P.write_dx(image, tmp_path / "m1.dcm", monochrome1=True)])
    np.testing.assert_array_equal(m1.pixels, m2.pixels)
    assert m2.spacing == pytest.approx((1.0, 0.15, 0.15))  # Imager Pixel Spacing
    assert m2.slice_positions == ()
    assert stored_value_range(m2.headers[0]) == (0.0, 4095.0)


def test_without_geometry_sorts_by_instance_number(tmp_path: Path) -> None:
    paths = []
    for number in (3, 1, 2):
        image = np.full((32, 32), 100.0 * number, dtype=np.float32)
        paths.append(P.write_dx(image, tmp_path / f"{number}.dcm", InstanceNumber=number))
    vol = load_volume(paths)
    assert [float(v) for v in vol.pixels[:, 0, 0]] == [100.0, 200.0, 300.0]


def test_enhanced_multiframe_uses_functional_groups() -> None:
    vol = load_volume([_testdata("eCT_Supplemental.dcm")])
    assert vol.pixels.shape == (2, 512, 512)
    assert vol.slice_positions == (149.0, 159.0)
    assert vol.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert float(vol.pixels.min()) == -1024.0  # Pixel Value Transformation intercept applied
    assert vol.orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_colour_is_reduced_to_luminance() -> None:
    vol = load_volume([_testdata("SC_rgb.dcm")])
    assert vol.pixels.shape == (1, 100, 100)
    assert "colour images were converted to luminance (ITU-R BT.601)" in vol.problems


def _converter() -> object:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "invesalius_to_dicom.py"
    spec = importlib.util.spec_from_file_location("invesalius_to_dicom", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dicom_encoding_of_a_real_head_ct_has_one_canonical_orientation(tmp_path: Path) -> None:
    """The real head CT of invesalius-examples written as scanners might: slices in reverse file
    order, rows stored posterior to anterior, rows and columns swapped, prone, feet first,
    unsigned values with intercept -1024. Sorted by imaging and brought to canonical order, every
    one is the same array; a mirrored or upside-down image stays different (other anatomy)."""
    from dicomnode.imaging import Reorientation, canonical_reorientation

    conv: Any = _converter()
    hu, spacing = P.cranium()
    block = hu[40:46, 60:200, 50:210].copy()
    canonical = {}
    for name in (
        "as-is", "reversed-order", "iop-rows-reversed", "iop-transposed", "iop-prone", "iop-feet-first",
        "unsigned-1024", "mirrored-lr", "flipped-ap",
    ):
        series = conv.encode(name, block, None, spacing, np.random.default_rng(0))
        volume = load_volume(conv.write_encoded(tmp_path / name, series, name))
        assert volume.problems == ()
        reorientation = canonical_reorientation(volume.orientation)
        canonical[name] = np.ascontiguousarray(reorientation.apply(volume.pixels))
        assert np.array_equal(reorientation.undo(canonical[name]), volume.pixels)
        assert reorientation.spacing(volume.spacing) == pytest.approx(spacing)
    for name in ("reversed-order", "iop-rows-reversed", "iop-transposed", "iop-prone", "iop-feet-first",
                 "unsigned-1024"):
        assert np.array_equal(canonical[name], canonical["as-is"]), name
    assert not np.array_equal(canonical["mirrored-lr"], canonical["as-is"])
    assert not np.array_equal(canonical["flipped-ap"], canonical["as-is"])
    assert canonical_reorientation((1, 0, 0, 0, 1, 0)) == Reorientation()
    assert canonical_reorientation((float("nan"),) * 6) == Reorientation()
