"""Caches page: every cache found, its manifest, a few of its images, and how to build another."""

import streamlit as st

from cache_builder.cache_format import CacheError

from dashboard import catalog, distributed, two_tier
from dashboard.scoring import engine_status
from dashboard.settings import CACHES_DIR_ENV
from dashboard.ui import access, resources

access.access_gate_ui()  # also here: Streamlit can serve a file of pages/ directly, bypassing app.py
st.title("Caches")
root = resources.caches_root()
entries = catalog.find_caches(root)
st.caption(f"Caches folder: `{root}` (set `{CACHES_DIR_ENV}` to use another) · search engine: {engine_status()}")
if not entries:
    st.warning("No cache found. Build one with `python -m cache_builder build --source demo --out caches/demo`.")

for entry in entries:
    with st.container(border=True):
        st.subheader(entry.name)
        if entry.problem:
            st.error(entry.problem)
            continue
        manifest = entry.manifest
        names = manifest.layer_names
        grids = ["x".join(map(str, manifest.at_layer(name).grid)) for name in names]
        cols = st.columns(4)
        cols[0].metric("Images", f"{manifest.image_count:,}")
        cols[1].metric("Model", manifest.model)
        cols[2].metric("Layers" if len(names) > 1 else "Layer", ", ".join(names))
        cols[3].metric("Feature grids" if len(names) > 1 else "Feature grid", ", ".join(grids))
        st.caption(f"Built {manifest.created} · weights: {manifest.weights_source} · "
                   f"{len(manifest.skipped)} skipped files")
        try:
            cache = resources.load_cache(entry.path)
        except CacheError as exc:  # e.g. a shard the cluster's actors cannot serve
            st.error(str(exc))
            continue
        for name in names:
            layer = cache if name == cache.layer else resources.load_cache(entry.path, name)
            st.caption((f"{name}: " if len(names) > 1 else "") + two_tier.index_status(layer))
        if cache.sharded or distributed.ray_address():
            with st.expander(f"Shards ({len(cache.shards)}) and where they are served"):
                st.text("\n".join(cache.search.placement()))
        sample = [i for i in range(min(8, cache.size)) if cache.image_file(i).is_file()]  # synthetic: none
        if sample:
            st.image([str(cache.image_file(i)) for i in sample], width=120,
                     caption=[str(p) for p in cache.metadata.rows(sample, ["path"])["path"]])
        with st.expander("Manifest"):
            st.code(manifest.to_json(), language="json")

st.subheader("Build another cache")
st.code("python -m cache_builder build --source folder:/data/val@in --source folder:/data/sketch@out "
        "--out caches/my-cache", language="bash")
