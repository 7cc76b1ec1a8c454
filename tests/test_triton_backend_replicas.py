"""The Triton backend over several replicas, against an in-memory stand-in for tritonclient.

What a real server cannot be made to do on cue is done here: a replica that answers
UNAVAILABLE to one request, one whose health check says "not ready", one serving another
model version, a request that is wrong rather than unlucky. No sockets; the failover with two
real tritonservers is tests/test_triton_failover.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from ctjoint import contracts
from ctjoint.gateway.backends import triton as triton_module
from ctjoint.gateway.backends.triton import TritonBackend
from ctjoint.gateway.errors import BackendError, BackendUnavailableError
from ctjoint.gateway.metrics import GatewayMetrics
from ctjoint.gateway.preprocess import PreprocessPlan

MODEL = contracts.MODEL_JCS2D
PLAN = PreprocessPlan(model=MODEL, kind="2.5d", height=16, width=16)
A, B = "10.0.0.1:8001", "10.0.0.2:8001"


@dataclass
class _Server:
    """One fake Triton: its health, how it answers inference, and what it was sent."""

    ready: bool = True
    up: bool = True
    version: str = "1.0"
    infer_error: str | None = None  # a gRPC status name to fail every inference with
    served: int = 0


@dataclass
class _World:
    servers: dict[str, _Server] = field(default_factory=dict)


def _unavailable(address: str) -> InferenceServerException:
    return InferenceServerException(
        f"{address}: connection refused", status="StatusCode.UNAVAILABLE"
    )


def _client_class(world: _World) -> type:
    class FakeClient:
        def __init__(self, url: str, **_: Any) -> None:
            self.url = url

        def _server(self) -> _Server:
            server = world.servers[self.url]
            if not server.up:
                raise _unavailable(self.url)
            return server

        async def is_server_ready(self, **_: Any) -> bool:
            return self._server().ready

        async def is_model_ready(self, model: str, **_: Any) -> bool:
            return self._server().ready

        async def get_model_config(self, model: str, **_: Any) -> dict[str, Any]:
            server = self._server()
            parameters = {
                contracts.ONNX_META_PLAN: {"string_value": PLAN.to_json()},
                contracts.ONNX_META_MODEL: {"string_value": MODEL},
                contracts.ONNX_META_VERSION: {"string_value": server.version},
            }
            image = {"name": contracts.INPUT_IMAGE, "dims": [3, 16, 16]}
            return {"config": {"parameters": parameters, "input": [image], "max_batch_size": 8}}

        async def infer(self, model: str, inputs: list[Any], **_: Any) -> Any:
            server = self._server()
            await asyncio.sleep(0)
            if server.infer_error is not None:
                raise InferenceServerException("refused", status=f"StatusCode.{server.infer_error}")
            server.served += 1
            batch = int(inputs[0].shape()[0])
            outputs = {
                contracts.ENSEMBLE_LESION_LOGITS: np.zeros((batch, 3, 16, 16), np.float32),
                contracts.ENSEMBLE_DIAGNOSIS_LOGITS: np.zeros((batch, 3), np.float32),
            }
            return type("Result", (), {"as_numpy": staticmethod(outputs.get)})()

        async def close(self) -> None:
            return None

    return FakeClient


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> _World:
    world = _World({A: _Server(), B: _Server()})
    monkeypatch.setattr(triton_module.triton_aio, "InferenceServerClient", _client_class(world))
    return world


def _image(batch: int = 2) -> np.ndarray:
    return np.zeros((batch, 3, 16, 16), np.float32)


def _run(world: _World, body: Callable[[TritonBackend], Awaitable[None]]) -> None:
    async def main() -> None:
        options = {"health_interval_s": 0.01, "probe_first_s": 0.01, "probe_max_s": 0.02}
        backend = TritonBackend(list(world.servers), (MODEL,), load_timeout_s=2, **options)
        async with backend:
            await body(backend)

    asyncio.run(main())


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def test_requests_are_spread_over_the_healthy_replicas(world: _World) -> None:
    async def body(backend: TritonBackend) -> None:
        for _ in range(10):
            await backend.infer(MODEL, _image())

    _run(world, body)
    assert world.servers[A].served == world.servers[B].served == 5


def test_an_unavailable_answer_ejects_the_replica_and_the_slices_go_to_another(
    world: _World,
) -> None:
    world.servers[A].infer_error = "UNAVAILABLE"

    async def body(backend: TritonBackend) -> None:
        for _ in range(4):
            outputs = await backend.infer(MODEL, _image(batch=3))
            assert outputs.seg_logits.shape == (3, 3, 16, 16)
        stats = {s.address: s for s in backend.replica_stats()}
        assert stats[A].ejections >= 1 and stats[A].failures >= 1
        assert backend.retried_slices == 3 * stats[A].failures

    _run(world, body)
    assert world.servers[B].served == 4


def test_a_replica_failing_its_health_check_is_ejected_then_restored(world: _World) -> None:
    async def body(backend: TritonBackend) -> None:
        world.servers[B].ready = False
        await _until(lambda: not _stats(backend)[B].healthy)
        served = world.servers[B].served
        for _ in range(4):
            await backend.infer(MODEL, _image())
        assert world.servers[B].served == served, "an ejected replica was sent work"
        world.servers[B].ready = True
        await _until(lambda: _stats(backend)[B].healthy)
        for _ in range(4):
            await backend.infer(MODEL, _image())
        assert world.servers[B].served > served

    _run(world, body)


def test_with_every_replica_down_a_request_waits_for_one_to_return(world: _World) -> None:
    async def body(backend: TritonBackend) -> None:
        for server in world.servers.values():
            server.up = False
        await _until(lambda: not backend.ready)
        pending = asyncio.create_task(backend.infer(MODEL, _image()))
        await asyncio.sleep(0.05)
        assert not pending.done()
        world.servers[A].up = True
        outputs = await asyncio.wait_for(pending, 2.0)
        assert outputs.cls_logits.shape == (2, 3)

    _run(world, body)


def test_a_request_gives_up_after_bounded_attempts_when_every_replica_keeps_failing(
    world: _World,
) -> None:
    for server in world.servers.values():
        server.infer_error = "UNAVAILABLE"

    async def body(backend: TritonBackend) -> None:
        with pytest.raises(
            BackendUnavailableError, match=r"Triton at 10\.0\.0\.\d:8001 is unavail"
        ):
            await backend.infer(MODEL, _image())
        assert sum(s.failures for s in backend.replica_stats()) == 5  # 2 per replica + 1

    _run(world, body)


def test_a_wrong_request_is_not_retried_and_ejects_nothing(world: _World) -> None:
    world.servers[A].infer_error = world.servers[B].infer_error = "INVALID_ARGUMENT"

    async def body(backend: TritonBackend) -> None:
        with pytest.raises(BackendError, match="failed: refused"):
            await backend.infer(MODEL, _image())
        assert backend.retried_slices == 0
        assert all(s.healthy and s.ejections == 0 for s in backend.replica_stats())

    _run(world, body)


def test_a_replica_serving_another_model_version_is_kept_out(world: _World) -> None:
    world.servers[B].ready = False

    async def body(backend: TritonBackend) -> None:
        world.servers[B].version = "2.0"
        world.servers[B].ready = True
        await asyncio.sleep(0.1)
        assert not _stats(backend)[B].healthy
        assert "other model versions" in _stats(backend)[B].reason
        assert backend.model_info(MODEL).version == "1.0"

    _run(world, body)


def test_gateway_metrics_count_replicas_by_state_and_retried_slices(world: _World) -> None:
    world.servers[A].infer_error = "UNAVAILABLE"
    metrics = GatewayMetrics()

    async def body(backend: TritonBackend) -> None:
        world.servers[A].ready = False  # keep it out once ejected
        for _ in range(3):
            await backend.infer(MODEL, _image(batch=2))
        metrics.observe_replicas(backend)
        metrics.observe_replicas(backend)  # counts only what is new

    _run(world, body)
    sample = metrics.registry.get_sample_value
    assert sample("ctjoint_triton_replicas", {"state": "healthy"}) == 1
    assert sample("ctjoint_triton_replicas", {"state": "ejected"}) == 1
    assert sample("ctjoint_retried_slices_total") == 2


def _stats(backend: TritonBackend) -> dict[str, Any]:
    return {s.address: s for s in backend.replica_stats()}
