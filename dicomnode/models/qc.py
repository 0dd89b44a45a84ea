"""Classical image-quality control (placeholder: being written in the Analyze stage)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from dicomnode.models import AnalyzerSpec


class QcSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def specs(settings: QcSettings) -> list[AnalyzerSpec]:
    return []
