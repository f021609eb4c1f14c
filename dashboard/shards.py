"""A cache's shards, and the one interface a search scores them through, in this process or on a Ray cluster.

A shard is a contiguous range of ids with its own arrays and first-stage index (`cache_builder.cache_format`,
`shard_locations`); a cache written by the single-process builder is one shard. `CacheShard` scores its own rows
(local ids, 0 .. count - 1): exactly, by the first stage, as a rerank, or as heat maps. A `ShardSearch` answers the
same four calls for the whole cache in global ids: it splits the ids by shard, asks every shard concerned, and
merges the answers in id order. `LocalShards` asks the shards in this process; `dashboard.distributed.RayShards`
asks the Ray actors serving them. Everything around the scoring (filters, groups, the shortlist, ranking,
metadata) stays with the caller, so a search gives the same answer wherever its shards are served.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache_builder import cache_format as fmt
from cache_builder.cache_format import Manifest
from dashboard import row_reads, scoring, settings
from dashboard.region_query import RegionQuery
from dashboard.scoring.base import tensor_view
from dashboard.scoring.native import NativeScorer

_log = logging.getLogger(__name__)


@dataclass
class CacheShard:
    """One shard's memory-mapped arrays and index; every method takes and returns the shard's local ids."""

    location: fmt.ShardLocation
    manifest: Manifest
    features_bits: np.ndarray  # (n, H, W, C) uint16 memmap: bfloat16 bit patterns
    sqnorms: np.ndarray  # (n, H, W) float32 memmap
    frames: np.ndarray | None = None  # (n, 4) pixel boxes of the picture (whole-frame caches)
    _index: fmt.FirstStageIndex | fmt.IndexUnusable | None = field(default=None, repr=False)
    _index_stamp: int | None = field(default=None, repr=False)
    _scattered: np.ndarray | None = field(default=None, repr=False)
    _read_aheads: row_reads.ReadAheads | None = field(default=None, repr=False)

    @classmethod
    def open(cls, location: fmt.ShardLocation, manifest: Manifest) -> "CacheShard":
        """Refused (CacheError naming the shard) when an array is missing or does not match the manifest."""
        try:
            features, sqnorms = fmt.open_arrays(location.arrays, manifest, location.count)
            frames = fmt.open_frames(location.folder, manifest, location.count)
        except fmt.CacheError as exc:
            raise fmt.CacheError(f"{describe(location)}: {exc}") from None
        return cls(location, manifest, features, sqnorms, frames)

    @property
    def start(self) -> int:
        return self.location.start

    @property
    def count(self) -> int:
        return self.location.count

    def features(self) -> torch.Tensor:
        """(n, H, W, C) bfloat16 tensor sharing memory with the memmap (no copy); never write through it."""
        return tensor_view(self.features_bits).view(torch.bfloat16)

    def content_cells(self, ids: np.ndarray | None = None) -> np.ndarray | None:
        if self.frames is None:
            return None
        boxes = self.frames if ids is None else self.frames[np.asarray(ids, dtype=np.int64)]
        return fmt.content_cells(boxes, self.manifest.grid[:2], self.manifest.image_size)

    def first_stage(self) -> fmt.FirstStageIndex:
        """The shard's first-stage index, opened and checked once per version of its `index.json` (an index added
        or rebuilt while the app runs is found; an unusable one is not re-hashed at every rerun); IndexUnusable
        says why there is none."""
        folder = self.location.arrays
        stamp = _modified(folder / fmt.INDEX_DIR / fmt.INDEX_FILE)
        if self._index is None or self._index_stamp != stamp:
            try:
                self._index = fmt.open_index(folder, self.manifest, self.count)
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
            self._scattered = fmt.open_scattered(self.location.arrays / fmt.FEATURES_FILE, self.features_bits)
        return self._scattered

    # ------------------------------------------------------------------------------------- the four calls
    def exact(self, query: RegionQuery, ids: np.ndarray | None, backend: str | None) -> scoring.WindowScores:
        """Every searched row's best window, exactly (`ids` None: all rows)."""
        return scoring.score_windows(self.features(), self.sqnorms, query, ids, backend=backend,
                                     content=self.content_cells(ids))

    def first_stage_scores(self, query: RegionQuery, ids: np.ndarray | None,
                           backend: str | None) -> scoring.WindowScores:
        """Every searched row's best window by the first stage (approximate scores, projected numerators). Over
        many rows, scored in parts, and the likely shortlist's rows read ahead for the rerank (`row_reads`). The
        parts are all queued on the kernel's pool at once: the cores score the next part while this thread picks
        the likely rows of the last one (on the 1M benchmark cache 0.73-0.94x the time of waiting for each part,
        `benchmarks/first_stage_parts.py`)."""
        index = self.first_stage()
        searched = self.count if ids is None else len(ids)
        reader = self._reader_for(query, searched, backend)
        if reader is None:
            return scoring.score_codes(index, self.sqnorms, query, ids, backend=backend)
        all_ids = np.arange(self.count, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        scores, positions = np.empty(searched, np.float32), np.empty(searched, np.int64)
        likely = row_reads.LikelyRows(searched)
        parts = row_reads.parts(searched)
        for part, found in zip(parts, scoring.score_codes_in_parts(index, self.sqnorms, query,
                                                                   [all_ids[p] for p in parts], backend)):
            scores[part], positions[part] = found.scores, found.position
            reader.request(likely.add(found.ids, found.scores))
        return scoring.WindowScores(all_ids, scores, positions, found.windows_per_row)

    def _reader_for(self, query: RegionQuery, searched: int, backend: str | None) -> row_reads.RowReads | None:
        """A reader for this first stage's likely rows, where reading ahead pays and the rerank can use it."""
        if (searched < row_reads.MIN_SEARCHED or not settings.current().direct_reads or self.frames is not None
                or not isinstance(self.features_bits, np.memmap)
                or not isinstance(scoring.get_scorer(backend), NativeScorer)):
            return None
        if self._read_aheads is None:
            self._read_aheads = row_reads.ReadAheads(self.features_bits)
        return self._read_aheads.begin(row_reads.query_key(query), searched)

    def rerank(self, query: RegionQuery, ids: np.ndarray, backend: str | None) -> scoring.WindowScores:
        """Exact scores and windows of shortlisted rows, scattered over features that may be on disk: a thread
        asks the OS for all of them at once (`advise_will_need`) while the kernel scores the first ones, through
        a mapping marked random-access (`open_scattered`), so a row the kernel reaches before it was requested
        reads only its own pages. On the 1M-image benchmark cache, 20,000 candidates took 0.4-0.7 s this way
        against 13-17 s through the plain mapping. Afterwards the rows are unmapped from the process (the page
        cache keeps them), so its resident memory is the index plus one rerank, not every row ever reranked; that
        runs after the answer is returned, on `_UNMAPPER` (54-64 ms for 5,000 rows on the benchmark VM), and
        a row it unmaps while another search reads it is simply mapped again (a read-only map). Until then the
        rerank's rows count as resident, and more than their own bytes (`fmt.advise_done_with`).

        Where this query's first stage read its likely rows ahead (`row_reads`), the rest are read the same way
        and the rows scored where they lie in the reader's buffer, none of this mapping."""
        found = self._rerank_read_ahead(query, ids, backend)
        if found is not None:
            return found
        bits = self.scattered_features_bits()
        reader = threading.Thread(target=_will_need, args=(bits, self.sqnorms, ids), daemon=True)
        reader.start()
        try:
            return scoring.score_windows(tensor_view(bits).view(torch.bfloat16), self.sqnorms, query, ids,
                                         backend=backend, content=self.content_cells(ids))
        finally:
            reader.join()
            _UNMAPPER.submit(fmt.advise_done_with, bits, np.array(ids))  # a copy: the caller keeps its own

    def _rerank_read_ahead(self, query: RegionQuery, ids: np.ndarray,
                           backend: str | None) -> scoring.WindowScores | None:
        """The rerank from the rows this query's first stage read ahead; None (read them through the map) where
        it did not, the shortlist outgrows the reader, or a direct read failed (logged)."""
        reader = None if self._read_aheads is None else self._read_aheads.take(row_reads.query_key(query))
        if reader is None:
            return None
        try:
            ids = np.asarray(ids, dtype=np.int64)
            if not reader.request(ids):
                return None
            reader.finish()
            return scoring.score_placed(reader.base, reader.placed(ids), reader.extent, self.sqnorms, query, ids,
                                        self.manifest.grid, backend)
        except OSError as exc:
            _log.warning("%s: a direct read failed (%s); this rerank reads through the memory map",
                         describe(self.location), exc)
            return None
        finally:
            self._read_aheads.give_back(reader)

    def window_maps(self, query: RegionQuery, ids: np.ndarray, backend: str | None) -> np.ndarray:
        """(len(ids), out_h, out_w) every window's score: the heat maps behind hits."""
        return scoring.window_score_maps(self.features(), self.sqnorms, query, ids, backend=backend)

    def call(self, operation: str, query: RegionQuery, ids: np.ndarray | None, backend: str | None):
        """One of the four calls by name: how a Ray actor serving this shard is asked."""
        methods = {"exact": self.exact, "first_stage": self.first_stage_scores, "rerank": self.rerank,
                   "window_maps": self.window_maps}
        if operation not in methods:
            raise ValueError(f"unknown shard operation {operation!r}")
        return methods[operation](query, ids, backend)


def describe(location: fmt.ShardLocation) -> str:
    """How messages name a shard: its number, folder and ids."""
    return f"shard {location.number} ({location.folder}, ids {location.start:,}..{location.stop - 1:,})"


_UNMAPPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vfs-unmap")  # one at a time, in order


def finish_unmapping() -> None:
    """Return once the rows of every rerank so far are unmapped (what a process holds between searches)."""
    _UNMAPPER.submit(lambda: None).result()


def _will_need(bits: np.ndarray, sqnorms: np.ndarray, ids: np.ndarray) -> None:
    fmt.advise_will_need(sqnorms, ids)
    fmt.advise_will_need(bits, ids)


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- the whole cache
class ShardSearch(ABC):
    """The four shard calls over a whole cache, in global ids (ascending where the caller passes them so)."""

    def __init__(self, locations: list[fmt.ShardLocation]) -> None:
        self.locations = locations
        self.starts = np.array([location.start for location in locations], dtype=np.int64)
        self.total = locations[-1].stop if locations else 0

    @abstractmethod
    def ask(self, operation: str, query: RegionQuery, parts: dict[int, np.ndarray | None],
            backend: str | None) -> dict[int, object]:
        """Each shard's answer to `operation` on its local ids (`parts`: shard number -> ids, None = all)."""

    @abstractmethod
    def placement(self) -> list[str]:
        """Where each shard is served, one line per shard, for the Caches page."""

    def close(self) -> None:
        """Let go of what serves the shards (nothing, in this process)."""

    def exact(self, query: RegionQuery, ids: np.ndarray | None, backend: str | None) -> scoring.WindowScores:
        return self._scores("exact", query, ids, backend)

    def first_stage(self, query: RegionQuery, ids: np.ndarray | None, backend: str | None) -> scoring.WindowScores:
        return self._scores("first_stage", query, ids, backend)

    def rerank(self, query: RegionQuery, ids: np.ndarray, backend: str | None) -> scoring.WindowScores:
        return self._scores("rerank", query, np.asarray(ids, dtype=np.int64), backend)

    def window_maps(self, query: RegionQuery, ids, backend: str | None) -> np.ndarray:
        """Heat maps of `ids` in the order given (hits come best first, not by id)."""
        ids = np.asarray(ids, dtype=np.int64)
        self._check(ids)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        parts = {int(s): ids[shard_of == s] - self.starts[s] for s in np.unique(shard_of)}
        answers = self.ask("window_maps", query, parts, backend)
        out_h, out_w = query.windows(query.grid)
        maps = np.zeros((len(ids), out_h, out_w), dtype=np.float32)
        for shard, part in answers.items():
            maps[shard_of == shard] = part
        return maps

    def _scores(self, operation: str, query: RegionQuery, ids: np.ndarray | None,
                backend: str | None) -> scoring.WindowScores:
        if ids is None:
            parts = {location.number: None for location in self.locations if location.count}
        else:
            self._check(ids)
            bounds = np.searchsorted(ids, [location.start for location in self.locations] + [self.total])
            parts = {location.number: ids[bounds[k]:bounds[k + 1]] - location.start
                     for k, location in enumerate(self.locations) if bounds[k + 1] > bounds[k]}
        answers = self.ask(operation, query, parts, backend)
        if not answers:
            return scoring.WindowScores(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64),
                                        query.windows(query.grid)[1])
        ordered = [answers[number] for number in sorted(answers)]
        return scoring.WindowScores(
            np.concatenate([part.ids + self.starts[number] for number, part in zip(sorted(answers), ordered)]),
            np.concatenate([part.scores for part in ordered]),
            np.concatenate([part.position for part in ordered]),
            ordered[0].windows_per_row)

    def _check(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.total):
            raise IndexError(f"image ids must lie in 0..{self.total - 1}")


class LocalShards(ShardSearch):
    """Every shard opened in this process, asked one after the other (each call already uses every core)."""

    def __init__(self, shards: list[CacheShard]) -> None:
        super().__init__([shard.location for shard in shards])
        self.shards = shards

    def ask(self, operation, query, parts, backend):
        return {number: self.shards[number].call(operation, query, ids, backend) for number, ids in parts.items()}

    def placement(self) -> list[str]:
        return [f"{describe(shard.location)}: this process" for shard in self.shards]
