"""What every scoring backend provides: a query prepared once, then best windows or every window's score."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from dashboard.region_query import RegionQuery


@dataclass
class WindowScores:
    """Best window of every searched image; `ids` ascending, `position` = y * windows_per_row + x."""

    ids: np.ndarray
    scores: np.ndarray
    position: np.ndarray
    windows_per_row: int


SAMPLED_SELECTION = 200_000  # from this many scores on, best_positions first narrows them by a sampled threshold


def best_positions(scores: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` highest scores (all where there are no more), in no particular order; ties at the
    last place broken arbitrarily but the same way for the same scores.

    A two-tier search takes its shortlist from 1M first-stage scores while both cores wait for it: a full
    partition took 5-10 ms there. Over many scores and a small count, a threshold read off a strided sample of
    ~20,000 (at twice the share asked for) leaves a few times `count` candidates, and only they are partitioned;
    where fewer than `count` pass it (a sample that misjudged the spread), all are."""
    n = len(scores)
    if count <= 0:
        return np.zeros(0, np.int64)
    if count >= n:
        return np.arange(n)
    if n >= SAMPLED_SELECTION and count * 20 <= n:
        sample = scores[::n // 20_000]
        above = min(len(sample) - 1, 2 * -(-count * len(sample) // n))  # sampled scores above the threshold
        threshold = np.partition(sample, len(sample) - 1 - above)[len(sample) - 1 - above]
        candidates = np.flatnonzero(scores >= threshold)
        if len(candidates) >= count:  # then every one of the best `count` is among them
            return candidates[np.argpartition(-scores[candidates], count - 1)[:count]]
    return np.argpartition(-scores, count - 1)[:count]


def check_ids(ids: np.ndarray, n_total: int) -> None:
    """Every id names a cached image: backends read raw memory at each one."""
    if len(ids) and (ids.min() < 0 or ids.max() >= n_total):
        raise IndexError(f"image ids must lie in 0..{n_total - 1}")


class PreparedQuery(ABC):
    """A region query laid out for one backend and one cache shape; reusable for many calls."""

    out_h: int
    out_w: int

    @abstractmethod
    def best_windows(self, features: torch.Tensor, sqnorms: np.ndarray,
                     ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(score, window position) of the best window of each image in `ids` (every image when None).

        `features` is the (N, H, W, C) bfloat16 cache (usually a memmap view), `sqnorms` its (N, H, W) float32
        squared norms. Only the requested rows are read. Ties go to the first (top-left) window.
        """

    @abstractmethod
    def window_maps(self, features: torch.Tensor, sqnorms: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(len(ids), out_h, out_w): every window's score, the heat maps behind hits."""


class Scorer(ABC):
    """A named way to compute the scores (see `dashboard.scoring.SCORERS`)."""

    name: str
    description: str

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (None when it can)."""
        return None

    def describe(self) -> str:
        return self.description

    @abstractmethod
    def prepare(self, query: RegionQuery, grid: tuple[int, int], channels: int) -> PreparedQuery:
        ...


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing memory with `array`, read-only memmaps included, made without a warning.

    `torch.from_numpy` warns on read-only arrays, and silencing it per call with `warnings.catch_warnings` is not
    thread-safe: that swaps the process-wide filter list, so two sessions interleaving leave an "ignore
    UserWarning" filter installed for good. DLPack carries the read-only flag and makes the same zero-copy view.
    """
    return torch.from_dlpack(array)
