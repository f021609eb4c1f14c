"""Which caches a caches folder holds (dashboard/catalog.py), and which one Compare puts beside another."""

from __future__ import annotations

import json
import shutil

import numpy as np

from cache_builder.synthetic import write_array_cache
from dashboard.catalog import companion, find_caches


def test_compare_defaults_to_another_cache_of_the_same_images(small_cache, tmp_path):
    for name in ("a-model", "b-other-size", "c-layer"):
        shutil.copytree(small_cache.path, tmp_path / name)
    write_array_cache(tmp_path / "b-other-size", np.ones((7, 2, 2, 4), np.float32))  # 7 images, not 40
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text(json.dumps({"status": "building"}))
    entries = {entry.name: entry for entry in find_caches(tmp_path)}
    assert entries["broken"].problem is not None
    assert companion(list(entries.values()), entries["a-model"]) == ("c-layer", None)  # same 40 images
    assert companion(list(entries.values()), entries["b-other-size"]) == ("a-model", None)  # else any other
    alone = [entries["a-model"], entries["broken"]]
    assert companion(alone, entries["a-model"]) is None


def test_compare_defaults_to_another_layer_of_a_multi_layer_cache(small_cache, tmp_path):
    shutil.copytree(small_cache.path, tmp_path / "a-single")
    rng = np.random.default_rng(0)
    write_array_cache(tmp_path / "b-layers", rng.random((40, 5, 6, 16), np.float32), layer="late",
                      more_layers={"early": rng.random((40, 10, 12, 8), np.float32),
                                   "middle": rng.random((40, 5, 6, 8), np.float32)})
    entries = {entry.name: entry for entry in find_caches(tmp_path)}
    assert entries["b-layers"].problem is None
    assert companion(list(entries.values()), entries["b-layers"]) == ("b-layers", "early")
    assert companion(list(entries.values()), entries["b-layers"], "early") == ("b-layers", "late")
    assert companion(list(entries.values()), entries["a-single"]) == ("b-layers", None)
