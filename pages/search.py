"""Search page: pick a query image, highlight a region, see the images whose best window matches it."""

from __future__ import annotations

import hashlib
import time

import streamlit as st

from dashboard import analysis, charts, export, rendering, ui
from cache_builder.cache_format import CacheError
from dashboard.metadata import FilterError
from dashboard.search import QueryError, RegionQuery, mask_to_grid, search_cache, window_score_map
from dashboard.share import MAX_K, SearchState, from_params, to_params
from dashboard.uploads import MAX_UPLOAD_BYTES, UploadError

HITS_PER_ROW = 5
KEY_COLUMNS = ("domain", "location", "label", "species", "diagnoses", "split")

ui.access_gate_ui()  # also here: Streamlit can serve a file of pages/ directly, bypassing app.py
st.title("Search by region")

# ---- state from a shared link, applied once per session
if "link_state" not in st.session_state:
    link, problems = from_params(st.query_params)
    st.session_state.link_state = link
    st.session_state.link_problems = problems
    if link.image_id is not None:
        st.session_state.query_id = link.image_id
    if link.region is not None:
        st.session_state.preset_region = (link.image_id, link.region)
link: SearchState = st.session_state.link_state
for problem in st.session_state.pop("link_problems", []):
    st.warning(problem)

entry, cache = ui.open_cache_ui(link.cache, key="search-cache")
store = cache.metadata
grid = cache.grid[:2]

# ---- options
with st.sidebar:
    k = st.number_input("Number of hits (k)", min_value=1, max_value=MAX_K, value=link.k, key="k")
    flt = ui.filters_ui(store, link.flt, key="search-filter")
    group_options = [None] + [c for c in store.chartable_columns() if not store.is_list(c)]
    per_group = st.selectbox("Best image per group", group_options,
                             index=group_options.index(link.per_group) if link.per_group in group_options else 0,
                             format_func=lambda c: "(off)" if c is None else c, key="per-group",
                             help="Keep only the best-matching image of each value, e.g. one hit per location.")
    exclude_query = st.checkbox("Exclude the query image", value=link.exclude_query, key="exclude-query")
    show_heat = st.checkbox("Similarity heat map on hits", value=False, key="heat")

# ---- query image
source = st.radio("Query image", ["From the dataset", "Upload an image"], horizontal=True, key="query-source")
features = None
query_key = None
if source == "From the dataset":
    st.session_state.setdefault("query_id", 0)
    if st.session_state.query_id >= cache.size:
        st.session_state.query_id = 0
    left, right = st.columns([3, 1])
    left.number_input(f"Image id (0-{cache.size - 1})", min_value=0, max_value=cache.size - 1, key="query_id")
    right.button("Random image", width="stretch", on_click=ui.pick_random_query, args=(cache.size,))
    query_id = int(st.session_state.query_id)
    query_image = cache.load_image(query_id)
    features = cache.image_features(query_id)
    query_key = f"id:{query_id}"
    row = store.rows([query_id]).iloc[0]
    st.caption(" · ".join(f"{c}: {ui.format_value(row[c])}" for c in ["path", *KEY_COLUMNS] if c in row.index))
else:
    query_id = None
    upload = st.file_uploader("JPEG, PNG or WebP", type=["jpg", "jpeg", "png", "webp"], key="upload")
    if upload is None:
        st.info("Upload an image to search with it; it is encoded with this cache's model and layer.")
        st.stop()
    data = upload.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        query_image, features = ui.encode_upload(str(entry.path), data, upload.name, MAX_UPLOAD_BYTES)
    except (UploadError, CacheError) as exc:
        st.error(str(exc))
        st.stop()
    query_key = f"upload:{digest}"

# ---- region
tools = st.columns([2, 2, 2])
mode = tools[0].radio("Tool", ["freedraw", "rect"], horizontal=True, key="tool",
                      format_func=lambda m: {"freedraw": "Brush", "rect": "Rectangle"}[m])
width = tools[1].slider("Brush width", 5, 80, 30, key="brush")
show_grid = tools[2].checkbox("Show feature grid", value=False, key="show-grid")
canvas_column, hint_column = st.columns([3, 2])
with canvas_column:
    drawn = ui.region_ui(query_image, grid, key=f"canvas-{entry.name}-{query_key}", show_grid=show_grid,
                         mode=mode, stroke_width=width)
    drawn = None if drawn is None else mask_to_grid(drawn, grid)
preset = st.session_state.get("preset_region")
weights = drawn
if weights is None and preset is not None and preset[0] == query_id:
    weights = preset[1]
with hint_column:
    st.markdown("Draw over the part of the image to search for. Undo and clear are in the canvas toolbar.")
    if drawn is None and weights is not None:
        st.image(rendering.grid_overlay(rendering.region_overlay(query_image, weights), grid),
                 caption="Region from the link or the clicked hit (draw to replace it)", width=224)

state = SearchState(cache=entry.name, image_id=query_id, region=weights, k=int(k), flt=flt,
                    per_group=per_group, exclude_query=exclude_query)
st.query_params.from_dict(to_params(state))
if weights is None:
    st.info("Highlight a region of the query image to search.")
    st.stop()

# ---- search (only when something that matters changed)
try:
    query = RegionQuery.from_grid_mask(features, weights)
except QueryError as exc:
    st.warning(str(exc))
    st.stop()
search_key = (str(entry.path), cache.manifest.created, query_key, weights.tobytes(), repr(flt), int(k), per_group,
              exclude_query and query_id is not None)
memo = st.session_state.get("search_memo")
if memo is None or memo["key"] != search_key:
    started = time.perf_counter()
    try:
        result = search_cache(cache, query, k=int(k), flt=flt, per_group=per_group,
                              exclude_id=query_id if exclude_query else None)
    except (QueryError, FilterError) as exc:
        st.error(str(exc))
        st.stop()
    memo = {"key": search_key, "result": result, "elapsed": time.perf_counter() - started, "searched": None}
    st.session_state.search_memo = memo
result, elapsed = memo["result"], memo["elapsed"]
hits = result.hits
st.caption(f"Searched {result.searched_count:,} of {cache.size:,} images in {elapsed * 1000:.0f} ms.")
if hits.empty:
    st.warning("No image matches the filters: widen or clear them in the sidebar.")
    st.stop()

# ---- hits
st.subheader(f"Top {len(hits)}")
for start in range(0, len(hits), HITS_PER_ROW):
    for column, (_, hit) in zip(st.columns(HITS_PER_ROW), hits.iloc[start:start + HITS_PER_ROW].iterrows()):
        hit_id = int(hit["id"])
        picture = cache.load_image(hit_id)
        if show_heat:
            heat = window_score_map(cache.features(), cache.sqnorms, query, hit_id)
            picture = rendering.heatmap_overlay(picture, heat, grid, query.box)
        picture = rendering.draw_window(picture, (hit["x0"], hit["y0"], hit["x1"], hit["y1"]))
        column.image(picture, width="stretch")
        column.markdown(f"**#{hit['rank']}** · {hit['score']:.3f} · id {hit_id}")
        column.caption(" · ".join(ui.format_value(hit[c]) for c in KEY_COLUMNS if c in hit.index))
        column.button("Search from here", key=f"requery-{hit_id}", on_click=ui.requery,
                      args=(hit_id, hit, grid))

# ---- charts
st.subheader("Hits by metadata")
chartable = store.chartable_columns()
if chartable:
    default = chartable.index("domain") if "domain" in chartable else 0
    by = st.selectbox("Group by", chartable, index=default, key="chart-column")
    if memo["searched"] is None:  # metadata of every searched image, fetched once per search, not per rerun
        memo["searched"] = store.rows(result.scores["id"], [c for c in store.columns if c != "path"])
    searched = memo["searched"]
    left, right = st.columns(2)
    shares = analysis.composition(hits, searched, by)
    left.plotly_chart(charts.paired_bars(shares, ("hits_share", "searched_share"), "share",
                                         f"Top-{len(hits)} composition by {by} vs the searched set"),
                      width="stretch")
    distribution = analysis.score_distribution(result.scores, searched, by)
    right.plotly_chart(charts.score_histogram(
        distribution, f"Scores of all {result.searched_count:,} searched images by {by}"), width="stretch")
    label_columns = [c for c in ("species", "label", "diagnoses") if c in store.columns]
    if query_id is not None and label_columns:
        label = label_columns[0]
        agreement = analysis.label_agreement(hits, row[label], label, "domain" if "domain" in hits else None)
        left.plotly_chart(charts.agreement_bars(
            agreement, f"Hits with the query's {label} ({ui.format_value(row[label])})"), width="stretch")
    for list_column in [c for c in store.columns if store.is_list(c)]:
        enrichment = analysis.value_enrichment(hits, searched, list_column)
        right.plotly_chart(charts.paired_bars(enrichment, ("hit_rate", "prevalence"), "rate",
                                              f"{list_column}: rate among hits vs prevalence"), width="stretch")

# ---- table and downloads
st.subheader("Results table")
st.dataframe(hits, width="stretch", hide_index=True)
left, right = st.columns(2)
left.download_button("Download CSV", export.to_csv(hits), file_name=f"{entry.name}-hits.csv", mime="text/csv",
                     key="download-csv")
right.download_button("Download Parquet", export.to_parquet(hits), file_name=f"{entry.name}-hits.parquet",
                      mime="application/octet-stream", key="download-parquet")
