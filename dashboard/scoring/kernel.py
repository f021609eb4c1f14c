"""The native search kernel: `kernel.c`, compiled once per machine with the system C compiler, via ctypes.

Why native code: a query reads every byte of the (memory-mapped) cache once, so the search is as fast as the
memory bus allows only if one pass does everything. The kernel scores each image straight from the memory map
(no gathered copies for filtered searches, no temporaries) and computes only the products the windows use,
with AVX512-BF16 dot products where the CPU has them. `dashboard.scoring` falls back to its torch path where
no compiler is found (``engine_status()`` says why).

The compiled library is kept in ``$VFS_KERNEL_DIR`` (default ``~/.cache/visual-feature-search/kernels``),
named by a hash of the source, the compiler and the CPU, so a changed source or another machine sharing the
folder gets its own build. Compiling takes about a second, once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_builder import cache_format as fmt
from dashboard import settings
from dashboard.scoring.base import check_ids

SOURCE = Path(__file__).with_name("kernel.c")
# The instruction paths of kernel.c, best first: the CPU flags each needs and the compiler flags that select it.
# Every path the CPU supports can be built and forced (VFS_SEARCH_BACKEND), so an AVX-512 machine tests and
# benchmarks the AVX2 path too.
PATHS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "avx512-bf16": (("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx2", "fma"),
                    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mavx2", "-mfma"]),
    "avx2": (("avx2", "fma"), ["-mavx2", "-mfma"]),
    "neon": (("asimd",), []),  # 64-bit ARM (Graviton, Apple): built like the portable path, without VFS_GENERIC
    "portable": ((), ["-DVFS_GENERIC"]),
}
VARIANTS = tuple(PATHS)
ISA_NAMES = {2: "avx512-bf16", 1: "avx2+fma", 3: "neon", 0: "portable float32"}
FLAG_SETS = (["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])  # the portable path's, best first
MIN_IMAGES_PER_THREAD = 256


class KernelUnavailable(RuntimeError):
    """No C compiler, or the kernel did not build here; the message says which."""


class _Query(ctypes.Structure):
    _fields_ = [
        ("grid_h", ctypes.c_int32), ("grid_w", ctypes.c_int32), ("channels", ctypes.c_int32),
        ("out_h", ctypes.c_int32), ("out_w", ctypes.c_int32),
        ("n_terms", ctypes.c_int32), ("term_offsets", ctypes.c_void_p), ("term_lengths", ctypes.c_void_p),
        ("term_starts", ctypes.c_void_p), ("term_bits", ctypes.c_void_p),
        ("n_cells", ctypes.c_int32), ("cell_offsets", ctypes.c_void_p), ("cell_weights", ctypes.c_void_p),
        ("cell_vectors", ctypes.c_void_p), ("query_norm", ctypes.c_float),
        ("n_runs", ctypes.c_int32), ("run_values", ctypes.c_void_p),
        ("code_values", ctypes.c_void_p), ("numerator_scale", ctypes.c_float), ("numerator_offset", ctypes.c_float),
    ]


@dataclass(frozen=True)
class KernelQuery:
    """A region query laid out for the kernel; holds the arrays the C struct points into."""

    grid: tuple[int, int]
    channels: int
    out_h: int
    out_w: int
    term_offsets: np.ndarray  # (T,) int32: first position of each run of cells
    term_lengths: np.ndarray  # (T,) int32: values in each run
    term_starts: np.ndarray  # (T,) int64: where each run starts in term_bits
    term_bits: np.ndarray  # uint16: bfloat16 of weight^2 * query per run, then remainders where inexact
    cell_offsets: np.ndarray  # (K,) int32
    cell_weights: np.ndarray  # (K,) float32 weight^2
    cell_vectors: np.ndarray  # (K, C) float32 weight^2 * cell
    query_norm: float
    n_runs: int  # the first n_runs terms are the runs, the rest their bfloat16 remainders
    run_values: np.ndarray  # float32 weight^2 * query of the runs, each 16-value chunk as 8 even, 8 odd values
    code_values: np.ndarray | None = None  # int8 runs in the path's chunk order, for 4-bit codes (`for_codes`)
    numerator_scale: float = 1.0
    numerator_offset: float = 0.0

    @classmethod
    def build(cls, features: np.ndarray, weights: np.ndarray, grid: tuple[int, int], norm: float) -> "KernelQuery":
        """`features` (h, w, C) and `weights` (h, w): the query cropped to its box on a `grid` feature map.

        The numerator's terms are runs of cells that are contiguous in the cache's (H, W, C) layout: each mask
        row's span (a whole-width box: one run for the whole box), so the kernel compares long stretches of
        memory at once instead of cell by cell. A soft weight that makes a bfloat16 term inexact adds a second
        run with the remainder, keeping the numerator float32-exact.
        """
        h, w, channels = features.shape
        weights_sq = weights.astype(np.float32) ** 2
        rows, cols = np.nonzero(weights_sq > 0)
        vectors = np.ascontiguousarray(weights_sq[..., None] * features, dtype=np.float32)  # (h, w, C)
        runs: list[list[int]] = []  # [first position, cells] per run, positions on the full grid
        run_values: list[np.ndarray] = []
        for i in np.unique(rows):
            first, last = cols[rows == i].min(), cols[rows == i].max()
            start, cells = int(i * grid[1] + first), int(last - first + 1)
            values = vectors[i, first:last + 1].reshape(-1)
            if runs and runs[-1][0] + runs[-1][1] == start:  # continues the previous row's run in memory
                runs[-1][1] += cells
                run_values[-1] = np.concatenate([run_values[-1], values])
            else:
                runs.append([start, cells])
                run_values.append(values)
        high = [fmt.to_bfloat16_bits(v) for v in run_values]
        low = [fmt.to_bfloat16_bits(v - fmt.from_bfloat16_bits(hi)) for v, hi in zip(run_values, high)]
        inexact = [k for k, lo in enumerate(low) if bool(fmt.from_bfloat16_bits(lo).any())]
        order = list(range(len(runs))) + inexact
        parts = high + [low[k] for k in inexact]
        lengths = np.array([len(p) for p in parts], dtype=np.int32)
        return cls(
            grid=tuple(grid), channels=channels, out_h=grid[0] - h + 1, out_w=grid[1] - w + 1,
            term_offsets=np.array([runs[k][0] for k in order], dtype=np.int32),
            term_lengths=lengths,
            term_starts=np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]).astype(np.int64),
            term_bits=np.ascontiguousarray(np.concatenate(parts)),
            cell_offsets=(rows * grid[1] + cols).astype(np.int32),
            cell_weights=np.ascontiguousarray(weights_sq[rows, cols]),
            cell_vectors=np.ascontiguousarray(vectors[rows, cols]), query_norm=float(norm),
            n_runs=len(runs), run_values=np.concatenate([_even_odd(v) for v in run_values]).astype(np.float32),
        )

    @classmethod
    def for_codes(cls, features: np.ndarray, weights: np.ndarray, grid: tuple[int, int], norm: float,
                  means_share: float, chunk_bytes: int) -> "KernelQuery":
        """A first-stage query over 4-bit codes (`vfs_score_codes`): `features` is the projected query times each
        dimension's step, so that a window's numerator on the codes' values is
            sum of weight^2 * features * (nibble - 7.5)  +  means_share
        with means_share the query's dot product with the quantiser's means. The runs' values are quantised to
        int8 with one scale (127 for the largest), so every path computes the same integer dot product with the
        nibbles; numerator_scale and numerator_offset undo the scale and add the centring and the means. Each run's
        values are laid out in the order the kernel's path reads them, `chunk_bytes` packed bytes at a time
        (`SearchKernel.code_chunk_bytes`)."""
        if features.shape[2] % fmt.CODE_GROUP:
            raise ValueError(f"a query over codes has a multiple of {fmt.CODE_GROUP} values per cell")
        query = cls.build(features, weights, grid, norm)
        values = np.concatenate([_chunk_order(_natural(query.run_values[start:start + length]), chunk_bytes)
                                 for start, length in zip(query.term_starts[:query.n_runs],
                                                          query.term_lengths[:query.n_runs])])
        largest = float(np.abs(values).max()) if len(values) else 0.0
        scale = 127.0 / largest if largest > 0 else 1.0
        code_values = np.clip(np.rint(values * scale), -127, 127).astype(np.int8)
        offset = means_share - 7.5 * float(code_values.astype(np.int64).sum()) / scale
        return dataclasses.replace(query, code_values=code_values, numerator_scale=1.0 / scale,
                                   numerator_offset=offset)

    @property
    def windows(self) -> int:
        return self.out_h * self.out_w

    def struct(self) -> _Query:
        return _Query(
            self.grid[0], self.grid[1], self.channels, self.out_h, self.out_w,
            len(self.term_offsets), self.term_offsets.ctypes.data, self.term_lengths.ctypes.data,
            self.term_starts.ctypes.data, self.term_bits.ctypes.data,
            len(self.cell_offsets), self.cell_offsets.ctypes.data, self.cell_weights.ctypes.data,
            self.cell_vectors.ctypes.data, self.query_norm, self.n_runs, self.run_values.ctypes.data,
            None if self.code_values is None else self.code_values.ctypes.data, self.numerator_scale,
            self.numerator_offset,
        )


def _chunk_order(values: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """A run's values in the order a path reads packed codes: per chunk of `chunk_bytes` bytes (the last may be
    shorter), the values of its 16-byte groups' low nibbles (16 a group), then those of their high nibbles."""
    groups = values.reshape(-1, 2, fmt.CODE_GROUP // 2)  # per group: low-nibble values, high-nibble values
    per_chunk = max(1, chunk_bytes // (fmt.CODE_GROUP // 2))
    return np.concatenate([groups[g:g + per_chunk].transpose(1, 0, 2).reshape(-1)
                           for g in range(0, len(groups), per_chunk)])


def _natural(values: np.ndarray) -> np.ndarray:
    """`_even_odd` undone."""
    whole = len(values) // 16 * 16
    chunks = values[:whole].reshape(-1, 2, 8).transpose(0, 2, 1).reshape(-1)
    return np.concatenate([chunks, values[whole:]])


def _even_odd(values: np.ndarray) -> np.ndarray:
    """Each whole 16-value chunk reordered as its 8 even-indexed then 8 odd-indexed values (the tail as is).

    The AVX2 path loads 16 stored bfloat16 values as 8 32-bit lanes: the even ones are the low halves (a shift
    makes them float32), the odd ones the high halves (a mask does). Multiplying those by query values in the
    same order gives the same dot product with no shuffle at all.
    """
    whole = len(values) // 16 * 16
    chunks = values[:whole].reshape(-1, 8, 2).transpose(0, 2, 1).reshape(-1)
    return np.concatenate([chunks, values[whole:]])


class SearchKernel:
    """The loaded library. `score` is thread-safe and releases the GIL while it runs."""

    def __init__(self, library: ctypes.CDLL, path: Path, variant: str):
        self.path, self.variant = path, variant
        self._score = library.vfs_score_images
        self._score.restype = ctypes.c_int
        self._score.argtypes = [ctypes.POINTER(_Query), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        library.vfs_isa.restype = ctypes.c_int
        self.isa = ISA_NAMES[library.vfs_isa()]
        self._score_codes = library.vfs_score_codes
        self._score_codes.restype = ctypes.c_int
        self._score_codes.argtypes = [ctypes.POINTER(_Query), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p]
        self._score_placed = library.vfs_score_placed
        self._score_placed.restype = ctypes.c_int
        self._score_placed.argtypes = [ctypes.POINTER(_Query), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_void_p]
        library.vfs_code_chunk_bytes.restype = ctypes.c_int
        self.code_chunk_bytes = library.vfs_code_chunk_bytes()  # how this path lays out a query over codes
        self._read = library.vfs_read_bytes
        self._read.restype = ctypes.c_uint64
        self._read.argtypes = [ctypes.c_void_p, ctypes.c_int64]

    def read_bytes(self, array: np.ndarray, threads: int | None = None) -> int:
        """Read every byte of a C-contiguous array once, split over threads as `score` splits images: the
        streaming-read yardstick of the benchmarks. Returns a checksum."""
        if not array.flags.c_contiguous:
            raise ValueError("read_bytes needs a C-contiguous array")
        base, lines = array.ctypes.data, -(-array.nbytes // 64)  # split on 64-byte lines, the last one maybe short

        def read(lo: int, hi: int) -> int:
            start, stop = 64 * lo, min(64 * hi, array.nbytes)
            return self._read(base + start, stop - start)

        checksum = 0
        for value in _in_parts(lines, threads or torch.get_num_threads(), read):
            checksum ^= value
        return checksum

    def score(self, query: KernelQuery, features: torch.Tensor, sqnorms: np.ndarray, ids: np.ndarray | None,
              with_all: bool = False, threads: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Best score and window of each image in `ids` (all when None); every window's score if `with_all`.

        `features` (N, H, W, C) bfloat16 and `sqnorms` (N, H, W) float32 must be C-contiguous (a memmap is).
        Extra memory: the outputs, 8 bytes per image (plus 4 per window with `with_all`), and nothing else.
        """
        _check_inputs(query, features, sqnorms)
        rows = features.data_ptr()

        def call(struct, lo, count, ids_at, scores_at, windows_at, every_at):
            return self._score(struct, rows, sqnorms.ctypes.data, ids_at, 0 if ids_at else lo, count, scores_at,
                               windows_at, every_at)

        return self._run(query, features.shape[0], ids, with_all, threads, call)

    def score_placed(self, query: KernelQuery, base: int, placed: np.ndarray, extent: int, sqnorms: np.ndarray,
                     ids: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`score` of rows that lie at `base + placed[i]` (a buffer of `extent` bytes, e.g. a reader's), each a
        whole bfloat16 image of the query's grid, with the norms of `sqnorms[ids[i]]`."""
        placed = np.ascontiguousarray(placed, dtype=np.int64)
        row_bytes = 2 * math.prod(query.grid) * query.channels
        if len(placed) != len(ids):
            raise ValueError("one placed row per id")
        if len(placed) and (placed.min() < 0 or placed.max() + row_bytes > extent or (placed % 2).any()):
            raise ValueError("placed rows must lie, 2-byte aligned, within the buffer")
        _check_sqnorms(query, sqnorms.shape[0], sqnorms)

        def call(struct, lo, count, ids_at, scores_at, windows_at, every_at):
            return self._score_placed(struct, base, placed.ctypes.data + 8 * lo, sqnorms.ctypes.data, ids_at, count,
                                      scores_at, windows_at, every_at)

        scores, windows, _ = self._run(query, sqnorms.shape[0], ids, False, threads, call)
        return scores, windows

    def score_codes(self, query: KernelQuery, codes: np.ndarray, sqnorms: np.ndarray, ids: np.ndarray | None,
                    with_all: bool = False, threads: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray | None]:
        """`score` over 4-bit first-stage codes (N, H, W, C / 2) uint8 (`cache_format.pack_codes`), with a query
        from `KernelQuery.for_codes` (`dashboard.scoring.score_codes`)."""
        return self._run(query, codes.shape[0], ids, with_all, threads, self._codes_call(query, codes, sqnorms))

    def score_codes_in_parts(self, query: KernelQuery, codes: np.ndarray, sqnorms: np.ndarray,
                             parts: list[np.ndarray], threads: int | None = None):
        """`score_codes` of each id array in `parts`, yielded part by part in order as (scores, windows). Every
        part's slices are queued on the pool at once, so the cores go on scoring the next parts while the caller
        works on a finished one (no pause at each part's end for the slowest slice)."""
        call = self._codes_call(query, codes, sqnorms)
        pending = [self._start(query, codes.shape[0], ids, False, threads, call) for ids in parts]
        for started in pending:
            scores, windows, _ = started.result()
            yield scores, windows

    def _codes_call(self, query: KernelQuery, codes: np.ndarray, sqnorms: np.ndarray):
        if query.code_values is None:
            raise ValueError("a query over codes is built with KernelQuery.for_codes")
        shape = (*query.grid, query.channels // 2)
        if codes.dtype != np.uint8 or tuple(codes.shape[1:]) != shape or not codes.flags.c_contiguous:
            raise ValueError(f"codes must be a contiguous (N, {shape[0]}, {shape[1]}, {shape[2]}) uint8 array")
        _check_sqnorms(query, codes.shape[0], sqnorms)

        def call(struct, lo, count, ids_at, scores_at, windows_at, every_at):
            return self._score_codes(struct, codes.ctypes.data, sqnorms.ctypes.data, ids_at, 0 if ids_at else lo,
                                     count, scores_at, windows_at, every_at)

        return call

    def _run(self, query: KernelQuery, n_total: int, ids: np.ndarray | None, with_all: bool, threads: int | None,
             call) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The images split over the shared pool, each slice one native call writing into the outputs."""
        return self._start(query, n_total, ids, with_all, threads, call, queued=False).result()

    def _start(self, query: KernelQuery, n_total: int, ids: np.ndarray | None, with_all: bool,
               threads: int | None, call, queued: bool = True) -> "_Started":
        """`_run`'s slices begun (on the pool; `queued=False` runs a single slice in this thread instead)."""
        if ids is not None:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            check_ids(ids, n_total)
        count = n_total if ids is None else len(ids)
        scores = np.empty(count, dtype=np.float32)
        windows = np.empty(count, dtype=np.int32)
        every = np.empty((count, query.windows), dtype=np.float32) if with_all else None
        struct = query.struct()
        threads = max(1, min(threads or torch.get_num_threads(), count // MIN_IMAGES_PER_THREAD))

        def run(lo: int, hi: int) -> int:
            return call(ctypes.byref(struct), lo, hi - lo,
                        None if ids is None else ids.ctypes.data + 8 * lo,
                        scores.ctypes.data + 4 * lo, windows.ctypes.data + 4 * lo,
                        None if every is None else every.ctypes.data + 4 * lo * query.windows)

        # struct and ids stay referenced by `run` (and so by the futures) until every slice has returned
        return _Started((scores, windows, every), _in_parts(count, threads, run, wait=not queued))


class _Started:
    """A kernel call's outputs and the pool's work on them; `result` waits for every slice."""

    def __init__(self, outputs: tuple, slices: list) -> None:
        self.outputs, self.slices = outputs, slices

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        done = [part.result() if isinstance(part, Future) else part for part in self.slices]
        if any(done):
            raise MemoryError("the search kernel could not allocate its per-call scratch memory")
        return self.outputs


def _check_inputs(query: KernelQuery, features: torch.Tensor, sqnorms: np.ndarray) -> None:
    """The kernel trusts its pointers: everything it will read is checked here."""
    shape = (*query.grid, query.channels)
    if features.dtype != torch.bfloat16 or tuple(features.shape[1:]) != shape or not features.is_contiguous():
        raise ValueError(f"features must be a contiguous (N, {shape[0]}, {shape[1]}, {shape[2]}) bfloat16 tensor")
    _check_sqnorms(query, features.shape[0], sqnorms)


def _check_sqnorms(query: KernelQuery, n: int, sqnorms: np.ndarray) -> None:
    if sqnorms.dtype != np.float32 or sqnorms.shape != (n, *query.grid) or not sqnorms.flags.c_contiguous:
        raise ValueError(f"sqnorms must be a contiguous (N, {query.grid[0]}, {query.grid[1]}) float32 array")


def _in_parts(count: int, threads: int, run, wait: bool = True) -> list:
    """`run(lo, hi)` over `threads` equal slices of range(count), on the shared pool (a single slice in this
    thread); their results. With `wait=False`, every slice goes to the pool and their futures are returned."""
    threads = max(1, threads)
    bounds = np.linspace(0, count, threads + 1).astype(np.int64)
    slices = [(int(bounds[k]), int(bounds[k + 1])) for k in range(threads)]
    if threads == 1 and wait:
        return [run(*slices[0])]
    futures = [_pool().submit(run, *part) for part in slices]
    return [future.result() for future in futures] if wait else futures


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One pool per process: concurrent searches share the cores instead of oversubscribing them."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="vfs-search")
        return _POOL


# ---------------------------------------------------------------------------------------------- building

_LOADED: dict[str, SearchKernel | KernelUnavailable] = {}
_LOAD_LOCK = threading.Lock()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (x86 `flags`, ARM `Features`; empty without /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def path_flags() -> str:
    """The flags of this CPU that decide the kernel's paths, as the benchmarks print them beside every figure."""
    return " ".join(sorted(cpu_flags() & {flag for needed, _ in PATHS.values() for flag in needed}))


def missing_cpu_flags(variant: str) -> list[str]:
    return [flag for flag in PATHS[variant][0] if flag not in cpu_flags()]


def best_variant() -> str:
    """The fastest path this CPU runs (its build may still fail: `load_kernel` says)."""
    return next(v for v in VARIANTS if not missing_cpu_flags(v))


def load_kernel(variant: str = "portable") -> SearchKernel:
    """The compiled kernel (built on first use); raises KernelUnavailable, once per process, if it cannot be."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    missing = missing_cpu_flags(variant)
    if missing:
        raise KernelUnavailable(f"this CPU lacks {', '.join(missing)} for the {variant} path")
    with _LOAD_LOCK:
        if variant not in _LOADED:
            try:
                path = _build(variant)
                _LOADED[variant] = SearchKernel(ctypes.CDLL(str(path)), path, variant)
            except KernelUnavailable as exc:
                _LOADED[variant] = exc
        found = _LOADED[variant]
    if isinstance(found, KernelUnavailable):
        raise found
    return found


def _compiler() -> str:
    for name in (settings.current().compiler, "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable("no C compiler found (install gcc or clang, or set CC)")


def _machine_key() -> str:
    """What a -march=native build depends on: the CPU's model and feature flags."""
    key = platform.machine() + platform.system()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features", "CPU part")):
                key += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        key += platform.processor()
    return key


def _kernel_dir() -> Path:
    return settings.current().kernel_dir


def _folders() -> tuple[Path, Path]:
    """The kernel folder, then a private temporary one for where it cannot be written (a read-only home)."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return _kernel_dir(), Path(tempfile.gettempdir()) / f"vfs-kernels-{user}"


def _writable_folder() -> Path:
    for folder in _folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise KernelUnavailable(f"no writable folder for the compiled kernel (set VFS_KERNEL_DIR; tried {_kernel_dir()})")


def _build(variant: str) -> Path:
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"{compiler} --version failed: {exc}") from None
    extra = PATHS[variant][1]
    flag_sets = FLAG_SETS if variant in ("portable", "neon") else [["-O3", "-mtune=native"], ["-O3"]]
    digest = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), _machine_key().encode(),
                                        " ".join(extra).encode()])).hexdigest()[:16]
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    name = f"search_kernel-{variant}-{digest}{suffix}"
    for folder in _folders():
        if (folder / name).is_file():
            return folder / name
    target = _writable_folder() / name
    errors = []
    for flags in flag_sets:  # tuned for this machine where the compiler knows how, else plainer
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        command = [compiler, *flags, "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", *extra, str(SOURCE),
                   "-o", str(partial), "-lm"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(command)}: {exc}")
            continue
        if done.returncode == 0:
            os.replace(partial, target)  # atomic: concurrent builders each publish a whole file
            return target
        partial.unlink(missing_ok=True)
        errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise KernelUnavailable(f"the search kernel did not compile with {compiler}: " + "; ".join(errors))
