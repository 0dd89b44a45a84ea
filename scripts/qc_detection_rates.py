"""Detection and false-positive rates of the classical QC analyzers, on synthetic phantoms and on
real anatomy.

Phantoms: for every seed, a clean phantom and one phantom per (defect, severity) are generated with
``tests/phantoms.py`` and analysed with default :class:`~dicomnode.models.qc.QcSettings`.

Real anatomy: the head CT of Debian ``invesalius-examples`` (blocks of 16 consecutive slices at
different heights, one per seed) and the real radiographs of pydicom-data and deid-data, with the
same defects injected (CT motion is simulated in the projections, see ``phantoms.motion_artifact``).

The detection rate is the fraction of defective inputs whose target aspect is flagged; the
false-positive rate is the fraction of clean inputs on which an aspect is flagged.

Usage: ``python scripts/qc_detection_rates.py [--seeds 20] [--real-seeds 8]`` (Markdown tables).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _ct_motion(seed: int, shift_mm: float) -> Volume:
    hu = _ct(seed)
    return P.volume(P.add_motion(hu, range(5, 11), shift_mm, 0.8, seed=seed), "CT")


def _ct_jump(seed: int, shift_mm: float) -> Volume:
    angle = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    shift = (shift_mm * np.sin(angle), shift_mm * np.cos(angle))
    return P.volume(P.shift_slices(_ct(seed), 8, shift, 0.8), "CT")


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
        ("qc-ct", f"motion {m:g} mm on 6 of 16 slices", qc.MOTION_ARTIFACT, lambda s, m=m: _ct_motion(s, m))
        for m in (1.0, 2.0, 4.0)
    ],
    *[
        ("qc-ct", f"jump of {m:g} mm between slices", qc.MOTION_ARTIFACT, lambda s, m=m: _ct_jump(s, m))
        for m in (2.0, 3.0, 5.0)
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


# --- real anatomy --------------------------------------------------------------------------------


def _head_block(seed: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """16 consecutive slices of the real head CT, starting at a height that depends on the seed."""
    hu, spacing = P.cranium()
    first = 4 + (11 * seed) % (hu.shape[0] - 24)
    return hu[first : first + 16].copy(), spacing


def _real_ct(seed: int, inject: Callable[[np.ndarray, tuple[float, float, float], int], np.ndarray]) -> Volume:
    block, spacing = _head_block(seed)
    return P.volume(inject(block, spacing, seed), "CT", spacing=spacing)


def _real_missing(seed: int, count: int) -> Volume:
    block, spacing = _head_block(seed)
    drop = list(range(6, 6 + count))
    keep = [k for k in range(block.shape[0]) if k not in drop]
    return P.volume(block[keep], "CT", spacing=spacing, positions=[k * spacing[0] for k in keep])


def _jump(block: np.ndarray, spacing: tuple[float, float, float], seed: int, mm: float) -> np.ndarray:
    angle = np.random.default_rng(seed).uniform(0, 2 * np.pi)
    return P.shift_slices(block, 8, (mm * np.sin(angle), mm * np.cos(angle)), spacing[1])


REAL_RADIOGRAPHS = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm", "cat.dcm")


def _radiograph(name: str) -> Volume:
    from pydicom.data import get_testdata_file

    from dicomnode.imaging import load_volume

    if name == "cat.dcm":
        import deid_data

        path = Path(deid_data.__file__).parent / "data" / "animals" / "cat.dcm"
    else:
        path = Path(str(get_testdata_file(name)))
    return load_volume([path])


def _blurred(volume: Volume, sigma: float) -> Volume:
    from dataclasses import replace

    return replace(volume, pixels=P.blur(volume.pixels, sigma))


RealCase = tuple[str, str, Code, Callable[[int], Volume]]

REAL_CT_CASES: list[RealCase] = [
    *[
        ("qc-ct", f"motion {m:g} mm on 6 of 16 slices", qc.MOTION_ARTIFACT,
         lambda s, m=m: _real_ct(s, lambda b, sp, seed: P.add_motion(b, range(5, 11), m, sp[1], seed=seed)))
        for m in (1.0, 2.0, 4.0)
    ],
    *[
        ("qc-ct", f"jump of {m:g} mm between slices", qc.MOTION_ARTIFACT,
         lambda s, m=m: _real_ct(s, lambda b, sp, seed: _jump(b, sp, seed, m)))
        for m in (2.0, 3.0, 5.0)
    ],
    *[
        ("qc-ct", f"HU offset {d:+g} HU", qc.CT_NUMBER_CALIBRATION,
         lambda s, d=d: _real_ct(s, lambda b, sp, seed: b + np.float32(d)))
        for d in (40.0, 100.0, 150.0, -200.0)
    ],
    *[
        ("qc-ct", f"added noise SD {n:g} HU", qc.IMAGE_NOISE,
         lambda s, n=n: _real_ct(s, lambda b, sp, seed: P.add_noise(b, n, seed=seed)))
        for n in (15.0, 25.0, 40.0)
    ],
    *[("qc-ct", f"{k} missing slice(s)", qc.SLICE_COVERAGE, lambda s, k=k: _real_missing(s, k)) for k in (1, 2)],
    ("qc-ct", "metal, streaks 400 HU", qc.METAL_ARTIFACT,
     lambda s: _real_ct(s, lambda b, sp, seed: P.add_metal(b, seed=seed, streak_hu=400.0))),
]

REAL_XR_CASES: list[tuple[str, str, Code, Callable[[str], Volume]]] = [
    *[("qc-xr", f"Gaussian blur sigma {b:g} px", qc.SHARPNESS, lambda n, b=b: _blurred(_radiograph(n), b))
      for b in (1.0, 2.0, 3.0)],
]


def real_anatomy(analyzers: dict[str, Any], seeds: range) -> None:
    print(f"\nDetection rate on real anatomy: the invesalius-examples head CT ({len(seeds)} blocks of 16 slices)"
          f" and {len(REAL_RADIOGRAPHS)} real radiographs ({', '.join(REAL_RADIOGRAPHS)})\n")
    print("| analyzer | injected defect | aspect | detected | other aspects flagged |")
    print("|---|---|---|---:|---|")
    rows: list[tuple[str, str, Code, list[Volume]]] = []
    for name, label, aspect, make in REAL_CT_CASES:
        rows.append((name, label, aspect, [make(seed) for seed in seeds]))
    for name, label, aspect, make_xr in REAL_XR_CASES:
        rows.append((name, label, aspect, [make_xr(image) for image in REAL_RADIOGRAPHS]))
    for name, label, aspect, volumes in rows:
        hits = 0
        others: dict[str, int] = defaultdict(int)
        for volume in volumes:
            flagged = _flagged(analyzers[name].analyze(volume))
            hits += aspect in flagged
            for other in flagged - {aspect}:
                others[other.meaning] += 1
        other_text = ", ".join(f"{k} {v}/{len(volumes)}" for k, v in sorted(others.items())) or "-"
        print(f"| {name} | {label} | {aspect.meaning} | {hits}/{len(volumes)} | {other_text} |")

    clean: list[tuple[str, str, Volume]] = [("qc-ct", f"head CT block {s}", _real_ct(s, lambda b, sp, seed: b))
                                            for s in seeds]
    hu, spacing = P.cranium()
    clean.append(("qc-ct", "whole head CT (108 slices)", P.volume(hu, "CT", spacing=spacing)))
    thick = np.stack([hu[i : i + 3].mean(0) for i in range(0, hu.shape[0] - 2, 3)])
    clean.append(("qc-ct", "whole head CT as 4.5 mm slices", P.volume(thick, "CT", spacing=(4.5, *spacing[1:]))))
    clean += [("qc-xr", image, _radiograph(image)) for image in REAL_RADIOGRAPHS]
    print("\nFlags on the clean real scans\n")
    print("| analyzer | scan | aspects flagged |")
    print("|---|---|---|")
    for name, label, volume in clean:
        flagged = sorted(c.meaning for c in _flagged(analyzers[name].analyze(volume)))
        print(f"| {name} | {label} | {', '.join(flagged) or 'none'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="phantoms per case (default 20)")
    parser.add_argument("--real-seeds", type=int, default=8, help="real head CT blocks per case (default 8)")
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
    if args.real_seeds > 0:
        real_anatomy(analyzers, range(args.real_seeds))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
