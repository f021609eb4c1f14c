"""Caches written straight from arrays, through the same writer code as real builds.

Tests and benchmarks need caches of known content (tiny ones, and 100,000-image ones) without running a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from cache_builder import __version__
from cache_builder.metadata_table import write_metadata_frame
from cache_builder import cache_format as fmt

ChunkFn = Callable[[int, int], np.ndarray]


def write_array_cache(
    out: Path,
    features: np.ndarray | ChunkFn,
    n: int | None = None,
    metadata: pd.DataFrame | None = None,
    input_size: int = 224,
    images: np.ndarray | None = None,
    model: str = "synthetic",
    layer: str = "synthetic",
    chunk: int = 2048,
    label_column: str | None = None,
    shard_size: int | None = None,
    more_layers: dict[str, np.ndarray] | None = None,
) -> fmt.Manifest:
    """Write a complete cache. `features` is (N, H, W, C) float, or `fn(start, stop)` returning such rows.

    `label_column` names the metadata column that holds an image's class, as a real source declares it.
    `shard_size` writes it as shards of that many images (`cache_builder.sharding`) instead of one.
    `more_layers` (name -> (N, H', W', C') float) makes a multi-layer cache, `layer` holding `features`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if callable(features):
        if n is None:
            raise ValueError("n is required when features come from a function")
        rows_of = features
    else:
        n = len(features)
        rows_of = lambda start, stop: features[start:stop]  # noqa: E731
    first = np.asarray(rows_of(0, min(n, 1)))
    _, h, w, c = first.shape
    ranges = [(0, n)] if shard_size is None else [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]
    extra = list((more_layers or {}).items())
    layers = [{"name": layer, "grid": [h, w, c], "dir": ""}] + [
        {"name": name, "grid": list(np.shape(array)[1:]), "dir": fmt.layer_dir_name(k)}
        for k, (name, array) in enumerate(extra, start=1)] if extra else []
    for number, (lo, hi) in enumerate(ranges):
        folder = out if shard_size is None else out / fmt.shard_dir_name(number)
        folder.mkdir(parents=True, exist_ok=True)
        _write_arrays(folder, rows_of, lo, hi, (h, w, c), chunk)
        for entry, (_, array) in zip(layers[1:], extra):
            (folder / entry["dir"]).mkdir(parents=True, exist_ok=True)
            _write_arrays(folder / entry["dir"], lambda start, stop, a=array: a[start:stop], lo, hi,
                          tuple(entry["grid"]), chunk)
        for image_id in range(lo, hi if images is not None else lo):
            target = folder / fmt.image_relpath(image_id - lo)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[image_id]).save(target, quality=95)
    frame = pd.DataFrame({"id": np.arange(n), "path": [f"synthetic/{i:07d}.png" for i in range(n)]})
    if metadata is not None:
        frame = pd.concat([frame, metadata.reset_index(drop=True).drop(columns=["id", "path"], errors="ignore")],
                          axis=1)
    write_metadata_frame(out / fmt.METADATA_FILE, frame)
    manifest = fmt.Manifest(
        model=model, layer=layer, weights_source="synthetic", weights_sha256=None,
        preprocessing={"input_size": input_size}, input_size=input_size, grid=(h, w, c), image_count=n,
        sources=[{"spec": "synthetic", "kind": "synthetic", "domain": None, "images": n,
                  **({"label_column": label_column} if label_column else {})}],
        builder_version=__version__, status=fmt.STATUS_COMPLETE, layers=layers,
        shards=[] if shard_size is None else [{"dir": fmt.shard_dir_name(k), "count": hi - lo}
                                              for k, (lo, hi) in enumerate(ranges)],
    )
    fmt.write_manifest(out, manifest)
    return manifest


def _write_arrays(folder: Path, rows_of: ChunkFn, lo: int, hi: int, grid: tuple[int, int, int], chunk: int) -> None:
    h, w, c = grid
    stored = np.lib.format.open_memmap(folder / fmt.FEATURES_FILE, mode="w+", dtype=np.uint16,
                                       shape=(hi - lo, h, w, c))
    sqnorms = np.lib.format.open_memmap(folder / fmt.SQNORMS_FILE, mode="w+", dtype=np.float32, shape=(hi - lo, h, w))
    for start in range(lo, hi, chunk):
        block = np.ascontiguousarray(rows_of(start, min(hi, start + chunk)), dtype=np.float32)
        stored[start - lo:start - lo + len(block)], sqnorms[start - lo:start - lo + len(block)] = \
            fmt.encode_features(block)
    stored.flush()
    sqnorms.flush()
    del stored, sqnorms
