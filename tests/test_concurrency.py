"""Many sessions, one process: concurrent searches and metadata queries give exactly the serial results, leave
process-wide state alone, and share the memory-mapped cache instead of copying it.

Streamlit runs every session's script in its own thread of one process, and
`dashboard.ui.resources.load_cache` hands all of them the same `FeatureCache` (one memory map, one DuckDB
connection), so this is what a busy hosted app does.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache_builder.synthetic import write_array_cache
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataFilter
from dashboard.region_query import RegionQuery
from dashboard.scoring import score_windows, window_score_maps
from dashboard.scoring.torch_path import CHUNK_BYTES
from dashboard.search import SearchRequest, SearchResult, search_regions

THREADS = 16


@pytest.fixture(scope="module")
def bigger_cache(tmp_path_factory) -> FeatureCache:
    """3,000 images 7x7x64 with text, numeric and list metadata (one text column has missing values)."""
    rng = np.random.default_rng(11)
    n = 3000
    features = np.maximum(rng.normal(size=(n, 7, 7, 64)), 0).astype(np.float32)
    features[rng.random(n) < 0.02] = 0.0  # some all-zero images: score 0, ties broken by id
    species = rng.choice(["deer", "fox", "owl", None], n).tolist()
    metadata = pd.DataFrame({
        "domain": rng.choice(["in", "out"], n),
        "location": rng.choice([f"loc{i}" for i in range(12)], n),
        "species": pd.array(species, dtype="string"),
        "hour": rng.integers(0, 24, n),
        "tags": [list(rng.choice(["rain", "night", "blur", "snow"], rng.integers(0, 3), replace=False))
                 for _ in range(n)],
    })
    out = tmp_path_factory.mktemp("bigger")
    write_array_cache(out, features, metadata=metadata)
    return FeatureCache.open(out)


def column_kinds(cache: FeatureCache) -> dict[str, list[str]]:
    store = cache.metadata
    columns = [c for c in store.columns if c not in ("id", "path")]
    return {
        "list": [c for c in columns if store.is_list(c)],
        "number": [c for c in columns if store.is_numeric(c)],
        "text": [c for c in columns if not store.is_list(c) and not store.is_numeric(c)],
    }


def random_weights(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A box, a soft mask with holes, one cell, or the whole grid (the single-window code path)."""
    weights = np.zeros((h, w), dtype=np.float32)
    kind = rng.integers(4)
    if kind == 3:
        weights[:] = 1.0
        return weights
    y0, x0 = rng.integers(h), rng.integers(w)
    if kind == 2:
        weights[y0, x0] = rng.uniform(0.3, 1.0)
        return weights
    y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
    box = (slice(y0, y1), slice(x0, x1))
    weights[box] = 1.0 if kind == 0 else rng.uniform(0.1, 1.0, size=(y1 - y0, x1 - x0))
    if kind == 1:
        weights[box] *= rng.random((y1 - y0, x1 - x0)) < 0.7  # holes inside the box
        weights[y0, x0] = max(weights[y0, x0], 0.5)
    return weights


def random_filter(rng: np.random.Generator, cache: FeatureCache, kinds: dict[str, list[str]]):
    store = cache.metadata
    roll = rng.integers(6)
    if roll == 0:
        return MetadataFilter()
    if roll == 1:  # matches nothing: no hits, not an error
        return MetadataFilter(equals={"path": ["no such image"]})
    if roll == 2 and kinds["number"]:
        column = str(rng.choice(kinds["number"]))
        lo, hi = store.value_range(column)
        cut = lo + (hi - lo) * rng.uniform(0.2, 0.8)
        return MetadataFilter(ranges={column: (lo, cut)})
    if roll == 3 and kinds["list"]:
        column = str(rng.choice(kinds["list"]))
        return MetadataFilter(contains_any={column: [str(rng.choice(store.distinct_values(column)))]})
    column = str(rng.choice(kinds["text"]))
    values = store.distinct_values(column)
    picked = [values[i] for i in rng.choice(len(values), size=min(2, len(values)), replace=False)]
    return MetadataFilter(equals={column: picked})


def random_searches(cache: FeatureCache, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    kinds = column_kinds(cache)
    h, w = cache.grid
    return [dict(
        image_id=int(rng.integers(cache.size)),
        weights=random_weights(rng, h, w),
        k=int(rng.integers(1, 101)),
        flt=random_filter(rng, cache, kinds),
        per_group=str(rng.choice(kinds["text"])) if rng.random() < 0.3 else None,
        exclude=bool(rng.random() < 0.5),
    ) for _ in range(count)]


def run_search(cache: FeatureCache, spec: dict) -> SearchResult:
    return search_regions(SearchRequest(cache=cache, weights=spec["weights"], image_id=spec["image_id"], k=spec["k"],
                                        flt=spec["flt"], per_group=spec["per_group"], exclude_query=spec["exclude"]))


def all_at_once(function, arguments: list) -> list:
    """Run `function` on every argument in its own thread, all released together by a barrier."""
    barrier = threading.Barrier(len(arguments))

    def call(argument):
        barrier.wait(timeout=30)
        return function(argument)

    with ThreadPoolExecutor(max_workers=len(arguments)) as pool:
        return list(pool.map(call, arguments))


@pytest.mark.parametrize("fixture", ["small_cache", "bigger_cache"])
def test_sixteen_concurrent_searches_equal_the_same_searches_run_one_by_one(fixture, request):
    cache = request.getfixturevalue(fixture)
    searches = random_searches(cache, THREADS, seed=5)
    serial = [run_search(cache, spec) for spec in searches]
    assert any(len(one.hits) == 0 for one in serial) and any(len(one.hits) > 5 for one in serial)
    assert any(spec["exclude"] for spec in searches) and any(spec["per_group"] for spec in searches)
    concurrent = all_at_once(lambda spec: run_search(cache, spec), searches)
    for spec, alone, together in zip(searches, serial, concurrent):
        # ids, exact scores, windows (row, col, x0..y1) and metadata of every hit; the score and the metadata of
        # every searched image
        for part in ("hits", "scores", "searched"):
            pd.testing.assert_frame_equal(getattr(alone, part), getattr(together, part), check_exact=True,
                                          obj=f"{part} of {spec}")


def test_concurrent_metadata_queries_equal_serial_ones(bigger_cache):
    """Different queries at once on the shared connection: each gets its own result, never another's."""
    store = bigger_cache.metadata
    rng = np.random.default_rng(3)
    calls = []
    for i in range(4 * THREADS):
        kind = i % 4
        if kind == 0:
            calls.append((store.filter_ids, (MetadataFilter(equals={"location": [f"loc{i % 12}"]}),)))
        elif kind == 1:
            ids = rng.choice(bigger_cache.size, size=int(rng.integers(1, 300)), replace=False)
            calls.append((store.rows, (ids, ["location", "species", "tags"])))
        elif kind == 2:
            calls.append((store.distinct_values, (["domain", "location", "species", "tags"][i % 4],)))
        else:
            calls.append((store.filter_ids, (MetadataFilter(ranges={"hour": (0, i % 24)},
                                                            contains_any={"tags": ["rain"]}),)))
    serial = [function(*args) for function, args in calls]
    for _ in range(2):
        concurrent = all_at_once(lambda call: call[0](*call[1]), calls)
        for expected, got in zip(serial, concurrent):
            if isinstance(expected, pd.DataFrame):
                pd.testing.assert_frame_equal(expected, got)
            elif isinstance(expected, np.ndarray):
                np.testing.assert_array_equal(expected, got)
            else:
                assert expected == got


def test_the_engine_leaves_the_process_warning_filters_alone(bigger_cache, monkeypatch):
    """`warnings.catch_warnings` swaps the process-wide filter list and is not thread-safe: entered per call by
    concurrent sessions, interleavings leave its temporary filter installed for good (every later UserWarning of
    the process silenced) or drop filters another thread set. The cache's tensor views and the scoring kernel,
    run for every search and heat map, must not change the filters at all (counted exactly, not by racing)."""
    changes = []
    real = warnings._filters_mutated
    monkeypatch.setattr(warnings, "_filters_mutated", lambda: (changes.append(1), real())[1])
    before = list(warnings.filters)
    weights = np.zeros(bigger_cache.grid, dtype=np.float32)
    weights[2:4, 1:5] = 1.0
    query = RegionQuery.from_grid_mask(bigger_cache.image_features(0), weights)

    def session(i: int) -> None:
        for _ in range(100):
            bigger_cache.features()
        window_score_maps(bigger_cache.features(), bigger_cache.sqnorms, query, [i])
        score_windows(bigger_cache.features(), bigger_cache.sqnorms, query, None if i % 2 else np.arange(i, 900, 3))

    all_at_once(session, list(range(THREADS)))
    assert not changes, f"the warning filters were changed {len(changes)} times"
    assert warnings.filters == before


def test_features_are_a_view_of_the_memory_map(bigger_cache):
    tensor = bigger_cache.features()
    assert tensor.data_ptr() == bigger_cache.features_bits.ctypes.data
    assert isinstance(bigger_cache.features_bits, np.memmap) and isinstance(bigger_cache.sqnorms, np.memmap)


# ------------------------------------------------------------------------------------------ memory sharing

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SLACK = 16 * 2**20


def status_bytes(key: str) -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_growth(function) -> int:
    """Peak resident memory above the current level while `function` runs, as the kernel counts it.

    Resetting the high-water mark (`5` into /proc/self/clear_refs) and reading VmHWM afterwards sees every
    allocation (torch's allocator included, which tracemalloc does not), however briefly it lived.
    """
    before = status_bytes("VmRSS")
    CLEAR_REFS.write_text("5")
    function()
    return status_bytes("VmHWM") - before


@pytest.fixture(scope="module")
def large_cache(tmp_path_factory) -> FeatureCache:
    """6,400 images 7x7x320: 192 MB of features, four times the engine's bound on a search's temporaries."""
    try:
        CLEAR_REFS.write_text("5")
        status_bytes("VmHWM")
    except (OSError, KeyError):
        pytest.skip("needs Linux's /proc/self/clear_refs and VmHWM to measure peak memory")
    rng = np.random.default_rng(0)
    base = np.maximum(rng.normal(size=(64, 7, 7, 320)), 0).astype(np.float32)
    n = 6400
    out = tmp_path_factory.mktemp("large")
    write_array_cache(out, lambda start, stop: base[np.arange(start, stop) % len(base)], n=n,
                      metadata=pd.DataFrame({"domain": np.where(np.arange(n) % 10 == 0, "out", "in")}))
    return FeatureCache.open(out)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_search_never_holds_a_copy_of_the_cache(large_cache, backend):
    cache_bytes = large_cache.features_bits.nbytes
    bound = CHUNK_BYTES + SLACK
    assert cache_bytes > 2 * bound  # else a copy of the cache could hide under the bound
    for side in (1, 3, 7):  # one cell, 3x3, the whole grid (one window: the matrix-vector path)
        weights = np.pad(np.ones((side, side), dtype=np.float32), (7 - side) // 2)
        for flt in (MetadataFilter(), MetadataFilter(equals={"domain": ["out"]})):  # contiguous views / gathered rows
            request = SearchRequest(cache=large_cache, weights=weights, image_id=7, k=20, flt=flt, backend=backend)
            search_regions(request)  # warm: pages mapped, thread pools started
            grouped = dataclasses.replace(request, per_group="domain")
            grew = peak_growth(lambda r=grouped: search_regions(r))
            assert grew < bound, f"{side}x{side} mask, filter {flt}: peak +{grew / 2**20:.0f} MB"


def test_eight_sessions_share_one_mapped_cache(large_cache):
    """8 concurrent sessions cost at most 8 searches' temporaries, never 8 caches (8 x 192 MB)."""
    requests = [SearchRequest(cache=large_cache, weights=weights.astype(np.float32), image_id=3, k=20)
                for weights in (np.pad(np.ones((3, 3)), 2), np.pad(np.ones((1, 2)), ((3, 3), (2, 3))),
                                np.ones((7, 7)), np.pad(np.ones((2, 2)), ((0, 5), (5, 0))))] * 2
    search_regions(requests[0])
    grew = peak_growth(lambda: all_at_once(search_regions, requests))
    assert grew < 8 * (CHUNK_BYTES + SLACK) < 8 * large_cache.features_bits.nbytes, f"+{grew / 2**20:.0f} MB"
