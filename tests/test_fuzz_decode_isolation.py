"""Compressed pixel data is decoded in worker processes: a codec that aborts, segfaults or hangs
costs one file a clear error, and the gateway (and its next scan) carries on."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import figures
import grpc
import grpc.aio
import numpy as np
import pydicom
import pytest
from dicom_factory import ct_dataset, write_ct_series
from fuzz_codec_hooks import ABORT_MARKER, HANG_MARKER, SEGFAULT_MARKER, misbehaving_decode
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess_gateway import _wait_serving, analyze_refusable, free_port
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from ctjoint.contracts import MODEL_JCS2D
from ctjoint.gateway import decode_pool
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.decode_pool import DecodeError, DecodePool, DecodeRequest
from ctjoint.gateway.dicom_io import read_ct_slice
from ctjoint.gateway.errors import InvalidAttributeError
from ctjoint.gateway.server import GatewayConfig, serve
from ctjoint.v1 import scan_pb2, scan_pb2_grpc


@pytest.fixture(scope="module")
def rle_series(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """A valid 6-slice RLE Lossless phantom series, as file bytes."""
    folder = tmp_path_factory.mktemp("rle")
    contents = []
    for path in write_ct_series(folder, slices=6, size=32):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        contents.append(buffer.getvalue())
    return contents


def _save(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_pixel_data(content: bytes, fragment: bytes) -> bytes:
    """The same file with its encapsulated pixel data replaced by one crafted fragment."""
    ds = pydicom.dcmread(io.BytesIO(content))
    ds.PixelData = encapsulate([fragment + b"\0" * 64])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def misbehaving_pool() -> Iterator[DecodePool]:
    """The process-wide decode pool swapped for one whose codec misbehaves on markers."""
    pool = DecodePool(1, timeout_s=2.0, decode=misbehaving_decode)
    old = decode_pool.set_default_pool(pool)
    try:
        yield pool
    finally:
        decode_pool.set_default_pool(old)
        pool.close()


def _request(content: bytes) -> DecodeRequest:
    ds = pydicom.dcmread(io.BytesIO(content))
    attributes = {k: ds.get(k) for k in decode_pool.PIXEL_ATTRIBUTES if k in ds}
    attributes = {k: v if isinstance(v, int) else str(v) for k, v in attributes.items()}
    return DecodeRequest(str(ds.file_meta.TransferSyntaxUID), attributes, bytes(ds.PixelData))


@pytest.mark.parametrize(
    ("marker", "kind", "how"),
    [
        (ABORT_MARKER, "crashed", "SIGABRT"),
        (SEGFAULT_MARKER, "crashed", "SIGSEGV"),
        (HANG_MARKER, "timeout", "did not finish within 2 s"),
    ],
)
def test_a_misbehaving_codec_costs_one_decode_and_the_pool_recovers(
    rle_series: list[bytes], marker: bytes, kind: str, how: str
) -> None:
    good = _request(rle_series[0])
    with DecodePool(1, timeout_s=2.0, decode=misbehaving_decode) as pool:
        expected = pool.decode(good)
        with pytest.raises(DecodeError, match=how) as caught:
            pool.decode(DecodeRequest(good.transfer_syntax, good.attributes, marker))
        assert caught.value.kind == kind
        # The replacement starts by itself, before anyone asks for a decode.
        deadline = time.monotonic() + 60
        while pool.started < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.started == 2
        np.testing.assert_array_equal(pool.decode(good), expected)
        assert (pool.started, pool.lost) == (2, 1)


def test_a_codec_error_keeps_its_worker(rle_series: list[bytes]) -> None:
    good = _request(rle_series[0])
    with DecodePool(1) as pool:
        with pytest.raises(DecodeError, match="Basic Offset Table") as caught:
            pool.decode(DecodeRequest(good.transfer_syntax, good.attributes, b"\x07" * 16))
        assert caught.value.kind == "error"
        pool.decode(good)
        assert (pool.started, pool.lost) == (1, 0)


def test_a_decode_past_the_workers_memory_allowance_is_refused_and_the_worker_kept() -> None:
    # 131 KB of RLE that decodes to 8 MB: over a 4 MiB allowance, under a 64 MiB one.
    ds = ct_dataset(
        np.full((2048, 2048), -1000.0, dtype=np.float32),
        index=1,
        position=(0, 0, 0),
        series_uid="1.2.826.0.1.3680043.8.498.1",
        study_uid="1.2.826.0.1.3680043.8.498.2",
        frame_uid="1.2.826.0.1.3680043.8.498.3",
    )
    ds.compress(RLELossless)
    request = _request(_save(ds))
    with DecodePool(1, memory_bytes=4 * 2**20) as pool:
        with pytest.raises(DecodeError, match="MemoryError") as caught:
            pool.decode(request)
        assert caught.value.kind == "error"
        assert (pool.started, pool.lost) == (1, 0)
    with DecodePool(1, memory_bytes=64 * 2**20) as pool:
        assert pool.decode(request).shape == (2048, 2048)


def test_concurrent_decodes_share_the_pool_and_never_exceed_its_workers(
    rle_series: list[bytes],
) -> None:
    requests = [_request(content) for content in rle_series]
    expected = [pydicom.dcmread(io.BytesIO(c)).pixel_array for c in rle_series]
    with DecodePool(2) as pool, ThreadPoolExecutor(6) as threads:
        results = list(threads.map(pool.decode, requests * 4))
        assert pool.started <= 2
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, expected[i % len(expected)])


def test_compressed_pixels_decode_in_a_worker_exactly_as_in_process(
    rle_series: list[bytes],
) -> None:
    with DecodePool(1) as pool:
        old = decode_pool.set_default_pool(pool)
        try:
            hu = read_ct_slice(rle_series[0], source="file 1").hu
        finally:
            decode_pool.set_default_pool(old)
        assert pool.started == 1
    ds = pydicom.dcmread(io.BytesIO(rle_series[0]))
    reference = ds.pixel_array.astype(np.float32) + np.float32(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, reference)


def test_a_crashing_codec_is_a_clear_error_naming_the_file(
    rle_series: list[bytes], misbehaving_pool: DecodePool
) -> None:
    crashing = with_pixel_data(rle_series[1], SEGFAULT_MARKER)
    with pytest.raises(
        InvalidAttributeError,
        match=r"^file 2: PixelData: cannot be decoded as RLE Lossless .*died \(SIGSEGV\)",
    ):
        read_ct_slice(crashing, source="file 2")
    assert read_ct_slice(rle_series[1], source="file 2").hu.shape == (32, 32)


def test_the_gateway_survives_a_codec_crash_and_serves_the_next_scan(
    rle_series: list[bytes], misbehaving_pool: DecodePool, contract_model_dir: Path
) -> None:
    crashing = list(rle_series)
    crashing[2] = with_pixel_data(rle_series[2], ABORT_MARKER)

    async def main() -> tuple[grpc.StatusCode, str, scan_pb2.ScanResult, int, float]:
        port = free_port()
        config = GatewayConfig(port=port, models=(MODEL_JCS2D,), grace_seconds=1.0)
        backend = EmbeddedBackend((MODEL_JCS2D,), model_dir=contract_model_dir, intra_op_threads=1)
        server = asyncio.ensure_future(serve(config, backend=backend))

        async def requests(files: list[bytes]) -> AsyncIterator[scan_pb2.ScanRequest]:
            yield scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=MODEL_JCS2D))
            for content in files:
                yield scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=content))

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await _wait_serving(channel, server)
                stub = scan_pb2_grpc.ScanServiceStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    await analyze_refusable(f"127.0.0.1:{port}", crashing)
                failed_at = time.perf_counter()
                result = await stub.AnalyzeScan(requests(rle_series), timeout=60)
                recovery_s = time.perf_counter() - failed_at
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                error = caught.value
                return error.code(), error.details(), result, health.status, recovery_s
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)

    code, details, result, health, recovery_s = asyncio.run(main())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("file 3: PixelData: cannot be decoded as RLE Lossless")
    assert "decoder process died (SIGABRT)" in details
    assert len(result.slice_file_number) == len(rle_series)
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert (misbehaving_pool.lost, misbehaving_pool.started) == (1, 2)
    figures.record(
        "decode isolation (codec abort in a worker, in-process gateway)",
        workers_lost=misbehaving_pool.lost,
        next_scan_ok=True,
        recovery_s=round(recovery_s, 2),
    )


@pytest.mark.parametrize(("setting", "workers"), [("3", 3), ("", 2), ("two", 2), ("0", 2)])
def test_the_pool_size_comes_from_the_environment_and_survives_a_typo(
    setting: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(decode_pool.ENV_DECODE_WORKERS, setting)
    old = decode_pool.set_default_pool(None)
    try:
        assert decode_pool.default_pool().workers == workers
    finally:
        decode_pool.close_default_pool()
        decode_pool.set_default_pool(old)
