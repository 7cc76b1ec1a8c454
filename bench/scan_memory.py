"""What one scan's analysis really allocates per byte of its decoded volume: the figure the
gateway's memory budget is sized with (gateway/memory.py, ANALYSIS_BYTES_PER_DECODED_BYTE).

    .venv/bin/python bench/scan_memory.py [--sizes 512x100,1024x40,2048x12] [--doc FILE]

Each case runs in a fresh process, exactly as a scan worker runs it (`answer.analyze_scan`
with the embedded backend on build/onnx, malloc tuned as in a worker, no expected_files so
the volume grows as it arrives, and every output asked: masks, overlay, SEG, SR): after a
warm-up scan the peak resident set is reset (/proc/self/clear_refs), the scan runs, and the
growth of the peak over the resident set before it is divided by the decoded volume (rows x
columns x slices x 4 bytes). A phantom chest CT at 512 x 512 is made once; larger matrices
repeat its pixels (the pipeline's memory follows the matrix, not what it shows).
With --doc, the table goes between `<!-- scan memory -->` and `<!-- /scan memory -->`.

    .venv/bin/python bench/scan_memory.py --gateway [--slices 400] [--doc FILE]

measures a real gateway instead (`ctjoint gateway serve` on a CPU tritonserver, as deployed:
the model's memory is Triton's): after a 100-slice warm-up scan, the peak resident set
(VmHWM, reset through /proc/PID/clear_refs) of the serving process and of each scan worker
over one scan of `--slices` 512x512 slices, what each keeps 2 s after the answer, and the same
for four such scans at once (with the tree's summed RSS sampled every 50 ms), against three
times the scan's int16 size and the gateway's memory limit in deploy/k8s. With --doc that
table goes between `<!-- gateway memory -->` and `<!-- /gateway memory -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024 * 1024
MARK = ("<!-- scan memory -->", "<!-- /scan memory -->")
GATEWAY_MARK = ("<!-- gateway memory -->", "<!-- /gateway memory -->")
K8S_GATEWAY = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "gateway-deployment.yaml"


def _files(size: int, slices: int, cache: Path) -> list[bytes]:
    """The phantom's first `slices` files at `size` pixels a side (pixels repeated)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO

    from ctjoint.bench import phantom_series
    from ctjoint.gateway.series import list_series_files

    paths = list_series_files(phantom_series(cache, size=512, slices=max(slices, 16)))
    factor = size // 512
    out = []
    for path in paths[:slices]:
        ds = pydicom.dcmread(path)
        if factor > 1:
            pixels = np.kron(ds.pixel_array, np.ones((factor, factor), dtype=ds.pixel_array.dtype))
            ds.PixelData = pixels.tobytes()
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelSpacing = [float(v) / factor for v in ds.PixelSpacing]
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _one_case(size: int, slices: int, model: str, cache: Path) -> dict[str, Any]:
    """In this (fresh) process: a warm-up scan, then the measured one."""
    from ctjoint.gateway.answer import ScanOrder, analyze_scan
    from ctjoint.gateway.limits import SCAN_CPU
    from ctjoint.gateway.server import (
        GatewayConfig,
        _keep_freed_memory,
        create_analyzer,
        create_backend,
    )
    from ctjoint.v1 import scan_pb2

    _keep_freed_memory()
    SCAN_CPU.configure(2)
    config = GatewayConfig(threads=1)
    backend = create_backend(config)
    outputs = scan_pb2.OutputOptions(masks=True, overlay=True, seg=True, sr=True)

    async def scan(files: list[bytes]) -> None:
        async def inputs() -> Any:
            for data in files:
                yield "", data

        order = ScanOrder(model, None, 10_000, outputs, "bench", pacs=False)
        await analyze_scan(analyzer, order, inputs(), progress=None, receive_ms=lambda: 0.0)

    async def main() -> dict[str, Any]:
        global analyzer
        await backend.load()
        analyzer = create_analyzer(config, backend)
        await scan(_files(512, 8, cache))
        files = _files(size, slices, cache)
        Path("/proc/self/clear_refs").write_text("5")
        before = _vm("VmRSS")
        await scan(files)
        peak = _vm("VmHWM")
        decoded = size * size * slices * 4
        return {
            "model": model,
            "size": size,
            "slices": slices,
            "decoded_mb": round(decoded / MIB, 1),
            "growth_mb": round((peak - before) / MIB, 1),
            "per_decoded_byte": round((peak - before) / decoded, 2),
        }

    return asyncio.run(main())


analyzer: Any = None


def _status_mib(pid: int, field: str) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def _k8s_limit_bytes() -> int:
    """The gateway container's memory limit in the Kubernetes manifest."""
    import yaml

    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for doc in yaml.safe_load_all(K8S_GATEWAY.read_text()):
        if not doc or doc.get("kind") != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            limit = str(container["resources"]["limits"]["memory"])
            return int(limit[:-2]) * units[limit[-2:]] if limit[-2:] in units else int(limit)
    raise SystemExit(f"{K8S_GATEWAY}: no gateway container memory limit")


def _processes(root: int) -> dict[str, list[int]]:
    from ctjoint.bench import process_tree

    tree = process_tree(root)
    return {"serving": [root], "workers": [p for p in tree if p != root]}


def _gateway_round(stack: Any, contents: list[bytes], model: str, scans: int) -> dict[str, Any]:
    """`scans` scans at once: each process's peak and what it keeps 2 s after."""
    import time

    from ctjoint.bench import ResourceSampler, run_point

    procs = _processes(stack.pids["gateway"])
    everyone = procs["serving"] + procs["workers"]
    _reset_peaks(everyone)
    with ResourceSampler({"gateway": stack.pids["gateway"]}, interval_s=0.05) as sampler:
        point, _ = run_point(stack.address, contents, model=model, concurrency=scans, scans=scans)
    time.sleep(2.0)
    workers = {pid: _status_mib(pid, "VmHWM") for pid in procs["workers"]}
    return {
        "scans": scans,
        "scans_per_s": point.scans_per_s,
        "serving_peak_mib": round(_status_mib(procs["serving"][0], "VmHWM"), 1),
        "serving_after_mib": round(_status_mib(procs["serving"][0], "VmRSS"), 1),
        "worker_peaks_mib": sorted((round(v, 1) for v in workers.values()), reverse=True),
        "workers_after_mib": sorted(
            (round(_status_mib(p, "VmRSS"), 1) for p in procs["workers"]), reverse=True
        ),
        "tree_peak_sampled_mib": round(sampler.summary()["gateway"]["peak_rss_mb"] * 1e6 / MIB, 1),
    }


def gateway_memory(slices: int, model: str, cache: Path, log_dir: Path) -> dict[str, Any]:
    """One scan, then four at once, through a spawned gateway + CPU Triton."""
    import grpc

    from ctjoint.bench import load_series, phantom_series, run_scan, spawned_stack

    contents = load_series(phantom_series(cache, size=512, slices=slices))
    warm = load_series(phantom_series(cache, size=512, slices=100))
    with spawned_stack(log_dir, backend="triton") as stack:
        with grpc.insecure_channel(stack.address) as channel:
            run_scan(channel, warm, model=model)
        one = _gateway_round(stack, contents, model, 1)
        four = _gateway_round(stack, contents, model, 4)
    return {
        "model": model,
        "slices": slices,
        "int16_mib": round(512 * 512 * slices * 2 / MIB, 1),
        "limit_mib": round(_k8s_limit_bytes() / MIB, 1),
        "one": one,
        "four": four,
    }


def _gateway_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | slices | scans at once | serving process peak / after (MiB) | "
        "worker peaks (MiB) | workers after (MiB) | gateway tree peak, sampled (MiB) | "
        "target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key in ("one", "four"):
            p = r[key]
            target = (
                f"one scan <= 3 x int16 = {3 * r['int16_mib']:.0f} MiB"
                if key == "one"
                else f"<= limit {r['limit_mib']:.0f} MiB"
            )
            lines.append(
                f"| {r['model']} | {r['slices']} | {p['scans']} | {p['serving_peak_mib']} / "
                f"{p['serving_after_mib']} | {', '.join(map(str, p['worker_peaks_mib']))} | "
                f"{', '.join(map(str, p['workers_after_mib']))} | {p['tree_peak_sampled_mib']} | "
                f"{target} |"
            )
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | matrix | slices | decoded volume (MiB) | peak growth (MiB) | per decoded byte |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']}x{r['size']} | {r['slices']} | {r['decoded_mb']} | "
            f"{r['growth_mb']} | {r['per_decoded_byte']} |"
        )
    return "\n".join(lines)


def _write_doc(doc: Path, table: str, mark: tuple[str, str] = MARK) -> None:
    text = doc.read_text()
    start, end = text.index(mark[0]) + len(mark[0]), text.index(mark[1])
    doc.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x100,1024x40,2048x12")
    parser.add_argument("--models", default="jcs2d,deepsc3d")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ctjoint-bench")
    parser.add_argument("--doc", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--gateway", action="store_true", help="measure a spawned gateway")
    parser.add_argument("--slices", type=int, default=400, help="with --gateway")
    args = parser.parse_args()
    if args.gateway:
        rows = [
            gateway_memory(args.slices, model, args.cache, Path("out/bench/gateway-memory"))
            for model in args.models.split(",")
        ]
        for row in rows:
            print(json.dumps(row), flush=True)
        table = _gateway_table(rows)
        print(table)
        if args.doc is not None:
            _write_doc(args.doc, table, GATEWAY_MARK)
        return
    if args.case:
        size, slices, model = args.case.split(",")
        print(json.dumps(_one_case(int(size), int(slices), model, args.cache)))
        return
    rows = []
    for model in args.models.split(","):
        for case in args.sizes.split(","):
            size, slices = (int(v) for v in case.split("x"))
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--cache",
                    str(args.cache),
                    "--case",
                    f"{size},{slices},{model}",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                check=False,
            )
            if done.returncode != 0:
                sys.exit(f"case {model} {case} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    table = _table(rows)
    print(table)
    print("largest per decoded byte:", max(r["per_decoded_byte"] for r in rows))
    if args.doc is not None:
        _write_doc(args.doc, table)


if __name__ == "__main__":
    main()
