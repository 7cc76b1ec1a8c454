"""`serve()` in this process with a scripted backend: readiness gates health, backend
failures map to UNAVAILABLE / INTERNAL (never UNKNOWN), and the service runs on any
`InferenceBackend` without knowing which one it has."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess_gateway import analyze_refusable, free_port

from ctjoint.contracts import CLASS_NAMES, MODEL_JCS2D, SEG_CLASS_NAMES
from ctjoint.gateway.backends.base import InferenceBackend, ModelInfo, ModelOutputs
from ctjoint.gateway.errors import BackendUnavailableError
from ctjoint.gateway.preprocess import PreprocessPlan
from ctjoint.gateway.server import GatewayConfig, serve

PLAN = PreprocessPlan.default(MODEL_JCS2D, height=16, width=16)


class ScriptedBackend(InferenceBackend):
    """Loads when told to; answers every batch as normal, or fails the way it is told to."""

    name = "scripted"

    def __init__(self) -> None:
        self.allow_load = asyncio.Event()
        self.failure: Exception | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def load(self) -> None:
        await self.allow_load.wait()
        self._ready = True

    def models(self) -> tuple[str, ...]:
        return (MODEL_JCS2D,)

    def model_info(self, model: str) -> ModelInfo:
        return ModelInfo(name=model, version="scripted-1", plan=PLAN)

    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        if self.failure is not None:
            raise self.failure
        batch = image.shape[0]
        cls = np.tile(np.array([[0.0, 0.0, 5.0]], dtype=np.float32), (batch, 1))
        seg = np.zeros((batch, len(SEG_CLASS_NAMES), PLAN.height, PLAN.width), np.float32)
        seg[:, 0] = 1.0
        return ModelOutputs(seg_logits=seg, cls_logits=cls)

    async def close(self) -> None:
        self._ready = False


async def _health(address: str) -> int | None:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)


def _run_with_gateway(
    body: Callable[[str, ScriptedBackend], Awaitable[None]], *, load: bool = True
) -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        if load:
            backend.allow_load.set()
        port = free_port()
        config = GatewayConfig(port=port, models=(MODEL_JCS2D,), grace_seconds=1.0)
        server = asyncio.ensure_future(serve(config, backend=backend))
        address = f"127.0.0.1:{port}"
        try:
            for _ in range(200):
                if server.done():
                    server.result()  # serve() failed: show why
                if await _health(address) is not None:
                    break
                await asyncio.sleep(0.05)
            await body(address, backend)
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)

    asyncio.run(main())


@pytest.fixture
def files(ct_series_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(ct_series_dir.iterdir())]


def test_health_is_not_serving_until_the_backend_has_loaded(files: list[bytes]) -> None:
    async def body(address: str, backend: ScriptedBackend) -> None:
        assert await _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            await analyze_refusable(address, files)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in (info.value.details() or "")
        backend.allow_load.set()
        for _ in range(100):
            if await _health(address) == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        assert await _health(address) == health_pb2.HealthCheckResponse.SERVING
        assert (await analyze_refusable(address, files)).label == "normal"

    _run_with_gateway(body, load=False)


def test_the_service_runs_on_any_backend(files: list[bytes]) -> None:
    async def body(address: str, backend: ScriptedBackend) -> None:
        result = await analyze_refusable(address, files)
        assert result.backend == "scripted"
        assert result.model.version == "scripted-1"
        assert list(result.class_names) == list(CLASS_NAMES)

    _run_with_gateway(body)


def test_a_backend_that_went_away_is_unavailable(files: list[bytes]) -> None:
    async def body(address: str, backend: ScriptedBackend) -> None:
        backend.failure = BackendUnavailableError("triton at 10.0.0.9:8001 is not answering")
        with pytest.raises(grpc.RpcError) as info:
            await analyze_refusable(address, files)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The details name no internal address (gateway/interceptors.py: public_details).
        assert info.value.details() == "triton at <address> is not answering"
        assert await _health(address) == health_pb2.HealthCheckResponse.SERVING

    _run_with_gateway(body)


def test_a_bug_is_internal_with_a_request_id_never_unknown(files: list[bytes]) -> None:
    async def body(address: str, backend: ScriptedBackend) -> None:
        backend.failure = ZeroDivisionError("division by zero")
        with pytest.raises(grpc.RpcError) as info:
            await analyze_refusable(address, files)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details() or ""
        assert details.startswith("internal error in the gateway (request id ")
        assert "Traceback" not in details and "ZeroDivisionError" not in details

    _run_with_gateway(body)


def test_running_out_of_memory_is_resource_exhausted(files: list[bytes]) -> None:
    async def body(address: str, backend: ScriptedBackend) -> None:
        backend.failure = MemoryError()
        with pytest.raises(grpc.RpcError) as info:
            await analyze_refusable(address, files)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "not enough memory" in (info.value.details() or "")
        assert await _health(address) == health_pb2.HealthCheckResponse.SERVING

    _run_with_gateway(body)
