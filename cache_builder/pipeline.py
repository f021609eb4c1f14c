"""A writer thread that lets the model's next batch run while the last one is written.

The build's main thread feeds the model; encoding, row writes, JPEG files, flushes and the state file go to one
`BackgroundWriter`, which runs them in submission order, one at a time, so the state file still says a batch is
done only after its rows are on disk (the resume guarantee). At most `depth` batches wait, bounding memory. An
error on the writer (a full disk, an interrupting progress callback) is raised in the main thread at its next
`submit` or at `close`, with its own type, so the CLI reports it as before.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

Job = Callable[[], None]


class BackgroundWriter:
    def __init__(self, depth: int = 2) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None  # not yet raised in the main thread
        self._failed = False  # for good: no job after a failed one may run (it would commit past a hole)
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if not self._failed:  # after a failure, later batches are dropped: they were never committed
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread, whatever it is
                    self._failed, self._error = True, exc

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Job) -> None:
        """Queue `job` (waits while `depth` jobs are pending); raises the error of an earlier job, if any."""
        self._raise_pending()
        self._jobs.put(job)

    def close(self) -> None:
        """Finish every queued job, stop the thread, and raise the first error any job met."""
        self._jobs.put(None)
        self._thread.join()
        self._raise_pending()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # the main thread failed (Ctrl-C, a model error): let committed writes finish, keep its error
            self.close()
        except BaseException:  # noqa: BLE001 - the main thread's error is the one to report
            pass
