"""Open a cache once, check it against its manifest, and hand out zero-copy views of its arrays.

The feature array is memory-mapped: opening a 10 GB cache costs no RAM up front, pages are shared by every
session of the process (and by every process on the machine), and the OS evicts them under pressure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError, Manifest
from dashboard.metadata import MetadataStore


@dataclass
class FeatureCache:
    path: Path
    manifest: Manifest
    features_bits: np.ndarray  # (N, H, W, C) uint16 memmap: bfloat16 bit patterns
    sqnorms: np.ndarray  # (N, H, W) float32 memmap
    metadata: MetadataStore
    frames: np.ndarray | None = None  # (N, 4) pixel boxes of the picture (whole-frame caches), None when cropped
    _index: fmt.FirstStageIndex | fmt.IndexUnusable | None = field(default=None, repr=False)
    _index_stamp: int | None = field(default=None, repr=False)
    _scattered: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "FeatureCache":
        path = Path(path)
        manifest = fmt.read_manifest(path)
        fmt.check_manifest(manifest, path)
        n = manifest.image_count
        features, sqnorms = fmt.open_arrays(path, manifest)
        frames = fmt.open_frames(path, manifest)
        metadata = MetadataStore(path / fmt.METADATA_FILE)
        if not metadata.id_range_ok(n):
            metadata.close()
            raise CacheError(
                f"{path}: metadata.duckdb does not hold exactly one row per cached image (ids 0..{n - 1}); "
                "rebuild the cache"
            )
        return cls(path=path, manifest=manifest, features_bits=features, sqnorms=sqnorms, metadata=metadata,
                   frames=frames)

    @property
    def size(self) -> int:
        return self.manifest.image_count

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W): the feature grid a region is drawn and searched on."""
        return tuple(self.manifest.grid[:2])

    @property
    def channels(self) -> int:
        return self.manifest.grid[2]

    @property
    def label_column(self) -> str | None:
        """The manifest's class column, where the metadata has it."""
        column = self.manifest.label_column
        return column if column in self.metadata.column_types else None

    @property
    def input_size(self) -> int:
        return self.manifest.input_size

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the cached images: the display a region is drawn on."""
        return self.manifest.image_size

    def content_cells(self, ids: np.ndarray | None = None) -> np.ndarray | None:
        """(len(ids), 4) cell boxes (r0, c0, r1, c1) showing each image's picture, the rest being padding; None
        when no image has padding (a cropped cache)."""
        if self.frames is None:
            return None
        boxes = self.frames if ids is None else self.frames[np.asarray(ids, dtype=np.int64)]
        return fmt.content_cells(boxes, self.grid, self.image_size)

    def features(self) -> torch.Tensor:
        """(N, H, W, C) bfloat16 tensor sharing memory with the memmap (no copy); never write through it."""
        return tensor_view(self.features_bits).view(torch.bfloat16)

    def first_stage(self) -> fmt.FirstStageIndex:
        """The two-tier search's first-stage index, opened and checked once per version of its `index.json` (an
        index added or rebuilt while the app runs is found; an unusable one is not re-hashed at every rerun);
        IndexUnusable says why there is none."""
        stamp = _modified(self.path / fmt.INDEX_DIR / fmt.INDEX_FILE)
        if self._index is None or self._index_stamp != stamp:
            try:
                self._index = fmt.open_index(self.path, self.manifest)
            except fmt.IndexUnusable as exc:
                self._index = exc
            self._index_stamp = stamp
        if isinstance(self._index, fmt.IndexUnusable):
            raise fmt.IndexUnusable(self._index.problem, str(self._index))
        return self._index

    def scattered_features_bits(self) -> np.ndarray:
        """The features mapped a second time for reading scattered rows (a two-tier rerank): see
        `fmt.open_scattered`. Kept: a row reranked before is found mapped (a fresh mapping per rerank measured
        0.3-0.4 s slower at 20,000 rows, from re-mapping every page)."""
        if self._scattered is None:
            self._scattered = fmt.open_scattered(self.path / fmt.FEATURES_FILE, self.features_bits)
        return self._scattered

    def image_features(self, image_id: int) -> np.ndarray:
        """(H, W, C) float32 features of one cached image: a query that needs no model run."""
        return fmt.from_bfloat16_bits(self.features_bits[self.check_id(image_id)])

    def check_id(self, image_id: int) -> int:
        if not isinstance(image_id, (int, np.integer)) or not 0 <= int(image_id) < self.size:
            raise CacheError(f"image id {image_id!r} is not in this cache (0..{self.size - 1})")
        return int(image_id)

    def image_file(self, image_id: int) -> Path:
        """Only ids of this cache map to files, so no request can name a path of its own."""
        return self.path / fmt.image_relpath(self.check_id(image_id))

    def load_image(self, image_id: int) -> Image.Image:
        with Image.open(self.image_file(image_id)) as image:
            return image.convert("RGB")


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing memory with `array`, read-only memmaps included, made without a warning.

    `torch.from_numpy` warns on read-only arrays, and silencing it per call with `warnings.catch_warnings` is not
    thread-safe: that swaps the process-wide filter list, so two sessions interleaving leave an "ignore
    UserWarning" filter installed for good. DLPack carries the read-only flag and makes the same zero-copy view.
    """
    return torch.from_dlpack(array)
