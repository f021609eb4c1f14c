"""Would a product-quantised first stage scored by table lookups ("fast scan") be faster? Timed before building one.

`benchmarks/first_stage.py --codes pq:64` measures its recall on real features; this measures its speed. It builds
the prototype `benchmarks/fast_scan.c` (AVX2; not used by the app), checks it against a float64 formula of the same
lookups on a small case, then times it side by side with the shipped 4-bit kernel (`vfs_score_codes`, 128
dimensions, 64 bytes a cell) in one process, on seeded codes in RAM, 2 threads, queries alternating: 1-cell, 3x3
and whole-grid masks, for PQ codes `M` or `M/K` (M sub-quantisers, M / 2 bytes a cell; K = 2 or 4: lookups added in
8 bits before they are widened, for tables of 7 or 6 bits; by default, on 7x7 grids of 320 channels against 128
dimensions: M = 32 and 64). It prints each median, the time per image, each as a multiple of a plain read of its
codes, and the ratio to the shipped kernel.

    .venv/bin/python benchmarks/fast_scan.py [--images 500000] [--queries 9]
    .venv/bin/python benchmarks/fast_scan.py --codes 64 64/2 64/4
    .venv/bin/python benchmarks/fast_scan.py --grid 14 14 --channels 112 --dims 64 --codes 16 32
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from codes_kernel import random_index  # noqa: E402
from dashboard import two_tier  # noqa: E402
from dashboard.region_query import RegionQuery  # noqa: E402
from dashboard.scoring import code_query  # noqa: E402
from dashboard.scoring.kernel import load_kernel, missing_cpu_flags, path_flags  # noqa: E402

BLOCK = 32  # images a block


class Query(ctypes.Structure):
    _fields_ = [("grid_h", ctypes.c_int32), ("grid_w", ctypes.c_int32), ("subquantisers", ctypes.c_int32),
                ("out_h", ctypes.c_int32), ("out_w", ctypes.c_int32), ("n_cells", ctypes.c_int32),
                ("cell_offsets", ctypes.c_void_p), ("cell_weights", ctypes.c_void_p), ("tables", ctypes.c_void_p),
                ("scale", ctypes.c_float), ("bias", ctypes.c_float), ("query_norm", ctypes.c_float),
                ("lookups_per_sum", ctypes.c_int32)]


def build() -> ctypes.CDLL:
    target = Path(tempfile.mkdtemp()) / "fast_scan.so"
    subprocess.run(["cc", "-O3", "-mavx2", "-mfma", "-fPIC", "-shared", str(ROOT / "benchmarks" / "fast_scan.c"),
                    "-o", str(target), "-lm"], check=True)
    library = ctypes.CDLL(str(target))
    library.fs_score_blocks.restype = ctypes.c_int
    library.fs_score_blocks.argtypes = [ctypes.POINTER(Query), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    return library


class FastScanQuery:
    """A mask and its lookup tables, kept alive with the struct that points at them."""

    def __init__(self, mask: np.ndarray, tables: np.ndarray, scale: float, bias: float, norm: float,
                 per_sum: int = 1) -> None:
        rows, cols = np.nonzero(mask)
        top, left = rows.min(), cols.min()
        self.grid = mask.shape
        self.mask, self.tables = mask, tables  # (n_cells, M, 16) uint8
        self.out = (self.grid[0] - (rows.max() - top), self.grid[1] - (cols.max() - left))
        self.offsets = np.ascontiguousarray((rows - top) * self.grid[1] + (cols - left), dtype=np.int32)
        self.weights = np.ascontiguousarray(mask[rows, cols] ** 2, dtype=np.float32)
        m = tables.shape[1]
        pairs = tables.reshape(len(rows), m // 2, 2, 16)
        self.packed = np.ascontiguousarray(np.repeat(pairs, 2, axis=2).reshape(len(rows), m // 2, 64))
        self.struct = Query(self.grid[0], self.grid[1], m, int(self.out[0]), int(self.out[1]), len(rows),
                            self.offsets.ctypes.data, self.weights.ctypes.data, self.packed.ctypes.data,
                            scale, bias, norm, per_sum)


def random_query(mask: np.ndarray, m: int, rng: np.random.Generator, per_sum: int = 1) -> FastScanQuery:
    """Random tables as large as K lookups a sum allow (at most 255 / K), and random scaling."""
    tables = rng.integers(0, 256 // per_sum, size=(int(np.count_nonzero(mask)), m, 16), dtype=np.uint8)
    return FastScanQuery(mask, tables, scale=float(rng.uniform(1e-4, 1e-3)), bias=float(rng.normal()),
                         norm=float(rng.uniform(1, 2)), per_sum=per_sum)


def parse_code(text: str) -> tuple[int, int]:
    """`M` or `M/K` -> (M, K)."""
    m, _, k = text.partition("/")
    return int(m), int(k or 1)


def reference(query: FastScanQuery, codes: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's best score and its first window by the float64 formula, from block-laid codes (blocks, cells,
    M/2, 32 bytes) and norms (blocks, cells, 32)."""
    blocks, cells, pairs, _ = codes.shape
    indices = np.stack([codes & 0x0F, codes >> 4], axis=3)  # blocks, cells, pairs, 2, 32
    indices = indices.transpose(0, 4, 1, 2, 3).reshape(blocks * BLOCK, cells, 2 * pairs)
    per_image_norms = norms.transpose(0, 2, 1).reshape(blocks * BLOCK, cells).astype(np.float64)
    best, windows = np.full(blocks * BLOCK, -np.inf), np.zeros(blocks * BLOCK, np.int32)
    for y in range(query.out[0]):
        for x in range(query.out[1]):
            corner = y * query.grid[1] + x
            lookups = np.zeros(blocks * BLOCK)
            den = np.zeros(blocks * BLOCK)
            for c, offset in enumerate(query.offsets):
                table = query.tables[c].astype(np.float64)  # M, 16
                lookups += table[np.arange(2 * pairs), indices[:, corner + offset]].sum(axis=1)
                den += query.weights[c] * per_image_norms[:, corner + offset]
            scores = (lookups * query.struct.scale + query.struct.bias) / (np.sqrt(np.where(den > 0, den, 1))
                                                                          * query.struct.query_norm)
            scores = np.where(den > 0, scores, 0.0)
            windows[scores > best] = y * query.out[1] + x
            best = np.maximum(best, scores)
    return best, windows


def score(library: ctypes.CDLL, query: FastScanQuery, codes: np.ndarray, norms: np.ndarray, pool, threads: int):
    blocks = codes.shape[0]
    best, windows = np.empty(blocks * BLOCK, np.float32), np.empty(blocks * BLOCK, np.int32)
    bounds = np.linspace(0, blocks, threads + 1).astype(np.int64)

    def run(lo: int, hi: int) -> int:
        return library.fs_score_blocks(ctypes.byref(query.struct), codes.ctypes.data, norms.ctypes.data, lo, hi - lo,
                                       best.ctypes.data, windows.ctypes.data)

    if any(status for status in pool.map(run, bounds[:-1], bounds[1:])):
        raise RuntimeError("fs_score_blocks refused the query")
    return best, windows


def median_ms(run, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:])) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500_000)
    parser.add_argument("--queries", type=int, default=9, help="queries per mask and code (the first untimed)")
    parser.add_argument("--grid", type=int, nargs=2, default=[7, 7])
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--dims", type=int, default=128, help="the shipped index's dimensions")
    parser.add_argument("--codes", nargs="+", default=["32", "64"], help="PQ codes: M or M/K (above)")
    args = parser.parse_args()
    grid, codes_timed = tuple(args.grid), [parse_code(text) for text in args.codes]
    if missing_cpu_flags("avx2"):
        sys.exit("the prototype needs AVX2 and FMA")
    library, threads, rng = build(), 2, np.random.default_rng(0)
    pool = ThreadPoolExecutor(threads)
    cells = grid[0] * grid[1]
    for m, per_sum in codes_timed:  # the prototype against the float64 formula first
        codes = rng.integers(0, 256, size=(3, cells, m // 2, BLOCK), dtype=np.uint8)
        norms = rng.uniform(0, 2, size=(3, cells, BLOCK)).astype(np.float32)
        norms[0, :, 5] = 0  # an all-zero image scores 0
        for mask in two_tier.mask_shapes(grid).values():
            query = random_query(mask, m, rng, per_sum)
            (got, got_windows), (want, want_windows) = (score(library, query, codes, norms, pool, 1),
                                                        reference(query, codes, norms))
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5) or not np.array_equal(got_windows, want_windows):
                sys.exit(f"fast scan disagrees with the formula (M={m}/{per_sum}): largest difference "
                         f"{np.max(np.abs(got - want)):.3g}, windows {np.mean(got_windows != want_windows):.0%} apart")
    blocks = args.images // BLOCK
    n = blocks * BLOCK
    shipped = load_kernel("avx2")
    index = random_index(n, grid, args.channels, args.dims)
    index_norms = rng.uniform(1, 2, size=(n, *grid)).astype(np.float32)
    print(f"CPU: {os.cpu_count()} cores, flags {path_flags()}; load {os.getloadavg()[0]:.2f}; {n:,} images "
          f"{grid[0]}x{grid[1]}x{args.channels}, in RAM, {threads} threads; the shipped kernel's avx2 path, "
          f"{args.dims} dims ({index.codes.nbytes / 1e9:.2f} GB)")
    read_shipped = median_ms(lambda: shipped.read_bytes(index.codes, threads), 5)
    pq = {m: (rng.integers(0, 256, size=(blocks, cells, m // 2, BLOCK), dtype=np.uint8),
              rng.uniform(1, 2, size=(blocks, cells, BLOCK)).astype(np.float32)) for m in {m for m, _ in codes_timed}}
    reads = {m: median_ms(lambda: shipped.read_bytes(codes, threads), 5) for m, (codes, _) in pq.items()}
    print(f"plain read: shipped codes {read_shipped:.1f} ms; " +
          "; ".join(f"M={m} codes ({pq[m][0].nbytes / 1e9:.2f} GB) {reads[m]:.1f} ms" for m in sorted(pq)))
    for name, mask in two_tier.mask_shapes(grid).items():
        region = RegionQuery.from_grid_mask(rng.standard_normal((*grid, args.channels)).astype(np.float32), mask)
        shipped_query = code_query(index, region, shipped.code_chunk_bytes)
        queries = {code: random_query(mask, code[0], rng, code[1]) for code in codes_timed}
        times: dict = {"shipped": [], **{code: [] for code in codes_timed}}
        for q in range(args.queries):
            runs = [("shipped", lambda: shipped.score_codes(shipped_query, index.codes, index_norms, None,
                                                             threads=threads))]
            runs += [(code, lambda code=code: score(library, queries[code], *pq[code[0]], pool, threads))
                     for code in codes_timed]
            for label, run in (runs if q % 2 else runs[::-1]):
                started = time.perf_counter()
                run()
                if q:
                    times[label].append(time.perf_counter() - started)
        base = float(np.median(times["shipped"])) * 1e3
        line = [f"{name:>6}: shipped {base:6.1f} ms ({base / read_shipped:.2f}x its read, "
                f"{base * 1e6 / n:.0f} ns an image)"]
        for m, per_sum in codes_timed:
            elapsed = float(np.median(times[m, per_sum])) * 1e3
            label = f"M={m}" + (f"/{per_sum}" if per_sum > 1 else "")
            line.append(f"{label} {elapsed:6.1f} ms ({elapsed / reads[m]:.2f}x its read, {elapsed / base:.2f}x "
                        "shipped)")
        print(" | ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
