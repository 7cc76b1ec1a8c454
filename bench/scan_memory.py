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
"""

from __future__ import annotations

import argparse
import asyncio
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


def _write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    start, end = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
    doc.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x100,1024x40,2048x12")
    parser.add_argument("--models", default="jcs2d,deepsc3d")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ctjoint-bench")
    parser.add_argument("--doc", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
