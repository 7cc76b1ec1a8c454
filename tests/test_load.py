"""Memory and overload against REAL processes: a gateway subprocess in front of a real
tritonserver.

Many scans in a row must not grow the gateway's resident memory (checked after a warm-up), and
the check is shown to work by a gateway built to leak (tests/leaking_analyzer.py wraps its
analyser). Far more concurrent scans than the gateway admits: the excess is refused at once
with RESOURCE_EXHAUSTED, every admitted scan succeeds with its own answer, and memory stays
bounded.

1,000 scans run in CI (about a minute here); CTJOINT_LONG_TESTS=1 runs 5,000.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import figures
import grpc
import pytest
from grpc_health.v1 import health_pb2

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from gateway_process import GatewayProcess, metric_value
from leaking_analyzer import ENV_LEAK_BYTES_PER_SCAN, Leak
from lean_burst import h2load_path
from reliability_helpers import (
    BurstAtWork,
    Outcome,
    RunningTriton,
    Series,
    aio_channel,
    burst_at_work,
    check_result,
    make_series,
    percentile,
    require_triton,
    rss_bytes,
    running_triton,
    scan,
    triton_gateway,
    write_test_repository,
)

from ctjoint.v1 import scan_pb2_grpc

pytestmark = [pytest.mark.xdist_group("tritonserver"), pytest.mark.timeout(1800)]

MIB = 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
LONG = os.environ.get("CTJOINT_LONG_TESTS") == "1"
SCANS = 5000 if LONG else 1000
WARMUP_SCANS = 50
# Scans in flight at once during the memory run: the gateway's concurrent path, not one by one.
WORKERS = 2
MAX_RSS_GROWTH_BYTES = 50 * MIB
# The leaking build keeps this much per scan: the check must trip well before LEAK_SCANS.
LEAK_BYTES_PER_SCAN = 1 * MIB
LEAK_SCANS = 80
LEAKING_BUILD = Path(__file__).resolve().parent / "leaking_build"
# Overload: 200 scans at once against a limit of 8.
OVERLOAD_LIMIT = 8
OVERLOAD_SCANS = 200
# The target for the time to RESOURCE_EXHAUSTED is 50 ms. With the overload gate and
# the scan CPU pool (gateway/limits.py) and the interceptor's early refusal, the refusals of a
# 200-call burst go out at grpc.aio's own rate, ~0.2 ms of gateway CPU each on the 2-core test
# machine. Fired by h2load, the last one comes at 34-38 ms with this file alone;
# bench/overload_at_work.py checks the target over many rounds. Fired by the grpc.aio client,
# which costs as much CPU per call as the gateway on the same cores, it comes later (README,
# "Reliability: load and faults"). The CI bound is 5 s so that the tests stay green on a loaded
# machine; that refusals neither wait for a slot nor for an upload is checked exactly (counts
# and received bytes). CTJOINT_MAX_REJECT_MS=50 applies the target here too.
MAX_REJECT_S = float(os.environ.get("CTJOINT_MAX_REJECT_MS", "5000")) / 1000.0
MAX_OVERLOAD_RSS_GROWTH_BYTES = 200 * MIB


@pytest.fixture(scope="module")
def triton(
    tmp_path_factory: pytest.TempPathFactory, contract_model_dir: Path
) -> Iterator[RunningTriton]:
    require_triton()
    root = tmp_path_factory.mktemp("load-triton")
    yield from running_triton(write_test_repository(root, contract_model_dir), root)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, contract_model_dir: Path) -> list[Series]:
    return make_series(tmp_path_factory.mktemp("load-series"), 4, contract_model_dir)


def rss_growth(gateway: GatewayProcess, series: list[Series], scans: int) -> dict[str, float]:
    """Run `scans` scans (WORKERS at a time) and return the gateway's RSS growth between the
    end of the warm-up and the end; every answer is checked to be its own scan's."""
    pid = gateway.process.pid if gateway.process is not None else 0

    async def run() -> dict[str, float]:
        done = 0
        failures: list[Outcome] = []
        baseline: dict[str, float] = {}
        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)

            async def worker(offset: int) -> None:
                nonlocal done
                for number in range(offset, scans, WORKERS):
                    chosen = series[number % len(series)]
                    request_id = f"load-{number}"
                    outcome = await scan(stub, chosen, request_id)
                    if outcome.code != grpc.StatusCode.OK:
                        failures.append(outcome)
                    else:
                        check_result(outcome, chosen, request_id)
                    done += 1
                    if done == WARMUP_SCANS:
                        baseline["rss"] = rss_bytes(pid)
                        baseline["at"] = time.perf_counter()

            started = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(WORKERS)))
            seconds = time.perf_counter() - started
        assert not failures, f"{len(failures)} scans failed, first: {failures[0]}"
        end = rss_bytes(pid)
        return {
            "scans": scans,
            "rss_after_warmup_mb": round(baseline["rss"] / MIB, 1),
            "rss_end_mb": round(end / MIB, 1),
            "growth_mb": round((end - baseline["rss"]) / MIB, 1),
            "seconds": round(seconds, 1),
            "scans_per_s": round(scans / seconds, 1),
        }

    return asyncio.run(run())


def assert_rss_bounded(measured: dict[str, float]) -> None:
    """The memory criterion itself: growth after warm-up under MAX_RSS_GROWTH_BYTES."""
    growth = measured["growth_mb"] * MIB
    assert growth < MAX_RSS_GROWTH_BYTES, (
        f"gateway RSS grew {measured['growth_mb']} MB over {measured['scans']} scans "
        f"(limit {MAX_RSS_GROWTH_BYTES // MIB} MB)"
    )


def test_gateway_memory_stays_flat_over_many_scans(
    triton: RunningTriton, contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    gateway = triton_gateway(triton, contract_model_dir, tmp_path / "gateway.log")
    try:
        measured = rss_growth(gateway, series, SCANS)
    finally:
        gateway.stop()
    figures.record("load: gateway RSS over scans (gateway + Triton)", **measured)
    assert_rss_bounded(measured)


def test_the_memory_check_trips_on_a_gateway_built_to_leak(
    triton: RunningTriton,
    contract_model_dir: Path,
    series: list[Series],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gateway and its workers start with tests/leaking_build first on their path.
    path = os.pathsep.join(p for p in (str(LEAKING_BUILD), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv(ENV_LEAK_BYTES_PER_SCAN, str(LEAK_BYTES_PER_SCAN))
    gateway = triton_gateway(triton, contract_model_dir, tmp_path / "gateway.log")
    try:
        measured = rss_growth(gateway, series, WARMUP_SCANS + LEAK_SCANS)
        log = gateway.log()
    finally:
        gateway.stop()
    figures.record("load: RSS check against the leaking build", **measured)
    assert "TEST-ONLY: this analyser leaks" in log, "the gateway was not built to leak"
    with pytest.raises(AssertionError, match="gateway RSS grew"):
        assert_rss_bounded(measured)


def limited_gateway(
    triton: RunningTriton, contract_model_dir: Path, tmp_path: Path
) -> GatewayProcess:
    """A gateway in front of `triton` admitting OVERLOAD_LIMIT scans at once."""
    return triton_gateway(
        triton,
        contract_model_dir,
        tmp_path / "gateway.log",
        "--max-concurrent-scans",
        str(OVERLOAD_LIMIT),
    )


def test_overload_is_refused_at_once_and_admitted_scans_all_succeed(
    triton: RunningTriton, contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    gateway = limited_gateway(triton, contract_model_dir, tmp_path)
    pid = gateway.process.pid if gateway.process is not None else 0

    async def run() -> tuple[list[tuple[int, Outcome]], int, int, float, float]:
        peak = rss_bytes(pid)
        before = peak
        in_flight_peak = 0.0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak, in_flight_peak
            while not stop.is_set():
                peak = max(peak, rss_bytes(pid))
                metrics = await asyncio.to_thread(gateway.metrics)
                in_flight_peak = max(
                    in_flight_peak, metric_value(metrics, "ctjoint_scans_in_flight")
                )
                await asyncio.sleep(0.05)

        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            # One warm scan first, so the connection and the models are up before the burst.
            check_result(await scan(stub, series[0], "warm"), series[0], "warm")
            received_before = metric_value(gateway.metrics(), "ctjoint_received_bytes_total")
            sampler = asyncio.create_task(sample())

            async def one(number: int) -> tuple[int, Outcome]:
                return number, await scan(stub, series[number % len(series)], f"burst-{number}")

            # What is measured is the gateway's time to refuse, so the client's own cyclic
            # collector must not walk pytest's large heap in the middle of the burst.
            gc.collect()
            gc.freeze()
            try:
                outcomes = await asyncio.gather(*(one(n) for n in range(OVERLOAD_SCANS)))
            finally:
                gc.unfreeze()
            stop.set()
            await sampler
        received = metric_value(gateway.metrics(), "ctjoint_received_bytes_total") - received_before
        return list(outcomes), before, peak, received, in_flight_peak

    try:
        outcomes, before, peak, received, in_flight_peak = asyncio.run(run())
        # Nothing was killed for memory: the gateway is still there, and still serving.
        assert gateway.alive() and gateway.health() == SERVING
    finally:
        gateway.stop()
    accepted = [(n, o) for n, o in outcomes if o.code == grpc.StatusCode.OK]
    rejected = [o for _, o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    other = [
        o
        for _, o in outcomes
        if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
    ]
    reject_s = [o.seconds for o in rejected]
    figures.record(
        "load: 200 concurrent scans, limit 8",
        accepted=len(accepted),
        rejected=len(rejected),
        other=len(other),
        reject_ms_max=round(max(reject_s, default=0) * 1000, 1),
        reject_ms_p99=round(percentile(reject_s, 99) * 1000, 1),
        reject_ms_p50=round(percentile(reject_s, 50) * 1000, 1),
        rss_growth_mb=round((peak - before) / MIB, 1),
        in_flight_peak=in_flight_peak,
    )
    assert not other, f"{len(other)} scans ended otherwise, first: {other[0]}"
    assert len(accepted) >= OVERLOAD_LIMIT
    # Refused, not queued: most of the burst is turned away (scans that finish during the
    # burst free slots for a few late callers).
    assert len(rejected) >= OVERLOAD_SCANS // 2
    assert in_flight_peak <= OVERLOAD_LIMIT
    for number, outcome in accepted:
        check_result(outcome, series[number % len(series)], f"burst-{number}")
    assert all("retry" in o.details for o in rejected)
    # A refused scan costs no upload: the gateway received exactly the admitted scans' files.
    uploaded = sum(
        sum(len(c) for c in series[number % len(series)].contents) for number, _ in accepted
    )
    assert received == uploaded, f"received {received} bytes, admitted scans sent {uploaded}"
    assert max(reject_s) < MAX_REJECT_S, f"slowest refusal took {max(reject_s) * 1000:.0f} ms"
    assert peak - before < MAX_OVERLOAD_RSS_GROWTH_BYTES


@pytest.mark.skipif(h2load_path() is None, reason="h2load is not installed (nghttp2-client)")
def test_overload_refusals_timed_by_a_load_generator_that_leaves_the_cores_alone(
    triton: RunningTriton, contract_model_dir: Path, series: list[Series], tmp_path: Path
) -> None:
    """The overload above with the excess fired by h2load (tests/lean_burst.py): 8 scans
    admitted and at work through Triton, 192 more at once. A grpc.aio client spends about as
    much CPU per call as the gateway does to refuse it, on the same 2 cores; h2load spends about
    a tenth of that, so these times are the gateway's own."""
    excess = OVERLOAD_SCANS - OVERLOAD_LIMIT
    gateway = limited_gateway(triton, contract_model_dir, tmp_path)

    async def run() -> BurstAtWork:
        async with aio_channel(gateway.address) as channel:
            stub = scan_pb2_grpc.ScanServiceStub(channel)
            check_result(await scan(stub, series[0], "warm"), series[0], "warm")
            return await burst_at_work(gateway, stub, series, OVERLOAD_LIMIT, excess, "held")

    try:
        measured = asyncio.run(run())
        assert gateway.alive() and gateway.health() == SERVING
    finally:
        gateway.stop()
    burst, codes = measured.burst, measured.codes
    seconds = sorted(burst.seconds)
    figures.record(
        "load: 192 over the limit of 8 fired by h2load, 8 scans at work",
        calls=len(seconds),
        refused=codes["RESOURCE_EXHAUSTED"],
        reject_ms_max=round(seconds[-1] * 1000, 1),
        reject_ms_p99=round(percentile(seconds, 99) * 1000, 1),
        reject_ms_p50=round(percentile(seconds, 50) * 1000, 1),
        start_spread_ms=round(burst.start_spread_s * 1000, 1),
    )
    assert len(seconds) == excess and set(burst.http_statuses) == {"200"}, burst.summary
    # h2load cannot read gRPC trailers; the gateway's own count says how each call ended.
    # All were refused, but for the few that may find a slot an admitted scan has just
    # freed: those end at once as scans without a file.
    assert codes["OK"] == OVERLOAD_LIMIT
    assert codes["RESOURCE_EXHAUSTED"] >= excess - OVERLOAD_LIMIT
    assert codes["RESOURCE_EXHAUSTED"] + codes["INVALID_ARGUMENT"] == excess, codes
    assert seconds[-1] < MAX_REJECT_S, f"slowest answer took {seconds[-1] * 1000:.0f} ms"


def test_the_leaking_build_keeps_exactly_its_bytes_per_scan() -> None:
    import numpy as np

    leak = Leak(3000)
    for _ in range(3):
        leak.keep(np.arange(100, dtype=np.float32))
    assert leak.kept_bytes == 9000
