"""Docker HEALTHCHECK of the ctjoint image: exit 0 when this container's role is healthy.

triton: Triton's readiness (every model READY); gateway: the standard gRPC health service
says SERVING (it does only once its backend is ready); all: both. No curl or grpc_health_probe
in the image: the venv's Python has what it takes.

A gateway serving TLS (CTJOINT_TLS_CERT set) is checked over TLS: trusting CTJOINT_TLS_CA
(default: the gateway's own certificate file, enough for a self-signed one or a full chain),
with the name CTJOINT_TLS_SERVER_NAME (default localhost); under mutual TLS the check presents
CTJOINT_HEALTH_CLIENT_CERT / CTJOINT_HEALTH_CLIENT_KEY. Health needs no bearer token.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctjoint.client.channel import ChannelSecurity, open_channel

TIMEOUT_S = 4.0


def triton_ready(url: str = "http://127.0.0.1:8000/v2/health/ready") -> str | None:
    """None when Triton answers ready, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"Triton answered {response.status}"
    except (urllib.error.URLError, OSError) as err:
        return f"Triton is not ready: {err}"


def _gateway_security() -> ChannelSecurity:
    """Plaintext, or TLS as the gateway in this container was told to serve it."""
    cert = os.environ.get("CTJOINT_TLS_CERT")
    if not cert:
        return ChannelSecurity(token_from_env=False)
    client_cert = os.environ.get("CTJOINT_HEALTH_CLIENT_CERT")
    client_key = os.environ.get("CTJOINT_HEALTH_CLIENT_KEY")
    return ChannelSecurity(
        tls=True,
        ca_cert=Path(os.environ.get("CTJOINT_TLS_CA") or cert),
        client_cert=Path(client_cert) if client_cert else None,
        client_key=Path(client_key) if client_key else None,
        server_name=os.environ.get("CTJOINT_TLS_SERVER_NAME", "localhost"),
        token_from_env=False,
    )


def gateway_serving(address: str = "127.0.0.1:50051") -> str | None:
    """None when the gateway's overall health is SERVING, else why not."""
    with open_channel(address, _gateway_security()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            return f"gateway health check failed: {err.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"gateway is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main() -> int:
    role = os.environ.get("CTJOINT_ROLE", "all")
    checks = {"triton": (triton_ready,), "gateway": (gateway_serving,)}
    chosen = checks.get(role, (triton_ready, gateway_serving))
    problems = [p for p in (check() for check in chosen) if p]
    for problem in problems:
        sys.stderr.write(problem + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
