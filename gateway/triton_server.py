"""Start a real `tritonserver` on a model repository and wait until every model is READY.

Locked down by default, since Triton has no authentication of its own: it binds to loopback,
loads the repository once (`--model-control-mode=none`: load/unload requests are refused),
serves gRPC only, and opens its HTTP and metrics endpoints only when given a port for them.

Two installs are supported: `tritonserver` on PATH (the NGC container, with all its backends),
and the binary bundled in the `nvidia-pytriton` wheel (python backend only, CPU machines).
The wheel's binary needs its own library folder on LD_LIBRARY_PATH, a writable backend folder
holding the python-backend stub for this Python, and this environment's site-packages visible
to the stub's embedded interpreter (see `_wheel_install`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from ctjoint.contracts import repo_root
from ctjoint.gateway.errors import CtJointError

log = logging.getLogger(__name__)

ENV_TRITON_RUNTIME: Final = "CTJOINT_TRITON_ENV"
READY_TIMEOUT_S: Final = 180.0
STOP_GRACE_S: Final = 30.0
_POLL_S: Final = 0.25
_LOG_TAIL_LINES: Final = 40


class TritonServerError(CtJointError):
    """tritonserver is missing, would not start, or did not become ready in time."""


@dataclass(frozen=True)
class TritonInstall:
    """A runnable tritonserver: the binary, its backend folder and the environment it needs."""

    binary: Path
    backend_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    # A folder made for this install (the wheel's backends copy), removed with the server.
    scratch: Path | None = None
    source: str = "PATH"


@dataclass(frozen=True)
class TritonServerConfig:
    """How to run the server. Loopback by default: Triton has no authentication of its own.

    `http_port` / `metrics_port` None (the default): that endpoint is not opened at all.
    """

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int | None = None
    metrics_port: int | None = None
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()

    @property
    def grpc_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        """Triton's HTTP endpoint, None when it is off."""
        if self.http_port is None:
            return None
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.http_port}"


def find_install(binary: Path | None = None) -> TritonInstall:
    """An explicit binary, else `tritonserver` on PATH, else the nvidia-pytriton wheel's."""
    if binary is not None:
        if not binary.is_file():
            raise TritonServerError(f"no tritonserver at {binary}")
        return TritonInstall(binary=binary, source=str(binary))
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path), source="PATH")
    return _wheel_install()


def runtime_env() -> Path:
    """The Python environment the wheel's server and its python-backend stubs run in.

    $CTJOINT_TRITON_ENV, else `<repo>/.venv-triton` (made by `make`), else this environment.
    A separate environment because the wheel's stub is built against numpy 1.x: under numpy 2
    it hands Triton empty output tensors, while the gateway side wants numpy 2 and the
    tritonclient that goes with protobuf 6.
    """
    configured = os.environ.get(ENV_TRITON_RUNTIME)
    if configured:
        return Path(configured)
    default = repo_root() / ".venv-triton"
    return default if default.is_dir() else Path(sys.prefix)


def _wheel_install() -> TritonInstall:
    prefix = runtime_env()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    package = prefix / "lib" / f"python{version}" / "site-packages" / "pytriton"
    if not package.is_dir():
        raise TritonServerError(
            f"no tritonserver on PATH and no nvidia-pytriton wheel in {prefix}; run `make "
            f"triton-runtime` (or set {ENV_TRITON_RUNTIME}), or run inside the NGC container"
        )
    root = package / "tritonserver"
    binary = root / "bin" / "tritonserver"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = package.parent / "nvidia_pytriton.libs"
    for needed in (binary, stub, root / "backends" / "python"):
        if not needed.exists():
            raise TritonServerError(f"the nvidia-pytriton wheel lacks {needed}")
    # The stub must sit next to libtriton_python.so, so the backends go to a folder of ours.
    scratch = Path(tempfile.mkdtemp(prefix="ctjoint-triton-"))
    backends = scratch / "backends"
    shutil.copytree(root / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    env = {"LD_LIBRARY_PATH": _prepend(str(libs), os.environ.get("LD_LIBRARY_PATH"))}
    # The stub embeds libpython and ignores PYTHONPATH; it derives its prefix from the first
    # `python3` on PATH. The runtime environment's bin/ first makes models see its
    # site-packages (numpy, onnxruntime, ctjoint.contracts).
    env["PATH"] = _prepend(str(prefix / "bin"), os.environ.get("PATH"))
    return TritonInstall(
        binary=binary, backend_dir=backends, env=env, scratch=scratch, source="nvidia-pytriton"
    )


def _prepend(first: str, rest: str | None) -> str:
    return f"{first}{os.pathsep}{rest}" if rest else first


def server_args(config: TritonServerConfig, install: TritonInstall) -> list[str]:
    """The command line: every model loaded at start, READY only when all of them are."""
    args = [
        str(install.binary),
        f"--model-repository={config.repository}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        # Every config is complete (generated), so no stub needs spawning just to complete it.
        "--disable-auto-complete-config",
        f"--grpc-address={config.host}",
        f"--grpc-port={config.grpc_port}",
        *_optional_endpoint("http", config.host, config.http_port),
        *_optional_endpoint("metrics", config.host, config.metrics_port),
        f"--log-verbose={config.log_verbose}",
        # Servers on one host must not share python-backend shared-memory region names.
        f"--backend-config=python,shm-region-prefix-name=ctjoint{os.getpid()}p{config.grpc_port}_",
        # 3D logits are ~12 MB a scan: grow the python backend's arena in big steps.
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    if install.backend_dir is not None:
        args.append(f"--backend-directory={install.backend_dir}")
    args.extend(config.extra_args)
    return args


def _optional_endpoint(name: str, host: str, port: int | None) -> list[str]:
    """Flags for Triton's HTTP or metrics endpoint: on with a port, explicitly off without."""
    if port is None:
        return [f"--allow-{name}=false"]
    return [f"--allow-{name}=true", f"--{name}-address={host}", f"--{name}-port={port}"]


class TritonServer:
    """A tritonserver child process: `start()`, `wait_ready()`, `stop()` (or use `with`)."""

    def __init__(
        self,
        config: TritonServerConfig,
        *,
        install: TritonInstall | None = None,
        log_file: Path | None = None,
    ) -> None:
        if not (config.repository / "").is_dir():
            raise TritonServerError(f"model repository {config.repository} is not a folder")
        self.config = config
        self._install = install
        self._log_file = log_file
        self._log_handle: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self._process is not None:
            raise TritonServerError("this server was already started")
        install = self._install or find_install()
        self._install = install
        args = server_args(self.config, install)
        env = {**os.environ, **install.env}
        stdout: IO[bytes] | None = None
        if self._log_file is not None:
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = self._log_file.open("ab")
            stdout = self._log_handle
        log.info(
            "starting tritonserver (%s) on %s, repository %s",
            install.source,
            self.config.grpc_url,
            self.config.repository,
        )
        try:
            # A process group of its own: its python-backend stubs are in it too, so `stop` can
            # take down stubs left behind by a tritonserver that died (SIGKILL, OOM), which
            # otherwise live on under init, one set per restart.
            self._process = subprocess.Popen(
                args,
                env=env,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout else None,
                start_new_session=True,
            )
        except OSError as err:
            self._cleanup()
            raise TritonServerError(f"cannot run {install.binary}: {err}") from err

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Poll Triton's readiness (over gRPC, HTTP may be off) until it is READY; returns the
        seconds it took.

        Fails at once when the process exits (a model that fails to load stops it, with
        --exit-on-error), naming the exit status and the end of its log.
        """
        started = time.monotonic()
        deadline = started + timeout
        while True:
            process = self._process
            if process is None:
                raise TritonServerError("the server was not started")
            code = process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with status {code} before it was ready{self._log_tail()}"
                )
            if grpc_ready(self.config.grpc_url):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver was not ready after {timeout:.0f} s{self._log_tail()}"
                )
            time.sleep(_POLL_S)

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL after `grace` seconds;
        then whatever is left of its process group (orphaned backend stubs)."""
        process, self._process = self._process, None
        code: int | None = None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            code = process.returncode
            _kill_group(process.pid)
        self._cleanup()
        return code

    def forward_signal(self, signum: int) -> None:
        """Pass a signal on to tritonserver (it runs in a session of its own)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def wait(self) -> int:
        """Block until the server exits; returns its status."""
        if self._process is None:
            raise TritonServerError("the server was not started")
        return self._process.wait()

    def _cleanup(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._install is not None and self._install.scratch is not None:
            shutil.rmtree(self._install.scratch, ignore_errors=True)
            self._install = None

    def _log_tail(self) -> str:
        if self._log_file is None or not self._log_file.is_file():
            return ""
        lines = self._log_file.read_text(errors="replace").splitlines()
        interesting = [line for line in lines if not line.startswith(("+", "|"))]
        tail = "\n".join(interesting[-_LOG_TAIL_LINES:])
        return f"; end of {self._log_file}:\n{tail}"

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def grpc_ready(url: str, timeout: float = 2.0) -> bool:
    """Triton's ServerReady over gRPC (with --strict-readiness: every model READY)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            reply = stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.ready)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a stopped tritonserver's process group (it led the group, so
    its pid is the group id); nothing left is the normal case."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def serve_forever(
    config: TritonServerConfig, *, binary: Path | None = None, timeout: float = READY_TIMEOUT_S
) -> int:
    """`ctjoint triton serve`: start, wait until READY, then run until the server exits.

    SIGINT/SIGTERM are passed on to tritonserver (a session of its own), which drains and
    exits; this returns its exit status.
    """
    server = TritonServer(config, install=find_install(binary))
    server.start()
    previous = {
        signum: signal.signal(signum, lambda signum, _frame: server.forward_signal(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        seconds = server.wait_ready(timeout)
        log.info("tritonserver ready on %s after %.1f s", config.grpc_url, seconds)
        return server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.stop()


def free_ports(count: int, host: str = "127.0.0.1") -> Sequence[int]:
    """`count` distinct ports free on `host` right now (for tests and `--grpc-port 0`)."""
    import socket

    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()
