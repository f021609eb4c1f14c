"""The Search page's state between reruns, under named keys: which image is the query and which region wins.

Pages, widget callbacks and other pages (Dataset's *Use as query*) talk to the Search page only through this
class. It works on any mutable mapping: `st.session_state` in the app, a dict in tests, so no Streamlit here.

Which region is searched, in order: one drawn on the canvas; else one preset for the current query image, by
a shared link, a clicked hit or a clicked suggestion; else none (the page asks for one). A query image is named
by its id, or for an upload by a token of its bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping

import numpy as np

from dashboard import geometry
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataStore
from dashboard.proposals import suggest_regions
from dashboard.share import SearchState, link_once

FROM_DATASET = "From the dataset"
UPLOAD = "Upload an image"
QUERY_SOURCES = (FROM_DATASET, UPLOAD)


@dataclass(frozen=True)
class Region:
    weights: np.ndarray  # (H, W) on the cache's feature grid
    origin: str  # "drawn" or "preset" (from a link, a clicked hit or a clicked suggestion)


class SearchSession:
    QUERY_ID = "query_id"
    QUERY_SOURCE = "query-source"
    CACHE = "search-cache"  # the Search page's cache selectbox
    LAYER = "search-layer"  # its layer selectbox (a cache of several layers)
    VIEW = "search-view"  # share.VIEWS: one layer's top hits, or the Layers view
    PRESET_REGION = "preset_region"  # (query image, grid weights) from a link, a clicked hit or a suggestion
    CANVAS_ROUND = "canvas_round"  # bumped to give the canvas a new key: a clicked suggestion clears a drawing
    STARTED = "started"  # the session's first view has been set up
    STARTER = "starter_image"  # the query image the first view chose, while its preselected region stands
    LINK = "link_state"
    LINK_PROBLEMS = "link_problems"

    def __init__(self, state: MutableMapping[str, Any]):
        self.state = state

    def apply_link_once(self, params: Mapping[str, Any]) -> SearchState:
        """The shared link's state, applied to the session the first time only (later reruns keep edits)."""
        link, new = link_once(self.state, self.LINK, params)
        if new:
            self.state[self.LINK_PROBLEMS] = link.problems
            if link.state.image_id is not None:
                self.state[self.QUERY_ID] = link.state.image_id
            if link.state.region is not None:
                self.state[self.PRESET_REGION] = (link.state.image_id, link.state.region)
            self.state[self.VIEW] = link.state.view
        return link.state

    def take_link_problems(self, store: MetadataStore | None = None, layers: list[str] | None = None) -> list[str]:
        """What the link had that could not be used, reported once; with the opened cache's `store` and `layers`,
        also the link's filter values and layer it no longer holds (they would vanish from the widgets without a
        word)."""
        if self.LINK_PROBLEMS not in self.state:
            return []
        problems = self.state.pop(self.LINK_PROBLEMS)
        state = self.state[self.LINK].state
        if store is not None:
            problems = problems + store.absent_filter_values(state.flt)
        if layers is not None and state.layer is not None and state.layer not in layers:
            problems = problems + [f"the link's layer {state.layer!r} is not in this cache (it holds "
                                   f"{', '.join(layers)}); showing {layers[0]}"]
        return problems

    def query_id(self, size: int) -> int:
        """The cached query image's id, reset to 0 when it is not in the current cache."""
        current = self.state.get(self.QUERY_ID, 0)
        if not isinstance(current, (int, np.integer)) or not 0 <= current < size:
            current = 0
        self.state[self.QUERY_ID] = int(current)
        return int(current)

    def region(self, drawn: np.ndarray | None, image: int | str | None, grid: tuple[int, int],
               image_size: tuple[int, int]) -> Region | None:
        """The region to search: the drawn one, else a preset for this query image (made on another layer's grid,
        it is resampled to `grid`: the same pixels)."""
        if drawn is not None:
            return Region(drawn, "drawn")
        preset = self.state.get(self.PRESET_REGION)
        if preset is not None and preset[0] == image:
            return Region(geometry.resample_region(preset[1], image_size, grid), "preset")
        return None

    def clear_region(self) -> None:
        """The Clear button: a fresh canvas and no preset region, so nothing is searched until a new one."""
        self.state.pop(self.PRESET_REGION, None)
        self.state.pop(self.STARTER, None)
        self.state[self.CANVAS_ROUND] = self.canvas_round() + 1

    def open_layer(self, layer: str) -> None:
        """A clicked row of the Layers view: that layer's top hits, with the same region."""
        self.state[self.LAYER] = layer
        self.state[self.VIEW] = "hits"

    # -- callbacks: they run before the next rerun, so they may set widget values

    def pick_random(self, size: int) -> None:
        self.state[self.QUERY_ID] = random.randrange(size)

    def search_from_hit(self, hit_id: int, row: int, col: int, height: int, width: int,
                        grid: tuple[int, int]) -> None:
        """A clicked hit becomes the query, its matched window the region."""
        self.state[self.QUERY_SOURCE] = FROM_DATASET
        self.state[self.QUERY_ID] = int(hit_id)
        self.state[self.PRESET_REGION] = (int(hit_id), geometry.window_region(grid, row, col, height, width))
        self.state.pop(self.STARTER, None)

    def needs_start(self) -> bool:
        """True once, on a session's first view, unless a link or another page already chose the query."""
        if self.STARTED in self.state:
            return False
        self.state[self.STARTED] = True
        return self.QUERY_ID not in self.state

    def start(self, cache: FeatureCache) -> None:
        """The first view's query: the first image whose label names something (not an empty frame), its best
        suggested region preselected, so the first page already shows hits."""
        image_id = cache.metadata.first_labelled_id(cache.label_column) or 0
        top = suggest_regions(cache.image_features(image_id), cache.image_size, cache.content_box(image_id), count=1)
        self.preselect(image_id, top[0].weights(cache.image_size, cache.grid) if top else None)

    def preselect(self, image_id: int, weights: np.ndarray | None) -> None:
        """The first view's query: this image, with `weights` (its best suggested region) preselected, so the
        first page already shows hits."""
        self.state[self.QUERY_ID] = int(image_id)
        if weights is not None:
            self.state[self.PRESET_REGION] = (int(image_id), np.asarray(weights, dtype=np.float32))
            self.state[self.STARTER] = int(image_id)

    def is_starter(self, region: Region | None, image: int | str | None) -> bool:
        """Whether `region` is still the first view's preselected one (the page says so, and how to change it)."""
        return region is not None and region.origin == "preset" and self.state.get(self.STARTER) == image

    def canvas_round(self) -> int:
        return int(self.state.get(self.CANVAS_ROUND, 0))

    def use_suggestion(self, image: int | str, weights: np.ndarray) -> None:
        """A clicked suggested region becomes the region searched, replacing any drawing (a fresh canvas)."""
        self.state[self.PRESET_REGION] = (image, np.asarray(weights, dtype=np.float32))
        self.state[self.CANVAS_ROUND] = self.canvas_round() + 1
        self.state.pop(self.STARTER, None)

    def use_as_query(self, cache_name: str, image_id: int) -> None:
        """Another page hands an image to the Search page."""
        self.state[self.CACHE] = cache_name
        self.state[self.QUERY_SOURCE] = FROM_DATASET
        self.state[self.QUERY_ID] = int(image_id)
        self.state.pop(self.PRESET_REGION, None)
