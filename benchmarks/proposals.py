"""Suggested regions against the animals' boxes of the demo: how often the best of the suggestions overlaps the
animal with IoU >= 0.5, next to the naive baseline, on the same images in one run.

    .venv/bin/python benchmarks/proposals.py [CACHE]   (default: caches/demo, built first if absent)

The demo's metadata holds each animal's box in display pixels (`bbox_x0..bbox_y1`); images without an animal
are left out. Suggestions: `dashboard.proposals.suggest_regions` (5 per image); baseline: `baseline_regions`
(per-cell feature norm above its mean, one box per connected blob of cells).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.feature_cache import FeatureCache  # noqa: E402
from dashboard.proposals import DEFAULT_COUNT, baseline_regions, box_iou, suggest_regions  # noqa: E402


def hit_rates(cache: FeatureCache, count: int = DEFAULT_COUNT, threshold: float = 0.5) -> dict[str, float]:
    """Share of the images with an animal whose best suggestion (and best baseline box) reaches `threshold`."""
    rows = cache.metadata.rows(None)
    rows = rows[rows["bbox_x0"].notna()]
    found = {"suggested": [], "baseline": [], "top suggestion": []}
    for row in rows.itertuples():
        animal = (row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1)
        features = cache.image_features(int(row.id))
        suggested = [region.box for region in suggest_regions(features, cache.image_size, count=count)]
        for name, boxes in (("suggested", suggested), ("top suggestion", suggested[:1]),
                            ("baseline", baseline_regions(features, cache.image_size))):
            found[name].append(max((box_iou(box, animal) for box in boxes), default=0.0) >= threshold)
    return {name: float(np.mean(hits)) for name, hits in found.items()} | {"images": float(len(rows))}


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "caches" / "demo"
    if not (path / "manifest.json").is_file():
        from cache_builder.build import BuildOptions, build_cache
        from cache_builder.sources import parse_source

        print(f"building the demo cache in {path} ...", flush=True)
        build_cache([parse_source("demo")], path, BuildOptions(model="efficientnet_lite0"))
    cache = FeatureCache.open(path)
    rates = hit_rates(cache)
    print(f"cache {path} ({cache.manifest.model} {cache.manifest.layer}, grid {cache.grid}); "
          f"{rates['images']:.0f} images with an animal")
    print(f"  best of {DEFAULT_COUNT} suggested regions, IoU >= 0.5: {rates['suggested']:.1%}  target >= 70%: "
          f"{'PASS' if rates['suggested'] >= 0.7 else 'FAIL'}")
    print(f"  the top suggestion alone:              {rates['top suggestion']:.1%}")
    print(f"  naive baseline (norm > mean, blobs):   {rates['baseline']:.1%}")


if __name__ == "__main__":
    main()
