"""Open a cache once, check it against its manifest, and hand out zero-copy views of its arrays.

The feature arrays are memory-mapped, shard by shard (`dashboard.shards`): opening a 10 GB cache costs no RAM up
front, pages are shared by every session of the process (and by every process on the machine), and the OS evicts
them under pressure. `cache.search` scores the shards: in this process, or on the Ray actors serving them
(`dashboard.distributed`); ids, metadata and images are always read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache_builder import cache_format as fmt
from cache_builder.cache_format import CacheError, Manifest
from dashboard.metadata import MetadataStore
from dashboard.shards import CacheShard, LocalShards, ShardSearch, describe, tensor_view

__all__ = ["FeatureCache", "tensor_view"]


@dataclass
class FeatureCache:
    path: Path
    manifest: Manifest
    shards: list[CacheShard]
    metadata: MetadataStore
    search: ShardSearch = field(default=None, repr=False)  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.search is None:
            self.search = LocalShards(self.shards)

    @classmethod
    def open(cls, path: str | Path, layer: str | None = None) -> "FeatureCache":
        """The cache at `path`, searched at `layer` (None: the first of its layers); CacheError says why not."""
        path = Path(path)
        manifest = fmt.read_manifest(path)
        fmt.check_manifest(manifest, path)
        manifest = manifest.at_layer(layer)
        n = manifest.image_count
        shards = [CacheShard.open(location, manifest) for location in fmt.shard_locations(path, manifest)]
        metadata = MetadataStore(path / fmt.METADATA_FILE)
        if not metadata.id_range_ok(n):
            metadata.close()
            raise CacheError(
                f"{path}: metadata.duckdb does not hold exactly one row per cached image (ids 0..{n - 1}); "
                "rebuild the cache"
            )
        return cls(path=path, manifest=manifest, shards=shards, metadata=metadata)

    def served_by(self, search: ShardSearch) -> "FeatureCache":
        """The same cache with its shards scored by `search` (e.g. Ray actors); metadata and files stay here."""
        return replace(self, search=search)

    @property
    def layer(self) -> str:
        """The layer this cache object searches."""
        return self.manifest.layer

    @property
    def layers(self) -> list[str]:
        """Every layer the cache holds (one, unless built with several `--layer`)."""
        return self.manifest.layer_names

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

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def feature_bytes(self) -> int:
        """What an exact scan reads: the features and their norms, over every shard."""
        return sum(shard.features_bits.nbytes + shard.sqnorms.nbytes for shard in self.shards)

    def shard_of(self, image_id: int) -> CacheShard:
        image_id = self.check_id(image_id)
        return self.shards[int(np.searchsorted(self.search.starts, image_id, side="right")) - 1]

    # A single-shard cache's arrays, as scripts and benchmarks read them directly.
    @property
    def features_bits(self) -> np.ndarray:
        return self._only_shard().features_bits

    @property
    def sqnorms(self) -> np.ndarray:
        return self._only_shard().sqnorms

    @property
    def frames(self) -> np.ndarray | None:
        return self._only_shard().frames

    def features(self) -> torch.Tensor:
        """(N, H, W, C) bfloat16 tensor of a single-shard cache, sharing memory with the memmap (no copy)."""
        return self._only_shard().features()

    def _only_shard(self) -> CacheShard:
        if self.sharded:
            raise CacheError(f"{self.path} is sharded ({len(self.shards)} shards): read each shard's arrays "
                             "(`cache.shards`), or search it through `cache.search`")
        return self.shards[0]

    def content_cells(self, ids: np.ndarray | None = None) -> np.ndarray | None:
        """(len(ids), 4) cell boxes (r0, c0, r1, c1) showing each image's picture, the rest being padding; None
        when no image has padding (a cropped cache)."""
        if self.manifest.frame == "crop":
            return None
        ids = np.arange(self.size) if ids is None else np.asarray(ids, dtype=np.int64)
        boxes = np.zeros((len(ids), 4), dtype=np.int32)
        shard_of = np.searchsorted(self.search.starts, ids, side="right") - 1
        for number in np.unique(shard_of):
            shard = self.shards[number]
            boxes[shard_of == number] = shard.frames[ids[shard_of == number] - shard.start]
        return fmt.content_cells(boxes, self.grid, self.image_size)

    def content_box(self, image_id: int) -> tuple[int, int, int, int] | None:
        """The (r0, c0, r1, c1) cells of one image that show its picture; None when every cell does."""
        cells = self.content_cells([self.check_id(image_id)])
        return None if cells is None else tuple(int(v) for v in cells[0])

    def first_stage(self) -> fmt.FirstStageIndex:
        """The two-tier search's first-stage index (of the first shard; every shard's index is checked, and
        IndexUnusable names the first shard without a usable one). Empty shards (every image of their range
        skipped by the build) have none and need none."""
        first = None
        for shard in self.indexed_shards():
            try:
                index = shard.first_stage()
            except fmt.IndexUnusable as exc:
                if not self.sharded:
                    raise
                raise fmt.IndexUnusable(exc.problem, f"{describe(shard.location)}: {exc}") from None
            first = first or index
        if first is None:
            raise fmt.IndexUnusable("missing", f"{self.path} holds no images to index")
        return first

    def indexed_shards(self) -> list[CacheShard]:
        """The shards that hold images, and so a first-stage index."""
        return [shard for shard in self.shards if shard.count]

    def index_bytes(self) -> int:
        return sum(shard.first_stage().nbytes for shard in self.indexed_shards())

    def image_features(self, image_id: int) -> np.ndarray:
        """(H, W, C) float32 features of one cached image: a query that needs no model run."""
        shard = self.shard_of(image_id)
        return fmt.from_bfloat16_bits(shard.features_bits[int(image_id) - shard.start])

    def check_id(self, image_id: int) -> int:
        if not isinstance(image_id, (int, np.integer)) or not 0 <= int(image_id) < self.size:
            raise CacheError(f"image id {image_id!r} is not in this cache (0..{self.size - 1})")
        return int(image_id)

    def image_file(self, image_id: int) -> Path:
        """Only ids of this cache map to files, so no request can name a path of its own."""
        shard = self.shard_of(image_id)
        return shard.location.folder / fmt.image_relpath(int(image_id) - shard.start)

    def load_image(self, image_id: int) -> Image.Image:
        with Image.open(self.image_file(image_id)) as image:
            return image.convert("RGB")
