"""Sharded caches: shard folders written whole, and `python -m cache_builder shard` to split an existing cache.

A shard folder (`cache_format`, `shard_locations`) holds the features, norms, frames and images of one contiguous
id range, numbered from 0 inside the shard. It is written under a temporary name and renamed into place complete,
with a `shard.json` saying what it holds, so a shard on disk is either whole or absent: a build or split killed
midway is resumed shard by shard. The manifest, written last, is what lists the shards.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError

SHARD_FILE = "shard.json"
DEFAULT_SHARD_SIZE = 50_000  # ~1.5 GB of 7x7x320 bfloat16 features: a few shards per serving node's RAM

ProgressCallback = Callable[[int, int], None]


def write_shard(folder: Path, bits: np.ndarray, sqnorms: np.ndarray, frames: np.ndarray | None,
                images: Iterable[tuple[int, bytes | Path]], info: dict[str, Any],
                more_layers: Iterable[tuple[str, np.ndarray, np.ndarray]] = ()) -> None:
    """One complete shard folder at `folder`: arrays, images (local row -> JPEG bytes or a file to copy) and
    `shard.json` (`info` plus the row count), renamed into place only when everything is written. `more_layers`:
    (layer dir, bits, norms) of a multi-layer cache's further layers."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    arrays = [("", fmt.FEATURES_FILE, bits), ("", fmt.SQNORMS_FILE, sqnorms), ("", fmt.FRAMES_FILE, frames)]
    for layer_dir, layer_bits, layer_norms in more_layers:
        (partial / layer_dir).mkdir(parents=True)
        arrays += [(layer_dir, fmt.FEATURES_FILE, layer_bits), (layer_dir, fmt.SQNORMS_FILE, layer_norms)]
    for layer_dir, name, array in arrays:
        if array is not None:
            np.save(partial / layer_dir / name, np.ascontiguousarray(array))
    for row, image in images:
        target = partial / fmt.image_relpath(row)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, Path):
            shutil.copyfile(image, target)
        else:
            target.write_bytes(image)
    fmt.write_json_atomic(partial / SHARD_FILE, json.dumps({**info, "count": int(len(bits))}, sort_keys=True))
    _fsync_tree(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def read_shard_info(folder: Path) -> dict[str, Any] | None:
    """A finished shard's `shard.json`, None when the folder holds no finished shard."""
    try:
        return fmt.read_json_object(Path(folder) / SHARD_FILE)
    except ValueError:
        return None


def _fsync_tree(folder: Path) -> None:
    """The shard's files on disk before it is renamed into place (a power cut cannot leave a renamed, empty
    shard)."""
    for path in folder.rglob("*.npy"):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def split_cache(source: Path, out: Path, shard_size: int = DEFAULT_SHARD_SIZE, index: bool = True,
                on_progress: ProgressCallback | None = None) -> fmt.Manifest:
    """Copy the complete cache `source` into `out` as shards of `shard_size` images (the last one smaller): same
    ids, metadata and features, each shard with its own first-stage index (unless `index` is False). Rerunning
    after an interruption keeps the shards already written."""
    source, out = Path(source), Path(out)
    if shard_size <= 0:
        raise CacheError("--shard-size must be a positive number of images")
    manifest = fmt.read_manifest(source)
    fmt.check_manifest(manifest, source)
    if out.resolve() == source.resolve():
        raise CacheError("the sharded copy needs its own folder (--out), not the cache it is split from")
    if (out / fmt.MANIFEST_FILE).is_file():
        existing = fmt.read_manifest(out)
        if existing.fingerprint != manifest.fingerprint or existing.created != manifest.created:
            raise CacheError(f"{out} holds another cache; choose an empty folder")
    elif out.exists() and any(out.iterdir()):
        raise CacheError(f"{out} is not empty; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    n = manifest.image_count
    layers = [manifest.at_layer(name) for name in manifest.layer_names]
    plan = [(number, start, min(n, start + shard_size)) for number, start in enumerate(range(0, n, shard_size))]
    sharded = replace(manifest, status=fmt.STATUS_BUILDING, shards=[
        {"dir": fmt.shard_dir_name(number), "count": stop - start} for number, start, stop in plan])
    fmt.write_manifest(out, sharded)  # first: a rerun recognises the folder; readers refuse it until complete
    origin = {"split_from": str(source), "fingerprint": manifest.fingerprint}
    for number, start, stop in plan:
        folder = out / fmt.shard_dir_name(number)
        info = read_shard_info(folder)
        if info is None or info.get("ids") != [start, stop] or info.get("origin") != origin:
            (bits, norms, frames, images), *more = [_rows(fmt.shard_locations(source, layer), layer, start, stop)
                                                   for layer in layers]
            write_shard(folder, bits, norms, frames, images, {"ids": [start, stop], "origin": origin},
                        [(layer.layer_dir, rows[0], rows[1]) for layer, rows in zip(layers[1:], more)])
        if on_progress is not None:
            on_progress(stop, n)
    shutil.copyfile(source / fmt.METADATA_FILE, out / fmt.METADATA_FILE)
    sharded = replace(sharded, status=fmt.STATUS_COMPLETE)
    fmt.write_manifest(out, sharded)
    if index:
        from cache_builder.index import ensure_index

        ensure_index(out)
    return sharded


def _rows(locations: list[fmt.ShardLocation], manifest: fmt.Manifest, start: int, stop: int):
    """Features and norms (of the manifest's layer), frames and image files of ids start..stop-1 of a cache,
    across its own shards."""
    bits, norms, frames, images = [], [], [], []
    for location in locations:
        lo, hi = max(start, location.start), min(stop, location.stop)
        if lo >= hi:
            continue
        features, sqnorms = fmt.open_arrays(location.arrays, manifest, location.count)
        boxes = fmt.open_frames(location.folder, manifest, location.count)
        bits.append(np.asarray(features[lo - location.start:hi - location.start]))
        norms.append(np.asarray(sqnorms[lo - location.start:hi - location.start]))
        if boxes is not None:
            frames.append(np.asarray(boxes[lo - location.start:hi - location.start]))
        for image_id in range(lo, hi):
            path = location.folder / fmt.image_relpath(image_id - location.start)
            if path.is_file():
                images.append((image_id - start, path))
    return (np.concatenate(bits), np.concatenate(norms), np.concatenate(frames) if frames else None, images)
