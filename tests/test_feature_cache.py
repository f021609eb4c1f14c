from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pytest

from cache_builder.synthetic import write_array_cache
from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError
from dashboard.feature_cache import FeatureCache


@pytest.fixture
def cache_dir(tmp_path):
    features = np.random.default_rng(1).normal(size=(6, 2, 3, 4)).astype(np.float32)
    write_array_cache(tmp_path / "c", features, input_size=32,
                      images=np.zeros((6, 32, 32, 3), dtype=np.uint8))
    return tmp_path / "c"


def edit_manifest(cache_dir, **changes):
    data = json.loads((cache_dir / fmt.MANIFEST_FILE).read_text())
    data.update(changes)
    (cache_dir / fmt.MANIFEST_FILE).write_text(json.dumps(data))


def test_opens_a_complete_cache(cache_dir):
    cache = FeatureCache.open(cache_dir)
    assert cache.size == 6 and cache.features().shape == (6, 2, 3, 4)
    assert cache.image_file(5).is_file()


@pytest.mark.parametrize("changes, message", [
    ({"status": "building"}, "not complete"),
    ({"format_version": 99}, "format version 99"),
    ({"grid": [2, 3, 5]}, "manifest says"),
    ({"image_count": 7}, "manifest says"),
    ({"dtype": "float16"}, "float16"),
])
def test_tampered_manifest_is_refused(cache_dir, changes, message):
    edit_manifest(cache_dir, **changes)
    with pytest.raises(CacheError, match=message):
        FeatureCache.open(cache_dir)


def test_truncated_feature_file_is_refused(cache_dir):
    path = cache_dir / fmt.FEATURES_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match="truncated"):
        FeatureCache.open(cache_dir)


def test_missing_metadata_rows_are_refused(cache_dir):
    with duckdb.connect(str(cache_dir / fmt.METADATA_FILE)) as con:
        con.execute("DELETE FROM images WHERE id = 3")
    with pytest.raises(CacheError, match="one row per cached image"):
        FeatureCache.open(cache_dir)


def test_missing_files_are_refused(cache_dir):
    (cache_dir / fmt.SQNORMS_FILE).unlink()
    with pytest.raises(CacheError, match="missing"):
        FeatureCache.open(cache_dir)
    shutil.rmtree(cache_dir)
    with pytest.raises(CacheError, match="not a feature cache"):
        FeatureCache.open(cache_dir)


def test_garbage_manifest_is_refused(cache_dir):
    (cache_dir / fmt.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CacheError, match="unreadable"):
        FeatureCache.open(cache_dir)


@pytest.mark.parametrize("bad_id", [-1, 6, "../../etc/passwd", 2.5])
def test_only_known_ids_map_to_image_files(cache_dir, bad_id):
    with pytest.raises(CacheError, match="not in this cache"):
        FeatureCache.open(cache_dir).image_file(bad_id)
