"""How good a first stage is on real features: per-cell PCA to d dims stored in bfloat16 (issue 11's first index)
or in 4 bits (the index `cache_builder/index.py` builds), scored with the cache's exact squared norms, then an
exact rerank of the top R; recall@10 against the exact search, side by side in one run.

    .venv/bin/python benchmarks/first_stage.py                    # realdata photos x 4 augmentations (4,000)
    .venv/bin/python benchmarks/first_stage.py --cache caches/x   # any cache
    .venv/bin/python benchmarks/first_stage.py --codes 4bit:96 4bit:128 bf16:64 --queries 100

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
    `4bit:D` (the index as built, fitted on every cell here) or `bf16:D` (PCA values rounded to bfloat16)."""
    kind, dims = spec.split(":")
    dims = int(dims)
    n, channels = len(values), values.shape[-1]
    cells = values.reshape(-1, channels)
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
        sys.exit(f"unknown code {spec!r}: use 4bit:D or bf16:D")
    steps, means = fit_quantiser(cells @ basis)
    codes = encode_codes(cells, basis, steps, means).reshape(n, *grid, dims // 2)
    index = fmt.FirstStageIndex(dims=dims, basis=basis, steps=steps, means=means, codes=codes, energy=energy,
                                built_s=0.0, info={})
    return dims // 2, energy, lambda query: score_codes(index, sqnorms, query)


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
