"""Streamlit glue, the only dashboard modules that import streamlit, one concern each:

- `access`: the password / single sign-on gate every page calls first;
- `resources`: process-wide shared objects (opened caches, the demo build, memoised searches and uploads);
- `widgets`: `*_ui` functions that draw widgets and return plain values.

The Search page's session state has its own, Streamlit-free class: `dashboard.search_session.SearchSession`.
"""
