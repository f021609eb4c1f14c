"""The compiled kernel (`kernel.c`) as a scorer: one of its instruction paths, or the best this CPU runs."""

from __future__ import annotations

import numpy as np

from dashboard.region_query import RegionQuery
from dashboard.scoring.base import PreparedQuery, Scorer
from dashboard.scoring.kernel import VARIANTS, KernelQuery, KernelUnavailable, SearchKernel, load_kernel


class _NativeQuery(PreparedQuery):
    def __init__(self, kernel: SearchKernel, query: KernelQuery):
        self.kernel, self.query = kernel, query
        self.out_h, self.out_w = query.out_h, query.out_w

    def best_windows(self, features, sqnorms, ids):
        scores, windows, _ = self.kernel.score(self.query, features, np.asarray(sqnorms), ids)
        return scores, windows.astype(np.int64)

    def window_maps(self, features, sqnorms, ids):
        ids = np.asarray(ids, dtype=np.int64)
        _, _, every = self.kernel.score(self.query, features, np.asarray(sqnorms), ids, with_all=True)
        return every.reshape(len(ids), self.out_h, self.out_w)


class NativeScorer(Scorer):
    """`variant`: one path of the kernel (see kernel.PATHS), or None for the best path that builds here."""

    def __init__(self, variant: str | None, description: str):
        self.name, self.variant, self.description = variant or "native", variant, description

    def kernel(self) -> SearchKernel:
        if self.variant is not None:
            return load_kernel(self.variant)
        failures = []
        for variant in VARIANTS:  # best first; a path this CPU lacks, or whose build fails, gives way
            try:
                return load_kernel(variant)
            except KernelUnavailable as exc:
                failures.append(exc)
        raise failures[-1]

    def unavailable_reason(self) -> str | None:
        try:
            self.kernel()
        except KernelUnavailable as exc:
            return str(exc)
        return None

    def describe(self) -> str:
        return f"native kernel ({self.kernel().isa})"

    def prepare(self, query: RegionQuery, grid: tuple[int, int], channels: int) -> PreparedQuery:
        query.check_fits(grid, channels)
        return _NativeQuery(self.kernel(), KernelQuery.build(query.features, query.weights, query.grid, query.norm))
