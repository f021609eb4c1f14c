"""Search page: pick a query image, highlight a region, see the images whose best window matches it."""

from __future__ import annotations

import hashlib

import streamlit as st

from cache_builder.cache_format import CacheError

from dashboard import analysis, charts, export, layer_sweep, rendering, two_tier
from dashboard.export import format_value
from dashboard.geometry import QueryError
from dashboard.metadata import FilterError
from dashboard.search import SearchRequest
from dashboard.search_session import FROM_DATASET, QUERY_SOURCES, SearchSession
from dashboard.share import MAX_K, VIEWS, SearchState, to_params
from dashboard.two_tier import MODES
from dashboard.ui import access, resources, widgets

HITS_PER_ROW = 5
LAYER_HITS = 6  # hits shown per row of the Layers view (the table and CSV hold all k)
LAYER_CHART_HEIGHT = 260
CONTEXT_COLUMNS = ("domain", "location", "split")  # shown under each image, after the manifest's label column

access.access_gate_ui()  # also here: Streamlit can serve a file of pages/ directly, bypassing app.py
st.title("Search by region")
session = SearchSession(st.session_state)
link = session.apply_link_once(st.query_params)
entry, cache = widgets.open_cache_ui(link.cache, key=SearchSession.CACHE, layer=link.layer,
                                     layer_key=SearchSession.LAYER)
store = cache.metadata
for problem in session.take_link_problems(store, cache.layers):
    st.warning(problem)
caption_columns = [c for c in (cache.label_column, *CONTEXT_COLUMNS) if c and c in store.column_types]

# ---- options
with st.sidebar:
    k = st.number_input("Number of hits (k)", min_value=1, max_value=MAX_K, value=link.k, key="k")
    flt = widgets.filters_ui(store, link.flt, key="search-filter")
    group_options = [None] + [c for c in store.chartable_columns() if not store.is_list(c)]
    per_group = st.selectbox("Best image per group", group_options,
                             index=group_options.index(link.per_group) if link.per_group in group_options else 0,
                             format_func=lambda c: "(off)" if c is None else c, key="per-group",
                             help="Keep only the best-matching image of each value, e.g. one hit per location.")
    exclude_query = st.checkbox("Exclude the query image", value=link.exclude_query, key="exclude-query")
    show_heat = st.checkbox("Similarity heat map on hits", value=False, key="heat")
    search_mode = st.radio("Search mode", MODES, index=MODES.index(link.mode), horizontal=True, key="search-mode",
                           help="exact: every image scored exactly. approx: two-tier, a first stage over the "
                           "cache's index picks candidates that are scored exactly. auto: exact while the cache "
                           "fits in RAM, two-tier beyond.")

# ---- query image
source = st.radio("Query image", QUERY_SOURCES, horizontal=True, key=SearchSession.QUERY_SOURCE)
query_id = features = content = row = None
if source == FROM_DATASET:
    if session.needs_start():  # first view, no query from a link: an image that shows something, already searched
        session.start(cache)
    session.query_id(cache.size)
    left, right = st.columns([3, 1])
    left.number_input(f"Image id (0-{cache.size - 1})", min_value=0, max_value=cache.size - 1,
                      key=SearchSession.QUERY_ID)
    right.button("Random image", width="stretch", on_click=session.pick_random, args=(cache.size,))
    query_id = int(st.session_state[SearchSession.QUERY_ID])
    query_image = cache.load_image(query_id)
    canvas_key = f"id:{query_id}"
    query_features, query_content = cache.image_features(query_id), cache.content_box(query_id)
    row = store.rows([query_id]).iloc[0]
    st.caption(" · ".join(f"{c}: {format_value(row[c])}" for c in ["path", *caption_columns]))
else:
    data, name = widgets.upload_ui("upload", "Upload an image to search with it; it is encoded with this cache's "
                                   "model and layer.")
    encoded, = widgets.encoded_upload_ui([cache], data, name)
    query_image, features, content = encoded.image, encoded.features, encoded.content
    canvas_key = f"upload:{hashlib.sha256(data).hexdigest()[:16]}"
    query_features, query_content = features, content
query_name = query_id if query_id is not None else canvas_key  # what a preset region belongs to

# ---- region
tools = st.columns([2, 2, 1.2, 0.8])
mode = tools[0].radio("Tool", ["freedraw", "rect"], horizontal=True, key="tool",
                      format_func=lambda m: {"freedraw": "Brush", "rect": "Rectangle"}[m])
width = tools[1].slider("Brush width", 5, 80, 30, key="brush")
show_grid = tools[2].checkbox("Show feature grid", value=False, key="show-grid")
tools[3].button("Clear region", key="clear-region", on_click=session.clear_region,
                help="Remove the drawing (or the suggested, linked or clicked region) and start again.")
wide = query_image.width >= 1.2 * query_image.height  # a whole wide frame gets the page's width
canvas_column, hint_column = (st.container(), st.container()) if wide else st.columns([3, 2])
with canvas_column:
    drawn = widgets.region_ui(query_image, cache.grid,
                              key=f"canvas-{entry.name}-{canvas_key}-{session.canvas_round()}",
                              show_grid=show_grid, mode=mode, stroke_width=width)
region = session.region(drawn, query_name, cache.grid, cache.image_size)
suggestions = resources.suggested_regions(query_features, cache.image_size, query_content)
with hint_column:
    st.markdown("Draw over the part of the image to search for, or pick a suggested region. Undo and redo are "
                "in the toolbar at the picture's top right corner while the pointer is over it; *Clear region* "
                "starts again.")
    if suggestions:
        st.image(rendering.suggestion_overlay(query_image, [s.box for s in suggestions]), width=224,
                 caption="Suggested regions: what stands out in this image's features")
        buttons = st.columns(len(suggestions))
        for number, (button, suggestion) in enumerate(zip(buttons, suggestions), start=1):
            button.button(str(number), key=f"suggestion-{number}", help=f"Search with suggested region {number}",
                          on_click=session.use_suggestion,
                          args=(query_name, suggestion.weights(cache.image_size, cache.grid)))
    if session.is_starter(region, query_name):
        st.info("To start with, the best suggested region of this image is searched: draw your own region, or "
                "pick another suggestion or image.")
    if region is not None and region.origin == "preset":
        st.image(rendering.grid_overlay(rendering.region_overlay(query_image, region.weights), cache.grid),
                 caption="Region from the link, a clicked hit or a suggestion (draw to replace it)", width=224)

view = VIEWS[0]
if len(cache.layers) > 1:
    view = st.radio("Show", VIEWS, horizontal=True, key=SearchSession.VIEW,
                    format_func=lambda v: {"hits": f"Top hits at {cache.layer}", "layers": "Every layer"}[v],
                    help="Every layer: the same region searched at each layer this cache holds, one row per layer.")
weights = None if region is None else region.weights
st.query_params.from_dict(to_params(SearchState(
    cache=entry.name, image_id=query_id, region=weights, k=int(k), flt=flt, per_group=per_group,
    exclude_query=exclude_query, mode=search_mode, layer=cache.layer if len(cache.layers) > 1 else None, view=view)))
if region is None:
    st.info("Highlight a region of the query image to search.")
    st.stop()

# ---- search (memoised by Streamlit: a rerun that changes nothing that matters does not search again)
try:
    request = SearchRequest(cache=cache, weights=weights, image_id=query_id, features=features, content=content,
                            k=int(k), flt=flt, per_group=per_group,
                            exclude_query=exclude_query and query_id is not None, mode=search_mode)
    if view == "layers":  # every layer's answer, one row each, instead of this layer's page
        layer_caches = [resources.load_cache(entry.path, layer_name) for layer_name in cache.layers]
        uploads = None if features is None else {
            c.layer: e for c, e in zip(layer_caches, widgets.encoded_upload_ui(layer_caches, data, name))}
        answers = [layer_sweep.LayerAnswer(r, resources.run_search(r))
                   for r in layer_sweep.sweep_requests(request, layer_caches, uploads)]
    else:
        result = resources.run_search(request)
except QueryError as exc:
    st.warning(str(exc))
    st.stop()
except (FilterError, CacheError) as exc:  # CacheError: a shard its Ray actors could not serve, named
    st.error(str(exc))
    st.stop()

if view == "layers":
    st.subheader("Every layer")
    st.caption("The same region searched at each layer of the cache (resampled to its grid), with the same "
               "options. Early layers tend to match texture and colour, late ones objects. Open a row to see "
               "that layer's hits and charts.")
    by = widgets.group_by_ui(analysis.group_columns(store.chartable_columns(), store.distinct_counts),
                             cache.label_column, "Composition by", key="layers-by")
    query_label = row[cache.label_column] if row is not None and cache.label_column else None
    for answer in answers:
        info, pictures, chart = st.columns([2, 7, 3])
        h, w, c = answer.grid
        info.markdown(f"**{answer.layer}**  \n{h}x{w} cells, {c} channels")
        info.caption(f"{answer.result.elapsed_s * 1000:.0f} ms · {answer.result.mode.mode}")
        verdict = layer_sweep.label_share(answer.result.hits, cache.label_column, query_label)
        if verdict:
            info.caption(verdict)
        info.button("Open this layer", key=f"layer-row-{answer.layer}", on_click=session.open_layer,
                    args=(answer.layer,), type="primary" if answer.layer == cache.layer else "secondary")
        shown = answer.result.hits.head(LAYER_HITS)
        for cell, (_, hit) in zip(pictures.columns(LAYER_HITS), shown.iterrows()):
            picture = rendering.draw_window(cache.load_image(int(hit["id"])),
                                            (hit["x0"], hit["y0"], hit["x1"], hit["y1"]))
            cell.image(picture, width="stretch")
            cell.caption(f"{hit['score']:.3f}")
        if by is not None:
            shares = analysis.composition(answer.result.hits, answer.result.searched, by)
            chart.plotly_chart(charts.composition_bars(shares, by, f"{answer.layer}: top {len(answer.result.hits)} "
                                                       f"by {by}", height=LAYER_CHART_HEIGHT),
                               width="stretch", key=f"layer-chart-{answer.layer}")
    st.download_button("Download every layer's hits (CSV)", export.to_csv(layer_sweep.sweep_table(answers)),
                       file_name=f"{entry.name}-layers.csv", mime="text/csv", key="download-layers-csv")
    st.stop()
hits = result.hits
recall = resources.recall_estimate(request.cache, result.reranked_share) if result.approximate_scores else None
st.caption(f"Searched {result.searched_count:,} of {cache.size:,} images in {result.elapsed_s * 1000:.0f} ms · "
           + two_tier.mode_summary(result.mode, recall))
if result.mode.warning:
    st.warning(result.mode.warning)
if hits.empty:
    st.warning("No image matches the filters: widen or clear them in the sidebar.")
    st.stop()

# ---- hits
st.subheader(f"Top {len(hits)}")
heat = resources.hit_heat_maps(request, tuple(int(i) for i in hits["id"])) if show_heat else None
for start in range(0, len(hits), HITS_PER_ROW):
    for column, (i, hit) in zip(st.columns(HITS_PER_ROW), hits.iloc[start:start + HITS_PER_ROW].iterrows()):
        hit_id = int(hit["id"])
        picture = cache.load_image(hit_id)
        if heat is not None:
            picture = rendering.heatmap_overlay(picture, heat[i], cache.grid, result.query.box)
        picture = rendering.draw_window(picture, (hit["x0"], hit["y0"], hit["x1"], hit["y1"]))
        column.image(picture, width="stretch")
        column.markdown(f"**#{hit['rank']}** · {hit['score']:.3f} · id {hit_id}")
        known = [v for v in (format_value(hit[c]) for c in caption_columns) if v != "–"]
        if known:
            column.caption(" · ".join(known))
        column.button("Search from here", key=f"requery-{hit_id}", on_click=session.search_from_hit,
                      args=(hit_id, hit["row"], hit["col"], hit["height"], hit["width"], cache.grid))

# ---- charts
st.subheader("Hits by metadata")
searched = result.searched
label = cache.label_column
group_options = analysis.group_columns(store.chartable_columns(), store.distinct_counts)
by = widgets.group_by_ui(group_options, label, "Group by", key="chart-column")
left, right = st.columns(2)
if by is not None:
    shares = analysis.composition(hits, searched, by)
    left.plotly_chart(charts.composition_bars(shares, by, f"Top-{len(hits)} composition by {by} vs the searched set"),
                      width="stretch")
    distribution = analysis.score_distribution(result.scores, searched, by)
    right.plotly_chart(charts.score_histogram(
        distribution, by, f"{result.scores_label} of all {result.searched_count:,} searched images by {by}"),
        width="stretch")
if row is not None and label is not None:
    labels = analysis.label_view(hits, row[label], label, label in group_options)
    if labels.summary is None:
        st.caption(f"The query image has no {label}: no label agreement to show.")
    elif labels.by_domain:  # a bar per domain says whether it holds in each
        agreement = analysis.label_agreement(hits, row[label], label, "domain")
        left.plotly_chart(charts.agreement_bars(
            agreement, f"Hits with the query's {label} ({format_value(row[label])}), by domain"), width="stretch")
    else:  # one domain: a line says it; many classes: which labels the hits carry
        st.caption(labels.summary + (" (the hits come from one domain, or the cache has none)" if labels.one_domain
                                     else ""))
        if labels.counts:
            left.plotly_chart(charts.count_bars(analysis.value_counts(hits, label, limit=15), label,
                                                f"The top hits' {label}s"), width="stretch")
for list_column in [c for c in store.columns if store.is_list(c)]:
    enrichment = analysis.value_enrichment(hits, searched, list_column)
    right.plotly_chart(charts.paired_bars(enrichment, ("hit_rate", "prevalence"), ("among the hits", "prevalence"),
                                          "share of images", list_column,
                                          f"{list_column}: rate among hits vs prevalence"), width="stretch")

# ---- table and downloads
st.subheader("Results table")
st.dataframe(hits, width="stretch", hide_index=True)
left, right = st.columns(2)
left.download_button("Download CSV", export.to_csv(hits), file_name=f"{entry.name}-hits.csv", mime="text/csv",
                     key="download-csv")
right.download_button("Download Parquet", export.to_parquet(hits), file_name=f"{entry.name}-hits.parquet",
                      mime="application/octet-stream", key="download-parquet")
