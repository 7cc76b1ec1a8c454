"""The ctjoint.v1 ScanService: DICOM files streamed in, a scan result (and progress) out.

Knows only the `InferenceBackend` interface, never which backend it has. Each file is checked
against the limits and validated as it arrives (by the shared analysis pipeline), so a bad
file ends the scan at once. Errors are raised as the project's exceptions; the interceptor
turns them into status codes.

Size: one job, the servicer's RPCs (receive, admit, analyse, answer); the receiving loop with
its limits and deadlines is most of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc.aio

from ctjoint.contracts import ADMITTED_METADATA, MODEL_BOTH, MODEL_NAMES
from ctjoint.gateway.analysis import Progress, ScanAnalyzer
from ctjoint.gateway.answer import ScanAnswer, ScanOrder, analyze_scan
from ctjoint.gateway.backends.base import InferenceBackend
from ctjoint.gateway.comparison_merge import PriorMatch, merge_comparison
from ctjoint.gateway.deadlines import set_deadline
from ctjoint.gateway.dicom_io import describe_source
from ctjoint.gateway.dicom_outputs import OutputSettings, ScanObjects
from ctjoint.gateway.errors import (
    BackendUnavailableError,
    EmptySeriesError,
    InputError,
    LimitExceededError,
    ModelNotFoundError,
)
from ctjoint.gateway.interceptors import adopt_request_id, note_model
from ctjoint.gateway.limits import GatewayLimits, ScanSlots
from ctjoint.gateway.memory import ScanMemory, scan_memory
from ctjoint.gateway.metrics import GatewayMetrics
from ctjoint.gateway.pacs import Destination, PacsPusher
from ctjoint.gateway.prior import PriorFinder, PriorKeys
from ctjoint.gateway.scan_workers import ScanWorkerPool
from ctjoint.gateway.wire import model_info_to_proto
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

log = logging.getLogger(__name__)

STAGE_BY_NAME: Final = {
    "received": scan_pb2.Progress.STAGE_RECEIVED,
    "validated": scan_pb2.Progress.STAGE_VALIDATED,
    "preprocessed": scan_pb2.Progress.STAGE_PREPROCESSED,
    "inferred": scan_pb2.Progress.STAGE_INFERRED,
    "postprocessed": scan_pb2.Progress.STAGE_POSTPROCESSED,
}

Emit = Callable[[str, int, int | None], None]


class ScanServicer(scan_pb2_grpc.ScanServiceServicer):
    """AnalyzeScan, AnalyzeScanWithProgress and GetModelInfo on one backend."""

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        limits: GatewayLimits,
        metrics: GatewayMetrics,
        default_model: str,
        analyzer: ScanAnalyzer | None = None,
        pacs: Destination | None = None,
        dicom_outputs: OutputSettings | None = None,
        slots: ScanSlots | None = None,
        workers: ScanWorkerPool | None = None,
        prior_deadline_s: float | None = None,
    ) -> None:
        self._backend = backend
        self._analyzer = analyzer if analyzer is not None else ScanAnalyzer(backend, streaming=True)
        self._limits = limits
        # Shared with the interceptor, which refuses most excess scans before they get here.
        self._slots = slots if slots is not None else ScanSlots(limits.max_concurrent_scans)
        # Where scans are analysed: worker processes (gateway/scan_workers.py), or in this
        # process with `analyzer` when None (a gateway given a backend object).
        self._workers = workers
        self._metrics = metrics
        self._default_model = default_model
        self._pacs = pacs
        self._dicom_outputs = dicom_outputs if dicom_outputs is not None else OutputSettings()
        # Pushes run on the pusher's own threads; it bounds how long an answer waits for one.
        self._pusher = PacsPusher(pacs, registry=metrics.registry) if pacs is not None else None
        # The prior analysis is looked up in the same PACS, beside the analysis, each look-up
        # bounded by its own deadline (gateway/prior.py); None or 0: no look-up.
        self._prior = (
            PriorFinder(pacs, deadline_s=prior_deadline_s, registry=metrics.registry)
            if pacs is not None and prior_deadline_s
            else None
        )

    def close(self) -> None:
        """Take no more PACS pushes (the server has stopped taking scans)."""
        if self._pusher is not None:
            self._pusher.close()
        if self._prior is not None:
            self._prior.close()

    # --- RPCs --------------------------------------------------------------------------------

    async def AnalyzeScan(  # noqa: N802 - the generated base class names it
        self,
        request_iterator: AsyncIterator[scan_pb2.ScanRequest],
        context: grpc.aio.ServicerContext,
    ) -> scan_pb2.ScanResult:
        result: scan_pb2.ScanResult | None = None
        async for event in self._scan(request_iterator, context, with_progress=False):
            result = event.result
        if result is None:  # _scan always ends with a result or raises
            raise RuntimeError("scan ended without a result")
        return result

    async def AnalyzeScanWithProgress(  # noqa: N802 - the generated base class names it
        self,
        request_iterator: AsyncIterator[scan_pb2.ScanRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scan_pb2.ScanEvent]:
        async for event in self._scan(request_iterator, context, with_progress=True):
            yield event

    async def GetModelInfo(  # noqa: N802 - the generated base class names it
        self, request: scan_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> scan_pb2.GetModelInfoResponse:
        self._require_ready()
        names = self._backend.models()
        if request.model:
            if request.model not in names:
                raise ModelNotFoundError(
                    f"model {request.model!r} is not served (served: {', '.join(names)})"
                )
            names = (request.model,)
        return scan_pb2.GetModelInfoResponse(
            backend=self._backend.name,
            default_model=self._default(),
            models=[
                model_info_to_proto(self._backend.model_info(name), ready=self._backend.ready)
                for name in names
            ],
        )

    # --- one scan ----------------------------------------------------------------------------

    async def _scan(
        self,
        requests: AsyncIterator[scan_pb2.ScanRequest],
        context: grpc.aio.ServicerContext,
        *,
        with_progress: bool,
    ) -> AsyncIterator[scan_pb2.ScanEvent]:
        # Admission first: a scan past the limit, or one no backend can serve right now, is
        # refused before we read a byte of it.
        self._require_ready()
        with self._slots.acquire():
            self._metrics.in_flight.inc()
            try:
                # Tell the client at once that it may upload (see ADMITTED_METADATA): a client
                # that waits for this never streams files into a refusal.
                await context.send_initial_metadata(((ADMITTED_METADATA, "1"),))
                async for event in self._admitted_scan(requests, context, with_progress):
                    yield event
            finally:
                self._metrics.in_flight.dec()

    async def _admitted_scan(
        self,
        requests: AsyncIterator[scan_pb2.ScanRequest],
        context: grpc.aio.ServicerContext,
        with_progress: bool,
    ) -> AsyncIterator[scan_pb2.ScanEvent]:
        started = time.perf_counter()
        stream = aiter(requests)
        header = await self._read_header(stream)
        request_id = adopt_request_id(context, header.request_id)
        # The client's deadline travels in this context down to the backend's own calls.
        set_deadline(context.time_remaining())
        model = header.model or self._default()
        if model not in (*MODEL_NAMES, MODEL_BOTH):
            raise InputError(
                f"unknown model {model!r}; expected one of {', '.join((*MODEL_NAMES, MODEL_BOTH))}",
                source="ScanHeader",
                attribute="model",
            )
        note_model(model)
        expected = header.expected_files or None
        if expected is not None and expected > self._limits.max_slices:
            raise LimitExceededError(
                f"ScanHeader: expected_files is {expected}, more than the limit of "
                f"{self._limits.max_slices} slices"
            )
        log.info("scan started model=%s expected_files=%s", model, expected or "unknown")

        queue: asyncio.Queue[scan_pb2.ScanEvent] = asyncio.Queue()

        def emit(stage: str, done: int, total: int | None) -> None:
            if with_progress:
                progress = scan_pb2.Progress(
                    stage=STAGE_BY_NAME[stage], done=done, total=total or 0, request_id=request_id
                )
                queue.put_nowait(scan_pb2.ScanEvent(progress=progress))

        receive = _Receiver(stream, self._limits, self._metrics, emit, expected)
        order = ScanOrder(
            model=model,
            expected_slices=expected,
            max_slices=self._limits.max_slices,
            outputs=header.outputs,
            request_id=request_id,
            pacs=self._pacs is not None,
            deadline_s=context.time_remaining(),
            progress=with_progress,
            dicom=self._dicom_outputs,
        )
        analysis_task = asyncio.ensure_future(self._analyze(order, receive, emit))
        prior_task = (
            asyncio.ensure_future(self._find_prior(receive, model))
            if self._prior is not None
            else None
        )
        try:
            if with_progress:
                async for event in _drain_while_running(queue, analysis_task):
                    yield event
            answer = await analysis_task
        finally:
            # The client went away or its deadline passed: stop the pipeline with the RPC, and
            # wait for it, so that nothing of this scan is left pending.
            if not analysis_task.done():
                analysis_task.cancel()
                await asyncio.gather(analysis_task, return_exceptions=True)
            if prior_task is not None and (
                analysis_task.cancelled() or analysis_task.exception() is not None
            ):
                prior_task.cancel()
                await asyncio.gather(prior_task, return_exceptions=True)

        result, objects, encode_ms = answer.message, answer.objects, answer.encode_ms
        if prior_task is not None:
            objects = await merge_comparison(prior_task, result, objects)
        if self._pacs is not None:
            result.pacs.CopyFrom(await self._push(objects, context.time_remaining()))
        total_ms = (time.perf_counter() - started) * 1000.0
        result.timings.add(stage="encode", milliseconds=round(encode_ms, 3))
        if receive.last_file_at is not None:
            # Wall time from the last file's arrival to the answer built: what streaming
            # inference shortens (the other stages overlap the upload and each other).
            after_last_ms = (time.perf_counter() - receive.last_file_at) * 1000.0
            result.timings.add(stage="after_last_file", milliseconds=round(after_last_ms, 3))
        result.timings.add(stage="gateway_total", milliseconds=round(total_ms, 3))
        self._observe(answer, receive.receive_ms)
        log.info(
            "scan done model=%s slices=%d label=%s lesion_ml=%.1f total_ms=%.0f receive_ms=%.0f "
            "encode_ms=%.0f",
            model,
            answer.slices,
            answer.label,
            answer.lesion_ml,
            total_ms,
            receive.receive_ms,
            encode_ms,
        )
        while not queue.empty():
            yield queue.get_nowait()
        yield scan_pb2.ScanEvent(result=result)

    async def _analyze(self, order: ScanOrder, receive: _Receiver, emit: Emit) -> ScanAnswer:
        """The scan's files to its answer, in a worker process or (without workers) here."""
        progress = (lambda p: _forward(p, emit)) if order.progress else None
        if self._workers is not None:
            return await self._workers.analyze(
                order, receive.files(), progress=progress, receive_ms=lambda: receive.receive_ms
            )
        # In this process, only the per-scan budget applies (the gateway's is the workers').
        with scan_memory(ScanMemory(self._limits.max_scan_bytes)):
            return await analyze_scan(
                self._analyzer,
                order,
                receive.files(),
                progress=progress,
                receive_ms=lambda: receive.receive_ms,
            )

    async def _find_prior(self, receive: _Receiver, model: str) -> PriorMatch:
        """Look the prior up as soon as the first file is in (its keys come from that file)."""
        if self._prior is None:
            raise RuntimeError("no PACS to look the prior up in")
        first = await receive.first_file
        keys = PriorKeys.from_file(first, model)
        return PriorMatch(keys, await self._prior.find(keys))

    async def _read_header(
        self, stream: AsyncIterator[scan_pb2.ScanRequest]
    ) -> scan_pb2.ScanHeader:
        first = await anext(stream, None)
        if first is None:
            raise EmptySeriesError(
                "the request stream is empty; send a ScanHeader, then one DICOM file per message"
            )
        if first.WhichOneof("payload") != "header":
            raise InputError(
                "the first message must be a ScanHeader, then one DICOM file per message",
                source="message 1",
                attribute="ScanRequest.header",
            )
        return first.header

    def _default(self) -> str:
        """The configured default model, or the first served one when it is not served."""
        served = self._backend.models()
        if self._default_model in served or not served:
            return self._default_model
        return served[0]

    def _require_ready(self) -> None:
        if not self._backend.ready:
            raise BackendUnavailableError(self._backend.unavailable_reason)
        if self._workers is not None and self._workers.live == 0:
            raise BackendUnavailableError("no analysis worker can take work right now")

    async def _push(
        self, objects: ScanObjects | BaseException, time_remaining: float | None
    ) -> scan_pb2.PacsOutcome:
        """Send SEG and SR to the configured PACS; failures are reported, never raised.

        The answer waits at most the destination's `wait_s` and never past the caller's
        deadline, less a second to send the answer; not at all while the PACS is slow
        (gateway/pacs.py). Every outcome, a skipped push included, is in the answer and the
        metrics.
        """
        pusher = self._pusher
        if pusher is None:
            raise RuntimeError("no PACS is configured")
        if isinstance(objects, BaseException):
            # InputError messages name the file and attribute only; other errors may quote a
            # value from the files, so only their type is given.
            why = str(objects) if isinstance(objects, InputError) else type(objects).__name__
            outcome = pusher.skipped(f"no DICOM outputs: {why}")
        else:
            pairs = [(k, d) for k, d in (("seg", objects.seg), ("sr", objects.sr)) if d]
            outcome = await pusher.push_for_answer(pairs, time_remaining)
        log.info(
            "pacs push to %s: status=%s attempts=%d",
            outcome.destination,
            outcome.status,
            outcome.attempts,
        )
        return scan_pb2.PacsOutcome(
            destination=outcome.destination,
            stored=outcome.stored,
            attempts=outcome.attempts,
            error=outcome.error,
            objects=list(outcome.objects),
            status=outcome.status,
        )

    def _observe(self, answer: ScanAnswer, receive_ms: float) -> None:
        for stage, ms in (
            ("receive", receive_ms),
            *answer.stage_ms,
            ("encode", answer.encode_ms),
        ):
            self._metrics.observe_stage(stage, ms / 1000.0)
        self._metrics.slices.labels(model=answer.model).inc(answer.slices)


class _Receiver:
    """Turns the request stream into the pipeline's (name, bytes) inputs, enforcing the limits
    per file before any decoding, and timing how long we wait on the network (and when the
    last file came: `last_file_at`, a perf_counter time)."""

    def __init__(
        self,
        stream: AsyncIterator[scan_pb2.ScanRequest],
        limits: GatewayLimits,
        metrics: GatewayMetrics,
        emit: Emit,
        expected: int | None,
    ) -> None:
        self._stream = stream
        self._limits = limits
        self._metrics = metrics
        self._emit = emit
        self._expected = expected
        self.receive_ms = 0.0
        self.last_file_at: float | None = None
        # The first file's bytes as soon as it is in (the prior look-up reads its header).
        self.first_file: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def files(self) -> AsyncIterator[tuple[str, bytes]]:
        count = 0
        while True:
            waited = time.perf_counter()
            message = await anext(self._stream, None)
            arrived = time.perf_counter()
            self.receive_ms += (arrived - waited) * 1000.0
            if message is None:
                return
            self.last_file_at = arrived
            count += 1
            source = describe_source(count)
            if message.WhichOneof("payload") != "file":
                raise InputError(
                    "expected a DicomFile message (the ScanHeader comes once, first)",
                    source=source,
                    attribute="ScanRequest.file",
                )
            self._limits.check_slice_count(source, count)
            content = message.file.content
            self._limits.check_file_size(source, len(content))
            self._metrics.received_bytes.inc(len(content))
            if not self.first_file.done():
                self.first_file.set_result(content)
            self._emit("received", count, self._expected)
            # No name: file names can carry patient data; errors say "file N" instead.
            yield "", content


def _forward(progress: Progress, emit: Emit) -> None:
    if progress.stage in STAGE_BY_NAME:
        emit(progress.stage, progress.done, progress.total)


async def _drain_while_running(
    queue: asyncio.Queue[scan_pb2.ScanEvent], task: asyncio.Future[Any]
) -> AsyncIterator[scan_pb2.ScanEvent]:
    """Yield queued events until `task` finishes (its outcome is left for the caller)."""
    while not task.done():
        getter = asyncio.ensure_future(queue.get())
        try:
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the stream is cancelled here: no getter is left pending.
            if not getter.done():
                getter.cancel()
        if getter in done:
            yield getter.result()
    while not queue.empty():
        yield queue.get_nowait()
