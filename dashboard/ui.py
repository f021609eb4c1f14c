"""The only dashboard module that imports streamlit: shared, process-wide resources and small widgets."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from dashboard import catalog
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataFilter, MetadataStore

DISPLAY_SIZE = 448  # the drawing canvas: twice the model's usual 224 so a brush can be precise

_demo_lock = threading.Lock()


def caches_root() -> Path:
    return catalog.caches_dir(_secret("caches_dir"))


@st.cache_resource(show_spinner=False, max_entries=8)
def open_cache(path: str, manifest_mtime: float) -> FeatureCache:
    """One memory map and DuckDB connection per cache per process, shared by every session.

    `manifest_mtime` is part of the key so a rebuilt cache is reopened.
    """
    return FeatureCache.open(path)


def load_cache(path: Path) -> FeatureCache:
    return open_cache(str(path), (path / "manifest.json").stat().st_mtime)


def _has_usable_cache(root: Path) -> bool:
    return any(entry.problem is None for entry in catalog.find_caches(root))


def hosted() -> bool:
    """A team deployment (access control configured): the app only reads its caches folder, never writes it."""
    return bool(_secret("password")) or _secret("auth") is not None


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
        from cache_builder.build import BuildOptions, build_cache
        from cache_builder.errors import BuildError
        from cache_builder.sources import parse_source

        st.title("Visual Feature Search")
        st.info("First start: building the demo cache (1,500 synthetic camera-trap images, EfficientNet-Lite0). "
                "This happens once and takes a few minutes on a laptop CPU.")
        bar = st.progress(0.0, text="loading the model...")

        def report(done: int, total: int) -> None:
            bar.progress(done / total, text=f"extracting features: {done:,} / {total:,} images")

        try:
            build_cache([parse_source("demo")], root / catalog.DEMO_CACHE_NAME,
                        BuildOptions(model="efficientnet_lite0"), on_progress=report)
        except BuildError as exc:
            st.error(f"Could not build the demo cache: {exc}")
            st.stop()
        bar.progress(1.0, text="demo cache ready")
    st.rerun()


# ---------------------------------------------------------------------------------------------- widgets

REGION_OVERRIDE_KEY = "region_override"  # tests (AppTest cannot draw) put grid weights here


def open_cache_ui(default: str | None, key: str, label: str = "Cache",
                  report_skipped: bool = True) -> tuple[catalog.CacheEntry, FeatureCache]:
    """Sidebar cache choice, opened; stops the page with a message when there is nothing usable to open."""
    from cache_builder.cache_format import CacheError

    with st.sidebar:
        entry = cache_picker_ui(catalog.find_caches(caches_root()), default, key, label, report_skipped)
    if entry is None:
        st.stop()
    try:
        return entry, load_cache(entry.path)
    except CacheError as exc:
        st.error(str(exc))
        st.stop()


def cache_picker_ui(entries: list[catalog.CacheEntry], default: str | None, key: str, label: str = "Cache",
                    report_skipped: bool = True):
    """A selectbox over the usable caches; returns the chosen entry (None when there is none)."""
    usable = [e for e in entries if e.problem is None]
    for broken in (e for e in entries if e.problem is not None and report_skipped):
        st.caption(f"Skipped cache `{broken.name}`: {broken.problem}")
    if not usable:
        st.warning("No usable cache. Build one: `python -m cache_builder build --source demo --out caches/demo`.")
        return None
    names = [e.name for e in usable]
    index = names.index(default) if default in names else 0

    def describe(name: str) -> str:
        manifest = usable[names.index(name)].manifest
        h, w, c = manifest.grid
        return f"{name} · {manifest.model} {manifest.layer} ({h}x{w}x{c}) · {manifest.image_count:,} images"

    # a value already in session state (set by another page) wins; passing an index too would warn
    position = {} if st.session_state.get(key) in names else {"index": index}
    name = st.selectbox(label, names, format_func=describe, key=key, **position)
    return usable[names.index(name)]


def filters_ui(store: MetadataStore, initial: MetadataFilter, key: str) -> MetadataFilter:
    """One widget per chosen column: values for categories, a range for numbers and dates, 'any of' for lists."""
    candidates = [c for c in store.columns if c not in ("id", "path")]
    preset = [c for c in candidates if c in {**initial.equals, **initial.ranges, **initial.contains_any}]
    chosen = st.multiselect("Filter by", candidates, default=preset, key=f"{key}-columns",
                            help="Only images matching every filter are searched.")
    equals: dict[str, list] = {}
    ranges: dict[str, tuple] = {}
    contains: dict[str, list] = {}
    for column in chosen:
        widget_key = f"{key}-{column}"
        if store.is_list(column):
            options = store.distinct_values(column)
            default = [v for v in initial.contains_any.get(column, []) if v in options]
            picked = st.multiselect(f"{column} contains any of", options, default=default, key=widget_key)
            if picked:
                contains[column] = picked
        elif store.is_numeric(column) or store.is_temporal(column):
            lo, hi = store.value_range(column)
            if lo is None or lo == hi:
                st.caption(f"{column}: a single value ({lo}), nothing to filter")
                continue
            if store.is_temporal(column):
                lo, hi = lo.date() if hasattr(lo, "date") else lo, hi.date() if hasattr(hi, "date") else hi
                picked = st.date_input(column, value=(lo, hi), min_value=lo, max_value=hi, key=widget_key)
                if isinstance(picked, (tuple, list)) and len(picked) == 2 and tuple(picked) != (lo, hi):
                    ranges[column] = (str(picked[0]), f"{picked[1]} 23:59:59.999999")
            else:
                value = initial.ranges.get(column, (lo, hi))
                value = tuple(type(lo)(v) if v is not None else d for v, d in zip(value, (lo, hi)))
                picked = st.slider(column, min_value=lo, max_value=hi, value=value, key=widget_key)
                if tuple(picked) != (lo, hi):
                    ranges[column] = tuple(picked)
        else:
            options = store.distinct_values(column)
            default = [v for v in initial.equals.get(column, []) if v in options]
            picked = st.multiselect(column, options, default=default, key=widget_key,
                                    format_func=lambda v: "(missing)" if v is None else str(v))
            if picked:
                equals[column] = picked
    return MetadataFilter(equals=equals, ranges=ranges, contains_any=contains)


def region_ui(image: Image.Image, grid: tuple[int, int], key: str, show_grid: bool,
              mode: str, stroke_width: int) -> np.ndarray | None:
    """Draw on the image as the model sees it; returns the painted mask, or None while nothing is drawn.

    The mask is at canvas resolution (`dashboard.search.mask_to_grid` turns it into any cache's grid weights).
    Tests cannot draw on the canvas component, so a mask placed in `st.session_state[REGION_OVERRIDE_KEY]`
    (e.g. grid weights) takes precedence; the browser test drives the real canvas.
    """
    from streamlit_drawable_canvas import st_canvas

    from dashboard.rendering import grid_overlay

    display = max(DISPLAY_SIZE, image.width)
    background = image.resize((display, display), Image.Resampling.NEAREST)
    if show_grid:
        background = grid_overlay(background, grid)
    result = st_canvas(
        fill_color="rgba(255, 80, 0, 0.35)", stroke_width=stroke_width, stroke_color="rgba(255, 80, 0, 0.7)",
        background_image=background, update_streamlit=True, height=display, width=display,
        drawing_mode=mode, return_image_data=True, key=key,
    )
    override = st.session_state.get(REGION_OVERRIDE_KEY)
    if override is not None:
        return np.asarray(override, dtype=np.float32)
    data = result.image_data if result is not None else None
    if data is None or data.ndim != 3 or not np.any(data[..., 3] > 0):
        return None
    return data[..., 3] > 0


def format_value(value) -> str:
    """Short display form of a metadata cell: lists joined, missing values as a dash."""
    from dashboard.export import LIST_SEPARATOR, is_list_value

    if is_list_value(value):
        return LIST_SEPARATOR.join(map(str, value)) or "–"
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@st.cache_data(max_entries=16, show_spinner="Encoding the upload with the cache's model...")
def encode_upload(cache_path: str, data: bytes, name: str, max_bytes: int) -> tuple[Image.Image, np.ndarray]:
    """Uploads stay in memory; the same bytes are encoded once per process."""
    from dashboard.query_encoder import encode_image
    from dashboard.uploads import read_upload

    image = read_upload(data, name=name, max_bytes=max_bytes)
    return encode_image(load_cache(Path(cache_path)).manifest, image)


def pick_random_query(size: int) -> None:
    """Button callback: callbacks may set a widget's value, code after the widget may not."""
    import random

    st.session_state.query_id = random.randrange(size)


def requery(hit_id: int, hit: "pd.Series", grid: tuple[int, int]) -> None:
    """Button callback: the clicked hit becomes the query, its matched window the region."""
    region = np.zeros(grid, dtype=np.float32)
    top, left = int(hit["row"]), int(hit["col"])
    region[top:top + int(hit["height"]), left:left + int(hit["width"])] = 1
    st.session_state["query-source"] = "From the dataset"
    st.session_state.query_id = int(hit_id)
    st.session_state.preset_region = (int(hit_id), region)


def use_as_query(cache_name: str, image_id: int) -> None:
    """Hand an image to the search page (its widgets read these keys on their next run)."""
    st.session_state["search-cache"] = cache_name
    st.session_state["query-source"] = "From the dataset"
    st.session_state.query_id = int(image_id)
    st.session_state.pop("preset_region", None)


def _secret(name: str):
    try:
        return st.secrets.get(name)
    except Exception:  # noqa: BLE001 - no or malformed secrets file: behave as if the secret were absent
        return None


def access_gate_ui() -> None:
    """Hosted mode: nothing below this call runs (no page, image or download) before the user is let in.

    A `password` secret asks for that password; an `[auth]` section in secrets uses Streamlit's OIDC login.
    With neither, the app is open (a laptop).
    """
    import hmac

    password = _secret("password")
    if password:
        if st.session_state.get("authenticated"):
            return
        st.title("Visual Feature Search")
        typed = st.text_input("Password", type="password", key="password-input")
        if typed and hmac.compare_digest(str(typed).encode(), str(password).encode()):
            st.session_state.authenticated = True
            st.session_state.pop("password-input", None)
            st.rerun()
        if typed:
            st.error("Wrong password.")
        st.stop()
    if _secret("auth") is not None and not st.user.is_logged_in:
        st.title("Visual Feature Search")
        st.button("Log in", on_click=st.login)
        st.stop()
