"""The layer sweep: one region searched at every layer a cache holds, the answers side by side.

The seed paper's lesson is that layers see differently: early ones match texture and colour, late ones objects.
A sweep makes that visible in one screen. The region is drawn once, at the layer the page shows, and resampled to
each layer's grid through the pixels it covers (`geometry.resample_region`); everything else of the search (k,
filters, grouping, exclusion, mode) is the same at every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from dashboard import analysis, geometry
from dashboard.feature_cache import FeatureCache
from dashboard.query_encoder import EncodedImage
from dashboard.search import SearchRequest, SearchResult


@dataclass(frozen=True)
class LayerAnswer:
    """One row of the sweep: the search made at a layer and its answer."""

    request: SearchRequest
    result: SearchResult

    @property
    def layer(self) -> str:
        return self.request.cache.layer

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.request.cache.manifest.grid)


def sweep_requests(request: SearchRequest, caches: Sequence[FeatureCache],
                   uploads: Mapping[str, EncodedImage] | None = None) -> list[SearchRequest]:
    """`request`, made at one layer, remade at each of `caches` (one cache opened at each of its layers): the
    region resampled to the layer's grid and, for an uploaded query, the upload's encoding at that layer
    (`uploads`, by layer name)."""
    remade = []
    for cache in caches:
        changes: dict[str, Any] = {
            "cache": cache, "weights": geometry.resample_region(request.weights, cache.image_size, cache.grid)}
        if request.features is not None:
            if uploads is None or cache.layer not in uploads:
                raise KeyError(f"the uploaded query has no encoding at layer {cache.layer}")
            changes.update(features=uploads[cache.layer].features, content=uploads[cache.layer].content)
        remade.append(replace(request, **changes))
    return remade


def label_share(hits: pd.DataFrame, label_column: str | None, query_label: Any) -> str | None:
    """The row's one-line verdict: how many hits share the query's label (None without a label to compare)."""
    if label_column is None or label_column not in hits:
        return None
    return analysis.label_summary(hits, query_label, label_column)


def sweep_table(answers: Sequence[LayerAnswer]) -> pd.DataFrame:
    """Every layer's hits in one table, a `layer` column first: the sweep's CSV."""
    tables = [answer.result.hits.assign(layer=answer.layer) for answer in answers]
    if not tables:
        return pd.DataFrame(columns=["layer"])
    table = pd.concat(tables, ignore_index=True)
    return table[["layer", *[c for c in table.columns if c != "layer"]]]
