"""A fast upload does not pile up in the analysis worker: the gateway forwards at most
FILES_IN_FLIGHT files its worker's pipeline has not taken yet, and reads the client's stream
no faster than that (issue 22, point 3). A real worker process, the test models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from dicom_factory import write_ct_series

from ctjoint.contracts import MODEL_JCS2D
from ctjoint.gateway.analysis import Progress
from ctjoint.gateway.answer import ScanOrder
from ctjoint.gateway.scan_workers import FILES_IN_FLIGHT, ScanWorkerPool, WorkerBounds
from ctjoint.gateway.server import GatewayConfig, _worker_setup
from ctjoint.v1 import scan_pb2


def test_the_worker_is_sent_no_more_files_than_its_pipeline_took_plus_the_window(
    contract_model_dir: Path, tmp_path: Path
) -> None:
    # 512x512 slices take the pipeline milliseconds each; forwarding one takes far less.
    paths = write_ct_series(tmp_path / "series", slices=60, size=512)
    contents = [p.read_bytes() for p in paths]
    validated: list[int] = []
    ahead: list[int] = []

    async def files() -> AsyncIterator[tuple[str, bytes]]:
        for index, content in enumerate(contents):
            # Files handed to the pool so far, less those the worker's pipeline validated.
            ahead.append(index - (validated[-1] if validated else 0))
            yield "", content

    def progress(event: Progress) -> None:
        if event.stage == "validated":
            validated.append(event.done)

    async def run() -> int:
        config = GatewayConfig(model_dir=contract_model_dir, threads=1)
        pool = ScanWorkerPool(_worker_setup(config), 1, WorkerBounds())
        pool.start()
        try:
            await pool.wait_ready()
            order = ScanOrder(
                MODEL_JCS2D,
                len(contents),
                1000,
                scan_pb2.OutputOptions(),
                "test",
                pacs=False,
                progress=True,
            )
            answer = await pool.analyze(order, files(), progress=progress, receive_ms=lambda: 0.0)
            return answer.slices
        finally:
            await pool.close()

    assert asyncio.run(run()) == len(contents)
    assert validated[-1] == len(contents)
    # Taken by the pipeline (then validated) frees a place: one in validation, one announced.
    assert max(ahead) <= FILES_IN_FLIGHT + 2
    assert max(ahead) >= FILES_IN_FLIGHT // 2  # the window is used, not one file at a time
