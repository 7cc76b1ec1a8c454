"""Against a REAL tritonserver (the nvidia-pytriton wheel's CPU build) on 127.0.0.1.

One session-scoped server serves a CPU repository generated from the spec around the
band-rule contract models: both ensembles answer with the contract shapes, the Triton backend
reproduces the embedded backend, the dynamic batcher really batches, a bad request in a batch
fails alone, and the gateway in Triton mode answers as in embedded mode.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from ctjoint import contracts
from ctjoint.export.triton_repository import write_repository
from ctjoint.gateway.aggregate import aggregate_slice_probabilities, softmax
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer
from ctjoint.gateway.backends.base import InferenceBackend, ModelOutputs
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.backends.triton import (
    MAX_IN_FLIGHT_PER_SCAN,
    REQUEST_SLICES,
    TritonBackend,
)
from ctjoint.gateway.deadlines import set_deadline
from ctjoint.gateway.errors import BackendUnavailableError, DeadlineExceededError
from ctjoint.gateway.preprocess import PreprocessPlan
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.triton_server import (
    TritonServer,
    TritonServerConfig,
    TritonServerError,
    find_install,
    free_ports,
)

# One server for the whole run: `make test` keeps this module on one xdist worker.
pytestmark = [pytest.mark.xdist_group("tritonserver"), pytest.mark.timeout(600)]

READY_DEADLINE_S = 120.0
PROB_TOLERANCE = 1e-4
MASK_AGREEMENT = 0.999


@pytest.fixture(scope="session")
def triton(
    tmp_path_factory: pytest.TempPathFactory, contract_model_dir: Path
) -> Iterator[TritonServerConfig]:
    """A real tritonserver on free loopback ports, stopped on teardown."""
    try:
        install = find_install()
    except TritonServerError as err:
        pytest.skip(f"no tritonserver here: {err}")
    root = tmp_path_factory.mktemp("triton")
    repository = root / "repository"
    write_repository(repository, target="cpu", onnx_dir=contract_model_dir)
    grpc_port, http_port, metrics_port = free_ports(3)
    config = TritonServerConfig(
        repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
    )
    server = TritonServer(config, install=install, log_file=root / "tritonserver.log")
    server.start()
    try:
        seconds = server.wait_ready(READY_DEADLINE_S)
        print(f"tritonserver ready in {seconds:.1f} s on {config.grpc_url}")
        yield config
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(triton: TritonServerConfig) -> Iterator[triton_grpc.InferenceServerClient]:
    with triton_grpc.InferenceServerClient(triton.grpc_url) as connection:
        yield connection


def _plan(client: triton_grpc.InferenceServerClient, model: str) -> PreprocessPlan:
    config = client.get_model_config(model, as_json=True)["config"]
    return PreprocessPlan.from_json(config["parameters"][contracts.ONNX_META_PLAN]["string_value"])


def _image(plan: PreprocessPlan, batch: int, seed: int = 0) -> np.ndarray:
    shape = (batch, plan.channels, plan.height, plan.width)
    if plan.kind == "3d":
        shape = (batch, 1, plan.depth, plan.height, plan.width)
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _stats(client: triton_grpc.InferenceServerClient, model: str) -> tuple[int, int, dict]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    # Protobuf JSON leaves out empty fields: a model that has run no batch yet (the first test
    # to use this server) has no `batch_stats` at all.
    batches = {
        int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])
    }
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), batches


def test_tritonserver_serves_every_model_ready(
    client: triton_grpc.InferenceServerClient,
) -> None:
    index = {
        m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]
    }
    for model in contracts.MODEL_NAMES:
        for name in (
            model,
            contracts.triton_model_name(model, contracts.TRITON_VARIANT_CPU),
            contracts.triton_postprocess_name(model),
        ):
            assert index.get(name) == "READY", f"{name}: {index.get(name)}"


@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
def test_ensemble_answers_with_the_contract_shapes(
    client: triton_grpc.InferenceServerClient, model: str
) -> None:
    plan = _plan(client, model)
    batch = 2
    image = _image(plan, batch)
    request = triton_grpc.InferInput(contracts.INPUT_IMAGE, list(image.shape), "FP32")
    request.set_data_from_numpy(image)
    result = client.infer(model, [request])
    grid = (plan.depth, plan.height, plan.width) if plan.kind == "3d" else (plan.height, plan.width)
    mask = result.as_numpy(contracts.POST_MASK)
    area = result.as_numpy(contracts.POST_LESION_AREA)
    seg = result.as_numpy(contracts.ENSEMBLE_LESION_LOGITS)
    cls = result.as_numpy(contracts.ENSEMBLE_DIAGNOSIS_LOGITS)
    assert mask.dtype == np.uint8 and mask.shape == (batch, *grid)
    assert area.dtype == np.int64
    assert area.shape == (batch, *grid[:-2], len(contracts.LESION_CLASS_NAMES))
    assert seg.shape == (batch, len(contracts.SEG_CLASS_NAMES), *grid)
    assert cls.shape == (batch, len(contracts.CLASS_NAMES))
    np.testing.assert_array_equal(mask, np.argmax(seg, axis=1))
    assert int(area[..., 0].sum()) == int((mask == contracts.SEG_GROUND_GLASS).sum())


def _analyze(backend: InferenceBackend, series: Path, model: str, **kwargs: int) -> ScanAnalysis:
    files = [(p.name, p) for p in list_series_files(series)]

    async def run() -> ScanAnalysis:
        async with backend:
            return await ScanAnalyzer(backend, **kwargs).analyze_files(files, model)

    return asyncio.run(run())


class _Recording(TritonBackend):
    """The Triton backend, keeping every batch of outputs it hands the analysis."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(url, (model,), load_timeout_s=30)
        self.cls_logits: list[np.ndarray] = []

    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        outputs = await super().infer(model, image)
        self.cls_logits.append(outputs.cls_logits)
        return outputs


@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
def test_the_scan_probabilities_are_one_softmax_of_the_served_logits(
    triton: TritonServerConfig,
    client: triton_grpc.InferenceServerClient,
    ct_series_dir: Path,
    model: str,
) -> None:
    """Exactly one softmax per request: no Triton model declares a probability output (the
    ensemble returns logits, mask and lesion counts), and the gateway's probabilities are
    the softmax of the logits Triton served, taken once (a second softmax would pull them
    towards 1/3)."""
    config = client.get_model_config(model, as_json=True)["config"]
    served_outputs = {o["name"] for o in config["output"]} - {contracts.OUTPUT_CAM}
    assert served_outputs == {
        contracts.POST_MASK,
        contracts.POST_LESION_AREA,
        contracts.ENSEMBLE_LESION_LOGITS,
        contracts.ENSEMBLE_DIAGNOSIS_LOGITS,
    }
    backend = _Recording(triton.grpc_url, model)
    analysis = _analyze(backend, ct_series_dir, model, batch_size=REQUEST_SLICES)
    logits = np.concatenate(backend.cls_logits)
    if model == contracts.MODEL_JCS2D:
        expected = aggregate_slice_probabilities(softmax(logits, axis=1))
    else:
        expected = softmax(logits, axis=1)[0]
    served = [analysis.result.probabilities[c] for c in contracts.CLASS_NAMES]
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", contracts.MODEL_NAMES)
def test_triton_backend_equals_the_embedded_backend(
    triton: TritonServerConfig, contract_model_dir: Path, ct_series_dir: Path, model: str
) -> None:
    embedded = _analyze(
        EmbeddedBackend((model,), model_dir=contract_model_dir, intra_op_threads=1),
        ct_series_dir,
        model,
    )
    served = _analyze(
        TritonBackend(triton.grpc_url, (model,), load_timeout_s=30),
        ct_series_dir,
        model,
        batch_size=REQUEST_SLICES,
        max_in_flight=MAX_IN_FLIGHT_PER_SCAN,
    )
    diff = max(
        abs(embedded.result.probabilities[c] - served.result.probabilities[c])
        for c in contracts.CLASS_NAMES
    )
    agreement = float(np.mean(embedded.label_map == served.label_map))
    print(f"{model}: max abs probability diff {diff:.2e}, mask agreement {agreement:.6f}")
    assert served.result.backend == "triton"
    assert served.result.label == embedded.result.label
    assert diff <= PROB_TOLERANCE
    assert agreement >= MASK_AGREEMENT
    assert served.result.lesions.voxels == embedded.result.lesions.voxels


def test_dynamic_batcher_forms_batches_under_concurrent_load(
    triton: TritonServerConfig, client: triton_grpc.InferenceServerClient
) -> None:
    model = contracts.MODEL_JCS2D
    network = contracts.triton_model_name(model, contracts.TRITON_VARIANT_CPU)
    plan = _plan(client, model)
    requests = 48
    before = _stats(client, network)

    async def send() -> None:
        async with triton_aio.InferenceServerClient(triton.grpc_url) as aio:
            calls = []
            for i in range(requests):
                image = _image(plan, 1, seed=i)
                request = triton_aio.InferInput(contracts.INPUT_IMAGE, list(image.shape), "FP32")
                request.set_data_from_numpy(image)
                calls.append(aio.infer(model, [request]))
            await asyncio.gather(*calls)

    asyncio.run(send())
    after = _stats(client, network)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    formed = {size: n - before[2].get(size, 0) for size, n in after[2].items()}
    formed = {size: n for size, n in sorted(formed.items()) if n}
    print(f"{requests} requests -> {executions} executions; batch sizes formed: {formed}")
    assert inferences == requests
    assert executions < requests
    assert max(formed) > 1


def test_a_bad_request_in_a_batch_fails_in_its_own_response(
    triton: TritonServerConfig, client: triton_grpc.InferenceServerClient
) -> None:
    network = contracts.triton_model_name(contracts.MODEL_JCS2D, contracts.TRITON_VARIANT_CPU)
    plan = _plan(client, contracts.MODEL_JCS2D)
    bad_index = 5
    before = _stats(client, network)

    async def send() -> list[object]:
        async with triton_aio.InferenceServerClient(triton.grpc_url) as aio:
            calls = []
            for i in range(12):
                image = _image(plan, 1, seed=i)
                if i == bad_index:
                    image[0, 1, 3, 3] = np.nan
                request = triton_aio.InferInput(contracts.INPUT_IMAGE, list(image.shape), "FP32")
                request.set_data_from_numpy(image)
                calls.append(aio.infer(network, [request]))
            return list(await asyncio.gather(*calls, return_exceptions=True))

    results = asyncio.run(send())
    after = _stats(client, network)
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [bad_index]
    error = results[bad_index]
    assert isinstance(error, InferenceServerException)
    assert "image contains NaN or infinite values" in str(error)
    assert after[1] - before[1] < len(results), "the requests were not batched together"


def test_postprocess_refuses_non_finite_logits_in_their_own_response(
    client: triton_grpc.InferenceServerClient,
) -> None:
    plan = _plan(client, contracts.MODEL_JCS2D)
    seg = np.zeros((1, 3, plan.height, plan.width), np.float32)
    cls = np.array([[np.inf, 0.0, 0.0]], np.float32)
    inputs = []
    for name, data in ((contracts.OUTPUT_SEG_LOGITS, seg), (contracts.OUTPUT_CLS_LOGITS, cls)):
        tensor = triton_grpc.InferInput(name, list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException, match="logits contain NaN or infinite values"):
        client.infer(contracts.triton_postprocess_name(contracts.MODEL_JCS2D), inputs)


def test_triton_backend_reads_the_model_info_from_the_ensemble(
    triton: TritonServerConfig, contract_model_dir: Path
) -> None:
    async def run() -> None:
        async with (
            TritonBackend(triton.grpc_url, load_timeout_s=30) as backend,
            EmbeddedBackend(model_dir=contract_model_dir) as embedded,
        ):
            for model in contracts.MODEL_NAMES:
                served, local = backend.model_info(model), embedded.model_info(model)
                assert (served.plan, served.version, served.input_shape) == (
                    local.plan,
                    local.version,
                    local.input_shape,
                )
                assert served.max_batch_size > 1

    asyncio.run(run())


def test_a_passed_deadline_is_deadline_exceeded(triton: TritonServerConfig) -> None:
    async def run() -> None:
        async with TritonBackend(triton.grpc_url, load_timeout_s=30) as backend:
            plan = backend.model_info(contracts.MODEL_JCS2D).plan
            set_deadline(-1.0)
            with pytest.raises(DeadlineExceededError, match="deadline passed"):
                await backend.infer(contracts.MODEL_JCS2D, _image(plan, 1))

    asyncio.run(run())


def test_a_triton_that_is_not_running_is_unavailable_with_its_address() -> None:
    (port,) = free_ports(1)

    async def run() -> None:
        backend = TritonBackend(f"127.0.0.1:{port}", load_timeout_s=1.0)
        try:
            with pytest.raises(BackendUnavailableError, match=f"Triton at 127.0.0.1:{port}"):
                await backend.load()
            assert not backend.ready
            assert f"127.0.0.1:{port}" in backend.unavailable_reason
        finally:
            await backend.close()

    asyncio.run(run())


# --- the gateway in Triton mode ---------------------------------------------------------------


def _gateway_helpers() -> object:
    try:
        import gateway_process
    except ImportError as err:  # the generated proto code does not import with this protobuf
        pytest.skip(f"the gateway's gRPC code cannot be imported here: {err}")
    return gateway_process


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ctjoint.export.phantom import write_phantom_case

    root = tmp_path_factory.mktemp("phantoms")
    return {
        kind: write_phantom_case(root / kind, kind=kind, seed=4100 + i, slices=12, size=64).out_dir
        / contracts.CASE_SERIES_DIR
        for i, kind in enumerate(("covid19", "cap", "normal"))
    }


def test_gateway_in_triton_mode_answers_as_in_embedded_mode(
    triton: TritonServerConfig,
    contract_model_dir: Path,
    phantom_cases: dict[str, Path],
    tmp_path: Path,
) -> None:
    helpers = _gateway_helpers()
    process = helpers.GatewayProcess  # type: ignore[attr-defined]
    embedded = process(contract_model_dir, tmp_path / "embedded.log").start()
    served = process(
        contract_model_dir,
        tmp_path / "triton.log",
        "--backend",
        "triton",
        "--triton-url",
        triton.grpc_url,
    ).start()
    try:
        for model in contracts.MODEL_NAMES:
            for kind, series in phantom_cases.items():
                files = helpers.file_bytes(list_series_files(series))  # type: ignore[attr-defined]
                times = []
                results = []
                for gateway in (embedded, served):
                    started = time.perf_counter()
                    results.append(
                        helpers.analyze(  # type: ignore[attr-defined]
                            gateway.address, files, model=model, masks=True, timeout=120
                        )
                    )
                    times.append(time.perf_counter() - started)
                local, remote = results
                diff = float(np.max(np.abs(np.subtract(local.probabilities, remote.probabilities))))
                print(
                    f"{model} {kind}: label {remote.label}, max prob diff {diff:.1e}, "
                    f"embedded {times[0]:.2f} s, triton {times[1]:.2f} s"
                )
                assert remote.backend == "triton" and local.label == remote.label
                assert diff <= PROB_TOLERANCE
                assert local.mask == remote.mask
    finally:
        served.stop()
        embedded.stop()


def test_gateway_without_its_triton_is_not_serving_and_unavailable(tmp_path: Path) -> None:
    helpers = _gateway_helpers()
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    (port,) = free_ports(1)
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ctjoint.cli",
                "gateway",
                "serve",
                "--port",
                "0",
                "--backend",
                "triton",
                "--triton-url",
                f"127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    try:
        address = _wait_for_listening(log_path, gateway)
        with grpc.insecure_channel(address) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=5)
                .status
            )
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            helpers.analyze(address, [b"x"], timeout=10)  # type: ignore[attr-defined]
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The details name no internal address; the log keeps it for the operator.
        assert "Triton at <address>" in info.value.details()
        assert str(port) not in info.value.details()
    finally:
        gateway.terminate()
        gateway.wait(30)


def _wait_for_listening(log_path: Path, process: subprocess.Popen[bytes]) -> str:
    import re

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}:\n{log_path.read_text()}")
        found = re.search(r"listening on (\S+):(\d+) ", log_path.read_text(errors="replace"))
        if found:
            return f"{found.group(1)}:{found.group(2)}"
        time.sleep(0.1)
    raise AssertionError(f"gateway did not listen:\n{log_path.read_text()}")


def test_perf_analyzer_sweep_writes_csv_and_json(
    triton: TritonServerConfig, tmp_path: Path
) -> None:
    from ctjoint.export.triton_perf import PerfAnalyzerError, find_perf_analyzer, run_perf_analyzer

    try:
        find_perf_analyzer()
    except PerfAnalyzerError as err:
        pytest.skip(str(err))
    report = run_perf_analyzer(
        model=contracts.MODEL_JCS2D,
        url=triton.grpc_url,
        concurrency="1:2",
        out_dir=tmp_path,
        # CI runs this on 2 cores beside the rest of the suite: windows vary a lot, and the
        # test is about the sweep's output, not a stable figure.
        measurement_ms=1500,
        stability_percent=100,
    )
    print(report.summary())
    assert [r.concurrency for r in report.rows] == [1, 2]
    assert all(r.throughput_per_s > 0 for r in report.rows)
    assert report.csv_path.is_file() and report.json_path.is_file()
