"""Ray's cost on one machine: the builder single-process vs on Ray, and a search in-process vs fanned out to Ray
actors over the same 4 shards, measured side by side in one run.

    .venv/bin/python benchmarks/cluster.py [--images 900] [--search-images 100000] [--queries 15]

Build: the demo source at the model's own input size (EfficientNet-Lite0, 224x224, batch 32), from the call to
the complete manifest (model loading included, the local Ray instance already started), without the index.
Single process: `build_cache` with its default DataLoader workers; Ray: `build_cache_on_ray` with 1 and 2 model
actors (CPU), decoding in Ray Data tasks, 4 shards. Target: Ray's steady throughput (images per second between
the first and the last progress report, once everything runs) >= 80% of the single-process builder's.

Search: a seeded synthetic 100,000-image 7x7x320 cache written once as 4 shards under benchmarks/out/cluster/
(3.1 GB, reused) and held in the page cache. The same exact queries (1 cell, 3x3, whole grid) run through
`LocalShards` (this process, shard after shard) and `RayShards` (4 actors on a local Ray instance, every shard's
call in flight at once), alternating query by query. Printed: medians, and the fan-out overhead (Ray minus
local) in ms. Target: overhead <= 20 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local Ray instance on loopback only

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.build import BuildOptions, build_cache  # noqa: E402
from cache_builder.cluster import LOCAL, connect  # noqa: E402
from cache_builder.ray_build import build_cache_on_ray  # noqa: E402
from cache_builder.sources import SourceOptions, parse_source  # noqa: E402
from cache_builder.synthetic import write_array_cache  # noqa: E402
from dashboard.distributed import RayShards  # noqa: E402
from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring.kernel import path_flags  # noqa: E402
from dashboard.two_tier import mask_shapes  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "cluster"
GRID = (7, 7, 320)
SHARDS = 4


def build_throughput(images: int) -> None:
    """Each way of building `images` demo images: the throughput of the whole call, and the steady throughput
    between the builder's first and last progress reports (images extracted per second once everything runs),
    which leaves out the fixed costs (model loading, Ray's worker processes and actor pool starting, the last
    shard's assembly)."""
    options = BuildOptions(model="efficientnet_lite0", batch_size=32, index=False)
    source = parse_source("demo", SourceOptions(demo_size=images))

    def single(out, report):
        return build_cache([source], out, options, on_progress=report)

    def on_ray(actors):
        return lambda out, report: build_cache_on_ray([source], out, options, address=LOCAL,
                                                      shard_size=max(1, images // 4), actors=actors,
                                                      on_progress=report)

    runs = [("single process", single), ("Ray, 1 actor", on_ray(1)), ("Ray, 2 actors", on_ray(2))]
    steady, whole = {}, {}
    for name, run in runs:
        reports: list[tuple[float, int]] = []
        with tempfile.TemporaryDirectory(prefix="vfs-bench-cluster-", dir=OUT) as out:
            started = time.perf_counter()
            manifest = run(Path(out) / "cache", lambda done, total: reports.append((time.perf_counter(), done)))
            elapsed = time.perf_counter() - started
        assert manifest.image_count == images
        reports = [r for r in reports if r[1] > 0]
        (t0, d0), (t1, d1) = reports[0], reports[-1]
        steady[name], whole[name] = (d1 - d0) / (t1 - t0), images / elapsed
        print(f"  build {name:<15} whole call {whole[name]:6.1f} images/s ({elapsed:5.1f} s); steady "
              f"{steady[name]:6.1f} images/s (first images after {t0 - started:4.1f} s)", flush=True)
    for name in steady:
        if name != "single process":
            ratio = steady[name] / steady["single process"]
            print(f"  {name} / single process: steady {ratio:6.1%}  target >= 80%: "
                  f"{'PASS' if ratio >= 0.8 else 'FAIL'}; whole call {whole[name] / whole['single process']:6.1%}")


def search_cache(n: int) -> FeatureCache:
    path = OUT / f"synthetic-{GRID[0]}x{GRID[1]}x{GRID[2]}-n{n}-shards{SHARDS}"
    try:
        return FeatureCache.open(path)
    except Exception:  # noqa: BLE001 - absent or half-written: write it again
        shutil.rmtree(path, ignore_errors=True)
    need = n * (np.prod(GRID) * 2 + np.prod(GRID[:2]) * 4) * 1.05
    free = shutil.disk_usage(OUT).free
    if free < need:
        raise SystemExit(f"the search benchmark needs {need / 1e9:.1f} GB free under {OUT}, "
                         f"{free / 1e9:.1f} GB are; pass a smaller --search-images")
    print(f"  writing the {n:,}-image cache once ({need / 1e9:.1f} GB) ...", flush=True)
    rng = np.random.default_rng(0)
    spectrum = (np.arange(1, GRID[2] + 1, dtype=np.float32) ** -0.5)

    def rows(start: int, stop: int) -> np.ndarray:
        return np.maximum(rng.standard_normal((stop - start, *GRID), dtype=np.float32) * spectrum, 0)

    write_array_cache(path, rows, n=n, shard_size=-(-n // SHARDS), chunk=5000)
    return FeatureCache.open(path)


def search_overhead(n: int, queries: int) -> None:
    cache = search_cache(n)
    for shard in cache.shards:  # into the page cache, so both sides read RAM
        np.asarray(shard.features_bits).sum(dtype=np.uint64)
    connect(LOCAL)
    remote = RayShards(cache.path, [shard.location for shard in cache.shards])
    try:
        rng = np.random.default_rng(1)
        ids = rng.integers(0, n, queries)
        print(f"  {n:,} images in {SHARDS} shards; {queries} exact queries per mask, median ms "
              "(local | Ray fan-out | overhead):")
        for name, weights in mask_shapes(GRID[:2]).items():
            local_s, ray_s = [], []
            for k, image_id in enumerate(ids):
                query = RegionQuery.from_grid_mask(cache.image_features(int(image_id)), weights)
                for side, times in ((cache.search, local_s), (remote, ray_s))[:: 1 if k % 2 else -1]:
                    started = time.perf_counter()
                    found = side.exact(query, None, None)
                    times.append(time.perf_counter() - started)
                if k == 0:  # the first query of each side warms it up
                    local_s.pop()
                    ray_s.pop()
                    reference = cache.search.exact(query, None, None)
                    assert np.array_equal(found.scores, reference.scores)  # the same answer, both ways
            local, fanned = statistics.median(local_s) * 1e3, statistics.median(ray_s) * 1e3
            verdict = "PASS" if fanned - local <= 20 else "FAIL"
            print(f"  {name:<8} {local:8.1f} | {fanned:8.1f} | {fanned - local:+7.1f} ms  target <= +20 ms: "
                  f"{verdict}", flush=True)
    finally:
        remote.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=900, help="demo images per build")
    parser.add_argument("--search-images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    flags = path_flags()
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({flags}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    if not args.skip_build:
        connect(LOCAL)
        build_throughput(args.images)
    search_overhead(args.search_images, args.queries)


if __name__ == "__main__":
    main()
