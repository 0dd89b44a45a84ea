"""Deterministic synthetic DICOM series for tests and benchmarks.

Every UID derives from the seed (``generate_uid(entropy_srcs=...)``), geometry is consistent
(Image Position steps along the normal of Image Orientation), pixels are a head-like phantom in HU
stored with a rescale, so the same seed always produces byte-identical files.
"""

from __future__ import annotations

import datetime as _dt
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)


def seed_int(*parts: object) -> int:
    """A stable 32-bit seed (``hash()`` is salted per process, so it cannot be used)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def uid(seed: object, *parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def _patient_study(ds: Dataset, seed: object, study_uid: str) -> None:
    ds.PatientName = f"SYNTHETIC^PATIENT{seed}"
    ds.PatientID = f"SYN{seed_int(seed) % 10**8}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"A{seed_int(seed) % 10**8}"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "SYNTHETIC STUDY"
    ds.Manufacturer = "dicomnode tests"
    ds.InstitutionName = "Synthetic Hospital"


def head_phantom(rows: int, cols: int, z: float, rng: np.random.Generator, noise_hu: float = 8.0) -> np.ndarray:
    """Air, skull (≈1000 HU), brain (≈35 HU) with ventricles (≈5 HU), plus Gaussian noise."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    scale = max(0.2, 1.0 - (z / 120.0) ** 2)
    ry, rx = 0.42 * rows * scale, 0.36 * cols * scale
    r = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
    img = np.full((rows, cols), -1000.0, dtype=np.float32)
    img[r <= 1.0] = 1000.0
    img[r <= 0.8] = 35.0
    vent = ((y - cy) / (0.12 * rows * scale)) ** 2 + ((x - cx) / (0.06 * cols * scale)) ** 2
    img[vent <= 1.0] = 5.0
    img += rng.normal(0.0, noise_hu, img.shape).astype(np.float32)
    return img


def ct_series(
    n_slices: int = 12,
    rows: int = 64,
    cols: int = 64,
    seed: object = 0,
    *,
    slice_thickness: float = 2.5,
    pixel_spacing: float = 0.7,
    series_description: str = "HEAD ROUTINE",
    body_part: str = "HEAD",
    study_uid: str | None = None,
    series_number: int = 1,
    noise_hu: float = 8.0,
    images_in_acquisition: bool = False,
) -> list[Dataset]:
    """An axial CT series, one dataset per slice (with file meta, Explicit VR Little Endian)."""
    rng = np.random.default_rng(seed_int("ct", seed))
    study = study_uid or uid(seed, "study")
    series = uid(seed, "series", series_number)
    frame = uid(seed, "frame", series_number)
    out: list[Dataset] = []
    for i in range(n_slices):
        z = -slice_thickness * (n_slices - 1) / 2 + i * slice_thickness
        hu = head_phantom(rows, cols, z, rng, noise_hu)
        stored = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop = uid(seed, "sop", series_number, i)
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        _patient_study(ds, seed, study)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = body_part
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        ds.AcquisitionNumber = 1
        ds.KVP = 120
        ds.ImagePositionPatient = [-pixel_spacing * cols / 2, -pixel_spacing * rows / 2, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = slice_thickness
        ds.SliceLocation = z
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        if images_in_acquisition:
            ds.ImagesInAcquisition = n_slices
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def paint_blob(datasets: Sequence[Dataset], hu: float = 70.0, radius_mm: float = 12.0,
               half_depth_slices: float = 8.0) -> list[Dataset]:
    """Paint a hyperdense ellipsoid (``hu``, ``radius_mm`` in plane, +-``half_depth_slices`` slices)
    into the brain of a :func:`ct_series` head: a bleed-like blob the shipped demo model reports,
    with a mask. Changes ``datasets`` in place and returns them."""
    rows = int(datasets[0].Rows)
    spacing = float(datasets[0].PixelSpacing[0])
    cz, cy, cx = len(datasets) // 2, rows * 0.40, rows * 0.60
    y, x = np.mgrid[0:rows, 0:rows]
    for i, ds in enumerate(datasets):
        dz = (i - cz) / half_depth_slices
        if abs(dz) >= 1:
            continue
        inside = ((y - cy) * spacing / radius_mm) ** 2 + ((x - cx) * spacing / radius_mm) ** 2 + dz * dz <= 1.0
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(rows, rows).copy()
        stored[inside] = int(1024 + hu)
        ds.PixelData = stored.tobytes()
    return list(datasets)


def mr_series(n_slices: int = 8, rows: int = 64, cols: int = 64, seed: object = 0) -> list[Dataset]:
    """An axial T1-like MR series (no rescale), for routing and analysis tests."""
    datasets = ct_series(n_slices, rows, cols, seed, series_description="T1 AXIAL", series_number=2)
    rng = np.random.default_rng(seed_int("mr", seed))
    for i, ds in enumerate(datasets):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
            delattr(ds, keyword)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 10
        ds.RepetitionTime = 500
        ds.EchoTrainLength = 1
        pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).astype(np.float32)
        signal = np.clip(pixels - 1024, 0, None) / 4 + np.abs(rng.normal(0, 5, pixels.shape))
        ds.PixelData = np.clip(signal, 0, 4095).astype(np.uint16).tobytes()
        ds.InstanceNumber = i + 1
    return datasets


def cr_image(rows: int = 256, cols: int = 256, seed: object = 0) -> Dataset:
    """A chest-radiograph-like CR image."""
    rng = np.random.default_rng(seed_int("cr", seed))
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    body = np.exp(-(((x - cols / 2) / (0.35 * cols)) ** 2 + ((y - rows / 2) / (0.45 * rows)) ** 2))
    img = 500 + 2500 * body + rng.normal(0, 30, (rows, cols))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop = uid(seed, "cr-sop")
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop
    _patient_study(ds, seed, uid(seed, "study"))
    ds.Modality = "CR"
    ds.SeriesInstanceUID = uid(seed, "cr-series")
    ds.SeriesNumber = 3
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
    return ds


def write_series(
    datasets: Sequence[Dataset], folder: Path, transfer_syntax: UID = ExplicitVRLittleEndian
) -> list[Path]:
    """Write Part 10 files; compresses to RLE or JPEG 2000 with pydicom when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in datasets:
        ds = _copy(ds)
        if transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, encoding_plugin="pylibjpeg" if transfer_syntax != RLELossless else "")
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _copy(ds: Dataset) -> Dataset:
    import copy

    return copy.deepcopy(ds)


def today() -> str:
    return _dt.date.today().strftime("%Y%m%d")


def encoded(ds: Dataset, character_set: str | list[str] | None, **text: str) -> Dataset:
    """``ds`` with ``text`` (keyword -> decoded value) written in ``character_set`` (None: the
    attribute absent) and read back, so its text elements hold the encoded bytes a scanner sends
    and pydicom decodes them as it would a received file."""
    import io

    from pydicom import dcmread

    ds = _copy(ds)
    if character_set is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = character_set
    for keyword, value in text.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))
