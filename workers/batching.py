"""A micro-batcher: worker threads that embed at the same time share one encoder call."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

logger = logging.getLogger(__name__)


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
