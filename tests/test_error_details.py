"""Error details name no internal address (issue 21, point 9): a gateway whose Triton is down
and whose PACS is unreachable answers UNAVAILABLE with details that say what is wrong, not
where our dependencies are; its log still names them for the operator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dicom_factory import write_ct_series
from gateway_process import GatewayProcess, channel, file_bytes, requests

from ctjoint.gateway.interceptors import public_details
from ctjoint.gateway.triton_server import free_ports
from ctjoint.v1 import scan_pb2, scan_pb2_grpc


@pytest.mark.parametrize(
    ("message", "public"),
    [
        (
            "no Triton replica is ready (10.1.2.3:8001: StatusCode.UNAVAILABLE: "
            "ipv4:10.1.2.3:8001: Connection refused)",
            "no Triton replica is ready (<address>: StatusCode.UNAVAILABLE: <address> "
            "Connection refused)",
        ),
        ("Triton at triton.ns.svc:8001 is not ready", "Triton at <address> is not ready"),
        ("Triton at [fd00::5]:8001 failed", "Triton at <address> failed"),
        ("STOW to https://pacs.example:8443/dicom-web failed", "STOW to <url> failed"),
        ("cannot read /srv/ctjoint/models/jcs2d.onnx", "cannot read <path>"),
        ("a worker (pid 4242) died", "a worker (pid <n>) died"),
        (
            "file 3: PixelSpacing: [0.7, 0.7] differs from file 1 [0.8, 0.8]",
            "file 3: PixelSpacing: [0.7, 0.7] differs from file 1 [0.8, 0.8]",
        ),
        (
            "at slice 3: a 1/20 to 10 times the spacing, 0.1-20 mm",
            "at slice 3: a 1/20 to 10 times the spacing, 0.1-20 mm",
        ),
    ],
)
def test_public_details_hide_addresses_paths_and_pids_only(message: str, public: str) -> None:
    assert public_details(message) == public


@pytest.fixture
def stranded_gateway(
    contract_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, int, int]]:
    """A gateway on the Triton backend pointed at a port nobody listens on, with a PACS on
    another such port; it serves (NOT_SERVING health, UNAVAILABLE scans) without either."""
    triton_port, pacs_port = free_ports(2)
    gateway = GatewayProcess(
        contract_model_dir,
        tmp_path / "gateway.log",
        "--backend",
        "triton",
        "--triton-url",
        f"127.0.0.1:{triton_port}",
        "--pacs-ae",
        "ARCHIVE",
        "--pacs-host",
        "127.0.0.1",
        "--pacs-port",
        str(pacs_port),
    )
    try:
        # It listens, but its health stays NOT_SERVING without Triton.
        gateway.start(wait_serving=False)
        yield gateway, triton_port, pacs_port
    finally:
        gateway.stop()


def _no_address(details: str, *ports: int) -> None:
    assert "127.0.0.1" not in details, details
    for port in ports:
        assert str(port) not in details, details
    assert "/tmp" not in details and "pid" not in details, details


@pytest.mark.timeout(120)
def test_a_gateway_without_triton_and_pacs_names_neither_address(
    stranded_gateway: tuple[GatewayProcess, int, int], tmp_path: Path
) -> None:
    gateway, triton_port, pacs_port = stranded_gateway
    series = file_bytes(write_ct_series(tmp_path / "series", slices=4))
    seen = []
    with channel(gateway.address) as ch:
        stub = scan_pb2_grpc.ScanServiceStub(ch)
        for call in (
            lambda: stub.GetModelInfo(scan_pb2.GetModelInfoRequest(), timeout=10),
            lambda: stub.GetModelInfo(scan_pb2.GetModelInfoRequest(model="jcs2d"), timeout=10),
            lambda: stub.AnalyzeScan(requests(series), timeout=30),
        ):
            with pytest.raises(grpc.RpcError) as failed:
                call()
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
            details = failed.value.details() or ""
            _no_address(details, triton_port, pacs_port)
            seen.append(details)
    # The details still say what is wrong; the log says where, for the operator.
    assert all("Triton" in d or "worker" in d for d in seen), seen
    assert f"127.0.0.1:{triton_port}" in gateway.log()
