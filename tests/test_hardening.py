"""Shared use and failures: concurrent searches agree with serial ones; a failed build never looks complete."""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache_builder import build as build_module
from cache_builder.build import BuildOptions, build_cache
from cache_builder.sources import SourceOptions, parse_source
from cache_builder.synthetic import write_array_cache
from cache_builder import cache_format as fmt
from dashboard.feature_cache import FeatureCache
from dashboard.metadata import MetadataFilter
from dashboard.search import RegionQuery, search_cache

SMALL = dict(model="efficientnet_lite0", image_size=96, batch_size=4, workers=0)


@pytest.fixture(scope="module")
def bigger_cache(tmp_path_factory) -> FeatureCache:
    rng = np.random.default_rng(11)
    n = 3000
    features = np.maximum(rng.normal(size=(n, 7, 7, 64)), 0).astype(np.float32)
    metadata = pd.DataFrame({"domain": rng.choice(["in", "out"], n), "location": rng.choice(list("abcdefgh"), n)})
    out = tmp_path_factory.mktemp("bigger")
    write_array_cache(out, features, metadata=metadata)
    return FeatureCache.open(out)


def random_searches(cache: FeatureCache, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    h, w, _ = cache.grid
    searches = []
    for _ in range(count):
        weights = np.zeros((h, w), dtype=np.float32)
        y0, x0 = rng.integers(h), rng.integers(w)
        y1, x1 = rng.integers(y0, h) + 1, rng.integers(x0, w) + 1
        weights[y0:y1, x0:x1] = rng.uniform(0.2, 1.0, size=(y1 - y0, x1 - x0))
        searches.append(dict(
            image_id=int(rng.integers(cache.size)), weights=weights, k=int(rng.integers(1, 30)),
            flt=MetadataFilter(equals={"domain": ["out"]}) if rng.random() < 0.5 else None,
            per_group="location" if rng.random() < 0.3 else None,
        ))
    return searches


def run(cache: FeatureCache, spec: dict) -> pd.DataFrame:
    query = RegionQuery.from_grid_mask(cache.image_features(spec["image_id"]), spec["weights"])
    return search_cache(cache, query, k=spec["k"], flt=spec["flt"], per_group=spec["per_group"],
                        exclude_id=spec["image_id"]).hits


@pytest.mark.parametrize("fixture", ["small_cache", "bigger_cache"])
def test_sixteen_concurrent_searches_match_serial_ones(fixture, request):
    cache = request.getfixturevalue(fixture)
    searches = random_searches(cache, 16, seed=5)
    serial = [run(cache, spec) for spec in searches]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda spec: run(cache, spec), searches))
    for one, other in zip(serial, concurrent):
        pd.testing.assert_frame_equal(one, other)


def test_concurrent_metadata_filters(bigger_cache):
    store = bigger_cache.metadata
    filters = [MetadataFilter(equals={"location": [c]}) for c in "abcdefgh"] * 4
    serial = [store.filter_ids(f) for f in filters]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(store.filter_ids, filters))
    for one, other in zip(serial, concurrent):
        np.testing.assert_array_equal(one, other)


def test_features_are_shared_not_copied(bigger_cache):
    tensor = bigger_cache.features()
    assert tensor.data_ptr() == bigger_cache.features_bits.ctypes.data  # a view of the memory map


def test_disk_full_during_build_leaves_no_complete_cache_and_resumes(tmp_path, monkeypatch):
    sources = [parse_source("demo", SourceOptions(demo_size=24))]
    clean = tmp_path / "clean"
    build_cache(sources, clean, BuildOptions(**SMALL))

    real_write = Path.write_bytes
    writes = {"count": 0}

    def failing_write(self, data):
        writes["count"] += 1
        if writes["count"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    target = tmp_path / "full"
    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="No space left"):
        build_cache(sources, target, BuildOptions(**SMALL))
    monkeypatch.setattr(Path, "write_bytes", real_write)
    with pytest.raises(fmt.CacheError, match="not complete"):
        FeatureCache.open(target)

    build_cache(sources, target, BuildOptions(**SMALL))
    for name in (fmt.FEATURES_FILE, fmt.SQNORMS_FILE):
        assert (clean / name).read_bytes() == (target / name).read_bytes()
    assert FeatureCache.open(target).size == 24
    assert not (target / build_module.STATE_FILE).exists()


def test_cli_reports_a_system_error_in_one_line(monkeypatch, capsys):
    from cache_builder import cli

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/caches/x/features.partial.npy")

    monkeypatch.setattr("cache_builder.build.build_cache", no_space)
    status = cli.main(["build", "--source", "demo", "--demo-size", "4", "--out", "/tmp/vfs-never", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert err[0].startswith("error: No space left on device (/caches/x/features.partial.npy)")
