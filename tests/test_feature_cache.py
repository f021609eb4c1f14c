from __future__ import annotations

import json
import shutil
import mmap

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


def test_rows_to_be_reranked_are_requested_from_the_os_in_page_aligned_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fmt, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)))
    rows = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.uint8, shape=(100, 1000))
    fmt.advise_will_need(rows, np.array([0, 1, 2, 50, 99]))
    base, page = rows.ctypes.data, mmap.PAGESIZE
    assert all(start % page == 0 and advice == 3 for start, _, advice in calls)
    assert len(calls) == 3  # rows 0-2 touch: one run; 50 and 99 lie apart
    covered = [(start - base, start - base + length) for start, length, _ in calls]
    for row in (0, 1, 2, 50, 99):
        assert any(lo <= row * 1000 and (row + 1) * 1000 <= hi for lo, hi in covered), row
    assert not any(lo <= 20_000 < hi for lo, hi in covered)  # rows not asked for are not read
    calls.clear()
    fmt.advise_will_need(np.zeros((10, 1000), np.uint8), np.array([1]))  # in RAM: nothing to ask
    fmt.advise_will_need(rows, np.array([], dtype=np.int64))
    assert calls == []
    window = 16 * page  # smaller than the array, so the window's alignment shows
    monkeypatch.setattr(fmt, "FAULT_MAP_BYTES", window)
    fmt.advise_done_with(rows, np.array([50]))
    assert len(calls) == 1 and calls[0][2] == 4  # MADV_DONTNEED: unmapped here, kept in the page cache
    start, length, _ = calls[0]  # a touch of row 50 may have mapped the file's aligned window around it
    in_file = rows.offset - base  # address + in_file: offset in the file, where folios are aligned
    assert start + in_file == (rows.offset + 50_000) // window * window
    assert start + length + in_file == -(-(rows.offset + 51_000) // window) * window
    calls.clear()
    fmt.advise_done_with(rows, np.array([0, 99]))
    assert [start for start, _, _ in calls][0] == base - base % page  # never beyond the array's pages
    assert calls[-1][0] + calls[-1][1] == base + 100_000
