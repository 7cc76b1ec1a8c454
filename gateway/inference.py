"""One scan's model inference: the model input through a backend, into its outputs.

A per-slice (2.5D) model's input is split into batches of `batch_size` slices with up to
`max_in_flight` requests outstanding (Triton batches them across replicas); a whole-scan
model's is one request. With streaming (gateway/streaming.py) most slices were inferred while
files arrived and only the rest is inferred here. Every answer is checked against the shapes
the model's contract gives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from ctjoint.contracts import CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.gateway.backends.base import InferenceBackend, ModelInfo, ModelOutputs
from ctjoint.gateway.errors import BackendError
from ctjoint.gateway.intake import Progress, ProgressCallback
from ctjoint.gateway.streaming import StreamingInference, StreamStats
from ctjoint.gateway.tasks import task_group

logger = logging.getLogger(__name__)


class ScanInference:
    """Runs one model on one scan's input (see the module docstring)."""

    def __init__(self, backend: InferenceBackend, *, batch_size: int, max_in_flight: int) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight

    async def timed(
        self,
        info: ModelInfo,
        image: np.ndarray,
        slices: int,
        progress: ProgressCallback | None,
        streamer: StreamingInference | None = None,
        order: Sequence[int] = (),
    ) -> tuple[ModelOutputs, float, StreamStats | None, dict[int, np.ndarray | None]]:
        """Outputs for the whole volume, the inference time, what streaming reused, and the
        label maps it made (by slice, None: no lesion).

        Without streaming the time is the wall time of the batches; with it, the wall time
        during which a request was outstanding (they overlapped the upload).
        """
        if streamer is None:
            started = time.perf_counter()
            outputs = await self.run(info, image, slices, progress)
            return outputs, (time.perf_counter() - started) * 1000.0, None, {}
        outputs, stream, labels = await streamer.finish(
            order,
            image,
            # `image` may be a strided view (`context_view`): each request gets its own copy.
            lambda rest: self.run(info, np.ascontiguousarray(rest), rest.shape[0], None),
        )
        check_outputs(info, outputs, slices)
        if progress is not None:
            progress(Progress("inferred", slices, slices))
        logger.info(
            "streamed inference: %d of %d slices reused, %d inferred after the last file, "
            "%d streamed in all",
            stream.reused,
            slices,
            stream.inferred_at_end,
            stream.streamed,
        )
        return outputs, stream.infer_busy_ms, stream, labels

    async def run(
        self, info: ModelInfo, image: np.ndarray, slices: int, progress: ProgressCallback | None
    ) -> ModelOutputs:
        """The model's outputs for `image` (`slices` source slices), with "inferred" progress."""
        if not info.plan.preprocessor().per_slice:
            # One sample is the whole scan: one request.
            outputs = await self.backend.infer(info.name, image)
            check_outputs(info, outputs, image.shape[0])
            if progress is not None:
                progress(Progress("inferred", slices, slices))
            return outputs
        total = image.shape[0]
        starts = list(range(0, total, self.batch_size))
        results: list[ModelOutputs | None] = [None] * len(starts)
        gate = asyncio.Semaphore(self.max_in_flight)
        done = 0

        async def run(i: int, start: int) -> None:
            nonlocal done
            batch = image[start : start + self.batch_size]
            async with gate:
                outputs = await self.backend.infer(info.name, batch)
            check_outputs(info, outputs, batch.shape[0])
            results[i] = outputs
            done += batch.shape[0]
            if progress is not None:
                progress(Progress("inferred", done, total))

        async with task_group() as tasks:
            for i, start in enumerate(starts):
                tasks.create_task(run(i, start))
        parts = [r for r in results if r is not None]
        return ModelOutputs(
            seg_logits=np.concatenate([p.seg_logits for p in parts]),
            cls_logits=np.concatenate([p.cls_logits for p in parts]),
            model_ms=sum(p.model_ms for p in parts),
            cam=(
                np.concatenate([p.cam for p in parts if p.cam is not None])
                if all(p.cam is not None for p in parts)
                else None
            ),
        )


def check_outputs(info: ModelInfo, outputs: ModelOutputs, batch: int) -> None:
    """BackendError unless the outputs have the shapes the model's contract gives a batch."""
    seg_shape = (batch, len(SEG_CLASS_NAMES), *info.plan.preprocessor().grid())
    cls_shape = (batch, len(CLASS_NAMES))
    if outputs.seg_logits.shape != seg_shape or outputs.cls_logits.shape != cls_shape:
        raise BackendError(
            f"model {info.name!r} returned seg_logits {list(outputs.seg_logits.shape)} and "
            f"cls_logits {list(outputs.cls_logits.shape)}, expected {list(seg_shape)} and "
            f"{list(cls_shape)}"
        )


def inferred_progress(
    progress: ProgressCallback | None, expected: int | None
) -> Callable[[int], None] | None:
    """Streamed stacks inferred so far as "inferred" progress (capped at the expected count:
    a stack can be inferred twice when a later file lands between its slices)."""
    if progress is None:
        return None
    report = progress

    def inferred(done: int) -> None:
        report(Progress("inferred", min(done, expected) if expected else done, expected))

    return inferred


__all__ = ["ScanInference", "check_outputs", "inferred_progress"]
