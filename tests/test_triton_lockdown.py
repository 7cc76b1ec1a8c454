"""Triton as the gateway starts it is locked down: loopback only, gRPC only (no HTTP, no
metrics unless asked), and the model repository cannot be changed over the API (load and
unload are refused). Against a real tritonserver serving a one-file python-backend model."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import figures
import numpy as np
import pytest

from ctjoint.gateway.triton_server import (
    TritonInstall,
    TritonServer,
    TritonServerConfig,
    TritonServerError,
    find_install,
    free_ports,
    server_args,
)

triton_grpc = pytest.importorskip("tritonclient.grpc")
# Beside the other tritonserver tests, on one worker (the machine has few cores).
pytestmark = pytest.mark.xdist_group("tritonserver")

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 4 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", x)]))
        return out
"""


def _write_model(repository: Path, name: str) -> None:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(ECHO_CONFIG.replace('"echo"', f'"{name}"'))
    (folder / "1" / "model.py").write_text(ECHO_MODEL)


def _install() -> TritonInstall:
    try:
        return find_install()
    except TritonServerError as err:
        pytest.skip(f"no tritonserver here: {err}")


@pytest.fixture(scope="module")
def locked_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver with the defaults the gateway's tooling uses (only the port chosen)."""
    root = tmp_path_factory.mktemp("lockdown")
    repository = root / "repository"
    _write_model(repository, "echo")
    (grpc_port,) = free_ports(1)
    server = TritonServer(
        TritonServerConfig(repository, grpc_port=grpc_port),
        install=_install(),
        log_file=root / "triton.log",
    )
    server.start()
    try:
        seconds = server.wait_ready(120)
    except BaseException:
        server.stop()
        raise
    figures.record("triton lockdown: start to READY (gRPC readiness)", seconds=round(seconds, 2))
    yield server
    server.stop()


def _listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on (from /proc, no tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    listening = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            listening.add((_address(address_hex, width), int(port_hex, 16)))
    return listening


def _address(hex_text: str, width: int) -> str:
    if width == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_text)))
    words = [bytes.fromhex(hex_text[i : i + 8])[::-1] for i in range(0, 32, 8)]
    address = ipaddress.IPv6Address(b"".join(words))
    # gRPC binds "127.0.0.1" as an IPv4-mapped address on a dual-stack socket.
    return str(address.ipv4_mapped or address)


def test_only_the_grpc_port_listens_and_only_on_loopback(locked_triton: TritonServer) -> None:
    assert locked_triton.pid is not None
    ports = _listening_ports(locked_triton.pid)
    assert ports == {("127.0.0.1", locked_triton.config.grpc_port)}


def test_repository_load_and_unload_are_refused_over_grpc(locked_triton: TritonServer) -> None:
    repository = locked_triton.config.repository
    # A model that appears after start-up cannot be loaded into the running server either.
    _write_model(repository, "intruder")
    client = triton_grpc.InferenceServerClient(locked_triton.config.grpc_url)
    try:
        for call in (
            lambda: client.unload_model("echo"),
            lambda: client.load_model("echo"),
            lambda: client.load_model("intruder"),
        ):
            with pytest.raises(triton_grpc.InferenceServerException) as refused:
                call()
            assert "explicit model load / unload is not allowed" in str(refused.value)
        # Refused means nothing changed: echo still serves, the intruder never loaded.
        assert client.is_model_ready("echo")
        assert not client.is_model_ready("intruder")
        x = triton_grpc.InferInput("x", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        answer = client.infer("echo", [x])
        np.testing.assert_array_equal(answer.as_numpy("y"), np.arange(4, dtype=np.float32))
    finally:
        client.close()


def test_http_and_metrics_are_off_unless_a_port_is_given(tmp_path: Path) -> None:
    install = TritonInstall(binary=Path("/bin/tritonserver"))
    closed = server_args(TritonServerConfig(tmp_path), install)
    assert "--allow-http=false" in closed and "--allow-metrics=false" in closed
    assert "--model-control-mode=none" in closed
    assert "--grpc-address=127.0.0.1" in closed
    assert not any(a.startswith(("--http-port", "--metrics-port")) for a in closed)
    opened = server_args(TritonServerConfig(tmp_path, http_port=8000, metrics_port=8002), install)
    assert {"--allow-http=true", "--http-port=8000", "--http-address=127.0.0.1"} <= set(opened)
    assert {"--allow-metrics=true", "--metrics-port=8002"} <= set(opened)


def test_readiness_is_polled_over_grpc_without_http(locked_triton: TritonServer) -> None:
    assert locked_triton.config.http_url is None
    started = time.perf_counter()
    assert locked_triton.wait_ready(5) < 5
    assert time.perf_counter() - started < 5
