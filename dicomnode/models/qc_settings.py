"""Settings of the classical QC analyzers, apart from the analyzers themselves.

The configuration (and so every receiver process) needs these settings, not numpy and scipy: the
analyzers in :mod:`dicomnode.models.qc` import them, this module does not.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class QcSettings(BaseModel):
    """Thresholds of the classical QC analyzers (``[analysis.qc]``). See docs/qc.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="register qc-ct, qc-mr and qc-xr")
    max_slices: int = Field(default=48, ge=1, description="slices sampled for the costlier metrics")
    gap_factor: float = Field(default=1.5, gt=1.0, description="a step > this x median spacing is a gap")
    unusable_rating: float = Field(
        default=40.0, ge=0, le=100, description="rating below which the series is called unusable"
    )
    # CT
    ct_air_hu: float = -1000.0
    ct_air_tolerance_hu: float = Field(default=60.0, gt=0)
    ct_soft_tissue_min_hu: float = -150.0
    ct_soft_tissue_max_hu: float = 100.0
    ct_noise_max_hu: float = Field(default=25.0, gt=0)
    ct_truncated_slices_max_percent: float = Field(default=10.0, ge=0, le=100)
    ct_metal_hu: float = 3000.0
    ct_metal_min_voxels: int = Field(default=5, ge=1, description="per slice")
    ct_streak_min_hu: float = Field(default=60.0, gt=0)
    ct_motion_streak_hu: float = Field(default=6.0, gt=0, description="streak index of a slice with motion")
    ct_motion_min_slices_percent: float = Field(
        default=10.0, ge=0, le=100, description="slices with motion streaks (at least 2) that flag the series"
    )
    ct_motion_jump_mm: float = Field(default=2.5, gt=0, description="body outline jump between slices")
    # MR
    mr_snr_min: float = Field(default=10.0, gt=0)
    mr_ghost_ratio_max: float = Field(default=0.01, gt=0)
    # CR/DX
    xr_deviation_index_max: float = Field(default=3.0, gt=0)
    xr_clipped_max_percent: float = Field(default=5.0, ge=0, le=100)
    xr_blur_max: float = Field(default=0.78, gt=0, lt=1)
    xr_fine_detail_min: float = Field(
        default=0.6, gt=0, description="finest-scale over next-scale detail below which the image is smoothed"
    )
    xr_noise_max_percent: float = Field(default=1.0, gt=0)
    xr_field_min_percent: float = Field(default=25.0, ge=0, le=100)
