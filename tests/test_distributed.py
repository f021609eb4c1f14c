"""Shards served by Ray actors (dashboard/distributed.py) on a real two-node Ray cluster on loopback: the same
answers as a local search, actors that die between and during queries, a shard that cannot be served."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ray

from cache_builder import cache_format as fmt
from cache_builder.sharding import split_cache
from cache_builder.synthetic import write_array_cache
from dashboard import distributed, two_tier
from dashboard.distributed import ClusterError
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataFilter
from dashboard.search import SearchRequest, heat_maps, search_regions

N, GRID, SHARD = 300, (5, 5, 64), 75  # 4 shards


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> FeatureCache:
    rng = np.random.default_rng(5)
    features = np.maximum(rng.normal(size=(N, *GRID)), 0).astype(np.float32)
    metadata = pd.DataFrame({"group": [f"g{i % 13}" for i in range(N)]})
    single = tmp_path_factory.mktemp("single")
    write_array_cache(single, features, metadata=metadata)
    out = tmp_path_factory.mktemp("sharded") / "cache"
    split_cache(single, out, SHARD)
    return FeatureCache.open(out)


@pytest.fixture
def served(cluster, sharded, tmp_path):
    faults = tmp_path / "faults"
    faults.mkdir()
    cache = distributed.serve(sharded, cluster.address, faults=str(faults))
    cache.faults = faults
    yield cache
    cache.search.close()


def search(cache, **kwargs):
    kwargs.setdefault("image_id", 11)
    kwargs.setdefault("weights", np.pad(np.ones((2, 2), np.float32), ((1, 2), (2, 1))))
    return search_regions(SearchRequest(cache=cache, **kwargs))


def test_ray_search_equals_local_search_on_random_queries(served, sharded, monkeypatch):
    monkeypatch.setattr(two_tier, "ram_bytes", lambda: 2**20)  # auto runs two-tier: both stages fan out
    rng = np.random.default_rng(0)
    for _ in range(4):
        weights = (rng.random(GRID[:2]) > 0.6).astype(np.float32)
        weights[rng.integers(5), rng.integers(5)] = 1
        kwargs = dict(image_id=int(rng.integers(N)), weights=weights, k=int(rng.integers(1, 30)))
        for mode in ("exact", "auto"):
            local, remote = search(sharded, mode=mode, rerank=60, **kwargs), search(served, mode=mode, rerank=60,
                                                                                    **kwargs)
            pd.testing.assert_frame_equal(remote.hits, local.hits)
            pd.testing.assert_frame_equal(remote.scores, local.scores)
            assert remote.mode == local.mode
        ids = local.hits["id"].to_numpy()
        np.testing.assert_array_equal(heat_maps(served, remote, ids), heat_maps(sharded, local, ids))
    flt = MetadataFilter(equals={"group": ["g1", "g2", "g3"]})
    pd.testing.assert_frame_equal(search(served, flt=flt, per_group="group").hits,
                                  search(sharded, flt=flt, per_group="group").hits)


def test_the_shards_are_spread_over_the_nodes_and_say_where(served):
    lines = served.search.placement()
    assert len(lines) == 4 and all("Ray actor on node" in line for line in lines)
    assert len({line.split("node ")[1].split()[0] for line in lines}) == 2  # both nodes serve shards


def test_a_shard_placed_on_a_node_gone_since_is_started_on_an_alive_one(cluster, sharded, monkeypatch):
    real_nodes, listings = ray.nodes, []

    def nodes_with_a_dead_one():  # the first listings still show a node that has left the cluster
        listings.append(1)
        gone = [{"NodeID": "fe" * 28, "Alive": True}] if len(listings) <= 4 else []
        return real_nodes() + gone

    monkeypatch.setattr(ray, "nodes", nodes_with_a_dead_one)
    cache = distributed.serve(sharded, cluster.address)
    try:
        assert len(listings) > 4  # shard 2 went to the gone node (sorted last) and was started again
        assert all("Ray actor on node" in line and "fefefefe" not in line for line in cache.search.placement())
        pd.testing.assert_frame_equal(search(cache, k=12).hits, search(sharded, k=12).hits)
    finally:
        cache.search.close()


def test_an_actor_killed_between_queries_is_replaced(served, sharded):
    before = search(served, k=12).hits
    ray.kill(served.search.actors[2], no_restart=True)
    pd.testing.assert_frame_equal(search(served, k=12).hits, before)
    pd.testing.assert_frame_equal(before, search(sharded, k=12).hits)


def test_an_actor_that_dies_during_a_query_is_replaced_and_the_query_retried(served, sharded):
    (served.faults / "crash-1").touch()  # shard 1's actor exits inside its next call
    result = search(served, k=15)
    assert not (served.faults / "crash-1").exists()  # it did die mid-query
    pd.testing.assert_frame_equal(result.hits, search(sharded, k=15).hits)


def test_a_shard_that_cannot_be_served_is_named_and_the_next_search_works(served, sharded, tmp_path):
    features = sharded.path / "shards" / "00003" / fmt.FEATURES_FILE
    hidden = tmp_path / "hidden.npy"
    shutil.move(features, hidden)
    try:
        (served.faults / "crash-3").touch()  # dies mid-query; its replacement finds the shard damaged
        with pytest.raises(ClusterError, match=r"shard 3 .*failed twice.*features.npy is missing"):
            search(served)
    finally:
        shutil.move(hidden, features)
    pd.testing.assert_frame_equal(search(served, k=5).hits, search(sharded, k=5).hits)  # the app keeps working


def test_a_missing_shard_is_refused_when_serving_starts(cluster, sharded, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sharded.path, copy)
    cache = FeatureCache.open(copy)
    (copy / "shards" / "00002" / fmt.SQNORMS_FILE).unlink()
    with pytest.raises(ClusterError, match=r"shard 2 .*sqnorms.npy is missing"):
        distributed.serve(cache, cluster.address)


def test_an_unreachable_address_is_one_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, so nothing listens there once closed
    started = time.monotonic()
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        distributed.check_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 30
    with pytest.raises(ClusterError, match="expected HOST:PORT"):
        distributed.check_address("not an address")


def test_the_search_cli_fans_out_with_ray_and_prints_the_same_hits(cluster, sharded, capsys):
    from dashboard.cli import main as search_main

    args = ["search", str(sharded.path), "--image-id", "4", "--box", "0,0,100,100", "-k", "7"]
    assert search_main(args) == 0
    local = capsys.readouterr().out
    assert search_main(args + ["--ray", cluster.address]) == 0
    assert capsys.readouterr().out == local and len(local.splitlines()) == 8
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert search_main(args + ["--ray", f"127.0.0.1:{port}"]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err


def test_the_app_serves_shards_from_ray_when_asked_and_says_where(cluster, sharded, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard.settings import CACHES_DIR_ENV

    root = tmp_path / "caches"
    root.mkdir()
    (root / "sharded").symlink_to(sharded.path)
    monkeypatch.setenv(CACHES_DIR_ENV, str(root))
    monkeypatch.setenv(distributed.RAY_ADDRESS_ENV, cluster.address)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300)
    at.switch_page("pages/caches.py")
    at.run()
    assert not at.exception
    placement = at.expander[0].text[0].value
    assert placement.count("Ray actor on node") == 4
    import streamlit as st

    st.cache_resource.clear()  # stops the app's shard servers (the cache's on_release closes them)


def test_a_layer_of_a_multi_layer_cache_is_served_at_that_layer(cluster, tmp_path):
    rng = np.random.default_rng(2)
    write_array_cache(tmp_path / "layered", rng.random((30, 5, 5, 8), np.float32), layer="late",
                      more_layers={"early": rng.random((30, 10, 10, 4), np.float32)})
    early = FeatureCache.open(tmp_path / "layered", "early")
    served = distributed.serve(early, cluster.address)
    try:
        weights = np.zeros((10, 10), np.float32)
        weights[2:6, 3:7] = 1
        remote, local = search(served, image_id=4, weights=weights), search(early, image_id=4, weights=weights)
        pd.testing.assert_frame_equal(remote.hits, local.hits)
        assert remote.hits["height"].iloc[0] == 4  # windows on the early layer's 10x10 grid
    finally:
        served.search.close()
        early.metadata.close()
