"""``qc-mr``: SNR and CNR, EFC and FBER, ghosting along phase encoding, slice coverage."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.models.qc.common import (
    CNR,
    EFC,
    F32,
    FBER,
    GHOST,
    GHOST_RATIO,
    IMAGE_NOISE,
    MOTION_BLUR,
    NO_UNITS,
    OTHER_FAILURE,
    SIGNAL_TO_NOISE,
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
)

_RAYLEIGH = math.sqrt(2.0 / (4.0 - math.pi))  # Dietrich 2007 eq. A.12 correction


class MrQc(QcAnalyzer):
    """``qc-mr``: SNR and CNR, EFC and FBER, ghosting along the phase-encoding direction, slices."""

    name = "qc-mr"
    modalities = frozenset({"MR"})

    def checks(self) -> list[tuple[str, Callable[[Context], Outcome]]]:
        return [
            ("signal-to-noise", self._snr),
            ("ghosting", self._ghosting),
            ("slice coverage", lambda ctx: slice_coverage(ctx, penalty=30.0)),
        ]

    def _segment(self, ctx: Context) -> dict[str, Any]:
        if "mr" in ctx.cache:
            return dict(ctx.cache["mr"])
        sample = ctx.volume.pixels[ctx.sampled]
        threshold = _mr_foreground_threshold(sample)
        fg = np.zeros(sample.shape, dtype=bool)
        for i, image in enumerate(sample):
            mask = opening(image > threshold, 2)
            if mask.any():
                fg[i] = fill_holes(largest_component(mask))
        air = np.zeros_like(fg)
        for i in range(len(fg)):
            air[i] = ~dilate(fg[i], 4)
            air[i][[0, -1], :] = False
            air[i][:, [0, -1]] = False
        seg = {"sample": sample, "fg": fg, "air": air}
        ctx.cache["mr"] = seg
        return dict(seg)

    def _phase_axes(self, ctx: Context) -> tuple[list[int], str]:
        direction = str(ctx.header_value("InPlanePhaseEncodingDirection") or "").upper()
        if direction == "COL":  # phase encoded along columns: ghosts run vertically (rows axis)
            return [1], ""
        if direction == "ROW":
            return [2], ""
        return [1, 2], "In-plane Phase Encoding Direction absent: both in-plane axes checked"

    def _bands(self, ctx: Context, axis: int) -> tuple[Mask, Mask]:
        """Background inside / outside the object's extent across the phase-encoding axis
        (ghosts of a moving object are replicated along the phase-encoding axis only)."""
        seg = self._segment(ctx)
        fg, air = seg["fg"], seg["air"]
        readout_extent = fg.any(axis=axis)  # (slices, readout positions)
        margin = 3
        extent = ndimage.binary_dilation(readout_extent, structure=np.ones((1, 2 * margin + 1), bool))
        band = np.expand_dims(extent, axis=axis)
        band = np.broadcast_to(band, fg.shape)
        outside = ~ndimage.binary_dilation(readout_extent, structure=np.ones((1, 4 * margin + 1), bool))
        outside_b = np.broadcast_to(np.expand_dims(outside, axis=axis), fg.shape)
        return air & band, air & outside_b

    def _air_sigma(self, ctx: Context) -> float:
        """Noise sigma from the Rayleigh-distributed air, away from the ghost band when possible."""
        seg = self._segment(ctx)
        sample = seg["sample"]
        axes, _ = self._phase_axes(ctx)
        quiet = seg["air"]
        for axis in axes:  # away from any possible ghost band
            quiet = quiet & self._bands(ctx, axis)[1]
        region = quiet if np.count_nonzero(quiet) >= 1000 else seg["air"]
        values = sample[region]
        if values.size < 200:
            raise NotComputable("too little background (air) around the object")
        sd = float(np.std(values))
        if sd <= 1e-6:
            raise NotComputable("the background is zero-filled, noise cannot be measured in air")
        return sd * _RAYLEIGH

    def _snr(self, ctx: Context) -> Outcome:
        """SNR after Dietrich et al. 2007 (JMRI 26:375, eq. A.12), as MRIQC ``snrd``: mean
        foreground over the Rayleigh-corrected air SD. CNR after Magnotta & Friedman 2006 with the
        two foreground classes split by Otsu instead of a GM/WM segmentation."""
        seg = self._segment(ctx)
        sample, fg = seg["sample"], seg["fg"]
        inner = np.stack([erode(m, 2) for m in fg])
        fg_values = sample[inner]
        if fg_values.size < 200:
            raise NotComputable("foreground too small")
        sigma = self._air_sigma(ctx)
        snr = float(fg_values.mean()) / sigma
        split = otsu_threshold(fg_values)
        hi, lo = fg_values[fg_values > split], fg_values[fg_values <= split]
        measurements = [measurement(SIGNAL_TO_NOISE, snr, NO_UNITS, "Dietrich SNR: mean(F) / sigma(air)")]
        if hi.size and lo.size:
            measurements.append(measurement(CNR, abs(float(hi.mean()) - float(lo.mean())) / sigma, NO_UNITS))
        present = snr < ctx.settings.mr_snr_min
        return Outcome(IMAGE_NOISE, present, measurements, OTHER_FAILURE, 20.0)

    def _ghosting(self, ctx: Context) -> Outcome:
        """Ghost-to-signal ratio (Giannelli et al. 2010, JACMP 11:170; MRIQC ``gsr``) with the
        ghost ROI = air within the object's extent across the phase-encoding axis and the
        non-ghost ROI = the rest of the air; plus EFC (Atkinson 1997) and FBER (Shehzad 2015)."""
        seg = self._segment(ctx)
        sample, fg, air = seg["sample"], seg["fg"], seg["air"]
        axes, note = self._phase_axes(ctx)
        signal = float(sample[fg].mean())
        ratios = []
        for axis in axes:
            ghost_roi, quiet = self._bands(ctx, axis)
            if np.count_nonzero(ghost_roi) >= 200 and np.count_nonzero(quiet) >= 200:
                ratios.append((float(sample[ghost_roi].mean()) - float(sample[quiet].mean())) / signal)
        if not ratios:
            raise NotComputable("the object fills the field of view across the phase-encoding axis")
        ratio = max(ratios)
        measurements = [measurement(GHOST_RATIO, ratio, NO_UNITS, "(mean ghost ROI - mean other air) / mean signal")]
        measurements.append(measurement(EFC, _efc(sample), NO_UNITS, "normalised entropy focus criterion"))
        air_energy = float(np.mean(np.square(sample[air], dtype=np.float64))) if air.any() else 0.0
        if air_energy > 1e-3:
            fber = float(np.mean(np.square(sample[fg], dtype=np.float64))) / air_energy
            measurements.append(measurement(FBER, fber, NO_UNITS, "mean |F|^2 / mean |B|^2"))
        present = ratio > ctx.settings.mr_ghost_ratio_max
        return Outcome(GHOST, present, measurements, MOTION_BLUR, 30.0, [note] if note else [])


def _mr_foreground_threshold(sample: F32) -> float:
    """Air/tissue threshold of a magnitude MR image: 5 sigma of the Rayleigh air noise, sigma taken
    as the mode of the histogram below Otsu's threshold (the Rayleigh mode equals sigma), so that
    dark tissue is not mistaken for air. Bounded by 5 % and 100 % of Otsu's threshold."""
    values = sample.ravel()[:: max(1, sample.size // 4_000_000)]
    otsu = otsu_threshold(values)
    low = values[values <= otsu]
    if low.size < 100 or otsu <= 0:
        return otsu
    hist, edges = np.histogram(low, bins=128, range=(float(low.min()), otsu))
    peak = int(np.argmax(ndimage.uniform_filter1d(hist.astype(np.float64), 3)))
    sigma = float((edges[peak] + edges[peak + 1]) / 2) - float(low.min())
    return float(min(otsu, max(5.0 * sigma + float(low.min()), 0.05 * otsu)))


def _efc(image: npt.NDArray[Any]) -> float:
    """Entropy focus criterion (Atkinson et al. 1997, IEEE TMI 16:903), normalised by its maximum
    as in MRIQC so that images of different sizes compare: 0 = all energy in one voxel."""
    x = np.abs(image.astype(np.float64)).ravel()
    n = x.size
    b_max = math.sqrt(float(np.sum(x * x)))
    if b_max == 0:
        return float("nan")
    efc_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    ratio = x / b_max
    return float(np.sum(ratio * np.log(ratio + 1e-16)) / efc_max)


