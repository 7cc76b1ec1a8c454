"""Prometheus metrics of the gateway, in their own registry, every name prefixed `ctjoint_`.

Labels are bounded sets (stage, outcome, status code, model name from MODEL_NAMES), never
request ids or anything from the DICOM files, so cardinality stays fixed and no patient data
can reach a scrape.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ctjoint.contracts import MODEL_BOTH, MODEL_NAMES
from ctjoint.gateway.backends.replicas import Replicated

STAGES: Final = ("receive", "decode", "assemble", "preprocess", "infer", "postprocess", "encode")
# Seconds: a 512-pixel slice decodes in ~1 ms, a whole 3D inference on CPU takes tens of seconds.
STAGE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
UNKNOWN_MODEL: Final = "unknown"
# The /metrics server: a client has this long to send its request, the request may be this
# big, and this many connections are served at once (more are closed as they arrive).
HTTP_REQUEST_TIMEOUT_S: Final = 5.0
HTTP_MAX_REQUEST_BYTES: Final = 8 * 1024
HTTP_MAX_CONNECTIONS: Final = 512

log = logging.getLogger(__name__)


def model_label(model: str) -> str:
    """A model name fit for a label: only the known names, so clients cannot add series."""
    return model if model in MODEL_NAMES or model == MODEL_BOTH else UNKNOWN_MODEL


class GatewayMetrics:
    """The gateway's metrics; one instance per server, each with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.scans = Counter(
            "ctjoint_scans",
            "Scans finished, by model, outcome (ok, error, cancelled) and gRPC status code.",
            ("model", "outcome", "code"),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "ctjoint_stage_seconds",
            "Wall time of one pipeline stage of one scan.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.scan_seconds = Histogram(
            "ctjoint_scan_seconds",
            "Wall time of a whole scan, first message to result.",
            ("model",),
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.slices = Counter(
            "ctjoint_slices_processed",
            "Slices that went through the whole pipeline.",
            ("model",),
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "ctjoint_received_bytes",
            "DICOM bytes received in scan requests.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ctjoint_scans_in_flight",
            "Scans being received or processed right now.",
            registry=self.registry,
        )
        self.backend_ready = Gauge(
            "ctjoint_backend_ready",
            "1 when the inference backend is ready to serve, else 0.",
            registry=self.registry,
        )
        # Replicas are counted by state only: pod addresses come and go, labels must not.
        self.triton_replicas = Gauge(
            "ctjoint_triton_replicas",
            "Triton replicas this gateway knows, by state (healthy, ejected).",
            ("state",),
            registry=self.registry,
        )
        self.retried_slices = Counter(
            "ctjoint_retried_slices",
            "Slices re-sent to another Triton replica after theirs failed.",
            registry=self.registry,
        )
        self._retried_seen = 0
        # Pre-create the stage series so dashboards see every stage from the first scrape.
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def record_scan(self, model: str, outcome: str, code: str) -> None:
        self.scans.labels(model=model_label(model), outcome=outcome, code=code).inc()

    def observe_replicas(self, backend: object) -> None:
        """Replica states and retries of a replicated backend (Triton); others are ignored."""
        if not isinstance(backend, Replicated):
            return
        replicas = backend.replica_stats()
        healthy = sum(1 for r in replicas if r.healthy)
        self.triton_replicas.labels(state="healthy").set(healthy)
        self.triton_replicas.labels(state="ejected").set(len(replicas) - healthy)
        retried = backend.retried_slices
        if retried > self._retried_seen:
            self.retried_slices.inc(retried - self._retried_seen)
            self._retried_seen = retried

    def exposition(self) -> bytes:
        """The text exposition format of this registry (what a scrape returns)."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> MetricsHttpServer:
        """Expose /metrics on a background thread; returns the server (has .shutdown())."""
        return MetricsHttpServer(self, host, port)


class MetricsHttpServer:
    """GET /metrics over HTTP/1.0 from one thread of its own, whatever the clients do.

    prometheus_client's server starts a thread per connection and never times one out, so a
    few thousand silent connections took threads and memory without bound. This one runs an
    event loop in one thread: a connection that sends no request within
    HTTP_REQUEST_TIMEOUT_S is closed, at most HTTP_MAX_CONNECTIONS are served at once (more are
    closed at once), and a scrape never waits behind a silent client.
    """

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._open = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._handle, host, port, limit=HTTP_MAX_REQUEST_BYTES)
                )
            except BaseException as err:  # handed to the caller below
                failure.append(err)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="ctjoint-metrics-http", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        if self._server is None:
            raise RuntimeError("the metrics server did not start")
        self.server_port: int = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > HTTP_MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_REQUEST_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method != b"GET" or path not in (b"/metrics", b"/"):
                status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
            else:
                status, body = b"200 OK", self._metrics.exposition()
                kind = CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.0 "
                + status
                + b"\r\nContent-Type: "
                + kind
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await asyncio.wait_for(writer.drain(), HTTP_REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError):
            pass  # the client went away
        finally:
            self._open -= 1
            writer.close()

    def shutdown(self) -> None:
        """Stop serving and let the thread end."""

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(5)
