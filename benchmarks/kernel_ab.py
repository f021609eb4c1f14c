"""Two versions of the search kernel (`dashboard/scoring/kernel.c`) timed against each other in one process.

    git show HEAD~1:dashboard/scoring/kernel.c > /tmp/before.c
    .venv/bin/python benchmarks/kernel_ab.py /tmp/before.c dashboard/scoring/kernel.c
    .venv/bin/python benchmarks/kernel_ab.py /tmp/before.c dashboard/scoring/kernel.c --path avx2 \
        --grid 14 14 --channels 112

On a shared VM the memory bandwidth of two runs minutes apart can differ by 1.5x, more than most kernel changes
are worth. Here both builds are loaded side by side and every query is run by both, in alternating order, on the
same arrays in RAM: the exact scan over seeded bfloat16 features and the first stage over seeded 4-bit codes, for
1-cell, 3x3 and whole-grid masks. It prints each median and the ratio B / A (below 1: B is faster), and checks that
both give the same scores (to 1e-5: a change may reorder a float sum).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_builder.cache_format import encode_features  # noqa: E402
from dashboard import two_tier  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring import code_query  # noqa: E402
from dashboard.scoring import kernel as kernel_module  # noqa: E402
from dashboard.scoring.kernel import VARIANTS, KernelQuery, KernelUnavailable, path_flags  # noqa: E402
from codes_kernel import random_index  # noqa: E402


def load(source: Path, variant: str) -> kernel_module.SearchKernel:
    """The kernel built from `source` (cached by its content like the app's own build); the module is left
    building its own source again."""
    shipped = kernel_module.SOURCE
    kernel_module.SOURCE = source
    kernel_module._LOADED.pop(variant, None)
    try:
        return kernel_module.load_kernel(variant)
    finally:
        kernel_module.SOURCE = shipped
        kernel_module._LOADED.pop(variant, None)


def best_path() -> str:
    for variant in VARIANTS:
        try:
            kernel_module.load_kernel(variant)
            return variant
        except KernelUnavailable:
            continue
    sys.exit("no path of the kernel builds here")


def timed_pairs(kernels, run, queries: list, reps_skipped: int = 1) -> tuple[float, float, float]:
    """Median seconds of A and B over `queries` (each run by both, the order alternating), and the largest
    difference between their scores."""
    times: list[list[float]] = [[], []]
    largest = 0.0
    for q, query in enumerate(queries):
        scores = [None, None]
        for which in ((0, 1) if q % 2 else (1, 0)):
            started = time.perf_counter()
            scores[which] = run(kernels[which], query)
            if q >= reps_skipped:
                times[which].append(time.perf_counter() - started)
        largest = max(largest, float(np.max(np.abs(scores[0] - scores[1]))))
    return float(np.median(times[0])), float(np.median(times[1])), largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="kernel source A (e.g. the previous version)")
    parser.add_argument("b", type=Path, help="kernel source B")
    parser.add_argument("--path", choices=VARIANTS, help="kernel path (default: the best this CPU runs)")
    parser.add_argument("--images", type=int, default=50_000, help="images of the exact scan (default 50,000)")
    parser.add_argument("--code-images", type=int, default=500_000,
                        help="images of the first stage (default 500,000)")
    parser.add_argument("--grid", type=int, nargs=2, default=[7, 7])
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--dims", type=int, default=128, help="first-stage dimensions (a multiple of 32)")
    parser.add_argument("--queries", type=int, default=9, help="queries per mask (the first untimed)")
    args = parser.parse_args()
    for source in (args.a, args.b):
        if not source.is_file():
            sys.exit(f"{source}: no such kernel source")
    variant = args.path or best_path()
    kernels = [load(args.a.resolve(), variant), load(args.b.resolve(), variant)]
    grid, channels = tuple(args.grid), args.channels
    rng = np.random.default_rng(0)
    features = np.maximum(rng.standard_normal((args.images, *grid, channels), dtype=np.float32), 0)
    bits, sqnorms = encode_features(features)
    del features
    index = random_index(args.code_images, grid, channels, args.dims)
    code_norms = rng.uniform(1, 2, size=(args.code_images, *grid)).astype(np.float32)
    flags = path_flags()
    print(f"CPU: {os.cpu_count()} cores, flags {flags}; load {os.getloadavg()[0]:.2f}; path {variant}; "
          f"A {args.a}, B {args.b}")
    print(f"exact scan: {args.images:,} images {grid[0]}x{grid[1]}x{channels} ({bits.nbytes / 1e9:.2f} GB); "
          f"first stage: {args.code_images:,} images, {args.dims} dims ({index.codes.nbytes / 1e9:.2f} GB); in RAM")
    features_view = torch.from_numpy(bits).view(torch.bfloat16)

    def exact(kernel, query):
        return kernel.score(query, features_view, sqnorms, None)[0]

    def first_stage(kernel, query):
        return kernel.score_codes(query, index.codes, code_norms, None)[0]

    for mask_name, mask in two_tier.mask_shapes(grid).items():
        regions = [RegionQuery.from_grid_mask(rng.standard_normal((*grid, channels)).astype(np.float32), mask)
                   for _ in range(args.queries)]
        exact_queries = [KernelQuery.build(r.features, r.weights, r.grid, r.norm) for r in regions]
        code_queries = [code_query(index, region, kernels[0].code_chunk_bytes) for region in regions]
        for stage, run, queries in (("exact", exact, exact_queries), ("first stage", first_stage, code_queries)):
            a, b, largest = timed_pairs(kernels, run, queries)
            same = "same scores" if largest <= 1e-5 else f"SCORES DIFFER by up to {largest:.2g}"
            print(f"{mask_name:>7} {stage:>11}: A {a * 1e3:7.1f} ms | B {b * 1e3:7.1f} ms | B/A {b / a:.2f} "
                  f"({len(queries) - 1} pairs; {same})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
