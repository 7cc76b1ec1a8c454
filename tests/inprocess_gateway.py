"""One AnalyzeScan against a gateway served in this process (embedded backend, one model)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctjoint.contracts import MODEL_JCS2D
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.dicom_outputs import OutputSettings
from ctjoint.gateway.pacs import Destination
from ctjoint.gateway.server import GatewayConfig, serve
from ctjoint.v1 import scan_pb2, scan_pb2_grpc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_serving(channel: grpc.aio.Channel, server: asyncio.Future[None]) -> None:
    """Until the gateway's health says SERVING (its backend has loaded), at most 30 s."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.done():
            server.result()  # serve() failed: show why
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail("the gateway was not SERVING within 30 s")


@contextlib.asynccontextmanager
async def served_gateway(
    model_dir: Path,
    *,
    pacs: Destination | None = None,
    metrics_port: int | None = None,
    dicom_outputs: OutputSettings | None = None,
) -> AsyncIterator[grpc.aio.Channel]:
    """A gateway serving jcs2d from `model_dir` in this event loop, until the block ends; yields
    a channel to it once it is SERVING."""
    port = free_port()
    config = GatewayConfig(
        port=port,
        models=(MODEL_JCS2D,),
        grace_seconds=1.0,
        pacs=pacs,
        metrics_port=metrics_port,
        dicom_outputs=dicom_outputs or OutputSettings(),
    )
    backend = EmbeddedBackend((MODEL_JCS2D,), model_dir=model_dir, intra_op_threads=1)
    server = asyncio.ensure_future(serve(config, backend=backend))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _wait_serving(channel, server)
            yield channel
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def analyze(
    channel: grpc.aio.Channel, files: list[bytes], outputs: scan_pb2.OutputOptions
) -> scan_pb2.ScanResult:
    """One AnalyzeScan of `files` with `outputs` (jcs2d, 60 s deadline)."""

    async def requests() -> AsyncIterator[scan_pb2.ScanRequest]:
        header = scan_pb2.ScanHeader(model=MODEL_JCS2D, outputs=outputs)
        yield scan_pb2.ScanRequest(header=header)
        for content in files:
            yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))

    stub = scan_pb2_grpc.ScanServiceStub(channel)
    return await stub.AnalyzeScan(requests(), timeout=60)


async def analyze_refusable(
    address: str, files: list[bytes], *, timeout: float = 60
) -> scan_pb2.ScanResult:
    """One jcs2d AnalyzeScan on gRPC's synchronous API, in a worker thread so that this event
    loop keeps serving the gateway. For scans the gateway may end while files are still being
    sent: a grpc.aio client then reports INTERNAL (its write into a finished call), the
    synchronous API the gateway's own status. Raises grpc.RpcError."""

    def requests() -> Iterator[scan_pb2.ScanRequest]:
        yield scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=MODEL_JCS2D))
        for content in files:
            yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))

    def call() -> scan_pb2.ScanResult:
        with grpc.insecure_channel(address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            return stub.AnalyzeScan(requests(), timeout=timeout)

    return await asyncio.to_thread(call)


def scan_in_process(
    files: list[bytes],
    model_dir: Path,
    *,
    outputs: scan_pb2.OutputOptions,
    pacs: Destination | None = None,
) -> scan_pb2.ScanResult:
    """Serve jcs2d from `model_dir`, send `files` with `outputs`, return the answer."""

    async def main() -> scan_pb2.ScanResult:
        async with served_gateway(model_dir, pacs=pacs) as channel:
            return await analyze(channel, files, outputs)

    return asyncio.run(main())
