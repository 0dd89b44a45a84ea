"""Deterministic synthetic phantoms and defect injectors for the imaging and QC tests.

Every function takes an explicit ``seed`` (numpy ``default_rng``) so a test or the detection-rate
script always sees the same pixels. Phantoms are crude anatomy, good enough to exercise the QC
metrics: a CT head/body in HU (air, fat, water/soft tissue, bone), an MR head with Rician noise
(magnitude of complex Gaussian noise, Gudbjartsson & Patz 1995), and a chest radiograph.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from dicomnode.domain import Volume

F32 = npt.NDArray[np.float32]
UID_PREFIX = "1.2.826.0.1.3680043.10.1234."  # test-only prefix


# --- CT ----------------------------------------------------------------------------------------


def _ellipse(rows: int, cols: int, cy: float, cx: float, ry: float, rx: float) -> npt.NDArray[np.bool_]:
    y, x = np.ogrid[:rows, :cols]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def ct_phantom(
    shape: tuple[int, int, int] = (24, 128, 128),
    seed: int = 0,
    noise_hu: float = 8.0,
    kind: str = "body",
    circular_fov: bool = True,
) -> F32:
    """A CT volume in HU: air (-1000) around an elliptical body of soft tissue (~40 HU) with a fat
    layer (-100 HU), bone (1000 HU: spine for ``body``, skull for ``head``), a table below the body
    and, with ``circular_fov``, -3024 padding outside the reconstruction circle."""
    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    vol = np.full(shape, -1000.0, dtype=np.float32)
    cy, cx = rows * 0.48, cols * 0.5
    for z in range(n):
        s = 1.0 + 0.04 * np.sin(np.pi * z / max(n - 1, 1))  # anatomy changes slowly along z
        img = vol[z]
        if kind == "head":
            img[_ellipse(rows, cols, cy, cx, rows * 0.36 * s, cols * 0.30 * s)] = 1000.0
            img[_ellipse(rows, cols, cy, cx, rows * 0.33 * s, cols * 0.27 * s)] = 35.0
            img[_ellipse(rows, cols, cy - rows * 0.05, cx, rows * 0.06, cols * 0.05)] = 8.0  # ventricle
        else:
            img[_ellipse(rows, cols, cy, cx, rows * 0.30 * s, cols * 0.38 * s)] = -100.0
            img[_ellipse(rows, cols, cy, cx, rows * 0.27 * s, cols * 0.35 * s)] = 40.0
            img[_ellipse(rows, cols, cy, cx - cols * 0.12, rows * 0.08, cols * 0.07)] = 60.0  # liver-ish
            img[_ellipse(rows, cols, cy + rows * 0.17, cx, rows * 0.05, cols * 0.05)] = 1000.0  # spine
            img[_ellipse(rows, cols, cy + rows * 0.17, cx, rows * 0.025, cols * 0.025)] = 250.0
        table = slice(int(rows * 0.86), int(rows * 0.88))
        img[table, int(cols * 0.15) : int(cols * 0.85)] = -150.0
        img += rng.normal(0.0, noise_hu, size=(rows, cols)).astype(np.float32)  # per slice: low memory
    if circular_fov:
        outside = ~_ellipse(rows, cols, (rows - 1) / 2, (cols - 1) / 2, rows / 2, cols / 2)
        vol[:, outside] = -3024.0
    return vol


def add_noise(vol: F32, sigma: float, seed: int = 0) -> F32:
    """Additive white Gaussian noise of standard deviation ``sigma`` (in the volume's units)."""
    rng = np.random.default_rng(seed + 1000)
    out = vol + rng.normal(0.0, sigma, size=vol.shape).astype(np.float32)
    padding = vol < -2000  # CT padding outside the reconstruction circle stays constant
    out[padding] = vol[padding]
    return out.astype(np.float32)


def offset_calibration(vol: F32, offset_hu: float) -> F32:
    """A wrong Rescale Intercept: every value shifted by ``offset_hu`` (padding stays padding)."""
    out = vol.copy()
    inside = vol > -2000
    out[inside] += np.float32(offset_hu)
    return out


def truncate(vol: F32, zoom: float = 1.6) -> F32:
    """Magnify the centre of each slice by ``zoom`` so the body is cut by the field of view."""
    n, rows, cols = vol.shape
    out = np.empty_like(vol)
    h, w = int(rows / zoom), int(cols / zoom)
    y0, x0 = (rows - h) // 2, (cols - w) // 2
    for z in range(n):
        crop = vol[z, y0 : y0 + h, x0 : x0 + w]
        crop = np.where(crop < -2000, -1000.0, crop)
        out[z] = ndimage.zoom(crop, (rows / h, cols / w), order=1)[:rows, :cols]
    return out


def add_metal(vol: F32, seed: int = 0, slices: slice | None = None, streak_hu: float = 400.0) -> F32:
    """A small metal implant (~3500 HU) with radial streaks, the pattern of photon starvation and
    beam hardening (Barrett & Keat 2004, RadioGraphics 24:1679)."""
    rng = np.random.default_rng(seed + 2000)
    out = vol.copy()
    n, rows, cols = vol.shape
    cy, cx = rows * 0.5, cols * 0.58
    y, x = np.mgrid[:rows, :cols]
    r = np.hypot(y - cy, x - cx) + 1.0
    theta = np.arctan2(y - cy, x - cx)
    phase = rng.uniform(0, 2 * np.pi)
    streaks = streak_hu * np.cos(12 * theta + phase) * np.exp(-r / (rows * 0.25))
    metal = _ellipse(rows, cols, cy, cx, rows * 0.025 + 1, cols * 0.025 + 1)
    body = vol > -500
    for z in range(*(slices or slice(0, n)).indices(n)):
        out[z][body[z]] += streaks[body[z]].astype(np.float32)
        out[z][metal] = 3500.0
    return out


def motion_artifact(image: F32, shift_px: tuple[float, float], fraction: float = 0.5, angles: int = 180) -> F32:
    """The artifact of an in-plane move by ``shift_px`` (rows, columns) during the last
    ``fraction`` of a 180 deg parallel-beam acquisition, reconstructed by filtered back-projection
    (ramp filter): inconsistent projections become streaks along the moved edges and a doubled
    outline. Add it to the image (HU); the projections of the static part cancel out."""
    mu = np.clip(image.astype(np.float64) + 1000.0, 0.0, None)  # attenuation above air
    n = mu.shape[0]
    moved = ndimage.shift(mu, shift_px, order=1, mode="constant")
    ramp = np.abs(np.fft.fftfreq(n))
    out = np.zeros(mu.shape, dtype=np.float64)
    thetas = np.linspace(0.0, 180.0, angles, endpoint=False)
    for theta in thetas[int(angles * (1.0 - fraction)) :]:
        difference = (
            ndimage.rotate(moved, theta, reshape=False, order=1).sum(axis=0)
            - ndimage.rotate(mu, theta, reshape=False, order=1).sum(axis=0)
        )
        filtered = np.real(np.fft.ifft(np.fft.fft(difference) * ramp))
        out += ndimage.rotate(np.tile(filtered, (n, 1)), -theta, reshape=False, order=1)
    return (out * np.pi / angles).astype(np.float32)


def add_motion(
    vol: F32, slices: Sequence[int], shift_mm: float, pixel_mm: float, seed: int = 0, angles: int = 180
) -> F32:
    """In-plane motion of ``shift_mm`` in a random direction during the acquisition of each of
    ``slices`` (see :func:`motion_artifact`); other slices are unchanged."""
    rng = np.random.default_rng(seed + 3000)
    out = vol.copy()
    for z in slices:
        angle = rng.uniform(0.0, 2 * np.pi)
        shift = (shift_mm / pixel_mm * np.sin(angle), shift_mm / pixel_mm * np.cos(angle))
        inside = vol[z] > -2000  # padding outside the reconstruction circle stays padding
        out[z][inside] = (vol[z] + motion_artifact(vol[z], shift, angles=angles))[inside]
    return out


def shift_slices(vol: F32, first: int, shift_mm: tuple[float, float], pixel_mm: float) -> F32:
    """The patient moved between slices ``first - 1`` and ``first``: every later slice is
    displaced in-plane by ``shift_mm`` (rows, columns), air filling in."""
    out = vol.copy()
    shift = (0.0, shift_mm[0] / pixel_mm, shift_mm[1] / pixel_mm)
    out[first:] = ndimage.shift(vol[first:] + 1000.0, shift, order=1, mode="constant") - 1000.0
    return out


_CRANIUM: tuple[F32, tuple[float, float, float]] | None = None


def cranium() -> tuple[F32, tuple[float, float, float]]:
    """The real head CT of Debian ``invesalius-examples`` in HU (108 x 256 x 256; slices inferior to
    superior, rows anterior to posterior) and its spacing; read once per process."""
    global _CRANIUM
    if _CRANIUM is None:
        import importlib.util

        script = Path(__file__).resolve().parent.parent / "scripts" / "invesalius_to_dicom.py"
        spec = importlib.util.spec_from_file_location("invesalius_to_dicom", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        volume, spacing = module.read_inv3()
        _CRANIUM = (volume.astype(np.float32), spacing)
    return _CRANIUM


# --- MR ----------------------------------------------------------------------------------------


def mr_phantom(
    shape: tuple[int, int, int] = (12, 128, 128),
    seed: int = 0,
    noise_sigma: float = 15.0,
    ghost_shift: int = 0,
    ghost_every: int = 4,
    phase_axis: int = 1,
) -> F32:
    """A magnitude MR head: white matter 1000, grey matter 650, CSF 250, in air. Noise is complex
    Gaussian (``noise_sigma`` per channel) so the background is Rayleigh and the tissue Rician.

    ``ghost_shift`` > 0 simulates rigid motion between shots: every ``ghost_every``-th phase-encode
    line (k-space row along ``phase_axis``: 1 = rows/COL, 2 = columns/ROW) is acquired with the
    object translated by ``ghost_shift`` pixels, which replicates it as ghosts along that axis.
    """
    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    out = np.empty(shape, dtype=np.float32)
    cy, cx = rows * 0.5, cols * 0.5
    for z in range(n):
        s = 1.0 - 0.3 * abs(z - (n - 1) / 2) / max(n, 1)
        img = np.zeros((rows, cols), dtype=np.float64)
        img[_ellipse(rows, cols, cy, cx, rows * 0.36 * s, cols * 0.30 * s)] = 650.0
        img[_ellipse(rows, cols, cy, cx, rows * 0.28 * s, cols * 0.22 * s)] = 1000.0
        img[_ellipse(rows, cols, cy, cx, rows * 0.08 * s, cols * 0.05 * s)] = 250.0
        img = ndimage.gaussian_filter(img, 0.7)
        complex_img = img.astype(np.complex128)
        if ghost_shift:
            k = np.fft.fft2(complex_img)
            n_pe = k.shape[phase_axis - 1]
            ky = np.fft.fftfreq(n_pe) * n_pe
            corrupt = (np.arange(n_pe) % ghost_every) == 0
            phase = np.where(corrupt, np.exp(-2j * np.pi * ky * ghost_shift / n_pe), 1.0)
            k = k * (phase[:, None] if phase_axis == 1 else phase[None, :])
            complex_img = np.fft.ifft2(k)
        noise = rng.normal(0, noise_sigma, (rows, cols)) + 1j * rng.normal(0, noise_sigma, (rows, cols))
        out[z] = np.abs(complex_img + noise).astype(np.float32)
    return out


# --- radiograph --------------------------------------------------------------------------------


def xr_phantom(
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    noise: float = 12.0,
    blur_sigma: float = 0.0,
    exposure_gain: float = 1.0,
    collimated: bool = True,
    bits: int = 12,
) -> F32:
    """A chest radiograph for presentation (MONOCHROME2, 12 bits, bright = attenuating): lungs,
    mediastinum, ribs, spine and fine lung texture, then optional blur, quantum-like noise, an
    exposure gain (values scaled about the mid grey and clipped to the stored range) and the
    collimator shutters (a uniform bright border)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    hi = 2**bits - 1
    y, x = np.mgrid[:rows, :cols].astype(np.float64)
    img = np.full(shape, 2600.0)  # soft tissue of the trunk
    lungs = _ellipse(rows, cols, rows * 0.45, cols * 0.30, rows * 0.32, cols * 0.15) | _ellipse(
        rows, cols, rows * 0.45, cols * 0.70, rows * 0.32, cols * 0.15
    )
    img[lungs] = 1200.0
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 3.0)
    texture /= texture.std()
    img += 120.0 * texture * lungs
    for k in range(9):  # ribs: bright curved bands
        yc = rows * (0.2 + 0.07 * k)
        band = np.abs(y - (yc + 0.00025 * (x - cols / 2) ** 2 / (cols / 1024))) < rows * 0.012
        img[band] += 600.0
    img[np.abs(x - cols / 2) < cols * 0.05] += 500.0  # spine
    outside = ~_ellipse(rows, cols, rows * 0.5, cols * 0.5, rows * 0.55, cols * 0.48)
    img[outside] = 300.0  # direct exposure: dark
    if blur_sigma > 0:
        img = ndimage.gaussian_filter(img, blur_sigma)
    img += rng.normal(0, noise, shape) * np.sqrt(np.clip(img, 1, None) / 2000.0)
    img = (img - hi / 2) * exposure_gain + hi / 2
    if collimated:
        b = max(rows // 32, 4)
        img[:b, :] = img[-b:, :] = hi * 0.97
        img[:, :b] = img[:, -b:] = hi * 0.97
    return np.clip(np.round(img), 0, hi).astype(np.float32)


def blur(image: F32, sigma: float) -> F32:
    """Gaussian blur in plane (each slice), sigma in pixels."""
    sigmas = (0.0, sigma, sigma) if image.ndim == 3 else (sigma, sigma)
    return ndimage.gaussian_filter(image, sigmas).astype(np.float32)


# --- in-memory volumes and DICOM files ---------------------------------------------------------


def header(modality: str, **attributes: Any) -> Dataset:
    """A minimal image header as :func:`dicomnode.imaging.load_volume` would keep it."""
    ds = Dataset()
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def volume(
    pixels: F32,
    modality: str,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    positions: Sequence[float] | None = None,
    problems: Sequence[str] = (),
    orientation: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    **attributes: Any,
) -> Volume:
    """Wrap phantom pixels as a :class:`Volume` with one minimal header per slice."""
    n = pixels.shape[0]
    if positions is None:
        positions = [i * spacing[0] for i in range(n)] if modality not in ("CR", "DX") else []
    hdr = header(modality, **attributes)
    return Volume(
        pixels=pixels.astype(np.float32),
        spacing=spacing,
        orientation=orientation,
        origin=(0.0, 0.0, 0.0),
        frame_of_reference_uid="1.2.3.4",
        modality=modality,
        series_instance_uid="1.2.3.4.5",
        study_instance_uid="1.2.3.4.6",
        headers=tuple(hdr for _ in range(n)),
        slice_positions=tuple(float(p) for p in positions),
        problems=tuple(problems),
    )


def write_ct_series(
    hu: F32,
    folder: Path,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
    positions: Sequence[float] | None = None,
    frame_of_reference: Sequence[str] | None = None,
    rle: bool = False,
    seed: int = 0,
) -> list[Path]:
    """Write ``hu`` as one CT Image Storage file per slice (Rescale Intercept -1024, slope 1).

    ``positions`` overrides each slice's position along z (to create gaps or duplicates);
    ``frame_of_reference`` gives each slice's Frame of Reference UID (to mix them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = (generate_uid(UID_PREFIX, [f"{seed}-{k}"]) for k in ("st", "se", "for"))
    paths: list[Path] = []
    for i, image in enumerate(hu):
        z = positions[i] if positions is not None else i * spacing[0]
        ds = _base_dataset(CTImageStorage, "CT", study, series, seed, i)
        ds.FrameOfReferenceUID = frame_of_reference[i] if frame_of_reference is not None else frame
        ds.ImagePositionPatient = [-100.0, -100.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        stored = np.clip(np.round(image + 1024), 0, 4095).astype(np.uint16)
        _set_pixels(ds, stored, bits=12)
        if rle:
            ds.compress(RLELossless)
        path = folder / f"{rng.integers(1 << 30):09d}_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dx(image: F32, path: Path, monochrome1: bool = False, **attributes: Any) -> Path:
    """Write a 12-bit DX For Presentation image; ``monochrome1`` stores it inverted as MONOCHROME1."""
    study, series = generate_uid(UID_PREFIX, ["dx-st"]), generate_uid(UID_PREFIX, ["dx-se"])
    ds = _base_dataset(DigitalXRayImageStorageForPresentation, "DX", study, series, 0, 0)
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PresentationIntentType = "FOR PRESENTATION"
    stored = np.clip(np.round(image), 0, 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    _set_pixels(ds, stored, bits=12)
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mr_slice(image: F32, path: Path, z: float, size: int | None = None) -> Path:
    """One MR slice (used to build series with inconsistent sizes)."""
    study, series = generate_uid(UID_PREFIX, ["mr-st"]), generate_uid(UID_PREFIX, ["mr-se"])
    ds = _base_dataset(MRImageStorage, "MR", study, series, 0, int(z))
    ds.FrameOfReferenceUID = generate_uid(UID_PREFIX, ["mr-for"])
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    data = image if size is None else image[:size, :size]
    _set_pixels(ds, np.clip(data, 0, 4095).astype(np.uint16), bits=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _base_dataset(sop_class: str, modality: str, study: str, series: str, seed: int, i: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop = generate_uid(UID_PREFIX, [study, series, str(seed), str(i)])
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = modality
    ds.PatientName, ds.PatientID = "Phantom^QC", "QC0001"
    ds.StudyDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
    ds.InstanceNumber = i + 1
    ds.SeriesNumber = 1
    return ds


def _set_pixels(ds: Dataset, stored: npt.NDArray[np.uint16], bits: int) -> None:
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = stored.tobytes()
