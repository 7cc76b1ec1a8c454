"""The one place where project exceptions become gRPC status codes.

`ScanServiceInterceptor` wraps every `ctjoint.v1` method: it gives the RPC a request id (the
`x-request-id` metadata, else a fresh one) in the logging ContextVar, maps `CtJointError`
subclasses to status codes with the error's own message, turns anything unexpected into
INTERNAL with a request id instead of gRPC's UNKNOWN-with-traceback, and counts scan outcomes.
Servicers raise; they never call `context.abort` themselves. The one status decided before
this interceptor runs is UNAUTHENTICATED: `gateway/auth.py` refuses calls without a valid
token for every service (reflection included), ahead of this one in the chain.

Size: one job, what every RPC goes through (request id, status mapping, outcome counts); the
refusal log and the scan context are its state.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, Final

import grpc
import grpc.aio

from ctjoint.contracts import REQUEST_ID_METADATA
from ctjoint.gateway.errors import (
    AdmissionRefusedError,
    BackendError,
    BackendUnavailableError,
    CtJointError,
    DeadlineExceededError,
    InputError,
    LimitExceededError,
    ModelNotFoundError,
    UnsupportedTransferSyntaxError,
)
from ctjoint.gateway.guards import ClientGuards, IdleTimeoutError, PeerScans, idle_bounded
from ctjoint.gateway.limits import ScanSlots
from ctjoint.gateway.logging_setup import REQUEST_ID, bounded_text, clean_request_id, scrub_uids
from ctjoint.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics

log = logging.getLogger(__name__)

SERVICE_PREFIX: Final = "/ctjoint.v1."
SCAN_METHODS: Final = ("AnalyzeScan", "AnalyzeScanWithProgress")
# A client cancels at its own deadline, which comes a little before ours (ours starts when its
# headers arrive), so a cancellation this close to our deadline is the deadline passing.
DEADLINE_SLACK_S: Final = 0.25
# Refusals at the scan limit are logged as one line per this many seconds, with their count.
REFUSAL_LOG_INTERVAL_S: Final = 1.0

# Most specific first: the first matching class decides.
STATUS_BY_ERROR: Final[tuple[tuple[type[CtJointError], grpc.StatusCode], ...]] = (
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (IdleTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnsupportedTransferSyntaxError, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BackendError, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code a client sees for an exception raised by a servicer."""
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, MemoryError):
        # A scan too big for what this box has free right now: the caller may retry later.
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


# What clients must not learn from an error's details: where our dependencies and files are.
# URLs first, then bracketed IPv6 and IPv4 addresses, host:port pairs, absolute paths of two
# or more parts, and process ids. UIDs are pseudonymised before (scrub_uids), so a UID's dots
# never read as an address.
_INTERNAL: Final = (
    (re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\")\]]+"), "<url>"),
    (re.compile(r"\[[0-9a-fA-F:.%]+\](?::\d+)?"), "<address>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\b(?:ipv4|ipv6|unix|dns):[^\s'\",)]+"), "<address>"),
    (re.compile(r"\b[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?:\d{2,5}\b"), "<address>"),
    (re.compile(r"(?<![\w.~])(?:/[\w.@+~-]+){2,}/?"), "<path>"),
    (re.compile(r"\bpids? \d+(?:, \d+)*"), "pid <n>"),
)


def public_details(message: str) -> str:
    """An error message as a client may read it: internal addresses, URLs, file system paths
    and process ids replaced by placeholders (the log keeps them for the operator)."""
    for pattern, placeholder in _INTERNAL:
        message = pattern.sub(placeholder, message)
    return message


def _public_message(error: Exception) -> str | None:
    """What the client may read about an error we did not raise on purpose (None: a bug)."""
    if isinstance(error, TimeoutError):
        return "the gateway timed out waiting for a dependency"
    if isinstance(error, MemoryError):
        return "not enough memory for this scan right now; retry later"
    return None


class ScanContext:
    """Per-RPC facts the servicer reports back to the interceptor (the model, for metrics)."""

    def __init__(self, request_id_from_metadata: bool) -> None:
        self.model = UNKNOWN_MODEL
        self.request_id_from_metadata = request_id_from_metadata


# A mutable holder in a ContextVar: the interceptor creates it, the servicer (same task, so same
# context) fills it in, and the interceptor reads it after the handler is done.
_SCAN_CONTEXT: ContextVar[ScanContext | None] = ContextVar("ctjoint_scan_context", default=None)


def note_model(model: str) -> None:
    """Record the model the current scan uses so its outcome is counted under it."""
    holder = _SCAN_CONTEXT.get()
    if holder is not None:
        holder.model = model


def adopt_request_id(context: grpc.aio.ServicerContext, candidate: str) -> str:
    """Use the id from a ScanHeader unless the call's metadata already named one.

    Returns the request id in force for the rest of the RPC.
    """
    holder = _SCAN_CONTEXT.get()
    if candidate and holder is not None and not holder.request_id_from_metadata:
        request_id = clean_request_id(candidate)
        REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
    return REQUEST_ID.get()


def _metadata_value(metadata: Sequence[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        name, value = item
        if name == key and isinstance(value, str):
            return value
    return None


class RefusalLog:
    """Refusals at the concurrent-scan limit, logged as one line per REFUSAL_LOG_INTERVAL_S:
    the first at once, the rest counted and written when the interval is up."""

    def __init__(self) -> None:
        self._pending = 0
        self._last_message = ""
        self._flush: asyncio.TimerHandle | None = None
        self._logged_at = -1e9

    def note(self, message: str) -> None:
        self._pending += 1
        self._last_message = message
        if self._flush is not None:
            return
        wait = self._logged_at + REFUSAL_LOG_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self._write()
        else:
            self._flush = asyncio.get_running_loop().call_later(wait, self._write)

    def _write(self) -> None:
        self._flush = None
        if self._pending:
            log.info(
                "refused %d scan(s) code=RESOURCE_EXHAUSTED: %s",
                self._pending,
                self._last_message,
            )
            self._pending = 0
            self._logged_at = time.monotonic()


class ScanServiceInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, error mapping and outcome metrics for the ctjoint.v1 service; with the
    gateway's `ScanSlots`, it also refuses a scan that finds every slot taken before the
    servicer runs."""

    def __init__(
        self,
        metrics: GatewayMetrics | None = None,
        slots: ScanSlots | None = None,
        guards: ClientGuards | None = None,
    ) -> None:
        self._metrics = metrics
        self._slots = slots
        self._refusals = RefusalLog()
        # Scans' request streams end after guards.idle_timeout_s of silence, and a peer holds
        # at most guards.max_scans_per_peer of the slots (gateway/guards.py).
        self._guards = guards if guards is not None else ClientGuards()
        self._peers = PeerScans(self._guards.max_scans_per_peer)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler  # health, reflection: theirs to answer
        name = method.rsplit("/", 1)[-1]
        metadata = handler_call_details.invocation_metadata
        given = _metadata_value(metadata, REQUEST_ID_METADATA)
        request_id = clean_request_id(given)
        from_metadata = given is not None and given == request_id
        is_scan = name in SCAN_METHODS
        if is_scan and self._slots is not None and self._slots.full:
            return self._refusing(handler, request_id, self._slots)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, request_id, from_metadata, is_scan),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, request_id, from_metadata, is_scan),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_streaming(handler.stream_stream, request_id, from_metadata, is_scan),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_streaming(handler.unary_stream, request_id, from_metadata, is_scan),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _refusing(
        self, handler: grpc.RpcMethodHandler, request_id: str, slots: ScanSlots
    ) -> grpc.RpcMethodHandler:
        """A handler that answers RESOURCE_EXHAUSTED at once, for a scan that finds every
        slot taken.

        Built here rather than raised from the servicer: an excess scan then costs the event
        loop one small coroutine instead of the servicer's generators and two exceptions
        unwinding through them, and refusals go out as fast as grpc.aio hands calls over
        (README, "Reliability: load and faults").
        """

        def refuse(context: grpc.aio.ServicerContext) -> None:
            error = slots.refusal()
            code = status_for(error)
            self._refusals.note(str(error))
            if self._metrics is not None:
                self._metrics.record_scan(UNKNOWN_MODEL, "error", code.name)
            context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
            context.set_code(code)
            context.set_details(str(error))

        async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
            refuse(context)  # with a status other than OK, gRPC sends no response message

        async def refuse_streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refuse(context)
            nothing: tuple[Any, ...] = ()
            for response in nothing:  # an async generator that ends without a response
                yield response

        kinds = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, refuse_unary),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, refuse_unary),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, refuse_streaming),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, refuse_streaming),
        )
        for behavior, make, refusing in kinds:
            if behavior is not None:
                return make(
                    refusing,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap_unary(
        self,
        behavior: Callable[..., Awaitable[Any]],
        request_id: str,
        from_metadata: bool,
        is_scan: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            scan = self._begin(context, request_id, from_metadata)
            started = time.perf_counter()
            try:
                if is_scan:
                    with self._peers.hold(context.peer()):
                        response = await behavior(self._guarded(request), context)
                else:
                    response = await behavior(request, context)
            except BaseException as err:  # re-raised, or turned into a status
                await self._fail(err, context, scan, is_scan, started)
                raise  # _fail aborts (raising) for everything it maps; others go up as-is
            self._succeed(scan, is_scan, started)
            return response

        return wrapped

    def _wrap_streaming(
        self,
        behavior: Callable[..., AsyncIterator[Any]],
        request_id: str,
        from_metadata: bool,
        is_scan: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            scan = self._begin(context, request_id, from_metadata)
            started = time.perf_counter()
            try:
                if is_scan:
                    with self._peers.hold(context.peer()):
                        async for response in behavior(self._guarded(request), context):
                            yield response
                else:
                    async for response in behavior(request, context):
                        yield response
            except BaseException as err:  # re-raised, or turned into a status
                await self._fail(err, context, scan, is_scan, started)
                raise
            self._succeed(scan, is_scan, started)

        return wrapped

    def _guarded(self, request: Any) -> Any:
        """A scan's request stream, ended by the idle timeout (a unary request as it is)."""
        if hasattr(request, "__aiter__"):
            return idle_bounded(request, self._guards.idle_timeout_s)
        return request

    def _begin(
        self, context: grpc.aio.ServicerContext, request_id: str, from_metadata: bool
    ) -> ScanContext:
        # Each RPC runs in its own asyncio task (its own context copy), so setting the var
        # here cannot leak into another scan, and the servicer may re-bind it from the header.
        REQUEST_ID.set(request_id)
        scan = ScanContext(from_metadata)
        _SCAN_CONTEXT.set(scan)
        # Echo the id so a client can quote it, whatever the outcome.
        context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
        return scan

    def _succeed(self, scan: ScanContext, is_scan: bool, started: float) -> None:
        if is_scan and self._metrics is not None:
            self._metrics.record_scan(scan.model, "ok", grpc.StatusCode.OK.name)
            self._metrics.scan_seconds.labels(model=scan.model).observe(
                time.perf_counter() - started
            )

    async def _fail(
        self,
        err: BaseException,
        context: grpc.aio.ServicerContext,
        scan: ScanContext,
        is_scan: bool,
        started: float,
    ) -> None:
        """Count and log a failed RPC; abort with the mapped status (raises) where we map it."""
        if isinstance(err, grpc.aio.AbortError):
            # Someone (gRPC or a helper) already set the status; nothing to translate.
            self._count(scan, is_scan, "error", context.code() or grpc.StatusCode.UNKNOWN)
            return
        if isinstance(err, asyncio.CancelledError):
            # The client went away or its deadline passed: gRPC already answered it.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            log.info("scan stopped code=%s", code.name)
            self._count(scan, is_scan, "cancelled", code)
            return
        if not isinstance(err, Exception):
            return  # KeyboardInterrupt, SystemExit: not ours to turn into a status
        code = status_for(err)
        public = _public_message(err)
        if isinstance(err, AdmissionRefusedError):
            # A burst of refusals must not become a burst of log lines (nor cost the loop a
            # formatted record each while it is refusing): counted, logged once a second.
            message = str(err)
            self._refusals.note(message)
        elif isinstance(err, CtJointError):
            # Messages may quote what the caller sent (a model name): bounded and escaped. The
            # log names our dependencies' addresses; the client learns none (public_details).
            logged = bounded_text(scrub_uids(str(err)))
            log.info("request failed code=%s error=%s: %s", code.name, type(err).__name__, logged)
            message = public_details(logged)
        elif public is not None:
            message = public
            log.warning("request failed code=%s error=%s", code.name, type(err).__name__)
        else:
            # A bug: the traceback goes to our log, the client gets a request id to quote.
            log.exception("unexpected error, answering INTERNAL")
            message = f"internal error in the gateway (request id {REQUEST_ID.get()})"
        self._count(scan, is_scan, "error", code)
        await context.abort(code, message)

    def _count(self, scan: ScanContext, is_scan: bool, outcome: str, code: grpc.StatusCode) -> None:
        if is_scan and self._metrics is not None:
            self._metrics.record_scan(scan.model, outcome, code.name)
