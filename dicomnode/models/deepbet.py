"""deepbet brain extraction (placeholder: being written in the Analyze stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicomnode.models import AnalyzerSpec

if TYPE_CHECKING:
    from dicomnode.config import AnalysisSettings


def specs(settings: AnalysisSettings) -> list[AnalyzerSpec]:
    return []
