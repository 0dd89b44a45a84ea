"""Pins the shipped demo model (NOT FOR CLINICAL USE): its package, and its evaluation.

The held-out evaluation set is regenerated from the real head CT of Debian
``invesalius-examples`` by the training script's own (seeded) code, and the shipped model is run
through the runtime exactly as the node would; the metrics must reproduce ``eval.json``.
The converter script is checked too: its DICOM series must pass ``dciodvfy`` and be reproducible.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest

from dicomnode.config import AnalysisSettings
from dicomnode.domain import FindingsStatus, Priority
from dicomnode.models import build_registry
from dicomnode.models.torch_runtime import load_manifest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "dicomnode" / "models" / "shipped" / "demo_hyperdense"
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
DCIODVFY = Path("/usr/bin/dciodvfy")

if not CRANIUM.is_file():
    pytest.fail(f"{CRANIUM} missing: apt-get install invesalius-examples (see .ci/run)")


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train() -> ModuleType:
    return _script("train_demo_hyperdense")


def test_package_is_small_hashed_and_marked_not_for_clinical_use() -> None:
    manifest = load_manifest(MODEL_DIR)
    assert manifest.name == "demo-hyperdense" and manifest.not_for_clinical_use is True
    assert "NOT FOR CLINICAL USE" in manifest.description
    model = MODEL_DIR / manifest.model_file
    assert model.stat().st_size < 2_000_000
    assert hashlib.sha256(model.read_bytes()).hexdigest() == manifest.model_sha256
    card = (MODEL_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "NOT FOR CLINICAL USE" in card
    assert json.loads((MODEL_DIR / "eval.json").read_text(encoding="utf-8"))["not_for_clinical_use"] is True
    raw = tomllib.loads((MODEL_DIR / "manifest.toml").read_text(encoding="utf-8"))
    assert raw["input"]["spacing"] == [2.0, 2.0]


def test_training_constants_match_the_manifest(train: ModuleType) -> None:
    manifest = load_manifest(MODEL_DIR)
    assert manifest.input.spacing == [train.TRAIN_SPACING, train.TRAIN_SPACING]
    assert [(w.center, w.width) for w in manifest.input.windows] == list(train.WINDOWS)
    assert manifest.output.labels[0].name == train.LABEL


def test_held_out_evaluation_reproduces_eval_json(train: ModuleType) -> None:
    expected = json.loads((MODEL_DIR / "eval.json").read_text(encoding="utf-8"))
    got = train.evaluate(MODEL_DIR)
    tolerance = 0.02  # float reductions may differ across CPUs / thread counts
    for group, key in [
        ("series", "auc"),
        ("series", "sensitivity"),
        ("series", "specificity"),
        ("slice", "auc"),
        ("dice", "mean"),
        ("real_normal_slices", "specificity"),
        ("negative_series_slices", "specificity"),
    ]:
        assert got[group][key] == pytest.approx(expected[group][key], abs=tolerance), (group, key)
    assert got["series"]["n_positive"] == expected["series"]["n_positive"]
    assert got["slice"]["n_positive"] == expected["slice"]["n_positive"]
    assert got["present_consistent"] is True
    # Floors, so a regenerated eval.json cannot quietly lower the bar.
    assert got["series"]["auc"] >= 0.9 and got["slice"]["auc"] >= 0.9 and got["dice"]["mean"] >= 0.7
    assert got["real_normal_slices"]["specificity"] == 1.0
    assert got["ct_small_score"] < 0.5


def test_registry_runs_the_shipped_model_on_the_converted_dicom_series(
    tmp_path: Path, train: ModuleType
) -> None:
    converter = _script("invesalius_to_dicom")
    paths = converter.write_series(tmp_path / "ct")
    assert len(paths) == 108
    result = subprocess.run([str(DCIODVFY), str(paths[50])], capture_output=True, text=True, check=False)
    assert "Error" not in result.stdout + result.stderr, result.stderr
    again = converter.write_series(tmp_path / "again")
    assert paths[0].read_bytes() == again[0].read_bytes()  # deterministic UIDs and bytes

    # Read back the held-out block the way imaging would (rescale applied, sorted by position).
    datasets = [pydicom.dcmread(p) for p in paths[26:42]]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    pixels = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )
    spacing = (1.5, float(datasets[0].PixelSpacing[0]), float(datasets[0].PixelSpacing[1]))
    analyzer = build_registry(AnalysisSettings()).get("demo-hyperdense")
    normal = analyzer.analyze(train.make_volume(pixels.astype(np.float32), spacing, "normal"))
    assert normal.status is FindingsStatus.COMPLETE, normal.error
    assert normal.findings[0].present is False and normal.priority is Priority.ROUTINE
    assert normal.not_for_clinical_use is True

    rng = np.random.default_rng(7)
    painted = train.add_lesion(pixels.astype(np.float32), spacing, rng)
    assert painted is not None
    lesion_pixels, truth = painted
    flagged = analyzer.analyze(train.make_volume(lesion_pixels, spacing, "lesion"))
    finding = flagged.findings[0]
    assert finding.present is True and flagged.priority is Priority.STAT
    assert finding.mask is not None and finding.mask.array.shape == truth.shape
    assert (finding.mask.array & truth).sum() > 0.5 * truth.sum()
