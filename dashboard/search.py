"""One search flow: a frozen `SearchRequest` in, a `SearchResult` out, used alike by the pages and the CLI.

The request names everything that decides the answer (cache, query, region, k, filter, grouping, exclusion,
mode, backend); `search_regions` answers it with the ranked hits, every searched image's score and the searched
rows' metadata, fetched from DuckDB once. Scores come from `dashboard.scoring`; cells become pixels in
`dashboard.geometry`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dashboard import geometry, scoring, two_tier
from dashboard.feature_cache import FeatureCache
from dashboard.geometry import QueryError
from dashboard.metadata import MetadataFilter
from dashboard.region_query import RegionQuery

HIT_COLUMNS = ["rank", "id", "path", "score", "row", "col", "height", "width", "x0", "y0", "x1", "y1"]
SEARCH_MODES = two_tier.MODES  # auto | exact | approx (see dashboard.two_tier)

__all__ = ["HIT_COLUMNS", "SEARCH_MODES", "QueryError", "RegionQuery", "SearchRequest", "SearchResult", "heat_maps",
           "rank", "search_regions"]


@dataclass(frozen=True, eq=False)
class SearchRequest:
    """Everything that decides a search's answer. Query with a cached image (`image_id`) or with features
    computed elsewhere (`features`, e.g. an upload); `weights` is the region on the cache's feature grid."""

    cache: FeatureCache
    weights: np.ndarray  # (H, W) soft weights in [0, 1]
    image_id: int | None = None
    features: np.ndarray | None = None  # (H, W, C) float32, when the query image is not in the cache
    content: tuple[int, int, int, int] | None = None  # with `features`: the cells showing the picture
    k: int = 20
    flt: MetadataFilter = field(default_factory=MetadataFilter)
    per_group: str | None = None
    exclude_query: bool = False
    mode: str = "auto"  # exact while the cache fits in RAM, else two-tier where it has an index
    backend: str | None = None  # a scorer name (dashboard.scoring.SCORERS); None = configured/automatic
    rerank: int | None = None  # two-tier: first-stage candidates reranked exactly (None: dashboard.two_tier's rule)

    def __post_init__(self) -> None:
        if (self.image_id is None) == (self.features is None):
            raise QueryError("a search needs a query image: a cached image id or an image's features, not both")
        if self.image_id is not None:
            self.cache.check_id(self.image_id)
        if self.k <= 0:
            raise QueryError(f"k must be at least 1 (got {self.k})")
        if self.mode not in SEARCH_MODES:
            raise QueryError(f"search mode must be one of {', '.join(SEARCH_MODES)} (got {self.mode!r})")
        if self.rerank is not None and self.rerank < 1:
            raise QueryError(f"the rerank depth must be at least 1 (got {self.rerank})")
        if self.exclude_query and self.image_id is None:
            raise QueryError("only a cached query image can be excluded (an uploaded image is not in the cache)")
        if self.per_group is not None and self.per_group not in self.cache.metadata.column_types:
            raise QueryError(f"no metadata column '{self.per_group}' to keep the best image of")

    def query_features(self) -> np.ndarray:
        return self.cache.image_features(self.image_id) if self.features is None else self.features

    def query_content(self) -> tuple[int, int, int, int] | None:
        """(r0, c0, r1, c1) cells of the query image that show the picture (None: all of them)."""
        if self.features is not None:
            return self.content
        return self.cache.content_box(self.image_id)

    def region_query(self) -> RegionQuery:
        """The region on the query's picture: cells of padding (letterbox bars) are no part of it."""
        weights = np.asarray(self.weights, dtype=np.float32)
        content = self.query_content()
        if content is not None and np.any(weights > 0):
            r0, c0, r1, c1 = content
            kept = np.zeros_like(weights)
            kept[r0:r1, c0:c1] = weights[r0:r1, c0:c1]
            if not np.any(kept > 0):
                raise QueryError("the region lies on the padding around the picture (the bars that fill the frame "
                                 "to the cache's shape): draw on the picture itself")
            weights = kept
        return RegionQuery.from_grid_mask(self.query_features(), weights)

    def fingerprint(self) -> str:
        """Equal for requests that must give equal answers: the memo key of the pages."""
        digest = hashlib.sha256()
        manifest = self.cache.manifest
        for part in (str(self.cache.path), manifest.created, manifest.fingerprint, manifest.layer, self.image_id,
                     self.content, self.k,
                     repr(self.flt), self.per_group, self.exclude_query, self.mode, self.backend, self.rerank):
            digest.update(repr(part).encode() + b"\0")
        for array in (self.weights, self.features):
            if array is not None:
                array = np.ascontiguousarray(array, dtype=np.float32)
                digest.update(repr(array.shape).encode() + array.tobytes())
        return digest.hexdigest()


@dataclass
class SearchResult:
    """`hits`: the ranked top-k with windows and metadata (the CSV export), exact scores in every mode.
    `scores`: every searched image's best score, from the first stage when `approximate_scores` (two-tier).
    `searched`: the metadata of every searched image, in `scores` order. `mode`: how it ran and why."""

    hits: pd.DataFrame
    scores: pd.DataFrame  # columns id, score
    searched: pd.DataFrame
    query: RegionQuery
    backend: str
    elapsed_s: float
    mode: two_tier.ModeChoice = two_tier.ModeChoice("exact", "every image scored exactly")
    reranked: int = 0  # two-tier: images scored exactly after the first stage

    @property
    def approximate_scores(self) -> bool:
        return self.mode.mode == "approx"

    @property
    def reranked_share(self) -> float:
        """The share of the searched images a two-tier search reranked (rounded: a memo key of the page)."""
        return round(self.reranked / max(1, self.searched_count), 3)

    @property
    def scores_label(self) -> str:
        """What `scores` are, for a chart's title."""
        return "Approximate (first-stage) scores" if self.approximate_scores else "Scores"

    @property
    def searched_count(self) -> int:
        return len(self.scores)


def search_regions(request: SearchRequest) -> SearchResult:
    """The top-k images of the request's cache for its region, restricted to the rows passing its filter.

    k larger than the candidate set returns every candidate; an empty candidate set returns no hits. Two-tier
    (approx) searches rerank the first stage's best candidates exactly, so hits carry exact scores and windows.
    """
    started = time.perf_counter()
    cache, store = request.cache, request.cache.metadata
    query = request.region_query()
    candidates = None if request.flt.is_empty() else store.filter_ids(request.flt)
    if request.exclude_query:
        base = np.arange(cache.size) if candidates is None else candidates
        candidates = base[base != int(request.image_id)]
    searched_count = cache.size if candidates is None else len(candidates)
    depth = two_tier.rerank_depth(searched_count, request.k, request.rerank)
    mode = two_tier.choose_mode(request.mode, cache, searched_count, depth)
    scorer = scoring.get_scorer(request.backend)
    if mode.mode == "approx":
        scored = two_tier.first_stage_scores(cache, query, candidates, scorer.name)
    else:
        scored = cache.search.exact(query, candidates, scorer.name)
    searched = store.rows(None if candidates is None else scored.ids)  # the one metadata read of a search
    groups = None
    if request.per_group is not None:
        labels = searched[request.per_group]
        groups = pd.factorize(labels.astype("string").fillna("\0<null>"), use_na_sentinel=False)[0]
    found, rows, reranked = scored, np.arange(len(scored.ids)), 0
    if mode.mode == "approx":  # exact scores and windows for the first stage's best
        shortlist = two_tier.shortlist(scored, depth, groups)
        found = two_tier.rerank(cache, query, shortlist, scorer.name)
        rows, reranked = np.searchsorted(scored.ids, found.ids), len(shortlist)
        groups = None if groups is None else groups[rows]
    order = rank(found.scores, found.ids, request.k, groups) if len(found.ids) else np.array([], dtype=np.int64)
    hits = _hit_table(cache, found, order, query, searched.iloc[rows[order]])
    return SearchResult(hits=hits, scores=pd.DataFrame({"id": scored.ids, "score": scored.scores}),
                        searched=searched, query=query, backend=scorer.name,
                        elapsed_s=time.perf_counter() - started, mode=mode, reranked=reranked)


def heat_maps(cache: FeatureCache, result: SearchResult, ids) -> np.ndarray:
    """(len(ids), out_h, out_w) every window's score for the hits `ids`: the query is prepared once for all."""
    return cache.search.window_maps(result.query, ids, result.backend)


def rank(scores: np.ndarray, ids: np.ndarray, k: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Indices into `scores` of the top k: score descending, ties by ascending id.

    `groups` (integer codes aligned with `scores`) keeps only the best image of each group.
    """
    if k <= 0:
        raise QueryError(f"k must be at least 1 (got {k})")
    if groups is None and k < len(scores):
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        pool = np.nonzero(scores >= threshold)[0]
    else:
        pool = np.arange(len(scores))
    order = pool[np.lexsort((ids[pool], -scores[pool]))]
    if groups is not None:
        _, first = np.unique(np.asarray(groups)[order], return_index=True)
        order = order[np.sort(first)]
    return order[:k]


def _hit_table(cache: FeatureCache, found: scoring.WindowScores, order: np.ndarray, query: RegionQuery,
               metadata: pd.DataFrame) -> pd.DataFrame:
    h, w = query.box
    row, col = np.divmod(found.position[order], found.windows_per_row)
    x0, y0, x1, y1 = geometry.window_pixels(row, col, h, w, query.grid, cache.image_size)
    windows = pd.DataFrame({
        "rank": np.arange(1, len(order) + 1),
        "id": found.ids[order],
        "score": found.scores[order].astype(np.float64).round(6),
        "row": row, "col": col, "height": h, "width": w, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
    })
    metadata = metadata.drop(columns=["id"])
    # a metadata column named like a window column (real manifests often have the photo's width and height)
    # keeps its values under "metadata.<name>": two columns of one name break the table, the CSV and the charts
    metadata = metadata.rename(columns={c: f"metadata.{c}" for c in metadata.columns if c in windows.columns})
    table = pd.concat([windows.reset_index(drop=True), metadata.reset_index(drop=True)], axis=1)
    return table[HIT_COLUMNS + [c for c in metadata.columns if c not in HIT_COLUMNS]]
