"""The two-tier rerank's rows read while the first stage still runs, by direct asynchronous reads.

A cache larger than RAM has most of its rows on disk, so a rerank of 5,000 of them waits ~90-250 ms for the disk
after the first stage is done. Here the first stage scores its images in parts (`parts`), and after each part the
best `READ_AHEAD_SHARE` of the images scored so far are read, by Linux AIO with `O_DIRECT`, into slots of a
buffer of the process's own: no page cache in between, nothing mapped, and one thread submitting them (io_submit
sleeps while the disk's queue is full, which must not stall the scoring threads). When the rerank comes, nearly
all its rows are there; it reads the rest and the kernel scores the rows where they lie (`vfs_score_placed`).

Measured before building it (`benchmarks/direct_reads.py`, 1M x 7x7x320, cold rows, 2-core Intel AVX-512 VM):
1.27-1.35x faster end to end than reading the shortlist through the memory map after the first stage; the
requests cost the first stage little CPU, where `madvise` read-ahead (tried in earlier sessions) cost as much as
it saved.

Where the OS refuses (not Linux, no AIO, a filesystem without O_DIRECT such as tmpfs) or `VFS_DIRECT_READS=0`,
the search reads through the memory map as before, with one log line saying why.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import math
import mmap
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

from dashboard.region_query import RegionQuery
from dashboard.scoring.base import best_positions

ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of every disk's logical block
PARTS, BLOCK = 8, 4096  # the first stage's parts: each takes every PARTS-th block of BLOCK searched images
READ_AHEAD_SHARE = 0.005  # the share of scored images read ahead: dashboard.two_tier.RERANK_FRACTION
MIN_SEARCHED = 65_536  # fewer searched images: one pass, no read-ahead (their rerank is small anyway)
MIN_SLOTS = 4_000  # rows a reader holds at least (the rerank's minimum of 1,000, with room for misses)
SLOTS_PER_READ = 3  # a reader holds this many times the rows its first stage reads at the end (room for misses)
READERS = 2  # per shard: concurrent searches beyond this many read through the memory map
STALE_S = 60.0  # a first stage's rows not taken by a rerank within this long are given to the next search
QUEUE_DEPTH = 1024
REAP_BATCH, REAP_WAIT_NS = 64, 2_000_000  # completions awaited per wake-up of the reading thread, at most 2 ms
SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}  # io_setup, io_destroy, io_submit, io_getevents
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<u4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])  # struct iocb, linux/aio_abi.h (little-endian)
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])  # struct io_event
_log = logging.getLogger(__name__)


class DirectReadsUnavailable(OSError):
    """This machine or filesystem does not take direct asynchronous reads; the message says why."""


def query_key(query: RegionQuery) -> bytes:
    """Names a query across the first stage and the rerank (also when each reaches a Ray actor as a copy)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (query.features, query.weights, np.array([query.top, query.left, *query.grid])):
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.digest()


def parts(count: int) -> list[np.ndarray]:
    """Positions 0..count-1 in PARTS parts, each every PARTS-th block of BLOCK: each part samples the whole
    range, so a cache sorted by label still shows its best rows in every part."""
    starts = np.arange(0, count, BLOCK)
    return [np.concatenate([np.arange(s, min(s + BLOCK, count)) for s in starts[p::PARTS]] or [np.zeros(0, int)])
            .astype(np.int64) for p in range(PARTS)]


class LikelyRows:
    """Which rows to read as a first stage's parts come in: the best READ_AHEAD_SHARE of the images scored so far
    (the share its rerank will take). The candidates are kept up to that share of all the searched images, not
    of those scored so far, so a row passed over while the share was small is read once it has grown: a cache
    sorted by label holds a query's best rows in few parts (on real features in label order, dropping them had
    left 13-23% of the shortlist to the rerank's own reads). The last part's rows are the whole shortlist."""

    def __init__(self, searched: int) -> None:
        self.final = math.ceil(READ_AHEAD_SHARE * searched)
        self.ids, self.scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
        self.scored = 0

    def add(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The rows worth reading once the part `ids` (with their first-stage `scores`) is scored, best first."""
        self.scored += len(ids)
        if len(self.ids) >= self.final > 0:  # full: only scores reaching its lowest can enter
            entering = scores >= self.scores.min()
            ids, scores = ids[entering], scores[entering]
        self.ids, self.scores = np.concatenate([self.ids, ids]), np.concatenate([self.scores, scores])
        if len(self.ids) > self.final:
            kept = best_positions(self.scores, self.final)
            self.ids, self.scores = self.ids[kept], self.scores[kept]
        best = best_positions(self.scores, math.ceil(READ_AHEAD_SHARE * self.scored))
        return self.ids[best[np.argsort(-self.scores[best], kind="stable")]]  # best first: a full reader keeps them


class RowReads:
    """Rows of an (N, ...) array stored in a .npy file, read by AIO into the slots of one buffer. `request`
    returns at once; `finish` waits for every requested row."""

    def __init__(self, path: Path, data_offset: int, row_bytes: int, rows: int, capacity: int) -> None:
        machine = platform.machine()
        if platform.system() != "Linux" or machine not in SYSCALLS or not hasattr(os, "O_DIRECT"):
            raise DirectReadsUnavailable(f"direct asynchronous reads need Linux on x86-64 or ARM64 "
                                         f"({platform.system()} {machine})")
        self.setup, self.destroy, self.submit, self.getevents = SYSCALLS[machine]
        self.path = path
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            raise DirectReadsUnavailable(f"{path} cannot be opened for direct reads: {exc.strerror}") from None
        self.context = ctypes.c_ulong(0)
        if self.libc.syscall(self.setup, QUEUE_DEPTH, ctypes.byref(self.context)) != 0:
            os.close(self.fd)
            raise DirectReadsUnavailable(f"io_setup failed: {os.strerror(ctypes.get_errno())}")
        self.data_offset, self.row_bytes, self.capacity = data_offset, row_bytes, capacity
        self.slot = -(-(row_bytes + ALIGN) // ALIGN) * ALIGN  # the aligned span around any row fits
        # private: the process's own memory, counted as such (a shared anonymous map is shmem, counted as a file's)
        self.buffer = mmap.mmap(-1, self.slot * capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        self.bytes[::mmap.PAGESIZE] = 0  # faulted in once here, not by every search's reads
        self.iocbs = np.zeros(capacity, IOCB)
        self.events = np.zeros(QUEUE_DEPTH, EVENT)
        self.slot_of = np.full(rows, -1, dtype=np.int64)
        self.ids = np.zeros(capacity, dtype=np.int64)  # slot -> row
        self.shift = np.zeros(capacity, dtype=np.int64)  # where the row starts in its slot
        self.used = self.submitted = self.in_flight = 0
        self.error: OSError | None = None
        self._changed = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._work, daemon=True, name="vfs-row-reads")
        self._worker.start()
        self._probe()

    @property
    def base(self) -> int:
        return self.bytes.ctypes.data

    @property
    def extent(self) -> int:
        return len(self.bytes)

    def _probe(self) -> None:
        """One row read and compared with a plain read: a filesystem that accepts O_DIRECT but fails it (or
        misplaces it) is found here, not in a search."""
        self.request(np.array([0]))
        try:
            self.finish()
        except OSError as exc:
            self.close()
            raise DirectReadsUnavailable(f"a direct read failed: {exc}") from None
        with open(self.path, "rb") as plain:
            plain.seek(self.data_offset)
            expected = plain.read(self.row_bytes)
        got = bytes(self.bytes[self.shift[0]:self.shift[0] + self.row_bytes])
        self.reset()
        if got != expected:
            self.close()
            raise DirectReadsUnavailable("a direct read did not return the file's bytes")

    def reset(self) -> None:
        """Forget the rows held (once their reads are finished): the buffer is free for another search."""
        try:
            self.finish()
        except OSError:
            pass  # a failed read's search has read through the map; the slots are free again either way
        self.slot_of[self.ids[:self.used]] = -1
        self.used = self.submitted = self.in_flight = 0
        self.error = None

    def request(self, ids: np.ndarray) -> bool:
        """Queue reads of the rows `ids` not held yet; False if they do not all fit in the buffer (then the first
        ones in `ids` that fit are queued: list the rows wanted most first)."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[self.slot_of[ids] < 0]
        _, first = np.unique(ids, return_index=True)
        wanted = np.sort(first)  # each row once, in the order asked
        fits = len(wanted) <= self.capacity - self.used
        ids = np.sort(ids[wanted[:self.capacity - self.used]])  # read in file order
        slots = np.arange(self.used, self.used + len(ids))
        offsets = self.data_offset + ids * self.row_bytes
        starts = offsets // ALIGN * ALIGN
        ends = -(-(offsets + self.row_bytes) // ALIGN) * ALIGN
        self.ids[slots], self.shift[slots], self.slot_of[ids] = ids, offsets - starts, slots
        block = np.zeros(len(ids), IOCB)
        block["data"], block["fildes"], block["opcode"] = slots, self.fd, 0  # IOCB_CMD_PREAD
        block["buf"] = self.base + slots * self.slot
        block["nbytes"], block["offset"] = ends - starts, starts
        self.iocbs[slots] = block
        with self._changed:
            self.used += len(ids)
            self._changed.notify_all()
        return fits

    def finish(self) -> None:
        """Return once every requested row is in the buffer; OSError if a read failed."""
        with self._changed:
            while (self.submitted < self.used or self.in_flight) and self.error is None:
                self._changed.wait()
        if self.error is not None:
            raise self.error

    def placed(self, ids: np.ndarray) -> np.ndarray:
        """Where each row of `ids` (all read) starts, in bytes from `base`."""
        slots = self.slot_of[np.asarray(ids, dtype=np.int64)]
        if len(slots) and slots.min() < 0:
            raise KeyError("a row asked for was not read")
        return slots * self.slot + self.shift[slots]

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._worker.join()
        self.libc.syscall(self.destroy, self.context)
        os.close(self.fd)

    def _work(self) -> None:
        while True:
            with self._changed:
                while ((self.submitted == self.used and not self.in_flight) or self.error) and not self._closing:
                    self._changed.wait()
                if self._closing:
                    return
                used = self.used
            try:
                self._step(used)
            except OSError as exc:
                with self._changed:
                    self.error = exc
            with self._changed:
                self._changed.notify_all()

    def _step(self, used: int) -> None:
        """Submit what the queue has room for (this may sleep), then reap at least one completion."""
        room = QUEUE_DEPTH - self.in_flight
        if room > 0 and self.submitted < used:
            batch = np.arange(self.submitted, min(used, self.submitted + room))
            pointers = (self.iocbs.ctypes.data + IOCB.itemsize * batch).astype(np.uint64)
            sent = self.libc.syscall(self.submit, self.context, len(batch), ctypes.c_void_p(pointers.ctypes.data))
            if sent < 0:
                code = ctypes.get_errno()
                if code != errno.EAGAIN:
                    raise OSError(code, f"io_submit: {os.strerror(code)}")
                sent = 0
            with self._changed:
                self.submitted += sent
                self.in_flight += sent
        if not self.in_flight:
            return
        wait = ctypes.c_long * 2  # struct timespec: a batch of completions per wake-up, not one each
        got = self.libc.syscall(self.getevents, self.context, min(self.in_flight, REAP_BATCH), QUEUE_DEPTH,
                                ctypes.c_void_p(self.events.ctypes.data), ctypes.byref(wait(0, REAP_WAIT_NS)))
        if got < 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                return
            raise OSError(code, f"io_getevents: {os.strerror(code)}")
        done = self.events[:got]
        slots = done["data"].astype(np.int64)
        short = done["res"] < self.shift[slots] + self.row_bytes  # negative: an error code
        with self._changed:
            self.in_flight -= got
        if short.any():
            res = int(done["res"][short][0])
            raise OSError(-res if res < 0 else errno.EIO, f"a row read returned {res}")


class ReadAheads:
    """A shard's readers, one per search in flight: each holds one query's rows from its first stage until its
    rerank takes them."""

    def __init__(self, features: np.memmap) -> None:
        self.features = features
        self.unavailable: str | None = None
        self._free: list[RowReads] = []
        self._held: dict[bytes, tuple[RowReads, float]] = {}
        self._made = 0
        self._lock = threading.Lock()

    def begin(self, key: bytes, searched: int) -> RowReads | None:
        """A reader for the first stage of query `key` over `searched` images, or None (unavailable, all busy,
        or the same query already reading)."""
        slots = max(MIN_SLOTS, math.ceil(SLOTS_PER_READ * READ_AHEAD_SHARE * searched))
        with self._lock:
            now = time.monotonic()
            for stale in [k for k, (_, since) in self._held.items() if now - since > STALE_S]:
                self._free.append(self._held.pop(stale)[0])  # its search never reranked (an error, a page left)
            if self.unavailable or key in self._held:
                return None
            reader = next((r for r in self._free if r.capacity >= slots), None)
            if reader is not None:
                self._free.remove(reader)
            elif self._made < READERS or self._free:
                if self._free:  # too small for this search: replaced by a larger one
                    self._free.pop().close()
                    self._made -= 1
                reader = self._new(slots)
                if reader is None:
                    return None
            else:
                return None
            self._held[key] = (reader, now)
        reader.reset()
        return reader

    def take(self, key: bytes) -> RowReads | None:
        """The reader holding query `key`'s rows (the caller gives it back), or None."""
        with self._lock:
            held = self._held.pop(key, None)
        return None if held is None else held[0]

    def give_back(self, reader: RowReads) -> None:
        """Free for the next search; a reader whose read failed is closed instead (its other reads may still
        land in its buffer) and a new one made when needed."""
        with self._lock:
            if reader.error is None:
                self._free.append(reader)
                return
            self._made -= 1
        reader.close()

    def _new(self, slots: int) -> RowReads | None:
        try:
            reader = RowReads(Path(self.features.filename), self.features.offset, self.features[0].nbytes,
                              len(self.features), slots)
        except DirectReadsUnavailable as exc:
            self.unavailable = str(exc)
            _log.warning("two-tier reranks read through the memory map: %s", exc)
            return None
        self._made += 1
        return reader
