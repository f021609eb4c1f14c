"""Exact masked sliding-window cosine search over a feature cache (Ulrich & Fong's semantics, CPU-fast).

For a query map Q (H x W x C) and soft mask M cropped to its bounding box (h x w), every window position
(y, x) of every image n scores

    score(n, y, x) = sum_ij M_ij^2 <Q_ij, F_n[y+i, x+j]> / (||M * Q|| * sqrt(sum_ij M_ij^2 ||F_n[y+i, x+j]||^2))

i.e. cos(M * Q, M * window). An image's score is its best window.

How it is fast: the reference slides a one-output-channel conv2d over the features (about 2 GFLOP/s on these
CPUs). Here the numerator is one bfloat16 GEMM per chunk, ``<Q_k, F[p]>`` for every mask cell k and every
position p, followed by K shifted float32 adds of small (n, H, W) planes; the denominator uses the squared
norms stored in the cache, so the features are read exactly once per query. When the mask's box covers the
whole grid there is a single window and the GEMM degenerates to a matrix-vector product over whole images.
bfloat16 GEMMs accumulate in float32 and round each per-cell dot product to bfloat16, so scores carry a
relative error of about 2^-8; that is the precision the tests hold the engine to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

if TYPE_CHECKING:
    from dashboard.feature_cache import FeatureCache
    from dashboard.metadata import MetadataFilter

CHUNK_BYTES = 48 * 2**20  # bound on the temporary memory of one search, whatever the cache size


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
    return max(1, CHUNK_BYTES // per_image)


def score_windows(
    features: torch.Tensor,
    sqnorms: np.ndarray,
    query: RegionQuery,
    ids: np.ndarray | None = None,
) -> WindowScores:
    """Score every window of the images `ids` (all when None) against `query`.

    `features` is the (N, H, W, C) bfloat16 cache (usually a memmap view) and `sqnorms` its (N, H, W) float32
    squared norms. Work is chunked: extra memory stays below ~CHUNK_BYTES plus O(len(ids)) for the results,
    however large the cache, and only the requested rows are read, so a 10% candidate set costs ~10%.
    """
    n_total, grid_h, grid_w, channels = features.shape
    if (grid_h, grid_w) != query.grid:
        raise QueryError(f"the query grid {query.grid} differs from the cache's grid {(grid_h, grid_w)}")
    if query.features.shape[2] != channels:
        raise QueryError(f"the query has {query.features.shape[2]} channels, the cache {channels}")
    h, w = query.box
    out_h, out_w = grid_h - h + 1, grid_w - w + 1
    full_range = ids is None
    ids = np.arange(n_total, dtype=np.int64) if full_range else np.asarray(ids, dtype=np.int64)
    scores = np.empty(len(ids), dtype=np.float32)
    positions = np.empty(len(ids), dtype=np.int64)
    if len(ids) == 0:
        return WindowScores(ids, scores, positions, out_w)

    weights_sq = query.weights.astype(np.float32) ** 2
    cells = [(i, j) for i in range(h) for j in range(w) if weights_sq[i, j] > 0]
    single_window = out_h == 1 and out_w == 1
    if single_window:
        placed = np.zeros((grid_h, grid_w, channels), dtype=np.float32)
        placed[:h, :w] = query.features * weights_sq[..., None]
        q_vector = torch.from_numpy(placed.reshape(-1)).bfloat16()
    else:
        q_cells = torch.from_numpy(np.stack([query.features[i, j] for i, j in cells])).bfloat16()
    cell_weights = [float(weights_sq[i, j]) for i, j in cells]
    q_norm = query.norm
    contiguous = full_range or (ids[-1] - ids[0] + 1 == len(ids))

    rows = _chunk_rows(grid_h * grid_w, 1 if single_window else len(cells), channels, not contiguous)
    for start in range(0, len(ids), rows):
        chunk_ids = ids[start:start + rows]
        if contiguous:
            lo, hi = int(chunk_ids[0]), int(chunk_ids[-1]) + 1
            block = features[lo:hi]
            norms = torch.from_numpy(np.asarray(sqnorms[lo:hi]))
        else:
            index = torch.from_numpy(chunk_ids)
            block = features.index_select(0, index)
            norms = torch.from_numpy(np.asarray(sqnorms[chunk_ids]))
        n = len(chunk_ids)
        if single_window:
            numerator = torch.mv(block.reshape(n, -1), q_vector).float().view(n, 1, 1)
        else:
            per_cell = torch.mm(q_cells, block.reshape(n * grid_h * grid_w, channels).T)
            per_cell = per_cell.float().view(len(cells), n, grid_h, grid_w)
            numerator = torch.zeros(n, out_h, out_w)
            for k, (i, j) in enumerate(cells):
                numerator.add_(per_cell[k, :, i:i + out_h, j:j + out_w], alpha=cell_weights[k])
        denominator = torch.zeros(n, out_h, out_w)
        for (i, j), weight in zip(cells, cell_weights):
            denominator.add_(norms[:, i:i + out_h, j:j + out_w], alpha=weight)
        # In place, few passes. A window whose features are all zero has numerator 0 and denominator 0: the
        # resulting NaN becomes score 0 (no direction, no similarity).
        window_scores = numerator.mul_(denominator.rsqrt_()).view(n, -1).nan_to_num_(nan=0.0)
        best_score, best_position = window_scores.max(dim=1)  # first maximum: ties go to the top-left window
        scores[start:start + n] = best_score.div_(q_norm).clamp_(-1.0, 1.0).numpy()
        positions[start:start + n] = best_position.numpy()
    return WindowScores(ids, scores, positions, out_w)


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
