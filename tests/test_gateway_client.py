"""`ctjoint send` and `ctjoint watch` against a real gateway process: phantoms come back with
the masks and result of the embedded analysis, failures are one line with the status code."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from dicom_factory import write_ct_series
from gateway_process import GatewayProcess, ctjoint, metric_value
from test_packaging import BLOCK_HEAVY

from ctjoint.client import send as send_module
from ctjoint.client.send import SendError, send_series
from ctjoint.contracts import (
    ADMITTED_METADATA,
    CASE_SERIES_DIR,
    CLASS_NAMES,
    MODEL_DEEPSC3D,
    MODEL_JCS2D,
)
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

PHANTOM_KINDS = ("covid19", "cap", "normal")
# On top of the heavy packages: nothing of the gateway side either (its code, its servers).
BLOCK_GATEWAY = """
class _BlockGateway:
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("ctjoint.gateway", "ctjoint.export")) or name.split(".")[0] in {
            "prometheus_client", "grpc_health", "grpc_reflection"
        }:
            raise ImportError("blocked for this test: " + name)
        return None
sys.meta_path.insert(0, _BlockGateway())
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    process = GatewayProcess(contract_model_dir, tmp_path_factory.mktemp("gw") / "gateway.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small phantom series per class (seeds unseen by training)."""
    from ctjoint.export.phantom import write_phantom_case

    root = tmp_path_factory.mktemp("phantoms")
    return {
        kind: write_phantom_case(root / kind, kind=kind, seed=9100 + i, slices=16, size=128).out_dir
        / CASE_SERIES_DIR
        for i, kind in enumerate(PHANTOM_KINDS)
    }


def _assert_same_as_embedded(out: Path, series: Path, model: str, model_dir: Path) -> None:
    embedded = analyze_directory(series, model=model, model_dir=model_dir)
    sent = json.loads((out / "result.json").read_text())
    expected = embedded.result.to_dict()
    assert set(expected.pop("timings")) <= set(sent.pop("timings"))
    assert sent == expected
    with np.load(out / "masks.npz") as masks:
        np.testing.assert_array_equal(masks["labels"], embedded.label_map)
        assert len(masks["slice_file_number"]) == embedded.label_map.shape[0]
        # File names can carry patient data: the masks file holds none.
        assert set(masks.files) == {"labels", "class_names", "slice_file_number", "spacing_mm"}
    assert (out / "overlay.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_a_phantom_sent_by_the_client_matches_the_embedded_analysis(
    gateway: GatewayProcess,
    phantoms: dict[str, Path],
    contract_model_dir: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    out = tmp_path / "out"
    done = ctjoint("send", str(phantoms[kind]), "--gateway", gateway.address, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "Label:" in done.stdout and "Lesions:" in done.stdout
    _assert_same_as_embedded(out, phantoms[kind], MODEL_JCS2D, contract_model_dir)


def test_the_3d_model_through_the_client_matches_too(
    gateway: GatewayProcess, phantoms: dict[str, Path], contract_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    series = phantoms["covid19"]
    done = ctjoint(
        "send", str(series), "--gateway", gateway.address, "--model", "deepsc3d", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    _assert_same_as_embedded(out, series, MODEL_DEEPSC3D, contract_model_dir)


def test_a_refused_series_prints_the_status_code_and_exits_non_zero(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    folder = tmp_path / "series"
    write_ct_series(folder, slices=4, size=16)
    (folder / "IM0003.dcm").write_text("not an image\n")
    done = ctjoint("send", str(folder), "--gateway", gateway.address)
    assert done.returncode == 1
    assert done.stderr.startswith(
        "error: INVALID_ARGUMENT: file 3: not a DICOM Part-10 file (no 'DICM' preamble) "
        "(file 3 is IM0003.dcm)"
    )
    assert "Traceback" not in done.stderr + done.stdout


def test_an_unreachable_gateway_is_retried_with_backoff_then_reported(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_ct_series(folder, slices=2, size=16)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    done = ctjoint("send", str(folder), "--gateway", address, "--retries", "2")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert [line.startswith("gateway unavailable") for line in lines[:-1]] == [True, True]
    assert lines[-1].startswith("error: UNAVAILABLE: ")
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started >= 1.5  # backoff 0.5 s, then 1 s


def test_an_empty_folder_is_a_local_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = ctjoint("send", str(tmp_path / "empty"), "--gateway", "127.0.0.1:1")
    assert done.returncode == 2
    assert "no file to send" in done.stderr


def test_send_runs_with_only_the_client_side_importable(
    gateway: GatewayProcess, ct_series_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = ctjoint(
        "send",
        str(ct_series_dir),
        "--gateway",
        gateway.address,
        "--out",
        str(out),
        code=BLOCK_HEAVY + BLOCK_GATEWAY,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "result.json").read_text())["label"] in CLASS_NAMES


def test_watch_sends_each_complete_series_once(gateway: GatewayProcess, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for name in ("scan-a", "scan-b"):
        write_ct_series(inbox / name, slices=4, size=16)
    results = tmp_path / "results"
    args = ("watch", str(inbox), "--gateway", gateway.address, "--out", str(results))
    timing = ("--settle", "0.3", "--poll", "0.1", "--once")
    first = ctjoint(*args, *timing)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("sending ") == 2
    for name in ("scan-a", "scan-b"):
        assert json.loads((results / name / "result.json").read_text())["series"]["slices"] == 4
    again = ctjoint(*args, *timing)
    assert again.returncode == 0, again.stderr
    assert "sending " not in again.stdout


def test_send_uploads_nothing_into_a_refusal(
    contract_model_dir: Path, ct_series_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ctjoint send` waits for the gateway's admission before streaming files: a full gateway
    answers RESOURCE_EXHAUSTED, and not one file of the series is put on the wire."""
    streamed: list[str] = []
    requests = send_module.scan_requests

    def counted(*args: Any, **kwargs: Any) -> Iterator[scan_pb2.ScanRequest]:
        for request in requests(*args, **kwargs):
            streamed.append(request.WhichOneof("payload") or "")
            yield request

    monkeypatch.setattr(send_module, "scan_requests", counted)
    gateway = GatewayProcess(
        contract_model_dir, tmp_path / "gateway.log", "--max-concurrent-scans", "1"
    ).start()
    release = threading.Event()

    def idle_scan() -> Iterator[scan_pb2.ScanRequest]:
        yield scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=MODEL_JCS2D))
        release.wait(60)

    try:
        with grpc.insecure_channel(gateway.address) as channel:
            holder = scan_pb2_grpc.ScanServiceStub(channel).AnalyzeScan.future(
                idle_scan(), timeout=60
            )
            assert (ADMITTED_METADATA, "1") in tuple(holder.initial_metadata() or ())
            received = metric_value(gateway.metrics(), "ctjoint_received_bytes_total")
            with pytest.raises(SendError, match="RESOURCE_EXHAUSTED"):
                send_series(
                    ct_series_dir,
                    gateway=gateway.address,
                    model=MODEL_JCS2D,
                    retries=0,
                    show_progress=False,
                )
            assert streamed == ["header"]
            assert metric_value(gateway.metrics(), "ctjoint_received_bytes_total") == received
            release.set()
            holder.cancel()
        # With the slot free again, the same series goes through.
        outcome = send_series(
            ct_series_dir, gateway=gateway.address, model=MODEL_JCS2D, show_progress=False
        )
        assert outcome.result["label"] in CLASS_NAMES
        assert streamed.count("file") == len(outcome.files)
        assert metric_value(gateway.metrics(), "ctjoint_received_bytes_total") > received
    finally:
        release.set()
        gateway.stop()
