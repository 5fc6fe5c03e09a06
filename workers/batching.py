"""Worker threads that work at the same time share calls: one encoder call (:class:`MicroBatcher`)
and one index write (:class:`GroupWriter`)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sized
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item", bound=Sized)


class _Grouper(Generic[Item]):
    """One background thread that serves concurrent callers in groups.

    The first waiting submission opens a group; more join for up to ``max_wait_s`` (0: only those
    already queued) while the group stays within ``max_size`` (``len`` of each submission; one
    that would overflow opens the next group). :meth:`_run` handles a group and settles each
    submission's future; :meth:`_submit` blocks until its own is settled.
    """

    def __init__(self, max_size: int, max_wait_s: float, thread_name: str):
        self._max_size = max(1, int(max_size))
        self._max_wait_s = max(0.0, float(max_wait_s))
        self._queue: queue.Queue[tuple[Item, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._thread.start()

    def _submit(self, item: Item) -> Any:
        future: Future = Future()
        self._queue.put((item, future))
        return future.result()

    def close(self) -> None:
        """Stop the thread (after the group in hand)."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        pending: tuple[Item, Future] | None = None
        while True:
            first = pending or self._queue.get()
            pending = None
            if first is None:
                return
            group, size = [first], len(first[0])
            while size < self._max_size:
                try:
                    entry = (
                        self._queue.get(timeout=self._max_wait_s)
                        if self._max_wait_s
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if entry is None:
                    self._queue.put(None)
                    break
                if size + len(entry[0]) > self._max_size:
                    pending = entry
                    break
                group.append(entry)
                size += len(entry[0])
            self._run(group)

    def _run(self, group: list[tuple[Item, Future]]) -> None:
        raise NotImplementedError


class MicroBatcher(_Grouper[np.ndarray]):
    """Collects ``(n, ...)`` inputs from many threads into batches of at most ``max_batch`` rows.

    The first waiting input opens a batch; more are added for up to ``max_wait_s`` or until the
    batch is full. One background thread runs ``fn`` on the concatenation and hands each caller
    its rows back.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float):
        self._fn = fn
        super().__init__(max_batch, max_wait_s, "encoder-batcher")

    def submit(self, inputs: np.ndarray) -> np.ndarray:
        """Embed ``inputs`` (blocking) as part of whatever batch forms."""
        outputs: np.ndarray = self._submit(inputs)
        return outputs

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


class GroupWriter(_Grouper[list[T]]):
    """Concurrent writers share one write (a group commit): each :meth:`submit` blocks until the
    write that carries its items is done, and raises what that write raised.

    One background thread takes the first waiting list and the lists queued behind it (up to
    ``max_items`` items), and makes one ``write`` call of them all. While a write is under way the
    next group forms, so under load there are fewer, larger writes (for the index: one flush each);
    alone, a list is written at once. When a group's write fails, each list is written again on its
    own, so a writer gets only its own failure.
    """

    def __init__(self, write: Callable[[list[T]], None], max_items: int):
        self._write = write
        super().__init__(max_items, 0.0, "group-writer")

    def submit(self, items: list[T]) -> None:
        """Write ``items`` (blocking) as part of whatever group forms."""
        self._submit(items)

    def _run(self, group: list[tuple[list[T], Future]]) -> None:
        try:
            self._write([entry for items, _ in group for entry in items])
        except BaseException as exc:  # noqa: BLE001 - handed to the writers, below
            if len(group) == 1:
                group[0][1].set_exception(exc)
            else:  # each writer on its own, so that one's bad items fail only that writer
                for items, future in group:
                    self._write_alone(items, future)
            return
        for _, future in group:
            future.set_result(None)

    def _write_alone(self, items: list[T], future: Future) -> None:
        try:
            self._write(items)
        except BaseException as exc:  # noqa: BLE001 - the writer's own failure, handed to it
            future.set_exception(exc)
        else:
            future.set_result(None)
