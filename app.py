"""Streamlit entry point: `streamlit run app.py`. Builds the demo cache on first start, then opens the pages."""

import streamlit as st

from dashboard import ui

st.set_page_config(page_title="Visual Feature Search", page_icon=":mag:", layout="wide")
ui.ensure_demo_cache_ui()
navigation = st.navigation([
    st.Page("pages/caches.py", title="Caches", icon=":material/database:", default=True),
])
navigation.run()
