"""How fast a full gateway refuses a burst, with nothing else running on it.

    .venv/bin/python bench/refusal_burst.py [--limit 8] [--burst 192] [--rounds 3] \
        [--doc docs/reliability.md]

Starts a real gateway (embedded backend, the tests' tiny contract models) admitting `--limit`
scans, fills every slot with an admitted scan that sends its header and then nothing, and
fires `--burst` more scans at once, each round twice: from one grpc.aio client, then from
h2load (a load generator in C, tests/lean_burst.py; skipped if it is not installed). Prints,
per round and generator, the status counts and the time to the refusal (p50, max); at the end,
the CPU time each refusal cost the gateway process and the grpc.aio client (steadier than the
times on a shared box). The grpc.aio client costs about as much CPU per call as the gateway,
on the same cores; h2load costs about a tenth of that, so its times are the gateway's own.
tests/test_load.py measures the same under load (admitted scans really running, Triton beside
them on the same cores); this is the floor that the event loop and gRPC set on their own.
With h2load, each round also fires the burst at bench/bare_refuser.py (a grpc.aio server with
no ctjoint code that refuses every call) and prints the gateway's CPU per refusal as a ratio to
that floor, both measured in the same run. With --doc the run's table (rounds after the first,
the command and the machine) replaces the block between DOC_BEGIN and DOC_END of that file.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from contract_models import export_contract_model
from gateway_process import GatewayProcess, scans_by_code
from lean_burst import fire, h2load_path
from reliability_helpers import cpu_seconds

from ctjoint.bench import host_facts, host_line, write_doc_block
from ctjoint.contracts import MODEL_JCS2D, MODEL_NAMES
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

DOC_BEGIN = "<!-- bench/refusal_burst.py begin -->"
DOC_END = "<!-- bench/refusal_burst.py end -->"
TARGET_MS = 50.0


@dataclass
class Generator:
    """One way of firing the bursts: its refusal times (rounds after the warm-up) and the CPU
    each refusal cost the process(es) that `cpu` names, over every round."""

    name: str
    seconds: list[float] = field(default_factory=list)
    bursts: int = 0
    cpu: str = ""


def doc_lines(
    command: str,
    generators: Sequence[Generator],
    burst_size: int,
    host: dict[str, object],
    load_end: float,
) -> list[str]:
    """The Markdown block of one run: a row per generator, and where it ran."""
    lines = [
        f"`{command}`",
        "",
        f"| fired by | bursts of {burst_size} after the first | time to refusal p50 (ms) "
        "| slowest refusal (ms) | CPU per refusal |",
        "|---|---|---|---|---|",
    ]
    for generator in generators:
        times = sorted(generator.seconds)
        p50, slowest = (
            (f"{statistics.median(times) * 1e3:.1f}", f"{times[-1] * 1e3:.1f}")
            if times
            else ("", "")
        )
        lines.append(
            f"| {generator.name} | {generator.bursts} | {p50} | {slowest} | {generator.cpu} |"
        )
    lines += ["", f"Target: every refusal within {TARGET_MS:g} ms. {host_line(host, load_end)}."]
    return lines


def write_doc(path: Path, lines: Sequence[str]) -> None:
    """Replace the block between DOC_BEGIN and DOC_END of `path` with `lines`."""
    write_doc_block(path, DOC_BEGIN, DOC_END, lines)


async def burst(
    gateway: GatewayProcess,
    bare: subprocess.Popen[str] | None,
    bare_port: int,
    limit: int,
    size: int,
    rounds: int,
) -> list[Generator]:
    """Fire the bursts, print each round, and return the figures per generator."""
    aio, lean_gen, bare_gen = (
        Generator("grpc.aio client"),
        Generator("h2load"),
        Generator("h2load, at bench/bare_refuser.py"),
    )
    address = gateway.address
    gateway_pid = gateway.process.pid if gateway.process is not None else 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scan_pb2_grpc.ScanServiceStub(channel)
        holders = []
        for _ in range(limit):
            call = stub.AnalyzeScan(timeout=600)
            await call.write(scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=MODEL_JCS2D)))
            await call.initial_metadata()  # admitted: the slot is held until we cancel
            holders.append(call)

        async def one() -> tuple[grpc.StatusCode, float]:
            started = time.perf_counter()
            call = stub.AnalyzeScan(timeout=30)
            try:
                await call
            except grpc.aio.AioRpcError as err:
                return err.code(), time.perf_counter() - started
            return grpc.StatusCode.OK, time.perf_counter() - started

        def report(number: int, generator: str, times: list[float], counts: dict[str, int]) -> None:
            seconds = sorted(times)
            kept = {"grpc.aio": aio, "h2load  ": lean_gen, "bare    ": bare_gen}[generator]
            if number > 1:  # the first burst warms up
                kept.seconds += times
                kept.bursts += 1
            print(
                f"round {number} {generator}: {counts}; time to refusal p50 "
                f"{statistics.median(seconds) * 1e3:.1f} ms, max {seconds[-1] * 1e3:.1f} ms"
            )

        request = scan_pb2.ScanRequest(header=scan_pb2.ScanHeader(model=MODEL_JCS2D))
        lean = h2load_path() is not None
        if not lean:
            print("h2load is not installed (Debian package nghttp2-client): grpc.aio only")
        # The gateway's refusal time is measured, not this client's cyclic collector walking
        # its heap (torch, onnx) mid-burst.
        gc.collect()
        gc.freeze()
        aio_gateway_cpu = aio_client_cpu = lean_gateway_cpu = bare_cpu = 0.0
        for number in range(1, rounds + 1):
            gateway_cpu, client_cpu = cpu_seconds(gateway_pid), time.process_time()
            answers = await asyncio.gather(*(one() for _ in range(size)))
            aio_gateway_cpu += cpu_seconds(gateway_pid) - gateway_cpu
            aio_client_cpu += time.process_time() - client_cpu
            counts: dict[str, int] = {}
            for code, _ in answers:
                counts[code.name] = counts.get(code.name, 0) + 1
            report(number, "grpc.aio", [s for _, s in answers], counts)
            if lean:
                before = scans_by_code(gateway.metrics())
                gateway_cpu = cpu_seconds(gateway_pid)
                fired = await asyncio.to_thread(fire, address, size, request)
                lean_gateway_cpu += cpu_seconds(gateway_pid) - gateway_cpu
                # h2load cannot read gRPC trailers: the gateway's metrics say how calls ended.
                ended = dict(scans_by_code(gateway.metrics()) - before)
                report(number, "h2load  ", list(fired.seconds), ended)
                if bare is not None:
                    before_bare = cpu_seconds(bare.pid)
                    floor = await asyncio.to_thread(fire, f"127.0.0.1:{bare_port}", size, request)
                    bare_cpu += cpu_seconds(bare.pid) - before_bare
                    report(number, "bare    ", list(floor.seconds), {"h2load": len(floor.seconds)})
        refusals = rounds * size
        aio.cpu = (
            f"gateway {aio_gateway_cpu / refusals * 1e3:.3f} ms, "
            f"client {aio_client_cpu / refusals * 1e3:.3f} ms"
        )
        print(f"CPU per refusal, grpc.aio bursts: {aio.cpu} ({refusals} refusals)")
        generators = [aio]
        if lean:
            lean_gen.cpu = f"gateway {lean_gateway_cpu / refusals * 1e3:.3f} ms"
            print(f"CPU per refusal, h2load bursts: {lean_gen.cpu} ({refusals} refusals)")
            generators.append(lean_gen)
        if bare is not None and bare_cpu > 0:
            bare_gen.cpu = (
                f"bare grpc.aio {bare_cpu / refusals * 1e3:.3f} ms "
                f"(gateway / bare = {lean_gateway_cpu / bare_cpu:.2f})"
            )
            print(f"CPU per refusal, h2load bursts: {bare_gen.cpu}")
            generators.append(bare_gen)
        for call in holders:
            call.cancel()
    return generators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=8, help="the gateway's concurrent scans")
    parser.add_argument("--burst", type=int, default=192, help="scans fired at once")
    parser.add_argument("--rounds", type=int, default=3, help="bursts (the first warms up)")
    parser.add_argument("--doc", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the first burst only warms up")
    command = shlex.join(["bench/refusal_burst.py", *sys.argv[1:]])
    host = host_facts()
    with tempfile.TemporaryDirectory(prefix="ctjoint-burst-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        for model in MODEL_NAMES:
            export_contract_model(model, models)
        gateway = GatewayProcess(
            models, Path(tmp) / "gateway.log", "--max-concurrent-scans", str(args.limit)
        ).start()
        bare = None
        bare_port = 0
        if h2load_path() is not None:
            bare = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("bare_refuser.py"))],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert bare.stdout is not None
            bare_port = int(bare.stdout.readline())
        try:
            generators = asyncio.run(
                burst(gateway, bare, bare_port, args.limit, args.burst, args.rounds)
            )
        finally:
            gateway.stop()
            if bare is not None:
                bare.kill()
                bare.wait()
    if args.doc is not None:
        write_doc(args.doc, doc_lines(command, generators, args.burst, host, os.getloadavg()[0]))
        print(f"wrote the table into {args.doc}")


if __name__ == "__main__":
    main()
