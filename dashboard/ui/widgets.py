"""Widgets: each `*_ui` function draws its widgets and returns a plain value (an entry, a filter, grid weights)."""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image

from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError
from dashboard import analysis, catalog, geometry
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataFilter, MetadataStore
from dashboard.query_encoder import EncodedImage
from dashboard.rendering import grid_overlay
from dashboard.ui import resources
from dashboard.ui.resources import caches_root, load_cache
from dashboard.uploads import MAX_UPLOAD_BYTES, UploadError

REGION_OVERRIDE_KEY = "region_override"  # grid weights that replace the canvas: AppTest cannot draw


def open_cache_ui(default: str | None, key: str, label: str = "Cache", report_skipped: bool = True,
                  layer: str | None = None, layer_key: str | None = None,
                  pick_layer: bool = True) -> tuple[catalog.CacheEntry, FeatureCache]:
    """Sidebar cache choice (and layer choice under `layer_key`, for a cache of several layers, `layer`
    preselected; none where the page does not search: `pick_layer` False), opened; stops the page with a message
    when there is nothing usable to open."""
    with st.sidebar:
        entry = cache_picker_ui(catalog.find_caches(caches_root()), default, key, label, report_skipped)
        if entry is None:
            st.stop()
        chosen = layer_picker_ui(entry.manifest, layer, layer_key or f"{key}-layer") if pick_layer else None
    try:
        return entry, load_cache(entry.path, chosen)
    except CacheError as exc:
        st.error(str(exc))
        st.stop()


def layer_picker_ui(manifest: fmt.Manifest, default: str | None, key: str) -> str:
    """The layer to search, chosen in a selectbox when the cache holds several (each shown with its grid)."""
    names = manifest.layer_names
    if st.session_state.get(key) not in names:  # another cache was chosen: its own default
        st.session_state.pop(key, None)
    if len(names) == 1:
        return names[0]
    grids = {name: "x".join(map(str, manifest.at_layer(name).grid)) for name in names}
    position = {} if key in st.session_state else {"index": names.index(default) if default in names else 0}
    return st.selectbox("Layer", names, key=key, format_func=lambda name: f"{name} ({grids[name]})",
                        help="This cache holds several layers of its model: early layers match texture and colour, "
                        "late ones objects. The Layers view searches every one of them.", **position)


def cache_picker_ui(entries: list[catalog.CacheEntry], default: str | None, key: str, label: str = "Cache",
                    report_skipped: bool = True) -> catalog.CacheEntry | None:
    """A selectbox over the usable caches; returns the chosen entry (None when there is none)."""
    usable = [e for e in entries if e.problem is None]
    for broken in (e for e in entries if e.problem is not None and report_skipped):
        st.caption(f"Skipped cache `{broken.name}`: {broken.problem}")
    if not usable:
        st.warning("No usable cache. Build one: `python -m cache_builder build --source demo --out caches/demo`.")
        return None
    names = [e.name for e in usable]
    index = names.index(default) if default in names else 0

    # a value already in session state (set by another page) wins; passing an index too would warn
    position = {} if st.session_state.get(key) in names else {"index": index}
    name = st.selectbox(label, names, key=key, **position)  # the name alone: the sidebar cuts long options
    manifest = usable[names.index(name)].manifest
    h, w, c = manifest.grid
    layers = f"{len(manifest.layer_names)} layers" if len(manifest.layer_names) > 1 else f"{manifest.layer} " \
        f"({h}x{w}x{c})"
    st.caption(f"{manifest.model} {layers} · {manifest.image_count:,} images")
    return usable[names.index(name)]


NO_GROUPS = ("No metadata column has between 2 and 60 values to group the hits by (e.g. no domain column in this "
             "cache), so there are no composition charts.")


def group_by_ui(options: list[str], label_column: str | None, title: str, key: str) -> str | None:
    """The column to chart the hits by, defaulting as `analysis.default_group_column` says; None, with a line
    saying why, when no column has enough values to group by."""
    if not options:
        st.caption(NO_GROUPS)
        return None
    default = analysis.default_group_column(options, label_column)
    return st.selectbox(title, options, index=options.index(default), key=key)


def upload_ui(key: str, hint: str) -> tuple[bytes, str]:
    """An image upload's bytes and name; until one is given, `hint` and the page stops."""
    upload = st.file_uploader("JPEG, PNG or WebP", type=["jpg", "jpeg", "png", "webp"], key=key)
    if upload is None:
        st.info(hint)
        st.stop()
    return upload.getvalue(), upload.name


def encoded_upload_ui(caches: list[FeatureCache], data: bytes, name: str) -> list[EncodedImage]:
    """The upload encoded by each cache's own model and layer; a file that is not a usable image gets a message
    and the page stops (the app keeps working)."""
    try:
        return [resources.encode_upload(str(cache.path), data, name, MAX_UPLOAD_BYTES, cache.layer)
                for cache in caches]
    except (UploadError, CacheError) as exc:
        st.error(str(exc))
        st.stop()


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


def region_ui(image: Image.Image, grid: tuple[int, int], key: str, show_grid: bool = False,
              mode: str = "freedraw", stroke_width: int = 30) -> np.ndarray | None:
    """Draw on the image as the model sees it; returns the region as (H, W) grid weights, None until drawn.

    Grid weights placed in `st.session_state[REGION_OVERRIDE_KEY]` replace the canvas (AppTest cannot draw on a
    custom component; the browser test drives the real canvas).
    """
    # imported here: the component declares itself on import, which fails outside a running app (tests, CLI)
    from streamlit_drawable_canvas import st_canvas

    width, height = geometry.display_size(image.size)
    background = image.resize((width, height), Image.Resampling.NEAREST)
    if show_grid:
        background = grid_overlay(background, grid)
    result = st_canvas(
        fill_color="rgba(255, 80, 0, 0.35)", stroke_width=stroke_width, stroke_color="rgba(255, 80, 0, 0.7)",
        background_image=background, update_streamlit=True, height=height, width=width,
        drawing_mode=mode, return_image_data=True, key=key,
    )
    override = st.session_state.get(REGION_OVERRIDE_KEY)
    if override is not None:  # made on one layer's grid, it covers the same pixels on any other
        return geometry.resample_region(override, (image.height, image.width), grid)
    data = result.image_data if result is not None else None
    if data is None or data.ndim != 3 or not np.any(data[..., 3] > 0):
        return None
    return geometry.mask_to_grid(data[..., 3] > 0, grid)
