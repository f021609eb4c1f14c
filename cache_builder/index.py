"""Build the first stage of two-tier search: every cell of the cache projected onto its top-d principal directions,
each value stored in 4 bits.

Why this representation (measured by `benchmarks/first_stage.py` on real EfficientNet-Lite0 features): a
first stage scored by the same masked sliding-window formula as the exact search, on the projected cells with the
cache's exact squared norms, keeps the exact search's geometry (every window, every mask shape, metadata filters).
Real features have a flat spectrum (64 of 320 directions keep under half the energy), so dimensions buy more
recall than precision does: 128 dimensions in 4 bits (64 bytes a cell, a tenth of the bfloat16 cell) found the
exact top-10 far more often than 64 dimensions in bfloat16 (128 bytes), and as often as 128 in float32. Each
dimension has its own uniform 16-level quantiser (a step of 0.5 standard deviations around its mean, so +-3.75
sigma are covered). The exact rerank of the first stage's best candidates from the bfloat16 cache then gives every
reported hit its exact score and window.

The build is resumable and atomic like the cache's: it writes `index.partial/` (basis first, then codes chunk by
chunk, with a state file recording the rows done) and renames it to `index/` only when complete, so an
interrupted build leaves the cache searchable (exactly, or with its previous index) and a rerun continues.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cache_builder import __version__
from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError

DEFAULT_DIMS = 128
STEP_SIGMAS = 0.5  # the quantiser's step, in standard deviations of each dimension's values
FIT_CELLS = 200_000  # cells sampled to fit the basis: the spectrum of 320 channels is stable well below this
CHUNK_BYTES = 256 * 1024 * 1024  # stored features projected per step (and per resume point)
STATE_FILE = "state.json"

ProgressCallback = Callable[[int, int], None]


def default_dims(channels: int) -> int:
    """128 dimensions (recall@10 0.975-0.995 on real 320-channel features with a 1% rerank), or half the channels
    rounded up to the codes' group of 32 values."""
    return min(DEFAULT_DIMS, fmt.CODE_GROUP * -(-channels // (2 * fmt.CODE_GROUP)))


def build_index(cache_dir: Path, dims: int | None = None, on_progress: ProgressCallback | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> list[fmt.FirstStageIndex]:
    """Build (or finish, or replace) the first-stage index of every shard and layer of a complete cache (one
    index per shard and layer, fitted to its own features, so a shard is searched wherever it is served); returns
    them opened. `on_progress` counts images over the whole cache, layer after layer."""
    cache_dir = Path(cache_dir)
    manifest = fmt.read_manifest(cache_dir)
    fmt.check_manifest(manifest, cache_dir)
    return [build_shard_index(location, layer, dims, _offset_progress(on_progress, location, layer, manifest),
                              chunk_bytes) for layer, location in indexed_locations(cache_dir, manifest)]


def indexed_locations(cache_dir: Path, manifest: fmt.Manifest) -> list[tuple[fmt.Manifest, fmt.ShardLocation]]:
    """(the manifest seen at a layer, a shard with images) for every layer of the cache: an empty shard (its
    every image skipped by the build) has nothing to index."""
    return [(layer, location) for layer in (manifest.at_layer(name) for name in manifest.layer_names)
            for location in fmt.shard_locations(cache_dir, layer) if location.count]


def build_shard_index(location: fmt.ShardLocation, manifest: fmt.Manifest, dims: int | None = None,
                      on_progress: ProgressCallback | None = None,
                      chunk_bytes: int = CHUNK_BYTES) -> fmt.FirstStageIndex:
    """One shard's index of the manifest's layer (the whole cache's, for a single-shard, single-layer cache),
    beside that layer's arrays."""
    started = time.perf_counter()
    folder, n = location.arrays, location.count
    features, _ = fmt.open_arrays(folder, manifest, n)
    _, h, w, c = features.shape
    dims = default_dims(c) if dims is None else int(dims)
    limit = fmt.CODE_GROUP * -(-c // fmt.CODE_GROUP)
    if not fmt.CODE_GROUP <= dims <= limit or dims % fmt.CODE_GROUP:
        raise CacheError(f"index dimensions must be a multiple of {fmt.CODE_GROUP} from {fmt.CODE_GROUP} to {limit} "
                         f"(the cache's {c} channels, rounded up), got {dims}")
    signature = fmt.features_signature(folder, manifest)
    partial = folder / fmt.INDEX_PARTIAL_DIR
    state = _resumable_state(partial, signature, dims)
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        sample = sample_cells(features)
        basis, energy = fit_basis(sample, dims)
        np.save(partial / fmt.INDEX_BASIS_FILE, basis)
        np.save(partial / fmt.INDEX_QUANTISER_FILE, fit_quantiser(sample @ basis))
        fmt.allocate_array(partial / fmt.INDEX_CODES_FILE, np.uint8, (n, h, w, dims // 2))
        state = {"signature": signature, "dims": dims, "rows_done": 0, "energy": energy, "elapsed_s": 0.0}
        _save_state(partial, state)
    basis = np.load(partial / fmt.INDEX_BASIS_FILE)
    steps, means = np.load(partial / fmt.INDEX_QUANTISER_FILE)
    codes = np.load(partial / fmt.INDEX_CODES_FILE, mmap_mode="r+")
    rows = max(1, chunk_bytes // max(1, features[0].nbytes))
    elapsed_before = float(state["elapsed_s"])
    for start in range(int(state["rows_done"]), n, rows):
        stop = min(n, start + rows)
        codes[start:stop] = encode_codes(fmt.from_bfloat16_bits(features[start:stop]), basis, steps, means)
        codes.flush()  # the rows are on disk before the state says so
        state["rows_done"] = stop
        state["elapsed_s"] = elapsed_before + time.perf_counter() - started
        _save_state(partial, state)
        if on_progress is not None:
            on_progress(stop, n)
    del codes
    info = {"version": fmt.INDEX_VERSION, "dims": dims, "signature": signature, "energy": state["energy"],
            "built_s": round(elapsed_before + time.perf_counter() - started, 3), "builder_version": __version__}
    fmt.write_json_atomic(partial / fmt.INDEX_FILE, json.dumps(info, indent=2, sort_keys=True))
    (partial / STATE_FILE).unlink()
    _swap_into_place(folder, partial)
    return fmt.open_index(folder, manifest, n)


def ensure_index(cache_dir: Path, dims: int | None = None, on_progress: ProgressCallback | None = None) -> bool:
    """Build the index of every shard and layer that lacks a usable one (new caches, and a rerun after an
    interrupted index build). Returns whether it built any."""
    cache_dir = Path(cache_dir)
    manifest = fmt.read_manifest(cache_dir)
    built = False
    for layer, location in indexed_locations(cache_dir, manifest):
        try:
            current = fmt.open_index(location.arrays, layer, location.count)
            if dims is None or current.dims == dims:
                continue
        except fmt.IndexUnusable:
            pass
        build_shard_index(location, layer, dims, _offset_progress(on_progress, location, layer, manifest))
        built = True
    return built


def _offset_progress(on_progress: ProgressCallback | None, location: fmt.ShardLocation, layer: fmt.Manifest,
                     manifest: fmt.Manifest) -> ProgressCallback | None:
    if on_progress is None:
        return None
    names = manifest.layer_names
    before = names.index(layer.layer) * manifest.image_count + location.start
    return lambda done, _: on_progress(before + done, manifest.image_count * len(names))


def sample_cells(features: np.ndarray, cells: int = FIT_CELLS, seed: int = 0) -> np.ndarray:
    """(m, C) float32: the cells of about `cells` / (H * W) images drawn at random, to fit the basis and quantiser."""
    n, h, w, c = features.shape
    images = min(n, max(1, -(-cells // (h * w))))
    chosen = np.sort(np.random.default_rng(seed).choice(n, images, replace=False))
    return fmt.from_bfloat16_bits(features[chosen]).reshape(-1, c)


def fit_basis(sample: np.ndarray, dims: int) -> tuple[np.ndarray, float]:
    """(C, d) top principal directions of the uncentred second moment of the sampled cells (uncentred: the scores
    are dot products, so the mean direction must be kept), and the share of squared norm they keep. Beyond C
    dimensions (a cache of few channels, rounded up to the codes' group) the basis has zero columns."""
    values = sample.astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(values.T @ values / max(1, len(values)))
    order = np.argsort(eigenvalues)[::-1][:dims]
    total = float(eigenvalues.sum())
    energy = float(eigenvalues[order].sum() / total) if total > 0 else 1.0
    basis = np.zeros((sample.shape[1], dims), dtype=np.float32)
    basis[:, :len(order)] = eigenvectors[:, order]
    return basis, round(energy, 6)


def fit_quantiser(projected: np.ndarray) -> np.ndarray:
    """(2, d) float32 steps and means of each dimension's 16-level quantiser, from sampled projected cells."""
    means = projected.mean(axis=0, dtype=np.float64)
    spread = projected.std(axis=0, dtype=np.float64)
    steps = np.maximum(STEP_SIGMAS * spread, 1e-30)  # a dead dimension (zero column) gets a harmless step
    return np.stack([steps, means]).astype(np.float32)


def encode_codes(values: np.ndarray, basis: np.ndarray, steps: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(..., C) float32 cells -> (..., d / 2) packed 4-bit codes of their projection: nibble v stands for
    steps * (v - 7.5) + means, the nearest of the 16 levels (the outermost ones for values beyond them)."""
    levels = np.floor((values @ basis - means) / steps + 8.0)
    return fmt.pack_codes(np.clip(levels, 0, 15).astype(np.uint8))


def _resumable_state(partial: Path, signature: dict, dims: int) -> dict | None:
    """The state of an interrupted build of the same index over the same features, else None (start over)."""
    try:
        state = fmt.read_json_object(partial / STATE_FILE)
    except ValueError:
        return None
    same = state.get("signature") == signature and state.get("dims") == dims
    files = all((partial / name).is_file()
                for name in (fmt.INDEX_BASIS_FILE, fmt.INDEX_QUANTISER_FILE, fmt.INDEX_CODES_FILE))
    return state if same and files else None


def _save_state(partial: Path, state: dict) -> None:
    fmt.write_json_atomic(partial / STATE_FILE, json.dumps(state, sort_keys=True))


def _swap_into_place(cache_dir: Path, partial: Path) -> None:
    """index.partial/ -> index/ by renames: at every instant the cache has either the old index or the new one
    (or, for a moment, none: searches then run exact)."""
    target, old = cache_dir / fmt.INDEX_DIR, cache_dir / (fmt.INDEX_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def remove_index(cache_dir: Path) -> None:
    for name in (fmt.INDEX_DIR, fmt.INDEX_PARTIAL_DIR, fmt.INDEX_DIR + ".old"):
        shutil.rmtree(Path(cache_dir) / name, ignore_errors=True)
