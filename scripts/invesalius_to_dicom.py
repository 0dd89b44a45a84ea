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
import plistlib
import tarfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--inv3", type=Path, default=CRANIUM_INV3)
    args = parser.parse_args()
    paths = write_series(args.out_dir, args.inv3)
    print(f"wrote {len(paths)} CT images to {args.out_dir}")


if __name__ == "__main__":
    main()
