"""A bare grpc.aio server that refuses every AnalyzeScan at once: the floor for refusals.

    python bench/bare_refuser.py   # prints its port on the first line, serves until killed

No ctjoint code runs per call (no interceptor of ours, no slots, no metrics, no logging): each
call gets RESOURCE_EXHAUSTED from a handler that only sets the status. bench/refusal_burst.py
fires the same bursts at it and at the gateway, so the gateway's cost per refusal is read as a
ratio to what grpc.aio itself costs on the same machine in the same run.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import grpc
import grpc.aio

from ctjoint.v1 import scan_pb2_grpc


class _Refuser(scan_pb2_grpc.ScanServiceServicer):
    async def AnalyzeScan(  # noqa: N802 (the gRPC method name)
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details("every scan slot is taken")


async def _serve() -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    scan_pb2_grpc.add_ScanServiceServicer_to_server(_Refuser(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gc.collect()
    gc.freeze()  # as the gateway does after start-up
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve())
