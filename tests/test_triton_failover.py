"""Two REAL tritonservers behind one Triton backend: a replica dies under load and comes back.

Scans run continuously against both replicas; one server is SIGKILLed while it has requests in
flight, and later restarted on the same ports. No scan may fail, every result must equal the
embedded backend's, and after the restart Triton's own metrics must show both servers working.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from ctjoint import contracts
from ctjoint.export.triton_repository import write_repository
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.backends.replicas import ReplicaStats
from ctjoint.gateway.backends.triton import TritonBackend
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.triton_server import (
    TritonServer,
    TritonServerConfig,
    TritonServerError,
    find_install,
    free_ports,
)

pytestmark = [pytest.mark.xdist_group("tritonserver"), pytest.mark.timeout(300)]

MODEL = contracts.MODEL_JCS2D
READY_DEADLINE_S = 120.0
PROB_TOLERANCE = 1e-4
MASK_AGREEMENT = 0.999
# Two scans at once, one slice per request: many small requests in flight on both replicas,
# so the kill lands on some of them.
CONCURRENT_SCANS = 2
SLICES_PER_REQUEST = 1
IN_FLIGHT_PER_SCAN = 4
# Scans that must complete in each phase (both up, one down, both up again); the victim
# stays down at least DOWN_S so the monitor's probes fail a few times.
SCANS_PER_PHASE = 3
PHASE_TIMEOUT_S = 60.0
DOWN_S = 1.0
# Enough scans after the rebalance for the split between the replicas to mean something.
SCANS_AFTER_REBALANCE = 12
# The choice is least-busy, so it follows speed: a replica slowed by a neighbour on these two
# cores takes less. Alone the restarted one took 44-48% (and with two CPU hogs beside it);
# one CI run, with another test process beside it, gave 20% over 6 scans. The bar catches
# traffic that does not come back, or comes back as a trickle, not a split a little off half.
MIN_SHARE_AFTER_RESTART = 0.15
_SUCCESS = re.compile(r'^nv_inference_request_success\{model="(?P<model>[^"]+)".*\}\s+(?P<n>\S+)$')


def _start(config: TritonServerConfig, log_file: Path) -> TritonServer:
    server = TritonServer(config, install=find_install(), log_file=log_file)
    server.start()
    return server


def _successes(config: TritonServerConfig) -> int:
    """Successful ensemble requests, from the server's Prometheus metrics endpoint."""
    url = f"http://127.0.0.1:{config.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5.0) as response:
        text = response.read().decode()
    total = 0
    for line in text.splitlines():
        match = _SUCCESS.match(line)
        if match and match["model"] == MODEL:
            total += int(float(match["n"]))
    return total


@pytest.fixture
def two_tritons(
    tmp_path: Path, contract_model_dir: Path
) -> Iterator[tuple[list[TritonServerConfig], list[TritonServer]]]:
    """Two servers of one repository on free loopback ports; the list lets a test replace one."""
    try:
        find_install()
    except TritonServerError as err:
        pytest.skip(f"no tritonserver here: {err}")
    repository = tmp_path / "repository"
    write_repository(repository, target="cpu", models=(MODEL,), onnx_dir=contract_model_dir)
    configs = []
    for _ in range(2):
        grpc_port, http_port, metrics_port = free_ports(3)
        configs.append(
            TritonServerConfig(
                repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
            )
        )
    servers = [_start(c, tmp_path / f"triton{i}.log") for i, c in enumerate(configs)]
    try:
        for server in servers:
            server.wait_ready(READY_DEADLINE_S)
        yield configs, servers
    finally:
        for server in servers:
            server.stop()


@dataclass
class _Load:
    """Scans run back to back by a few workers, with every outcome recorded."""

    results: list[ScanAnalysis] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, analyzer: ScanAnalyzer, files: list[tuple[str, Path]]) -> None:
        while not self.stop.is_set():
            try:
                self.results.append(await analyzer.analyze_files(files, MODEL))
            except Exception as err:  # every failure is a finding: count it, keep loading
                self.errors.append(err)

    async def until(self, scans: int) -> None:
        """Wait until `scans` more scans have completed (failed ones count too)."""
        target = len(self.results) + len(self.errors) + scans
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while len(self.results) + len(self.errors) < target:
            assert time.monotonic() < deadline, "the load stalled"
            await asyncio.sleep(0.05)


def _replica(backend: TritonBackend, config: TritonServerConfig) -> ReplicaStats:
    return next(s for s in backend.replica_stats() if s.address == config.grpc_url)


def _reference(contract_model_dir: Path, files: list[tuple[str, Path]]) -> ScanAnalysis:
    async def run() -> ScanAnalysis:
        backend = EmbeddedBackend((MODEL,), model_dir=contract_model_dir, intra_op_threads=1)
        async with backend:
            return await ScanAnalyzer(backend).analyze_files(files, MODEL)

    return asyncio.run(run())


def test_no_scan_fails_when_a_replica_dies_and_traffic_returns_after_its_restart(
    two_tritons: tuple[list[TritonServerConfig], list[TritonServer]],
    contract_model_dir: Path,
    ct_series_dir: Path,
    tmp_path: Path,
) -> None:
    configs, servers = two_tritons
    files = [(p.name, p) for p in list_series_files(ct_series_dir)]
    reference = _reference(contract_model_dir, files)
    victim = configs[1]

    async def scenario() -> dict[str, float]:
        backend = TritonBackend(
            # One by address, one by name: the name is resolved to the same loopback address.
            [configs[0].grpc_url, f"localhost:{victim.grpc_port}"],
            (MODEL,),
            load_timeout_s=30,
            health_interval_s=0.25,
            probe_first_s=0.25,
            probe_max_s=1.0,
        )
        load = _Load()
        async with backend:
            analyzer = ScanAnalyzer(
                backend, batch_size=SLICES_PER_REQUEST, max_in_flight=IN_FLIGHT_PER_SCAN
            )
            workers = [
                asyncio.create_task(load.worker(analyzer, files)) for _ in range(CONCURRENT_SCANS)
            ]
            try:
                await load.until(SCANS_PER_PHASE)
                replicas = {s.address: s for s in backend.replica_stats()}
                assert all(s.requests > 0 for s in replicas.values()), replicas

                # Kill the victim at a moment it has requests in flight: those must be re-sent.
                deadline = time.monotonic() + PHASE_TIMEOUT_S
                while _replica(backend, victim).in_flight == 0:
                    assert time.monotonic() < deadline, "the victim never had work in flight"
                    await asyncio.sleep(0)
                pid = servers[1].pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                await asyncio.to_thread(servers[1].stop)
                await load.until(SCANS_PER_PHASE)
                # Down long enough for the health monitor to probe it and fail a few times.
                await asyncio.sleep(DOWN_S)
                sent_while_down = _replica(backend, victim).requests
                await load.until(SCANS_PER_PHASE)
                assert _replica(backend, victim).requests == sent_while_down

                # Restart on the same ports while the load goes on.
                restart_at = time.monotonic()
                servers[1] = _start(victim, tmp_path / "triton1-restarted.log")
                await asyncio.to_thread(servers[1].wait_ready, READY_DEADLINE_S)
                ready_at = time.monotonic()
                while not (
                    _replica(backend, victim).healthy
                    and _replica(backend, victim).requests > sent_while_down
                ):
                    assert time.monotonic() < ready_at + PHASE_TIMEOUT_S, "no rebalance"
                    await asyncio.sleep(0.01)
                rebalanced_at = time.monotonic()
                survivor_before = await asyncio.to_thread(_successes, configs[0])
                victim_before = await asyncio.to_thread(_successes, victim)
                await load.until(SCANS_AFTER_REBALANCE)
            finally:
                load.stop.set()
                await asyncio.gather(*workers)
            survivor_after = await asyncio.to_thread(_successes, configs[0])
            victim_after = await asyncio.to_thread(_successes, victim) - victim_before
            retried = backend.retried_slices
            ejections = sum(s.ejections for s in backend.replica_stats())

        assert not load.errors, f"{len(load.errors)} scans failed, first: {load.errors[0]!r}"
        for analysis in load.results:
            diff = max(
                abs(analysis.result.probabilities[c] - reference.result.probabilities[c])
                for c in contracts.CLASS_NAMES
            )
            assert analysis.result.label == reference.result.label
            assert diff <= PROB_TOLERANCE
            assert float(np.mean(analysis.label_map == reference.label_map)) >= MASK_AGREEMENT
            assert analysis.result.lesions.voxels == reference.result.lesions.voxels
        return {
            "scans": len(load.results),
            "failed": len(load.errors),
            "retried": retried,
            "ejections": ejections,
            "down_s": restart_at - killed_at,
            "restart_s": ready_at - restart_at,
            "rebalance_s": rebalanced_at - ready_at,
            "survivor_after_restart": survivor_after - survivor_before,
            "victim_after_restart": victim_after,
        }

    figures = asyncio.run(scenario())
    print(
        "failover: {scans:.0f} scans completed, {failed:.0f} failed, {retried:.0f} retried "
        "slices, {ejections:.0f} ejection(s); replica down {down_s:.1f} s, restarted in "
        "{restart_s:.1f} s, traffic back {rebalance_s:.2f} s after it was ready; Triton "
        "requests after the rebalance: survivor {survivor_after_restart:.0f}, restarted "
        "{victim_after_restart:.0f}".format(**figures)
    )
    assert figures["retried"] > 0, "the kill hit no request in flight"
    share = figures["victim_after_restart"] / (
        figures["victim_after_restart"] + figures["survivor_after_restart"]
    )
    assert share >= MIN_SHARE_AFTER_RESTART, f"the restarted replica took {share:.0%}"
    assert figures["survivor_after_restart"] > 0
