"""Spool files of one series -> :class:`~dicomnode.domain.Volume` (sorted, geometry, physical units).

This is the only place where pixel data are decoded (GUIDE section 2). Decoding goes through
pydicom's pixel handlers, so every transfer syntax with an installed plugin works: native, RLE,
JPEG baseline/lossless, JPEG-LS and JPEG 2000 (pylibjpeg, openjpeg, rle plugins).

Choices made here, so that every analyzer sees the same conventions:

* **Order.** Images are sorted by their position along the slice normal, the cross product of the
  row and column direction cosines of Image Orientation (Patient) (0020,0037) dotted with Image
  Position (Patient) (0020,0032) (PS3.3 C.7.6.2.1.1). Without geometry (CR/DX, secondary capture)
  they are sorted by Instance Number (0020,0013), then frame number.
* **Units.** Stored values go through the Modality LUT stage (PS3.3 C.11.1): Rescale Slope and
  Intercept (HU for CT), or the Modality LUT Sequence. Enhanced multi-frame images take them from
  the Pixel Value Transformation functional group (PS3.3 C.7.6.16.2.9).
* **MONOCHROME1** (PS3.3 C.7.6.3.1.2: minimum value displayed white) is inverted within the
  representable range, ``lo + hi - x`` with ``lo, hi`` the rescaled limits of Bits Stored, so
  that in every volume a higher value is displayed brighter (the MONOCHROME2 convention). A value
  saturated at one end of the detector range stays at an end after inversion.
* **Colour** images (RGB, YBR, PALETTE COLOR) are reduced to luminance (ITU-R BT.601 weights)
  and the reduction is reported in ``Volume.problems``.
* **Canonical orientation.** :func:`canonical_reorientation` says how to transpose and flip a
  volume's axes so that they run, as closely as the acquisition allows, from inferior to superior
  (slices), anterior to posterior (rows) and patient right to patient left (columns): the
  DICOM patient axes +z, +y, +x (LPS, PS3.3 C.7.6.2.1.1), which is an axial series displayed in the
  radiological convention. Models see every series that way, whatever its encoding.
* **Spacing.** Between slices: the median difference of the sorted positions (else Spacing
  Between Slices, Slice Thickness, or 1 mm). In plane: Pixel Spacing (0028,0030), or Imager Pixel
  Spacing (0018,1164) for projection radiographs (PS3.3 C.8.11.4.1.1), else 1 mm (reported).

Geometry problems that still allow a volume (gaps, duplicate positions, several orientations or
frames of reference, unreadable files) are returned one sentence each in ``Volume.problems``.
:class:`~dicomnode.errors.Permanent` is raised only when no volume can be built at all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from dicomnode.domain import Volume
from dicomnode.errors import Permanent

__all__ = ["Reorientation", "canonical_reorientation", "load_volume", "stored_value_range"]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GAP_FACTOR = 1.5  # a step larger than this many median spacings is a gap
_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class _Frame:
    """One 2-D image to place in the volume (a single-frame instance or one frame of many)."""

    file_index: int
    frame_index: int | None  # None: single-frame instance
    header: Dataset
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    instance_number: int | None
    slice_thickness: float | None


def load_volume(paths: Sequence[Path]) -> Volume:
    """Read the files of one series and stack their images into a sorted :class:`Volume`.

    Raises :class:`~dicomnode.errors.Permanent` when no volume can be built: no file given, no
    readable image, or images of different sizes (Rows/Columns differ).
    """
    if not paths:
        raise Permanent("no files given: cannot build a volume from an empty series")
    problems: list[str] = []
    frames: list[_Frame] = []
    for index, path in enumerate(paths):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # any parse failure of one file must not sink the series
            problems.append(f"{Path(path).name} is not a readable DICOM file ({type(exc).__name__}: {exc})")
            continue
        try:
            frames.extend(_frames_of(index, header))
        except ValueError as exc:
            problems.append(f"{Path(path).name}: {exc}")
    if not frames:
        detail = "; ".join(problems) if problems else "no image found"
        raise Permanent(f"no readable image in {len(paths)} file(s): {detail}")

    sizes = Counter((f.rows, f.columns) for f in frames)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} images)" for (r, c), n in sizes.most_common())
        raise Permanent(f"series mixes image sizes (Rows x Columns): {listed}; no volume can be built")

    headers0 = frames[0].header
    problems += _consistency_problems(frames)
    ordered, positions, orientation, sort_problems = _sort(frames)
    problems += sort_problems
    spacing_between, spacing_problems = _slice_spacing(positions, ordered)
    problems += spacing_problems
    row_spacing, column_spacing, ps_problems = _pixel_spacing(ordered)
    problems += ps_problems

    pixels, kept, decode_problems = _decode(paths, ordered)
    problems += decode_problems
    if not kept:
        raise Permanent("no image of the series could be decoded: " + "; ".join(decode_problems))
    if len(kept) < len(ordered):
        positions = tuple(positions[i] for i in kept) if positions else ()
        ordered = [ordered[i] for i in kept]
        pixels = pixels[kept]

    first = ordered[0]
    origin = first.position if first.position is not None else (0.0, 0.0, 0.0)
    return Volume(
        pixels=pixels,
        spacing=(spacing_between, row_spacing, column_spacing),
        orientation=orientation,
        origin=origin,
        frame_of_reference_uid=_most_common(str(f.header.get("FrameOfReferenceUID", "")) for f in ordered),
        modality=str(headers0.get("Modality", "")),
        series_instance_uid=str(headers0.get("SeriesInstanceUID", "")),
        study_instance_uid=str(headers0.get("StudyInstanceUID", "")),
        headers=tuple(f.header for f in ordered),
        slice_positions=positions,
        problems=tuple(problems),
    )


# --- headers -> frames -------------------------------------------------------------------------


def _float_tuple(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != n or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _functional(ds: Dataset, per_frame: Dataset | None, sequence: str, keyword: str) -> Any:
    """An attribute from the per-frame, then the shared functional group (PS3.3 C.7.6.16)."""
    for group in (per_frame, _first_item(ds, "SharedFunctionalGroupsSequence")):
        if group is None:
            continue
        item = _first_item(group, sequence)
        if item is not None and keyword in item and item[keyword].value is not None:
            return item[keyword].value
    return None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if seq:
        item = seq[0]
        return item if isinstance(item, Dataset) else None
    return None


def _frames_of(file_index: int, ds: Dataset) -> list[_Frame]:
    """The images one instance contributes, with their geometry and rescale."""
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise ValueError("no image (Rows/Columns absent)")
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            del ds[keyword]
    instance_number = _int_or_none(ds.get("InstanceNumber"))
    thickness = _float_or_none(ds.get("SliceThickness"))
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence")
    frames: list[_Frame] = []
    for k in range(max(n_frames, 1)):
        per_frame = per_frame_groups[k] if per_frame_groups and k < len(per_frame_groups) else None
        ipp = _functional(ds, per_frame, "PlanePositionSequence", "ImagePositionPatient")
        iop = _functional(ds, per_frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(ds, per_frame, "PixelMeasuresSequence", "PixelSpacing")
        slope = _functional(ds, per_frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, per_frame, "PixelValueTransformationSequence", "RescaleIntercept")
        frame_thickness = _functional(ds, per_frame, "PixelMeasuresSequence", "SliceThickness")
        if ipp is None:
            ipp = ds.get("ImagePositionPatient")
        if iop is None:
            iop = ds.get("ImageOrientationPatient")
        if spacing is None:
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        if slope is None:
            slope = ds.get("RescaleSlope")
        if intercept is None:
            intercept = ds.get("RescaleIntercept")
        position = _float_tuple(ipp, 3) if ipp is not None else None
        orientation = _float_tuple(iop, 6) if iop is not None else None
        pixel_spacing = _float_tuple(spacing, 2) if spacing is not None else None
        if pixel_spacing is not None and min(pixel_spacing) <= 0:
            pixel_spacing = None
        frames.append(
            _Frame(
                file_index=file_index,
                frame_index=k if n_frames > 1 else None,
                header=ds,
                rows=int(rows),
                columns=int(columns),
                position=position,  # type: ignore[arg-type]
                orientation=orientation,  # type: ignore[arg-type]
                pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
                slope=_float_or_none(slope) or 1.0,
                intercept=_float_or_none(intercept) or 0.0,
                instance_number=instance_number,
                slice_thickness=_float_or_none(frame_thickness) or thickness,
            )
        )
    return frames


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _most_common(values: Any) -> str:
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else ""


def _consistency_problems(frames: list[_Frame]) -> list[str]:
    problems: list[str] = []
    headers = {id(f.header): f.header for f in frames}.values()
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        problems.append(f"files belong to {len(series)} series")
    frames_of_reference = {str(h.get("FrameOfReferenceUID", "")) for h in headers} - {""}
    if len(frames_of_reference) > 1:
        problems.append(f"series has {len(frames_of_reference)} frames of reference")
    if any(str(h.get("SamplesPerPixel", 1)) != "1" or _is_palette(h) for h in headers):
        problems.append("colour images were converted to luminance (ITU-R BT.601)")
    return problems


def _is_palette(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"


# --- ordering and spacing ----------------------------------------------------------------------


def _sort(
    frames: list[_Frame],
) -> tuple[list[_Frame], tuple[float, ...], tuple[float, float, float, float, float, float], list[str]]:
    """Sort along the slice normal when every image has geometry, else by Instance Number."""
    problems: list[str] = []
    with_geometry = [f for f in frames if f.position is not None and f.orientation is not None]
    orientations = Counter(tuple(round(v, 4) for v in f.orientation) for f in with_geometry if f.orientation)
    if len(orientations) > 1:
        problems.append(f"series has {len(orientations)} image orientations")
    if with_geometry and len(with_geometry) == len(frames):
        reference = orientations.most_common(1)[0][0]
        row, col = np.array(reference[:3]), np.array(reference[3:])
        normal = np.cross(row, col)
        keyed = [(float(np.dot(np.array(f.position), normal)), _fallback_key(f), f) for f in frames]
        keyed.sort(key=lambda item: (item[0], item[1]))
        orientation = tuple(float(v) for v in reference)
        return (
            [item[2] for item in keyed],
            tuple(item[0] for item in keyed),
            orientation,  # type: ignore[return-value]
            problems,
        )
    if with_geometry:
        problems.append(
            f"{len(frames) - len(with_geometry)} of {len(frames)} images lack Image Position/Orientation "
            "(Patient); sorted by Instance Number"
        )
    ordered = sorted(frames, key=_fallback_key)
    orientation_any = orientations.most_common(1)[0][0] if orientations else _DEFAULT_ORIENTATION
    return ordered, (), tuple(float(v) for v in orientation_any), problems  # type: ignore[return-value]


def _fallback_key(frame: _Frame) -> tuple[int, int, int]:
    number = frame.instance_number if frame.instance_number is not None else 2**31
    return (number, frame.frame_index or 0, frame.file_index)


def _slice_spacing(positions: tuple[float, ...], ordered: list[_Frame]) -> tuple[float, list[str]]:
    """Median step between sorted positions; gaps (> 1.5x median) and duplicates are reported."""
    problems: list[str] = []
    header_spacing = _float_or_none(ordered[0].header.get("SpacingBetweenSlices"))
    fallback = header_spacing or ordered[0].slice_thickness or 1.0
    if len(positions) < 2:
        return float(abs(fallback)), problems
    steps = np.diff(np.asarray(positions, dtype=np.float64))
    positive = steps[steps > 1e-3]
    median = float(np.median(positive)) if positive.size else 0.0
    duplicate_tol = max(1e-3, 0.01 * median)
    duplicates: Counter[float] = Counter()
    for i, step in enumerate(steps):
        if step <= duplicate_tol:
            duplicates[round(positions[i], 3)] += 1
    for position, count in sorted(duplicates.items()):
        problems.append(f"{count + 1} images share position {position:g} mm along the slice normal")
    if median > 0:
        for i, step in enumerate(steps):
            if step > _GAP_FACTOR * median:
                missing = max(1, round(step / median) - 1)
                problems.append(
                    f"gap of {step:.3g} mm between slices at {positions[i]:.4g} mm and "
                    f"{positions[i + 1]:.4g} mm (median spacing {median:.3g} mm): "
                    f"about {missing} slice{'s' if missing != 1 else ''} missing"
                )
        return median, problems
    return float(abs(fallback)), problems


def _pixel_spacing(ordered: list[_Frame]) -> tuple[float, float, list[str]]:
    problems: list[str] = []
    spacings = Counter(tuple(round(v, 6) for v in f.pixel_spacing) for f in ordered if f.pixel_spacing)
    if not spacings:
        problems.append("Pixel Spacing and Imager Pixel Spacing are missing or zero; 1 mm assumed")
        return 1.0, 1.0, problems
    if len(spacings) > 1:
        problems.append(f"series has {len(spacings)} different pixel spacings")
    (row_spacing, column_spacing) = spacings.most_common(1)[0][0]
    if len(spacings) == 1 and sum(1 for f in ordered if f.pixel_spacing) < len(ordered):
        problems.append("some images lack Pixel Spacing")
    return float(row_spacing), float(column_spacing), problems


# --- pixels ------------------------------------------------------------------------------------


def _decode(
    paths: Sequence[Path], ordered: list[_Frame]
) -> tuple[npt.NDArray[np.float32], list[int], list[str]]:
    """Decode each file once and put its frames at their sorted places (one slice of overhead)."""
    first = ordered[0]
    pixels = np.zeros((len(ordered), first.rows, first.columns), dtype=np.float32)
    places: dict[int, list[tuple[int, _Frame]]] = {}
    for slot, frame in enumerate(ordered):
        places.setdefault(frame.file_index, []).append((slot, frame))
    kept: list[int] = []
    problems: list[str] = []
    for file_index in sorted(places):
        name = Path(paths[file_index]).name
        try:
            ds = pydicom.dcmread(paths[file_index])
            array = _stored_values(ds)
        except Exception as exc:  # a codec error in one file must not sink the series
            problems.append(f"could not decode the pixel data of {name} ({type(exc).__name__}: {exc})")
            continue
        for slot, frame in places[file_index]:
            image = array[frame.frame_index or 0] if array.ndim == 3 else array
            if image.shape != (first.rows, first.columns):
                problems.append(f"{name}: decoded shape {image.shape} does not match Rows/Columns")
                continue
            pixels[slot] = _physical(image, ds, frame)
            kept.append(slot)
    kept.sort()
    return pixels, kept, problems


def _stored_values(ds: Dataset) -> npt.NDArray[Any]:
    """Decoded pixel values as (frames, rows, columns) or (rows, columns), colour -> luminance."""
    array = ds.pixel_array
    if _is_palette(ds):
        from pydicom.pixels.processing import apply_color_lut

        array = apply_color_lut(array, ds)
    if int(ds.get("SamplesPerPixel", 1)) > 1 or _is_palette(ds):
        # pixel_array already returns RGB for YBR encodings (pydicom 3 default)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        array = np.asarray(array, dtype=np.float32) @ weights
    return np.asarray(array)


def _physical(image: npt.NDArray[Any], ds: Dataset, frame: _Frame) -> npt.NDArray[np.float32]:
    """Modality LUT (rescale) and MONOCHROME1 inversion, see the module docstring."""
    if "ModalityLUTSequence" in ds and frame.frame_index is None:
        from pydicom.pixels.processing import apply_modality_lut

        values = np.asarray(apply_modality_lut(image, ds), dtype=np.float32)
        lo_hi = None
    else:
        values = image.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
        lo_hi = _rescaled_range(ds, frame)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        if lo_hi is None:
            lo_hi = (float(values.min()), float(values.max()))
        values = np.float32(lo_hi[0] + lo_hi[1]) - values
    return values


def _rescaled_range(ds: Dataset, frame: _Frame) -> tuple[float, float] | None:
    bits = _int_or_none(ds.get("BitsStored"))
    if bits is None or bits <= 0 or bits > 32:
        return None
    if int(ds.get("PixelRepresentation", 0)) == 1:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    a, b = lo * frame.slope + frame.intercept, hi * frame.slope + frame.intercept
    return (min(a, b), max(a, b))


def stored_value_range(header: Dataset) -> tuple[float, float] | None:
    """The range a volume value of this image can take: Bits Stored and Pixel Representation
    (PS3.3 C.7.6.3) through Rescale Slope/Intercept. ``None`` when Bits Stored is absent.

    Analyzers use it to tell saturated pixels (at an end of the range) from bright or dark ones;
    the MONOCHROME1 inversion of :func:`load_volume` maps the range onto itself.
    """
    frame = _Frame(
        file_index=0,
        frame_index=None,
        header=header,
        rows=0,
        columns=0,
        position=None,
        orientation=None,
        pixel_spacing=None,
        slope=_float_or_none(header.get("RescaleSlope")) or 1.0,
        intercept=_float_or_none(header.get("RescaleIntercept")) or 0.0,
        instance_number=None,
        slice_thickness=None,
    )
    return _rescaled_range(header, frame)


# --- canonical orientation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reorientation:
    """Transpose, then flip, the (slices, rows, columns) axes of a volume to the canonical order.

    ``order[k]`` is the source axis that becomes canonical axis ``k`` (inferior->superior,
    anterior->posterior, right->left); ``flip[k]`` reverses canonical axis ``k`` after the
    transpose. Only axis permutations and reversals are used (no resampling), so :meth:`undo`
    maps an array computed in canonical space (a mask) back onto the source grid exactly.
    """

    order: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def identity(self) -> bool:
        return self.order == (0, 1, 2) and not any(self.flip)

    def apply(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A view of ``array`` (slices, rows, columns) in canonical axis order."""
        out = np.transpose(array, self.order)
        index = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        return out[index]

    def undo(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """A view of a canonical-space ``array`` back in the source axis order."""
        index = tuple(slice(None, None, -1) if f else slice(None) for f in self.flip)
        inverse = tuple(int(i) for i in np.argsort(self.order))
        return np.transpose(array[index], inverse)

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """The voxel spacing (mm) along the canonical axes."""
        return (spacing[self.order[0]], spacing[self.order[1]], spacing[self.order[2]])


def canonical_reorientation(orientation: Sequence[float]) -> Reorientation:
    """How to bring a volume with Image Orientation (Patient) ``orientation`` to canonical order.

    The volume's axes point along the slice normal (row x column direction cosines; imaging sorts
    slices in ascending position along it), the column direction cosine (down the rows) and the
    row direction cosine (along a row), PS3.3 C.7.6.2.1.1. Each is assigned the patient axis
    (+z, +y, +x in LPS for canonical axes 0, 1, 2) it is closest to, choosing the assignment that
    maximises the summed alignment, so an oblique or tilted acquisition still gets one answer;
    an axis pointing the opposite way is flipped. This is the closest-canonical reorientation of
    NIfTI tools (nibabel ``io_orientation``) without any resampling.
    """
    import itertools

    values = [float(v) for v in orientation]
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        return Reorientation()
    row = np.array(values[:3])
    col = np.array(values[3:])
    normal = np.cross(row, col)
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6 or np.linalg.norm(normal) < 1e-6:
        return Reorientation()
    directions = [normal / np.linalg.norm(normal), col / np.linalg.norm(col), row / np.linalg.norm(row)]
    patient_axis = (2, 1, 0)  # canonical axis k runs along LPS axis patient_axis[k]: z, y, x
    best: tuple[float, tuple[int, ...]] = (-1.0, (0, 1, 2))
    for order in itertools.permutations(range(3)):
        score = sum(abs(directions[order[k]][patient_axis[k]]) for k in range(3))
        if score > best[0] + 1e-9:
            best = (score, order)
    order = best[1]
    flip = tuple(bool(directions[order[k]][patient_axis[k]] < 0) for k in range(3))
    return Reorientation(order=(order[0], order[1], order[2]), flip=(flip[0], flip[1], flip[2]))
