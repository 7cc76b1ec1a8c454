"""2.5D inference while a series is still arriving: each slice's stack is inferred as soon as
its neighbours along the normal look final, and the results are reused after assembly.

A 2.5D sample is a slice with `context` neighbours on each side. Until the last file, a
neighbour is only a guess (a later file can land between two slices), so every streamed result
is keyed by the arrival slots of the slices its stack was built from. After the series has been
validated and sorted, `finish` reuses each result whose key matches the final order and infers
only the rest; the outputs are therefore those of the whole-volume path, whatever the arrival
order (in order nearly everything is reused, shuffled some work is repeated).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ctjoint.contracts import SEG_CLASS_NAMES
from ctjoint.gateway.backends.base import InferenceBackend, ModelInfo, ModelOutputs
from ctjoint.gateway.limits import cpu_bound
from ctjoint.gateway.memory import hand_back
from ctjoint.gateway.series import DUPLICATE_POSITION_MM, SPACING_RELATIVE_TOLERANCE

# `finish` hands freed memory back every this many slices copied (gateway/memory.py).
_HAND_BACK_EVERY = 64

logger = logging.getLogger(__name__)

# Below this many ready stacks an idle backend still waits for more, so an in-process model
# is not run one slice at a time; a full `batch_size` always goes at once.
MIN_STREAM_BATCH = 4

# The arrival slots a 2.5D stack was built from, in stack order.
StackKey = tuple[int, ...]
# Seg logits of a batch [n, K, h, w] -> each slice's source-grid label map, None without lesions.
SliceLabels = Callable[[np.ndarray], list[np.ndarray | None]]


@dataclass(frozen=True)
class StreamStats:
    """What streaming achieved for one scan (logged, and checked by tests)."""

    streamed: int  # stacks inferred while files were arriving
    reused: int  # of those, stacks whose slices were still neighbours in the final order
    inferred_at_end: int  # stacks inferred after the series was complete
    infer_busy_ms: float  # wall time with at least one inference request outstanding
    model_ms: float  # time inside the model, summed over every request (wasted ones too)


class StreamingInference:
    """Feeds a 2.5D model slice by slice; not shared between scans.

    `add` is called on the event loop once a slice has been validated and preprocessed
    in-plane (`planes[slot]`, [H, W] float32). `finish` returns the outputs in the final slice
    order; `cancel` stops streamed work when the scan fails. `check` validates each batch's
    outputs; `on_inferred` hears how many stacks have been inferred so far.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        info: ModelInfo,
        planes: Sequence[np.ndarray],
        *,
        batch_size: int,
        max_in_flight: int,
        expected_slices: int | None = None,
        check: Callable[[ModelInfo, ModelOutputs, int], None] | None = None,
        on_inferred: Callable[[int], None] | None = None,
        slice_labels: SliceLabels | None = None,
    ) -> None:
        if not info.plan.preprocessor().per_slice:
            raise ValueError(f"streaming inference is for per-slice models, not {info.plan.kind}")
        self._backend = backend
        self._info = info
        self._context = info.plan.context
        self._planes = planes
        self._batch_size = batch_size
        self._gate_size = max_in_flight
        self._expected = expected_slices
        self._check = check
        self._on_inferred = on_inferred
        # Label maps of streamed stacks, made off the loop while the series still arrives.
        self._slice_labels = slice_labels
        self._labels: dict[StackKey, np.ndarray | None] = {}
        self._label_tasks: set[asyncio.Task[None]] = set()
        # Slices so far, sorted along the normal: distances and their arrival slots.
        self._distances: list[float] = []
        self._slots: list[int] = []
        self._min_gap = float("inf")
        self._queued: set[StackKey] = set()
        self._pending: list[StackKey] = []
        # Seg logits (None once the stack is labelled), class logits and CAM by stack.
        self._results: dict[StackKey, tuple[np.ndarray | None, np.ndarray, np.ndarray | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._model_ms = 0.0
        self._busy_ms = 0.0
        self._busy_since: float | None = None
        self._streamed = 0

    # --- while files arrive ------------------------------------------------------------------

    def add(self, slot: int, distance: float) -> None:
        """A slice at `distance` along the normal is ready; submit stacks that look final.

        Raises the error of a failed streamed request, so a backend failure ends the scan at
        the next file rather than after the last one.
        """
        if self._error is not None:
            raise self._error
        index = bisect.bisect(self._distances, distance)
        self._distances.insert(index, distance)
        self._slots.insert(index, slot)
        for neighbour in (index - 1, index + 1):
            if 0 <= neighbour < len(self._distances):
                gap = abs(self._distances[neighbour] - distance)
                if gap >= DUPLICATE_POSITION_MM:
                    self._min_gap = min(self._min_gap, gap)
        complete = self._expected is not None and len(self._slots) >= self._expected
        if complete:
            # Every file announced has arrived: this order is final unless validation fails.
            candidates: Sequence[int] = range(len(self._slots))
        else:
            candidates = range(index - self._context, index + self._context + 1)
        for i in candidates:
            key = self._final_looking_key(i, complete)
            if key is not None and key not in self._queued:
                self._queued.add(key)
                self._pending.append(key)
        self._pump(flush=complete)

    def _final_looking_key(self, i: int, complete: bool) -> StackKey | None:
        """The stack key of sorted position `i` if its neighbours are probably final: every gap
        within the stack is the smallest spacing seen (a uniform series has no room for another
        slice there). Edge stacks wait for the series to be complete."""
        n = len(self._slots)
        if not 0 <= i < n:
            return None
        c = self._context
        if complete:
            return tuple(self._slots[min(max(j, 0), n - 1)] for j in range(i - c, i + c + 1))
        if i - c < 0 or i + c >= n or not np.isfinite(self._min_gap):
            return None
        limit = self._min_gap * (1.0 + SPACING_RELATIVE_TOLERANCE)
        window = self._distances[i - c : i + c + 1]
        if any(
            b - a > limit or b - a < DUPLICATE_POSITION_MM for a, b in itertools.pairwise(window)
        ):
            return None
        return tuple(self._slots[i - c : i + c + 1])

    def _pump(self, *, flush: bool = False) -> None:
        """Start requests while there is room: full batches always, a small one (at least
        MIN_STREAM_BATCH, or anything when flushing) when the backend would otherwise idle."""
        while self._pending and len(self._tasks) < self._gate_size:
            enough = len(self._pending) >= self._batch_size
            idle = not self._tasks and len(self._pending) >= min(MIN_STREAM_BATCH, self._batch_size)
            if not (enough or idle or flush):
                return
            keys = self._pending[: self._batch_size]
            del self._pending[: len(keys)]
            task = asyncio.ensure_future(self._run(keys))
            if not self._tasks:
                self._busy_since = time.perf_counter()
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _stack(self, keys: Sequence[StackKey]) -> np.ndarray:
        planes = self._planes
        return np.stack([np.stack([planes[s] for s in key]) for key in keys])

    async def _run(self, keys: list[StackKey]) -> None:
        batch = self._stack(keys)
        outputs = await self._backend.infer(self._info.name, batch)
        if self._check is not None:
            self._check(self._info, outputs, len(keys))
        self._model_ms += outputs.model_ms
        for i, key in enumerate(keys):
            cam = None if outputs.cam is None else outputs.cam[i]
            self._results[key] = (outputs.seg_logits[i], outputs.cls_logits[i], cam)
        self._streamed += len(keys)
        if self._on_inferred is not None:
            self._on_inferred(self._streamed)
        if self._slice_labels is not None:
            # Not part of this request's task: the next request need not wait for it.
            task = asyncio.ensure_future(self._label(self._slice_labels, keys, outputs.seg_logits))
            self._label_tasks.add(task)
            task.add_done_callback(self._label_done)

    async def _label(
        self, slice_labels: SliceLabels, keys: list[StackKey], seg_logits: np.ndarray
    ) -> None:
        labels = await cpu_bound(slice_labels, seg_logits)
        self._labels.update(zip(keys, labels, strict=True))
        # A labelled stack's seg logits are done with: the label map is made from the labels
        # (79 MB of logits at 400 slices need not wait for the last file).
        for key in keys:
            result = self._results.get(key)
            if result is not None:
                self._results[key] = (None, result[1], result[2])

    def _label_done(self, task: asyncio.Task[None]) -> None:
        """A failed labelling fails the scan like a failed request (never lost silently)."""
        self._label_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks and self._busy_since is not None:
            self._busy_ms += (time.perf_counter() - self._busy_since) * 1000.0
            self._busy_since = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            if self._error is None:
                self._error = error
            return
        if self._error is None:
            self._pump()

    # --- once the series is complete ---------------------------------------------------------

    async def finish(
        self,
        sorted_slots: Sequence[int],
        image: np.ndarray,
        infer_rest: Callable[[np.ndarray], Awaitable[ModelOutputs]],
    ) -> tuple[ModelOutputs, StreamStats, dict[int, np.ndarray | None]]:
        """Outputs for the final order `sorted_slots` (the series' slots sorted along the
        normal); `image` is the whole-volume model input, of which the stacks no streamed
        result matches are inferred with `infer_rest`. Also the label maps made while
        streaming, by final position (None: no lesion), for the positions that have one."""
        # Stacks still queued are not sent on their own: whichever the final order still needs
        # go with the rest, in full batches.
        self._pending.clear()
        while self._tasks or self._label_tasks:
            await asyncio.gather(*self._tasks, *self._label_tasks, return_exceptions=True)
        if self._error is not None:
            raise self._error
        n, c = len(sorted_slots), self._context
        keys = [
            tuple(sorted_slots[min(max(j, 0), n - 1)] for j in range(i - c, i + c + 1))
            for i in range(n)
        ]
        missing = [i for i, key in enumerate(keys) if key not in self._results]
        rest: ModelOutputs | None = None
        if missing:
            started = time.perf_counter()
            rest = await infer_rest(image[missing])
            self._busy_ms += (time.perf_counter() - started) * 1000.0
            self._model_ms += rest.model_ms
        position = {i: k for k, i in enumerate(missing)}
        # Copied into the outputs one slice at a time, each streamed result dropped after its
        # last use: a batch's arrays go once their slices are copied, instead of every batch
        # staying beside a stacked copy (79 MB of seg logits at 400 slices).
        last = {key: i for i, key in enumerate(keys)}
        # Zeros where a slice's label map is known already (its logits were dropped): nothing
        # reads those rows (`Preprocessor.to_source`), and their pages are never touched.
        seg = np.zeros(
            (n, len(SEG_CLASS_NAMES), *self._info.plan.preprocessor().grid()), dtype=np.float32
        )
        cls: np.ndarray | None = None
        cam: np.ndarray | None = None
        every_cam = True
        for i, key in enumerate(keys):
            k = position.get(i)
            s: np.ndarray | None
            if k is None or rest is None:
                s, c_, m = self._results[key]
                if last[key] == i:
                    del self._results[key]
            else:
                s, c_ = rest.seg_logits[k], rest.cls_logits[k]
                m = None if rest.cam is None else rest.cam[k]
            if cls is None:
                cls = np.empty((n, *c_.shape), dtype=c_.dtype)
                if m is not None:
                    cam = np.empty((n, *m.shape), dtype=m.dtype)
            if s is not None:
                seg[i] = s
            cls[i] = c_
            if m is None:
                every_cam = False
            elif cam is not None:
                cam[i] = m
            if i % _HAND_BACK_EVERY == _HAND_BACK_EVERY - 1:
                # The batches copied so far are free: handed back now, not after the copy.
                hand_back()
        if cls is None:
            raise RuntimeError("a streamed scan finished without a slice")
        outputs = ModelOutputs(
            seg_logits=seg,
            cls_logits=cls,
            model_ms=self._model_ms,
            cam=cam if every_cam else None,
        )
        stats = StreamStats(
            streamed=self._streamed,
            reused=n - len(missing),
            inferred_at_end=len(missing),
            infer_busy_ms=self._busy_ms,
            model_ms=self._model_ms,
        )
        labels = {i: self._labels[key] for i, key in enumerate(keys) if key in self._labels}
        self._results.clear()
        self._labels.clear()
        return outputs, stats, labels

    async def cancel(self) -> None:
        """Stop streamed requests (the scan failed or was cancelled) and wait for them.
        Labelling batches are waited for, not cancelled: each runs in a worker thread that a
        cancelled task would leave running, holding what it reads (the intake's grid) after
        the scan has moved on; they take milliseconds."""
        self._pending.clear()
        for task in self._tasks:
            task.cancel()
        tasks = [*self._tasks, *self._label_tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._results.clear()
        self._labels.clear()


__all__ = ["MIN_STREAM_BATCH", "StreamStats", "StreamingInference"]
