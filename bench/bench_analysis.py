"""Time and peak memory of the classical QC analyzers on CPU.

Cases: a 200-slice 512x512 CT volume (qc-ct), a 2048x2048 radiograph (qc-xr) and a 60-slice 256x256
MR volume (qc-mr), all synthetic (tests/phantoms.py). Peak memory is the tracemalloc peak of the
``analyze`` call (numpy reports its buffers to tracemalloc), i.e. what analysis allocates on top of
the volume it is given; the volume size is printed beside it. Each case runs ``--repeat`` times and
the median time is reported.

Usage: ``nice -n 10 python bench/bench_analysis.py [--repeat 3]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import phantoms as P  # noqa: E402

from dicomnode.domain import Volume  # noqa: E402
from dicomnode.models import qc  # noqa: E402


def _cases() -> list[tuple[str, Callable[[], Volume], qc.QcAnalyzer]]:
    return [
        (
            "qc-ct 200x512x512",
            lambda: P.volume(P.ct_phantom(shape=(200, 512, 512), seed=1), "CT", spacing=(1.25, 0.7, 0.7)),
            qc.CtQc(),
        ),
        (
            "qc-xr 2048x2048",
            lambda: P.volume(P.xr_phantom(shape=(2048, 2048), seed=1)[None], "DX", spacing=(1, 0.15, 0.15)),
            qc.XrQc(),
        ),
        (
            "qc-mr 60x256x256",
            lambda: P.volume(
                P.mr_phantom(shape=(60, 256, 256), seed=1), "MR", InPlanePhaseEncodingDirection="COL"
            ),
            qc.MrQc(),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print("| case | volume MiB | analysis s (median) | analysis peak MiB | status |")
    print("|---|---:|---:|---:|---|")
    for label, make, analyzer in _cases():
        volume = make()
        times, peaks = [], []
        status = ""
        for _ in range(args.repeat):
            tracemalloc.start()
            start = time.perf_counter()
            result = analyzer.analyze(volume)
            times.append(time.perf_counter() - start)
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
            status = result.status.value
        size = volume.pixels.nbytes / 2**20
        print(f"| {label} | {size:.0f} | {statistics.median(times):.2f} | {max(peaks):.0f} | {status} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess max RSS {rss:.0f} MiB (includes phantom generation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
