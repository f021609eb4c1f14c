"""The same scores from torch operations, for machines where the native kernel does not build.

The numerator is one bfloat16 GEMM per chunk, ``<Q_k, F[p]>`` for every mask cell k and every position p,
followed by K shifted float32 adds; the denominator uses the stored squared norms. bfloat16 GEMMs round each
per-cell dot product to bfloat16, so these scores carry a relative error of about 2^-8. Extra memory: chunks of
about CHUNK_BYTES, never a copy of the cache.
"""

from __future__ import annotations

import numpy as np
import torch

from dashboard.region_query import RegionQuery
from dashboard.scoring.base import PreparedQuery, Scorer, tensor_view

CHUNK_BYTES = 48 * 2**20  # bound on the temporary memory of one search, whatever the cache size
GATHER_CHUNK_BYTES = 8 * 2**20


class _TorchQuery(PreparedQuery):
    def __init__(self, query: RegionQuery, grid: tuple[int, int], channels: int):
        self.grid, self.channels = grid, channels
        h, w = query.box
        self.out_h, self.out_w = query.windows(grid)
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

    def scores(self, block: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
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

    def best_windows(self, features, sqnorms, ids):
        full_range = ids is None
        ids = np.arange(features.shape[0], dtype=np.int64) if full_range else np.asarray(ids, dtype=np.int64)
        scores = np.empty(len(ids), dtype=np.float32)
        positions = np.empty(len(ids), dtype=np.int64)
        if len(ids) == 0:
            return scores, positions
        contiguous = full_range or (ids[-1] - ids[0] + 1 == len(ids))
        cells = 1 if self.single_window else len(self.cells)
        rows = _chunk_rows(self.grid[0] * self.grid[1], cells, self.channels, not contiguous)
        if self.single_window and contiguous:
            rows = len(ids)  # views of the memmap and an n-vector out: no temporary grows with the chunk
        for start, block, norms in _chunks(features, sqnorms, ids, rows, contiguous):
            best_score, best_position = self.scores(block, norms).max(dim=1)  # ties: top-left window
            scores[start:start + len(block)] = best_score.numpy()
            positions[start:start + len(block)] = best_position.numpy()
        return scores, positions

    def window_maps(self, features, sqnorms, ids):
        maps = [self.scores(features[i:i + 1], tensor_view(sqnorms[i:i + 1])) for i in np.asarray(ids, dtype=np.int64)]
        return np.stack([m.view(self.out_h, self.out_w).numpy() for m in maps]) if maps else \
            np.empty((0, self.out_h, self.out_w), dtype=np.float32)


class TorchScorer(Scorer):
    name = "torch"
    description = "torch fallback (bfloat16 GEMMs)"

    def prepare(self, query: RegionQuery, grid: tuple[int, int], channels: int) -> PreparedQuery:
        query.check_fits(grid, channels)
        return _TorchQuery(query, grid, channels)


def _chunk_rows(n_positions: int, cells: int, channels: int, gathered: bool) -> int:
    per_image = n_positions * (max(cells, 1) * 6 + 4 * 3) + (n_positions * channels * 2 if gathered else 0)
    # gathered rows are consumed straight from the CPU cache when a chunk stays small
    budget = GATHER_CHUNK_BYTES if gathered else CHUNK_BYTES
    return max(1, budget // per_image)


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
