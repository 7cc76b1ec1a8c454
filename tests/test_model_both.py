"""`--model both`: jcs2d and deepsc3d on one upload, a fused answer beside each one's own.

Embedded (in process and through `ctjoint analyze`), a real gateway process (`ctjoint send`)
and a real gateway in front of a real tritonserver all give the same answer, and each
member's answer is exactly what that network alone gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gateway_process import GatewayProcess, analyze, ctjoint, file_bytes

from ctjoint.client.results import result_dict
from ctjoint.contracts import CLASS_NAMES, MODEL_BOTH, MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.gateway.analysis import ScanAnalysis, analyze_directory, fuse_analyses
from ctjoint.gateway.review import MODELS_DISAGREE, THICK_SLICES, Review

pytestmark = pytest.mark.timeout(600)
PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    process = GatewayProcess(contract_model_dir, tmp_path_factory.mktemp("gw") / "gateway.log")
    process.start()
    yield process
    process.stop()


def _alone(series: Path, model_dir: Path) -> dict[str, ScanAnalysis]:
    return {
        model: analyze_directory(series, model=model, model_dir=model_dir)
        for model in (MODEL_JCS2D, MODEL_DEEPSC3D)
    }


def test_both_fuses_the_mean_and_keeps_each_networks_own_answer(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    both = analyze_directory(ct_series_dir, model=MODEL_BOTH, model_dir=contract_model_dir)
    alone = _alone(ct_series_dir, contract_model_dir)
    result = both.result
    assert result.model == MODEL_BOTH
    assert [m.model for m in result.members] == [MODEL_JCS2D, MODEL_DEEPSC3D]
    for member in result.members:
        single = alone[member.model].result
        assert member.label == single.label
        assert member.probabilities == pytest.approx(single.probabilities, abs=1e-6)
        assert member.review.reasons == single.review.reasons
        assert member.lesion_volume_ml == pytest.approx(single.lesions.total_volume_ml)
    mean = {
        name: (
            alone[MODEL_JCS2D].result.probabilities[name]
            + alone[MODEL_DEEPSC3D].result.probabilities[name]
        )
        / 2
        for name in CLASS_NAMES
    }
    assert result.probabilities == pytest.approx(mean, abs=1e-6)
    assert result.label == max(mean, key=mean.__getitem__)
    # Masks, lesions and slice evidence are jcs2d's.
    np.testing.assert_array_equal(both.label_map, alone[MODEL_JCS2D].label_map)
    assert result.lesions == alone[MODEL_JCS2D].result.lesions
    labels = {m.label for m in result.members}
    assert (MODELS_DISAGREE in result.review.reasons) == (len(labels) > 1)


def test_networks_that_disagree_flag_the_fused_answer(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    """Two analyses of one scan that disagree (the second's probabilities swapped to CAP):
    the fused label is the mean's argmax and the review names both networks."""
    from dataclasses import replace

    first = analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=contract_model_dir)
    other = replace(
        first.result,
        model=MODEL_DEEPSC3D,
        label="cap",
        probabilities={"covid19": 0.05, "cap": 0.9, "normal": 0.05},
        review=Review(),
    )
    fused = fuse_analyses([first, replace(first, result=other)]).result
    p = first.result.probabilities
    expected = {
        "covid19": (p["covid19"] + 0.05) / 2,
        "cap": (p["cap"] + 0.9) / 2,
        "normal": (p["normal"] + 0.05) / 2,
    }
    assert fused.probabilities == pytest.approx(expected, abs=1e-6)
    assert fused.label == max(expected, key=expected.__getitem__)
    if first.result.label != "cap":
        assert MODELS_DISAGREE in fused.review.reasons
        assert f"jcs2d {first.result.label}, deepsc3d cap" in " ".join(fused.review.details)


def test_a_gateway_answers_both_as_the_embedded_analysis_does(
    gateway: GatewayProcess, ct_series_dir: Path, contract_model_dir: Path
) -> None:
    files = sorted(ct_series_dir.iterdir())
    message = analyze(gateway.address, file_bytes(files), model=MODEL_BOTH, masks=True)
    embedded = analyze_directory(ct_series_dir, model=MODEL_BOTH, model_dir=contract_model_dir)
    ours, theirs = result_dict(message), embedded.result.to_dict()
    ours.pop("timings"), theirs.pop("timings")
    assert ours == theirs
    assert [m.model.name for m in message.members] == [MODEL_JCS2D, MODEL_DEEPSC3D]


def test_an_unknown_model_names_both_among_the_choices(
    gateway: GatewayProcess, ct_series_dir: Path
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        analyze(gateway.address, file_bytes(sorted(ct_series_dir.iterdir())), model="all")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected one of jcs2d, deepsc3d, both" in (info.value.details() or "")


def test_send_and_analyze_both_write_the_same_members_and_review(
    gateway: GatewayProcess, tmp_path: Path, contract_model_dir: Path
) -> None:
    from dicom_factory import SMALL_SERIES_LESIONS, write_ct_series

    series = tmp_path / "thick"
    # 8 mm slices: every answer carries the thick-slices reason, fused and per network.
    write_ct_series(series, slices=8, size=32, spacing_z=8.0, lesions=SMALL_SERIES_LESIONS)
    sent = ctjoint(
        "send",
        str(series),
        "--gateway",
        gateway.address,
        "--model",
        "both",
        "--out",
        str(tmp_path / "sent"),
        "--no-progress",
    )
    assert sent.returncode == 0, sent.stderr
    assert "Review:        needed: " in sent.stdout
    assert "slices of 8 mm, thicker than the 5 mm the models were trained on" in sent.stdout
    local = ctjoint(
        "analyze",
        str(series),
        "--model",
        "both",
        "--model-dir",
        str(contract_model_dir),
        "--json",
        str(tmp_path / "local.json"),
        "--png",
        str(tmp_path / "local.png"),
    )
    assert local.returncode == 0, local.stderr
    remote = json.loads((tmp_path / "sent" / "result.json").read_text())
    mine = json.loads((tmp_path / "local.json").read_text())
    assert remote["members"] == mine["members"] and remote["review"] == mine["review"]
    assert remote["model"]["name"] == MODEL_BOTH
    assert THICK_SLICES in remote["review"]["reasons"]
    assert all(THICK_SLICES in m["review"]["reasons"] for m in remote["members"])
    assert (tmp_path / "sent" / "overlay.png").stat().st_size > 0


# --- through Triton ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_url(tmp_path_factory: pytest.TempPathFactory, contract_model_dir: Path) -> Iterator[str]:
    """A real tritonserver serving the contract models on free loopback ports."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from ctjoint.export.triton_repository import write_repository
    from ctjoint.gateway.triton_server import (
        TritonServer,
        TritonServerConfig,
        TritonServerError,
        find_install,
        free_ports,
    )

    try:
        install = find_install()
    except TritonServerError as err:
        pytest.skip(f"no tritonserver here: {err}")
    root = tmp_path_factory.mktemp("triton-both")
    write_repository(root / "repository", target="cpu", onnx_dir=contract_model_dir)
    grpc_port, http_port, metrics_port = free_ports(3)
    config = TritonServerConfig(
        root / "repository", grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
    )
    server = TritonServer(config, install=install, log_file=root / "tritonserver.log")
    server.start()
    try:
        server.wait_ready(120.0)
        yield config.grpc_url
    finally:
        server.stop()


@pytest.mark.xdist_group("tritonserver")
def test_both_through_triton_answers_as_embedded(
    triton_url: str, ct_series_dir: Path, contract_model_dir: Path, tmp_path: Path
) -> None:
    served = GatewayProcess(
        contract_model_dir,
        tmp_path / "triton.log",
        "--backend",
        "triton",
        "--triton-url",
        triton_url,
    ).start()
    try:
        files = file_bytes(sorted(ct_series_dir.iterdir()))
        remote = analyze(served.address, files, model=MODEL_BOTH, masks=True, timeout=120)
    finally:
        served.stop()
    local = analyze_directory(ct_series_dir, model=MODEL_BOTH, model_dir=contract_model_dir)
    assert remote.backend == "triton"
    assert remote.label == local.result.label
    assert [m.label for m in remote.members] == [m.label for m in local.result.members]
    diff = np.max(
        np.abs(
            np.subtract(remote.probabilities, [local.result.probabilities[c] for c in CLASS_NAMES])
        )
    )
    assert diff <= PROB_TOLERANCE
    assert list(remote.review.reasons) == list(local.result.review.reasons)
