"""The two-tier rerank with its rows read ahead by direct asynchronous reads (`dashboard.row_reads`, the
default) against reading them through the memory map after the first stage (`VFS_DIRECT_READS=0`), side by side
in one process, queries alternating which goes first.

    .venv/bin/python benchmarks/direct_reads.py                     # scale.py's 1M x 7x7x320 cache
    .venv/bin/python benchmarks/direct_reads.py --images 200000     # a smaller cache, same measurements

Per mask size: the median total, first stage (with the shortlist) and rerank of each; the share of the shortlist
that the first stage had read ahead; whether both gave the same top-10 (both are exact). Before every query the
features are dropped from the page cache, as in scale.py (the worst case: every row comes from the disk).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import drop_from_page_cache, query_set, side_by_side  # noqa: E402

from cache_builder import cache_format as fmt  # noqa: E402
from dashboard import row_reads, settings, shards, two_tier  # noqa: E402

DESIGNS = {"mapped": "0", "direct": "1"}


def timed_query(cache, query, depth: int) -> tuple[np.ndarray, float, float, float]:
    """(top-10, first stage s, rerank s, rows read ahead / depth) of one two-tier query."""
    shard = cache.shards[0]
    started = time.perf_counter()
    first = two_tier.first_stage_scores(cache, query, None)
    shortlist = two_tier.shortlist(first, depth)
    read_ahead = 0
    if shard._read_aheads is not None and row_reads.query_key(query) in shard._read_aheads._held:
        reader = shard._read_aheads._held[row_reads.query_key(query)][0]
        read_ahead = int((reader.slot_of[shortlist] >= 0).sum())
    middle = time.perf_counter()
    found = two_tier.rerank(cache, query, shortlist)
    done = time.perf_counter()
    shards.finish_unmapping()
    return two_tier.best_ids(found, 10), middle - started, done - middle, read_ahead / depth


def main() -> None:
    args, cache, depth = side_by_side(__doc__.splitlines()[0])
    path = cache.path / fmt.FEATURES_FILE
    queries = query_set(cache)
    for mask in two_tier.mask_shapes(cache.grid):
        chosen = [q for name, _, q in queries if name == mask][:args.queries + 1]
        times = {design: {"total": [], "first": [], "rerank": []} for design in DESIGNS}
        agree, ahead = [], []
        for k, query in enumerate(chosen):
            tops = {}
            for design in list(DESIGNS) if k % 2 else list(DESIGNS)[::-1]:
                os.environ[settings.DIRECT_READS_ENV] = DESIGNS[design]
                drop_from_page_cache(path)
                tops[design], first_s, rerank_s, share = timed_query(cache, query, depth)
                if k == 0:
                    continue  # one warm-up query per mask (the direct design allocates its buffer here)
                for name, value in (("total", first_s + rerank_s), ("first", first_s), ("rerank", rerank_s)):
                    times[design][name].append(value)
                if design == "direct":
                    ahead.append(share)
            if k:
                agree.append(bool(np.array_equal(tops["mapped"], tops["direct"])))
        line = " | ".join(f"{design} {np.median(t['total']) * 1e3:4.0f} ms (first stage "
                          f"{np.median(t['first']) * 1e3:.0f} + rerank {np.median(t['rerank']) * 1e3:.0f})"
                          for design, t in times.items())
        ratio = np.median(times["mapped"]["total"]) / np.median(times["direct"]["total"])
        print(f"{mask:>6}: {line} | mapped/direct {ratio:.2f}x | shortlist read ahead {np.mean(ahead):.1%} | "
              f"same top-10 {sum(agree)}/{len(agree)}", flush=True)
    os.environ.pop(settings.DIRECT_READS_ENV, None)
    cache.metadata.close()


if __name__ == "__main__":
    main()
