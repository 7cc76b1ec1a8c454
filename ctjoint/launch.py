"""Starting the serving processes: a `ctjoint gateway serve` subprocess, alone or in front of a
tritonserver. The one launcher that the demo, the bench and the tests share.

At the command-line layer (docs/architecture.md): the gateway runs as a process of its own, so
this module imports the gateway side only for tritonserver (gateway/triton_server.py) and the
error root, and only when asked to start one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctjoint.errors import CtJointError

START_TIMEOUT_S: Final = 120.0
STOP_GRACE_S: Final = 30.0
_LISTENING: Final = re.compile(r"listening on (\S+):(\d+) ")
_METRICS: Final = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
SERVING: Final = health_pb2.HealthCheckResponse.SERVING


class LaunchError(CtJointError):
    """A serving process did not come up; the message names its log."""


class GatewayProcess:
    """One `ctjoint gateway serve` subprocess on a port it picks itself (--port 0, read back
    from its log). Its output goes to a file: a pipe nobody reads could fill and block it."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        host: str = "127.0.0.1",
        metrics: bool = True,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.log_path = log_path
        self.args = args
        self.host = host
        self.with_metrics = metrics
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.metrics_url = ""

    @property
    def command(self) -> list[str]:
        command = [sys.executable, "-m", "ctjoint.cli", "gateway", "serve", "--host", self.host]
        command += ["--port", "0"]
        if self.with_metrics:
            command += ["--metrics-port", "0"]
        return [*command, *self.args]

    @property
    def pid(self) -> int:
        if self.process is None:
            raise LaunchError("the gateway was never started")
        return self.process.pid

    def start(self, *, wait_serving: bool = True) -> GatewayProcess:
        """Start it and wait until it listens (and serves metrics), then, with `wait_serving`,
        until its health is SERVING; stops it and raises LaunchError when it does not."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.process.returncode if self.process is not None else None
                raise LaunchError(
                    f"the gateway exited with {code} while starting; "
                    f"see {self.log_path}:\n{self.log()}"
                )
            if self._read_addresses() and (not wait_serving or self.health() == SERVING):
                return self
            time.sleep(0.1)
        self.stop()
        wanted = "SERVING" if wait_serving else "listening"
        raise LaunchError(
            f"the gateway was not {wanted} within {self.start_timeout_s:.0f} s; "
            f"see {self.log_path}:\n{self.log()}"
        )

    def _read_addresses(self) -> bool:
        if not self.address or (self.with_metrics and not self.metrics_url):
            text = self.log()
            listening, metrics = _LISTENING.search(text), _METRICS.search(text)
            if listening:
                self.address = f"{listening.group(1)}:{listening.group(2)}"
            if metrics:
                self.metrics_url = f"http://{metrics.group(1)}:{metrics.group(2)}/metrics"
        return bool(self.address) and (self.metrics_url != "" or not self.with_metrics)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self, service: str = "") -> int | None:
        """The health status, or None when the server does not answer."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return None

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_GRACE_S) -> int:
        if self.process is None:
            raise LaunchError("the gateway was never started")
        return self.process.wait(timeout)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM (the gateway's graceful stop), SIGKILL after `grace` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Stack:
    """A started gateway, and the tritonserver behind it when there is one."""

    gateway: GatewayProcess
    triton_pid: int | None = None
    triton_url: str | None = None
    triton_http_url: str | None = None
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.gateway.address


@contextmanager
def serving_stack(
    log_dir: Path,
    *gateway_args: str,
    backend: str = "triton",
    repository: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """tritonserver on `repository` (default: the checkout's CPU repository) and a gateway
    using it (`backend="triton"`), or a gateway alone (`"embedded"`); loopback, free ports,
    logs in `log_dir`, both stopped on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if backend != "triton":
        args = ("--backend", backend, *gateway_args)
        with GatewayProcess(log_dir / "gateway.log", *args, env=env) as gateway:
            yield Stack(gateway, pids={"gateway": gateway.pid})
        return
    from ctjoint.contracts import TRITON_TARGET_CPU, repo_root
    from ctjoint.gateway.triton_server import TritonServer, TritonServerConfig, free_ports

    grpc_port, http_port, metrics_port = free_ports(3)
    config = TritonServerConfig(
        repository=repository or repo_root() / "model_repository" / TRITON_TARGET_CPU,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
    with TritonServer(config, log_file=log_dir / "triton.log") as triton:
        args = ("--backend", "triton", "--triton-url", config.grpc_url, *gateway_args)
        with GatewayProcess(log_dir / "gateway.log", *args, env=env) as gateway:
            pids = {"gateway": gateway.pid}
            if triton.pid is not None:
                pids["triton"] = triton.pid
            yield Stack(gateway, triton.pid, config.grpc_url, config.http_url, pids)


__all__ = ["GatewayProcess", "LaunchError", "Stack", "serving_stack"]
