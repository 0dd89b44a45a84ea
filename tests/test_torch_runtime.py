"""Pins the TorchScript runtime: manifest validation, discovery, preprocessing, streaming,
findings (explicit present/absent, aligned masks, priority) and FAILED findings for bad input.

The models here are tiny TorchScript modules with a known answer (a threshold on the windowed
input), so every expectation can be computed by hand.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import phantoms
import pytest
import torch
from torch import nn

from dicomnode.config import AnalysisSettings
from dicomnode.domain import AnalyzerKind, FindingsStatus, Priority, SeriesSummary, Volume
from dicomnode.errors import AnalyzerUnavailable
from dicomnode.models import Registry
from dicomnode.models.torch_runtime import (
    ManifestError,
    TorchAnalyzer,
    cranial_cavity,
    load_manifest,
    load_model,
    select_device,
    specs,
)

# TorchScript is deprecated in torch >= 2.10 but is the format the runtime loads; the tests script models.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(script|save)` is deprecated:DeprecationWarning"
)

SEG_MANIFEST = """
name = "{name}"
version = "1.2.3"
description = "test model"
kind = "triage"
not_for_clinical_use = true
model_file = "model.pt"
{extra}

[filter]
modalities = ["CT"]
body_parts = ["HEAD"]

[input]
mode = "2d"
{geometry}
windows = [{{ center = 40.0, width = 80.0 }}]
channels = 1
batch_size = {batch}

[output]
kind = "segmentation"
top_k = 1

[[output.labels]]
name = "Bright"
code = {{ value = "50960005", scheme = "SCT", meaning = "Hemorrhage" }}
category = {{ value = "49755003", scheme = "SCT", meaning = "Morphologically Abnormal Structure" }}
type = {{ value = "50960005", scheme = "SCT", meaning = "Hemorrhage" }}

[[thresholds]]
label = "Bright"
probability = 0.5
priority = "stat"
"""


class Bright(nn.Module):
    """Logit +20 where the windowed input is saturated (HU >= 80), -20 elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 0.99) * 2000.0


class MeanScore(nn.Module):
    """Classification: one logit per image, positive when the mean windowed value exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(dim=(2, 3)) - 0.5) * 100.0


class Bright3d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 0.99) * 2000.0


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))  # wrong rank for a segmentation model


def write_model(
    folder: Path,
    module: nn.Module,
    *,
    name: str = "test-bright",
    geometry: str = "",
    batch: int = 4,
    extra: str = "",
    manifest: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(module), str(folder / "model.pt"))
    text = manifest if manifest is not None else SEG_MANIFEST
    (folder / "manifest.toml").write_text(
        text.format(name=name, geometry=geometry, batch=batch, extra=extra), encoding="utf-8"
    )
    return folder


def volume(
    pixels: np.ndarray,
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    modality: str = "CT",
    problems: tuple[str, ...] = (),
) -> Volume:
    return phantoms.volume(pixels, modality, spacing, problems=problems)


def lesion_volume(n: int = 10, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.full((n, size, size), 30.0, dtype=np.float32)
    truth = np.zeros(pixels.shape, dtype=bool)
    truth[3:6, 20:30, 25:40] = True
    pixels[truth] = 200.0
    return pixels, truth


def series(modality: str = "CT", body_part: str = "HEAD") -> SeriesSummary:
    return SeriesSummary(
        series_instance_uid="1.2",
        study_instance_uid="1.3",
        epoch=1,
        modality=modality,
        sop_class_uids=("1.2.840.10008.5.1.4.1.1.2",),
        body_part=body_part,
        series_description="",
        study_description="",
        calling_ae="SCANNER",
        instance_count=10,
        image_types=(),
    )


# --- findings -------------------------------------------------------------------------------------


def test_positive_series_gives_aligned_mask_volume_and_stat_priority(tmp_path: Path) -> None:
    analyzer = load_model(write_model(tmp_path / "m", Bright()))
    pixels, truth = lesion_volume()
    findings = analyzer.analyze(volume(pixels))
    assert findings.status is FindingsStatus.COMPLETE, findings.error
    assert findings.kind is AnalyzerKind.TRIAGE and findings.analyzer == "test-bright"
    assert findings.priority is Priority.STAT
    assert findings.not_for_clinical_use is True
    (finding,) = findings.findings
    assert finding.present is True and finding.probability == pytest.approx(1.0)
    assert finding.finding_type.value == "50960005"
    assert finding.mask is not None
    assert finding.mask.array.shape == pixels.shape
    assert np.array_equal(finding.mask.array, truth)
    assert finding.mask.category.meaning == "Morphologically Abnormal Structure"
    (measurement,) = finding.measurements
    assert measurement.unit.value == "ml"
    assert measurement.value == pytest.approx(truth.sum() * 2.0 / 1000.0)


def test_negative_series_is_reported_absent_with_routine_priority(tmp_path: Path) -> None:
    analyzer = load_model(write_model(tmp_path / "m", Bright()))
    findings = analyzer.analyze(volume(np.full((5, 32, 32), 30.0)))
    assert findings.status is FindingsStatus.COMPLETE
    (finding,) = findings.findings
    assert finding.present is False  # a negative finding is explicit, never omitted
    assert finding.probability is not None and finding.probability < 0.01
    assert finding.mask is None
    assert findings.priority is Priority.ROUTINE


def test_batches_stream_and_match_a_single_batch(tmp_path: Path) -> None:
    pixels, _ = lesion_volume(n=11)
    one = load_model(write_model(tmp_path / "a", Bright(), batch=64)).predict(volume(pixels))
    seen: list[int] = []

    class Recording(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return Bright()(x)

    manifest = load_manifest(write_model(tmp_path / "b", Bright(), batch=3))
    streamed = TorchAnalyzer(manifest, Recording(), "cpu").predict(volume(pixels))
    assert seen == [3, 3, 3, 2]
    assert np.array_equal(one.slice_scores, streamed.slice_scores)
    assert one.masks is not None and streamed.masks is not None
    assert np.array_equal(one.masks[0], streamed.masks[0])


def test_in_plane_resampling_keeps_the_mask_aligned(tmp_path: Path) -> None:
    analyzer = load_model(write_model(tmp_path / "m", Bright(), geometry="spacing = [2.0, 2.0]"))
    pixels, truth = lesion_volume(size=96)
    seen: list[tuple[int, ...]] = []

    class Recording(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape[2:]))
            return Bright()(x)

    analyzer = TorchAnalyzer(analyzer.manifest, Recording(), "cpu")
    findings = analyzer.analyze(volume(pixels, spacing=(2.0, 0.5, 0.5)))
    assert seen and seen[0] == (24, 24)  # 96 pixels x 0.5 mm / 2 mm
    mask = findings.findings[0].mask
    assert mask is not None and mask.array.shape == pixels.shape
    dice = 2 * (mask.array & truth).sum() / (mask.array.sum() + truth.sum())
    assert dice > 0.8


def test_classification_model_and_fixed_size(tmp_path: Path) -> None:
    manifest = SEG_MANIFEST.replace('kind = "segmentation"', 'kind = "classification"')
    manifest = manifest.replace("category = {{", "# category = {{").replace("type = {{", "# type = {{")
    folder = write_model(tmp_path / "c", MeanScore(), manifest=manifest, geometry="size = [16, 16]")
    analyzer = load_model(folder)
    bright = analyzer.analyze(volume(np.full((3, 40, 40), 75.0)))
    dark = analyzer.analyze(volume(np.full((3, 40, 40), 10.0)))
    assert bright.findings[0].present is True and bright.priority is Priority.STAT
    assert dark.findings[0].present is False and dark.priority is Priority.ROUTINE
    assert bright.findings[0].mask is None


def test_3d_mode_maps_the_mask_back_to_the_source_grid(tmp_path: Path) -> None:
    manifest = SEG_MANIFEST.replace('mode = "2d"', 'mode = "3d"')
    folder = write_model(tmp_path / "d", Bright3d(), manifest=manifest, geometry="size = [10, 32, 32]")
    pixels, truth = lesion_volume(n=10, size=64)
    findings = load_model(folder).analyze(volume(pixels))
    mask = findings.findings[0].mask
    assert findings.findings[0].present is True
    assert mask is not None and mask.array.shape == pixels.shape
    dice = 2 * (mask.array & truth).sum() / (mask.array.sum() + truth.sum())
    assert dice > 0.8


def test_normalize_mode_uses_series_statistics(tmp_path: Path) -> None:
    manifest = SEG_MANIFEST.replace("windows = [{{ center = 40.0, width = 80.0 }}]", "normalize = {{}}")

    class AboveTwoSigma(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x[:, :1] - 2.0) * 100.0

    folder = write_model(tmp_path / "n", AboveTwoSigma(), manifest=manifest)
    pixels, truth = lesion_volume()
    mask = load_model(folder).analyze(volume(pixels * 10 + 500)).findings[0].mask
    assert mask is not None and np.array_equal(mask.array, truth)


# --- bad input -> FAILED findings, never an exception ---------------------------------------------


@pytest.mark.parametrize(
    ("vol", "expected"),
    [
        (
            volume(np.zeros((2, 8, 8)), modality="MR"),
            "modality 'MR' is not handled by test-bright (expects CT)",
        ),
        (volume(np.zeros((0, 8, 8))), "empty volume"),
        (
            volume(np.zeros((2, 8, 8)), problems=("2 frames of reference in one series",)),
            "inconsistent geometry: 2 frames of reference",
        ),
        (volume(np.zeros((2, 8, 8)), spacing=(0.0, 1.0, 1.0)), "invalid pixel spacing"),
    ],
)
def test_bad_input_gives_failed_findings(tmp_path: Path, vol: Volume, expected: str) -> None:
    findings = load_model(write_model(tmp_path / "m", Bright())).analyze(vol)
    assert findings.status is FindingsStatus.FAILED
    assert expected in findings.error
    assert findings.findings == ()


def test_other_geometry_problems_run_but_mark_partial(tmp_path: Path) -> None:
    pixels, _ = lesion_volume()
    findings = load_model(write_model(tmp_path / "m", Bright())).analyze(
        volume(pixels, problems=("gap of 4.0 mm between slices 3 and 4",))
    )
    assert findings.status is FindingsStatus.PARTIAL
    assert findings.notes == ("gap of 4.0 mm between slices 3 and 4",)
    assert findings.findings[0].present is True


def test_a_model_that_returns_the_wrong_shape_fails_cleanly(tmp_path: Path) -> None:
    findings = load_model(write_model(tmp_path / "m", Broken())).analyze(volume(np.zeros((2, 8, 8))))
    assert findings.status is FindingsStatus.FAILED
    assert "does not match output.kind='segmentation'" in findings.error


# --- manifest -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace(
                'code = {{ value = "50960005", scheme = "SCT", meaning = "Hemorrhage" }}\n', ""
            ),
            "manifest.toml: output.labels[0].code: missing",
        ),
        (lambda t: t.replace("[filter]", "colour = 'red'\n[filter]"), "manifest.toml: colour: unknown key"),
        (
            lambda t: t.replace("not_for_clinical_use = true\n", ""),
            "manifest.toml: not_for_clinical_use: missing",
        ),
        (
            lambda t: t.replace('label = "Bright"', 'label = "Dim"'),
            "manifest.toml: thresholds[0].label: unknown label 'Dim' (known: Bright)",
        ),
        (
            lambda t: t.replace("channels = 1", "channels = 3"),
            "manifest.toml: input: channels is 3 but the intensity settings give 1",
        ),
        (
            lambda t: t.replace('name = "Bright"', 'name = "Bright"\nthreshold = 2'),
            "manifest.toml: output.labels[0].threshold: Input should be less than or equal to 1",
        ),
        (lambda t: t + "[[[", "manifest.toml: not valid TOML"),
    ],
)
def test_manifest_errors_are_one_line_naming_the_key(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = write_model(tmp_path / "m", Bright(), manifest=edit(SEG_MANIFEST))
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", Bright())
    (folder / "model.pt").unlink()
    with pytest.raises(ManifestError, match=r"model_file: 'model.pt' not found"):
        load_manifest(folder)


# --- discovery and registry -----------------------------------------------------------------------


def test_specs_discover_folders_and_report_broken_ones(tmp_path: Path) -> None:
    write_model(tmp_path / "good", Bright())
    broken = write_model(tmp_path / "broken", Bright(), name="other")
    (broken / "manifest.toml").write_text('name = "other"\n', encoding="utf-8")
    write_model(tmp_path / "twin", Bright())  # same model name as "good"
    settings = AnalysisSettings(shipped_models=False, model_dirs=[tmp_path, tmp_path / "absent"])
    by_name = {s.name: s for s in specs(settings)}
    good = by_name["test-bright"]
    assert good.unavailable == "" and good.version == "1.2.3" and good.modalities == frozenset({"CT"})
    assert "NOT FOR CLINICAL USE" in good.description
    assert good.matches(series(body_part="head")) and not good.matches(series(body_part="CHEST"))
    assert not good.matches(series(modality="MR"))
    assert by_name["broken"].unavailable.endswith(
        "manifest.toml: version: missing; not_for_clinical_use: missing; "
        "filter: missing; input: missing; output: missing"
    )
    twin = [s for s in by_name.values() if "already provided" in s.unavailable]
    assert len(twin) == 1
    assert "model folder not found" in by_name["absent"].unavailable
    registry = Registry(specs(settings))  # names are unique, so the registry accepts them all
    with pytest.raises(AnalyzerUnavailable, match="broken"):
        registry.get("broken")
    first = registry.get("test-bright")
    assert registry.get("test-bright") is first  # loaded once per process, then kept
    assert registry.default_for(series()) == ["test-bright"]


def test_sha256_mismatch_makes_the_model_unavailable(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", Bright(), extra=f'model_sha256 = "{"0" * 64}"')
    registry = Registry(specs(AnalysisSettings(shipped_models=False, model_dirs=[folder])))
    with pytest.raises(AnalyzerUnavailable, match="model_sha256: model.pt has sha256"):
        registry.get("test-bright")
    good = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    folder2 = write_model(tmp_path / "m2", Bright(), name="ok", extra=f'model_sha256 = "{good}"')
    assert load_model(folder2).name == "ok"


def test_shipped_models_are_discovered_only_when_enabled() -> None:
    shipped = {s.name: s for s in specs(AnalysisSettings())}
    assert "demo-hyperdense" in shipped and shipped["demo-hyperdense"].unavailable == ""
    assert specs(AnalysisSettings(shipped_models=False)) == []


def test_device_selection_respects_settings() -> None:
    assert select_device("cpu") == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto") == expected
    assert select_device("cuda") == expected


# --- torch.export programs, canonical orientation, the 3-D series decision ---------------------------


def write_exported(folder: Path, module: nn.Module, extra: str = "", channels: int = 1) -> Path:
    """A model folder whose network is a torch.export program (.pt2) with dynamic batch and size."""
    folder.mkdir(parents=True, exist_ok=True)
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    program = torch.export.export(module.eval(), (torch.rand(2, channels, 40, 44),), dynamic_shapes={"x": dims})
    torch.export.save(program, str(folder / "model.pt2"))
    text = SEG_MANIFEST.replace('model_file = "model.pt"', 'model_file = "model.pt2"')
    (folder / "manifest.toml").write_text(text.format(name="test-export", geometry="", batch=4, extra=extra))
    return folder


class BrightConv(nn.Module):
    """Bright, as a convolution (what export traces best): logit +20 where HU >= 80."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(2000.0)
            self.conv.bias.fill_(-0.99 * 2000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_torch_export_program_runs_like_torchscript(tmp_path: Path) -> None:
    pixels, truth = lesion_volume()
    exported = load_model(write_exported(tmp_path / "pt2", BrightConv()))
    scripted = load_model(write_model(tmp_path / "pt", Bright()))
    a, b = exported.analyze(volume(pixels)), scripted.analyze(volume(pixels))
    assert a.status is FindingsStatus.COMPLETE, a.error
    assert a.findings[0].present is b.findings[0].present is True
    assert a.findings[0].mask is not None and np.array_equal(a.findings[0].mask.array, truth)
    assert a.findings[0].probability == pytest.approx(b.findings[0].probability)


def test_a_file_that_is_not_an_export_program_is_named(tmp_path: Path) -> None:
    folder = write_exported(tmp_path / "bad", BrightConv())
    (folder / "model.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ManifestError, match=r"model_file: model.pt2 is not a torch.export program"):
        load_model(folder)


def _encoded(pixels: np.ndarray, how: str) -> tuple[Volume, np.ndarray]:
    """The same anatomy (slices inferior->superior, rows anterior->posterior, columns right->left)
    as ``how`` stores it: the stored array, sorted as imaging sorts it, and its IOP."""
    if how == "transposed":  # rows along x, columns along y: normal -z, superior slice first
        stored, iop = pixels.transpose(0, 2, 1)[::-1], (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    elif how == "prone":  # rotated 180 degrees in-plane
        stored, iop = pixels[:, ::-1, ::-1], (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    elif how == "coronal":  # coronal slices anterior->posterior, rows superior->inferior
        stored, iop = pixels.transpose(1, 0, 2)[:, ::-1], (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    else:
        stored, iop = pixels, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    stored = np.ascontiguousarray(stored)
    spacing = (1.0, 2.0, 1.0) if how == "coronal" else (2.0, 1.0, 1.0)
    return phantoms.volume(stored, "CT", spacing, orientation=iop), stored


@pytest.mark.parametrize("how", ["axial", "transposed", "prone", "coronal"])
def test_every_encoding_of_one_anatomy_is_seen_in_one_orientation_and_masks_map_back(
    tmp_path: Path, how: str
) -> None:
    pixels, truth = lesion_volume()
    seen: list[np.ndarray] = []

    class Recording(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x[:, 0].numpy().copy())
            return Bright()(x)

    manifest = load_manifest(write_model(tmp_path / "m", Bright(), batch=64))
    vol, _ = _encoded(pixels, how)
    _, stored_truth = _encoded(truth.astype(np.float32), how)
    findings = TorchAnalyzer(manifest, Recording(), "cpu").analyze(vol)
    reference = np.clip((pixels - 0.0) / 80.0, 0, 1)  # the axial stack, windowed 40/80
    assert np.array_equal(np.concatenate(seen), reference)
    mask = findings.findings[0].mask
    assert mask is not None and np.array_equal(mask.array, stored_truth > 0.5)


def test_stored_orientation_opts_out(tmp_path: Path) -> None:
    pixels, _ = lesion_volume()
    seen: list[tuple[int, ...]] = []

    class Recording(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return Bright()(x)

    folder = write_model(tmp_path / "m", Bright(), batch=64)
    text = (folder / "manifest.toml").read_text().replace('mode = "2d"', 'mode = "2d"\norientation = "stored"')
    (folder / "manifest.toml").write_text(text)
    vol, stored = _encoded(pixels, "coronal")
    TorchAnalyzer(load_manifest(folder), Recording(), "cpu").analyze(vol)
    assert seen == [(stored.shape[0], 1, *stored.shape[1:])]


def bright_region_model(folder: Path, output: str, modality: str = "CT") -> Path:
    """A Bright segmentation model whose manifest's [output] also has the keys ``output`` (TOML lines)."""
    write_model(folder, Bright(), batch=64, extra="")
    manifest = folder / "manifest.toml"
    text = manifest.read_text().replace('modalities = ["CT"]', f'modalities = ["{modality}"]')
    manifest.write_text(text.replace("top_k = 1", "top_k = 1\n" + output))
    return folder


def test_a_minimum_lesion_volume_decides_the_series_in_3d(tmp_path: Path) -> None:
    """With output.min_lesion_ml, a bright speck (one voxel on one slice) no longer calls a series
    positive; a region of at least that volume does, and only such regions stay in the mask."""
    analyzer = load_model(bright_region_model(tmp_path / "m", "min_lesion_ml = 0.1"))
    speck = np.full((10, 64, 64), 30.0, dtype=np.float32)
    speck[4, 30, 30] = 200.0  # 2 mm x 1 mm x 1 mm = 0.002 ml
    lesion = speck.copy()
    lesion[2:6, 10:20, 10:20] = 200.0  # 4 slices x 100 mm2 x 2 mm = 0.8 ml
    negative = analyzer.analyze(volume(speck))
    assert negative.findings[0].present is False and negative.findings[0].mask is None
    assert 0 < (negative.findings[0].probability or 0.0) < 0.5
    positive = analyzer.analyze(volume(lesion))
    finding = positive.findings[0]
    assert finding.present is True and positive.priority is Priority.STAT
    assert finding.mask is not None and finding.mask.array[2:6, 10:20, 10:20].all()
    assert not finding.mask.array[4, 30, 30]  # the speck is not part of the reported lesion
    (components,) = analyzer.predict(volume(lesion)).components
    assert sorted(c.kept for c in components) == [False, True]


def test_a_minimum_extent_across_slices_rejects_flat_spots_but_not_thick_slices(tmp_path: Path) -> None:
    """output.min_lesion_extent_mm: a region must also span that distance along the slice axis.
    A flat 0.4 mL spot on one 2 mm slice does not count; the same spot over two slices (4 mm)
    does, and so does one slice of a 5 mm series: a thick slice is itself 5 mm of patient."""
    analyzer = load_model(bright_region_model(tmp_path / "m", "min_lesion_ml = 0.1\nmin_lesion_extent_mm = 4"))
    flat = np.full((10, 64, 64), 30.0, dtype=np.float32)
    flat[4, 10:30, 10:30] = 200.0  # 400 mm2 x 2 mm = 0.8 ml, but 2 mm deep
    two_slices = flat.copy()
    two_slices[5] = flat[4]

    negative = analyzer.analyze(volume(flat))
    assert negative.findings[0].present is False and negative.findings[0].mask is None
    assert 0 < (negative.findings[0].probability or 0.0) < 0.5  # scaled by 2 mm / 4 mm
    (components,) = analyzer.predict(volume(flat)).components
    assert [(c.kept, c.extent_mm) for c in components] == [(False, 2.0)]

    assert analyzer.analyze(volume(two_slices)).findings[0].present is True
    thick = analyzer.analyze(volume(flat, spacing=(5.0, 1.0, 1.0)))
    assert thick.findings[0].present is True and thick.priority is Priority.STAT


def test_min_lesion_extent_needs_the_3d_region_decision(tmp_path: Path) -> None:
    folder = bright_region_model(tmp_path / "m", "min_lesion_extent_mm = 4")
    with pytest.raises(ManifestError, match="min_lesion_extent_mm: needs min_lesion_ml"):
        load_manifest(folder)


def _head(gap: bool = True) -> np.ndarray:
    """10 axial slices of soft tissue (30 HU) in a 1000 HU skull ring; ``gap``: with a 60 degree
    opening, as after a craniotomy."""
    pixels = np.full((10, 64, 64), 30.0, dtype=np.float32)
    yy, xx = np.indices((64, 64))
    ring = np.abs(np.hypot(yy - 32, xx - 32) - 21.5) < 1.5
    if gap:
        ring &= np.abs(np.degrees(np.arctan2(yy - 32, xx - 32)) + 90) > 30
    pixels[:, ring] = 1000.0
    return pixels


def test_cranial_cavity_is_the_skull_hull_even_with_a_craniotomy() -> None:
    cavity = cranial_cavity(_head(gap=True))
    assert cavity[:, 32, 32].all() and cavity[:, 14, 32].all()  # centre, and under the opening
    assert not cavity[:, 2, 2].any() and not cavity[:, 32, 53].any()  # outside; the bone itself
    assert not cranial_cavity(np.full((2, 16, 16), 30.0, dtype=np.float32)).any()  # no bone, no cavity


def test_a_minimum_intracranial_fraction_ignores_regions_outside_the_skull(tmp_path: Path) -> None:
    """output.min_intracranial_fraction: the same bright region decides the series inside the
    skull, not outside it (face, neck, scalp), and the bright bone is no lesion either."""
    analyzer = load_model(bright_region_model(tmp_path / "m", "min_lesion_ml = 0.1\nmin_intracranial_fraction = 0.5"))
    inside = _head()
    inside[2:6, 28:36, 28:36] = 200.0  # 4 x 2 mm x 64 mm2 = 0.51 ml
    outside = _head()
    outside[2:6, 0:8, 0:8] = 200.0  # the same, in a corner outside the skull

    positive = analyzer.analyze(volume(inside))
    assert positive.findings[0].present is True and positive.priority is Priority.STAT
    (components,) = analyzer.predict(volume(inside)).components
    assert sorted((c.kept, c.intracranial_fraction) for c in components) == [(False, 0.0), (True, 1.0)]

    negative = analyzer.analyze(volume(outside))
    assert negative.findings[0].present is False and negative.findings[0].mask is None
    assert (negative.findings[0].probability or 0.0) < 0.5
    (components,) = analyzer.predict(volume(outside)).components
    assert [c.kept for c in components] == [False, False]  # the skull ring and the corner


def test_min_intracranial_fraction_needs_regions_and_ct(tmp_path: Path) -> None:
    folder = bright_region_model(tmp_path / "ct", "min_intracranial_fraction = 0.5")
    with pytest.raises(ManifestError, match="min_intracranial_fraction: needs min_lesion_ml"):
        load_manifest(folder)
    folder = bright_region_model(tmp_path / "mr", "min_lesion_ml = 0.1\nmin_intracranial_fraction = 0.5", "MR")
    with pytest.raises(ManifestError, match="min_intracranial_fraction: finds the skull in HU"):
        load_manifest(folder)


def test_the_worked_example_of_docs_models_md_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/models.md's export example, run as written: export, manifest, config, verdict."""
    import re
    import tomllib

    from dicomnode.config import parse_config
    from dicomnode.models import build_registry

    text = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text(encoding="utf-8")
    section = text[text.index("## Exporting your own model"):text.index("## demo-hyperdense")]
    python_blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    toml_blocks = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    assert len(python_blocks) == 2 and len(toml_blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks[0], "docs/models.md", "exec"), {})  # noqa: S102 - our own documentation
    config = tomllib.loads(toml_blocks[0])
    config["analysis"]["model_dirs"] = [str(tmp_path / p) for p in config["analysis"]["model_dirs"]]
    config["destinations"] = {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    registry = build_registry(parse_config(config).analysis)
    assert "dense-spots" in [spec.name for spec in registry.specs() if not spec.unavailable]
    pixels, truth = lesion_volume()  # a 200 HU block of 1.35 mL in 30 HU tissue
    scope = {"Path": Path, "volume": volume(pixels)}
    exec(compile(python_blocks[1], "docs/models.md", "exec"), scope)  # noqa: S102
    findings = scope["findings"]
    assert findings.status is FindingsStatus.COMPLETE, findings.error
    assert findings.findings[0].present is True and findings.priority is Priority.STAT
    mask = findings.findings[0].mask
    assert mask is not None  # resampled to 2 mm and back: the edges may move by a pixel
    assert 2 * (mask.array & truth).sum() / (mask.array.sum() + truth.sum()) > 0.8
    absent = scope["analyzer"].analyze(volume(np.full((10, 64, 64), 30.0, dtype=np.float32)))
    assert absent.findings[0].present is False
