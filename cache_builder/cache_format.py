"""The on-disk cache layout: what `cache_builder` writes and `dashboard` reads, owned by the writer.

A cache is a directory::

    manifest.json      format version, model, layer, preprocessing, grid, dtype, counts, timings, status
    features.npy       (N, H, W, C) uint16: the raw bits of bfloat16 features (numpy has no bfloat16)
    sqnorms.npy        (N, H, W) float32: squared L2 norm of each position of the *stored* (rounded) features
    frames.npy         (N, 4) int32, whole-frame ("fit") caches only: the pixel box (x0, y0, x1, y1) of each image
                       that shows the picture; the rest is padding, whose cells hold zero features
    images/            the images exactly as the model saw them (after resize/crop), ``images/000/0000042.jpg``
    metadata.duckdb    table ``images``: ``id`` = row in features.npy, ``path``, one typed column per metadata field

Why bfloat16: on the target CPUs a bfloat16 GEMM runs 3-7x faster than float32 and float16 runs 10-30x slower
(see ``benchmarks/search.py``); bfloat16 also halves the bytes scanned per query.

Row *i* of every array is image ``id = i`` of the metadata table. ``status`` is ``complete`` only once every file
above has been written; readers must refuse anything else (``check_manifest``, ``open_arrays``).

Plain numpy on purpose: the dashboard, scripts and tests read caches without importing torch through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FEATURES_FILE = "features.npy"
SQNORMS_FILE = "sqnorms.npy"
FRAMES_FILE = "frames.npy"
IMAGES_DIR = "images"
METADATA_FILE = "metadata.duckdb"
METADATA_TABLE = "images"
STATUS_COMPLETE = "complete"
STATUS_BUILDING = "building"
FEATURE_DTYPE = "bfloat16"  # stored as uint16 bit patterns
IMAGE_SUFFIX = ".jpg"
FRAME_MODES = ("crop", "fit")


class CacheError(Exception):
    """A cache that cannot be used as it is; the message says why and what to do."""


def image_relpath(image_id: int) -> str:
    """Display image of one row, sharded by thousands so no folder grows past 1,000 files."""
    return f"{IMAGES_DIR}/{image_id // 1000:03d}/{image_id:07d}{IMAGE_SUFFIX}"


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounded to nearest even exactly as torch rounds them."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    with np.errstate(over="ignore"):  # only NaNs can wrap, and they are replaced below
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> the float32 values they stand for (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_storage(values: np.ndarray) -> np.ndarray:
    """float32 values exactly representable in the cache's bfloat16, so every query path agrees bit for bit."""
    return from_bfloat16_bits(to_bfloat16_bits(values))


def encode_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, C) float features -> stored bfloat16 bits (uint16) and float32 squared norms of the stored values.

    Norms are taken after rounding so a region searched against its own image scores 1.
    """
    bits = to_bfloat16_bits(features)
    rounded = from_bfloat16_bits(bits)
    return bits, np.einsum("...c,...c->...", rounded, rounded, dtype=np.float32)


def quote_identifier(name: str) -> str:
    """A metadata column name (from a user's CSV, say) as a DuckDB identifier, whatever characters it holds."""
    return '"' + str(name).replace('"', '""') + '"'


@dataclass
class Manifest:
    """Everything a reader needs to interpret the arrays, and what a user needs to trust them."""

    model: str
    layer: str
    weights_source: str
    weights_sha256: str | None
    preprocessing: dict[str, Any]
    input_size: int
    grid: tuple[int, int, int]  # (H, W, C)
    image_count: int
    sources: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    builder_version: str = ""
    created: str = ""
    status: str = STATUS_BUILDING
    weights_arg: str | None = None  # the --weights value, so the dashboard can load the same model for uploads
    fingerprint: str = ""  # hash of everything that determines the arrays; tells resume from a different build
    batch_size: int = 0
    dtype: str = FEATURE_DTYPE
    format_version: int = FORMAT_VERSION
    frame: str = "crop"  # "crop": the model's square centre crop; "fit": whole frames, letterboxed
    input_shape: tuple[int, int] | None = None  # (height, width) of the model input; None = (input_size, input_size)
    framing: str = ""  # why this frame mode was chosen, for the user

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the cached images, as the model saw them."""
        return tuple(self.input_shape) if self.input_shape else (self.input_size, self.input_size)

    @property
    def label_column(self) -> str | None:
        """The metadata column naming an image's class, as its source declared it (None if none did)."""
        return next((s["label_column"] for s in self.sources if s.get("label_column")), None)

    def to_json(self) -> str:
        data = asdict(self)
        data["grid"] = list(self.grid)
        if self.input_shape is not None:
            data["input_shape"] = list(self.input_shape)
        return json.dumps(data, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("model", "layer", "grid", "image_count", "status") if f not in data]
        if missing:
            raise CacheError(f"manifest is missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["grid"] = tuple(int(v) for v in data["grid"])
        if data.get("input_shape"):
            kwargs["input_shape"] = tuple(int(v) for v in data["input_shape"])
        kwargs.setdefault("weights_source", "")
        kwargs.setdefault("weights_sha256", None)
        kwargs.setdefault("preprocessing", {})
        kwargs.setdefault("input_size", 0)
        kwargs.setdefault("sources", [])
        return cls(**kwargs)


def write_json_atomic(path: Path, text: str) -> None:
    """Write-then-rename so a reader (or a resumed build) never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(cache_dir: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(cache_dir) / MANIFEST_FILE, manifest.to_json())


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file (manifest, build state); ValueError saying why when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_manifest(cache_dir: Path) -> Manifest:
    """Parse the manifest without judging it; `check_manifest` decides whether it is usable."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CacheError(f"{cache_dir} is not a feature cache (no {MANIFEST_FILE})")
    try:
        return Manifest.from_dict(read_json_object(path))
    except ValueError as exc:
        raise CacheError(f"{path} is unreadable: {exc}") from None


def check_manifest(manifest: Manifest, cache_dir: Path) -> None:
    """Refuse caches the dashboard cannot interpret correctly."""
    if manifest.format_version != FORMAT_VERSION:
        raise CacheError(
            f"{cache_dir} has cache format version {manifest.format_version}; this version reads "
            f"{FORMAT_VERSION}. Rebuild it with `python -m cache_builder build ... --overwrite`."
        )
    if manifest.status != STATUS_COMPLETE:
        raise CacheError(
            f"{cache_dir} is not complete (status: {manifest.status}); rerun the same "
            "`python -m cache_builder build` command to finish it."
        )
    if manifest.dtype != FEATURE_DTYPE:
        raise CacheError(f"{cache_dir} stores {manifest.dtype} features; only {FEATURE_DTYPE} is supported")
    if manifest.frame not in FRAME_MODES:
        raise CacheError(f"{cache_dir} has an unknown frame mode {manifest.frame!r}; rebuild it")


def open_array(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of one cache array, refused unless it holds exactly what the manifest says."""
    if not path.is_file():
        raise CacheError(f"{path.parent}: {path.name} is missing; rebuild the cache")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise CacheError(f"{path} is unreadable or truncated ({exc}); rebuild the cache") from None
    if array.dtype != np.dtype(dtype) or array.shape != shape:
        raise CacheError(
            f"{path} holds {array.dtype} {array.shape} but the manifest says {np.dtype(dtype)} {shape}; "
            "the cache was modified or is incomplete, rebuild it"
        )
    return array


def open_frames(cache_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """(N, 4) pixel boxes of the picture in each image of a whole-frame cache; None for a cropped cache."""
    if manifest.frame == "crop":
        return None
    return open_array(Path(cache_dir) / FRAMES_FILE, np.int32, (manifest.image_count, 4))


def content_cells(boxes: np.ndarray, grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(N, 4) cell boxes (r0, c0, r1, c1), r1/c1 exclusive, of the cells whose centre lies on the picture.

    The rest of the grid is padding: the builder stores zero features there, and the search never matches it.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    (grid_h, grid_w), (height, width) = grid, image_size
    # cell c's centre (c + 0.5) * width / grid_w lies in [x0, x1) exactly when c in [ceil(x0 * W/w - 0.5), ...)
    cols = np.ceil(boxes[:, [0, 2]] * grid_w / width - 0.5)
    rows = np.ceil(boxes[:, [1, 3]] * grid_h / height - 0.5)
    cells = np.stack([rows[:, 0], cols[:, 0], rows[:, 1], cols[:, 1]], axis=1)
    return np.clip(cells, 0, [grid_h, grid_w, grid_h, grid_w]).astype(np.int64)


def content_mask(cells: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, H, W) True on the cells inside each (r0, c0, r1, c1) cell box of `content_cells`, False on padding."""
    cells = np.asarray(cells).reshape(-1, 4)
    rows, cols = np.arange(grid[0]), np.arange(grid[1])
    inside_rows = (rows >= cells[:, 0:1]) & (rows < cells[:, 2:3])
    inside_cols = (cols >= cells[:, 1:2]) & (cols < cells[:, 3:4])
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def open_arrays(cache_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(features bits, squared norms) of a checked manifest's cache, memory-mapped."""
    cache_dir = Path(cache_dir)
    n = manifest.image_count
    h, w, c = manifest.grid
    return (open_array(cache_dir / FEATURES_FILE, np.uint16, (n, h, w, c)),
            open_array(cache_dir / SQNORMS_FILE, np.float32, (n, h, w)))
