"""Shared pieces of the notify tests: a deterministic triage model and a positive head CT.

``test-bleed`` is a tiny TorchScript model (NOT FOR CLINICAL USE, a test fixture) run by the real
runtime in 3D mode on a fixed 8-slice grid: it flags voxels of 80-100 HU (a bleed-like density; the
second window vetoes bone). A series of 8 slices with a 100 HU block on one slice is positive with
priority STAT. When a ninth slice arrives late, the runtime resamples the 9 slices onto the same
8-slice grid, the one-slice block is averaged with normal brain (about 72 HU, under 80) and the
verdict becomes negative: a verdict that one late image changes, computable by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from synthetic import ct_series

MANIFEST = """
name = "{name}"
version = "1.0.0"
description = "notify test fixture, NOT FOR CLINICAL USE"
kind = "triage"
not_for_clinical_use = true
model_file = "model.pt"

[filter]
modalities = ["CT"]
body_parts = ["HEAD"]

[input]
mode = "3d"
size = [8, 64, 64]
windows = [{{ center = 40.0, width = 80.0 }}, {{ center = 150.0, width = 100.0 }}]
channels = 2
batch_size = 16

[output]
kind = "segmentation"
top_k = 4

[[output.labels]]
name = "Bleed"
code = {{ value = "50960005", scheme = "SCT", meaning = "Hemorrhage" }}
category = {{ value = "49755003", scheme = "SCT", meaning = "Morphologically Abnormal Structure" }}
type = {{ value = "50960005", scheme = "SCT", meaning = "Hemorrhage" }}

[[thresholds]]
label = "Bleed"
probability = 0.5
priority = "stat"
"""

LESION_SLICE = 3
SLICES = 9  # the whole series; the first 8 arrive first, the last one late


def write_model(folder: Path, *, broken: bool = False, name: str = "test-bleed") -> Path:
    """Write the model folder (``broken``: a network whose output has the wrong rank, so the
    analyzer fails and says so)."""
    import warnings

    import torch
    from torch import nn

    class Bleed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # saturated soft-tissue window (>= 80 HU) and not into the 100-200 HU veto window
            return (x[:, :1] - 0.99) * 2000.0 - x[:, 1:2] * 10000.0

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))

    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; it is what the runtime loads
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Broken() if broken else Bleed()), str(folder / "model.pt"))
    (folder / "manifest.toml").write_text(MANIFEST.format(name=name), encoding="utf-8")
    return folder


def head_ct(seed: str, *, lesion: bool = True, rows: int = 64) -> list[Dataset]:
    """9 axial head CT slices 2.5 mm apart; with ``lesion`` a 100 HU block on slice 3."""
    datasets = ct_series(SLICES, rows, rows, seed=seed)
    if lesion:
        ds = datasets[LESION_SLICE]
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(rows, rows).copy()
        stored[26:34, 14:22] = 1024 + 100
        ds.PixelData = stored.tobytes()
    return datasets
