"""Train, evaluate and package the demo hyperdense-lesion model. NOT FOR CLINICAL USE.

A small 2D U-Net (Ronneberger et al., MICCAI 2015, "U-Net: Convolutional Networks for Biomedical
Image Segmentation") segments bleed-like hyperdense lesions on head CT slices. A model trained on
phantoms flags normal anatomy on real scans, so the training images are REAL anatomy: the one head
CT shipped by Debian ``invesalius-examples`` (108 slices), with synthetic lesions painted in
(55-85 HU smooth blobs inside the intracranial soft tissue; acute blood is about 50-90 HU).

Two blocks of real slices are held out (with a 3-slice gap on each side, excluded from training
because neighbouring 1.5 mm slices are nearly identical). The evaluation runs the packaged model
through :mod:`dicomnode.models.torch_runtime` on 8-slice sub-series of the held-out blocks at their
native resolution, with and without synthetic 3D lesions, and reports series/slice AUC, Dice, and
specificity on the unmodified real slices. Everything is seeded; the evaluation set is regenerated
bit-for-bit by ``tests/test_demo_model.py``.

Honest limits: one real patient (108 slices), of which 32 held out; the negative series share that
anatomy; lesions are synthetic. The numbers say the pipeline works, not that the model is useful.

Usage: ``nice -n 10 python scripts/train_demo_hyperdense.py [--steps N] [--out DIR] [--eval-only]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL_DIR = ROOT / "dicomnode" / "models" / "shipped" / "demo_hyperdense"

SEED = 20240601
HELD_OUT = (range(26, 42), range(70, 86))  # slice indices of the Cranium volume (0 = skull base)
GAP = 3
TRAIN_SPACING = 2.0  # mm, must equal manifest input.spacing
WINDOWS = ((40.0, 80.0), (150.0, 500.0))  # (center, width), must equal manifest input.windows
SUB_SERIES = 8
CROP = 64  # training patch, pixels at TRAIN_SPACING (128 mm)
SUB_STRIDE = 4
LABEL = "Hyperdense lesion (demo)"


def _converter() -> Any:
    spec = importlib.util.spec_from_file_location(
        "invesalius_to_dicom", ROOT / "scripts" / "invesalius_to_dicom.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cranium() -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    volume, spacing = _converter().read_inv3()
    return volume.astype(np.float32), spacing


def split_slices(n: int) -> tuple[list[int], list[int]]:
    """(training slice indices, held-out slice indices)."""
    held = sorted(i for block in HELD_OUT for i in block)
    excluded = {
        i + d for block in HELD_OUT for i in (block.start, block.stop - 1) for d in range(-GAP, GAP + 1)
    }
    excluded |= set(held)
    return [i for i in range(n) if i not in excluded], held


# --- synthetic lesions --------------------------------------------------------------------------


def _convex_fill(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The filled convex hull of a 2D mask (half-plane test against each hull edge)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(mask)
    if points.shape[0] < 3:
        return np.zeros_like(mask)
    try:
        hull = ConvexHull(points)
    except QhullError:
        return np.zeros_like(mask)
    grid = np.indices(mask.shape).reshape(2, -1).T.astype(np.float64)
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9, axis=1)
    result: npt.NDArray[np.bool_] = inside.reshape(mask.shape)
    return result


def intracranial_candidates(hu: npt.NDArray[np.float32], spacing: tuple[float, ...]) -> npt.NDArray[np.bool_]:
    """Voxels of brain-like soft tissue (10-60 HU) inside the convex hull of the skull (its
    largest bone component, > 200 HU) and at least ~4 mm from bone, where a lesion centre may go.
    The hull, not a filled ring, because a skull ring may be open (foramina, a craniotomy)."""
    out = np.zeros(hu.shape, dtype=bool)
    radius = max(1, round(4.0 / spacing[-1]))
    for k in range(hu.shape[0]):
        labels, count = ndimage.label(hu[k] > 200)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        skull = labels == (1 + int(np.argmax(sizes)))
        inside = _convex_fill(skull) & ~ndimage.binary_dilation(skull, iterations=radius)
        soft = ndimage.binary_opening((hu[k] > 10) & (hu[k] < 60) & inside, iterations=1)
        out[k] = ndimage.binary_erosion(soft, iterations=1)
    return out


def add_lesion(
    hu: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    candidates: npt.NDArray[np.bool_] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]] | None:
    """Paint one smooth hyperdense blob into ``hu`` (slices, rows, cols); None if no room.

    The blob is an ellipsoid (radii 4-14 mm, random in-plane rotation) whose boundary is wobbled by
    smooth noise; its density is 55-85 HU with 3 HU noise, blended over a soft 1.5 mm edge, and it
    is clipped to soft tissue (0-100 HU) so it never paints over bone or air.
    """
    if candidates is None:
        candidates = intracranial_candidates(hu, spacing)
    index = np.flatnonzero(candidates)
    if index.size == 0:
        return None
    center = np.array(np.unravel_index(index[rng.integers(index.size)], hu.shape))
    radii = rng.uniform(4.0, 14.0, size=3)
    radii[1:] *= rng.uniform(0.6, 1.0, size=2)
    theta = rng.uniform(0, np.pi)
    density = rng.uniform(55.0, 85.0)
    # Work in a box around the centre: the blob never reaches beyond 1.4 x its largest radius.
    reach = 1.4 * float(radii.max()) + 2.0
    lo = [max(0, int(c - reach / sp)) for c, sp in zip(center, spacing, strict=True)]
    hi = [min(n, int(c + reach / sp) + 2) for c, n, sp in zip(center, hu.shape, spacing, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    crop = hu[box]
    grid = np.indices(crop.shape, dtype=np.float32)
    dz = (grid[0] + lo[0] - center[0]) * spacing[0]
    dy = (grid[1] + lo[1] - center[1]) * spacing[1]
    dx = (grid[2] + lo[2] - center[2]) * spacing[2]
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    dist = np.sqrt((dz / radii[0]) ** 2 + (u / radii[1]) ** 2 + (v / radii[2]) ** 2)
    sigma = (1.0, 4.0 / spacing[1], 4.0 / spacing[2])
    wobble = ndimage.gaussian_filter(rng.standard_normal(crop.shape).astype(np.float32), sigma=sigma)
    wobble /= max(float(np.abs(wobble).max()), 1e-6)
    dist = dist * (1.0 + 0.25 * wobble)
    edge = 1.5 / float(radii.mean())
    alpha = np.clip((1.0 - dist) / edge, 0.0, 1.0) * ((crop > 0) & (crop < 100))
    mask = np.zeros(hu.shape, dtype=bool)
    mask[box] = alpha >= 0.5
    if mask.sum() * float(np.prod(spacing)) < 20.0:  # < 0.02 ml: nothing visible
        return None
    noise = rng.normal(0.0, 3.0, size=crop.shape).astype(np.float32)
    out = hu.astype(np.float32, copy=True)
    out[box] = crop + alpha * (density + noise - crop)
    return out, mask


# --- network -------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyUNet(nn.Module):
    """3-level U-Net, 2 input channels (windows), 1 output logit per pixel. Pads any input to a
    multiple of 8 and crops back, so the runtime may feed any slice size."""

    def __init__(self, cin: int = 2, base: int = 8) -> None:
        super().__init__()
        self.enc1 = _Block(cin, base)
        self.enc2 = _Block(base, base * 2)
        self.enc3 = _Block(base * 2, base * 4)
        self.mid = _Block(base * 4, base * 4)
        self.up3 = _Block(base * 8, base * 2)
        self.up2 = _Block(base * 4, base)
        self.up1 = _Block(base * 2, base)
        self.head = nn.Conv2d(base, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        ph = (8 - h % 8) % 8
        pw = (8 - w % 8) % 8
        x = F.pad(x, [0, pw, 0, ph])
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.up3(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e3], 1))
        d2 = self.up2(torch.cat([F.interpolate(d3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.up1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.head(d1)[:, :, :h, :w]


def windows(hu: torch.Tensor) -> torch.Tensor:
    """(N, H, W) HU -> (N, 2, H, W), exactly as the runtime does for the manifest's windows."""
    return torch.stack([((hu - (c - w / 2)) / w).clamp(0.0, 1.0) for c, w in WINDOWS], dim=1)


# --- training ------------------------------------------------------------------------------------


def _resample_slices(hu: npt.NDArray[np.float32], spacing: tuple[float, float, float]) -> torch.Tensor:
    rows, cols = hu.shape[1:]
    size = (round(rows * spacing[1] / TRAIN_SPACING), round(cols * spacing[2] / TRAIN_SPACING))
    x = torch.from_numpy(hu)[:, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[:, 0]


def _augment(
    img: torch.Tensor, cand: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random LR flip, rotation (+-15 deg), scale (0.8-1.25, i.e. other pixel spacings/FOVs) and
    shift of the HU slices and, identically, of their lesion-candidate maps."""
    n = img.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * (np.pi / 6)
    scale = torch.exp((torch.rand(n, generator=gen) - 0.5) * 2 * np.log(1.25))
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, *img.shape[1:]], align_corners=False)
    both = torch.stack([img + 1024.0, cand.float()], 1)  # zero padding = air / no candidate
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0] - 1024.0, out[:, 1] > 0.99


def train(steps: int, batch: int = 24) -> tuple[TinyUNet, dict[str, Any]]:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)
    hu, spacing = load_cranium()
    train_idx, _ = split_slices(hu.shape[0])
    slices = _resample_slices(hu[train_idx], spacing)
    cands = (
        _resample_slices(intracranial_candidates(hu[train_idx], spacing).astype(np.float32), spacing) > 0.5
    )
    model = TinyUNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    start = time.monotonic()
    plane = (1.0, TRAIN_SPACING, TRAIN_SPACING)
    losses = []
    for step in range(steps):
        pick = torch.randint(len(train_idx), (batch,), generator=gen)
        warped, warped_cands = _augment(slices[pick], cands[pick], gen)
        # Random CROP x CROP patches: cheaper steps; the network is fully convolutional.
        oy, ox = rng.integers(0, warped.shape[1] - CROP + 1), rng.integers(0, warped.shape[2] - CROP + 1)
        imgs = np.ascontiguousarray(warped[:, oy : oy + CROP, ox : ox + CROP].numpy())
        cand_np = np.ascontiguousarray(warped_cands[:, oy : oy + CROP, ox : ox + CROP].numpy())
        masks = np.zeros(imgs.shape, dtype=np.float32)
        for i in range(batch):
            if rng.random() < 0.5:
                painted = add_lesion(imgs[i : i + 1], plane, rng, cand_np[i : i + 1])
                if painted is not None:
                    imgs[i : i + 1], masks[i : i + 1] = painted[0], painted[1]
            imgs[i] += rng.normal(0, rng.uniform(0, 6)) + rng.normal(0, rng.uniform(0, 5), imgs[i].shape)
        x = windows(torch.from_numpy(imgs))
        y = torch.from_numpy(masks)[:, None]
        logits = model(x)
        prob = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(3.0))
        inter = (prob * y).sum()
        dice = 1 - (2 * inter + 1) / (prob.sum() + y.sum() + 1)
        loss = bce + dice
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            print(
                f"step {step:5d} loss {np.mean(losses[-100:]):.4f} {time.monotonic() - start:.0f}s",
                flush=True,
            )
    info = {
        "steps": steps,
        "batch": batch,
        "train_slices": len(train_idx),
        "seconds": round(time.monotonic() - start, 1),
        "final_loss": round(float(np.mean(losses[-100:])), 4),
        "threads": torch.get_num_threads(),
    }
    return model.eval(), info


# --- evaluation ----------------------------------------------------------------------------------


def auc(labels: npt.NDArray[np.bool_], scores: npt.NDArray[np.floating[Any]]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def evaluation_cases() -> list[dict[str, Any]]:
    """The held-out evaluation set, deterministic: 8-slice sub-series of the held-out blocks at
    native resolution; per sub-series 4 negatives (as is, LR flip, noise, both) and 4 positives."""
    hu, spacing = load_cranium()
    rng = np.random.default_rng(SEED + 1)
    cases: list[dict[str, Any]] = []
    for block in HELD_OUT:
        block_cands = intracranial_candidates(hu[block.start : block.stop], spacing)
        for first in range(block.start, block.stop - SUB_SERIES + 1, SUB_STRIDE):
            base = hu[first : first + SUB_SERIES]
            cands = block_cands[first - block.start : first - block.start + SUB_SERIES]
            for variant in range(4):
                img = base[:, :, ::-1] if variant & 1 else base
                img = img + (rng.normal(0, 4, img.shape).astype(np.float32) if variant & 2 else 0)
                cases.append(
                    {
                        "pixels": np.ascontiguousarray(img, dtype=np.float32),
                        "truth": None,
                        "first": first,
                        "clean": variant == 0,
                    }
                )
            made = 0
            while made < 4:
                painted = add_lesion(base, spacing, rng, cands)
                if painted is None:
                    break
                cases.append({"pixels": painted[0], "truth": painted[1], "first": first, "clean": False})
                made += 1
    return cases


def make_volume(pixels: npt.NDArray[np.float32], spacing: tuple[float, float, float], tag: str) -> Any:
    from dicomnode.domain import Volume

    n = pixels.shape[0]
    return Volume(
        pixels=pixels,
        spacing=spacing,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1",
        modality="CT",
        series_instance_uid=f"1.2.826.0.1.3680043.8.498.2.{tag}",
        study_instance_uid="1.2.826.0.1.3680043.8.498.3",
        headers=(),
        slice_positions=tuple(k * spacing[0] for k in range(n)),
    )


def ct_small_score(analyzer: Any) -> float:
    """Score on pydicom's CT_small.dcm (a real non-head CT slice): an out-of-distribution negative."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    sp = float(ds.PixelSpacing[0])
    pred = analyzer.predict(make_volume(hu[None], (float(ds.SliceThickness), sp, sp), "ctsmall"))
    return float(pred.slice_scores.max())


def evaluate(model_dir: Path = MODEL_DIR) -> dict[str, Any]:
    """Run the packaged model through the runtime on the held-out set; metrics as in eval.json."""
    from dicomnode.domain import FindingsStatus
    from dicomnode.models.torch_runtime import load_model

    analyzer = load_model(model_dir, "cpu")
    threshold = analyzer.manifest.output.labels[0].threshold
    _, spacing = load_cranium()
    series_labels: list[bool] = []
    slice_labels: list[bool] = []
    series_scores: list[float] = []
    slice_scores: list[float] = []
    dices: list[float] = []
    clean_slice_scores: list[float] = []
    negative_series_slice_scores: list[float] = []
    present_ok = 0
    for i, case in enumerate(evaluation_cases()):
        volume = make_volume(case["pixels"], spacing, str(i))
        findings = analyzer.analyze(volume)
        assert findings.status is FindingsStatus.COMPLETE, findings.error
        pred = analyzer.predict(volume)
        truth = case["truth"]
        positive = truth is not None
        score = float(pred.slice_scores[:, 0].max())
        series_labels.append(positive)
        series_scores.append(score)
        present_ok += int(findings.findings[0].present == (score >= threshold))
        slice_scores += pred.slice_scores[:, 0].tolist()
        slice_labels += truth.any(axis=(1, 2)).tolist() if positive else [False] * volume.pixels.shape[0]
        if case["clean"]:
            clean_slice_scores += pred.slice_scores[:, 0].tolist()
        if not positive:
            negative_series_slice_scores += pred.slice_scores[:, 0].tolist()
        if positive:
            assert pred.masks is not None
            m = pred.masks[0]
            dices.append(2 * float((m & truth).sum()) / max(1.0, float(m.sum() + truth.sum())))
    s_lab, s_sc = np.array(series_labels), np.array(series_scores)
    l_lab, l_sc = np.array(slice_labels), np.array(slice_scores)
    clean = np.array(sorted(set(clean_slice_scores)))  # sub-series overlap: count each real slice once
    _, held = split_slices(load_cranium()[0].shape[0])
    return {
        "not_for_clinical_use": True,
        "threshold": threshold,
        "series": {
            "n_positive": int(s_lab.sum()),
            "n_negative": int((~s_lab).sum()),
            "auc": round(auc(s_lab, s_sc), 4),
            "sensitivity": round(float((s_sc[s_lab] >= threshold).mean()), 4),
            "specificity": round(float((s_sc[~s_lab] < threshold).mean()), 4),
        },
        "slice": {
            "n_positive": int(l_lab.sum()),
            "n_negative": int((~l_lab).sum()),
            "auc": round(auc(l_lab, l_sc), 4),
        },
        "dice": {"mean": round(float(np.mean(dices)), 4), "median": round(float(np.median(dices)), 4)},
        "real_normal_slices": {
            "n": len(held),
            "specificity": round(float((clean < threshold).mean()), 4) if clean.size else None,
            "max_score": round(float(clean.max()), 4),
            "note": "unmodified held-out slices of the one real head CT (invesalius-examples Cranium)",
        },
        "negative_series_slices": {
            "n": len(negative_series_slice_scores),
            "specificity": round(float((np.array(negative_series_slice_scores) < threshold).mean()), 4),
            "note": "every slice of the negative series: as is, mirrored, with 4 HU noise, both "
            "(overlapping sub-series count a slice more than once)",
        },
        "ct_small_score": round(ct_small_score(analyzer), 4),
        "present_consistent": present_ok == len(series_labels),
    }


# --- packaging -----------------------------------------------------------------------------------


def save_model(model: TinyUNet, out: Path) -> str:
    """Script, freeze-free save (keeps BatchNorm in eval mode) and return the sha256 of model.pt."""
    out.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(model.eval())
    path = out / "model.pt"
    torch.jit.save(scripted, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path, sha256: str) -> None:
    text = (out / "manifest.toml").read_text(encoding="utf-8")
    lines = [
        f'model_sha256 = "{sha256}"' if line.startswith("model_sha256") else line
        for line in text.splitlines()
    ]
    (out / "manifest.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="train the demo hyperdense model (NOT FOR CLINICAL USE)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    # One thread: bit-for-bit reproducible, and faster than two on a shared 2-core machine.
    torch.set_num_threads(1)
    if not args.eval_only:
        model, info = train(args.steps)
        sha = save_model(model, args.out)
        write_manifest(args.out, sha)
        (args.out / "train.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(info))
    metrics = evaluate(args.out)
    (args.out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
