"""One worker thread owns the model; requests reach it through a bounded queue.

A client's newer request supersedes its older ones still waiting: those are dropped when the
worker reaches them, never computed. A full queue refuses at once (``QueueFull``), so a burst of
clients gets fast "busy" answers instead of an unbounded backlog.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

CLIENTS_REMEMBERED = 10_000  # the newest request number of this many clients (least recent forgotten)


class QueueFull(Exception):
    """The queue holds its maximum of waiting requests."""


class Superseded(Exception):
    """The same client sent a newer request before this one was computed."""


@dataclass
class _Job:
    client: str
    number: int
    request: Any
    future: Future


class LensWorker:
    """Runs ``compute(request)`` for each submitted request, one at a time, on one thread."""

    def __init__(self, compute: Callable[[Any], Any], queue_size: int = 8) -> None:
        self._compute = compute
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._latest: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lens-worker", daemon=True)
        self._thread.start()

    def submit(self, client: str, request: Any) -> Future:
        """Queues ``request`` as ``client``'s newest; its future holds the result, or raises
        ``Superseded`` (a newer request of the client came first) or the computation's error.
        ``QueueFull`` if the queue is full."""
        future: Future = Future()
        with self._lock:
            number = self._latest.get(client, 0) + 1
            try:
                self._queue.put_nowait(_Job(client, number, request, future))
            except queue.Full:
                raise QueueFull from None  # a refused request supersedes nothing
            self._latest.pop(client, None)
            self._latest[client] = number
            while len(self._latest) > CLIENTS_REMEMBERED:
                self._latest.popitem(last=False)
        return future

    def _superseded(self, job: _Job) -> bool:
        with self._lock:
            return self._latest.get(job.client, job.number) != job.number

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._superseded(job):
                job.future.set_exception(Superseded())
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self._compute(job.request))
            except BaseException as error:  # the worker outlives every request
                job.future.set_exception(error)

    @property
    def waiting(self) -> int:
        """Requests in the queue (not counting the one being computed)."""
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> bool:
        """Stops after the request being computed (waiting ones are cancelled); True if the
        thread ended within ``timeout`` seconds."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
