"""Would a dimension cascade speed up the first stage? Measured before building one, on the 1M-image cache.

The idea (issue 11): score every image on the index's first 64 dimensions only, kept as their own plane (half
the bytes), then the best share of them on all 128, then the exact rerank as today. This emulates it without a
new index format: the first 64 dimensions are copied into a contiguous plane in RAM (exactly what a split index
would hold), and the three passes are timed side by side with today's single 128-dimension pass, on the same
queries, in one process. It prints each pass's median time and how much of today's shortlist the cascade keeps.

Needs the 7x7x320 cache of `benchmarks/scale.py` (run that first; ~35 GB of disk).

    .venv/bin/python benchmarks/cascade.py [--share 0.1] [--queries 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_builder import cache_format as fmt  # noqa: E402
from dashboard import scoring, two_tier  # noqa: E402
from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring.kernel import path_flags  # noqa: E402

CACHE = ROOT / "benchmarks" / "out" / "scale" / "scale-synthetic-v1-seed0_7x7x320_n1000000"
PLANE_DIMS = 64


def first_plane(index: fmt.FirstStageIndex, dims: int = PLANE_DIMS) -> fmt.FirstStageIndex:
    """The index's first `dims` dimensions as an index of their own, its codes contiguous in RAM."""
    return replace(index, dims=dims, basis=np.ascontiguousarray(index.basis[:, :dims]),
                   steps=index.steps[:dims].copy(), means=index.means[:dims].copy(),
                   codes=np.ascontiguousarray(index.codes[..., :dims // 2]))


def best(scores: scoring.WindowScores, count: int) -> np.ndarray:
    return np.sort(scores.ids[np.argpartition(-scores.scores, count - 1)[:count]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.1, help="share of the images the 128-dim pass rescores")
    parser.add_argument("--queries", type=int, default=8, help="queries per mask size (after one warm-up)")
    args = parser.parse_args()
    if not (CACHE / fmt.MANIFEST_FILE).is_file():
        sys.exit(f"{CACHE} is missing: run `benchmarks/scale.py --only 7x7x320` first")
    cache = FeatureCache.open(CACHE)
    full = cache.first_stage()
    started = time.perf_counter()
    plane = first_plane(full)
    flags = path_flags()
    depth = two_tier.rerank_depth(cache.size, 10)
    candidates = max(depth, int(args.share * cache.size))
    print(f"CPU flags {flags}; {cache.size:,} images; index {full.codes.nbytes / 1e9:.2f} GB ({full.dims} dims), "
          f"plane {plane.codes.nbytes / 1e9:.2f} GB ({plane.dims} dims, copied in {time.perf_counter() - started:.0f}"
          f" s); the 128-dim pass rescores {candidates:,}, the rerank takes {depth:,}", flush=True)
    rng = np.random.default_rng(0)
    for name, mask in two_tier.mask_shapes(cache.grid).items():
        rows = []
        for number in range(args.queries + 1):
            query = RegionQuery.from_grid_mask(cache.image_features(int(rng.integers(cache.size))), mask)
            t0 = time.perf_counter()
            today = scoring.score_codes(full, cache.sqnorms, query)
            t1 = time.perf_counter()
            coarse = scoring.score_codes(plane, cache.sqnorms, query)
            t2 = time.perf_counter()
            fine = scoring.score_codes(full, cache.sqnorms, query, best(coarse, candidates))
            t3 = time.perf_counter()
            kept = len(np.intersect1d(best(fine, depth), best(today, depth))) / depth
            if number:  # the first query warms up
                rows.append((t1 - t0, t2 - t1, t3 - t2, kept))
        today_s, coarse_s, fine_s, kept = np.median(np.array(rows), axis=0)
        print(f"{name:>7}: today's 128-dim pass {today_s * 1e3:4.0f} ms | cascade: 64 dims {coarse_s * 1e3:4.0f} ms "
              f"+ 128 dims on {args.share:.0%} {fine_s * 1e3:3.0f} ms = {(coarse_s + fine_s) * 1e3:4.0f} ms "
              f"({(coarse_s + fine_s) / today_s:.2f}x today) | keeps {kept:.1%} of today's shortlist", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
