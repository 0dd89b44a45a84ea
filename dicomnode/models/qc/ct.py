"""``qc-ct``: CT number calibration, noise, slice coverage, truncation, metal, motion."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.models.qc.common import (
    AIR_CT_NUMBER,
    CT_NUMBER_CALIBRATION,
    F32,
    FOV_TRUNCATION,
    HU,
    IMAGE_NOISE,
    INAPPROPRIATE_PROCESSING,
    METAL_ARTIFACT,
    METAL_VOXELS,
    MM,
    MOTION_ARTIFACT,
    MOTION_BLUR,
    MOTION_JUMP,
    MOTION_STREAK_INDEX,
    MOTION_STREAKED_SLICES,
    NOISE_SD,
    OTHER_ARTIFACT,
    PERCENT,
    POSITIONING,
    PPM,
    SOFT_TISSUE_CT_NUMBER,
    STREAK_INDEX,
    TRUNCATED_SLICES,
    UNDER_EXPOSED,
    Context,
    Mask,
    NotComputable,
    Outcome,
    QcAnalyzer,
    dilate,
    erode,
    fill_holes,
    largest_component,
    measurement,
    opening,
    otsu_threshold,
    slice_coverage,
    wavelet_noise_sigma,
)


class CtQc(QcAnalyzer):
    """``qc-ct``: CT number calibration, noise, slice coverage, truncation, metal, motion."""

    name = "qc-ct"
    modalities = frozenset({"CT"})

    def checks(self) -> list[tuple[str, Callable[[Context], Outcome]]]:
        return [
            ("CT number calibration", self._calibration),
            ("noise", self._noise),
            ("slice coverage", lambda ctx: slice_coverage(ctx, penalty=30.0)),
            ("truncation", self._truncation),
            ("metal", self._metal),
            ("motion", self._motion),
        ]

    # Segmentation shared by the checks: padding outside the reconstruction circle, the body.
    def _segment(self, ctx: Context) -> dict[str, Any]:
        if "ct" in ctx.cache:
            return dict(ctx.cache["ct"])
        vol = ctx.volume.pixels
        sample = vol[ctx.sampled]
        lowest = float(sample.min())
        padding = sample == lowest
        # A large exact pile-up far below air is padding outside the reconstruction circle
        # (scanners write -2000, -2048, -3024...). Not just below -1024 HU: air clipped at the
        # lowest stored value also piles up, at -1224 HU when the scale is 200 HU low.
        if not (lowest < -1500.0 and padding.mean() >= 0.005):
            padding = np.zeros_like(padding)
        valid_values = sample[~padding]
        threshold = otsu_threshold(valid_values[:: max(1, valid_values.size // 2_000_000)])
        bodies = np.zeros(sample.shape, dtype=bool)
        for i, image in enumerate(sample):
            fg = (image > threshold) & ~padding[i]
            fg = opening(fg, 2)
            if fg.any():
                bodies[i] = fill_holes(largest_component(fg))
        truncated = np.array([_touches_fov_edge(bodies[i], padding[i]) for i in range(len(sample))])
        seg = {
            "sample": sample,
            "padding": padding,
            "threshold": threshold,
            "bodies": bodies,
            "truncated": truncated,
        }
        ctx.cache["ct"] = seg
        return dict(seg)

    def _air_and_tissue(self, ctx: Context) -> tuple[float | None, float | None]:
        """Median CT number of air outside the body and modal CT number of soft tissue, each None
        when too few pixels qualify. Shared by the calibration and metal checks."""
        if "ct-scale" in ctx.cache:
            cached: tuple[float | None, float | None] = ctx.cache["ct-scale"]
            return cached
        seg = self._segment(ctx)
        sample, padding, bodies = seg["sample"], seg["padding"], seg["bodies"]
        air_values: list[npt.NDArray[np.float32]] = []
        tissue_values: list[npt.NDArray[np.float32]] = []
        truncated = seg["truncated"]
        for i, image in enumerate(sample):
            inner = erode(bodies[i], 3)
            tissue_values.append(image[inner & (image > -300) & (image < 300)])
            if truncated[i]:
                continue  # air seen there may be lung or bowel gas, not air outside the patient
            near_body = dilate(bodies[i], 5)
            valid = erode(~padding[i], 3, border_value=True)
            air = valid & ~near_body & (image <= seg["threshold"])
            air_values.append(image[air])
        air_all = np.concatenate(air_values) if air_values else np.zeros(0, np.float32)
        tissue_all = np.concatenate(tissue_values)
        air_median = float(np.median(air_all)) if air_all.size >= 500 else None
        mode = None
        if tissue_all.size >= 1000:
            hist, edges = np.histogram(tissue_all, bins=150, range=(-300.0, 300.0))
            hist = ndimage.uniform_filter1d(hist.astype(np.float64), 5)
            mode = float((edges[int(np.argmax(hist))] + edges[int(np.argmax(hist)) + 1]) / 2)
        ctx.cache["ct-scale"] = (air_median, mode)
        return air_median, mode

    def _calibration(self, ctx: Context) -> Outcome:
        """Air outside the body ~ -1000 HU (CT number of air by definition of the HU scale),
        soft tissue mode within a plausible range (ACR CT accreditation phantom: water 0 +/- 7 HU)."""
        s = ctx.settings
        air, mode = self._air_and_tissue(ctx)
        if air is None:
            raise NotComputable(
                "fewer than 500 air pixels outside an untruncated body (zoomed or truncated field of view)"
            )
        measurements = [measurement(AIR_CT_NUMBER, air, HU, "outside the body, inside the field of view")]
        notes: list[str] = []
        present = abs(air - s.ct_air_hu) > s.ct_air_tolerance_hu
        if mode is not None:
            measurements.append(measurement(SOFT_TISSUE_CT_NUMBER, mode, HU, "mode of body voxels in [-300, 300] HU"))
            present |= not (s.ct_soft_tissue_min_hu <= mode <= s.ct_soft_tissue_max_hu)
        else:
            notes.append("too few soft-tissue voxels in [-300, 300] HU for the tissue check")
        return Outcome(CT_NUMBER_CALIBRATION, present, measurements, INAPPROPRIATE_PROCESSING, 40.0, notes)

    def scale_offset(self, ctx: Context) -> float:
        """How far the series' CT numbers sit above the HU scale, measured on air outside the body
        (air is -1000 HU by definition); 0 when air cannot be measured. Thresholds on absolute CT
        numbers (metal) are applied to the calibrated values, so that a wrong Rescale Intercept does
        not turn dense bone into metal."""
        air, _ = self._air_and_tissue(ctx)
        return 0.0 if air is None else air - ctx.settings.ct_air_hu

    def _noise(self, ctx: Context) -> Outcome:
        seg = self._segment(ctx)
        sample, bodies = seg["sample"], seg["bodies"]
        metal = (sample > ctx.settings.ct_metal_hu).reshape(len(sample), -1).sum(axis=1)
        use = [i for i in range(len(sample)) if metal[i] < ctx.settings.ct_metal_min_voxels] or list(
            range(len(sample))
        )
        sigmas = []
        for i in use:
            inner = erode(bodies[i], 4)
            sigma = wavelet_noise_sigma(sample[i], inner)
            if math.isfinite(sigma):
                sigmas.append(sigma)
        if not sigmas:
            raise NotComputable("no body region large enough to estimate noise")
        sigma = float(np.median(sigmas))
        present = sigma > ctx.settings.ct_noise_max_hu
        return Outcome(
            IMAGE_NOISE,
            present,
            [measurement(NOISE_SD, sigma, HU, "median over sampled slices, inside the body")],
            UNDER_EXPOSED,
            20.0,
        )

    def _truncation(self, ctx: Context) -> Outcome:
        """Body touching the edge of the reconstructed field of view (circle edge, else image edge)."""
        seg = self._segment(ctx)
        bodies = seg["bodies"]
        counted = int(sum(1 for b in bodies if b.any()))
        truncated = int(np.count_nonzero(seg["truncated"]))
        if counted == 0:
            raise NotComputable("no body found in the sampled slices")
        percent = 100.0 * truncated / counted
        present = percent > ctx.settings.ct_truncated_slices_max_percent
        return Outcome(
            FOV_TRUNCATION,
            present,
            [measurement(TRUNCATED_SLICES, percent, PERCENT, f"of {counted} sampled slices")],
            POSITIONING,
            15.0,
        )

    def _metal(self, ctx: Context) -> Outcome:
        """Voxels above ``ct_metal_hu`` on the calibrated scale (see :meth:`scale_offset`) and the
        angular variation of CT numbers on rings around them (radial streaks from photon
        starvation and beam hardening; Barrett & Keat 2004)."""
        s = ctx.settings
        vol = ctx.volume.pixels
        offset = self.scale_offset(ctx)
        metal_hu = s.ct_metal_hu + offset
        per_slice = np.count_nonzero((vol > metal_hu).reshape(vol.shape[0], -1), axis=1)
        fraction_ppm = 1e6 * float(per_slice.sum()) / vol.size
        metal_slices = np.flatnonzero(per_slice >= s.ct_metal_min_voxels)
        described = f"voxels > {s.ct_metal_hu:g} HU" + (f" after removing a {offset:+.0f} HU offset" if offset else "")
        measurements = [measurement(METAL_VOXELS, fraction_ppm, PPM, described)]
        if metal_slices.size == 0:
            return Outcome(METAL_ARTIFACT, False, measurements, OTHER_ARTIFACT, 20.0)
        picks = metal_slices[np.unique(np.round(np.linspace(0, metal_slices.size - 1, 8)).astype(int))]
        pixel_mm = float(np.mean(ctx.volume.spacing[1:])) or 1.0
        indices = []
        for z in picks:
            indices.append(self._streak_index(vol[z] - np.float32(offset), s.ct_metal_hu, pixel_mm))
        streak = float(np.nanmedian(indices)) if np.isfinite(indices).any() else 0.0
        measurements.append(measurement(STREAK_INDEX, streak, HU, "median angular SD on rings 8-24 mm from metal"))
        present = streak >= s.ct_streak_min_hu
        return Outcome(METAL_ARTIFACT, present, measurements, OTHER_ARTIFACT, 20.0)

    def _motion(self, ctx: Context) -> Outcome:
        """Patient motion: streaks in the air around the body (in-plane motion during the
        rotation leaves inconsistent projections, which filtered back-projection spreads as
        streaks along the scanned edges) and jumps of the body outline between neighbouring
        slices (the patient moved between slices).

        Streak index of a slice: the air 3-30 mm outside the body, band-pass filtered (Gaussian
        1 mm minus Gaussian 4 mm, normalised within the air mask), its robust SD (1.4826 MAD)
        with the part white noise explains removed in quadrature (noise sigma from the finest
        Haar subband of the same air, times the spread the same filter gives unit white noise in
        that mask); what remains must also reach that noise spread, else it counts half (in a
        noisy image the robust spread of noise plus a little structure overshoots the sum). A
        smooth head holder or cushion adds little: the band-pass sees its edges only. Jump: the
        in-plane shift that best aligns the body masks of consecutive sampled slices (FFT
        cross-correlation), counted when it reaches ``ct_motion_jump_mm`` and differs from the
        neighbouring pairs' shifts by that much too
        (anatomy that narrows or drifts changes smoothly; slices with less than 70 % of the largest
        body cross-section are not used).
        """
        s = ctx.settings
        seg = self._segment(ctx)
        sample, padding, bodies = seg["sample"], seg["padding"], seg["bodies"]
        pixel_mm = float(np.mean(ctx.volume.spacing[1:])) or 1.0
        air_level = s.ct_air_hu + self.scale_offset(ctx)
        picks = np.unique(np.round(np.linspace(0, len(sample) - 1, min(len(sample), 24))).astype(int))
        indices = []
        for i in picks:
            index = _streak_index_in_air(sample[i], bodies[i], padding[i], air_level, pixel_mm)
            if index is not None:
                indices.append(index)
        measurements = []
        notes: list[str] = []
        streaked = 0
        if indices:
            streaked = int(sum(1 for v in indices if v >= s.ct_motion_streak_hu))
            measurements.append(
                measurement(MOTION_STREAK_INDEX, max(indices), HU, "largest over the sampled slices")
            )
            measurements.append(
                measurement(MOTION_STREAKED_SLICES, 100.0 * streaked / len(indices), PERCENT,
                            f"of {len(indices)} slices with air around the body")
            )
        else:
            notes.append("no slice with enough air around the body for the streak index")
        jump = _largest_jump(bodies, pixel_mm)
        if jump is not None:
            measurements.append(measurement(MOTION_JUMP, jump, MM, "between consecutive sampled slices"))
        if not measurements:
            raise NotComputable("neither air around the body nor two slices with a body to compare")
        ghosting = bool(indices) and streaked >= max(2, math.ceil(s.ct_motion_min_slices_percent / 100 * len(indices)))
        jumped = jump is not None and jump >= s.ct_motion_jump_mm
        return Outcome(MOTION_ARTIFACT, ghosting or jumped, measurements, MOTION_BLUR, 30.0, notes)

    @staticmethod
    def _streak_index(image: F32, metal_hu: float, pixel_mm: float) -> float:
        metal = image > metal_hu
        labels, count = ndimage.label(metal)
        if count == 0:
            return float("nan")
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        cy, cx = ndimage.center_of_mass(labels == int(np.argmax(sizes)))
        smooth = ndimage.median_filter(image, size=3)
        angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
        sds = []
        for radius_mm in (8.0, 12.0, 16.0, 24.0):
            r = radius_mm / pixel_mm
            ys, xs = cy + r * np.sin(angles), cx + r * np.cos(angles)
            inside = (ys >= 0) & (ys <= image.shape[0] - 1) & (xs >= 0) & (xs <= image.shape[1] - 1)
            if inside.sum() < 90:
                continue
            values = ndimage.map_coordinates(smooth, [ys[inside], xs[inside]], order=1)
            values = values[(values > -500) & (values < metal_hu)]  # tissue only
            if values.size >= 60:
                sds.append(float(np.std(values)))
        return float(np.median(sds)) if sds else float("nan")




def _touches_fov_edge(body: Mask, padding: Mask) -> bool:
    """Whether the body touches the reconstruction circle (next to padding) or the image edge
    over at least 5 pixels or 1 % of that edge."""
    if not body.any():
        return False
    # The rim next to the padding (outside the reconstruction circle) plus the image border.
    edge = dilate(padding, 2) & ~padding if padding.any() else np.zeros_like(body)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    contact = int(np.count_nonzero(body & edge))
    return contact >= max(5, int(0.01 * np.count_nonzero(edge)))


def _streak_index_in_air(
    image: F32, body: Mask, padding: Mask, air_level: float, pixel_mm: float
) -> float | None:
    """Structured (non-white) variation of the air 3-30 mm outside the body, HU; see ``_motion``.
    None when fewer than 2000 air pixels qualify."""
    band = dilate(body, round(30.0 / pixel_mm)) & ~dilate(body, max(1, round(3.0 / pixel_mm)))
    band &= erode(~padding, 3, border_value=True)
    band[[0, -1], :] = False
    band[:, [0, -1]] = False
    air = band & (image < air_level + 200.0) & (image > air_level - 500.0)
    if np.count_nonzero(air) < 2000:
        return None
    fine, fine_weight = _masked_gaussian(image, air, 1.0 / pixel_mm)
    coarse, coarse_weight = _masked_gaussian(image, air, 4.0 / pixel_mm)
    inside = air & (coarse_weight > 0.9) & (fine_weight > 0.9)
    if np.count_nonzero(inside) < 1000:
        return None
    spread = _robust_sd((fine - coarse)[inside])
    noise = wavelet_noise_sigma(image, air)
    white = (noise if math.isfinite(noise) else 0.0) * _band_pass_gain(air, inside, pixel_mm)
    structured = math.sqrt(max(0.0, spread * spread - white * white))
    # The robust spread of structure plus noise is not exactly their quadratic sum: with strong
    # noise a few HU of "structure" remain. Structure must also reach the noise's own spread.
    return structured if structured >= white else 0.5 * structured


def _robust_sd(values: npt.NDArray[np.float64]) -> float:
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _masked_gaussian(image: F32, mask: Mask, sigma: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Gaussian smoothing of ``image`` within ``mask`` (normalised convolution) and the weight."""
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    total = ndimage.gaussian_filter(np.where(mask, image, 0.0).astype(np.float64), sigma)
    return total / np.maximum(weight, 1e-6), weight


def _band_pass_gain(air: Mask, inside: Mask, pixel_mm: float) -> float:
    """Robust SD of the same masked band-pass applied to unit white noise in the same air mask:
    the spread white noise of sigma 1 gives (seeded, so reproducible)."""
    unit = np.random.default_rng(0).standard_normal(air.shape).astype(np.float32)
    fine, _ = _masked_gaussian(unit, air, 1.0 / pixel_mm)
    coarse, _ = _masked_gaussian(unit, air, 4.0 / pixel_mm)
    return _robust_sd((fine - coarse)[inside])


def _largest_jump(bodies: Mask, pixel_mm: float) -> float | None:
    """Largest in-plane jump (mm) of the body between consecutive sampled slices: for each pair,
    the smaller of its shift and of its departure from the neighbouring pairs' mean shift (the
    smooth drift of the anatomy), so that only an isolated displacement counts. None when fewer
    than two consecutive slices have a body of at least 70 % of the largest cross-section (near the
    vertex or the skull base the outline changes too fast from slice to slice to tell)."""
    areas = bodies.reshape(len(bodies), -1).sum(axis=1)
    if len(bodies) < 2 or areas.max() == 0:
        return None
    usable = areas >= 0.7 * areas.max()
    shifts: list[npt.NDArray[np.float64] | None] = [
        _mask_shift(bodies[i], bodies[i + 1]) * pixel_mm if usable[i] and usable[i + 1] else None
        for i in range(len(bodies) - 1)
    ]
    largest: float | None = None
    for i, t in enumerate(shifts):
        if t is None:
            continue
        around = [u for u in (shifts[i - 1] if i > 0 else None, shifts[i + 1] if i + 1 < len(shifts) else None)
                  if u is not None]
        drift = np.mean(around, axis=0) if around else np.zeros(2)
        jump = min(float(np.hypot(*t)), float(np.hypot(*(t - drift))))
        largest = jump if largest is None else max(largest, jump)
    return largest


def _mask_shift(a: Mask, b: Mask, search: int = 40) -> npt.NDArray[np.float64]:
    """(rows, columns) shift of mask ``b`` that best overlaps mask ``a``, by FFT cross-correlation
    within +-``search`` pixels, refined to a fraction of a pixel by a parabola through the peak
    and its neighbours along each axis."""
    fa = np.fft.rfft2(a.astype(np.float64))
    fb = np.fft.rfft2(b.astype(np.float64))
    cc = np.fft.fftshift(np.fft.irfft2(fa * np.conj(fb), s=a.shape))
    cy, cx = a.shape[0] // 2, a.shape[1] // 2
    r = min(search, cy, cx)
    window = cc[cy - r : cy + r + 1, cx - r : cx + r + 1]
    iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
    peak = np.array([iy, ix], dtype=np.float64)
    for axis, index in enumerate((iy, ix)):
        if 0 < index < window.shape[axis] - 1:
            before = window[iy - 1, ix] if axis == 0 else window[iy, ix - 1]
            after = window[iy + 1, ix] if axis == 0 else window[iy, ix + 1]
            centre = window[iy, ix]
            curvature = before - 2 * centre + after
            if curvature < 0:
                peak[axis] += 0.5 * (before - after) / curvature
    return np.asarray(peak - r, dtype=np.float64)
