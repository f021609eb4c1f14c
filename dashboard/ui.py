"""The only dashboard module that imports streamlit: shared, process-wide resources and small widgets."""

from __future__ import annotations

import threading
from pathlib import Path

import streamlit as st

from dashboard import catalog
from dashboard.feature_cache import FeatureCache

_demo_lock = threading.Lock()


def caches_root() -> Path:
    configured = None
    try:
        configured = st.secrets.get("caches_dir")
    except (FileNotFoundError, KeyError, AttributeError):  # no secrets.toml: that's fine
        configured = None
    except Exception:  # noqa: BLE001 - a malformed secrets file must not take the app down
        configured = None
    return catalog.caches_dir(configured)


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


def ensure_demo_cache_ui() -> None:
    """First start: build the demo cache with a visible progress bar (once per process, other sessions wait)."""
    root = caches_root()
    if _has_usable_cache(root):
        return
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
