"""The first-stage index (cache_builder/index.py): what it holds, and that it is built atomically and resumably."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_builder import cache_format as fmt
from cache_builder.cli import main as builder_main
from cache_builder.index import build_index, ensure_index, fit_basis, project
from cache_builder.synthetic import write_array_cache
from dashboard.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
N, GRID = 300, (4, 5, 24)


def features(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, GRID[2] + 1, dtype=np.float32) ** -0.5  # a few strong directions, like real features
    return rng.standard_normal((N, *GRID), dtype=np.float32) * spectrum


def new_cache(path: Path, seed: int = 0) -> Path:
    write_array_cache(path, features(seed))
    return path


def test_the_index_holds_every_cell_projected_on_the_top_principal_directions(tmp_path):
    cache = new_cache(tmp_path / "c")
    index = build_index(cache, dims=8)
    stored = FeatureCache.open(cache)
    assert index.dims == 8 and index.codes_bits.shape == (N, 4, 5, 8) and index.basis.shape == (24, 8)
    np.testing.assert_allclose(index.basis.T @ index.basis, np.eye(8), atol=1e-5)
    assert np.array_equal(index.codes_bits, project(stored.features_bits, index.basis))
    values = fmt.from_bfloat16_bits(stored.features_bits).reshape(-1, 24).astype(np.float64)
    kept = (values @ index.basis) ** 2
    assert index.energy == pytest.approx(kept.sum() / (values ** 2).sum(), abs=0.02)  # fitted on every cell here
    assert 8 / 24 < index.energy < 1  # the strong directions came first


def test_the_basis_follows_the_strongest_directions():
    rng = np.random.default_rng(1)
    direction = np.zeros(6, np.float32)
    direction[4] = 1
    cells = rng.standard_normal((500, 1, 1, 6)).astype(np.float32) * 0.1 + direction * 3
    basis, energy = fit_basis(fmt.to_bfloat16_bits(cells), 1)
    assert abs(basis[4, 0]) > 0.99 and energy > 0.9


def test_default_dims_and_bad_dims(tmp_path):
    cache = new_cache(tmp_path / "c")
    assert build_index(cache).dims == 12  # 64, at most half the channels
    with pytest.raises(fmt.CacheError, match="must lie in 1..24"):
        build_index(cache, dims=25)


def test_an_index_of_other_features_is_stale_and_a_damaged_one_is_refused(tmp_path):
    cache = new_cache(tmp_path / "c")
    build_index(cache, dims=6)
    manifest = fmt.read_manifest(cache)
    fmt.open_index(cache, manifest)
    codes = cache / fmt.INDEX_DIR / fmt.INDEX_CODES_FILE
    codes.write_bytes(codes.read_bytes()[:-100])
    with pytest.raises(fmt.IndexUnusable, match="truncated|holds") as damaged:
        fmt.open_index(cache, manifest)
    assert damaged.value.problem == "damaged"
    (cache / fmt.INDEX_DIR / fmt.INDEX_FILE).write_text("{not json")
    with pytest.raises(fmt.IndexUnusable) as unreadable:
        fmt.open_index(cache, manifest)
    assert unreadable.value.problem == "damaged"

    build_index(cache, dims=6)
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
    reference = build_index(new_cache(tmp_path / "ref"), dims=6)
    row_bytes = int(np.prod(GRID)) * 2
    done = []

    def interrupt_after_two_chunks(rows_done: int, total: int) -> None:
        done.append(rows_done)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(cache, dims=6, on_progress=interrupt_after_two_chunks, chunk_bytes=50 * row_bytes)
    assert not (cache / fmt.INDEX_DIR).exists() and (cache / fmt.INDEX_PARTIAL_DIR).is_dir()
    with pytest.raises(fmt.IndexUnusable, match="no first-stage index"):
        FeatureCache.open(cache).first_stage()  # the cache opens; the search runs exact meanwhile
    resumed = []
    index = build_index(cache, dims=6, on_progress=lambda d, t: resumed.append(d), chunk_bytes=50 * row_bytes)
    assert resumed[0] == 150  # continued after the two chunks already on disk
    assert np.array_equal(index.codes_bits, reference.codes_bits)
    assert not (cache / fmt.INDEX_PARTIAL_DIR).exists()


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from cache_builder.index import build_index
def die(done, total):
    if done >= 100:
        os.kill(os.getpid(), signal.SIGKILL)
build_index(sys.argv[2], dims=6, on_progress=die, chunk_bytes=int(sys.argv[3]))
"""


def test_an_index_build_killed_with_sigkill_keeps_the_old_index_and_completes_on_rerun(tmp_path):
    cache = new_cache(tmp_path / "c")
    old = build_index(cache, dims=4)
    run = subprocess.run([sys.executable, "-c", KILLER, str(ROOT), str(cache), str(50 * int(np.prod(GRID)) * 2)],
                         capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    kept = fmt.open_index(cache, fmt.read_manifest(cache))
    assert kept.dims == 4 and np.array_equal(kept.codes_bits, old.codes_bits)  # the old index, whole
    assert builder_main(["index", str(cache), "--dims", "6", "--quiet"]) == 0
    assert fmt.open_index(cache, fmt.read_manifest(cache)).dims == 6
    assert not (cache / fmt.INDEX_PARTIAL_DIR).exists() and not (cache / (fmt.INDEX_DIR + ".old")).exists()


def test_cli_index_and_info(tmp_path, capsys):
    cache = new_cache(tmp_path / "c")
    assert builder_main(["info", str(cache)]) == 0
    assert "none usable (missing): searches are exact" in capsys.readouterr().out
    assert builder_main(["index", str(cache), "--dims", "5", "--quiet"]) == 0
    assert "index complete" in capsys.readouterr().out
    assert builder_main(["info", str(cache)]) == 0
    assert "5 dimensions per cell" in capsys.readouterr().out
    assert builder_main(["index", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "is not a feature cache" in capsys.readouterr().err


def test_an_index_of_a_removed_cache_file_is_an_error_not_a_crash(tmp_path, capsys):
    cache = new_cache(tmp_path / "c")
    os.remove(cache / fmt.SQNORMS_FILE)
    assert builder_main(["index", str(cache), "--quiet"]) == 2
    assert "sqnorms.npy is missing" in capsys.readouterr().err
