"""Sharded caches (cache_builder/sharding.py, dashboard/shards.py): a cache split into shards searches exactly like
the cache it was split from, shard by shard in one process; a damaged shard is named, never silently skipped."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError
from cache_builder.cli import main as builder_main
from cache_builder.sharding import read_shard_info, split_cache
from cache_builder.synthetic import write_array_cache
from dashboard import shards, two_tier
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataFilter
from dashboard.search import SearchRequest, heat_maps, search_regions

N, GRID = 230, (4, 5, 64)
SHARD = 60  # 4 shards: 60, 60, 60, 50


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[FeatureCache, FeatureCache]:
    """(a single-shard cache, the same cache split into 4 shards, each with its own index)."""
    rng = np.random.default_rng(11)
    features = np.maximum(rng.normal(size=(N, *GRID)), 0).astype(np.float32)
    metadata = pd.DataFrame({"group": [f"g{i % 17}" for i in range(N)],
                             "half": ["a" if i < N // 2 else "b" for i in range(N)]})
    images = rng.integers(0, 255, size=(N, 32, 40, 3), dtype=np.uint8)
    single = tmp_path_factory.mktemp("single")
    write_array_cache(single, features, metadata=metadata, images=images, input_size=32)
    sharded = tmp_path_factory.mktemp("sharded") / "cache"
    split_cache(single, sharded, SHARD)
    return FeatureCache.open(single), FeatureCache.open(sharded)


def search(cache, **kwargs):
    kwargs.setdefault("image_id", 7)
    kwargs.setdefault("weights", box(1, 1, 2, 3))
    return search_regions(SearchRequest(cache=cache, **kwargs))


def box(top, left, h, w):
    weights = np.zeros(GRID[:2], np.float32)
    weights[top:top + h, left:left + w] = 1
    return weights


def test_the_split_keeps_ids_features_images_and_metadata(pair):
    single, sharded = pair
    assert [shard.count for shard in sharded.shards] == [60, 60, 60, 50]
    assert [shard.start for shard in sharded.shards] == [0, 60, 120, 180]
    for image_id in (0, 59, 60, 131, 229):
        np.testing.assert_array_equal(sharded.image_features(image_id), single.image_features(image_id))
        assert sharded.image_file(image_id).read_bytes() == single.image_file(image_id).read_bytes()
    pd.testing.assert_frame_equal(sharded.metadata.rows(None), single.metadata.rows(None))
    assert sharded.image_file(61).parent.parent.parent.name == "00001"  # the image lives with its shard


@settings(max_examples=12, deadline=None)
@given(top=st.integers(0, 3), left=st.integers(0, 4), h=st.integers(1, 4), w=st.integers(1, 5),
       image_id=st.integers(0, N - 1), k=st.integers(1, 40))
def test_a_sharded_cache_searches_exactly_like_the_single_one(pair, top, left, h, w, image_id, k):
    single, sharded = pair
    weights = box(top, left, min(h, GRID[0] - top), min(w, GRID[1] - left))
    one, many = (search(cache, image_id=image_id, weights=weights, k=k, mode="exact") for cache in pair)
    pd.testing.assert_frame_equal(many.hits, one.hits)
    pd.testing.assert_frame_equal(many.scores, one.scores)
    ids = one.hits["id"].to_numpy()[::-1]  # heat maps come in the order asked, not by id
    np.testing.assert_array_equal(heat_maps(sharded, many, ids), heat_maps(single, one, ids))


def test_filters_groups_and_exclusion_hold_across_shards(pair):
    flt = MetadataFilter(equals={"half": ["b"]})
    one, many = (search(cache, k=9, per_group="group", flt=flt, exclude_query=True, image_id=150, mode="exact")
                 for cache in pair)
    pd.testing.assert_frame_equal(many.hits, one.hits)
    assert (many.hits["half"] == "b").all() and 150 not in set(many.scores["id"])
    empty = search(pair[1], flt=MetadataFilter(equals={"group": ["nope"]}))
    assert empty.hits.empty and empty.scores.empty


def test_two_tier_runs_on_every_shards_index_and_reports_exact_scores(pair, monkeypatch):
    monkeypatch.setattr(two_tier, "ram_bytes", lambda: 2**20)
    _, sharded = pair
    result = search(sharded, mode="auto", rerank=40, k=10)
    assert result.mode.mode == "approx" and result.reranked == 40 and len(result.scores) == N
    exact = search(sharded, mode="exact", k=N)
    truth = exact.scores.set_index("id")["score"]  # rounded like the hits: the exact scores of the same ids
    np.testing.assert_allclose(result.hits["score"], truth[result.hits["id"]].round(6), atol=1e-6)
    covering = search(sharded, mode="approx", rerank=N, k=15)
    pd.testing.assert_frame_equal(covering.hits, search(sharded, mode="exact", k=15).hits)
    assert "one per shard (4)" in two_tier.index_status(sharded)


def test_the_reranked_rows_are_unmapped_after_the_answer_and_finish_unmapping_waits_for_it(pair, monkeypatch):
    unmapped, real = [], fmt.advise_done_with

    def slow_unmap(array, ids):
        time.sleep(0.3)  # longer than the search itself
        real(array, ids)
        unmapped.append(np.asarray(ids).copy())

    monkeypatch.setattr(fmt, "advise_done_with", slow_unmap)
    _, sharded = pair
    result = search(sharded, mode="approx", rerank=40, k=10)
    assert len(unmapped) < 4  # not waited for by the search
    shards.finish_unmapping()
    assert len(unmapped) == 4  # one rerank per shard, each shard's rows in its own ids
    assert sum(len(ids) for ids in unmapped) >= result.reranked
    assert all(len(ids) and ids.max() < SHARD for ids in unmapped)


def test_a_shard_without_an_index_falls_back_to_exact_and_names_the_shard(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(two_tier, "ram_bytes", lambda: 2**20)
    copy = tmp_path / "copy"
    shutil.copytree(pair[1].path, copy)
    shutil.rmtree(copy / "shards" / "00002" / fmt.INDEX_DIR)
    cache = FeatureCache.open(copy)
    result = search(cache, mode="auto", rerank=40)
    assert result.mode.mode == "exact" and "shard 2" in result.mode.warning
    with pytest.raises(Exception, match="shard 2"):
        search(cache, mode="approx", rerank=40)


@pytest.mark.parametrize("damage", ["missing features", "truncated norms", "counts", "hostile dir"])
def test_a_damaged_shard_is_refused_by_name(pair, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(pair[1].path, copy)
    shard = copy / "shards" / "00001"
    manifest = json.loads((copy / fmt.MANIFEST_FILE).read_text())
    if damage == "missing features":
        (shard / fmt.FEATURES_FILE).unlink()
        expected = "shard 1 .*features.npy is missing"
    elif damage == "truncated norms":
        np.save(shard / fmt.SQNORMS_FILE, np.zeros((3, 4, 5), np.float32))
        expected = "shard 1 .*sqnorms.npy holds"
    elif damage == "counts":
        manifest["shards"][1]["count"] = 61
        expected = "the shards hold 231 images"
    else:
        manifest["shards"][1]["dir"] = "../../etc"
        expected = "shard 1 is .*expected"
    (copy / fmt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=expected):
        FeatureCache.open(copy)


def test_a_split_resumes_and_refuses_another_caches_folder(pair, tmp_path):
    single, _ = pair
    out = tmp_path / "resumed"
    split_cache(single.path, out, SHARD, index=False)
    first = (out / "shards" / "00000" / fmt.FEATURES_FILE).stat().st_mtime_ns
    shutil.rmtree(out / "shards" / "00003")  # as if killed before the last shard was written
    manifest = json.loads((out / fmt.MANIFEST_FILE).read_text())
    (out / fmt.MANIFEST_FILE).write_text(json.dumps({**manifest, "status": "building"}))
    with pytest.raises(CacheError, match="not complete"):
        FeatureCache.open(out)
    split_cache(single.path, out, SHARD, index=False)
    assert (out / "shards" / "00000" / fmt.FEATURES_FILE).stat().st_mtime_ns == first  # kept, not rewritten
    assert read_shard_info(out / "shards" / "00003")["count"] == 50
    assert FeatureCache.open(out).size == N
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        split_cache(single.path, tmp_path / "busy", SHARD)
    with pytest.raises(CacheError, match="positive"):
        split_cache(single.path, tmp_path / "zero", 0)


def test_the_cli_shards_a_cache_and_reports_it(pair, tmp_path, capsys):
    single, _ = pair
    assert builder_main(["shard", str(single.path), "--out", str(tmp_path / "s"), "--shard-size", "100",
                         "--quiet"]) == 0
    assert "230 images in 3 shards" in capsys.readouterr().out
    assert builder_main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "shards      3: 100, 100, 30" in out and "dimensions per cell" in out
    with pytest.raises(CacheError, match="sharded"):
        FeatureCache.open(tmp_path / "s").features()


def test_synthetic_caches_can_be_written_sharded(pair, tmp_path):
    single, _ = pair
    features = np.stack([single.image_features(i) for i in range(single.size)])
    write_array_cache(tmp_path / "direct", features, shard_size=100, input_size=32)
    direct = FeatureCache.open(tmp_path / "direct")
    assert [shard.count for shard in direct.shards] == [100, 100, 30]
    pd.testing.assert_frame_equal(search(direct, mode="exact").hits.drop(columns=["path"]),
                                  search(single, mode="exact").hits.drop(columns=["path", "group", "half"]))


def test_a_multi_layer_cache_splits_into_shards_of_every_layer(tmp_path):
    rng = np.random.default_rng(0)
    late, early = rng.random((7, 2, 2, 4), np.float32), rng.random((7, 4, 4, 8), np.float32)
    write_array_cache(tmp_path / "layered", late, layer="late", more_layers={"early": early})
    split_cache(tmp_path / "layered", tmp_path / "sharded", 3)
    for layer, features in (("late", late), ("early", early)):
        single, sharded = FeatureCache.open(tmp_path / "layered", layer), FeatureCache.open(tmp_path / "sharded", layer)
        assert len(sharded.shards) == 3 and sharded.grid == single.grid
        for image_id in range(7):
            assert np.array_equal(sharded.image_features(image_id), single.image_features(image_id))
        assert all(shard.first_stage().codes.shape[1:3] == single.grid for shard in sharded.shards)  # indexed
        assert sharded.shards[1].location.arrays == tmp_path / "sharded" / "shards" / "00001" / (
            "" if layer == "late" else "layers/01")
        single.metadata.close()
        sharded.metadata.close()
