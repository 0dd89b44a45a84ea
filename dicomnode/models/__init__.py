"""Analyzer protocol and registry.

An analyzer turns one :class:`~dicomnode.domain.Volume` into :class:`~dicomnode.domain.Findings`.
Providers (``qc``, ``torch_runtime``, ``deepbet``) each contribute :class:`AnalyzerSpec` entries;
a spec describes an analyzer without loading it (routing needs only the description), and its
``load`` is called once per worker process, lazily, the first time a job needs it.

Models never touch the ledger, the spool or the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dicomnode.domain import AnalyzerKind, Code, Findings, SeriesSummary, Volume
from dicomnode.errors import AnalyzerUnavailable

if TYPE_CHECKING:
    from dicomnode.config import AnalysisSettings


#: The local coding scheme of the shipped analyzers: a Coding Scheme Designator beginning with
#: "99" is private (PS3.16 section 8); result objects declare it in their Coding Scheme
#: Identification Sequence (PS3.3 C.12.1.1.3).
PRIVATE_SCHEME = "99DCMNODE"

#: Every private code an analyzer defines, with the reason no standard code fits (listed in
#: docs/conformance.md by ``dicomnode conformance``).
PRIVATE_CODES: dict[Code, str] = {}


def private_code(value: str, meaning: str, reason: str) -> Code:
    """A concept of :data:`PRIVATE_SCHEME`, registered with ``reason``: why PS3.16, SNOMED CT,
    LOINC, RadLex, NCIt and UMLS (as far as DICOM's dictionaries carry them) have no code for it."""
    if not reason.strip():
        raise ValueError(f"private code {value!r}: a reason is required")
    code = Code(value, PRIVATE_SCHEME, meaning)
    PRIVATE_CODES[code] = reason
    return code


@runtime_checkable
class Analyzer(Protocol):
    """A loaded analyzer. ``analyze`` must not raise for bad input: it returns FAILED findings."""

    name: str
    version: str
    kind: AnalyzerKind

    def analyze(self, volume: Volume) -> Findings: ...


def _accept_all(series: SeriesSummary) -> bool:
    return True


@dataclass(frozen=True)
class AnalyzerSpec:
    """What is known about an analyzer before loading it.

    ``modalities`` empty means any modality. ``applies_to`` refines the match for the embedded
    default route (e.g. a manifest's body-part filter). ``unavailable`` is a sentence saying what is
    missing when the analyzer cannot be loaded on this installation (e.g. an optional extra).
    """

    name: str
    version: str
    kind: AnalyzerKind
    modalities: frozenset[str]
    load: Callable[[], Analyzer]
    description: str = ""
    applies_to: Callable[[SeriesSummary], bool] = field(default=_accept_all)
    unavailable: str = ""
    gpu: bool = False  # its manifest asks for a GPU: a cluster's GPU queue carries its jobs

    def matches(self, series: SeriesSummary) -> bool:
        if self.modalities and series.modality.upper() not in self.modalities:
            return False
        return self.applies_to(series)


class Registry:
    """Named analyzer specs; loads each analyzer at most once per process and keeps it."""

    def __init__(self, specs: Iterable[AnalyzerSpec]) -> None:
        self._specs: dict[str, AnalyzerSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"analyzer name {spec.name!r} is registered twice")
            self._specs[spec.name] = spec
        self._loaded: dict[str, Analyzer] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[AnalyzerSpec]:
        return [self._specs[name] for name in self.names()]

    def spec(self, name: str) -> AnalyzerSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise AnalyzerUnavailable(name, f"unknown analyzer (known: {known})") from None

    def get(self, name: str) -> Analyzer:
        spec = self.spec(name)
        if spec.unavailable:
            raise AnalyzerUnavailable(name, spec.unavailable)
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = spec.load()
                except AnalyzerUnavailable:
                    raise
                except Exception as exc:
                    raise AnalyzerUnavailable(name, f"failed to load: {exc}") from exc
            return self._loaded[name]

    def wants_gpu(self, name: str) -> bool:
        spec = self._specs.get(name)
        return spec is not None and spec.gpu

    def default_for(self, series: SeriesSummary) -> list[str]:
        """The embedded default route: every available analyzer whose filter matches the series."""
        return [s.name for s in self.specs() if not s.unavailable and s.matches(series)]


def build_registry(settings: AnalysisSettings) -> Registry:
    """Collect the specs of every provider. Cheap: nothing is loaded until ``Registry.get``."""
    from dicomnode.models import deepbet, qc, torch_runtime

    specs: list[AnalyzerSpec] = []
    specs += qc.specs(settings.qc)
    specs += torch_runtime.specs(settings)
    specs += deepbet.specs(settings)
    return Registry(specs)
