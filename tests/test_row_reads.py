"""The two-tier rerank's rows read ahead by direct asynchronous reads (dashboard/row_reads.py), through the search:
the same answers as reading through the memory map, and the map wherever direct reads are refused or fail."""

from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np
import pandas as pd
import pytest

from cache_builder.index import build_index
from cache_builder.synthetic import write_array_cache
from dashboard import row_reads, scoring, two_tier
from dashboard.feature_cache import FeatureCache
from dashboard.region_query import RegionQuery
from dashboard.search import SearchRequest, search_regions

N, GRID = 600, (5, 6, 96)
MASKS = {"cell": (2, 3, 1, 1), "box": (1, 1, 3, 3), "whole": (0, 0, 5, 6)}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> FeatureCache:
    """A small indexed cache whose searches read ahead (the thresholds lowered to its size), on the test's
    filesystem; skipped only where that filesystem refuses direct reads (the fallback tests below still run)."""
    rng = np.random.default_rng(4)
    features = rng.standard_normal((N, *GRID), dtype=np.float32) * np.arange(1, 97, dtype=np.float32) ** -0.5
    write_array_cache(tmp_path / "cache", features, metadata=pd.DataFrame({"group": [f"g{i % 9}" for i in range(N)]}))
    build_index(tmp_path / "cache", dims=32)
    monkeypatch.setattr(row_reads, "MIN_SEARCHED", 1)
    monkeypatch.setattr(row_reads, "BLOCK", 16)
    monkeypatch.setattr(row_reads, "MIN_SLOTS", 300)
    opened = FeatureCache.open(tmp_path / "cache")
    yield opened
    opened.metadata.close()


def weights(top, left, h, w) -> np.ndarray:
    mask = np.zeros(GRID[:2], np.float32)
    mask[top:top + h, left:left + w] = 1
    return mask


def search(cache, image_id: int, mask: str, **kwargs):
    return search_regions(SearchRequest(cache=cache, image_id=image_id, weights=weights(*MASKS[mask]), mode="approx",
                                        rerank=kwargs.pop("rerank", 40), k=10, **kwargs))


def mapped(cache, monkeypatch, image_id: int, mask: str, **kwargs):
    monkeypatch.setenv("VFS_DIRECT_READS", "0")
    try:
        return search(cache, image_id, mask, **kwargs)
    finally:
        monkeypatch.delenv("VFS_DIRECT_READS")


def assert_same(a, b) -> None:
    pd.testing.assert_frame_equal(a.hits.reset_index(drop=True), b.hits.reset_index(drop=True))
    pd.testing.assert_frame_equal(a.scores, b.scores)  # the first stage in parts scores as one pass does


def count_placed(monkeypatch) -> list[int]:
    calls = []
    real = scoring.score_placed

    def spy(*args, **kwargs):
        found = real(*args, **kwargs)
        calls.append(len(found.ids))
        return found

    monkeypatch.setattr(scoring, "score_placed", spy)
    return calls


def test_parts_cover_every_position_once_and_sample_the_whole_range(monkeypatch):
    monkeypatch.setattr(row_reads, "BLOCK", 10)
    parts = row_reads.parts(1005)
    assert len(parts) == row_reads.PARTS
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1005))
    assert parts[0][:3].tolist() == [0, 1, 2] and 80 in parts[0] and 10 in parts[1] and 1000 in parts[4]
    assert all(len(part) == 0 for part in row_reads.parts(0))


def test_rows_read_directly_are_the_files_rows(cache):
    features = cache.features_bits
    try:
        reader = row_reads.RowReads(features.filename, features.offset, features[0].nbytes, len(features), 50)
    except row_reads.DirectReadsUnavailable as exc:
        pytest.skip(f"this filesystem refuses direct reads: {exc}")
    try:
        ids = np.random.default_rng(0).choice(N, 45, replace=False)
        assert reader.request(ids[:20]) and reader.request(ids)  # the first 20 are not read twice
        reader.finish()
        assert reader.used == 45
        for i, at in zip(ids, reader.placed(ids)):
            row = reader.bytes[at:at + features[0].nbytes].view(np.uint16).reshape(features.shape[1:])
            assert np.array_equal(row, features[i])
        wanted = np.setdiff1d(np.arange(N), ids)[::-1]  # the highest rows listed first
        assert not reader.request(wanted)  # beyond its 50 slots: the first 5 listed are the ones read
        reader.finish()
        assert (reader.slot_of[wanted[:5]] >= 0).all() and (reader.slot_of[wanted[5:]] < 0).all()
        with pytest.raises(KeyError):
            reader.placed(np.arange(100))
    finally:
        reader.close()


def test_placed_rows_score_as_the_mapped_cache_does(cache):
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(N, 30, replace=False))
    row_bytes = cache.features_bits[0].nbytes
    placed = rng.permutation(30) * (row_bytes + 6) + 2  # shuffled, not contiguous, 2-byte aligned
    buffer = np.zeros(30 * (row_bytes + 6) + 2, np.uint8)
    for i, at in zip(ids, placed):
        buffer[at:at + row_bytes] = cache.features_bits[i].reshape(-1).view(np.uint8)
    for mask in MASKS.values():
        query = RegionQuery.from_grid_mask(cache.image_features(3), weights(*mask))
        found = scoring.score_placed(buffer.ctypes.data, placed, len(buffer), cache.sqnorms, query, ids, GRID)
        expected = scoring.score_windows(cache.features(), cache.sqnorms, query, ids)
        assert np.array_equal(found.scores, expected.scores) and np.array_equal(found.position, expected.position)
    with pytest.raises(ValueError, match="within the buffer"):
        scoring.score_placed(buffer.ctypes.data, placed + 10, len(buffer), cache.sqnorms, query, ids, GRID)


@pytest.mark.parametrize("mask", list(MASKS))
def test_a_two_tier_search_reads_ahead_and_answers_as_the_mapped_rerank(cache, mask, monkeypatch):
    calls = count_placed(monkeypatch)
    for image_id in (5, 321):
        direct = search(cache, image_id, mask)
        assert_same(direct, mapped(cache, monkeypatch, image_id, mask))
    if cache.shards[0]._read_aheads.unavailable:
        pytest.skip(f"this filesystem refuses direct reads: {cache.shards[0]._read_aheads.unavailable}")
    assert calls == [40, 40]  # both reranks scored from the reader, neither from the map


def test_the_first_stage_reads_the_shortlist_ahead(cache, monkeypatch):
    monkeypatch.setattr(row_reads, "READ_AHEAD_SHARE", 40 / N)  # as 0.5% of a large cache: the rerank's depth
    held = []
    real = row_reads.RowReads.request

    def spy(self, ids):
        held.append((len(ids), int((self.slot_of[np.asarray(ids)] >= 0).sum())))
        return real(self, ids)

    monkeypatch.setattr(row_reads.RowReads, "request", spy)
    search(cache, 44, "box")
    if cache.shards[0]._read_aheads.unavailable:
        pytest.skip(f"this filesystem refuses direct reads: {cache.shards[0]._read_aheads.unavailable}")
    probe, *parts, rerank = held
    assert len(parts) == row_reads.PARTS and parts[-1][0] == 40
    assert rerank == (40, 40)  # every row of the shortlist was read ahead: the rerank reads none


def test_a_part_holding_most_of_the_best_rows_still_has_them_read_ahead(monkeypatch):
    """As in a cache sorted by label: the first part holds 30 of the 40 best rows, when the share read after it is
    only 5. Those passed over are read once the share has grown, and the last part's rows are the best 40."""
    monkeypatch.setattr(row_reads, "READ_AHEAD_SHARE", 0.05)
    rng = np.random.default_rng(2)
    scores = rng.uniform(0, 0.5, size=800).astype(np.float32)
    scores[rng.choice(100, 30, replace=False)] = rng.uniform(0.9, 1.0, size=30)  # the first part's
    scores[100 + rng.choice(700, 10, replace=False)] = rng.uniform(0.9, 1.0, size=10)
    best = set(np.argsort(-scores)[:40].tolist())
    likely = row_reads.LikelyRows(len(scores))
    assert likely.final == 40
    read: set[int] = set()
    bounds = list(range(0, 800, 100)) + [800]
    for start, stop in zip(bounds, bounds[1:]):
        ids = np.arange(start, stop)
        wanted = likely.add(ids, scores[ids])
        assert len(wanted) == min(40, np.ceil(row_reads.READ_AHEAD_SHARE * stop))
        read |= set(wanted.tolist())
    assert set(wanted.tolist()) == best and best <= read


def test_filters_groups_and_a_deeper_rerank_than_the_reader_holds(cache, monkeypatch):
    calls = count_placed(monkeypatch)
    for kwargs in ({"per_group": "group"}, {"exclude_query": True}, {"rerank": 500}):
        assert_same(search(cache, 17, "box", **kwargs), mapped(cache, monkeypatch, 17, "box", **kwargs))
    if cache.shards[0]._read_aheads.unavailable:
        pytest.skip(f"this filesystem refuses direct reads: {cache.shards[0]._read_aheads.unavailable}")
    assert len(calls) == 2  # 500 rows outgrow the reader's 300 slots: that rerank read through the map


def test_concurrent_searches_each_get_their_own_answer(cache, monkeypatch):
    expected = {i: mapped(cache, monkeypatch, i, "box") for i in (1, 2, 3, 4)}
    answers, errors = {}, []

    def run(image_id):
        try:
            answers[image_id] = search(cache, image_id, "box")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for image_id, answer in answers.items():
        assert_same(answer, expected[image_id])


def test_where_direct_reads_are_refused_the_search_reads_through_the_map(cache, monkeypatch, caplog):
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(row_reads.os, "open", refusing)
    calls = count_placed(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dashboard.row_reads"):
        assert_same(search(cache, 9, "cell"), mapped(cache, monkeypatch, 9, "cell"))
        assert_same(search(cache, 10, "cell"), mapped(cache, monkeypatch, 10, "cell"))
    assert calls == []
    assert "cannot be opened for direct reads" in cache.shards[0]._read_aheads.unavailable
    assert sum("read through the memory map" in r.message for r in caplog.records) == 1  # said once


def test_a_failed_direct_read_falls_back_for_that_rerank_and_the_reader_is_replaced(cache, monkeypatch, caplog):
    search(cache, 12, "whole")  # the reader exists
    read_aheads = cache.shards[0]._read_aheads
    if read_aheads.unavailable:
        pytest.skip(f"this filesystem refuses direct reads: {read_aheads.unavailable}")
    first = read_aheads._free[0]
    real_step, failures = row_reads.RowReads._step, []

    def failing_once(self, used):
        if not failures:
            failures.append(used)
            raise OSError(errno.EIO, "a row read returned -5")
        return real_step(self, used)

    monkeypatch.setattr(row_reads.RowReads, "_step", failing_once)
    with caplog.at_level(logging.WARNING, logger="dashboard.shards"):
        assert_same(search(cache, 13, "whole"), mapped(cache, monkeypatch, 13, "whole"))
    assert failures and any("a direct read failed" in r.message for r in caplog.records)
    assert first not in read_aheads._free  # closed: reads it had in flight may still land in its buffer
    calls = count_placed(monkeypatch)
    assert_same(search(cache, 14, "whole"), mapped(cache, monkeypatch, 14, "whole"))
    assert calls == [40] and read_aheads._free and read_aheads._free[0] is not first


def test_the_read_ahead_share_is_the_rerank_share():
    assert row_reads.READ_AHEAD_SHARE == two_tier.RERANK_FRACTION
