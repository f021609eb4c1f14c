"""Soak: many random searches from 8 threads of one process, as concurrent dashboard sessions run them.

    .venv/bin/python benchmarks/soak.py [--searches 500] [--threads 8] [--max-seconds 600] [--cache caches/demo]

Part 1, the demo cache (built first if missing, ~2 minutes): random regions (boxes and soft masks on the grid),
random filters on domain/location/species (none, one or two columns, some matching nothing), random k (1..100),
best-per-group on or off, random query images. Prints the errors (must be 0: an exception or a result that
breaks an invariant; a filter that matches nothing gives an empty result, which is counted, not an error),
p50/p95 latency, throughput, peak RSS, and how many of a sample of the concurrent results differ from the same
search run alone (must be 0).

Part 2, memory sharing: a 20,000-image 7x7x320 synthetic cache (0.6 GB, written once under
benchmarks/out/caches) searched by 1 session, then by 8 at once. The feature array is memory-mapped, so its
pages are counted once (file-backed, shared with every process); each session adds only its search's temporaries
(bounded by dashboard.scoring.torch_path.CHUNK_BYTES), never a copy of the cache.

Everything is local; both parts are bounded in count, part 1 also in time (--max-seconds).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.metadata import MetadataFilter  # noqa: E402
from dashboard.scoring.torch_path import CHUNK_BYTES  # noqa: E402
from dashboard.search import SearchRequest, search_regions  # noqa: E402

FILTER_COLUMNS = ("domain", "location", "species")
CACHES = ROOT / "benchmarks" / "out" / "caches"
MB = 2**20


# ---------------------------------------------------------------------------------------------- memory


def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM... of this process in bytes (Linux)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS ("5" into clear_refs, Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_line() -> str:
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return f"peak RSS: ru_maxrss {max_rss:.0f} MB, VmHWM {proc_status().get('VmHWM', 0) / MB:.0f} MB"


# ---------------------------------------------------------------------------------------------- part 1


def random_weights(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    weights = np.zeros((h, w), dtype=np.float32)
    y0, x0 = rng.integers(h), rng.integers(w)
    y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
    if rng.random() < 0.5:  # a box
        weights[y0:y1, x0:x1] = 1.0
    else:  # a soft mask: brush-like partial cells, some holes
        soft = rng.uniform(0.05, 1.0, size=(y1 - y0, x1 - x0)) * (rng.random((y1 - y0, x1 - x0)) < 0.8)
        soft[0, 0] = max(soft[0, 0], 0.5)
        weights[y0:y1, x0:x1] = soft
    return weights


def random_filter(rng: np.random.Generator, values: dict[str, list]) -> MetadataFilter:
    roll = rng.random()
    if roll < 0.3 or not values:
        return MetadataFilter()
    if roll < 0.4:  # matches nothing: a value no row has
        return MetadataFilter(equals={str(rng.choice(list(values))): ["(no such value)"]})
    columns = rng.choice(list(values), size=min(len(values), int(rng.integers(1, 3))), replace=False)
    equals = {}
    for column in columns:  # two columns together sometimes match nothing too (a species never at a location)
        options = values[str(column)]
        equals[str(column)] = [options[i] for i in rng.choice(len(options), size=min(len(options), 2),
                                                               replace=False)]
    return MetadataFilter(equals=equals)


def random_search(cache: FeatureCache, rng: np.random.Generator, values: dict[str, list]) -> dict:
    h, w = cache.grid
    group_columns = [c for c in ("location", "species", "domain") if c in values]
    return dict(
        image_id=int(rng.integers(cache.size)), weights=random_weights(rng, h, w), k=int(rng.integers(1, 101)),
        flt=random_filter(rng, values),
        per_group=str(rng.choice(group_columns)) if group_columns and rng.random() < 0.4 else None,
        exclude=bool(rng.random() < 0.7),
    )


def run_search(cache: FeatureCache, spec: dict) -> pd.DataFrame:
    return search_regions(SearchRequest(cache=cache, weights=spec["weights"], image_id=spec["image_id"], k=spec["k"],
                                        flt=spec["flt"], per_group=spec["per_group"],
                                        exclude_query=spec["exclude"])).hits


def check_hits(hits: pd.DataFrame, spec: dict) -> str | None:
    """What a result must satisfy whatever the data; a message for the first broken invariant."""
    if len(hits) > spec["k"]:
        return f"{len(hits)} hits for k={spec['k']}"
    if not (np.diff(hits["score"].to_numpy()) <= 0).all():
        return "hits not sorted by score"
    if spec["exclude"] and (hits["id"] == spec["image_id"]).any():
        return "the excluded query image is a hit"
    if spec["per_group"] and hits[spec["per_group"]].astype("string").fillna("\0").duplicated().any():
        return f"two hits share a {spec['per_group']}"
    for column, allowed in spec["flt"].equals.items():
        if not hits[column].isin(allowed).all():
            return f"a hit's {column} is not one of {allowed}"
    return None


def soak(cache: FeatureCache, searches: int, threads: int, max_seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = {c: [v for v in cache.metadata.distinct_values(c) if v is not None]
              for c in FILTER_COLUMNS if c in cache.metadata.columns}
    specs = [random_search(cache, rng, values) for _ in range(searches)]
    errors: list[str] = []
    results: dict[int, pd.DataFrame] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def one(index: int) -> float | None:
        if time.monotonic() > deadline:
            return None
        spec = specs[index]
        started = time.perf_counter()
        try:
            hits = run_search(cache, spec)
            problem = check_hits(hits, spec)
        except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
            hits, problem = None, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        with lock:
            if problem:
                errors.append(f"search {index}: {problem}")
            if hits is not None:
                results[index] = hits
        return elapsed

    reset_peak()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        latencies = [t for t in pool.map(one, range(searches)) if t is not None]
    wall = time.perf_counter() - started
    done = len(latencies)
    ms = np.array(latencies) * 1000
    empty = sum(len(hits) == 0 for hits in results.values())
    print(f"{done} of {searches} searches from {threads} threads in {wall:.1f} s ({done / wall:.1f} searches/s)"
          + ("" if done == searches else f"; stopped at --max-seconds {max_seconds:g}"))
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    print(f"empty results (filters matching nothing, expected): {empty}")
    if done:
        print(f"latency per search (under {threads}-way concurrency): p50 {np.percentile(ms, 50):.1f} ms, "
              f"p95 {np.percentile(ms, 95):.1f} ms, max {ms.max():.1f} ms")
    print(peak_rss_line())
    sample = sorted(results)[:: max(1, len(results) // 50)]
    mismatches = sum(not run_search(cache, specs[i]).equals(results[i]) for i in sample)
    print(f"concurrent results that differ from the same search run alone: {mismatches} of {len(sample)} checked")


# ---------------------------------------------------------------------------------------------- part 2


def sharing_cache(n: int) -> FeatureCache:
    """n x 7x7x320 post-ReLU-like rows (a tiled random block: content does not matter for memory)."""
    path = CACHES / f"soak-synthetic-v1_n{n}_7x7x320"
    if not (path / "manifest.json").exists():
        from cache_builder.synthetic import write_array_cache

        print(f"writing {path} ({n:,} images, once) ...", flush=True)
        rng = np.random.default_rng(0)
        base = np.maximum(rng.normal(size=(257, 7, 7, 320)), 0).astype(np.float32)
        write_array_cache(path, lambda start, stop: base[np.arange(start, stop) % len(base)], n=n,
                          metadata=pd.DataFrame({"domain": np.where(np.arange(n) % 10 == 0, "out", "in")}))
    return FeatureCache.open(path)


def sessions_rss(n: int) -> None:
    cache = sharing_cache(n)
    size = cache.features_bits.nbytes
    requests = []
    for side, top, left in ((3, 2, 2), (1, 3, 3), (7, 0, 0), (2, 0, 5), (3, 4, 1), (1, 6, 0), (2, 3, 3), (4, 1, 2)):
        weights = np.zeros(cache.grid, dtype=np.float32)
        weights[top:top + side, left:left + side] = 1.0
        requests.append(SearchRequest(cache=cache, weights=weights, image_id=1, k=20))
    base = proc_status()
    can_reset = reset_peak()
    t0 = time.perf_counter()
    search_regions(requests[0])
    one_s = time.perf_counter() - t0
    one = proc_status()
    reset_peak()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(search_regions, requests))
    eight_s = time.perf_counter() - t0
    eight = proc_status()

    def line(label: str, before: dict, after: dict, seconds: float) -> str:
        peak = f"{(after['VmHWM'] - before['VmRSS']) / MB:+.0f} MB" if can_reset else "n/a"
        return (f"  {label} ({seconds:.2f} s): RSS {after['VmRSS'] / MB:.0f} MB; file-backed "
                f"{(after['RssFile'] - before['RssFile']) / MB:+.0f} MB, anonymous "
                f"{(after['RssAnon'] - before['RssAnon']) / MB:+.0f} MB, peak {peak}")

    print(f"feature array {size / MB:.0f} MB ({cache.size:,} x {(*cache.grid, cache.channels)}), memory-mapped")
    print(f"  opened: RSS {base['VmRSS'] / MB:.0f} MB (file-backed {base['RssFile'] / MB:.0f} MB, "
          f"anonymous {base['RssAnon'] / MB:.0f} MB)")
    print(line("1 session, 1 search of every image", base, one, one_s))
    print(line("then 8 sessions, 8 concurrent searches of every image", one, eight, eight_s))
    grew = (eight["VmHWM"] - one["VmRSS"]) if can_reset else eight["VmRSS"] - one["VmRSS"]
    print(f"  8 sessions vs 1: +{grew / MB:.0f} MB peak = {grew / size:.2f}x the cache "
          f"(8 copies would be +{8 * size / MB:.0f} MB; 8 searches' temporaries are bounded by "
          f"8 x {CHUNK_BYTES / MB:.0f} MB)")
    print("  the file-backed pages are the page cache: one copy shared by every session and every process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / "caches" / "demo")
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop submitting searches after this")
    parser.add_argument("--sharing-images", type=int, default=20_000, help="images in the part-2 cache")
    parser.add_argument("--skip-sharing", action="store_true", help="only part 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"CPU: {os.cpu_count()} logical cores; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if not (args.cache / "manifest.json").exists():
        from cache_builder.build import BuildOptions, build_cache
        from cache_builder.sources import parse_source

        print(f"building the demo cache in {args.cache} ...", flush=True)
        build_cache([parse_source("demo")], args.cache, BuildOptions(model="efficientnet_lite0"))
    cache = FeatureCache.open(args.cache)
    print(f"== part 1: soak on {args.cache} ({cache.size:,} images, grid {(*cache.grid, cache.channels)})")
    soak(cache, args.searches, args.threads, args.max_seconds, args.seed)
    if not args.skip_sharing:
        print("== part 2: memory of 1 vs 8 sessions on one memory-mapped cache")
        sessions_rss(args.sharing_images)


if __name__ == "__main__":
    main()
