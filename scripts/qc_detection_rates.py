"""Detection and false-positive rates of the classical QC analyzers on synthetic phantoms.

For every seed, a clean phantom and one phantom per (defect, severity) are generated with
``tests/phantoms.py`` and analysed with default :class:`~dicomnode.models.qc.QcSettings`. The
detection rate is the fraction of defective phantoms whose target aspect is flagged; the
false-positive rate is the fraction of clean phantoms on which an aspect is flagged.

Usage: ``python scripts/qc_detection_rates.py [--seeds 20]`` (prints Markdown tables).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import phantoms as P  # noqa: E402

from dicomnode.domain import Code, Findings, Volume  # noqa: E402
from dicomnode.models import qc  # noqa: E402

CT_SHAPE = (16, 128, 128)
MR_SHAPE = (6, 128, 128)
XR_SHAPE = (768, 768)


def _ct(seed: int) -> np.ndarray:
    return P.ct_phantom(shape=CT_SHAPE, seed=seed)


def _ct_missing(seed: int, count: int) -> Volume:
    hu = _ct(seed)
    rng = np.random.default_rng(seed)
    drop = sorted(rng.choice(np.arange(2, CT_SHAPE[0] - 2), size=count, replace=False))
    positions = [i * 2.5 for i in range(CT_SHAPE[0]) if i not in drop]
    return P.volume(np.delete(hu, drop, axis=0), "CT", positions=positions)


def _xr(seed: int, **kwargs: float) -> Volume:
    image = P.xr_phantom(shape=XR_SHAPE, seed=seed, **kwargs)  # type: ignore[arg-type]
    return P.volume(image[None], "DX", spacing=(1.0, 0.15, 0.15))


def _xr_collimated(seed: int, band: float) -> Volume:
    image = P.xr_phantom(shape=XR_SHAPE, seed=seed)
    b = int(band * XR_SHAPE[0])
    image[:b, :] = image[-b:, :] = 3970.0
    image[:, :b] = image[:, -b:] = 3970.0
    return P.volume(image[None], "DX", spacing=(1.0, 0.15, 0.15))


def _mr(seed: int, **kwargs: float) -> Volume:
    pixels = P.mr_phantom(shape=MR_SHAPE, seed=seed, **kwargs)  # type: ignore[arg-type]
    return P.volume(pixels, "MR", InPlanePhaseEncodingDirection="COL")


Case = tuple[str, str, Code, Callable[[int], Volume]]

CASES: list[Case] = [
    *[
        (
            "qc-ct",
            f"HU offset {d:+g} HU",
            qc.CT_NUMBER_CALIBRATION,
            lambda s, d=d: P.volume(P.offset_calibration(_ct(s), d), "CT"),
        )
        for d in (40.0, 100.0, -200.0)
    ],
    *[
        (
            "qc-ct",
            f"added noise SD {n:g} HU",
            qc.IMAGE_NOISE,
            lambda s, n=n: P.volume(P.add_noise(_ct(s), n, seed=s), "CT"),
        )
        for n in (15.0, 25.0, 40.0)
    ],
    *[
        ("qc-ct", f"{k} missing slice(s)", qc.SLICE_COVERAGE, lambda s, k=k: _ct_missing(s, k))
        for k in (1, 2, 4)
    ],
    *[
        (
            "qc-ct",
            f"truncation zoom {z:g}",
            qc.FOV_TRUNCATION,
            lambda s, z=z: P.volume(P.truncate(_ct(s), z), "CT"),
        )
        for z in (1.15, 1.3, 1.6)
    ],
    *[
        (
            "qc-ct",
            f"metal, streaks {a:g} HU",
            qc.METAL_ARTIFACT,
            lambda s, a=a: P.volume(P.add_metal(_ct(s), seed=s, streak_hu=a), "CT"),
        )
        for a in (50.0, 150.0, 400.0)
    ],
    *[
        ("qc-mr", f"noise sigma {n:g}", qc.IMAGE_NOISE, lambda s, n=n: _mr(s, noise_sigma=n))
        for n in (60.0, 100.0, 150.0)
    ],
    *[
        ("qc-mr", f"motion ghosts, shift {g} px", qc.GHOST, lambda s, g=g: _mr(s, ghost_shift=g))
        for g in (1, 2, 4)
    ],
    *[
        ("qc-xr", f"blur sigma {b:g} px", qc.SHARPNESS, lambda s, b=b: _xr(s, blur_sigma=b))
        for b in (2.0, 4.0, 8.0)
    ],
    *[("qc-xr", f"noise {n:g}", qc.IMAGE_NOISE, lambda s, n=n: _xr(s, noise=n)) for n in (30.0, 50.0, 80.0)],
    *[
        ("qc-xr", f"exposure gain {g:g}", qc.DETECTOR_EXPOSURE, lambda s, g=g: _xr(s, exposure_gain=g))
        for g in (1.2, 1.5, 1.8)
    ],
    *[
        ("qc-xr", f"shutters {100 * b:g} % each side", qc.COLLIMATION, lambda s, b=b: _xr_collimated(s, b))
        for b in (0.15, 0.22, 0.3)
    ],
]

CLEAN: dict[str, Callable[[int], Volume]] = {
    "qc-ct": lambda s: P.volume(_ct(s), "CT"),
    "qc-mr": lambda s: _mr(s),
    "qc-xr": lambda s: _xr(s),
}


def _flagged(result: Findings) -> set[Code]:
    return {f.finding_type for f in result.findings if f.present and f.finding_type != qc.IMAGE_QUALITY}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="phantoms per case (default 20)")
    args = parser.parse_args(argv)
    analyzers = {a.name: a for a in (qc.CtQc(), qc.MrQc(), qc.XrQc())}
    seeds = range(args.seeds)
    start = time.perf_counter()

    false_positives: dict[str, dict[Code, int]] = defaultdict(lambda: defaultdict(int))
    aspects: dict[str, set[Code]] = defaultdict(set)
    for name, make in CLEAN.items():
        for seed in seeds:
            result = analyzers[name].analyze(make(seed))
            aspects[name] |= {f.finding_type for f in result.findings if f.finding_type != qc.IMAGE_QUALITY}
            for aspect in _flagged(result):
                false_positives[name][aspect] += 1

    print(f"Detection rate ({args.seeds} seeds per row, default QcSettings)\n")
    print("| analyzer | injected defect | aspect | detected | other aspects flagged |")
    print("|---|---|---|---:|---|")
    for name, label, aspect, make in CASES:
        hits = 0
        others: dict[str, int] = defaultdict(int)
        for seed in seeds:
            flagged = _flagged(analyzers[name].analyze(make(seed)))
            hits += aspect in flagged
            for other in flagged - {aspect}:
                others[other.meaning] += 1
        other_text = ", ".join(f"{k} {v}/{args.seeds}" for k, v in sorted(others.items())) or "-"
        print(f"| {name} | {label} | {aspect.meaning} | {100 * hits / args.seeds:.0f} % | {other_text} |")

    print(f"\nFalse-positive rate on clean phantoms ({args.seeds} seeds)\n")
    print("| analyzer | aspect | false positives |")
    print("|---|---|---:|")
    for name in CLEAN:
        for aspect in sorted(aspects[name], key=lambda c: c.meaning):
            rate = 100 * false_positives[name][aspect] / args.seeds
            print(f"| {name} | {aspect.meaning} | {rate:.0f} % |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
