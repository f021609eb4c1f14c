"""Scoring backends behind one registry: a name -> a scorer of the masked sliding-window cosine.

| name | what |
| --- | --- |
| `native` | the compiled kernel with the best instructions this CPU has (AVX512-BF16, else portable C) |
| `portable` | the compiled kernel's portable C path, on any CPU (to test and compare it) |
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

from dashboard import settings
from dashboard.geometry import QueryError
from dashboard.region_query import RegionQuery
from dashboard.scoring.base import PreparedQuery, Scorer, WindowScores, check_ids
from dashboard.scoring.native import NativeScorer
from dashboard.scoring.torch_path import TorchScorer

__all__ = ["SCORERS", "PreparedQuery", "Scorer", "WindowScores", "check_ids", "engine_status", "get_scorer",
           "prepare", "score_windows", "window_score_maps"]

SCORERS: dict[str, Scorer] = {
    "native": NativeScorer("native", "native kernel, best instructions of this CPU"),
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


def prepare(query: RegionQuery, features: torch.Tensor, backend: str | None = None) -> PreparedQuery:
    """`query` laid out once for the backend and the cache's (N, H, W, C) shape."""
    return get_scorer(backend).prepare(query, tuple(features.shape[1:3]), features.shape[3])


def score_windows(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids: np.ndarray | None = None,
                  backend: str | None = None) -> WindowScores:
    """Best window of the images `ids` (all when None) for `query`.

    Only the requested rows are read, so a 10% candidate set costs ~10%. Extra memory: about 30 bytes per
    searched image for ids and results (the torch path adds bounded chunks); never a copy of the cache, so a
    memory-mapped cache larger than RAM is searched as it is paged in.
    """
    prepared = prepare(query, features, backend)
    if ids is not None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        check_ids(ids, features.shape[0])
    scores, positions = prepared.best_windows(features, sqnorms, ids)
    all_ids = np.arange(features.shape[0], dtype=np.int64) if ids is None else ids
    return WindowScores(all_ids, scores, positions, prepared.out_w)


def window_score_maps(features: torch.Tensor, sqnorms: np.ndarray, query: RegionQuery, ids,
                      backend: str | None = None) -> np.ndarray:
    """(len(ids), out_h, out_w) score of every window of the images `ids`, prepared and scored in one call."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    check_ids(ids, features.shape[0])
    return prepare(query, features, backend).window_maps(features, sqnorms, ids)
