"""Retrieval quality on the demo cache: does the model's region search find the same species, or the same place?

    .venv/bin/python benchmarks/quality.py [--cache caches/demo]

For every 10th demo image with an animal, two queries:
  (a) its ground-truth animal box      -> precision@10 of hits showing the same species,
  (b) a background patch of equal size -> precision@10 of hits from the same camera location,
each searched twice, restricted to in-domain and to out-of-domain images, and reported by the query's domain.
A cell is left empty when its hits cannot contain the target (demo locations are either in or out of domain).
The query image itself is excluded from its hits. Builds the demo cache first if it is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.geometry import box_mask, mask_to_grid  # noqa: E402
from dashboard.metadata import MetadataFilter  # noqa: E402
from dashboard.search import SearchRequest, search_regions  # noqa: E402

DOMAINS = ("in", "out")


def background_box(animal: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """A box of the animal's size placed where it overlaps the animal least (ties: top-left first)."""
    x0, y0, x1, y1 = animal
    w, h = x1 - x0, y1 - y0
    best, best_overlap = (0, 0, w, h), None
    for top in range(0, size - h + 1, 8):
        for left in range(0, size - w + 1, 8):
            overlap = max(0, min(x1, left + w) - max(x0, left)) * max(0, min(y1, top + h) - max(y0, top))
            if best_overlap is None or overlap < best_overlap:
                best, best_overlap = (left, top, left + w, top + h), overlap
    return best


def evaluate(cache: FeatureCache, step: int = 10, k: int = 10) -> dict[tuple[str, str, str], list[float]]:
    table = cache.metadata.rows()
    animals = table[table["species"] != "empty"].iloc[::step]
    size = cache.input_size
    present = {(column, domain): set(table.loc[table["domain"] == domain, column])
               for column in ("species", "location") for domain in DOMAINS}
    precision: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in animals.itertuples():
        animal = (int(row.bbox_x0), int(row.bbox_y0), int(row.bbox_x1), int(row.bbox_y1))
        queries = {
            "species": (animal, row.species),
            "location": (background_box(animal, size), row.location),
        }
        for target, (box, wanted) in queries.items():
            weights = mask_to_grid(box_mask(cache.image_size, box), cache.grid)
            for hit_domain in DOMAINS:
                if wanted not in present[(target, hit_domain)]:
                    continue  # e.g. an in-domain location never appears out of domain: nothing to find
                hits = search_regions(SearchRequest(
                    cache=cache, weights=weights, image_id=int(row.id), k=k, exclude_query=True,
                    flt=MetadataFilter(equals={"domain": [hit_domain]}))).hits
                precision[(target, row.domain, hit_domain)].append(float((hits[target] == wanted).mean()))
    return precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("caches/demo"))
    parser.add_argument("--step", type=int, default=10, help="query every STEP-th image with an animal")
    args = parser.parse_args()
    if not (args.cache / "manifest.json").exists():
        from cache_builder.build import BuildOptions, build_cache
        from cache_builder.sources import parse_source

        print(f"building the demo cache in {args.cache} ...")
        build_cache([parse_source("demo")], args.cache, BuildOptions(model="efficientnet_lite0"))
    cache = FeatureCache.open(args.cache)
    m = cache.manifest
    print(f"cache {args.cache}: {m.image_count} images, {m.model} {m.layer} grid {m.grid}")
    precision = evaluate(cache, step=args.step)
    for target, what in (("species", "(a) animal box -> same species"),
                         ("location", "(b) background patch -> same location")):
        print(f"\n{what}: precision@10 (queries)")
        print(f"{'query domain':<14}{'hits in-domain':>18}{'hits out-of-domain':>22}")
        for query_domain in DOMAINS:
            cells = [precision[(target, query_domain, hit_domain)] for hit_domain in DOMAINS]
            print(f"{query_domain:<14}" + "".join(
                f"{np.mean(c):>14.3f} ({len(c):>3})" if c else f"{'-':>18}" for c in cells))


if __name__ == "__main__":
    main()
