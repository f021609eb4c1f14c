"""The first stage's kernel (`vfs_score_codes`) on every native path of this CPU, side by side with a plain read of
the same bytes: how far from memory speed the 4-bit codes are scored.

    .venv/bin/python benchmarks/codes_kernel.py                       # 200,000 images, 7x7 cells, 128 dims
    .venv/bin/python benchmarks/codes_kernel.py --images 100000 --grid 14 14 --dims 64

Seeded random codes held in RAM (no disk), every image scored, 2 warm-up and 7 timed queries per path and mask
size (1 cell, 3x3, the whole grid), the read of the codes timed between them. The two-tier search at scale, with
its rerank from disk, is `benchmarks/scale.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_builder import cache_format as fmt  # noqa: E402
from dashboard import scoring, two_tier  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring.kernel import load_kernel, path_flags  # noqa: E402


def random_index(n: int, grid: tuple[int, int], channels: int, dims: int, seed: int = 0) -> fmt.FirstStageIndex:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((channels, dims)))[0].astype(np.float32)
    codes = rng.integers(0, 256, size=(n, *grid, dims // 2), dtype=np.uint8)
    return fmt.FirstStageIndex(dims=dims, basis=basis, steps=np.full(dims, 0.1, np.float32),
                               means=np.zeros(dims, np.float32), codes=codes, energy=1.0, built_s=0.0, info={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--grid", type=int, nargs=2, default=[7, 7])
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--dims", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    grid = tuple(args.grid)
    index = random_index(args.images, grid, args.channels, args.dims)
    sqnorms = np.random.default_rng(1).uniform(1, 2, size=(args.images, *grid)).astype(np.float32)
    flags = path_flags()
    paths = [name for name in scoring.runnable_scorers() if name not in ("native", "torch")]
    reader = load_kernel(paths[-1])
    print(f"CPU: {os.cpu_count()} cores, flags {flags}; load {os.getloadavg()[0]:.2f}; {args.images:,} images, "
          f"{grid[0]}x{grid[1]} cells, {args.dims} dims: {index.codes.nbytes / 1e9:.2f} GB of codes in RAM")
    rng = np.random.default_rng(2)
    for mask_name, mask in two_tier.mask_shapes(grid).items():
        query = RegionQuery.from_grid_mask(rng.standard_normal((*grid, args.channels)).astype(np.float32), mask)
        times: dict[str, list[float]] = {name: [] for name in [*paths, "read"]}
        for rep in range(args.reps + 2):
            for name in times:
                started = time.perf_counter()
                if name == "read":
                    reader.read_bytes(index.codes)
                else:
                    scoring.score_codes(index, sqnorms, query, backend=name)
                if rep >= 2:
                    times[name].append(time.perf_counter() - started)
        read = float(np.median(times.pop("read")))
        print(f"{mask_name:>7}: read {read * 1e3:5.1f} ms | " + " | ".join(
            f"{name} {np.median(t) * 1e3:6.1f} ms ({np.median(t) / read:.2f}x)" for name, t in times.items()),
            flush=True)


if __name__ == "__main__":
    main()
