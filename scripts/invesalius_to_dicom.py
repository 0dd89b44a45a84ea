"""Convert the real head CT shipped by Debian ``invesalius-examples`` into a DICOM CT series.

The package (GPL-2, ``/usr/share/doc/invesalius-examples/copyright``) installs
``/usr/share/doc/invesalius-examples/examples/Cranium.inv3``: a gzip'd tar holding ``main.plist``
and ``matrix.dat``, a raw little-endian int16 array in HU of shape (108, 256, 256) (slices, rows,
columns), pixel spacing 0.957 mm, slice spacing 1.5 mm, slice 0 at the skull base (inferior).
InVesalius stores rows bottom-up (VTK convention), so rows are flipped here to put anterior at the
top, which is what Image Orientation (Patient) 1\\0\\0\\0\\1\\0 means (PS3.3 C.7.6.2.1.1).
Left/right cannot be checked on this anonymised volume; we keep the stored column order.

The output is one file per slice, CT Image Storage (PS3.3 A.3), Explicit VR Little Endian, with
UIDs from :func:`pydicom.uid.generate_uid` with fixed entropy sources, so two runs give the same
bytes. The data itself is never committed; CI installs the Debian package.

Usage: ``python scripts/invesalius_to_dicom.py OUT_DIR [--inv3 PATH]``
"""

from __future__ import annotations

import argparse
import math
import plistlib
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from torch.nn import functional as F

CRANIUM_INV3 = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
DEBIAN_PACKAGE = "invesalius-examples"


def read_inv3(path: Path = CRANIUM_INV3) -> tuple[npt.NDArray[np.int16], tuple[float, float, float]]:
    """The HU volume (slices, rows, columns) in DICOM row order and its spacing
    (between slices, between rows, between columns) in mm."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: apt-get install {DEBIAN_PACKAGE}")
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        main_file = tar.extractfile(members["main.plist"])
        assert main_file is not None
        main = plistlib.load(main_file)
        matrix = main["matrix"]
        raw_file = tar.extractfile(members[matrix["filename"]])
        assert raw_file is not None
        raw = raw_file.read()
    shape = tuple(int(n) for n in matrix["shape"])
    array = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(shape)
    col_spacing, row_spacing, slice_spacing = (float(s) for s in main["spacing"])
    volume = np.ascontiguousarray(array[:, ::-1, :]).astype(np.int16)
    return volume, (slice_spacing, row_spacing, col_spacing)


def _uid(*parts: str) -> UID:
    return generate_uid(entropy_srcs=["dicomnode", "invesalius-cranium", *parts])


def series_datasets(
    volume: npt.NDArray[np.int16],
    spacing: tuple[float, float, float],
    *,
    tag: str = "cranium",
    series_description: str = "InVesalius Cranium head CT",
) -> list[Dataset]:
    """One CT Image Storage dataset per slice; ``tag`` seeds the UIDs (a different tag gives a
    different study/series)."""
    n, rows, cols = volume.shape
    study_uid = _uid(tag, "study")
    series_uid = _uid(tag, "series")
    for_uid = _uid(tag, "frame-of-reference")
    datasets = []
    for k in range(n):
        sop_uid = _uid(tag, "instance", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20120914"
        ds.SeriesDate = "20120914"
        ds.ContentDate = "20120914"
        ds.StudyTime = "120000"
        ds.SeriesTime = "120000"
        ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "InVesalius example (converted by dicomnode)"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Head CT (InVesalius example)"
        ds.SeriesDescription = series_description
        ds.PatientName = "InVesalius^Cranium"
        ds.PatientID = "INVESALIUS-CRANIUM"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.KVP = ""
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            f"{-(cols - 1) * spacing[2] / 2:.4f}",
            f"{-(rows - 1) * spacing[1] / 2:.4f}",
            f"{k * spacing[0]:.4f}",
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{k * spacing[0]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{spacing[1]:.7g}", f"{spacing[2]:.7g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(volume[k], dtype="<i2").tobytes()
        datasets.append(ds)
    return datasets


def write_series(out_dir: Path, inv3: Path = CRANIUM_INV3, *, tag: str = "cranium") -> list[Path]:
    """Write the converted series as ``out_dir/CT000001.dcm`` ...; returns the paths in slice order."""
    volume, spacing = read_inv3(inv3)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(series_datasets(volume, spacing, tag=tag)):
        path = out_dir / f"CT{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- encodings: the same anatomy as different scanners could store it -----------------------------

HFS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class Series:
    """One way a scanner could have written the volume: the pixels as stored (slices in file
    order), the Image Orientation (Patient), the slice positions along that normal, spacing.
    (A plain class, not a dataclass: this script is also loaded from a file path, without a
    module of its own in sys.modules.)"""

    def __init__(
        self,
        pixels: npt.NDArray[np.float32],
        truth: npt.NDArray[np.bool_] | None,
        spacing: tuple[float, float, float],
        orientation: tuple[float, float, float, float, float, float] = HFS,
        positions: tuple[float, ...] = (),
        stored: str = "signed",  # "signed": int16, intercept 0; "unsigned": uint16, intercept -1024
    ) -> None:
        self.pixels = pixels
        self.truth = truth
        self.spacing = spacing
        self.orientation = orientation
        self.positions = positions
        self.stored = stored


def _resample_z(a: npt.NDArray[Any], spacing: tuple[float, float, float], mm: float, slab: bool) -> npt.NDArray[Any]:
    """Re-slice along the slices: slabs averaged to ``mm`` (thick) or linear interpolation (thin)."""
    n = a.shape[0]
    length = n * spacing[0]
    m = max(1, int(round(length / mm)))
    out = np.empty((m, *a.shape[1:]), dtype=np.float32)
    for j in range(m):
        lo, hi = j * mm / spacing[0], (j + 1) * mm / spacing[0]
        if slab:
            picks = list(range(int(math.floor(lo)), max(int(math.floor(lo)) + 1, int(math.ceil(hi)))))
            picks = [p for p in picks if p < n] or [n - 1]
            out[j] = a[picks].astype(np.float32).mean(0)
        else:
            z = min(n - 1.0, max(0.0, (lo + hi) / 2 - 0.5))
            z0 = int(math.floor(z))
            z1 = min(n - 1, z0 + 1)
            t = z - z0
            out[j] = (1 - t) * a[z0] + t * a[z1]
    return out


def _resample_xy(
    a: npt.NDArray[Any], spacing: tuple[float, float, float], mm: float, size: int | None
) -> npt.NDArray[np.float32]:
    """Re-grid in-plane to ``mm`` pixels (anti-aliased when shrinking), centred, ``size`` square."""
    rows, cols = a.shape[1:]
    new = (round(rows * spacing[1] / mm), round(cols * spacing[2] / mm))
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None] + 1024.0
    y = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=new[0] < rows)[:, 0] - 1024.0
    out = y.numpy()
    if size is not None:
        r0, c0 = (out.shape[1] - size) // 2, (out.shape[2] - size) // 2
        out = out[:, max(0, r0) : max(0, r0) + size, max(0, c0) : max(0, c0) + size]
    return np.ascontiguousarray(out, dtype=np.float32)


def _ascending(n: int, mm: float) -> tuple[float, ...]:
    return tuple(k * mm for k in range(n))


def encode(name: str, hu: npt.NDArray[np.float32], truth: npt.NDArray[np.bool_] | None,
           spacing: tuple[float, float, float], rng: np.random.Generator) -> Series:
    """The volume (slices inferior->superior, rows anterior->posterior, columns right->left) as
    the encoding ``name`` of :data:`ENCODINGS` would store it."""
    n = hu.shape[0]
    t = truth
    z = _ascending(n, spacing[0])
    if name == "as-is":
        return Series(hu, t, spacing, HFS, z)
    if name == "mirrored-lr":  # the pixel columns mirrored, the header unchanged: a mirrored head
        return Series(hu[:, :, ::-1], None if t is None else t[:, :, ::-1], spacing, HFS, z)
    if name == "flipped-ap":  # the pixel rows flipped, the header unchanged: a head upside down
        return Series(hu[:, ::-1], None if t is None else t[:, ::-1], spacing, HFS, z)
    if name == "reversed-order":  # files and Instance Numbers from superior to inferior
        return Series(hu[::-1], None if t is None else t[::-1], spacing, HFS, z[::-1])
    if name == "iop-rows-reversed":  # same anatomy: rows stored posterior->anterior, column cosine -y,
        # so the normal is -z and the same slices sit at minus their z along it
        tt = None if t is None else t[:, ::-1]
        return Series(hu[:, ::-1], tt, spacing, (1, 0, 0, 0, -1, 0), tuple(-v for v in z))
    if name == "iop-transposed":  # same anatomy: rows along x, columns along y; normal -z
        pix = hu.transpose(0, 2, 1)[::-1]
        tt = None if t is None else t.transpose(0, 2, 1)[::-1]
        return Series(pix, tt, (spacing[0], spacing[2], spacing[1]), (0, 1, 0, 1, 0, 0), tuple(-v for v in z[::-1]))
    if name == "iop-prone":  # same anatomy, head-first prone: rotated 180 deg in-plane
        return Series(hu[:, ::-1, ::-1], None if t is None else t[:, ::-1, ::-1], spacing, (-1, 0, 0, 0, -1, 0), z)
    if name == "iop-feet-first":  # same anatomy: columns left->right, normal -z, superior first
        pix = hu[::-1, :, ::-1]
        tt = None if t is None else t[::-1, :, ::-1]
        return Series(pix, tt, spacing, (-1, 0, 0, 0, 1, 0), tuple(-v for v in z[::-1]))
    if name == "unsigned-1024":
        return Series(hu, t, spacing, HFS, z, stored="unsigned")
    if name in ("pixels-0.4mm", "pixels-1.0mm"):
        mm = 0.4 if name == "pixels-0.4mm" else 1.0
        size = 512 if mm == 0.4 else None
        pix = _resample_xy(hu, spacing, mm, size)
        tt = None if t is None else _resample_xy(t.astype(np.float32) - 1024.0, spacing, mm, size) > -1023.5
        return Series(pix, tt, (spacing[0], mm, mm), HFS, z)
    if name in ("slices-0.6mm", "slices-5mm"):
        mm = 0.6 if name == "slices-0.6mm" else 5.0
        slab = mm > spacing[0]
        pix = _resample_z(hu, spacing, mm, slab)
        if not slab:  # thinner slices are noisier: about sqrt(1.5 / 0.6) x the 1.5 mm noise
            pix = pix + rng.normal(0.0, 3.0, pix.shape).astype(np.float32)
        tt = None if t is None else _resample_z(t.astype(np.float32), spacing, mm, slab) >= 0.5
        return Series(pix, tt, (mm, spacing[1], spacing[2]), HFS, _ascending(pix.shape[0], mm))
    raise ValueError(f"unknown encoding {name!r}")


ENCODINGS = (
    "as-is",
    "mirrored-lr",
    "flipped-ap",
    "reversed-order",
    "iop-rows-reversed",
    "iop-transposed",
    "iop-prone",
    "iop-feet-first",
    "unsigned-1024",
    "pixels-0.4mm",
    "pixels-1.0mm",
    "slices-0.6mm",
    "slices-5mm",
)


def encoded_datasets(series: Series, tag: str, description: str = "") -> list[Dataset]:
    """CT Image Storage datasets of ``series`` in file order: Image Orientation (Patient) and
    Image Position (Patient) as the encoding says (positions along the slice normal, the image
    centred on the normal's axis), stored values signed (intercept 0) or unsigned (intercept
    -1024), Slice Thickness the encoding's slice spacing."""
    orientation = np.asarray(series.orientation, dtype=np.float64)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    n, rows, cols = series.pixels.shape
    spacing = series.spacing
    datasets = series_datasets(
        np.zeros((n, rows, cols), dtype=np.int16), spacing, tag=tag,
        series_description=description or f"InVesalius Cranium head CT ({tag})",
    )
    for k, ds in enumerate(datasets):
        corner = -(cols - 1) * spacing[2] / 2 * row - (rows - 1) * spacing[1] / 2 * col
        position = corner + series.positions[k] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.SliceLocation = f"{series.positions[k]:.4f}"
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.PixelSpacing = [f"{spacing[1]:.7g}", f"{spacing[2]:.7g}"]
        hu = np.round(series.pixels[k].astype(np.float64))
        if series.stored == "unsigned":
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = "-1024"
            stored = np.clip(hu + 1024.0, 0, 65535).astype("<u2")
        else:
            stored = np.clip(hu, -32768, 32767).astype("<i2")
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return datasets


def write_encoded(out_dir: Path, series: Series, tag: str, description: str = "") -> list[Path]:
    """Write :func:`encoded_datasets` as ``out_dir/CT000001.dcm`` ... in file order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(encoded_datasets(series, tag, description)):
        path = out_dir / f"CT{k + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--inv3", type=Path, default=CRANIUM_INV3)
    args = parser.parse_args()
    paths = write_series(args.out_dir, args.inv3)
    print(f"wrote {len(paths)} CT images to {args.out_dir}")


if __name__ == "__main__":
    main()
