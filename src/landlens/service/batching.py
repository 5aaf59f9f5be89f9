"""A micro-batcher: concurrent embedding requests share one forward pass.

Requests arrive one image at a time (one HTTP upload each). :class:`MicroBatcher` runs one
background thread that takes the first waiting request, then keeps collecting for at most
``max_wait`` seconds or until ``max_batch`` items are waiting, and calls the batch function
once with all of them (``archive.embed(images)``). Each request gets a
:class:`concurrent.futures.Future` holding its own row of the result; an exception in the
batch function is set on every future of that batch. Under light load a request waits at
most ``max_wait`` (a few milliseconds); under heavy load the model runs on full batches,
which costs far less per image than one forward pass per request, and the model is loaded
once and only ever used from this one thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_STOP = object()


class BatcherClosed(RuntimeError):
    """A request submitted to (or still waiting in) a batcher that was closed."""


class MicroBatcher(Generic[T]):
    """Collects items from many threads and processes them in batches on one thread.

    Args:
        fn: the batch function: a list of items -> a sequence (or array) with one result per
            item, in order.
        max_batch: most items per call of ``fn``.
        max_wait: longest time (seconds) the first item of a batch waits for more.
        name: name of the worker thread.

    Attributes:
        batches: number of calls of ``fn`` so far.
        items: number of items processed so far.
        largest_batch: largest batch so far.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[Any]], *, max_batch: int = 16, max_wait: float = 0.005,
                 name: str = "landlens-batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.batches = 0
        self.items = 0
        self.largest_batch = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def submit(self, item: T) -> Future:
        """Queue one item; the future's result is its row of ``fn``'s output.

        Raises:
            BatcherClosed: the batcher was closed.
        """
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("the embedding batcher is shut down")
            self._queue.put((item, fut))
        return fut

    def __call__(self, item: T, timeout: float | None = None) -> Any:
        """Submit one item and wait for its result (blocking)."""
        return self.submit(item).result(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker: requests already queued are still processed, later ones refused.

        Idempotent. Waits up to ``timeout`` seconds for the worker thread to finish.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> "MicroBatcher[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ worker

    def _collect(self, first: Any) -> tuple[list[tuple[T, Future]], bool]:
        """The batch started by ``first`` and whether the stop marker was seen."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _process(self, batch: list[tuple[T, Future]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            out = self.fn([item for item, _ in live])
            if len(out) != len(live):
                raise RuntimeError(f"batch function returned {len(out)} results for {len(live)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            for _, fut in live:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.items += len(live)
        self.largest_batch = max(self.largest_batch, len(live))
        for (_, fut), row in zip(live, out):
            fut.set_result(row)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            self._process(batch)
        # Drain what was queued before close() (close() puts _STOP after every accepted item).
        rest: list[tuple[T, Future]] = []
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is not _STOP:
                rest.append(nxt)
        for start in range(0, len(rest), self.max_batch):
            self._process(rest[start:start + self.max_batch])


__all__ = ["BatcherClosed", "MicroBatcher"]
