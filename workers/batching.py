"""Worker threads that work at the same time share calls: one encoder call (:class:`MicroBatcher`)
and one index write (:class:`GroupWriter`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")


class MicroBatcher:
    """Collects ``(n, ...)`` inputs from many threads into batches of at most ``max_batch`` rows.

    The first waiting input opens a batch; more are added for up to ``max_wait_s`` or until the
    batch is full. One background thread runs ``fn`` on the concatenation and hands each caller
    its rows back.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float):
        self._fn = fn
        self._max_batch = max(1, int(max_batch))
        self._max_wait_s = max(0.0, float(max_wait_s))
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="encoder-batcher", daemon=True)
        self._thread.start()

    def submit(self, inputs: np.ndarray) -> np.ndarray:
        """Embed ``inputs`` (blocking) as part of whatever batch forms."""
        future: Future = Future()
        self._queue.put((inputs, future))
        return future.result()

    def close(self) -> None:
        """Stop the batching thread (after the batch in hand)."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        pending: tuple[np.ndarray, Future] | None = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if first is None:
                return
            group, rows = [first], len(first[0])
            while rows < self._max_batch:
                try:
                    item = (
                        self._queue.get(timeout=self._max_wait_s)
                        if self._max_wait_s
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                if rows + len(item[0]) > self._max_batch:
                    pending = item
                    break
                group.append(item)
                rows += len(item[0])
            self._run(group)

    def _run(self, group: list[tuple[np.ndarray, Future]]) -> None:
        try:
            outputs = self._fn(np.concatenate([inputs for inputs, _ in group], axis=0))
        except BaseException as exc:  # noqa: BLE001 - hand the failure to every caller of this batch
            for _, future in group:
                future.set_exception(exc)
            return
        start = 0
        for inputs, future in group:
            future.set_result(outputs[start : start + len(inputs)])
            start += len(inputs)


class GroupWriter(Generic[T]):
    """Concurrent writers share one write (a group commit): each :meth:`submit` blocks until the
    write that carries its items is done, and raises what that write raised.

    One background thread takes the first waiting list and every list queued behind it (up to
    ``max_items``), and makes one ``write`` call of them all. While a write is under way the next
    group forms, so under load there are fewer, larger writes (for the index: one flush each);
    alone, a list is written at once. When a group's write fails, each list is written again on its
    own, so a writer gets only its own failure.
    """

    def __init__(self, write: Callable[[list[T]], None], max_items: int):
        self._write = write
        self._max_items = max(1, int(max_items))
        self._queue: queue.Queue[tuple[list[T], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="group-writer", daemon=True)
        self._thread.start()

    def submit(self, items: list[T]) -> None:
        """Write ``items`` (blocking) as part of whatever group forms."""
        future: Future = Future()
        self._queue.put((items, future))
        future.result()

    def close(self) -> None:
        """Stop the writing thread (after the group in hand)."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            group, count = [first], len(first[0])
            while count < self._max_items:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                group.append(item)
                count += len(item[0])
            try:
                self._write([entry for items, _ in group for entry in items])
            except BaseException as exc:  # noqa: BLE001 - handed to the writers, below
                if len(group) == 1:
                    group[0][1].set_exception(exc)
                else:  # each writer on its own, so that one's bad items fail only that writer
                    for items, future in group:
                        self._write_alone(items, future)
                continue
            for _, future in group:
                future.set_result(None)

    def _write_alone(self, items: list[T], future: Future) -> None:
        try:
            self._write(items)
        except BaseException as exc:  # noqa: BLE001 - the writer's own failure, handed to it
            future.set_exception(exc)
        else:
            future.set_result(None)
