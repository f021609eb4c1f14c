"""A region of a query image's feature map, as every scorer receives it.

For a query map Q (H x W x C) and soft mask M cropped to its bounding box (h x w), every window position
(y, x) of every image n scores

    score(n, y, x) = sum_ij M_ij^2 <Q_ij, F_n[y+i, x+j]> / (||M * Q|| * sqrt(sum_ij M_ij^2 ||F_n[y+i, x+j]||^2))

i.e. cos(M * Q, M * window), Ulrich & Fong's masked sliding-window cosine. An image's score is its best window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache_builder.cache_format import round_to_storage
from dashboard.geometry import QueryError


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
        weights = np.asarray(weights)
        if weights.shape != (h, w):
            raise QueryError(f"the region's grid {weights.shape} does not match the feature grid {(h, w)}")
        rows, cols = np.nonzero(weights > 0)
        if rows.size == 0:
            raise QueryError("the region is empty: draw over the image to select what to search for")
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        cropped = round_to_storage(features[top:bottom, left:right])
        box_weights = weights[top:bottom, left:right].astype(np.float32)
        if not np.any(np.abs(cropped * box_weights[..., None]) > 0):
            raise QueryError("the region's features are all zero at this layer, so no similarity is defined")
        return cls(features=cropped, weights=box_weights, top=int(top), left=int(left), grid=(h, w))

    def projected(self, basis: np.ndarray) -> "RegionQuery":
        """The same region with its features projected onto `basis` (C, d): the query of a first-stage index."""
        features = round_to_storage(self.features @ np.asarray(basis, dtype=np.float32))
        return RegionQuery(features=features, weights=self.weights, top=self.top, left=self.left, grid=self.grid)

    @property
    def box(self) -> tuple[int, int]:
        """(h, w): the window size in cells."""
        return self.weights.shape

    @property
    def channels(self) -> int:
        return self.features.shape[2]

    @property
    def norm(self) -> float:
        return float(np.sqrt(np.sum((self.weights[..., None] * self.features).astype(np.float64) ** 2)))

    def windows(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of window positions on a `grid` feature map."""
        return grid[0] - self.box[0] + 1, grid[1] - self.box[1] + 1

    def check_fits(self, grid: tuple[int, int], channels: int) -> None:
        """A query is only comparable with features of its own grid and width."""
        if tuple(grid) != tuple(self.grid):
            raise QueryError(f"the query grid {self.grid} differs from the cache's grid {tuple(grid)}")
        if self.channels != channels:
            raise QueryError(f"the query has {self.channels} channels, the cache {channels}")
