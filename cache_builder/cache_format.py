"""The on-disk cache layout: what `cache_builder` writes and `dashboard` reads, owned by the writer.

A cache is a directory::

    manifest.json      format version, model, layer, preprocessing, grid, dtype, counts, timings, status
    features.npy       (N, H, W, C) uint16: the raw bits of bfloat16 features (numpy has no bfloat16)
    sqnorms.npy        (N, H, W) float32: squared L2 norm of each position of the *stored* (rounded) features
    frames.npy         (N, 4) int32, whole-frame ("fit") caches only: the pixel box (x0, y0, x1, y1) of each image
                       that shows the picture; the rest is padding, whose cells hold zero features
    images/            the images exactly as the model saw them (after resize/crop), ``images/000/0000042.jpg``
    metadata.duckdb    table ``images``: ``id`` = row in features.npy, ``path``, one typed column per metadata field
    index/             optional: the first stage of two-tier search (see INDEX_DIR below)

A sharded cache (written by the Ray builder, `cache_builder/ray_build.py`) keeps one manifest and one
metadata.duckdb at the top, and its arrays, images and index in shard folders listed by the manifest's
``shards`` (``[{"dir": "shards/00000", "count": 5000}, ...]``)::

    shards/00000/      features.npy, sqnorms.npy, frames.npy, images/, index/ of ids 0..4999, row i = id start + i
    shards/00001/      the next contiguous id range, and so on

A manifest without ``shards`` is one shard whose folder is the cache itself (every cache written before shards
existed, and every single-process build), so the format version did not change.

A multi-layer cache (``build --layer A --layer B``) lists every layer in the manifest's ``layers``
(``[{"name": "blocks.6", "grid": [7, 7, 320], "dir": ""}, {"name": "blocks.2", "grid": [28, 28, 40],
"dir": "layers/01"}]``). The first is the manifest's own ``layer`` and ``grid``, stored where a single-layer cache
stores them, so a reader that knows nothing of layers reads it; every other layer keeps its features.npy,
sqnorms.npy and index/ in its ``dir`` inside each shard folder. Images, frames and metadata are shared::

    layers/01/         features.npy, sqnorms.npy, index/ of the second layer (in each shard folder, if sharded)

Why bfloat16: on the target CPUs a bfloat16 GEMM runs 3-7x faster than float32 and float16 runs 10-30x slower
(see ``benchmarks/search.py``); bfloat16 also halves the bytes scanned per query.

Row *i* of every array is image ``id = i`` of the metadata table. ``status`` is ``complete`` only once every file
above has been written; readers must refuse anything else (``check_manifest``, ``open_arrays``).

Plain numpy on purpose: the dashboard, scripts and tests read caches without importing torch through here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
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
    """Display image of one row of a shard's arrays, sharded by thousands so no folder grows past 1,000 files."""
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
    shards: list[dict[str, Any]] = field(default_factory=list)  # [{"dir", "count"}]; [] = one shard, the cache
    layers: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "grid", "dir"}]; [] = just `layer`

    @property
    def layer_names(self) -> list[str]:
        """Every layer the cache holds, the one stored first (the manifest's own `layer`) first."""
        return [entry["name"] for entry in self.layers] or [self.layer]

    @property
    def layer_dir(self) -> str:
        """Where this manifest's `layer` keeps its arrays inside each shard folder ("" = the folder itself)."""
        return next((entry["dir"] for entry in self.layers if entry["name"] == self.layer), "")

    def at_layer(self, name: str | None) -> "Manifest":
        """This manifest as seen by a reader of layer `name` (its grid and arrays); None = the first layer."""
        if name is None or name == self.layer:
            return self
        for entry in self.layers:
            if entry["name"] == name:
                return replace(self, layer=name, grid=tuple(int(v) for v in entry["grid"]))
        raise CacheError(f"this cache holds no layer {name!r}; it holds {', '.join(self.layer_names)}")

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
    check_layers(manifest, cache_dir)


LAYERS_DIR = "layers"


def layer_dir_name(number: int) -> str:
    """The folder of a cache's layer `number` (0 is stored in the shard folder itself): numbered, so no layer
    name, however odd, becomes a path."""
    return "" if number == 0 else f"{LAYERS_DIR}/{number:02d}"


def check_layers(manifest: Manifest, cache_dir: Path) -> None:
    """A manifest's layer list must start with its own layer and name each folder as `layer_dir_name` does (a
    hostile `../../etc` is refused), with distinct names and a 3-number grid each."""
    if not manifest.layers:
        return
    names = []
    for number, entry in enumerate(manifest.layers):
        try:
            name, grid, folder = str(entry["name"]), [int(v) for v in entry["grid"]], entry["dir"]
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{cache_dir}: the manifest's layer {number} is malformed ({entry!r}); rebuild the "
                             "cache") from None
        if folder != layer_dir_name(number) or len(grid) != 3 or min(grid) <= 0 or name in names:
            raise CacheError(f"{cache_dir}: the manifest's layer {number} is {entry!r}, expected a new name, a "
                             f"grid of 3 positive numbers and dir {layer_dir_name(number)!r}; rebuild the cache")
        names.append(name)
    first = manifest.layers[0]
    if first["name"] != manifest.layer or tuple(int(v) for v in first["grid"]) != tuple(manifest.grid):
        raise CacheError(f"{cache_dir}: the manifest's first layer {first!r} is not its layer {manifest.layer!r} "
                         f"{tuple(manifest.grid)}; rebuild the cache")


SHARDS_DIR = "shards"


@dataclass(frozen=True)
class ShardLocation:
    """Where one shard's arrays live and which ids they hold: ids start .. start + count - 1, row i = start + i.
    `folder` holds the shard's images and frames, `arrays` the features, norms and index of the layer read."""

    number: int
    folder: Path
    start: int
    count: int
    layer_dir: str = ""

    @property
    def stop(self) -> int:
        return self.start + self.count

    @property
    def arrays(self) -> Path:
        return self.folder / self.layer_dir if self.layer_dir else self.folder


def shard_dir_name(number: int) -> str:
    return f"{SHARDS_DIR}/{number:05d}"


def cache_root(folder: Path) -> Path:
    """The cache a shard folder or a layer's arrays folder belongs to (a single-shard cache is its own)."""
    folder = Path(folder)
    if folder.parent.name == LAYERS_DIR:
        folder = folder.parent.parent
    return folder.parent.parent if folder.parent.name == SHARDS_DIR else folder


def shard_locations(cache_dir: Path, manifest: Manifest) -> list[ShardLocation]:
    """The cache's shards in id order (a single one, the cache folder itself, when the manifest lists none), with
    the arrays of the manifest's layer; CacheError for a list that does not tile the ids or names a folder outside
    the cache."""
    cache_dir = Path(cache_dir)
    layer_dir = manifest.layer_dir
    if not manifest.shards:
        return [ShardLocation(0, cache_dir, 0, manifest.image_count, layer_dir)]
    locations, start = [], 0
    for number, entry in enumerate(manifest.shards):
        try:
            name, count = str(entry["dir"]), int(entry["count"])
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{cache_dir}: the manifest's shard {number} is malformed ({entry!r}); rebuild the "
                             "cache") from None
        if name != shard_dir_name(number) or count < 0:
            raise CacheError(f"{cache_dir}: the manifest's shard {number} is {entry!r}, expected "
                             f"{{'dir': '{shard_dir_name(number)}', 'count': >= 0}}; rebuild the cache")
        locations.append(ShardLocation(number, cache_dir / name, start, count, layer_dir))
        start += count
    if start != manifest.image_count:
        raise CacheError(f"{cache_dir}: the shards hold {start:,} images but the manifest says "
                         f"{manifest.image_count:,}; rebuild the cache")
    return locations


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


def open_frames(cache_dir: Path, manifest: Manifest, count: int | None = None) -> np.ndarray | None:
    """(N, 4) pixel boxes of the picture in each image of a whole-frame cache (or of one shard of `count`
    images); None for a cropped cache."""
    if manifest.frame == "crop":
        return None
    n = manifest.image_count if count is None else count
    return open_array(Path(cache_dir) / FRAMES_FILE, np.int32, (n, 4))


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


def open_arrays(cache_dir: Path, manifest: Manifest, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features bits, squared norms) of a checked manifest's cache, or of the shard of `count` images in
    `cache_dir`, memory-mapped."""
    cache_dir = Path(cache_dir)
    n = manifest.image_count if count is None else count
    h, w, c = manifest.grid
    return (open_array(cache_dir / FEATURES_FILE, np.uint16, (n, h, w, c)),
            open_array(cache_dir / SQNORMS_FILE, np.float32, (n, h, w)))


def allocate_array(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    """A zero-filled .npy file whose disk space is reserved now, before rows are written through a memory map.

    Left sparse, the file takes its blocks as rows are written, and a memory-mapped write that finds the disk
    full kills the process with SIGBUS: no message, no cleanup. Reserved, a full disk is an OSError (ENOSPC)
    here, reported in one line by the CLI. (No reservation where the OS has no posix_fallocate, e.g. macOS.)
    """
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as fh:
            try:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(path)) from None


# The first stage of two-tier search (written by cache_builder/index.py, read by dashboard/two_tier.py):
#
#     index/index.json      version, dims, what it was built from (`features_signature`), energy kept, build time
#     index/basis.npy       (C, d) float32: the top-d principal directions of the cache's cells (uncentred)
#     index/quantiser.npy   (2, d) float32: per dimension, the step and the mean of the 4-bit quantiser
#     index/codes.npy       (N, H, W, d / 2) uint8: every cell's projection, 4 bits a value (`pack_codes`)
#
# Optional: a cache without it is searched exactly. It is built in index.partial/ and renamed into place whole.
INDEX_DIR = "index"
INDEX_PARTIAL_DIR = "index.partial"
INDEX_FILE = "index.json"
INDEX_BASIS_FILE = "basis.npy"
INDEX_CODES_FILE = "codes.npy"
INDEX_QUANTISER_FILE = "quantiser.npy"
INDEX_VERSION = 2  # 1: bfloat16 codes of 64 dimensions (issue 11's first index); 2: 4-bit codes
CODE_GROUP = 32  # values per 16 packed bytes; an index's dims are a multiple of it
_SIGNATURE_BLOCKS, _SIGNATURE_BLOCK_BYTES = 64, 64 * 1024


class IndexUnusable(CacheError):
    """A first-stage index that cannot be used: `problem` is "missing", "stale" or "damaged"."""

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class FirstStageIndex:
    """An opened, checked first-stage index."""

    dims: int
    basis: np.ndarray  # (C, d) float32
    steps: np.ndarray  # (d,) float32: a value is steps * (nibble - 7.5) + means
    means: np.ndarray  # (d,) float32
    codes: np.ndarray  # (N, H, W, d / 2) uint8 memmap (`pack_codes`)
    energy: float  # share of the cells' squared norm the basis keeps, on the cells it was fitted to
    built_s: float
    info: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.basis.nbytes)

    def values(self, rows: np.ndarray) -> np.ndarray:
        """(..., d) float32: the projected values that codes (..., d / 2) stand for (a reference and the fallback
        of machines without the native kernel; the kernel decodes in registers)."""
        return unpack_codes(rows) * self.steps + self.means


def pack_codes(levels: np.ndarray) -> np.ndarray:
    """(..., d) nibbles 0..15 -> (..., d / 2) bytes: each group of 32 values in 16 bytes, byte i holding value i in
    its low nibble and value 16 + i in its high one (the layout the kernel's decoders unpack with table lookups)."""
    *lead, d = levels.shape
    groups = np.asarray(levels, dtype=np.uint8).reshape(*lead, d // CODE_GROUP, 2, CODE_GROUP // 2)
    return (groups[..., 0, :] | (groups[..., 1, :] << 4)).reshape(*lead, d // 2)


def unpack_codes(codes: np.ndarray) -> np.ndarray:
    """`pack_codes` undone, as the levels nibble - 7.5 in float32."""
    *lead, half = codes.shape
    groups = np.asarray(codes).reshape(*lead, half // (CODE_GROUP // 2), 1, CODE_GROUP // 2)
    nibbles = np.concatenate([groups & 0x0F, groups >> 4], axis=-2).reshape(*lead, 2 * half)
    return nibbles.astype(np.float32) - np.float32(7.5)


def features_signature(cache_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """What an index was built from, cheap to recompute at every open: the build's fingerprint and time, the
    arrays' sizes, and a hash of their bytes (all of them up to 4 MiB, else 64 blocks of 64 KiB spread over the
    file), so features rewritten in place are told from the ones the index was built on."""
    cache_dir = Path(cache_dir)
    signature: dict[str, Any] = {"created": manifest.created, "fingerprint": manifest.fingerprint}
    for name in (FEATURES_FILE, SQNORMS_FILE):
        path = cache_dir / name
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            if size <= _SIGNATURE_BLOCKS * _SIGNATURE_BLOCK_BYTES:
                digest.update(fh.read())
            else:
                for k in range(_SIGNATURE_BLOCKS):
                    fh.seek((size - _SIGNATURE_BLOCK_BYTES) * k // (_SIGNATURE_BLOCKS - 1))
                    digest.update(fh.read(_SIGNATURE_BLOCK_BYTES))
        signature[name] = {"bytes": size, "sha256": digest.hexdigest()}
    return signature


def open_index(cache_dir: Path, manifest: Manifest, count: int | None = None) -> FirstStageIndex:
    """The first-stage index of a cache (or of the shard of `count` images in `cache_dir`), refused
    (IndexUnusable) when absent, built from other features, or damaged."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / INDEX_DIR
    if not (folder / INDEX_FILE).is_file():
        raise IndexUnusable("missing", f"{cache_dir} has no first-stage index; add one with "
                            f"`python -m cache_builder index {cache_root(cache_dir)}`")
    rebuild = f"rebuild it with `python -m cache_builder index {cache_root(cache_dir)}`"
    try:
        info = read_json_object(folder / INDEX_FILE)
        version, dims = int(info["version"]), int(info["dims"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexUnusable("damaged", f"{folder / INDEX_FILE} is unreadable ({exc}); {rebuild}") from None
    if version != INDEX_VERSION:
        raise IndexUnusable("stale", f"{folder} is index version {version}, this version reads {INDEX_VERSION}; "
                            f"{rebuild}")
    if info.get("signature") != features_signature(cache_dir, manifest):
        raise IndexUnusable("stale", f"{cache_dir}: the features changed since the index was built; {rebuild}")
    n = manifest.image_count if count is None else count
    h, w, c = manifest.grid
    try:
        if dims <= 0 or dims % CODE_GROUP:
            raise CacheError(f"{folder / INDEX_FILE}: dims {dims} is not a positive multiple of {CODE_GROUP}")
        basis = np.array(open_array(folder / INDEX_BASIS_FILE, np.float32, (c, dims)))
        steps, means = np.array(open_array(folder / INDEX_QUANTISER_FILE, np.float32, (2, dims)))
        codes = open_array(folder / INDEX_CODES_FILE, np.uint8, (n, h, w, dims // 2))
        if not (np.isfinite(basis).all() and np.isfinite(steps).all() and np.isfinite(means).all()):
            raise CacheError(f"{folder}: the basis or the quantiser holds values that are not finite")
    except CacheError as exc:
        raise IndexUnusable("damaged", f"{exc} (first-stage index: {rebuild})") from None
    return FirstStageIndex(dims=dims, basis=basis, steps=steps, means=means, codes=codes,
                           energy=float(info.get("energy", 0.0)), built_s=float(info.get("built_s", 0.0)), info=info)


_MADV_RANDOM, _MADV_WILLNEED, _MADV_DONTNEED = 1, 3, 4  # the same values on Linux, macOS and the BSDs


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def open_scattered(path: Path, like: np.ndarray) -> np.ndarray:
    """A second memory map of the array `like` was read from, for reading scattered rows: the OS is told the
    access is random, so a row touched before it was requested (`advise_will_need`) costs a read of its own
    pages, not of `read_ahead_kb` around them (8 MB on the project's VM). Shares the page cache with `like`."""
    array = open_array(path, like.dtype, like.shape)
    madvise = _madvise()
    if madvise is not None:
        start = array.ctypes.data - array.ctypes.data % mmap.PAGESIZE
        madvise(start, array.ctypes.data + array.nbytes - start, _MADV_RANDOM)
    return array


def advise_will_need(array: np.ndarray, ids: np.ndarray) -> None:
    """Ask the OS to start reading the rows `ids` (ascending) of a memory-mapped array now, all at once.

    Untouched, each row not in RAM is read when first touched, one at a time, and Linux reads `read_ahead_kb`
    around every such fault: 8 MB on the project's VM, so an exact rerank of 20,000 scattered rows of a cache on
    disk read ~160 GB instead of 620 MB. Advised, exactly those pages are read, with the requests in flight
    together. A no-op for arrays in RAM and where madvise is missing.
    """
    _advise_rows(array, ids, _MADV_WILLNEED)


FAULT_MAP_BYTES = 2 << 20  # the most a fault may map: a PMD-sized large folio (Linux's fault-around: 64 KiB)


def advise_done_with(array: np.ndarray, ids: np.ndarray) -> None:
    """Unmap the rows `ids` of a read-only memory map from this process: the OS keeps them in its page cache (a
    later touch, by any thread, maps them again: always safe on a read-only map), but they stop counting as this
    process's resident memory.

    Each row is unmapped with the FAULT_MAP_BYTES around it, aligned in the file: a fault maps more than the
    page it touched, the cached pages of the aligned 64 KiB around it (fault-around) and, on recent kernels (seen
    on 6.18), the whole large folio holding it, up to 2 MiB. On the 1M-image benchmark cache, unmapping only
    the rows' own pages left ~0.2 GiB mapped per 5,000-row rerank; once an exact scan had left the features in
    the page cache as large folios, such a rerank mapped ~3.3 GiB, and 64 KiB windows left ~16 MB of it mapped
    (0.23 GiB more over 15 reranks; nothing with these windows)."""
    _advise_rows(array, ids, _MADV_DONTNEED, FAULT_MAP_BYTES)


def _advise_rows(array: np.ndarray, ids: np.ndarray, advice: int, align: int | None = None) -> None:
    madvise = _madvise()
    ids = np.asarray(ids, dtype=np.int64)
    if madvise is None or not isinstance(array, np.memmap) or len(ids) == 0:
        return
    page = mmap.PAGESIZE
    row = array.strides[0]
    starts = array.ctypes.data + ids * row
    ends = starts + row
    if align:  # widened to whole windows aligned in the file (as its folios are), kept inside the array's pages
        to_file = int(getattr(array, "offset", 0)) - array.ctypes.data  # address + to_file: offset in the file
        first = array.ctypes.data - array.ctypes.data % page
        last = array.ctypes.data + array.nbytes
        starts = np.maximum(starts - (starts + to_file) % align, first)
        ends = np.minimum(ends + (-(ends + to_file)) % align, last)
    starts -= starts % page
    gaps = np.nonzero(starts[1:] > ends[:-1])[0]  # runs of rows that touch or overlap become one call
    for start, end in zip(starts[np.r_[0, gaps + 1]], ends[np.r_[gaps, len(ids) - 1]]):
        madvise(int(start), int(end - start), advice)
