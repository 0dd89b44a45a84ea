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
    """``qc-ct``: CT number calibration, noise, slice coverage, truncation, metal streaks."""

    name = "qc-ct"
    modalities = frozenset({"CT"})

    def checks(self) -> list[tuple[str, Callable[[Context], Outcome]]]:
        return [
            ("CT number calibration", self._calibration),
            ("noise", self._noise),
            ("slice coverage", lambda ctx: slice_coverage(ctx, penalty=30.0)),
            ("truncation", self._truncation),
            ("metal", self._metal),
        ]

    # Segmentation shared by the checks: padding outside the reconstruction circle, the body.
    def _segment(self, ctx: Context) -> dict[str, Any]:
        if "ct" in ctx.cache:
            return dict(ctx.cache["ct"])
        vol = ctx.volume.pixels
        sample = vol[ctx.sampled]
        lowest = float(sample.min())
        padding = sample == lowest
        # Values below -1024 HU are not tissue or air; a large exact pile-up there is padding.
        if not (lowest < -1024.5 and padding.mean() >= 0.005):
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

    def _calibration(self, ctx: Context) -> Outcome:
        """Air outside the body ~ -1000 HU (CT number of air by definition of the HU scale),
        soft tissue mode within a plausible range (ACR CT accreditation phantom: water 0 +/- 7 HU)."""
        s = ctx.settings
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
        if air_all.size < 500:
            raise NotComputable(
                "fewer than 500 air pixels outside an untruncated body (zoomed or truncated field of view)"
            )
        air = float(np.median(air_all))
        measurements = [measurement(AIR_CT_NUMBER, air, HU, "outside the body, inside the field of view")]
        notes: list[str] = []
        present = abs(air - s.ct_air_hu) > s.ct_air_tolerance_hu
        tissue_all = np.concatenate(tissue_values)
        if tissue_all.size >= 1000:
            hist, edges = np.histogram(tissue_all, bins=150, range=(-300.0, 300.0))
            hist = ndimage.uniform_filter1d(hist.astype(np.float64), 5)
            mode = float((edges[int(np.argmax(hist))] + edges[int(np.argmax(hist)) + 1]) / 2)
            measurements.append(measurement(SOFT_TISSUE_CT_NUMBER, mode, HU, "mode of body voxels in [-300, 300] HU"))
            present |= not (s.ct_soft_tissue_min_hu <= mode <= s.ct_soft_tissue_max_hu)
        else:
            notes.append("too few soft-tissue voxels in [-300, 300] HU for the tissue check")
        return Outcome(CT_NUMBER_CALIBRATION, present, measurements, INAPPROPRIATE_PROCESSING, 40.0, notes)

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
        """Voxels above ``ct_metal_hu`` and the angular variation of CT numbers on rings around them
        (radial streaks from photon starvation and beam hardening; Barrett & Keat 2004)."""
        s = ctx.settings
        vol = ctx.volume.pixels
        per_slice = np.count_nonzero((vol > s.ct_metal_hu).reshape(vol.shape[0], -1), axis=1)
        fraction_ppm = 1e6 * float(per_slice.sum()) / vol.size
        metal_slices = np.flatnonzero(per_slice >= s.ct_metal_min_voxels)
        measurements = [measurement(METAL_VOXELS, fraction_ppm, PPM, f"voxels > {s.ct_metal_hu:g} HU")]
        if metal_slices.size == 0:
            return Outcome(METAL_ARTIFACT, False, measurements, OTHER_ARTIFACT, 20.0)
        picks = metal_slices[np.unique(np.round(np.linspace(0, metal_slices.size - 1, 8)).astype(int))]
        pixel_mm = float(np.mean(ctx.volume.spacing[1:])) or 1.0
        indices = []
        for z in picks:
            indices.append(self._streak_index(vol[z], s.ct_metal_hu, pixel_mm))
        streak = float(np.nanmedian(indices)) if np.isfinite(indices).any() else 0.0
        measurements.append(measurement(STREAK_INDEX, streak, HU, "median angular SD on rings 8-24 mm from metal"))
        present = streak >= s.ct_streak_min_hu
        return Outcome(METAL_ARTIFACT, present, measurements, OTHER_ARTIFACT, 20.0)

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
