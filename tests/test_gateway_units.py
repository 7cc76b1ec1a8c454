"""Gateway building blocks without sockets: limits, status mapping, log hygiene, the result's
wire format and its inverse on the client, and the watcher's notion of a complete series."""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from ctjoint import cli
from ctjoint.client.results import ResultFormatError, decode_label_map, result_dict
from ctjoint.client.watch import FolderWatcher, result_folder, series_folders
from ctjoint.contracts import CLASS_NAMES, LESION_CLASS_NAMES
from ctjoint.gateway import errors
from ctjoint.gateway.interceptors import status_for
from ctjoint.gateway.limits import GatewayLimits, ScanSlots
from ctjoint.gateway.logging_setup import (
    REQUEST_ID,
    JsonFormatter,
    RequestIdFilter,
    clean_request_id,
    scrub_uids,
)
from ctjoint.gateway.metrics import GatewayMetrics
from ctjoint.gateway.result import LesionStatistics, ScanResult, SeriesInfo, StageTimings
from ctjoint.gateway.wire import encode_label_map, result_to_proto
from ctjoint.v1 import scan_pb2

# --- limits ------------------------------------------------------------------------------------


def test_the_receive_limit_leaves_room_for_a_file_at_the_size_limit() -> None:
    limits = GatewayLimits(max_file_bytes=1000)
    assert limits.max_receive_message_bytes > 1000
    limits.check_file_size("file 1", 1000)
    with pytest.raises(errors.LimitExceededError, match=r"^file 2: 1001 bytes exceeds"):
        limits.check_file_size("file 2", 1001)


def test_the_slice_limit_names_the_first_file_over_it() -> None:
    limits = GatewayLimits(max_slices=3)
    limits.check_slice_count("file 3", 3)
    with pytest.raises(errors.LimitExceededError, match=r"^file 4: .* 3 slices"):
        limits.check_slice_count("file 4", 4)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_slices"):
        GatewayLimits(max_slices=0)


def test_a_full_slot_table_refuses_at_once_and_frees_on_exit() -> None:
    slots = ScanSlots(1)
    with slots.acquire():
        with pytest.raises(errors.LimitExceededError, match="limit is 1"), slots.acquire():
            pass
        assert slots.in_use == 1
    assert slots.in_use == 0
    with slots.acquire():
        assert slots.in_use == 1


def test_cli_limit_defaults_are_the_gateway_defaults() -> None:
    defaults = GatewayLimits()
    params = inspect.signature(cli.gateway_serve).parameters
    assert params["max_file_bytes"].default == defaults.max_file_bytes
    assert params["max_slices"].default == defaults.max_slices
    assert params["max_concurrent_scans"].default == defaults.max_concurrent_scans


# --- status codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.EmptySeriesError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotDicomError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotCtError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.MissingAttributeError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.MixedSeriesError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InconsistentGeometryError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnsupportedTransferSyntaxError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.LimitExceededError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (errors.BackendUnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.BackendError("x"), grpc.StatusCode.INTERNAL),
        (errors.DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_its_status_code(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error) == code


def test_every_project_error_maps_to_a_code_other_than_unknown() -> None:
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.CtJointError)
    ]
    for cls in classes:
        assert status_for(cls.__new__(cls)) != grpc.StatusCode.UNKNOWN


# --- logs --------------------------------------------------------------------------------------


def test_uids_are_pseudonymised_but_addresses_and_versions_are_not() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1234567"
    text = scrub_uids(f"series {uid} from 127.0.0.1 with grpc 1.85.1 and 2.25.{10**20}")
    assert uid not in text and "2.25." not in text
    assert "127.0.0.1" in text and "1.85.1" in text
    assert scrub_uids(uid) == scrub_uids(uid)  # stable, so log lines still correlate


@pytest.mark.parametrize(
    "candidate", ["", "two words", "x" * 65, "line\nbreak", "1.2.840.10008.5.1.4.1.1.2"]
)
def test_unfit_request_ids_are_replaced(candidate: str) -> None:
    assert clean_request_id(candidate) != candidate


def test_a_plain_request_id_is_kept() -> None:
    assert clean_request_id("scanner-7:000123") == "scanner-7:000123"


def test_json_log_lines_carry_the_request_id_and_no_uid() -> None:
    record = logging.LogRecord(
        "ctjoint", logging.INFO, __file__, 1, "series %s failed", ("1.2.3.4.5.6.7",), None
    )
    token = REQUEST_ID.set("req-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "req-1"
    assert "1.2.3.4.5.6.7" not in entry["message"]


def test_metric_names_are_prefixed_and_models_bounded() -> None:
    metrics = GatewayMetrics()
    metrics.record_scan("../../etc/passwd", "error", "INVALID_ARGUMENT")
    text = metrics.exposition().decode()
    assert 'model="unknown"' in text and "passwd" not in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names and all(name.startswith("ctjoint_") for name in names)


# --- wire format -------------------------------------------------------------------------------


def _result(slices: int, *, per_slice: bool) -> ScanResult:
    rng = np.random.default_rng(3)
    slice_pixels = {name: tuple(rng.integers(0, 50, slices)) for name in LESION_CLASS_NAMES}
    return ScanResult.from_probabilities(
        [0.7, 0.2, 0.1],
        lesions=LesionStatistics(
            voxel_volume_ml=0.00125,
            voxels={name: sum(v) for name, v in slice_pixels.items()},
            slice_pixels=slice_pixels,
        ),
        series=SeriesInfo(
            slices=slices, rows=64, columns=48, spacing_mm=(2.5, 0.7, 0.6), slice_thickness_mm=None
        ),
        model="jcs2d",
        model_version="v9",
        backend="embedded-onnxruntime",
        timings=StageTimings(read_ms=1.5, infer_ms=20.25, total_ms=30.0, model_ms=18.0),
        slice_probabilities=(
            {name: tuple(rng.random(slices)) for name in CLASS_NAMES} if per_slice else {}
        ),
    )


@pytest.mark.parametrize("per_slice", [True, False])
def test_the_client_rebuilds_exactly_the_analyze_json(per_slice: bool) -> None:
    result = _result(5, per_slice=per_slice)
    message = result_to_proto(result, request_id="r", extra_timings_ms={"receive": 4.0})
    wire = scan_pb2.ScanResult.FromString(message.SerializeToString())
    rebuilt = result_dict(wire)
    expected = result.to_dict()
    timings = rebuilt.pop("timings")
    assert list(timings)[: len(expected["timings"])] == list(expected.pop("timings"))
    assert timings["receive_ms"] == 4.0
    # Probabilities cross the wire as float32 (what models produce): equal to that precision.
    assert _close(rebuilt, expected)


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6)
    return a == b


def test_the_slice_thickness_keeps_its_absence() -> None:
    message = result_to_proto(_result(2, per_slice=False), request_id="r")
    assert result_dict(message)["series"]["slice_thickness_mm"] is None


def test_a_label_map_survives_the_wire_and_compresses() -> None:
    labels = np.zeros((20, 128, 128), dtype=np.uint8)
    labels[5:9, 30:60, 40:70] = 1
    labels[7, 80:90, 80:90] = 2
    volume = encode_label_map(labels)
    assert len(volume.data) < labels.nbytes / 50
    np.testing.assert_array_equal(decode_label_map(volume), labels)


def test_a_truncated_mask_is_a_format_error() -> None:
    volume = encode_label_map(np.ones((2, 4, 4), dtype=np.uint8))
    volume.shape[0] = 3
    with pytest.raises(ResultFormatError, match="needs more"):
        decode_label_map(volume)


# --- watch -------------------------------------------------------------------------------------


def test_a_series_is_ready_only_after_it_settles(tmp_path: Path) -> None:
    inbox, results = tmp_path / "inbox", tmp_path / "results"
    (inbox / "a").mkdir(parents=True)
    (inbox / "a" / "1.dcm").write_bytes(b"x")
    watcher = FolderWatcher(inbox, results, settle_seconds=5.0)
    assert watcher.poll(now=0.0) == []
    assert watcher.poll(now=4.0) == []
    (inbox / "a" / "2.dcm").write_bytes(b"y")  # still arriving: the clock restarts
    assert watcher.poll(now=6.0) == []
    assert watcher.poll(now=10.0) == []
    assert watcher.poll(now=11.5) == [inbox / "a"]
    watcher.mark_done(inbox / "a")
    assert watcher.poll(now=30.0) == []


def test_folders_with_results_from_an_earlier_run_are_skipped(tmp_path: Path) -> None:
    inbox, results = tmp_path / "inbox", tmp_path / "results"
    (inbox / "case" / "series").mkdir(parents=True)
    (inbox / "case" / "series" / "1.dcm").write_bytes(b"x")
    done = result_folder(inbox, inbox / "case" / "series", results)
    assert done == results / "case__series"
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")
    watcher = FolderWatcher(inbox, results, settle_seconds=0.0)
    assert watcher.poll(now=0.0) == [] and watcher.poll(now=1.0) == []


def test_hidden_folders_and_the_results_folder_are_not_series(tmp_path: Path) -> None:
    for folder in ("a", ".partial", "results"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.dcm").write_bytes(b"x")
    assert list(series_folders(tmp_path, exclude=tmp_path / "results")) == [tmp_path / "a"]


# --- process settings --------------------------------------------------------------------------


def _keep_freed_memory_in_a_child(env: dict[str, str]) -> str:
    """Runs the gateway's malloc setting in a fresh interpreter (it changes the whole
    process), and reports whether it applied."""
    code = "from ctjoint.gateway.server import _keep_freed_memory; print(_keep_freed_memory())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_gateway_keeps_freed_arrays_unless_the_operator_set_malloc_variables() -> None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's; elsewhere the setting is skipped by design")
    assert _keep_freed_memory_in_a_child({}) == "True"
    assert _keep_freed_memory_in_a_child({"MALLOC_ARENA_MAX": "4"}) == "False"
