"""Streamlit entry point: `streamlit run app.py`. Builds the demo cache on first start, then opens the pages."""

import streamlit as st

from dashboard.ui import access, resources

st.set_page_config(page_title="Visual Feature Search", page_icon=":mag:", layout="wide")
navigation = st.navigation([
    st.Page("pages/search.py", title="Search", icon=":material/search:", default=True),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/dataset.py", title="Dataset", icon=":material/photo_library:"),
    st.Page("pages/caches.py", title="Caches", icon=":material/database:"),
])
access.access_gate_ui()
resources.ensure_demo_cache_ui()
navigation.run()
