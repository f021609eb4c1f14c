"""Process-wide shared objects: opened caches, the demo cache's first build, memoised searches and uploads.

Memory-mapped features, DuckDB connections and models are opened once per process and shared by every session
(`st.cache_resource`); search results and encoded uploads are memoised by Streamlit (`st.cache_data`), so a
rerun that does not change the search does not search again.
"""

from __future__ import annotations

import atexit
import gc
import threading
from pathlib import Path

import numpy as np
import streamlit as st
from streamlit import runtime

from cache_builder.build import BuildOptions, build_cache
from cache_builder.cache_format import MANIFEST_FILE
from cache_builder.errors import BuildError
from cache_builder.sources import parse_source
from dashboard import catalog, distributed, metadata, search, settings, two_tier
from dashboard.feature_cache import FeatureCache
from dashboard.proposals import SuggestedRegion, suggest_regions
from dashboard.query_encoder import EncodedImage, encode_image
from dashboard.search import SearchRequest, SearchResult
from dashboard.ui.access import hosted, secret
from dashboard.uploads import read_upload

_demo_lock = threading.Lock()
_by_fingerprint = {SearchRequest: SearchRequest.fingerprint}


@atexit.register
def _release_at_exit() -> None:
    """Drop the shared caches and close their DuckDB connections while the interpreter is still whole: left to
    the interpreter's teardown, DuckDB's bindings print ~40 "nanobind: leaked ..." lines when the app stops."""
    if runtime.exists():  # the app's server (not a test or script that imported this module)
        st.cache_resource.clear()
        st.cache_data.clear()
    metadata.close_all_stores()
    gc.collect()


def caches_root() -> Path:
    return settings.current().caches_root(secret("caches_dir"))


@st.cache_resource(show_spinner=False, max_entries=8, on_release=lambda cache: cache.search.close())
def _open_cache(path: str, manifest_mtime: float, layer: str | None) -> FeatureCache:
    """`manifest_mtime` is part of the key so a rebuilt cache is reopened. With `VFS_RAY_ADDRESS` set, the
    cache's shards are served by Ray actors on that cluster, started here once per process, cache and layer."""
    cache = FeatureCache.open(path, layer)
    address = distributed.ray_address()
    return distributed.serve(cache, address) if address else cache


def load_cache(path: Path, layer: str | None = None) -> FeatureCache:
    """One memory map and DuckDB connection per cache and layer per process, shared by every session."""
    return _open_cache(str(path), (Path(path) / MANIFEST_FILE).stat().st_mtime, layer)


@st.cache_data(max_entries=32, show_spinner="Searching...", hash_funcs=_by_fingerprint)
def run_search(request: SearchRequest) -> SearchResult:
    return search.search_regions(request)


@st.cache_data(max_entries=32, show_spinner=False, hash_funcs=_by_fingerprint)
def hit_heat_maps(request: SearchRequest, ids: tuple[int, ...]) -> np.ndarray:
    """Every window's score for the hits `ids` of the request's search, in one call."""
    return search.heat_maps(request.cache, run_search(request), ids)


@st.cache_data(max_entries=8, show_spinner="Measuring the two-tier search's recall on a sample of the cache...",
               hash_funcs={FeatureCache: lambda cache: (str(cache.path), cache.first_stage().info["signature"])})
def recall_estimate(cache: FeatureCache, depth_share: float) -> two_tier.RecallEstimate:
    """recall@10 of approx vs exact for this cache and index at the share of images a search reranked (a small
    cache's 1,000-image minimum is a large share), measured once per process and share (about a second)."""
    return two_tier.estimate_recall(cache, depth_share=depth_share)


@st.cache_data(max_entries=64, show_spinner=False)
def suggested_regions(features: np.ndarray, image_size: tuple[int, int],
                      content: tuple[int, int, int, int] | None) -> list[SuggestedRegion]:
    """The query's suggested regions, once per image (about 20 ms each on 2 cores: not at every rerun)."""
    return suggest_regions(features, image_size, content)


@st.cache_data(max_entries=16, show_spinner="Encoding the upload with the cache's model...")
def encode_upload(cache_path: str, data: bytes, name: str, max_bytes: int, layer: str | None = None) -> EncodedImage:
    """Uploads stay in memory; the same bytes are encoded once per process and layer."""
    image = read_upload(data, name=name, max_bytes=max_bytes)
    return encode_image(load_cache(Path(cache_path), layer).manifest, image)


def _has_usable_cache(root: Path) -> bool:
    return any(entry.problem is None for entry in catalog.find_caches(root))


def ensure_demo_cache_ui() -> None:
    """First start: build the demo cache with a visible progress bar (once per process, other sessions wait)."""
    root = caches_root()
    if _has_usable_cache(root):
        return
    if hosted():
        st.error(f"No usable cache in `{root}`. An administrator can build one with "
                 "`python -m cache_builder build --source ... --out <caches folder>/<name>`.")
        st.stop()
    with _demo_lock:
        if _has_usable_cache(root):
            return
        st.title("Visual Feature Search")
        st.info("First start: building the demo cache (1,500 synthetic camera-trap images, EfficientNet-Lite0 "
                "at an early layer and the last). "
                "This happens once and takes a few minutes on a laptop CPU.")
        bar = st.progress(0.0, text="loading the model...")

        def report(done: int, total: int) -> None:
            bar.progress(done / total, text=f"extracting features: {done:,} / {total:,} images")

        try:
            build_cache([parse_source("demo")], root / catalog.DEMO_CACHE_NAME,
                        BuildOptions(model="efficientnet_lite0", layers=catalog.DEMO_LAYERS), on_progress=report)
        except BuildError as exc:
            st.error(f"Could not build the demo cache: {exc}")
            st.stop()
        bar.progress(1.0, text="demo cache ready")
    st.rerun()
