"""Two-tier search for caches larger than RAM: a first stage over the index's projected cells picks candidates,
the exact kernel reranks them from the bfloat16 cache, so every reported hit has its exact score and window.

The first stage is the exact search's own formula on smaller vectors: each cell projected onto the index's d
principal directions and stored in 4 bits (`cache_builder/index.py`), the query region projected alike, the
denominators from the cache's exact squared norms. It runs on the kernel's integer paths
(`dashboard.scoring.score_codes`), honours the same filters, and reads d / 4C of the bytes. What it gets wrong is
only the order of images whose scores are close, which is why its top `rerank_depth` (0.5% of the searched
images, at least 1,000) are scored again exactly.

Modes: `exact` scans everything; `approx` needs a usable index (else a clear error); `auto` (the default) is
exact while the cache's arrays fit comfortably in RAM (half of it), and two-tier beyond, falling back to exact
with a warning where the index is missing, stale or damaged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from cache_builder import cache_format as fmt
from dashboard import scoring
from dashboard.feature_cache import FeatureCache
from dashboard.geometry import QueryError
from dashboard.region_query import RegionQuery

MODES = ("auto", "exact", "approx")
RERANK_FRACTION = 0.005
MIN_RERANK = 1000
AUTO_RAM_SHARE = 0.5  # auto stays exact while the features and norms take at most this share of the RAM


@dataclass(frozen=True)
class ModeChoice:
    """The mode a search runs in, and why, for the page and the CLI."""

    mode: str  # "exact" | "approx"
    reason: str
    warning: str | None = None


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def array_bytes(cache: FeatureCache) -> int:
    """What an exact scan reads: the features and their norms."""
    return cache.feature_bytes()


def fits_in_ram(cache: FeatureCache) -> bool:
    """Whether `auto` searches this cache exactly."""
    return array_bytes(cache) <= AUTO_RAM_SHARE * ram_bytes()


def rerank_depth(searched: int, k: int, depth: int | None = None) -> int:
    """How many first-stage candidates are reranked exactly: `depth` if given, else 0.5% of the searched images
    (at least 1,000 and at least k). On real features (`benchmarks/first_stage.py`, 128 dimensions in 4 bits) a
    0.5% rerank gave recall@10 0.95-0.985 by mask size, 1% gave 0.99-0.995."""
    if depth is not None:
        if depth < 1:
            raise QueryError(f"the rerank depth must be at least 1 (got {depth})")
        return max(int(depth), k)
    return max(MIN_RERANK, k, math.ceil(RERANK_FRACTION * searched))


def choose_mode(requested: str, cache: FeatureCache, searched: int, depth: int) -> ModeChoice:
    """exact or approx for a search of `searched` images with a rerank of `depth`; QueryError for an `approx`
    request that cannot run as one."""
    if requested not in MODES:
        raise QueryError(f"search mode must be one of {', '.join(MODES)} (got {requested!r})")
    if requested == "exact":
        return ModeChoice("exact", "exact search requested: every image scored exactly")
    if requested == "auto" and fits_in_ram(cache):
        return ModeChoice("exact", f"the cache ({array_bytes(cache) / 2**30:,.1f} GiB) fits in RAM: every image "
                          "scored exactly")
    try:
        index = cache.first_stage()
    except fmt.IndexUnusable as exc:
        if requested == "approx":
            raise QueryError(f"approximate search needs the cache's first-stage index: {exc}") from None
        return ModeChoice("exact", "every image scored exactly",
                          warning=f"the cache is larger than half the RAM but its index is {exc.problem} ({exc}); "
                          "searching exactly, which reads every feature")
    per_image, per_code = 2 * math.prod(cache.manifest.grid), index.codes[0].nbytes
    if searched * (per_image - per_code) <= depth * per_image:  # two tiers would read more than one scan
        return ModeChoice("exact", f"only {searched:,} images to search (rerank depth {depth:,}): scored exactly")
    return ModeChoice("approx", f"two-tier: a {index.dims}-dimension first stage over {searched:,} images, "
                      f"its best {depth:,} reranked exactly")


def shortlist(first: scoring.WindowScores, depth: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Ascending ids of the first stage's best `depth` images; with `groups` (codes aligned with `first.ids`),
    also each group's best image among the `depth` best groups, so best-per-group keeps its groups."""
    picks = scoring.best_positions(first.scores, depth)
    if groups is not None:
        order = np.lexsort((first.ids, -first.scores))
        _, best_of_group = np.unique(groups[order], return_index=True)
        picks = np.union1d(picks, order[np.sort(best_of_group)][:depth])
    return np.sort(first.ids[picks])


def first_stage_scores(cache: FeatureCache, query: RegionQuery, ids: np.ndarray | None,
                       backend: str | None = None) -> scoring.WindowScores:
    """Every searched image's best window by the first stage (approximate scores, projected numerators)."""
    return cache.search.first_stage(query, ids, backend)


def rerank(cache: FeatureCache, query: RegionQuery, shortlisted: np.ndarray,
           backend: str | None = None) -> scoring.WindowScores:
    """Exact scores and windows of the shortlisted images, read from wherever they lie
    (`dashboard.shards.CacheShard.rerank`)."""
    return cache.search.rerank(query, shortlisted, backend)


def approx_top(cache: FeatureCache, query: RegionQuery, ids: np.ndarray | None, depth: int, k: int,
               backend: str | None = None) -> np.ndarray:
    """Ids of the two tiers' top k, best first (ties by id): an approx search's engine without what
    `search_regions` adds around it (filters, groups, metadata, the hit table)."""
    return best_ids(rerank(cache, query, shortlist(first_stage_scores(cache, query, ids, backend), depth), backend), k)


def best_ids(found: scoring.WindowScores, k: int) -> np.ndarray:
    """The ids of the k best scores, best first, ties by id."""
    return found.ids[np.lexsort((found.ids, -found.scores))[:k]]


@dataclass(frozen=True)
class RecallEstimate:
    """recall@k of approx against exact per mask shape, on a random sample of the cache (same rerank share)."""

    recall: dict[str, float]
    sample: int
    queries: int
    k: int

    def summary(self) -> str:
        figures = ", ".join(f"{name} {value:.2f}" for name, value in self.recall.items())
        return (f"recall@{self.k} {figures} (estimated on {self.sample:,} random images, {self.queries} queries "
                "per mask)")


def estimate_recall(cache: FeatureCache, depth_share: float = RERANK_FRACTION, sample: int = 20_000,
                    queries: int = 8, k: int = 10, backend: str | None = None, seed: int = 0) -> RecallEstimate:
    """How often the two tiers find the exact top-k, measured on `sample` random images with the same share of
    them reranked as a full search reranks: a page can show it in a second, whatever the cache's size."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(cache.size, min(sample, cache.size), replace=False))
    depth = max(k, math.ceil(depth_share * len(ids)))
    recall: dict[str, list[float]] = {}
    for image_id in rng.choice(ids, min(queries, len(ids)), replace=False):
        for name, weights in mask_shapes(cache.grid).items():
            try:
                query = RegionQuery.from_grid_mask(cache.image_features(int(image_id)), weights)
            except QueryError:  # an all-zero region: no similarity defined
                continue
            exact = rerank(cache, query, ids, backend)  # the sample's rows, requested at once
            truth = exact.ids[scoring.best_positions(exact.scores, k)]
            found = approx_top(cache, query, ids, depth, k, backend)
            recall.setdefault(name, []).append(len(np.intersect1d(found, truth)) / len(truth))
    return RecallEstimate({name: float(np.mean(values)) for name, values in recall.items()}, len(ids),
                          min(queries, len(ids)), k)


def index_status(cache: FeatureCache) -> str:
    """One line for the Caches page: the first-stage index, and what `auto` searches run as."""
    fits = fits_in_ram(cache)
    try:
        index = cache.first_stage()
    except fmt.IndexUnusable as exc:
        hint = "" if exc.problem == "missing" else f" ({exc})"
        return (f"no usable first-stage index ({exc.problem}){hint}: searches are exact"
                + ("" if fits else "; this cache is larger than half the RAM, so add one with "
                   f"`python -m cache_builder index {cache.path}`"))
    auto = "exact (the cache fits in RAM)" if fits else "two-tier"
    per_shard = f", one per shard ({len(cache.shards)})" if cache.sharded else ""
    return (f"first-stage index: {index.dims} dimensions per cell in 4 bits, {cache.index_bytes() / 2**30:,.2f} GiB"
            f"{per_shard}, {index.energy:.0%} of the energy; `auto` searches run {auto}")


def mode_summary(choice: ModeChoice, recall: RecallEstimate | None = None) -> str:
    """One line for the page: which mode ran, why, and (two-tier) its measured recall."""
    if choice.mode == "exact":
        return f"exact: {choice.reason}"
    line = f"approximate: {choice.reason}"
    return f"{line}; {recall.summary()}" if recall is not None else line


def mask_shapes(grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """The three region sizes recall and speed are reported for: one cell, a 3x3 box, the whole grid (centred)."""
    h, w = grid
    one, box = np.zeros(grid, np.float32), np.zeros(grid, np.float32)
    one[h // 2, w // 2] = 1
    box[max(0, h // 2 - 1):h // 2 + 2, max(0, w // 2 - 1):w // 2 + 2] = 1
    return {"1 cell": one, "3x3": box, "whole": np.ones(grid, np.float32)}
