"""Compare page: one query region, of a cached image or an upload, searched in two caches of the same dataset
(two models, or two layers: of two caches or of one multi-layer cache)."""

from __future__ import annotations

import hashlib

import streamlit as st

from cache_builder.cache_format import CacheError

from dashboard import analysis, catalog, geometry, rendering
from dashboard.geometry import QueryError
from dashboard.search import SearchRequest
from dashboard.share import SearchState, link_once, to_params
from dashboard.ui import access, resources, widgets

HITS_PER_ROW = 4

access.access_gate_ui()  # also here: Streamlit can serve a file of pages/ directly, bypassing app.py
st.title("Compare two caches")
link, new_link = link_once(st.session_state, "compare-link", st.query_params)
for problem in link.problems if new_link else []:
    st.warning(problem)
entry_a, cache_a = widgets.open_cache_ui(link.params.get("a"), key="compare-a", label="Cache A",
                                         layer=link.params.get("layer_a"))
# B defaults to another layer of the same cache, else another cache of the same images: the same cache and
# layer on both sides compares nothing
companion = catalog.companion(catalog.find_caches(resources.caches_root()), entry_a, cache_a.layer) or (None, None)
default_b, default_layer_b = (link.params["b"], link.params.get("layer_b")) if "b" in link.params else companion
entry_b, cache_b = widgets.open_cache_ui(default_b, key="compare-b", label="Cache B", report_skipped=False,
                                         layer=default_layer_b)
sides = {"A": (entry_a, cache_a), "B": (entry_b, cache_b)}
with st.sidebar:
    k = st.number_input("Number of hits (k)", min_value=1, max_value=200, value=link.number("k", 1, 200) or 10,
                        key="compare-k")
problem = analysis.dataset_mismatch(cache_a.metadata.rows(None, ["path"])["path"],
                                    cache_b.metadata.rows(None, ["path"])["path"])
problem = problem or analysis.framing_mismatch(cache_a.manifest.frame, cache_a.image_size,
                                               cache_b.manifest.frame, cache_b.image_size)
if problem:
    st.error(f"{entry_a.name} and {entry_b.name} cannot be compared: {problem}")
    st.stop()

source = st.radio("Query image", ("From cache A", "Upload an image"), horizontal=True, key="compare-source")
encoded = {}  # per side: the upload encoded with its cache's own model and layer
if source == "From cache A":
    if new_link and link.state.image_id is not None and link.state.image_id < cache_a.size:
        st.session_state["compare-id"] = link.state.image_id
    st.number_input(f"Query image id (0-{cache_a.size - 1})", min_value=0, max_value=cache_a.size - 1,
                    key="compare-id")
    image_id = int(st.session_state["compare-id"])
    query_image, canvas_key = cache_a.load_image(image_id), f"id:{image_id}"
else:
    image_id = None
    data, name = widgets.upload_ui("compare-upload", "Upload an image: it is encoded with each cache's own model "
                                   "and layer, then searched in both.")
    encoded = dict(zip(sides, widgets.encoded_upload_ui([cache_a, cache_b], data, name)))
    query_image, canvas_key = encoded["A"].image, f"upload:{hashlib.sha256(data).hexdigest()[:16]}"
drawn = widgets.region_ui(query_image, cache_a.grid, key=f"compare-canvas-{canvas_key}")
linked = link.state.region
if drawn is None and linked is not None and image_id is not None and link.state.image_id == image_id \
        and linked.shape == cache_a.grid:
    drawn = linked  # the link's region (on cache A's grid), until one is drawn
    st.caption("Region from the link (draw to replace it).")
if image_id is not None:  # an upload cannot travel in a link
    layer_params = {f"layer_{side.lower()}": cache.layer for side, (_, cache) in sides.items() if len(cache.layers) > 1}
    st.query_params.from_dict({"a": entry_a.name, "b": entry_b.name, **layer_params,
                               **to_params(SearchState(image_id=image_id, region=drawn, k=int(k)))})
if drawn is None:
    st.info("Highlight a region of the query image; it is searched in both caches.")
    st.stop()

results = {}
for side, (entry, cache) in sides.items():
    try:
        query = ({"image_id": image_id, "exclude_query": True} if image_id is not None else
                 {"features": encoded[side].features, "content": encoded[side].content})
        weights = geometry.resample_region(drawn, cache.image_size, cache.grid)  # drawn on A's grid
        request = SearchRequest(cache=cache, weights=weights, k=int(k), **query)
        results[side] = resources.run_search(request).hits
    except QueryError as exc:
        st.warning(f"{side} ({entry.name} {cache.layer}): {exc}")
        st.stop()
    except CacheError as exc:  # a shard its Ray actors could not serve, named
        st.error(f"{side} ({entry.name} {cache.layer}): {exc}")
        st.stop()

overlap = analysis.overlap(list(results["A"]["id"]), list(results["B"]["id"]))
st.metric("Shared hits", f"{len(overlap['common'])} of {int(k)}", help=f"Jaccard {overlap['jaccard']:.2f}")
for column, (side, (entry, cache)) in zip(st.columns(2), sides.items()):
    manifest = cache.manifest
    column.subheader(f"{side} · {entry.name}: {manifest.model} {manifest.layer}")
    hits = results[side]
    for start in range(0, len(hits), HITS_PER_ROW):
        for cell, (_, hit) in zip(column.columns(HITS_PER_ROW), hits.iloc[start:start + HITS_PER_ROW].iterrows()):
            picture = rendering.draw_window(cache.load_image(int(hit["id"])),
                                            (hit["x0"], hit["y0"], hit["x1"], hit["y1"]))
            cell.image(picture, width="stretch")
            shared = "shared" if int(hit["id"]) in overlap["common"] else f"only in {side}"
            cell.caption(f"#{hit['rank']} · {hit['score']:.3f} · id {int(hit['id'])} · {shared}")
