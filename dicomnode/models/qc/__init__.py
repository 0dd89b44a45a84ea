"""Classical image-quality control: ``qc-ct``, ``qc-mr`` and ``qc-xr``, one module per modality.

Each analyzer checks a few quality aspects of one :class:`~dicomnode.domain.Volume` with published,
reference-free metrics and returns one :class:`~dicomnode.domain.Finding` per aspect, negatives
included (``present=False``), plus an overall finding carrying the Image Quality Rating.
:mod:`~dicomnode.models.qc.common` holds what they share (codes, :class:`QcSettings`, the check
framework, segmentation and noise helpers); :mod:`.ct`, :mod:`.mr` and :mod:`.xr` the checks.
Thresholds live in :class:`QcSettings` (``[analysis.qc]`` in the TOML configuration).
"""

from __future__ import annotations

from collections.abc import Callable

from dicomnode.domain import AnalyzerKind
from dicomnode.models import Analyzer, AnalyzerSpec
from dicomnode.models.qc.common import *  # noqa: F403 - codes and settings are part of this package's API
from dicomnode.models.qc.common import VERSION, QcAnalyzer, QcSettings
from dicomnode.models.qc.ct import CtQc
from dicomnode.models.qc.mr import MrQc
from dicomnode.models.qc.xr import XrQc

__all__ = ["VERSION", "CtQc", "MrQc", "QcSettings", "XrQc", "specs"]


def specs(settings: QcSettings) -> list[AnalyzerSpec]:
    """The three QC analyzers with their modality filters; nothing is loaded here."""
    if not settings.enabled:
        return []

    def loader(cls: type[QcAnalyzer]) -> Callable[[], Analyzer]:
        return lambda: cls(settings)

    return [
        AnalyzerSpec(
            name=cls.name,
            version=VERSION,
            kind=AnalyzerKind.QC,
            modalities=cls.modalities,
            load=loader(cls),
            description=description,
        )
        for cls, description in _ANALYZERS
    ]


_ANALYZERS: tuple[tuple[type[QcAnalyzer], str], ...] = (
    (CtQc, "CT: HU calibration, noise, missing slices, truncation, metal streaks, motion"),
    (MrQc, "MR: SNR, CNR, EFC, FBER, ghosting along phase encoding, missing slices"),
    (XrQc, "CR/DX: exposure (EI/DI, saturation), blur, noise, collimation"),
)
