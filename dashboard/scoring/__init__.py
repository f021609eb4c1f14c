"""Scoring backends behind one registry: a name -> a scorer of the masked sliding-window cosine.

| name | what |
| --- | --- |
| `native` | the compiled kernel's best path for this CPU, chosen at run time from its flags |
| `avx512-bf16` | AVX512-BF16 dot products on the stored bfloat16 values |
| `avx2` | AVX2+FMA: stored values widened to float32 in registers |
| `neon` | the same on 64-bit ARM (Graviton, Apple) |
| `portable` | the compiled kernel's plain C path, on any CPU (to test and compare it) |
| `torch` | torch operations, for machines without a C compiler (slower, precision ~2^-8) |

`VFS_SEARCH_BACKEND` (see `dashboard.settings`) or a `backend=` argument picks one by name; unset, `native` is
used where it builds and `torch` otherwise, with a warning. A new CPU path or a first-stage index is one more
`Scorer` subclass and one line in `SCORERS`.
"""

from __future__ import annotations

import difflib
import functools
import logging

import numpy as np
import torch

from cache_builder import cache_format as fmt
from dashboard import settings
from dashboard.geometry import QueryError
from dashboard.region_query import RegionQuery
from dashboard.scoring.base import PreparedQuery, Scorer, WindowScores, best_positions, check_ids
from dashboard.scoring.kernel import KernelQuery
from dashboard.scoring.native import NativeScorer
from dashboard.scoring.torch_path import TorchScorer

__all__ = ["SCORERS", "PreparedQuery", "Scorer", "WindowScores", "best_positions", "check_ids", "code_query",
           "engine_status", "get_scorer", "prepare", "runnable_scorers", "score_codes", "score_codes_in_parts",
           "score_placed", "score_windows", "window_score_maps"]

SCORERS: dict[str, Scorer] = {
    "native": NativeScorer(None, "native kernel, the best path of this CPU"),
    "avx512-bf16": NativeScorer("avx512-bf16", "native kernel, AVX512-BF16 path"),
    "avx2": NativeScorer("avx2", "native kernel, AVX2+FMA path"),
    "neon": NativeScorer("neon", "native kernel, NEON path"),
    "portable": NativeScorer("portable", "native kernel, portable C path"),
    "torch": TorchScorer(),
}
FALLBACK = "torch"
_log = logging.getLogger(__name__)


def get_scorer(name: str | None = None) -> Scorer:
    """The scorer called `name`, or the configured one, or the best that runs here.

    A name given here must run here. A configured or default native backend that cannot be built falls back
    to torch with a warning, so a machine without a compiler still searches.
    """
    if name is not None:
        scorer = _lookup(name, "backend")
        reason = scorer.unavailable_reason()
        if reason:
            raise QueryError(f"search backend {name!r} cannot run here: {reason}")
        return scorer
    scorer = _lookup(settings.current().search_backend or "native", settings.SEARCH_BACKEND_ENV)
    reason = scorer.unavailable_reason()
    if reason:
        _warn_fallback_once(reason)
        return SCORERS[FALLBACK]
    return scorer


def _lookup(name: str, what: str) -> Scorer:
    if name not in SCORERS:
        close = difflib.get_close_matches(name, SCORERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise QueryError(f"{what} must be one of {', '.join(SCORERS)}; got {name!r}{hint}")
    return SCORERS[name]


@functools.cache
def _warn_fallback_once(reason: str) -> None:
    _log.warning("searching with the slower torch path: %s", reason)


def engine_status() -> str:
    """One line for logs and the Caches page: what searches run on here."""
    scorer = get_scorer()
    if scorer.name == FALLBACK and settings.current().search_backend != FALLBACK:
        return f"torch fallback ({SCORERS['native'].unavailable_reason()})"
    return scorer.describe()


def runnable_scorers() -> list[str]:
    """The names of every scorer that runs on this machine (tests and benchmarks iterate over these)."""
    return [name for name, scorer in SCORERS.items() if scorer.unavailable_reason() is None]


def prepare(query: RegionQuery, features: torch.Tensor, backend: str | None = None) -> PreparedQuery:
    """`query` laid out once for the backend and the cache's (N, H, W, C) shape."""
    return get_scorer(backend).prepare(query, tuple(features.shape[1:3]), features.shape[3])


def score_windows(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids: np.ndarray | None = None,
                  backend: str | None = None, content: np.ndarray | None = None) -> WindowScores:
    """Best window of the images `ids` (all when None) for `query`.

    Only the requested rows are read, so a 10% candidate set costs ~10%. Extra memory: about 30 bytes per
    searched image for ids and results (the torch path adds bounded chunks); never a copy of the cache, so a
    memory-mapped cache larger than RAM is searched as it is paged in.

    `content` (one (r0, c0, r1, c1) cell box per searched image, whole-frame caches) keeps the windows of
    letterboxed images on their picture: a window whose region weight lies mostly on padding cannot be the best.
    """
    prepared = prepare(query, features, backend)
    if ids is not None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        check_ids(ids, features.shape[0])
    scores, positions = prepared.best_windows(features, sqnorms, ids)
    all_ids = np.arange(features.shape[0], dtype=np.int64) if ids is None else ids
    if content is not None:
        _best_on_the_picture(prepared, features, sqnorms, query, all_ids, np.asarray(content), scores, positions)
    return WindowScores(all_ids, scores, positions, prepared.out_w)


def score_placed(base: int, placed: np.ndarray, extent: int, sqnorms: np.ndarray, query: RegionQuery,
                 ids: np.ndarray, grid: tuple[int, int, int], backend: str | None = None) -> WindowScores | None:
    """`score_windows` of rows that a reader put in its own buffer (`dashboard.row_reads`): image ids[i] lies at
    `base + placed[i]`. None where the backend scores only arrays (torch): the caller then reads the rows itself."""
    scorer = get_scorer(backend)
    if not isinstance(scorer, NativeScorer):
        return None
    prepared = scorer.prepare(query, grid[:2], grid[2])
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    scores, windows = prepared.kernel.score_placed(prepared.query, base, placed, extent, np.asarray(sqnorms), ids)
    return WindowScores(ids, scores, windows.astype(np.int64), prepared.out_w)


CODE_CHUNK_IMAGES = 4096  # images decoded at a time where the kernel cannot read the codes itself


def score_codes(index: fmt.FirstStageIndex, sqnorms: np.ndarray, query: RegionQuery, ids: np.ndarray | None = None,
                backend: str | None = None) -> WindowScores:
    """Best window of the images `ids` (all when None) by the first stage: the same formula with the numerators
    taken from the 4-bit codes' values (`index.values`) and the exact squared norms, so the scores approximate
    the exact ones. The native kernel unpacks the codes image by image and takes integer dot products with the
    query quantised to int8 (each dimension's step folded in, its mean in one offset): every native path gives the
    same numbers. Other backends score decoded chunks (rounded to bfloat16)."""
    scorer = get_scorer(backend)
    if ids is not None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        check_ids(ids, index.codes.shape[0])
    all_ids = np.arange(index.codes.shape[0], dtype=np.int64) if ids is None else ids
    if isinstance(scorer, NativeScorer):
        kernel = scorer.kernel()
        prepared = code_query(index, query, kernel.code_chunk_bytes)
        scores, windows, _ = kernel.score_codes(prepared, index.codes, np.asarray(sqnorms), ids)
        return WindowScores(all_ids, scores, windows.astype(np.int64), prepared.out_w)
    small = query.projected(index.basis)
    prepared_small = scorer.prepare(small, query.grid, index.dims)
    # such a backend divides by the projected query's norm: the values scaled by its ratio to the full one give
    # the native scores (and their clipping at 1)
    ratio = np.float32(small.norm / query.norm) if query.norm > 0 else np.float32(1)
    scores, positions = np.empty(len(all_ids), np.float32), np.empty(len(all_ids), np.int64)
    for start in range(0, len(all_ids), CODE_CHUNK_IMAGES):
        chunk = all_ids[start:start + CODE_CHUNK_IMAGES]
        bits = fmt.to_bfloat16_bits(index.values(index.codes[chunk]) * ratio)
        part = prepared_small.best_windows(torch.from_numpy(bits).view(torch.bfloat16),
                                           np.ascontiguousarray(sqnorms[chunk]), None)
        scores[start:start + len(chunk)], positions[start:start + len(chunk)] = part
    return WindowScores(all_ids, scores, positions, prepared_small.out_w)


def score_codes_in_parts(index: fmt.FirstStageIndex, sqnorms: np.ndarray, query: RegionQuery,
                         parts: list[np.ndarray], backend: str | None = None):
    """`score_codes` of each id array in `parts`, yielded in order as each part is scored. On the native kernel
    the cores score the next parts while the caller handles a finished one (`SearchKernel.score_codes_in_parts`);
    other backends score one part per step."""
    scorer = get_scorer(backend)
    parts = [np.ascontiguousarray(ids, dtype=np.int64) for ids in parts]
    for ids in parts:
        check_ids(ids, index.codes.shape[0])
    if not isinstance(scorer, NativeScorer):
        for ids in parts:
            yield score_codes(index, sqnorms, query, ids, backend)
        return
    kernel = scorer.kernel()
    prepared = code_query(index, query, kernel.code_chunk_bytes)
    found = kernel.score_codes_in_parts(prepared, index.codes, np.asarray(sqnorms), parts)
    for ids, (scores, windows) in zip(parts, found):
        yield WindowScores(ids, scores, windows.astype(np.int64), prepared.out_w)


def code_query(index: fmt.FirstStageIndex, query: RegionQuery, chunk_bytes: int) -> KernelQuery:
    """`query` laid out for the native kernel's first stage over `index` (`vfs_score_codes`): projected on the
    basis, each dimension's step folded into the values and the quantiser's means into one offset."""
    projected = (query.features @ index.basis).astype(np.float32)
    weights_sq = query.weights.astype(np.float64)[..., None] ** 2
    means_share = float(np.sum(weights_sq * projected * index.means))
    return KernelQuery.for_codes(projected * index.steps, query.weights, query.grid, query.norm, means_share,
                                 chunk_bytes)


MIN_PICTURE_SHARE = 0.5  # a window must hold at least this share of the region's weight on the picture


def picture_share(query: RegionQuery, content: np.ndarray) -> np.ndarray:
    """(n, out_h, out_w): the share of the region's squared weight that each window puts on the picture cells
    (r0, c0, r1, c1) of each of n images, from a 2-D prefix sum of the weights."""
    weights_sq = query.weights.astype(np.float64) ** 2
    h, w = weights_sq.shape
    prefix = np.zeros((h + 1, w + 1))
    prefix[1:, 1:] = weights_sq.cumsum(0).cumsum(1)
    out_h, out_w = query.windows(query.grid)
    y, x = np.arange(out_h), np.arange(out_w)
    r0, c0, r1, c1 = (content[:, k:k + 1] for k in range(4))
    i0, i1 = np.clip(r0 - y, 0, h)[:, :, None], np.clip(r1 - y, 0, h)[:, :, None]
    j0, j1 = np.clip(c0 - x, 0, w)[:, None, :], np.clip(c1 - x, 0, w)[:, None, :]
    inside = prefix[i1, j1] - prefix[i0, j1] - prefix[i1, j0] + prefix[i0, j0]
    return inside / prefix[h, w]


def _best_on_the_picture(prepared: PreparedQuery, features, sqnorms, query: RegionQuery, ids: np.ndarray,
                         content: np.ndarray, scores: np.ndarray, positions: np.ndarray) -> None:
    """Re-pick, in place, the best window of the letterboxed images among windows mostly on their picture.

    Only images with padding are scored again (every window), so a cache of one aspect ratio costs nothing.
    Where no window reaches MIN_PICTURE_SHARE (a region larger than the picture), those with the largest share
    compete.
    """
    grid_h, grid_w = query.grid
    padded = np.nonzero(~((content[:, 0] == 0) & (content[:, 1] == 0) & (content[:, 2] == grid_h)
                          & (content[:, 3] == grid_w)))[0]
    if len(padded) == 0:
        return
    maps = prepared.window_maps(features, sqnorms, ids[padded]).reshape(len(padded), -1)
    share = picture_share(query, content[padded]).reshape(len(padded), -1)
    allowed = (share >= MIN_PICTURE_SHARE) | (share >= share.max(axis=1, keepdims=True) - 1e-12)
    masked = np.where(allowed, maps, -np.inf)
    best = masked.argmax(axis=1)  # the first maximum, as every backend picks
    scores[padded] = masked[np.arange(len(padded)), best]
    positions[padded] = best


def window_score_maps(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids,
                      backend: str | None = None) -> np.ndarray:
    """(len(ids), out_h, out_w) score of every window of the images `ids`, prepared and scored in one call."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    check_ids(ids, features.shape[0])
    return prepare(query, features, backend).window_maps(features, sqnorms, ids)
