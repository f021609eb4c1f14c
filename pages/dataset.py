"""Dataset page: browse and filter the metadata, see counts per column, pick an image as the query."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from dashboard import analysis
from dashboard.export import format_value
from dashboard.metadata import FilterError
from dashboard.search_session import SearchSession
from dashboard.share import SearchState, link_once, to_params
from dashboard.ui import access, widgets

PAGE_SIZE = 24
COLUMNS_PER_ROW = 6

access.access_gate_ui()  # also here: Streamlit can serve a file of pages/ directly, bypassing app.py
st.title("Dataset")
link, new_link = link_once(st.session_state, "dataset-link", st.query_params)
entry, cache = widgets.open_cache_ui(link.state.cache, key="dataset-cache", pick_layer=False)  # metadata only
store = cache.metadata
for note in (link.problems + store.absent_filter_values(link.state.flt)) if new_link else []:
    st.warning(note)
with st.sidebar:
    flt = widgets.filters_ui(store, link.state.flt, key="dataset-filter")
try:
    ids = store.filter_ids(flt)
except FilterError as exc:
    st.error(str(exc))
    st.stop()
st.caption(f"{len(ids):,} of {cache.size:,} images match the filters.")
if len(ids) == 0:
    st.warning("No image matches the filters.")
    st.stop()

table = store.rows(ids)
chartable = store.chartable_columns()
if chartable:
    st.subheader("Counts per column")
    columns = st.columns(min(3, len(chartable)))
    for i, column in enumerate(chartable):
        counts = analysis.value_counts(table, column)
        columns[i % len(columns)].plotly_chart(px.bar(counts, x="value", y="count", title=column),
                                               width="stretch", key=f"counts-{column}")

st.subheader("Images")
pages = (len(ids) + PAGE_SIZE - 1) // PAGE_SIZE
page = st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=link.number("page", 1, pages) or 1,
                       key="dataset-page") - 1
st.query_params.from_dict({**to_params(SearchState(cache=entry.name, flt=flt)),
                           **({"page": str(page + 1)} if page else {})})
shown = table.iloc[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
for start in range(0, len(shown), COLUMNS_PER_ROW):
    for column, (_, row) in zip(st.columns(COLUMNS_PER_ROW), shown.iloc[start:start + COLUMNS_PER_ROW].iterrows()):
        image_id = int(row["id"])
        column.image(str(cache.image_file(image_id)), width="stretch")
        column.caption(f"id {image_id} · {format_value(row['path'])}")
        if column.button("Use as query", key=f"use-{image_id}"):
            SearchSession(st.session_state).use_as_query(entry.name, image_id)
            st.switch_page("pages/search.py")

with st.expander("Metadata table"):
    st.dataframe(table, width="stretch", hide_index=True)
