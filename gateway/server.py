"""The gateway process: one `async def serve(config)` that runs the grpc.aio server.

Lifecycle: bind and start (health NOT_SERVING) -> load the backend -> SERVING -> on SIGTERM or
SIGINT: NOT_SERVING, stop taking new scans, let in-flight scans finish within the grace period,
close the backend. Health, reflection and the Prometheus endpoint come with it.

Size: one job, the serving process's life cycle; its length is the start-up and shutdown
steps in their order (backend, workers, health, signals).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ctjoint import contracts
from ctjoint.gateway.analysis import ScanAnalyzer
from ctjoint.gateway.auth import TlsConfig, TokenAuthInterceptor
from ctjoint.gateway.backends.base import InferenceBackend
from ctjoint.gateway.decode_pool import close_default_pool
from ctjoint.gateway.dicom_outputs import OutputSettings
from ctjoint.gateway.errors import BackendUnavailableError
from ctjoint.gateway.guards import ClientGuards, fd_headroom
from ctjoint.gateway.interceptors import ScanServiceInterceptor
from ctjoint.gateway.limits import DEFAULT_CPU_THREADS, SCAN_CPU, GatewayLimits, ScanSlots
from ctjoint.gateway.logging_setup import JsonFormatter
from ctjoint.gateway.memory import DEFAULT_KEPT_FREED_BYTES, FreedMemory
from ctjoint.gateway.metrics import GatewayMetrics
from ctjoint.gateway.pacs import Destination
from ctjoint.gateway.prior import DEFAULT_DEADLINE_S as DEFAULT_PRIOR_DEADLINE_S
from ctjoint.gateway.scan_workers import (
    DEFAULT_SCAN_CPU_SECONDS,
    DEFAULT_SCAN_WALL_SECONDS,
    ScanWorkerPool,
    WorkerBounds,
    WorkerSetup,
)
from ctjoint.gateway.service import ScanServicer
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

log = logging.getLogger(__name__)

BackendName = Literal["embedded", "triton"]
SERVICE_NAME: Final = scan_pb2.DESCRIPTOR.services_by_name["ScanService"].full_name
# Results carry masks (zlib) and an overlay PNG: bounded, but above gRPC's 4 MiB default for a
# large lesion load, so the send limit is raised deliberately too.
MAX_SEND_MESSAGE_BYTES: Final = 256 * 1024 * 1024
# How often health is brought in step with the backend's readiness once serving: reading a
# flag, so often enough that a crashed Triton shows as NOT_SERVING well within 2 s.
BACKEND_POLL_S: Final = 0.25
# Connections the health-only port takes at once (probes open one or two each).
HEALTH_MAX_CONNECTIONS: Final = 64


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `ctjoint gateway serve` can be told."""

    host: str = "127.0.0.1"
    port: int = 50051
    backend: BackendName = "embedded"
    triton_url: str | None = None
    model_dir: Path | None = None
    models: tuple[str, ...] = contracts.MODEL_NAMES
    default_model: str = contracts.DEFAULT_MODEL
    metrics_port: int | None = None
    # The /metrics server's address: loopback unless the operator opens it (docs/security.md).
    metrics_host: str = "127.0.0.1"
    # Health on a port of its own as well (same host), answerable whatever the scan port's
    # connections are doing; None: health on the scan port only.
    health_port: int | None = None
    # Idle timeout, scans per peer, keepalive and connection limits (gateway/guards.py).
    guards: ClientGuards = field(default_factory=ClientGuards)
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    grace_seconds: float = 30.0
    # ONNX Runtime threads per inference (None: its default, every core); set it on a shared box.
    threads: int | None = None
    # Threads for scans' CPU-bound work (parsing, preprocessing, lesion measures): see ScanCpuPool.
    cpu_threads: int = DEFAULT_CPU_THREADS
    # False: serve whichever of `models` are available (at least one); True: all or refuse to start.
    require_all_models: bool = True
    # Where SEG and SR go after each scan (C-STORE or STOW-RS); None: nowhere.
    pacs: Destination | None = None
    # Seconds a scan's look-up of the patient's prior analysis in that PACS may take
    # (gateway/prior.py; docs/follow-up.md); 0: no look-up.
    prior_deadline_s: float = DEFAULT_PRIOR_DEADLINE_S
    # What SEG and SR carry and how the SEG is encoded (gateway/dicom_outputs.py).
    dicom_outputs: OutputSettings = field(default_factory=OutputSettings)
    # TLS (and mTLS with a client CA); None: plaintext, fit only for loopback or a mesh.
    tls: TlsConfig | None = None
    # Accepted bearer tokens; empty: no token needed (gateway/auth.py).
    tokens: tuple[str, ...] = ()
    # What one scan's analysis may take in its worker process before it is ended
    # (gateway/scan_workers.py): CPU seconds, and wall seconds from its last file to its answer.
    scan_cpu_seconds: float = DEFAULT_SCAN_CPU_SECONDS
    scan_wall_seconds: float = DEFAULT_SCAN_WALL_SECONDS

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in contracts.MODEL_NAMES]
        if unknown or not self.models:
            raise ValueError(f"models must be among {contracts.MODEL_NAMES}, got {self.models}")
        if self.default_model not in self.models:
            raise ValueError(f"default model {self.default_model!r} is not served")
        if self.grace_seconds < 0:
            raise ValueError("the grace period cannot be negative")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        WorkerBounds(self.scan_cpu_seconds, self.scan_wall_seconds)  # validates them

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def create_backend(config: GatewayConfig) -> InferenceBackend:
    """The backend the configuration names; the service only ever sees the interface."""
    if config.backend == "embedded":
        from ctjoint.gateway.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(
            config.models,
            model_dir=config.model_dir,
            intra_op_threads=config.threads,
            skip_missing=not config.require_all_models,
        )
    if config.backend == "triton":
        if not config.triton_url:
            raise BackendUnavailableError(
                "the triton backend needs --triton-url HOST:PORT (Triton's gRPC endpoint)"
            )
        try:
            from ctjoint.gateway.backends.triton import TritonBackend
        except ImportError as err:
            raise BackendUnavailableError(
                f"the triton backend needs tritonclient[grpc] ({err}); install the gateway extra"
            ) from err
        return TritonBackend(config.triton_url, config.models)
    raise BackendUnavailableError(f"unknown backend {config.backend!r}")


def create_analyzer(config: GatewayConfig, backend: InferenceBackend) -> ScanAnalyzer:
    """In-process inference runs one batch at a time; Triton gets many small concurrent
    requests so its dynamic batcher forms the batches (across slices and scans). Both stream:
    files are preprocessed, and 2.5D slices inferred, while the series is still arriving."""
    if config.backend == "triton":
        from ctjoint.gateway.backends.triton import MAX_IN_FLIGHT_PER_SCAN, REQUEST_SLICES

        return ScanAnalyzer(
            backend,
            batch_size=REQUEST_SLICES,
            max_in_flight=MAX_IN_FLIGHT_PER_SCAN,
            streaming=True,
        )
    return ScanAnalyzer(backend, streaming=True)


async def serve(config: GatewayConfig, *, backend: InferenceBackend | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT, then stop gracefully.

    Scans are analysed in supervised worker processes, one per scan slot, each building its
    own backend from `config`. Given a `backend` object instead (embedding, tests), scans are
    analysed with it in this process: an object cannot be shared with other processes, and
    such a gateway has no protection against a runaway analysis.
    """
    _keep_freed_memory(config.limits.kept_freed_bytes)
    SCAN_CPU.configure(config.cpu_threads)
    metrics = GatewayMetrics()
    workers: ScanWorkerPool | None = None
    if backend is None:
        backend = create_backend(config)
        setup = _worker_setup(config)
        log.info(
            "memory budget (decoded bytes): %d MiB per scan, %d MiB over the scans in flight",
            setup.max_scan_bytes // (1024 * 1024),
            setup.budget_bytes // (1024 * 1024),
        )
        workers = ScanWorkerPool(
            setup,
            config.limits.max_concurrent_scans,
            WorkerBounds(config.scan_cpu_seconds, config.scan_wall_seconds),
        )
        # Replica failures a worker's inference finds reach health, admission and metrics.
        workers.share_replica_health(backend)
    slots = ScanSlots(config.limits.max_concurrent_scans)
    servicer = ScanServicer(
        backend,
        slots=slots,
        limits=config.limits,
        metrics=metrics,
        default_model=config.default_model,
        analyzer=create_analyzer(config, backend),
        pacs=config.pacs,
        dicom_outputs=config.dicom_outputs,
        workers=workers,
        prior_deadline_s=config.prior_deadline_s,
    )
    health_servicer = health.aio.HealthServicer()
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ScanServiceInterceptor(metrics, slots, config.guards)
    ]
    if config.tokens:
        # First in the chain: a refused call never reaches the scan service.
        interceptors.insert(0, TokenAuthInterceptor(config.tokens))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.limits.max_receive_message_bytes),
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
            # Two gateways must not silently share one port.
            ("grpc.so_reuseport", 0),
            *config.guards.grpc_options(fd_headroom(config.guards.max_connections)),
        ],
    )
    scan_pb2_grpc.add_ScanServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if config.tls is not None:
            port = server.add_secure_port(config.address, config.tls.credentials())
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as err:
        raise BackendUnavailableError(f"cannot listen on {config.address}: {err}") from err
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics_http: Any = None
    health_server: grpc.aio.Server | None = None
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await server.start()
    log.info(
        "listening on %s:%d backend=%s tls=%s auth=%s",
        config.host,
        port,
        config.backend,
        _tls_mode(config.tls),
        "token" if config.tokens else "none",
    )
    if config.tokens and config.tls is None and not _is_loopback_host(config.host):
        log.warning(
            "bearer tokens without TLS on %s: tokens cross the network in clear text", config.host
        )
    try:
        if config.metrics_port is not None:
            metrics_http = metrics.serve_http(config.metrics_port, config.metrics_host)
            log.info(
                "metrics on http://%s:%d/metrics", config.metrics_host, metrics_http.server_port
            )
        if config.health_port is not None:
            health_server = await _serve_health(config, health_servicer)
        started = time.perf_counter()
        if workers is not None:
            workers.start()
        await _start_backend(backend, stop)
        if workers is not None and not stop.is_set():
            await _until_stopped(workers.wait_ready(), stop)
        follow: asyncio.Task[None] | None = None
        if not stop.is_set():
            _freeze_startup_objects()
            metrics.backend_ready.set(1)
            await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "serving; backend ready in %.2f s, analysis %s",
                time.perf_counter() - started,
                "in this process" if workers is None else f"in {workers.size} worker processes",
            )
            follow = asyncio.create_task(
                _follow_backend(backend, health_servicer, metrics, workers)
            )
        await stop.wait()
        if follow is not None:
            follow.cancel()
        log.info("stopping: new scans refused, in-flight scans get %.0f s", config.grace_seconds)
    finally:
        # Health first, so load balancers stop sending before the listener goes away.
        await health_servicer.enter_graceful_shutdown()
        metrics.backend_ready.set(0)
        await server.stop(config.grace_seconds)
        servicer.close()
        if workers is not None:
            # Whatever they are doing: the scans they served have been answered or cancelled.
            await workers.close()
        await backend.close()
        # Compressed-pixel decode workers (started on first use) go with the server.
        close_default_pool()
        SCAN_CPU.shutdown()
        if metrics_http is not None:
            metrics_http.shutdown()
        if health_server is not None:
            await health_server.stop(0)
        log.info("stopped")


def _keep_freed_memory(kept_bytes: int = DEFAULT_KEPT_FREED_BYTES) -> bool:
    """Let glibc keep freed arrays for reuse, up to `kept_bytes` (gateway/memory.py
    FreedMemory). Skipped when the operator set any MALLOC_* variable, or off glibc. True
    when applied."""
    return FreedMemory(kept_bytes).tune()


def _freeze_startup_objects() -> None:
    """Collect once, then move everything alive (modules, pydicom's dictionaries, the models'
    metadata: a few hundred thousand objects) out of the cyclic collector's sight.

    Otherwise the first full collection after start-up walks all of it on the event loop, in
    the middle of whatever triggered it: a burst of refusals then took about twice as long
    (docs/reliability.md). They live as long as the process anyway.
    """
    gc.collect()
    gc.freeze()


async def _serve_health(config: GatewayConfig, servicer: Any) -> grpc.aio.Server:
    """The health service alone on `config.health_port`, with a connection cap of its own:
    a flood of connections to the scan port (capped there) leaves it answering."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.server_handshake_timeout_ms", 5000),
            ("grpc.max_connection_idle_ms", 60_000),
            ("grpc.max_allowed_incoming_connections", HEALTH_MAX_CONNECTIONS),
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{config.address.rsplit(':', 1)[0]}:{config.health_port}"
    try:
        if config.tls is not None:
            port = server.add_secure_port(address, config.tls.credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise BackendUnavailableError(f"cannot listen on {address}: {err}") from err
    await server.start()
    log.info("health on %s:%d", config.host, port)
    return server


def _tls_mode(tls: TlsConfig | None) -> str:
    if tls is None:
        return "off"
    return "mutual" if tls.client_ca is not None else "on"


def _is_loopback_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _start_backend(backend: InferenceBackend, stop: asyncio.Event) -> None:
    """Load the backend, unless a stop signal comes first (then leave it unloaded)."""
    await _until_stopped(backend.load(), stop)


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Await `work` unless a stop signal comes first (then cancel it); its error is raised."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        return
    stopping.cancel()
    task.result()  # what cannot start stops the gateway with its own error


def _worker_setup(config: GatewayConfig) -> WorkerSetup:
    """What each analysis worker is told: this configuration and this process's logging."""
    root = logging.getLogger()
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return WorkerSetup(
        config=config,
        log_level=logging.getLevelName(root.getEffectiveLevel()),
        log_format="json" if json_lines else "text",
        cpu_seconds=config.scan_cpu_seconds,
        max_scan_bytes=config.limits.max_scan_bytes,
        budget_bytes=config.limits.memory_budget(),
    )


async def _follow_backend(
    backend: InferenceBackend,
    health_servicer: Any,
    metrics: GatewayMetrics,
    workers: ScanWorkerPool | None,
) -> None:
    """Health follows the backend after start-up (a remote Triton can go away and come back),
    and the analysis workers: NOT_SERVING while none is up to take a scan."""
    serving = True
    while True:
        await asyncio.sleep(BACKEND_POLL_S)
        metrics.observe_replicas(backend)
        ready = backend.ready and (workers is None or workers.live > 0)
        if ready == serving:
            continue
        serving = ready
        metrics.backend_ready.set(1 if serving else 0)
        await _set_health(
            health_servicer,
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        log.warning(
            "backend %s (%s analysis workers up): health is now %s",
            backend.name,
            "-" if workers is None else workers.live,
            "SERVING" if serving else "NOT_SERVING",
        )


async def _set_health(servicer: Any, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, stop)


def _on_signal(signum: int, stop: asyncio.Event) -> None:
    log.info("received %s", signal.Signals(signum).name)
    stop.set()


def run(config: GatewayConfig) -> None:
    """Blocking entry point for the CLI."""
    asyncio.run(serve(config))
