"""The build's writer thread (cache_builder/pipeline.py): order, back-pressure, and errors that reach the main
thread without letting a later batch commit past a failed one."""

from __future__ import annotations

import threading
import time

import pytest

from cache_builder.build import default_workers
from cache_builder.pipeline import BackgroundWriter


def test_jobs_run_in_order_on_another_thread():
    done, threads = [], set()
    with BackgroundWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(lambda i=i: (done.append(i), threads.add(threading.get_ident())))
    assert done == list(range(20)) and threading.get_ident() not in threads


def test_submit_waits_while_depth_jobs_are_pending():
    gate = threading.Event()
    writer = BackgroundWriter(depth=1)
    writer.submit(gate.wait)  # running
    writer.submit(lambda: None)  # queued: the queue is now full
    blocked = threading.Thread(target=writer.submit, args=(lambda: None,))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive()  # the main thread cannot run ahead by more than `depth` batches
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()
    writer.close()


class DiskFull(OSError):
    pass


def test_an_error_reaches_the_main_thread_and_no_later_job_runs():
    ran = []

    def fail():
        raise DiskFull(28, "No space left on device")

    writer = BackgroundWriter(depth=4)
    writer.submit(lambda: ran.append(1))
    writer.submit(fail)
    writer.submit(lambda: ran.append(3))  # queued behind the failure: must never commit
    with pytest.raises(DiskFull):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            writer.submit(lambda: ran.append("late"))
            time.sleep(0.01)
        writer.close()
    writer.close()  # the error was reported once; closing again is quiet
    assert ran == [1]


def test_a_main_thread_error_lets_queued_writes_finish_and_keeps_its_own_type():
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(depth=4) as writer:
            for i in range(3):
                writer.submit(lambda i=i: (time.sleep(0.05), ran.append(i)))
            raise KeyboardInterrupt
    assert ran == [0, 1, 2]  # committed batches stay committed, in order


def test_default_workers_leave_one_core_to_the_model(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert default_workers() == 7
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_workers() == 1
