"""``qc-xr``: exposure (EI/DI, saturation), sharpness, noise and collimation of radiographs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.domain import Code, Measurement
from dicomnode.models.qc.common import (
    BLUR_METRIC,
    CLIPPED_FRACTION,
    COLLIMATED_FIELD,
    COLLIMATED_FIELD_AREA,
    COLLIMATION,
    DETECTOR_EXPOSURE,
    DEVIATION_INDEX,
    EXPOSURE_INDEX,
    F32,
    FINE_DETAIL_RATIO,
    IMAGE_NOISE,
    LAPLACIAN_VARIANCE,
    MOTION_BLUR,
    NO_UNITS,
    OVER_EXPOSED,
    PERCENT,
    POSITIONING,
    RELATIVE_NOISE,
    SHARPNESS,
    SQUARE_METER,
    TARGET_EXPOSURE_INDEX,
    UNDER_EXPOSED,
    Context,
    NotComputable,
    Outcome,
    QcAnalyzer,
    measurement,
    wavelet_noise_sigma,
)


class XrQc(QcAnalyzer):
    """``qc-xr``: exposure (EI/DI, saturation), sharpness, noise and collimation of radiographs."""

    name = "qc-xr"
    # "DR" is not a Modality defined term but some devices send it for DX images.
    modalities = frozenset({"CR", "DX", "RG", "DR"})

    def checks(self) -> list[tuple[str, Callable[[Context], Outcome]]]:
        return [
            ("exposure", self._exposure),
            ("sharpness", self._sharpness),
            ("noise", self._noise),
            ("collimation", self._collimation),
        ]

    def _field(self, ctx: Context) -> dict[str, Any]:
        """The exposed field inside uniform collimator shutter bands, per image."""
        if "xr" in ctx.cache:
            return dict(ctx.cache["xr"])
        images = ctx.volume.pixels[ctx.sampled]
        boxes = [_shutter_box(image) for image in images]
        seg = {"images": images, "boxes": boxes}
        ctx.cache["xr"] = seg
        return dict(seg)

    def _exposure(self, ctx: Context) -> Outcome:
        """Deviation Index DI = 10 log10(EI / EI_T) (IEC 62494-1; AAPM TG-116, Shepard 2009):
        |DI| > 3 means under (-) or over (+) exposure by a factor of 2. Without DI, the fraction of
        field pixels saturated at an end of the stored range decides; with DI it is only reported
        (presentation processing routinely burns the directly exposed background out)."""
        s = ctx.settings
        from dicomnode.imaging import stored_value_range

        measurements: list[Measurement] = []
        verdicts: list[Code] = []
        notes: list[str] = []
        ei = header_float(ctx.header_value("ExposureIndex"))
        target = header_float(ctx.header_value("TargetExposureIndex"))
        di = header_float(ctx.header_value("DeviationIndex"))
        if ei is not None:
            measurements.append(measurement(EXPOSURE_INDEX, ei, NO_UNITS))
        if target is not None:
            measurements.append(measurement(TARGET_EXPOSURE_INDEX, target, NO_UNITS))
        if di is None and ei is not None and target is not None and ei > 0 and target > 0:
            di = 10.0 * math.log10(ei / target)
            notes.append("Deviation Index computed from Exposure Index and Target Exposure Index")
        if di is not None:
            measurements.append(measurement(DEVIATION_INDEX, di, NO_UNITS))
            if di > s.xr_deviation_index_max:
                verdicts.append(OVER_EXPOSED)
            elif di < -s.xr_deviation_index_max:
                verdicts.append(UNDER_EXPOSED)
        seg = self._field(ctx)
        low_fraction = high_fraction = 0.0
        header = ctx.volume.headers[0] if ctx.volume.headers else None
        value_range = stored_value_range(header) if header is not None else None
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            inside = image[r0:r1, c0:c1]
            lo, hi = value_range if value_range is not None else (float(image.min()), float(image.max()))
            tol = 0.002 * (hi - lo)
            low_fraction = max(low_fraction, float(np.mean(inside <= lo + tol)))
            high_fraction = max(high_fraction, float(np.mean(inside >= hi - tol)))
        if value_range is None:
            notes.append("Bits Stored absent: saturation judged at the image minimum and maximum")
        clipped = 100.0 * max(low_fraction, high_fraction)
        measurements.append(measurement(CLIPPED_FRACTION, clipped, PERCENT, "field pixels at an end of the range"))
        if di is not None:
            notes.append("Deviation Index present: it alone decides the exposure verdict")
        elif clipped > s.xr_clipped_max_percent:
            # Which end receives the most X-rays: Pixel Intensity Relationship Sign (0028,1041)
            # refers to stored values; MONOCHROME1 images were inverted by imaging.load_volume.
            sign = header_float(ctx.header_value("PixelIntensityRelationshipSign"))
            inverted = str(ctx.header_value("PhotometricInterpretation") or "").upper() == "MONOCHROME1"
            # without the sign, assume presentation: direct exposure is displayed dark
            high_end_is_over = False if sign is None else (sign > 0) != inverted
            saturated_high = high_fraction >= low_fraction
            verdicts.append(OVER_EXPOSED if saturated_high == high_end_is_over else UNDER_EXPOSED)
        present = bool(verdicts)
        return Outcome(
            DETECTOR_EXPOSURE,
            present,
            measurements,
            verdicts[0] if verdicts else OVER_EXPOSED,
            30.0,
            notes,
        )

    def _sharpness(self, ctx: Context) -> Outcome:
        """Two no-reference measures. The blur metric of Crete et al. 2007 (Proc. SPIE 6492,
        64920I): how little the neighbour differences drop when the image is re-blurred (0 sharp,
        1 blurred), computed on a median-filtered image of <= 512 pixels so that noise does not
        pass for detail; it sees coarse blur (motion during the exposure). And, at the native
        pixel size, the ratio of the noise-level detail at the finest Haar scale to the next
        scale (:func:`_fine_detail_ratio`): about 1 for a detector image (quantum noise is white
        at the pixel scale), far below 1 once the image itself was smoothed (a Gaussian of 1 px
        already halves it). The normalised variance of the Laplacian (Pech-Pacheco et al. 2000)
        is reported alongside."""
        seg = self._field(ctx)
        blurs, lapvs = [], []
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            inside = image[r0:r1, c0:c1].astype(np.float32)
            work = _downsample(inside, 512)
            if min(work.shape) < 32:
                continue
            work = ndimage.median_filter(work, size=3)
            blurs.append(_crete_blur(work[4:-4, 4:-4]))
            lap = ndimage.laplace(work)[4:-4, 4:-4]
            variance = float(np.var(work))
            lapvs.append(float(np.var(lap)) / variance if variance > 0 else float("nan"))
        if not blurs:
            raise NotComputable("exposed field too small")
        blur_value = max(blurs)
        details = [
            _fine_detail_ratio(image[r0:r1, c0:c1])
            for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True)
        ]
        finite = [d for d in details if math.isfinite(d)]
        detail = min(finite) if finite else None
        smoothed = detail is not None and detail < ctx.settings.xr_fine_detail_min
        present = blur_value > ctx.settings.xr_blur_max or smoothed
        measurements = [measurement(BLUR_METRIC, blur_value, NO_UNITS, "0 sharp .. 1 blurred")]
        if detail is not None:
            measurements.append(
                measurement(FINE_DETAIL_RATIO, detail, NO_UNITS, "sigma(finest Haar scale) / sigma(next scale)")
            )
        measurements.append(
            measurement(LAPLACIAN_VARIANCE, float(np.nanmin(lapvs)), NO_UNITS, "var(Laplacian) / var(image)")
        )
        return Outcome(
            SHARPNESS,
            present,
            measurements,
            MOTION_BLUR,
            30.0,
        )

    def _noise(self, ctx: Context) -> Outcome:
        """Wavelet-MAD noise sigma inside the field relative to its 1-99 percentile range."""
        seg = self._field(ctx)
        worst = 0.0
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            inside = image[r0:r1, c0:c1]
            p1, p99 = np.percentile(inside[:: max(1, inside.shape[0] // 512)], [1, 99])
            if p99 <= p1:
                continue
            sigma = wavelet_noise_sigma(inside)
            if math.isfinite(sigma):
                worst = max(worst, 100.0 * sigma / float(p99 - p1))
        present = worst > ctx.settings.xr_noise_max_percent
        return Outcome(
            IMAGE_NOISE,
            present,
            [measurement(RELATIVE_NOISE, worst, PERCENT, "wavelet MAD sigma / (P99 - P1) of the field")],
            UNDER_EXPOSED,
            20.0,
        )

    def _collimation(self, ctx: Context) -> Outcome:
        """Exposed field inside uniform shutter bands; a small field means the anatomy is likely cut."""
        seg = self._field(ctx)
        fractions = []
        sides = []
        for image, (r0, r1, c0, c1) in zip(seg["images"], seg["boxes"], strict=True):
            fractions.append(100.0 * (r1 - r0) * (c1 - c0) / image.size)
            sides.append(int(r0 > 0) + int(r1 < image.shape[0]) + int(c0 > 0) + int(c1 < image.shape[1]))
        field_percent = min(fractions)
        present = field_percent < ctx.settings.xr_field_min_percent
        measurements = [
            measurement(COLLIMATED_FIELD, field_percent, PERCENT, f"shutter borders seen on {max(sides)} side(s)")
        ]
        if not any("Pixel Spacing" in p for p in ctx.volume.problems):  # an area needs a known pixel size
            r0, r1, c0, c1 = seg["boxes"][int(np.argmin(fractions))]
            area_m2 = (r1 - r0) * ctx.volume.spacing[1] * (c1 - c0) * ctx.volume.spacing[2] / 1e6
            measurements.append(measurement(COLLIMATED_FIELD_AREA, area_m2, SQUARE_METER, "at the detector"))
        return Outcome(COLLIMATION, present, measurements, POSITIONING, 15.0)


def header_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _downsample(image: F32, longest: int) -> F32:
    """Block mean by the smallest integer factor that brings the longest side to <= ``longest``."""
    factor = max(1, math.ceil(max(image.shape) / longest))
    if factor == 1:
        return image
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return np.asarray(blocks.mean(axis=(1, 3), dtype=np.float32), dtype=np.float32)


def _crete_blur(image: F32) -> float:
    """Crete et al. 2007 blur metric: max over directions of (s_F - s_V) / s_F (0 sharp, 1 blurry)."""
    values = []
    for axis in (0, 1):
        reblurred = ndimage.uniform_filter1d(image, size=9, axis=axis)
        d_f = np.abs(np.diff(image, axis=axis))
        d_b = np.abs(np.diff(reblurred, axis=axis))
        s_f = float(d_f.sum())
        if s_f <= 0:
            continue
        s_v = float(np.maximum(0.0, d_f - d_b).sum())
        values.append((s_f - s_v) / s_f)
    return max(values) if values else 1.0


def _shutter_box(image: F32) -> tuple[int, int, int, int]:
    """Rows and columns at the image border that are uniform (SD < 0.5 % of the image range) are
    collimator shutters burnt into the image; returns the exposed field as (row0, row1, col0,
    col1), half-open. At most 40 % of the image is taken from each side."""
    lo, hi = float(image.min()), float(image.max())
    flat = 0.005 * (hi - lo)
    rows, cols = image.shape
    row_sd, col_sd = image.std(axis=1), image.std(axis=0)

    def run(sd: npt.NDArray[Any], limit: int) -> int:
        count = 0
        while count < limit and sd[count] <= flat:
            count += 1
        return count

    return (
        run(row_sd, int(0.4 * rows)),
        rows - run(row_sd[::-1], int(0.4 * rows)),
        run(col_sd, int(0.4 * cols)),
        cols - run(col_sd[::-1], int(0.4 * cols)),
    )


def _fine_detail_ratio(field: F32) -> float:
    """sigma of the finest diagonal Haar subband over that of the next scale (computed on 2 x 2
    block means), each the robust MAD estimate of :func:`wavelet_noise_sigma`. White noise gives
    about 1; image-domain smoothing removes the finest scale first (Donoho & Johnstone 1994 use
    the finest subband as the noise reference for the same reason)."""
    f = field.astype(np.float32)
    rows, cols = (f.shape[0] // 2) * 2, (f.shape[1] // 2) * 2
    coarse = 0.25 * (f[0:rows:2, 0:cols:2] + f[1:rows:2, 0:cols:2] + f[0:rows:2, 1:cols:2] + f[1:rows:2, 1:cols:2])
    fine_sigma = wavelet_noise_sigma(f)
    coarse_sigma = wavelet_noise_sigma(coarse.astype(np.float32))
    if not (math.isfinite(fine_sigma) and math.isfinite(coarse_sigma)) or coarse_sigma <= 0:
        return float("nan")
    return fine_sigma / coarse_sigma
