"""The first-stage index (cache_builder/index.py): what it holds, and that it is built atomically and resumably."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_builder import cache_format as fmt
from cache_builder.cli import main as builder_main
from cache_builder.index import build_index, encode_codes, ensure_index, fit_basis, fit_quantiser
from cache_builder.synthetic import write_array_cache
from dashboard.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
N, GRID = 300, (4, 5, 72)


def features(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, GRID[2] + 1, dtype=np.float32) ** -0.5  # a few strong directions, like real features
    return rng.standard_normal((N, *GRID), dtype=np.float32) * spectrum


def new_cache(path: Path, seed: int = 0) -> Path:
    write_array_cache(path, features(seed))
    return path


def test_the_index_holds_every_cell_projected_on_the_top_principal_directions_in_4_bits(tmp_path):
    cache = new_cache(tmp_path / "c")
    [index] = build_index(cache, dims=32)
    stored = FeatureCache.open(cache)
    assert index.dims == 32 and index.codes.shape == (N, 4, 5, 16) and index.codes.dtype == np.uint8
    assert index.basis.shape == (72, 32) and index.steps.shape == index.means.shape == (32,)
    np.testing.assert_allclose(index.basis.T @ index.basis, np.eye(32), atol=1e-5)
    values = fmt.from_bfloat16_bits(stored.features_bits)
    assert np.array_equal(index.codes, encode_codes(values, index.basis, index.steps, index.means))
    projected = values @ index.basis
    error = np.abs(index.values(np.asarray(index.codes)) - projected)
    inside = np.abs(projected - index.means) < 7.5 * index.steps  # within the outermost levels
    assert inside.mean() > 0.99
    assert np.all(error[inside] <= index.steps[np.nonzero(inside)[-1]] / 2 + 1e-5)  # the nearest level
    cells = values.reshape(-1, 72).astype(np.float64)
    kept = (cells @ index.basis) ** 2
    assert index.energy == pytest.approx(kept.sum() / (cells ** 2).sum(), abs=0.02)  # fitted on every cell here
    assert 32 / 72 < index.energy < 1  # the strong directions came first


def test_the_basis_follows_the_strongest_directions_and_pads_past_the_channels():
    rng = np.random.default_rng(1)
    direction = np.zeros(6, np.float32)
    direction[4] = 1
    cells = rng.standard_normal((500, 6)).astype(np.float32) * 0.1 + direction * 3
    basis, energy = fit_basis(cells, 1)
    assert abs(basis[4, 0]) > 0.99 and energy > 0.9
    padded, energy = fit_basis(cells, 32)  # a 6-channel cache still gets a 32-value group
    assert padded.shape == (6, 32) and not padded[:, 6:].any() and energy == pytest.approx(1)


def test_codes_pack_two_values_a_byte_and_clip_beyond_the_outer_levels():
    levels = np.random.default_rng(2).integers(0, 16, size=(3, 64), dtype=np.uint8)
    packed = fmt.pack_codes(levels)
    assert packed.shape == (3, 32)
    assert packed[0, 0] == levels[0, 0] | (levels[0, 16] << 4)  # the layout the kernel unpacks
    assert np.array_equal(fmt.unpack_codes(packed), levels.astype(np.float32) - 7.5)
    projected = np.array([[0.0, 1.0, -100.0, 100.0, 0.26, 0.24] + [0.0] * 26], dtype=np.float32)
    steps, means = fit_quantiser(np.random.default_rng(3).normal(size=(1000, 32)).astype(np.float32))
    steps[:], means[:] = 0.5, 0.0
    codes = encode_codes(projected, np.eye(32, dtype=np.float32), steps, means)
    values = fmt.unpack_codes(codes)[0] * steps + means
    assert values[:6].tolist() == [0.25, 1.25, -3.75, 3.75, 0.25, 0.25]


def test_default_dims_and_bad_dims(tmp_path):
    cache = new_cache(tmp_path / "c")
    assert build_index(cache)[0].dims == 64  # half the channels, rounded up to a group of 32 (at most 128)
    for bad in (33, 0, 128):
        with pytest.raises(fmt.CacheError, match="multiple of 32 from 32 to 96"):
            build_index(cache, dims=bad)


def test_an_index_of_other_features_is_stale_and_a_damaged_one_is_refused(tmp_path):
    cache = new_cache(tmp_path / "c")
    build_index(cache, dims=32)
    manifest = fmt.read_manifest(cache)
    fmt.open_index(cache, manifest)
    quantiser = cache / fmt.INDEX_DIR / fmt.INDEX_QUANTISER_FILE
    np.save(quantiser, np.full((2, 32), np.nan, dtype=np.float32))
    with pytest.raises(fmt.IndexUnusable, match="not finite") as garbage:
        fmt.open_index(cache, manifest)
    assert garbage.value.problem == "damaged"
    codes = cache / fmt.INDEX_DIR / fmt.INDEX_CODES_FILE
    codes.write_bytes(codes.read_bytes()[:-100])
    with pytest.raises(fmt.IndexUnusable, match="truncated|holds") as damaged:
        fmt.open_index(cache, manifest)
    assert damaged.value.problem == "damaged"
    (cache / fmt.INDEX_DIR / fmt.INDEX_FILE).write_text("{not json")
    with pytest.raises(fmt.IndexUnusable) as unreadable:
        fmt.open_index(cache, manifest)
    assert unreadable.value.problem == "damaged"

    build_index(cache, dims=32)
    info = fmt.read_json_object(cache / fmt.INDEX_DIR / fmt.INDEX_FILE)
    fmt.write_json_atomic(cache / fmt.INDEX_DIR / fmt.INDEX_FILE, json.dumps({**info, "version": 1}))
    with pytest.raises(fmt.IndexUnusable, match="index version 1, this version reads 2; rebuild it") as old:
        fmt.open_index(cache, manifest)  # last version's bfloat16 index
    assert old.value.problem == "stale"

    build_index(cache, dims=32)
    stored = np.load(cache / fmt.FEATURES_FILE, mmap_mode="r+")
    stored[N // 2, 1, 1, 3] ^= 0x40  # one value rewritten in place, file size unchanged
    stored.flush()
    del stored
    with pytest.raises(fmt.IndexUnusable, match="features changed") as stale:
        fmt.open_index(cache, manifest)
    assert stale.value.problem == "stale"
    assert ensure_index(cache) is True  # a rerun rebuilds it
    fmt.open_index(cache, manifest)


def test_an_interrupted_index_build_leaves_the_cache_searchable_and_resumes(tmp_path):
    cache = new_cache(tmp_path / "c")
    [reference] = build_index(new_cache(tmp_path / "ref"), dims=32)
    row_bytes = int(np.prod(GRID)) * 2
    done = []

    def interrupt_after_two_chunks(rows_done: int, total: int) -> None:
        done.append(rows_done)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(cache, dims=32, on_progress=interrupt_after_two_chunks, chunk_bytes=50 * row_bytes)
    assert not (cache / fmt.INDEX_DIR).exists() and (cache / fmt.INDEX_PARTIAL_DIR).is_dir()
    with pytest.raises(fmt.IndexUnusable, match="no first-stage index"):
        FeatureCache.open(cache).first_stage()  # the cache opens; the search runs exact meanwhile
    resumed = []
    [index] = build_index(cache, dims=32, on_progress=lambda d, t: resumed.append(d), chunk_bytes=50 * row_bytes)
    assert resumed[0] == 150  # continued after the two chunks already on disk
    assert np.array_equal(index.codes, reference.codes)
    assert not (cache / fmt.INDEX_PARTIAL_DIR).exists()


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from cache_builder.index import build_index
def die(done, total):
    if done >= 100:
        os.kill(os.getpid(), signal.SIGKILL)
build_index(sys.argv[2], dims=64, on_progress=die, chunk_bytes=int(sys.argv[3]))
"""


def test_an_index_build_killed_with_sigkill_keeps_the_old_index_and_completes_on_rerun(tmp_path):
    cache = new_cache(tmp_path / "c")
    [old] = build_index(cache, dims=32)
    run = subprocess.run([sys.executable, "-c", KILLER, str(ROOT), str(cache), str(50 * int(np.prod(GRID)) * 2)],
                         capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    kept = fmt.open_index(cache, fmt.read_manifest(cache))
    assert kept.dims == 32 and np.array_equal(kept.codes, old.codes)  # the old index, whole
    assert builder_main(["index", str(cache), "--dims", "64", "--quiet"]) == 0
    assert fmt.open_index(cache, fmt.read_manifest(cache)).dims == 64
    assert not (cache / fmt.INDEX_PARTIAL_DIR).exists() and not (cache / (fmt.INDEX_DIR + ".old")).exists()


def test_cli_index_and_info(tmp_path, capsys):
    cache = new_cache(tmp_path / "c")
    assert builder_main(["info", str(cache)]) == 0
    assert "none usable (missing): searches are exact" in capsys.readouterr().out
    assert builder_main(["index", str(cache), "--dims", "96", "--quiet"]) == 0
    assert "index complete" in capsys.readouterr().out
    assert builder_main(["info", str(cache)]) == 0
    assert "96 dimensions per cell" in capsys.readouterr().out
    assert builder_main(["index", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "is not a feature cache" in capsys.readouterr().err


def test_an_index_of_a_removed_cache_file_is_an_error_not_a_crash(tmp_path, capsys):
    cache = new_cache(tmp_path / "c")
    os.remove(cache / fmt.SQNORMS_FILE)
    assert builder_main(["index", str(cache), "--quiet"]) == 2
    assert "sqnorms.npy is missing" in capsys.readouterr().err
