"""The search for notebooks and scripts: open a cache, search by box, mask or suggested region, get the hits as a
DataFrame, see them as one picture.

    from dashboard import notebook as vfs

    cache = vfs.open_cache("caches/demo")
    regions = vfs.suggest(cache, image_id=42)              # boxes around what stands out, best first
    hits = vfs.search(cache, image_id=42, region=regions[0], k=10, where={"domain": "out"})
    vfs.show(cache, hits)                                  # a PIL image: Jupyter displays it inline

Everything goes through `search_regions`, so the answers are the page's and the CLI's. No Streamlit here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from dashboard import rendering
from dashboard.feature_cache import FeatureCache
from dashboard.geometry import QueryError, box_mask, display_mask_to_grid, mask_to_grid
from dashboard.metadata import FilterError, MetadataFilter
from dashboard.proposals import SuggestedRegion, suggest_regions
from dashboard.query_encoder import encode_image
from dashboard.search import SearchRequest, search_regions

__all__ = ["open_cache", "search", "show", "suggest"]

Region = tuple[float, float, float, float] | np.ndarray | SuggestedRegion


def open_cache(path: str | Path, layer: str | None = None) -> FeatureCache:
    """A cache folder, checked (a CacheError says what is wrong with it), searched at `layer` (None: the first
    of its layers; `cache.layers` lists them)."""
    return FeatureCache.open(path, layer)


def suggest(cache: FeatureCache, image_id: int | None = None, image: Image.Image | str | Path | None = None,
            count: int = 5) -> list[SuggestedRegion]:
    """Suggested regions of a cached image (`image_id`) or of any image (`image`, encoded with the cache's
    model), best first; each has `.box` (display pixels) and can be passed as `region=` to `search`."""
    features, content = _query(cache, image_id, image)
    return suggest_regions(features, cache.image_size, content, count)


def search(cache: FeatureCache, region: Region, image_id: int | None = None,
           image: Image.Image | str | Path | None = None, k: int = 20, where: Mapping[str, Any] | None = None,
           per_group: str | None = None, exclude_query: bool = False, mode: str = "auto") -> pd.DataFrame:
    """The top-k hits as a DataFrame (the page's CSV columns: rank, id, path, score, the window in cells and in
    display pixels, then the metadata).

    `region`: a box (x0, y0, x1, y1) in display pixels, a mask (boolean or soft, at display size or on the
    feature grid), or a suggested region. `where`: {column: value or [values]}, a list column matching when it
    contains any of them. The query is a cached image (`image_id`) or any image (`image`: PIL or a file)."""
    features, content = (None, None) if image is None else _query(cache, None, image)
    request = SearchRequest(cache=cache, weights=_weights(region, cache.image_size, cache.grid), image_id=image_id,
                            features=features, content=content, k=k, flt=_filter(cache, where),
                            per_group=per_group, exclude_query=exclude_query, mode=mode)
    return search_regions(request).hits


def show(cache: FeatureCache, hits: pd.DataFrame, columns: int = 5, tile: int = 160,
         caption: str | None = None) -> Image.Image:
    """The hits as one picture: each image with its matched window outlined, its rank, score and (by default)
    the cache's label column beneath."""
    caption = caption if caption is not None else cache.label_column
    rows = max(1, -(-len(hits) // columns))
    text_height = 30
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (_, hit) in enumerate(hits.iterrows()):
        window = tuple(int(hit[c]) for c in ("x0", "y0", "x1", "y1"))
        picture = rendering.draw_window(cache.load_image(int(hit["id"])), window)
        picture.thumbnail((tile, tile))
        x, y = (n % columns) * tile, (n // columns) * (tile + text_height)
        sheet.paste(picture, (x + (tile - picture.width) // 2, y))
        line = f"#{hit['rank']}  {hit['score']:.3f}"
        if caption and caption in hits.columns:
            line += f"  {hit[caption]}"
        draw.text((x + 4, y + tile + 6), line[:28], fill=(0, 0, 0))
    return sheet


def _query(cache: FeatureCache, image_id: int | None, image) -> tuple[np.ndarray, tuple | None]:
    if (image_id is None) == (image is None):
        raise QueryError("give a query image: image_id (a cached image) or image (a file or PIL image), not both")
    if image_id is not None:
        return cache.image_features(cache.check_id(image_id)), cache.content_box(image_id)
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    encoded = encode_image(cache.manifest, image)
    return encoded.features, encoded.content


def _weights(region: Region, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    if isinstance(region, SuggestedRegion):
        return region.weights(size, grid)
    array = np.asarray(region)
    if array.shape == (4,):
        return mask_to_grid(box_mask(size, [float(v) for v in array]), grid)
    return display_mask_to_grid(array, size, grid)  # a mask at display size or on the grid; else QueryError


def _filter(cache: FeatureCache, where: Mapping[str, Any] | None) -> MetadataFilter:
    store = cache.metadata
    equals: dict[str, Sequence[Any]] = {}
    contains: dict[str, Sequence[Any]] = {}
    for column, value in (where or {}).items():
        if column not in store.column_types:
            raise FilterError(f"where: no column '{column}'; columns: {', '.join(store.columns)}")
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        (contains if store.is_list(column) else equals)[column] = values
    return MetadataFilter(equals=equals, contains_any=contains)
