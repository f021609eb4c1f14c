"""A rerank design measured before building it: the likely candidates' rows read with asynchronous O_DIRECT
requests (Linux AIO: a batch of reads per system call, straight into the process's own buffer, no page cache)
issued while the first stage still runs, against today's two-tier search, side by side in one process.

    .venv/bin/python benchmarks/direct_reads.py                     # scale.py's 1M x 7x7x320 cache
    .venv/bin/python benchmarks/direct_reads.py --images 200000     # a smaller cache, same measurements

Today (A, `dashboard.two_tier.approx_top`): the first stage over every image, then the rerank reads the 0.5%
shortlist's rows through a memory map (`madvise` requests from a thread while the kernel scores). A previous
session measured `madvise` read-ahead during the first stage and found that the requests cost the first stage
about what they saved (README, "Tried, measured, not kept").

The design (B, in this file only; the search does not use it): the first stage scores the images in 8 parts
(each every 8th block of 4,096 images, so every part samples the whole cache); after each part, the best
`0.5% x images scored so far` not yet requested are queued, and a thread submits them by AIO (io_submit sleeps
while the disk's queue is full: submitted from the scoring thread, the requests cost the first stage ~80 ms a
query) into slots of a buffer allocated once; at the end the shortlist's missing rows are requested, the reads
awaited, the rows copied into one array (what a kernel entry taking each row's address would avoid) and scored
exactly. B's top-10 must equal A's (both exact). Phases of B: `scoring` the first stage's kernel calls,
`requests` queueing the reads, `first stage` both and the running shortlist, `wait` for the last reads.

Before every query the features are dropped from the page cache, as in scale.py. Linux only (AIO and O_DIRECT);
the cache's filesystem must take O_DIRECT reads (ext4, xfs; not tmpfs).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import mmap
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import CONFIGS, drop_from_page_cache, ensure_cache, ensure_index, query_set  # noqa: E402

from dashboard import scoring, shards, two_tier  # noqa: E402
from dashboard.scoring.kernel import path_flags  # noqa: E402

ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of every disk's logical block
PARTS, BLOCK = 8, 4096
SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}  # io_setup, io_destroy, io_submit, io_getevents
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<u4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])  # struct iocb, linux/aio_abi.h
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])  # struct io_event


class AsyncRowReads:
    """Rows of a (N, ...) array in a .npy file read by AIO into slots of one buffer; `request` returns at once."""

    def __init__(self, path: Path, data_offset: int, row_bytes: int, rows: int, capacity: int,
                 queue_depth: int = 1024) -> None:
        self.setup, self.destroy, self.submit, self.getevents = SYSCALLS[platform.machine()]
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.data_offset, self.row_bytes, self.capacity, self.depth = data_offset, row_bytes, capacity, queue_depth
        self.slot = -(-(row_bytes + ALIGN) // ALIGN) * ALIGN  # the aligned span around any row fits
        self.buffer = mmap.mmap(-1, self.slot * capacity)
        self.buffer.write(b"\0" * len(self.buffer))  # faulted in once, not by every query's reads
        self.bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        self.context = ctypes.c_ulong(0)
        if self.libc.syscall(self.setup, queue_depth, ctypes.byref(self.context)) != 0:
            raise OSError(ctypes.get_errno(), "io_setup failed")
        self.iocbs = np.zeros(capacity, IOCB)
        self.events = np.zeros(queue_depth, EVENT)
        self.slot_of = np.full(rows, -1, dtype=np.int64)
        self.ids = np.zeros(capacity, dtype=np.int64)  # slot -> row
        self.shift = np.zeros(capacity, dtype=np.int64)  # where the row starts in its slot
        self.used = self.submitted = self.in_flight = 0
        self._error: OSError | None = None
        self._changed = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._work, daemon=True)  # io_submit blocks when the disk's
        self._worker.start()                                              # queue is full: never the caller

    def reset(self) -> None:
        """Forget the previous query's rows (call once its reads are finished)."""
        self.slot_of[self.ids[:self.used]] = -1
        self.used = self.submitted = self.in_flight = 0
        self._error = None

    def request(self, ids: np.ndarray) -> None:
        """Queue reads of the rows of `ids` not requested yet; returns at once (a thread submits them)."""
        ids = np.unique(ids)
        ids = ids[self.slot_of[ids] < 0][:self.capacity - self.used]
        slots = np.arange(self.used, self.used + len(ids))
        offsets = self.data_offset + ids * self.row_bytes
        starts = offsets // ALIGN * ALIGN
        ends = -(-(offsets + self.row_bytes) // ALIGN) * ALIGN
        self.ids[slots], self.shift[slots], self.slot_of[ids] = ids, offsets - starts, slots
        block = self.iocbs[slots]
        block["data"], block["fildes"], block["opcode"] = slots, self.fd, 0  # IOCB_CMD_PREAD
        block["buf"] = self.bytes.ctypes.data + slots * self.slot
        block["nbytes"], block["offset"] = ends - starts, starts
        self.iocbs[slots] = block
        with self._changed:
            self.used += len(ids)
            self._changed.notify_all()

    def finish(self) -> None:
        """Return once every requested row is in the buffer."""
        with self._changed:
            while self.submitted < self.used or self.in_flight:
                self._changed.wait()
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            with self._changed:
                while self.submitted == self.used and not self.in_flight and not self._closing:
                    self._changed.wait()
                if self._closing:
                    return
                used = self.used
            try:
                self._step(used)
            except OSError as exc:
                self._error, self.submitted, self.in_flight = exc, used, 0
            with self._changed:
                self._changed.notify_all()

    def _step(self, used: int) -> None:
        """Submit what the queue has room for (this may block), then reap at least one completion."""
        room = self.depth - self.in_flight
        if room > 0 and self.submitted < used:
            batch = np.arange(self.submitted, min(used, self.submitted + room))
            pointers = (self.iocbs.ctypes.data + 64 * batch).astype(np.uint64)
            sent = self.libc.syscall(self.submit, self.context, len(batch), ctypes.c_void_p(pointers.ctypes.data))
            if sent < 0:
                raise OSError(ctypes.get_errno(), "io_submit failed")
            with self._changed:
                self.submitted += sent
                self.in_flight += sent
        if not self.in_flight:
            return
        got = self.libc.syscall(self.getevents, self.context, 1, self.depth,
                                ctypes.c_void_p(self.events.ctypes.data), None)
        if got < 0:
            raise OSError(ctypes.get_errno(), "io_getevents failed")
        done = self.events[:got]
        short = done["res"] < self.shift[done["data"].astype(np.int64)] + self.row_bytes
        if short.any():
            raise OSError(f"a row read came back short ({int(done['res'][short][0])} bytes)")
        with self._changed:
            self.in_flight -= got

    def rows(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The rows of `ids` (all requested) in order, copied into `out` (C-contiguous, at least len(ids) rows)."""
        self.finish()
        slots = self.slot_of[ids]
        flat = out.reshape(len(out), -1).view(np.uint8)
        for shift in np.unique(self.shift[slots]):  # one strided view of the slots per offset within a block
            picked = np.flatnonzero(self.shift[slots] == shift)
            view = np.lib.stride_tricks.as_strided(self.bytes[shift:], shape=(self.capacity, self.row_bytes),
                                                   strides=(self.slot, 1), writeable=False)
            flat[picked] = view[slots[picked]]
        return out[:len(ids)]

    def close(self) -> None:
        self.finish()
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._worker.join()
        self.libc.syscall(self.destroy, self.context)
        os.close(self.fd)


def parts_of(n: int) -> list[np.ndarray]:
    starts = np.arange(0, n, BLOCK)
    return [np.concatenate([np.arange(s, min(s + BLOCK, n)) for s in starts[p::PARTS]]) for p in range(PARTS)]


def overlapped(cache, query, depth: int, reads: AsyncRowReads, parts: list[np.ndarray], out: np.ndarray):
    """Design B: (top ids, phase times, rows read ahead that the shortlist used)."""
    timer, times = time.perf_counter(), {}
    reads.reset()
    share = depth / cache.size
    ids, scores, scored = [], [], 0
    pool_ids, pool_scores = np.zeros(0, np.int64), np.zeros(0, np.float32)  # the best so far
    times["scoring"] = times["requests"] = 0.0
    for part in parts:
        started = time.perf_counter()
        found = two_tier.first_stage_scores(cache, query, part)
        times["scoring"] += time.perf_counter() - started
        ids.append(found.ids)
        scores.append(found.scores)
        scored += len(found.ids)
        pool_ids, pool_scores = np.concatenate([pool_ids, found.ids]), np.concatenate([pool_scores, found.scores])
        likely = min(len(pool_ids), math.ceil(share * scored))
        best = np.argpartition(-pool_scores, likely - 1)[:likely]
        pool_ids, pool_scores = pool_ids[best], pool_scores[best]
        started = time.perf_counter()
        reads.request(pool_ids)
        times["requests"] += time.perf_counter() - started
    every_id, every_score = np.concatenate(ids), np.concatenate(scores)
    first = scoring.WindowScores(every_id, every_score, np.zeros(len(every_id), np.int64), 1)
    shortlist = two_tier.shortlist(first, depth)
    ahead = int((reads.slot_of[shortlist] >= 0).sum())
    times["first stage"] = mark = time.perf_counter() - timer
    reads.request(shortlist)
    reads.finish()
    times["wait"] = time.perf_counter() - timer - mark
    rows = reads.rows(shortlist, out)
    times["copy"] = time.perf_counter() - timer - mark - times["wait"]
    features = shards.tensor_view(rows).view(torch.bfloat16)
    exact = scoring.score_windows(features, np.ascontiguousarray(cache.sqnorms[shortlist]), query)
    times["score"] = time.perf_counter() - timer - mark - times["wait"] - times["copy"]
    top = shortlist[np.lexsort((shortlist, -exact.scores))[:10]]
    return top, times, ahead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, help="images in the cache instead of 1M")
    parser.add_argument("--queries", type=int, default=6, help="timed queries per mask size and design")
    args = parser.parse_args()
    grid, n, dims = CONFIGS["7x7x320"]
    n = args.images or n
    cache = ensure_cache("7x7x320", grid, n, dims)
    ensure_index(cache, dims)
    depth = two_tier.rerank_depth(n, 10)
    features = cache.features_bits
    print(f"CPU: {os.cpu_count()} cores, flags {path_flags()}; engine {scoring.engine_status()}; "
          f"load {os.getloadavg()[0]:.2f}; {n:,} images, rerank depth {depth:,}", flush=True)
    reads = AsyncRowReads(Path(features.filename), features.offset, features[0].nbytes, n, 2 * depth)
    out = np.zeros((depth, *features.shape[1:]), dtype=np.uint16)
    parts = parts_of(n)
    path = cache.path / "features.npy"
    queries = query_set(cache)
    for mask in two_tier.mask_shapes(cache.grid):
        chosen = [q for name, _, q in queries if name == mask][:args.queries + 1]
        times: dict[str, list[float]] = {"A": [], "B": []}
        phases: dict[str, list[float]] = {}
        agree, ahead = [], []
        for k, query in enumerate(chosen):
            tops = {}
            for design in ("A", "B") if k % 2 else ("B", "A"):  # alternating which goes first
                drop_from_page_cache(path)
                started = time.perf_counter()
                if design == "A":
                    tops[design] = two_tier.approx_top(cache, query, None, depth, 10)
                else:
                    tops[design], phase, used = overlapped(cache, query, depth, reads, parts, out)
                elapsed = time.perf_counter() - started
                shards.finish_unmapping()
                if k == 0:
                    continue  # one warm-up query per mask
                times[design].append(elapsed)
                if design == "B":
                    for name, value in phase.items():
                        phases.setdefault(name, []).append(value)
                    ahead.append(used / depth)
            if k:
                agree.append(bool(np.array_equal(tops["A"], tops["B"])))
        a, b = np.median(times["A"]) * 1e3, np.median(times["B"]) * 1e3
        split = ", ".join(f"{name} {np.median(v) * 1e3:.0f}" for name, v in phases.items())
        print(f"{mask:>6}: A {a:4.0f} ms | B {b:4.0f} ms ({split} ms) | A/B {a / b:.2f}x | shortlist read ahead "
              f"{np.mean(ahead):.1%} | same top-10 {sum(agree)}/{len(agree)}", flush=True)
    reads.close()
    cache.metadata.close()


if __name__ == "__main__":
    main()
