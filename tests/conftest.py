"""Fixtures build tiny caches through the real writer, in temporary folders."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd
import pytest

from cache_builder.synthetic import write_array_cache
from dashboard.feature_cache import FeatureCache

# Every test run builds the native search kernel afresh (as a new machine would), in a folder of its own; the
# app servers the browser tests start inherit it.
os.environ["VFS_KERNEL_DIR"] = tempfile.mkdtemp(prefix="vfs-test-kernels-")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's servers on 127.0.0.1 only


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on loopback (a head node and a second node, one CPU each), joined by this
    process, shared by the cluster tests and torn down at the end of the session."""
    import ray
    from ray.cluster_utils import Cluster

    from cache_builder.cluster import connect

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    connect(nodes.address)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def reference_scores(features: np.ndarray, query: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The formula in float64, window by window: (N, H-h+1, W-w+1) scores. Kept naive on purpose."""
    n, grid_h, grid_w, _ = features.shape
    h, w = weights.shape
    wq = (weights[..., None] * query).astype(np.float64)
    q_norm = np.sqrt((wq ** 2).sum())
    out = np.zeros((n, grid_h - h + 1, grid_w - w + 1))
    for y in range(grid_h - h + 1):
        for x in range(grid_w - w + 1):
            window = weights[None, ..., None] * features[:, y:y + h, x:x + w].astype(np.float64)
            numerator = (window * wq[None]).sum(axis=(1, 2, 3))
            denominator = np.sqrt((window ** 2).sum(axis=(1, 2, 3))) * q_norm
            with np.errstate(invalid="ignore", divide="ignore"):
                out[:, y, x] = np.where(denominator > 0, numerator / denominator, 0.0)
    return out


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory) -> FeatureCache:
    """40 images, 5x6 grid, 16 channels, with typed metadata including a list column."""
    rng = np.random.default_rng(7)
    n = 40
    features = np.maximum(rng.normal(size=(n, 5, 6, 16)), 0).astype(np.float32)
    metadata = pd.DataFrame({
        "label": [["cat", "dog", "owl"][i % 3] for i in range(n)],
        "domain": ["in" if i < 25 else "out" for i in range(n)],
        "location": [f"loc{i % 5}" for i in range(n)],
        "age": [float(20 + i) for i in range(n)],
        "diagnoses": [["a", "b"] if i % 4 == 0 else (["b"] if i % 4 == 1 else []) for i in range(n)],
    })
    images = rng.integers(0, 255, size=(n, 48, 48, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("small_cache")
    write_array_cache(out, features, metadata=metadata, input_size=48, images=images, label_column="label")
    return FeatureCache.open(out)


def pytest_sessionfinish(session, exitstatus):
    """Close the caches Streamlit keeps per process, so DuckDB connections end before interpreter shutdown."""
    import gc
    import sys

    if "streamlit" in sys.modules:
        import streamlit as st

        st.cache_resource.clear()
    gc.collect()
