"""How good a first stage is on real features: per-cell PCA to d dims stored in bfloat16 (issue 11's first index)
or in 4 bits (the index `cache_builder/index.py` builds), or product-quantised (`pq:M`, not built: measured first,
with `benchmarks/fast_scan.py` for its speed), scored with the cache's exact squared norms, then an exact rerank of
the top R; recall@10 against the exact search, side by side in one run.

    .venv/bin/python benchmarks/first_stage.py                    # realdata photos x 4 augmentations (4,000)
    .venv/bin/python benchmarks/first_stage.py --cache caches/x   # any cache
    .venv/bin/python benchmarks/first_stage.py --codes 4bit:96 4bit:128 bf16:64 --queries 100
    .venv/bin/python benchmarks/first_stage.py --codes pq:64 pq:64:6 pqf:64  # PQ: 8-bit, 6-bit, exact tables

Without --cache it builds (once, under benchmarks/out/, git-ignored) a cache of the 1,000 photos of
../shared/realdata/imagenet200 plus a mirrored, a 10%-cropped and a grayscale copy of each, with the default
model (EfficientNet-Lite0 blocks.6, 7x7x320, crop). This is the measurement behind the first stage of the
two-tier index of issue 11: which code, how many dimensions and how deep a rerank reach a given recall, and the
bytes per cell each costs.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_builder import cache_format as fmt  # noqa: E402
from cache_builder.build import BuildOptions, build_cache  # noqa: E402
from cache_builder.cache_format import encode_features, from_bfloat16_bits  # noqa: E402
from cache_builder.index import encode_codes, fit_basis, fit_quantiser  # noqa: E402
from cache_builder.sources import parse_source  # noqa: E402
from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring import score_codes, score_windows  # noqa: E402
from dashboard.search import rank  # noqa: E402

REALDATA = ROOT.parent / "shared" / "realdata" / "imagenet200"
OUT = ROOT / "benchmarks" / "out" / "first-stage"
RERANK = (0.0025, 0.005, 0.01, 0.02)


def augmented_cache() -> Path:
    cache = OUT / "cache"
    if (cache / "manifest.json").is_file():
        return cache
    if not REALDATA.is_dir():
        sys.exit(f"{REALDATA} is absent: pass --cache CACHE")
    images = OUT / "images"
    images.mkdir(parents=True, exist_ok=True)
    with open(REALDATA / "manifest.csv", newline="") as fh, open(OUT / "manifest.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "variant"])
        for row in csv.DictReader(fh):
            picture = Image.open(REALDATA / row["path"]).convert("RGB")
            w, h = picture.size
            variants = {"orig": picture, "flip": ImageOps.mirror(picture),
                        "crop": picture.crop((w // 10, h // 10, w * 9 // 10, h * 9 // 10)),
                        "gray": ImageOps.grayscale(picture).convert("RGB")}
            for name, variant in variants.items():
                path = f"images/{Path(row['path']).stem}_{name}.jpg"
                variant.save(OUT / path, quality=90)
                writer.writerow([path, row["label"], name])
    build_cache([parse_source(f"csv:{OUT / 'manifest.csv'}")], cache,
                BuildOptions(model="efficientnet_lite0", frame="crop"))
    return cache


def masks(grid: tuple[int, int]) -> dict[str, np.ndarray]:
    h, w = grid
    one, box = np.zeros(grid, np.float32), np.zeros(grid, np.float32)
    one[h // 2, w // 2] = 1
    box[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2] = 1
    return {"1 cell": one, "3x3": box, "whole": np.ones(grid, np.float32)}


def top10(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids=None) -> np.ndarray:
    found = score_windows(features, sqnorms, query, ids)
    return found.ids[rank(found.scores, found.ids, 10)]


def first_stages(values: np.ndarray, sqnorms: np.ndarray, grid, spec: str):
    """(bytes per cell, energy kept, a scorer of the first stage for a full-size query) for a code `spec`:
    `4bit:D` (the index as built, fitted on every cell here), `bf16:D` (PCA values rounded to bfloat16), `pq:M`
    (product quantisation, below, tables rounded to 8 bits), `pq:M:B` (to B bits) or `pqf:M` (exact tables)."""
    kind, dims, *table_bits = spec.split(":")
    dims = int(dims)
    n, channels = len(values), values.shape[-1]
    cells = values.reshape(-1, channels)
    if kind in ("pq", "pqf"):
        bits = None if kind == "pqf" else int(table_bits[0]) if table_bits else 8
        return product_quantised(values, sqnorms, grid, dims, fit_basis(cells, channels)[0], bits)
    basis, energy = fit_basis(cells, dims)
    if kind == "bf16":
        bits, _ = encode_features((cells @ basis).reshape(n, *grid, dims))
        reduced = torch.from_numpy(bits).view(torch.bfloat16)

        def score(query: RegionQuery):
            small = RegionQuery(features=query.features @ basis, weights=query.weights, top=query.top,
                                left=query.left, grid=query.grid)
            return score_windows(reduced, sqnorms, small)
        return 2 * dims, energy, score
    if kind != "4bit":
        sys.exit(f"unknown code {spec!r}: use 4bit:D, bf16:D, pq:M or pqf:M")
    steps, means = fit_quantiser(cells @ basis)
    codes = encode_codes(cells, basis, steps, means).reshape(n, *grid, dims // 2)
    index = fmt.FirstStageIndex(dims=dims, basis=basis, steps=steps, means=means, codes=codes, energy=energy,
                                built_s=0.0, info={})
    return dims // 2, energy, lambda query: score_codes(index, sqnorms, query)


def kmeans(points: np.ndarray, k: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """(k, d) centroids by Lloyd's iterations from k random points."""
    rng = np.random.default_rng(seed)
    centroids = points[rng.choice(len(points), k, replace=False)].copy()
    squared = (points ** 2).sum(1)[:, None]
    for _ in range(iterations):
        nearest = np.argmin(squared - 2 * points @ centroids.T + (centroids ** 2).sum(1), axis=1)
        for j in range(k):
            members = points[nearest == j]
            centroids[j] = members.mean(0) if len(members) else points[rng.integers(len(points))]
    return centroids


def product_quantised(values: np.ndarray, sqnorms: np.ndarray, grid, subspaces: int, rotation: np.ndarray,
                      table_bits: int | None = 8):
    """Product quantisation (`pq:M`): each cell rotated onto all its principal directions, which are dealt round
    robin to M subspaces (each gets a share of the large and the small ones), each subspace coded by the nearest of
    16 k-means centroids (4 bits): M / 2 bytes a cell, every dimension kept, coarsely. Scored as a fast-scan kernel
    (`benchmarks/fast_scan.c`) scores it: the numerator of a window is the sum, over its cells and the subspaces, of
    a table of the query cell's dot products with the 16 centroids, looked up by the image's code; the tables
    rounded to `table_bits` bits (one step for the whole query, each table from its own minimum; None: exact
    tables, `pqf:M`); the denominators from the exact squared norms."""
    n, channels = len(values), values.shape[-1]
    cells = values.reshape(-1, channels) @ rotation
    subspace_dims = [np.arange(m, channels, subspaces) for m in range(subspaces)]
    centroids, codes = [], np.empty((len(cells), subspaces), np.uint8)
    for m, dims in enumerate(subspace_dims):
        sample = cells[np.random.default_rng(m).choice(len(cells), min(len(cells), 100_000), replace=False)][:, dims]
        fitted = kmeans(sample, 16, seed=m)
        codes[:, m] = np.argmin(-2 * cells[:, dims] @ fitted.T + (fitted ** 2).sum(1), axis=1)
        centroids.append(fitted)
    codes = codes.reshape(n, grid[0] * grid[1], subspaces)
    flat_norms = sqnorms.reshape(n, -1).astype(np.float64)

    def score(query: RegionQuery):
        h, w = query.weights.shape
        rows, cols = np.nonzero(query.weights)
        squared = query.weights[rows, cols].astype(np.float64) ** 2
        rotated = query.features[rows, cols].astype(np.float64) @ rotation  # (cells, channels)
        tables = np.stack([rotated[:, dims] @ centroids[m].T for m, dims in enumerate(subspace_dims)], axis=1)
        tables *= squared[:, None, None]  # (cells, M, 16)
        bias = 0.0
        if table_bits is not None:
            floor = tables.min(axis=2, keepdims=True)
            step = max(float((tables - floor).max()), 1e-30) / (2 ** table_bits - 1)
            tables, bias = np.round((tables - floor) / step) * step, float(floor.sum())
        offsets = rows * grid[1] + cols
        best, every = np.full(n, -np.inf), np.arange(subspaces)
        for y in range(grid[0] - h + 1):
            for x in range(grid[1] - w + 1):
                corner = y * grid[1] + x
                numerator = sum(table[every, codes[:, corner + offset]].sum(axis=1)
                                for table, offset in zip(tables, offsets)) + bias
                denominator = flat_norms[:, corner + offsets] @ squared
                scores = np.where(denominator > 0, numerator / (np.sqrt(np.maximum(denominator, 1e-300))
                                                                * query.norm), 0.0)
                best = np.maximum(best, scores)
        return SimpleNamespace(ids=np.arange(n), scores=best.astype(np.float32))
    return subspaces // 2, 1.0, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="a cache to measure (default: the augmented realdata cache)")
    parser.add_argument("--codes", nargs="+", default=["bf16:64", "4bit:64", "4bit:96", "4bit:128", "4bit:160"])
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args()
    cache = FeatureCache.open(args.cache or augmented_cache())
    n, grid, channels = cache.size, cache.grid, cache.channels
    values = from_bfloat16_bits(np.asarray(cache.features_bits))
    queries = np.random.default_rng(0).choice(n, min(args.queries, n), replace=False)
    features, sqnorms = cache.features(), np.asarray(cache.sqnorms)
    print(f"cache {cache.path}: {n:,} images, grid {grid[0]}x{grid[1]}x{channels}; {len(queries)} queries per mask; "
          f"recall@10 after an exact rerank of the first stage's best " + ", ".join(f"{r:.2%}" for r in RERANK))
    exact = {(name, q): top10(features, sqnorms, RegionQuery.from_grid_mask(cache.image_features(int(q)), mask))
             for name, mask in masks(grid).items() for q in queries}
    for spec in args.codes:
        per_cell, energy, first_stage = first_stages(values, sqnorms, grid, spec)
        for name, mask in masks(grid).items():
            recall = {fraction: [] for fraction in RERANK}
            for q in queries:
                query = RegionQuery.from_grid_mask(cache.image_features(int(q)), mask)
                first = first_stage(query)
                for fraction in RERANK:
                    candidates = first.ids[rank(first.scores, first.ids, max(10, int(n * fraction)))]
                    found = top10(features, sqnorms, query, np.sort(candidates))
                    recall[fraction].append(len(set(found) & set(exact[(name, q)])) / 10)
            print(f"{spec:>9} ({per_cell:3d} B a cell, {energy:4.0%} of the energy) {name:>6}: "
                  + "  ".join(f"{np.mean(r):.3f}" for r in recall.values()), flush=True)


if __name__ == "__main__":
    main()
