"""Soak: many random searches from 8 threads against the demo cache, as concurrent dashboard sessions would.

    .venv/bin/python benchmarks/soak.py [--searches 500] [--threads 8] [--cache caches/demo]

Random regions (boxes and soft masks), random filters (sometimes none, sometimes matching nothing), random k
and best-per-group. Prints errors (must be 0; an empty result for a filter that matches nothing is not an
error), p50/p95 latency, throughput and peak RSS; then the RSS growth of 1 vs 8 threads searching the same
memory-mapped cache (the cache's pages are shared, so 8 sessions must not cost 8 caches).
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.metadata import MetadataFilter  # noqa: E402
from dashboard.search import RegionQuery, search_cache  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_search(cache: FeatureCache, rng: np.random.Generator, values: dict[str, list]) -> dict:
    h, w, _ = cache.grid
    weights = np.zeros((h, w), dtype=np.float32)
    y0, x0 = rng.integers(h), rng.integers(w)
    y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
    weights[y0:y1, x0:x1] = 1.0 if rng.random() < 0.5 else rng.uniform(0.1, 1.0, size=(y1 - y0, x1 - x0))
    roll = rng.random()
    if roll < 0.4 or not values:
        flt = None
    elif roll < 0.9:
        column = rng.choice(list(values))
        flt = MetadataFilter(equals={column: list(rng.choice(values[column], size=2))})
    else:
        flt = MetadataFilter(equals={"path": ["no such image"]})  # matches nothing: an empty result
    return dict(image_id=int(rng.integers(cache.size)), weights=weights, k=int(rng.integers(1, 101)), flt=flt,
                per_group="location" if "location" in values and rng.random() < 0.3 else None)


def run_one(cache: FeatureCache, spec: dict) -> float:
    started = time.perf_counter()
    query = RegionQuery.from_grid_mask(cache.image_features(spec["image_id"]), spec["weights"])
    search_cache(cache, query, k=spec["k"], flt=spec["flt"], per_group=spec["per_group"],
                 exclude_id=spec["image_id"])
    return time.perf_counter() - started


def soak(cache: FeatureCache, searches: int, threads: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = {c: [v for v in cache.metadata.distinct_values(c) if v is not None]
              for c in ("domain", "location", "species") if c in cache.metadata.columns}
    specs = [random_search(cache, rng, values) for _ in range(searches)]
    errors: list[str] = []
    lock = threading.Lock()

    def guarded(spec: dict) -> float | None:
        try:
            return run_one(cache, spec)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
            return None

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        latencies = [t for t in pool.map(guarded, specs) if t is not None]
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    print(f"{searches} searches from {threads} threads in {wall:.1f} s ({searches / wall:.1f} searches/s)")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    if len(ms):
        print(f"latency per search: p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, "
              f"max {ms.max():.1f} ms")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def sessions_rss(cache: FeatureCache, seed: int) -> None:
    """RSS after full-cache searches from 1, then 8 threads: growth should be ~one cache, not eight."""
    rng = np.random.default_rng(seed)
    size_mb = cache.features_bits.nbytes / 2**20
    spec = dict(image_id=0, weights=np.ones(cache.grid[:2], dtype=np.float32), k=20, flt=None, per_group=None)
    before = rss_mb()
    run_one(cache, spec)
    one = rss_mb()
    specs = [dict(spec, image_id=int(rng.integers(cache.size))) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: run_one(cache, s), specs))
    eight = rss_mb()
    print(f"feature array {size_mb:.0f} MB (memory-mapped); RSS {before:.0f} MB before, {one:.0f} MB after one "
          f"session's search, {eight:.0f} MB after 8 concurrent sessions' searches "
          f"(+{eight - one:.0f} MB for 7 more sessions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("caches/demo"))
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.cache / "manifest.json").exists():
        from cache_builder.build import BuildOptions, build_cache
        from cache_builder.sources import parse_source

        print(f"building the demo cache in {args.cache} ...")
        build_cache([parse_source("demo")], args.cache, BuildOptions(model="efficientnet_lite0"))
    cache = FeatureCache.open(args.cache)
    print(f"cache {args.cache}: {cache.size:,} images, grid {cache.grid}")
    sessions_rss(cache, args.seed)
    soak(cache, args.searches, args.threads, args.seed)


if __name__ == "__main__":
    main()
