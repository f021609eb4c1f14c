"""The two-tier first stage in parts (`dashboard.shards.CacheShard.first_stage_scores`, which reads the likely rows
ahead after each part) against the same parts scored one kernel call at a time, each waited for before the next
is begun (the design before every part was queued at once), and against the kernel alone in one call with no
reads: side by side in one process, the order of the designs turning query by query.

    .venv/bin/python benchmarks/first_stage_parts.py                    # scale.py's 1M x 7x7x320 cache
    .venv/bin/python benchmarks/first_stage_parts.py --images 200000    # a smaller cache, same measurements
    .venv/bin/python benchmarks/first_stage_parts.py --only 14x14x112   # scale.py's 500k x 14x14x112 cache

Per mask size: the median total, first stage (with the shortlist) and rerank of each design, and whether all gave
the same top-10. Before every query the features are dropped from the page cache, as in scale.py (every row the
rerank needs comes from the disk, or from what the first stage read ahead).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import drop_from_page_cache, query_set, side_by_side  # noqa: E402

from cache_builder import cache_format as fmt  # noqa: E402
from dashboard import scoring, shards, two_tier  # noqa: E402

QUEUED_PARTS = scoring.score_codes_in_parts
SHIPPED = shards.CacheShard.first_stage_scores


def parts_one_by_one(index, sqnorms, query, parts, backend=None):
    """`scoring.score_codes_in_parts` as it was: each part's kernel call begun only once the search has handled
    the part before (a generator, so the next call waits for the caller's next step)."""
    for ids in parts:
        yield scoring.score_codes(index, sqnorms, query, ids, backend=backend)


def one_call(self: shards.CacheShard, query, ids, backend):
    """The kernel over the whole index in one call, nothing read ahead (the rerank reads through the map)."""
    return scoring.score_codes(self.first_stage(), self.sqnorms, query, ids, backend=backend)


DESIGNS = {  # (the shard's first stage, how it scores its parts)
    "queued (shipped)": (SHIPPED, QUEUED_PARTS),
    "waiting": (SHIPPED, parts_one_by_one),
    "one call, no reads": (one_call, QUEUED_PARTS),
}


def use(design: str) -> None:
    shards.CacheShard.first_stage_scores, scoring.score_codes_in_parts = DESIGNS[design]


def main() -> None:
    args, cache, depth = side_by_side(__doc__.splitlines()[0])
    path = cache.path / fmt.FEATURES_FILE
    queries = query_set(cache)
    names = list(DESIGNS)
    try:
        for mask in two_tier.mask_shapes(cache.grid):
            chosen = [q for name, _, q in queries if name == mask][:args.queries + 1]
            times = {design: {"total": [], "first": [], "rerank": []} for design in DESIGNS}
            agree = []
            for k, query in enumerate(chosen):
                tops = {}
                for design in names[k % len(names):] + names[:k % len(names)]:
                    use(design)
                    drop_from_page_cache(path)
                    started = time.perf_counter()
                    picked = two_tier.shortlist(two_tier.first_stage_scores(cache, query, None), depth)
                    middle = time.perf_counter()
                    tops[design] = two_tier.best_ids(two_tier.rerank(cache, query, picked), 10)
                    done = time.perf_counter()
                    shards.finish_unmapping()
                    if k:  # one warm-up query per mask (the first reader's buffer is allocated then)
                        for name, value in (("total", done - started), ("first", middle - started),
                                            ("rerank", done - middle)):
                            times[design][name].append(value)
                agree.append(all(np.array_equal(top, tops[names[0]]) for top in tops.values()))
            line = " | ".join(f"{design} {np.median(t['total']) * 1e3:4.0f} ms ({np.median(t['first']) * 1e3:.0f} + "
                              f"{np.median(t['rerank']) * 1e3:.0f})" for design, t in times.items())
            ratio = np.median(times[names[0]]["total"]) / np.median(times["waiting"]["total"])
            print(f"{mask:>6}: {line} | queued/waiting {ratio:.2f}x | same top-10 {sum(agree)}/{len(agree)}",
                  flush=True)
    finally:
        use("queued (shipped)")
        cache.metadata.close()


if __name__ == "__main__":
    main()
