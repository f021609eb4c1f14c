"""Exact masked sliding-window cosine search over a feature cache (Ulrich & Fong's semantics, CPU-fast).

For a query map Q (H x W x C) and soft mask M cropped to its bounding box (h x w), every window position
(y, x) of every image n scores

    score(n, y, x) = sum_ij M_ij^2 <Q_ij, F_n[y+i, x+j]> / (||M * Q|| * sqrt(sum_ij M_ij^2 ||F_n[y+i, x+j]||^2))

i.e. cos(M * Q, M * window). An image's score is its best window.

How it is fast: the reference slides a one-output-channel conv2d over the features (about 2 GFLOP/s on these
CPUs). Here one pass reads each image's features once, straight from the memory map, in native code
(`dashboard/search_kernel.c`): bfloat16 dot products accumulated in float32 (AVX512-BF16 where the CPU has it)
for exactly the (window, cell) pairs the windows use, and the denominators from the squared norms stored in
the cache. The search is then about as fast as the memory bus delivers the cache. Where no C compiler is
available, a torch path computes the same scores with bfloat16 GEMMs (about 3x slower, precision ~2^-8).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dashboard.feature_cache import tensor_view
from dashboard.search_kernel import KernelQuery, KernelUnavailable, check_ids, load_kernel

if TYPE_CHECKING:
    from dashboard.feature_cache import FeatureCache
    from dashboard.metadata import MetadataFilter

CHUNK_BYTES = 48 * 2**20  # bound on the temporary memory of one search, whatever the cache size
GATHER_CHUNK_BYTES = 8 * 2**20


class QueryError(ValueError):
    """A region or search option that cannot be searched; the message says what to change."""


# ---------------------------------------------------------------------------------------------- queries


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Display-resolution region -> (H, W) soft weights: the fraction of each feature cell the region covers.

    Accepts a boolean/float (S, S) mask or an RGBA canvas image (S, S, 4) whose painted pixels have alpha > 0.
    A mask already at grid resolution is returned as float weights.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 4:
        mask = mask[..., 3] > 0
    if mask.ndim != 2:
        raise QueryError(f"a mask must be 2-D (or an RGBA canvas image), got shape {mask.shape}")
    weights = np.clip(np.nan_to_num(mask.astype(np.float32)), 0.0, 1.0)
    if weights.shape == tuple(grid):
        return weights
    resized = Image.fromarray(weights, mode="F").resize((grid[1], grid[0]), resample=Image.Resampling.BOX)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def box_mask(size: int, box: Sequence[float]) -> np.ndarray:
    """(size, size) boolean mask of the pixel box [x0, x1) x [y0, y1), clipped to the image."""
    if len(box) != 4:
        raise QueryError("a box is X0,Y0,X1,Y1 in display pixels")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is empty: need X1 > X0 and Y1 > Y0")
    cols = np.arange(size) + 0.5
    inside_x = (cols >= x0) & (cols < x1)
    inside_y = (cols >= y0) & (cols < y1)
    if not inside_x.any() or not inside_y.any():
        raise QueryError(f"box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the {size}x{size} image")
    return inside_y[:, None] & inside_x[None, :]


def round_to_storage(features: np.ndarray) -> np.ndarray:
    """float32 values exactly representable in the cache's bfloat16, so every query path agrees bit for bit."""
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).bfloat16().float().numpy()


@dataclass(frozen=True)
class RegionQuery:
    """The query features and weights, cropped to the bounding box of the region on the feature grid."""

    features: np.ndarray  # (h, w, C) float32, bfloat16-exact
    weights: np.ndarray  # (h, w) float32 in [0, 1]
    top: int
    left: int
    grid: tuple[int, int]  # (H, W) of the full query map

    @classmethod
    def from_grid_mask(cls, features: np.ndarray, weights: np.ndarray) -> "RegionQuery":
        features = np.asarray(features)
        if features.ndim != 3:
            raise QueryError(f"query features must be (H, W, C), got shape {features.shape}")
        h, w = features.shape[:2]
        if weights.shape != (h, w):
            raise QueryError(f"mask grid {weights.shape} does not match the feature grid {(h, w)}")
        rows, cols = np.nonzero(weights > 0)
        if rows.size == 0:
            raise QueryError("the region is empty: draw over the image to select what to search for")
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        cropped = round_to_storage(features[top:bottom, left:right])
        box_weights = weights[top:bottom, left:right].astype(np.float32)
        if not np.any(np.abs(cropped * box_weights[..., None]) > 0):
            raise QueryError("the region's features are all zero at this layer, so no similarity is defined")
        return cls(features=cropped, weights=box_weights, top=int(top), left=int(left), grid=(h, w))

    @classmethod
    def from_mask(cls, features: np.ndarray, mask: np.ndarray) -> "RegionQuery":
        """`mask` at display resolution (or grid resolution); see `mask_to_grid`."""
        grid = tuple(np.asarray(features).shape[:2])
        return cls.from_grid_mask(features, mask_to_grid(mask, grid))

    @property
    def box(self) -> tuple[int, int]:
        return self.weights.shape

    @property
    def norm(self) -> float:
        return float(np.sqrt(np.sum((self.weights[..., None] * self.features).astype(np.float64) ** 2)))


# ---------------------------------------------------------------------------------------------- kernel


@dataclass
class WindowScores:
    """Best window of every searched image; `ids` ascending, `position` = y * (W - w + 1) + x."""

    ids: np.ndarray
    scores: np.ndarray
    position: np.ndarray
    windows_per_row: int


def _chunk_rows(n_positions: int, cells: int, channels: int, gathered: bool) -> int:
    per_image = n_positions * (max(cells, 1) * 6 + 4 * 3) + (n_positions * channels * 2 if gathered else 0)
    # gathered rows are consumed straight from the CPU cache when a chunk stays small
    budget = GATHER_CHUNK_BYTES if gathered else CHUNK_BYTES
    return max(1, budget // per_image)


BACKENDS = ("native", "portable", "torch")
_KERNEL_VARIANT = {"native": "best", "portable": "generic"}
_log = logging.getLogger(__name__)


def default_backend() -> str:
    """`$VFS_SEARCH_BACKEND` if set, else the native kernel where it builds, else torch."""
    chosen = os.environ.get("VFS_SEARCH_BACKEND", "").strip() or "native"
    if chosen not in BACKENDS:
        raise QueryError(f"VFS_SEARCH_BACKEND must be one of {', '.join(BACKENDS)} (got {chosen!r})")
    if chosen != "torch":
        try:
            load_kernel(_KERNEL_VARIANT[chosen])
        except KernelUnavailable as exc:
            _warn_fallback_once(str(exc))
            return "torch"
    return chosen


def _resolve_backend(backend: str | None) -> str:
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise QueryError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    return backend


@functools.cache
def _warn_fallback_once(reason: str) -> None:
    _log.warning("searching with the slower torch path: %s", reason)


def _check_query(query: RegionQuery, grid: tuple[int, int], channels: int) -> None:
    if tuple(grid) != tuple(query.grid):
        raise QueryError(f"the query grid {query.grid} differs from the cache's grid {tuple(grid)}")
    if query.features.shape[2] != channels:
        raise QueryError(f"the query has {query.features.shape[2]} channels, the cache {channels}")


def _kernel_query(query: RegionQuery) -> KernelQuery:
    return KernelQuery.build(query.features, query.weights, query.grid, query.norm)


def _native_scores(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids: np.ndarray | None,
                   backend: str, with_all: bool = False):
    """(prepared query, best scores, best windows, every window's score or None) from the compiled kernel."""
    _check_query(query, tuple(features.shape[1:3]), features.shape[3])
    prepared = _kernel_query(query)
    kernel = load_kernel(_KERNEL_VARIANT[backend])
    return (prepared, *kernel.score(prepared, features, np.asarray(sqnorms), ids, with_all=with_all))


class _TorchScorer:
    """The same scores from torch operations, for machines where the native kernel does not build.

    The numerator is one bfloat16 GEMM per chunk, ``<Q_k, F[p]>`` for every mask cell k and every position p,
    followed by K shifted float32 adds; the denominator uses the stored squared norms. bfloat16 GEMMs round
    each per-cell dot product to bfloat16, so these scores carry a relative error of about 2^-8.
    """

    def __init__(self, query: RegionQuery, grid: tuple[int, int], channels: int):
        _check_query(query, grid, channels)
        self.grid, self.channels = grid, channels
        h, w = query.box
        self.out_h, self.out_w = grid[0] - h + 1, grid[1] - w + 1
        weights_sq = query.weights.astype(np.float32) ** 2
        self.cells = [(i, j) for i in range(h) for j in range(w) if weights_sq[i, j] > 0]
        self.cell_weights = [float(weights_sq[i, j]) for i, j in self.cells]
        self.single_window = self.out_h == 1 and self.out_w == 1
        if self.single_window:  # the box is the whole grid: one window, a matrix-vector product per image
            placed = np.zeros((*grid, channels), dtype=np.float32)
            placed[:h, :w] = query.features * weights_sq[..., None]
            self.q_vector = torch.from_numpy(placed.reshape(-1)).bfloat16()
            self.weights_flat = torch.from_numpy(np.ascontiguousarray(np.pad(
                weights_sq, ((0, grid[0] - h), (0, grid[1] - w))).reshape(-1)))
        else:
            self.q_cells = torch.from_numpy(np.stack([query.features[i, j] for i, j in self.cells])).bfloat16()
        self.q_norm = query.norm

    def window_scores(self, block: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(n, out_h * out_w) cosine of every window of the images in `block` ((n, H, W, C) bf16)."""
        n = block.shape[0]
        if self.single_window:  # a matrix-vector product each: K strided adds would cost more than the product
            numerator = torch.mv(block.reshape(n, -1), self.q_vector).float().view(n, 1)
            denominator = torch.mv(norms.reshape(n, -1), self.weights_flat).view(n, 1)
        else:
            grid_h, grid_w = self.grid
            out_h, out_w = self.out_h, self.out_w
            per_cell = torch.mm(self.q_cells, block.reshape(n * grid_h * grid_w, self.channels).T)
            per_cell = per_cell.float().view(len(self.cells), n, grid_h, grid_w)
            numerator = torch.zeros(n, out_h, out_w)
            denominator = torch.zeros(n, out_h, out_w)
            for k, (i, j) in enumerate(self.cells):
                numerator.add_(per_cell[k, :, i:i + out_h, j:j + out_w], alpha=self.cell_weights[k])
                denominator.add_(norms[:, i:i + out_h, j:j + out_w], alpha=self.cell_weights[k])
        # In place, few passes. A window whose features are all zero has numerator 0 and denominator 0: the
        # resulting NaN becomes score 0 (no direction, no similarity).
        scores = numerator.mul_(denominator.rsqrt_()).view(n, -1).nan_to_num_(nan=0.0)
        return scores.div_(self.q_norm).clamp_(-1.0, 1.0)


def score_windows(
    features: torch.Tensor,
    sqnorms: np.ndarray,
    query: RegionQuery,
    ids: np.ndarray | None = None,
    backend: str | None = None,
) -> WindowScores:
    """Score every window of the images `ids` (all when None) against `query`; keep each image's best.

    `features` is the (N, H, W, C) bfloat16 cache (usually a memmap view) and `sqnorms` its (N, H, W) float32
    squared norms. Only the requested rows are read, so a 10% candidate set costs ~10%. Extra memory: about 30
    bytes per searched image for ids and results, plus, on the torch fallback only, chunks of ~CHUNK_BYTES;
    never a copy of the cache, so a memory-mapped cache larger than RAM is searched as it is paged in.
    `backend`: one of BACKENDS, default `default_backend()`.
    """
    n_total = features.shape[0]
    backend = _resolve_backend(backend)
    full_range = ids is None
    ids = np.arange(n_total, dtype=np.int64) if full_range else np.asarray(ids, dtype=np.int64)
    if backend != "torch":
        prepared, scores, positions, _ = _native_scores(features, sqnorms, query, None if full_range else ids,
                                                        backend)
        return WindowScores(ids, scores, positions.astype(np.int64), prepared.out_w)
    return _torch_score_windows(features, sqnorms, query, ids, full_range)


def _torch_score_windows(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids: np.ndarray,
                         full_range: bool) -> WindowScores:
    n_total, grid_h, grid_w, channels = features.shape
    prepared = _TorchScorer(query, (grid_h, grid_w), channels)
    scores = np.empty(len(ids), dtype=np.float32)
    positions = np.empty(len(ids), dtype=np.int64)
    if len(ids) == 0:
        return WindowScores(ids, scores, positions, prepared.out_w)
    check_ids(ids, n_total)  # numpy would wrap negative ids around silently
    contiguous = full_range or (ids[-1] - ids[0] + 1 == len(ids))
    cells = 1 if prepared.single_window else len(prepared.cells)
    rows = _chunk_rows(grid_h * grid_w, cells, channels, not contiguous)
    if prepared.single_window and contiguous:
        rows = len(ids)  # views of the memmap and an n-vector out: no temporary grows with the chunk
    for start, block, norms in _chunks(features, sqnorms, ids, rows, contiguous):
        best_score, best_position = prepared.window_scores(block, norms).max(dim=1)  # ties: top-left window
        scores[start:start + len(block)] = best_score.numpy()
        positions[start:start + len(block)] = best_position.numpy()
    return WindowScores(ids, scores, positions, prepared.out_w)


def _chunks(features: torch.Tensor, sqnorms: np.ndarray, ids: np.ndarray, rows: int, contiguous: bool):
    """(start, features, norms) per chunk: views for a contiguous id range, else gathered copies."""
    bits = None if contiguous else features.view(torch.int16).numpy()
    for start in range(0, len(ids), rows):
        if contiguous:
            lo = int(ids[start])
            hi = lo + min(rows, len(ids) - start)
            yield start, features[lo:hi], tensor_view(sqnorms[lo:hi])
        else:
            chunk = ids[start:start + rows]  # numpy's row gather is ~2x faster than torch's index_select here
            yield start, torch.from_numpy(bits[chunk]).view(torch.bfloat16), torch.from_numpy(sqnorms[chunk])


def window_score_map(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, image_id: int,
                     backend: str | None = None) -> np.ndarray:
    """(out_h, out_w) score of every window of one image: the heat map behind a hit."""
    backend = _resolve_backend(backend)
    if backend != "torch":
        prepared, _, _, every = _native_scores(features, sqnorms, query, np.array([image_id]), backend, True)
        return every.reshape(prepared.out_h, prepared.out_w)
    prepared = _TorchScorer(query, tuple(features.shape[1:3]), features.shape[3])
    norms = tensor_view(sqnorms[image_id:image_id + 1])
    scores = prepared.window_scores(features[image_id:image_id + 1], norms)
    return scores.view(prepared.out_h, prepared.out_w).numpy().copy()


def rank(scores: np.ndarray, ids: np.ndarray, k: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Indices into `scores` of the top k: score descending, ties by ascending id.

    `groups` (integer codes aligned with `scores`) keeps only the best image of each group.
    """
    if k <= 0:
        raise QueryError(f"k must be at least 1 (got {k})")
    if groups is None and k < len(scores):
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        pool = np.nonzero(scores >= threshold)[0]
    else:
        pool = np.arange(len(scores))
    order = pool[np.lexsort((ids[pool], -scores[pool]))]
    if groups is not None:
        _, first = np.unique(np.asarray(groups)[order], return_index=True)
        order = order[np.sort(first)]
    return order[:k]


# ---------------------------------------------------------------------------------------------- searches

HIT_COLUMNS = ["rank", "id", "path", "score", "row", "col", "height", "width", "x0", "y0", "x1", "y1"]


@dataclass
class SearchResult:
    """`hits`: the ranked top-k with windows and metadata (the CSV export). `scores`: every searched image."""

    hits: pd.DataFrame
    scores: pd.DataFrame  # columns id, score
    query: RegionQuery

    @property
    def searched_count(self) -> int:
        return len(self.scores)


def query_from_mask(features: np.ndarray, mask: np.ndarray, display_size: int) -> RegionQuery:
    """A region drawn on the displayed image (display_size x display_size) or given on the feature grid."""
    grid = tuple(np.asarray(features).shape[:2])
    shape = tuple(np.asarray(mask).shape[:2])
    if shape not in ((display_size, display_size), grid):
        raise QueryError(
            f"the mask is {shape[1]}x{shape[0]} but the image is shown at {display_size}x{display_size} "
            f"(feature grid {grid[1]}x{grid[0]})"
        )
    return RegionQuery.from_mask(features, mask)


def search_cache(
    cache: "FeatureCache",
    query: RegionQuery,
    k: int = 20,
    flt: "MetadataFilter | None" = None,
    exclude_id: int | None = None,
    per_group: str | None = None,
) -> SearchResult:
    """Top-k images of `cache` for `query`, restricted to the rows passing `flt`.

    k larger than the candidate set returns every candidate; an empty candidate set returns no hits.
    """
    if k <= 0:
        raise QueryError(f"k must be at least 1 (got {k})")
    store = cache.metadata
    candidates = None if flt is None or flt.is_empty() else store.filter_ids(flt)
    if exclude_id is not None:
        base = np.arange(cache.size) if candidates is None else candidates
        candidates = base[base != int(exclude_id)]
    found = score_windows(cache.features(), cache.sqnorms, query, candidates)
    groups = None
    if per_group is not None:
        labels = store.rows(found.ids, [per_group])[per_group]
        groups = pd.factorize(labels.astype("string").fillna("\0<null>"), use_na_sentinel=False)[0]
    order = rank(found.scores, found.ids, k, groups) if len(found.ids) else np.array([], dtype=np.int64)
    hits = _hit_table(cache, found, order, query)
    return SearchResult(hits=hits, scores=pd.DataFrame({"id": found.ids, "score": found.scores}), query=query)


def _hit_table(cache: "FeatureCache", found: WindowScores, order: np.ndarray, query: RegionQuery) -> pd.DataFrame:
    grid_h, grid_w = query.grid
    h, w = query.box
    cell_y, cell_x = cache.input_size / grid_h, cache.input_size / grid_w
    ids = found.ids[order]
    row, col = np.divmod(found.position[order], found.windows_per_row)
    windows = pd.DataFrame({
        "rank": np.arange(1, len(order) + 1),
        "id": ids,
        "score": found.scores[order].astype(np.float64).round(6),
        "row": row, "col": col, "height": h, "width": w,
        "x0": np.round(col * cell_x).astype(int), "y0": np.round(row * cell_y).astype(int),
        "x1": np.round((col + w) * cell_x).astype(int), "y1": np.round((row + h) * cell_y).astype(int),
    })
    metadata = cache.metadata.rows(ids).drop(columns=["id"])
    table = pd.concat([windows.reset_index(drop=True), metadata.reset_index(drop=True)], axis=1)
    return table[HIT_COLUMNS + [c for c in metadata.columns if c not in HIT_COLUMNS]]
