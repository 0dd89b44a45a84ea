"""Inference time and peak memory of the shipped demo model (NOT FOR CLINICAL USE) on CPU.

Case: a 200-slice 512x512 head-like CT (synthetic: air, a 7 mm skull at 1000 HU, brain at 35 HU,
10 HU noise, 0.45 mm pixels as in a typical head CT), run through ``TorchAnalyzer.analyze`` as a
worker would. Torch allocates outside tracemalloc, so peak memory is the growth of the process's
peak RSS (``ru_maxrss``) during the call, measured in a fresh child process per case so earlier
cases cannot hide it; the volume size is printed beside it. The streaming bound is one batch of
float tensors plus the outputs (a boolean mask per label and a score per slice).

Usage: ``nice -n 10 python bench/bench_models.py [--threads 2] [--slices 200]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def head_phantom(slices: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    r = np.hypot((y - size / 2) / (0.42 * size), (x - size / 2) / (0.36 * size))
    plane = np.where(r < 1.0, 1000.0, -1000.0).astype(np.float32)
    plane[r < 1.0 - 7.0 / (0.36 * size * 0.45)] = 35.0
    volume = np.empty((slices, size, size), dtype=np.float32)
    for k in range(slices):
        volume[k] = plane + rng.normal(0.0, 10.0, (size, size)).astype(np.float32)
    return volume


def _child(slices: int, size: int, threads: int, batch: int) -> dict[str, float]:
    import torch

    from dicomnode.domain import FindingsStatus, Volume
    from dicomnode.models.torch_runtime import SHIPPED_DIR, TorchAnalyzer, load_model

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", DeprecationWarning)
    analyzer = load_model(SHIPPED_DIR / "demo_hyperdense", "cpu")
    if batch:
        manifest = analyzer.manifest.model_copy(
            update={"input": analyzer.manifest.input.model_copy(update={"batch_size": batch})}
        )
        analyzer = TorchAnalyzer(manifest, analyzer._module, "cpu")
    pixels = head_phantom(slices, size)
    volume = Volume(
        pixels=pixels,
        spacing=(1.0, 0.45, 0.45),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
        frame_of_reference_uid="1.2.3",
        modality="CT",
        series_instance_uid="1.2.3.4",
        study_instance_uid="1.2.3.5",
        headers=(),
    )
    analyzer.analyze(Volume(**{**volume.__dict__, "pixels": pixels[:2].copy()}))  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    findings = analyzer.analyze(volume)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert findings.status is FindingsStatus.COMPLETE, findings.error
    return {
        "seconds": elapsed,
        "peak_growth_mib": (after - before) / 1024,
        "volume_mib": pixels.nbytes / 2**20,
        "batch": analyzer.manifest.input.batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child >= 0:
        print(json.dumps(_child(args.slices, args.size, args.threads, args.child)))
        return 0
    print(f"demo-hyperdense on CPU, {args.threads} thread(s), {args.slices}x{args.size}x{args.size} CT")
    print("| batch | analyze s | s/slice | peak RSS growth MiB | volume MiB |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (0, 64):  # 0: the manifest's batch size; 64: a larger batch for comparison
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(batch),
                "--threads",
                str(args.threads),
                "--slices",
                str(args.slices),
                "--size",
                str(args.size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {r['batch']} | {r['seconds']:.1f} | {r['seconds'] / args.slices:.3f} "
            f"| {r['peak_growth_mib']:.0f} | {r['volume_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
