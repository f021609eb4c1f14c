"""Two-tier search at scale: exact scan vs first stage + exact rerank, on caches larger than a laptop's RAM share.

    .venv/bin/python benchmarks/scale.py                      # 1M x 7x7x320 (31 GB) and 500k x 14x14x112 (22 GB)
    .venv/bin/python benchmarks/scale.py --only 7x7x320       # one of them
    .venv/bin/python benchmarks/scale.py --images 200000      # smaller caches, same measurements

Per cache and mask size (1 cell, 3x3, whole grid; centred, query images drawn at random):
- median and p95 latency of the two-tier search (`dashboard.two_tier`: first stage over the 4-bit index, exact
  rerank of its best 0.5% (the default), and of its best 0.25%), and the medians of its two phases (first stage
  with the shortlist, rerank), measured in a fresh child process whose resident memory (smaps_rollup, between
  queries: the index, the last rerank's rows, Python; as the answer is returned, and once the rerank's rows are
  unmapped, which the search does after answering) is reported too; before each query the features are dropped
  from the page cache, so every rerank reads its rows from the disk (the worst case: the index and the norms stay
  in RAM);
- the exact scan's latency (a few queries: at this size it reads the cache from disk);
- recall@10 and recall@100 of the two tiers against the exact top-k (exact top-k of every query computed in one
  chunked pass over the cache);
- index size and build time (`cache_builder/index.py`);
- the disk's read speed where the cache lies (the rerank reads its rows from there, so its latency follows it).
Then recall on real features: the realdata photos x 4 augmentations of `benchmarks/first_stage.py` (cached with
the default model), at the same rerank share.

Synthetic features: each cell is a class prototype (shared by the image's object cells) or one of a few hundred
background prototypes, plus noise, all drawn with a power-law spectrum (lambda_i ~ i^-0.5, so 64 of 320
directions keep ~40% of the energy, near the 38-46% of real EfficientNet-Lite0 blocks.6 features). Seeded;
written once under benchmarks/out/scale/ (git-ignored) and reused. Free disk space is checked first.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_builder import cache_format as fmt  # noqa: E402
from cache_builder.index import build_index, default_dims  # noqa: E402
from cache_builder.synthetic import write_array_cache  # noqa: E402
from dashboard import scoring, shards, two_tier  # noqa: E402
from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring.kernel import path_flags  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "scale"
CONFIGS = {"7x7x320": ((7, 7, 320), 1_000_000, None), "14x14x112": ((14, 14, 112), 500_000, None)}
SEED = 0
DATA_TAG = f"scale-synthetic-v1-seed{SEED}"
CLASSES, BACKGROUNDS = 2000, 300
QUERIES = 12  # per mask size
EXACT_QUERIES = 2  # exact scans timed per mask size (each reads the whole cache)
TARGET_MEDIAN_MS, TARGET_P95_MS, TARGET_RECALL, TARGET_RSS_GB = 250.0, 400.0, 0.95, 8.0


def log(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------- data

class SyntheticFeatures:
    """Rows of a seeded synthetic cache, each chunk reproducible on its own (seeded by its start row)."""

    def __init__(self, grid: tuple[int, int, int]) -> None:
        h, w, c = grid
        self.grid = grid
        rng = np.random.default_rng(SEED)
        self.scale = (np.arange(1, c + 1, dtype=np.float32) ** -0.25)[rng.permutation(c)]  # sqrt of lambda_i
        self.classes = rng.standard_normal((CLASSES, c), dtype=np.float32) * self.scale
        self.backgrounds = rng.standard_normal((BACKGROUNDS, c), dtype=np.float32) * self.scale

    def rows(self, start: int, stop: int) -> np.ndarray:
        h, w, c = self.grid
        m = stop - start
        rng = np.random.default_rng([SEED, start])
        label = rng.integers(CLASSES, size=(m, 1, 1))
        # the object: a box of cells of the image's class, the rest background prototypes
        r0, c0 = rng.integers(0, h // 2 + 1, size=(2, m, 1, 1))
        rh, cw = rng.integers(h // 3 + 1, h + 1, size=(2, m, 1, 1))
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        on_object = (rows >= r0) & (rows < r0 + rh) & (cols >= c0) & (cols < c0 + cw)
        background = rng.integers(BACKGROUNDS, size=(m, h, w))
        out = np.where(on_object[..., None], self.classes[np.broadcast_to(label, (m, h, w))],
                       self.backgrounds[background])
        noise = rng.standard_normal((m, h, w, c), dtype=np.float32)
        noise *= 0.8 * self.scale
        out += noise
        return out


def ensure_cache(name: str, grid: tuple[int, int, int], n: int, dims: int | None) -> FeatureCache:
    """The seeded cache and its index, written (and timed) the first time."""
    path = OUT / f"{DATA_TAG}_{name}_n{n}"
    try:
        cache = FeatureCache.open(path)
        if cache.manifest.model == DATA_TAG:
            return cache
        cache.metadata.close()
    except fmt.CacheError:
        pass
    feature_bytes = n * math.prod(grid) * 2
    index_bytes = n * grid[0] * grid[1] * (dims or default_dims(grid[2])) // 2  # 4 bits a value
    need = (feature_bytes + index_bytes + n * grid[0] * grid[1] * 4) * 1.05
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    free = shutil.disk_usage(OUT).free
    if free < need:
        sys.exit(f"{path.name} needs {need / 1e9:.1f} GB of disk under {OUT}, {free / 1e9:.1f} GB are free: "
                 "free some, or pass --images to measure smaller caches")
    log(f"writing {path.name}: {n:,} images, {feature_bytes / 1e9:.1f} GB of features ...")
    started = time.perf_counter()
    write_array_cache(path, SyntheticFeatures(grid).rows, n=n, model=DATA_TAG, layer="synthetic", chunk=5000)
    log(f"  written in {time.perf_counter() - started:.0f} s")
    return FeatureCache.open(path)


def ensure_index(cache: FeatureCache, dims: int | None) -> fmt.FirstStageIndex:
    try:
        return cache.first_stage()
    except fmt.IndexUnusable:
        log(f"building the index of {cache.path.name} ...")
        build_index(cache.path, dims)
        return cache.first_stage()


def side_by_side(description: str) -> tuple[argparse.Namespace, FeatureCache, int]:
    """What the side-by-side benchmarks of the two-tier search start with: their command line (--only, --images,
    --queries), the cache with its index (written the first time; 1M x 7x7x320 unless --only names the other),
    the rerank depth, and a line naming the CPU."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--only", choices=list(CONFIGS), default="7x7x320", help="the cache (default 7x7x320)")
    parser.add_argument("--images", type=int, help="images in the cache instead of 1M / 500k")
    parser.add_argument("--queries", type=int, default=8, help="timed queries per mask size and design")
    args = parser.parse_args()
    grid, n, dims = CONFIGS[args.only]
    cache = ensure_cache(args.only, grid, args.images or n, dims)
    ensure_index(cache, dims)
    depth = two_tier.rerank_depth(cache.size, 10)
    log(f"CPU: {os.cpu_count()} cores, flags {path_flags()}; engine {scoring.engine_status()}; "
        f"load {os.getloadavg()[0]:.2f}; {cache.size:,} images, rerank depth {depth:,}")
    return args, cache, depth


# ---------------------------------------------------------------------------------------------- truth

def exact_top(cache: FeatureCache, queries: list[RegionQuery], k: int, chunk_bytes: int = 2 << 30) -> list:
    """Exact top-k ids of every query, in one pass over the cache: each chunk is read from disk once and scored
    for all queries while it is in the page cache."""
    n = cache.size
    rows = max(1, chunk_bytes // cache.features_bits[0].nbytes)
    best = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
    features = cache.features()
    for start in range(0, n, rows):
        ids = np.arange(start, min(n, start + rows), dtype=np.int64)
        for q, query in enumerate(queries):
            found = scoring.score_windows(features, cache.sqnorms, query, ids)
            ids_q, scores_q = np.concatenate([best[q][0], found.ids]), np.concatenate([best[q][1], found.scores])
            keep = np.lexsort((ids_q, -scores_q))[:k]
            best[q] = (ids_q[keep], scores_q[keep])
    return [ids for ids, _ in best]


def query_set(cache: FeatureCache) -> list[tuple[str, int, RegionQuery]]:
    rng = np.random.default_rng(SEED + 1)
    picked = rng.choice(cache.size, QUERIES, replace=False)
    return [(name, int(i), RegionQuery.from_grid_mask(cache.image_features(int(i)), mask))
            for name, mask in two_tier.mask_shapes(cache.grid).items() for i in picked]


# ---------------------------------------------------------------------------------------------- timing

def approx_child(path: str, depths: list[int], conn) -> None:
    """Runs in a fresh process: every query's two-tier latency and top-100 per rerank depth, and its memory."""
    cache = FeatureCache.open(path)
    queries = query_set(cache)
    two_tier.approx_top(cache, queries[0][2], None, depths[0], 100)  # warm-up: loads the kernel, pages the index in
    results, peak = [], {}
    for depth in depths:
        for name, image_id, query in queries:
            drop_from_page_cache(cache.path / fmt.FEATURES_FILE)  # untimed: every rerank reads its rows from disk
            top, first_s, rerank_s = timed_approx_top(cache, query, depth, 100)
            results.append((depth, name, first_s + rerank_s, top.tolist(), first_s, rerank_s))
            now = memory_status()  # between queries, untimed: as the answer is returned,
            shards.finish_unmapping()
            now["Settled"] = memory_status()["Rss"]  # and once its rows are unmapped
            peak = {key: max(value, peak.get(key, 0)) for key, value in now.items()}
    conn.send((results, peak))


def timed_approx_top(cache: FeatureCache, query: RegionQuery, depth: int, k: int):
    """`two_tier.approx_top` phase by phase: (top ids, seconds of the first stage and shortlist, of the rerank)."""
    started = time.perf_counter()
    picked = two_tier.shortlist(two_tier.first_stage_scores(cache, query, None), depth)
    first_done = time.perf_counter()
    top = two_tier.best_ids(two_tier.rerank(cache, query, picked), k)
    return top, first_done - started, time.perf_counter() - first_done


def memory_status() -> dict[str, int]:
    """Resident memory from /proc/self/smaps_rollup (exact page-table walks; the VmRSS/VmHWM counters of
    /proc/self/status are approximate and read tens of GiB here): Rss, and its anonymous part (the process's
    own) and file-backed part (mapped pages of the index and the cache, shared with the page cache)."""
    fields = (line.split(":") for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    values = {key: int(value.split()[0]) * 1024 for key, value in fields if value.strip().endswith("kB")}
    return {"Rss": values.get("Rss", 0), "Anonymous": values.get("Anonymous", 0),
            "File": values.get("Rss", 0) - values.get("Anonymous", 0)}


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's pages from the OS page cache (those no process maps), so the next reads of it hit the disk:
    without it, a query's rerank finds rows that the exact pass or an earlier query with a similar shortlist left
    in RAM (the same query at a smaller rerank depth finds all of them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_speed(path: Path, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a plain read of `nbytes` from the middle of `path`, dropped from the page cache first
    (so the disk is read, not RAM)."""
    size = path.stat().st_size
    offset = max(0, size // 2 - nbytes // 2) // 4096 * 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        started, done = time.perf_counter(), 0
        while done < nbytes:
            chunk = os.pread(fd, min(8 << 20, nbytes - done), offset + done)
            if not chunk:
                break
            done += len(chunk)
        return done / (time.perf_counter() - started)
    finally:
        os.close(fd)


def stats(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1e3
    return f"median {np.median(ms):7.0f} ms  p95 {np.percentile(ms, 95):7.0f} ms"


def run_config(name: str, grid, n: int, dims: int | None, exact_queries: int = EXACT_QUERIES) -> list[str]:
    log(f"\n=== {name}: {n:,} images ===")
    cache = ensure_cache(name, grid, n, dims)
    index = ensure_index(cache, dims)
    depth = two_tier.rerank_depth(n, 100)
    depths = [depth, max(100, math.ceil(two_tier.RERANK_FRACTION / 2 * n))]  # the default (0.5%) and half of it
    log(f"features {cache.features_bits.nbytes / 1e9:.1f} GB; index {index.dims} dims in 4 bits, "
        f"{index.nbytes / 1e9:.2f} GB "
        f"({index.energy:.0%} of the energy), built in {index.built_s:.0f} s; rerank depth {depth:,}")
    log(f"disk read speed under the cache: {disk_read_speed(cache.path / fmt.FEATURES_FILE) / 1e6:,.0f} MB/s "
        "(page cache dropped for the bytes read)")
    queries = query_set(cache)
    started = time.perf_counter()
    truth = exact_top(cache, [q for _, _, q in queries], 100)
    log(f"exact top-100 of {len(queries)} queries in one pass: {time.perf_counter() - started:.0f} s")

    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=approx_child,
                                                           args=(str(cache.path), depths, child))
    process.start()
    results, memory = parent.recv()
    process.join()
    failures = []
    exact_times: dict[str, list[float]] = {}
    for mask in two_tier.mask_shapes(cache.grid):
        for _, _, query in [q for q in queries if q[0] == mask][:exact_queries]:
            started = time.perf_counter()
            scoring.score_windows(cache.features(), cache.sqnorms, query)
            exact_times.setdefault(mask, []).append(time.perf_counter() - started)
    for depth in depths:
        log(f"rerank depth {depth:,} ({depth / n:.2%}):")
        for mask in two_tier.mask_shapes(cache.grid):
            rows = [(r, t) for r, t in zip([r for r in results if r[0] == depth], truth) if r[1] == mask]
            times = [r[2] for r, _ in rows]
            recall10 = np.mean([len(np.intersect1d(r[3][:10], t[:10])) / 10 for r, t in rows])
            recall100 = np.mean([len(np.intersect1d(r[3][:100], t[:100])) / 100 for r, t in rows])
            first_ms, rerank_ms = (np.median([r[i] for r, _ in rows]) * 1e3 for i in (4, 5))
            log(f"  {mask:>6}: approx {stats(times)} (medians: first stage {first_ms:.0f}, rerank {rerank_ms:.0f} "
                f"ms) | exact {stats(exact_times[mask])} (of {len(exact_times[mask])}) | recall@10 {recall10:.3f} "
                f"recall@100 {recall100:.3f}")
            if depth != depths[0]:
                continue
            median, p95 = np.median(times) * 1e3, np.percentile(times, 95) * 1e3
            if median > TARGET_MEDIAN_MS or p95 > TARGET_P95_MS:
                failures.append(f"{name} {mask}: approx median {median:.0f} ms / p95 {p95:.0f} ms "
                                f"(target {TARGET_MEDIAN_MS:.0f} / {TARGET_P95_MS:.0f})")
            if recall10 < TARGET_RECALL:
                failures.append(f"{name} {mask}: recall@10 {recall10:.3f} (target {TARGET_RECALL})")
    peak = memory.get("Rss", 0)
    log(f"searching process, largest resident set between queries: {peak / 2**30:.2f} GiB as an answer is "
        f"returned (target <= {TARGET_RSS_GB:.0f} GB): {memory.get('Anonymous', 0) / 2**30:.2f} GiB anonymous at "
        f"most, {memory.get('File', 0) / 2**30:.2f} GiB mapped file pages (the index and the rerank's rows) at "
        f"most; {memory.get('Settled', 0) / 2**30:.2f} GiB once the rerank's rows are unmapped")
    if peak > TARGET_RSS_GB * 2**30:
        failures.append(f"{name}: resident set {peak / 2**30:.2f} GiB")
    cache.metadata.close()
    return failures


def real_recall() -> None:
    """recall@10 at the same rerank share on real features (the first-stage benchmark's augmented photos)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from first_stage import augmented_cache

    try:
        path = augmented_cache()
    except SystemExit as exc:
        log(f"real features: skipped ({exc})")
        return
    cache = FeatureCache.open(path)
    ensure_index(cache, None)
    log(f"\n=== real features: {cache.size:,} images ({cache.manifest.model} {cache.manifest.layer}) ===")
    for share in (0.0025, 0.005, 0.01, 0.02):
        estimate = two_tier.estimate_recall(cache, depth_share=share, sample=cache.size, queries=40)
        log(f"rerank {share:.2%}: {estimate.summary()}")
    cache.metadata.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(CONFIGS), action="append", help="one configuration (repeatable)")
    parser.add_argument("--images", type=int, help="images per cache instead of 1M / 500k")
    parser.add_argument("--no-real", action="store_true", help="skip the recall on real features")
    parser.add_argument("--exact-queries", type=int, default=EXACT_QUERIES,
                        help=f"exact scans timed per mask size (default {EXACT_QUERIES}; each reads the whole cache)")
    args = parser.parse_args()
    flags = path_flags()
    log(f"CPU: {os.cpu_count()} cores, flags {flags}; engine {scoring.engine_status()}; "
        f"load {os.getloadavg()[0]:.2f}")
    failures = []
    for name in args.only or CONFIGS:
        grid, n, dims = CONFIGS[name]
        failures += run_config(name, grid, args.images or n, dims, args.exact_queries)
    if not args.no_real:
        real_recall()
    log("\ntargets: " + ("all met" if not failures else "MISSED:\n  " + "\n  ".join(failures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
