"""Decode compressed pixel data in a small pool of worker processes.

JPEG, JPEG 2000, JPEG-LS and RLE codecs are C libraries fed with bytes a scanner (or an attacker)
chose; one that crashes, hangs or allocates without bound must cost one file, not the gateway.
Each worker owns a pipe; a decode that kills its worker (a signal, an abort), outlives its
deadline or runs out of the worker's memory allowance raises `DecodeError` for that file, and
a replacement starts at once, in the background. Uncompressed pixels never come here: they are
decoded in-process (dicom_io), which is both safe (numpy reads a bounded buffer) and fast.

Workers are fresh interpreters (the gateway's grpc.aio threads make fork unsafe), started only
when the first compressed file arrives, so a gateway that never sees one never starts them.

Size: one job, a pool of decoder processes; most of it supervises them (deadlines, memory
bound, replacement).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

logger = logging.getLogger(__name__)

ENV_DECODE_WORKERS: Final = "CTJOINT_DECODE_WORKERS"
DEFAULT_WORKERS: Final = 2
# A 512x512 JPEG 2000 slice decodes in ~20 ms; a 4096x4096 one in well under a second. Far
# longer means a codec stuck on crafted input.
DEFAULT_TIMEOUT_S: Final = 20.0
# What a worker may allocate beyond its own start-up footprint: a 4096x4096 slice of 32 bits
# is 64 MiB, so 512 MiB leaves room for a codec's working copies while refusing a bomb.
DEFAULT_MEMORY_BYTES: Final = 512 * 1024 * 1024
# A worker imports numpy, pydicom and the codec plugins before it serves: seconds on a busy box.
STARTUP_TIMEOUT_S: Final = 60.0
# Longest codec message passed on (it goes into an error the client reads).
_MAX_MESSAGE: Final = 300

# Attributes the codecs read besides PixelData; anything else in the file stays in the gateway.
PIXEL_ATTRIBUTES: Final = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class DecodeRequest:
    """What a worker needs to decode one frame: the syntax, the pixel module, the bytes."""

    transfer_syntax: str
    attributes: dict[str, Any] = field(default_factory=dict)
    pixel_data: bytes = b""


class DecodeError(Exception):
    """A decode that did not produce pixels; `kind` is "error", "crashed" or "timeout"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


DecodeFunction = Callable[[DecodeRequest], np.ndarray]


def decode_pixels(request: DecodeRequest) -> np.ndarray:
    """The worker's default decode: pydicom's decoder for the syntax on a minimal data set."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = UID(request.transfer_syntax)
    for keyword, value in request.attributes.items():
        if value is not None:
            setattr(dataset, keyword, value)
    dataset["PixelData"] = DataElement(
        0x7FE00010, "OB", request.pixel_data, is_undefined_length=True
    )
    return np.asarray(dataset.pixel_array)


def worker_entry() -> None:
    """A worker's main: `python -c ...worker_entry()` FD MODULE:FUNCTION MEMORY_BYTES."""
    fd, target, memory = sys.argv[1], sys.argv[2], sys.argv[3]
    module, _, name = target.partition(":")
    decode = getattr(importlib.import_module(module), name)
    connection = multiprocessing.connection.Connection(int(fd))
    _serve(connection, decode, int(memory) or None)


def _serve(
    connection: multiprocessing.connection.Connection,
    decode: DecodeFunction,
    memory_bytes: int | None,
) -> None:
    """Answer decode requests on `connection` until the gateway closes it."""
    # The gateway handles SIGINT/SIGTERM and then closes the pipe; the worker just follows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A codec's complaints come back as the error; warnings would only echo pixel bytes.
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    import pydicom.pixels  # noqa: F401  (import once, not on the first request)

    if memory_bytes is not None:
        _limit_address_space(memory_bytes)
    # Ready: the gateway times decodes from here, not the interpreter's start-up.
    connection.send(("ready",))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, ...] = ("ok", decode(request))
        except MemoryError:
            reply = ("error", "MemoryError", "needs more memory than a decode may use")
        except Exception as err:
            reply = ("error", type(err).__name__, str(err)[:_MAX_MESSAGE])
        try:
            connection.send(reply)
        except (EOFError, OSError):
            return


def _limit_address_space(extra_bytes: int) -> None:
    """Cap the worker's address space at its current size plus `extra_bytes` (Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[0])
        current = pages * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, current + extra_bytes))
    except (OSError, ValueError, ImportError):
        logger.warning("cannot limit decode workers' memory here; decoding unbounded")


class _Worker:
    """One worker process and the gateway's end of its socket.

    A fresh interpreter (not multiprocessing's spawn, which re-imports the parent's main
    module: a test runner or a console script) that imports only this module and the codecs.
    """

    def __init__(self, decode: DecodeFunction, memory_bytes: int | None) -> None:
        ours, theirs = socket.socketpair()
        # The worker sees the gateway's import path (a decode function may live beside it).
        path = os.pathsep.join(p for p in sys.path if p)
        command = [
            sys.executable,
            "-c",
            "from ctjoint.gateway.decode_pool import worker_entry; worker_entry()",
            str(theirs.fileno()),
            f"{decode.__module__}:{decode.__qualname__}",
            str(memory_bytes or 0),
        ]
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        finally:
            theirs.close()
        self.connection = multiprocessing.connection.Connection(ours.detach())

    def wait_ready(self, timeout_s: float) -> None:
        """Until the worker has imported its codecs; DecodeError if it dies or stalls first."""
        try:
            if self.connection.poll(timeout_s) and self.connection.recv() == ("ready",):
                return
        except (EOFError, OSError):
            pass
        self.kill()
        raise DecodeError("crashed", "a decode worker failed to start")

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_code(self) -> int | None:
        try:
            return self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        self.connection.close()
        try:
            self.process.wait(2.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.connection.close()
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            logger.warning("a decode worker (pid %d) did not exit after SIGKILL", self.process.pid)


class DecodePool:
    """At most `workers` decodes at once, each in its own process; thread-safe.

    `decode` runs in the workers: a module-level function (named to the worker as
    module:function), the default being `decode_pixels`; tests pass one that crashes, to
    prove the isolation.
    """

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
        decode: DecodeFunction = decode_pixels,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least 1 worker, got {workers}")
        self.workers = workers
        self.timeout_s = timeout_s
        self._memory_bytes = memory_bytes
        self._decode = decode
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        # Workers alive or starting (a replacement included): never more than `workers`.
        self._count = 0
        self._closed = False
        # Figures for logs and tests: workers started and lost (crashed or killed on timeout).
        self.started = 0
        self.lost = 0

    def decode(self, request: DecodeRequest) -> np.ndarray:
        """Decode in a worker; raises `DecodeError` (a worker that died is replaced at once)."""
        with self._slots:
            worker = self._take()
            healthy = False
            try:
                result = self._call(worker, request)
                healthy = True
                return result
            except DecodeError as err:
                # A codec error is an answer; the worker that gave it is fine.
                healthy = err.kind == "error"
                raise
            finally:
                self._give_back(worker, healthy)

    def close(self) -> None:
        """Stop every worker (idle ones now; busy ones are killed)."""
        with self._lock:
            self._closed = True
            workers, self._all, self._idle = list(self._all), set(), []
            self._lock.notify_all()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------

    def _take(self) -> _Worker:
        with self._lock:
            while True:
                if self._closed:
                    raise DecodeError("error", "the decode pool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.workers:
                    self._count += 1
                    break
                # Every worker is busy or starting; as this caller holds one of the `workers`
                # slots, one of them is a replacement that is about to be idle.
                self._lock.wait()
        return self._start()

    def _start(self) -> _Worker:
        """A new ready worker, counted already in `_count` (given back if it fails)."""
        try:
            worker = _Worker(self._decode, self._memory_bytes)
            worker.wait_ready(STARTUP_TIMEOUT_S)
        except (DecodeError, OSError) as err:
            with self._lock:
                self._count -= 1
                self._lock.notify_all()
            if isinstance(err, DecodeError):
                raise
            raise DecodeError("crashed", f"a decode worker failed to start ({err})") from err
        with self._lock:
            self.started += 1
            if self._closed:
                self._count -= 1
                closed = True
            else:
                self._all.add(worker)
                closed = False
        if closed:
            worker.stop()
            raise DecodeError("error", "the decode pool is closed")
        return worker

    def _give_back(self, worker: _Worker, healthy: bool) -> None:
        with self._lock:
            if healthy and not self._closed and worker.alive():
                self._idle.append(worker)
                self._lock.notify()
                return
            self._all.discard(worker)
            replace = not self._closed
            if not replace:
                self._count -= 1
        worker.kill()
        if replace:
            # The next file need not wait for an interpreter to start.
            threading.Thread(
                target=self._replace, name="ctjoint-decode-restart", daemon=True
            ).start()

    def _replace(self) -> None:
        try:
            worker = self._start()
        except DecodeError:
            logger.warning("a replacement decode worker failed to start; one starts on demand")
            return
        with self._lock:
            closed = self._closed
            if closed:
                self._all.discard(worker)
                self._count -= 1
            else:
                self._idle.append(worker)
                self._lock.notify()
        if closed:
            worker.stop()

    def _call(self, worker: _Worker, request: DecodeRequest) -> np.ndarray:
        try:
            worker.connection.send(request)
            if not worker.connection.poll(self.timeout_s):
                self.lost += 1
                logger.warning(
                    "a pixel decode ran past %.0f s; its worker is replaced", self.timeout_s
                )
                raise DecodeError(
                    "timeout", f"the decoder did not finish within {self.timeout_s:g} s"
                )
            reply = worker.connection.recv()
        except (EOFError, OSError) as err:
            self.lost += 1
            how = _exit_description(worker.exit_code())
            logger.warning("a pixel decode killed its worker (%s); the worker is replaced", how)
            raise DecodeError("crashed", f"the decoder process died ({how})") from err
        if reply[0] == "ok":
            return np.asarray(reply[1])
        raise DecodeError("error", f"{reply[1]}: {reply[2]}")


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


_default: DecodePool | None = None
_default_lock = threading.Lock()


def default_pool() -> DecodePool:
    """The process-wide pool (CTJOINT_DECODE_WORKERS workers, default 2), made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = DecodePool(_configured_workers())
        return _default


def _configured_workers() -> int:
    text = os.environ.get(ENV_DECODE_WORKERS, "").strip()
    try:
        workers = int(text) if text else DEFAULT_WORKERS
    except ValueError:
        workers = 0
    if workers < 1:
        # A typo in the environment must not turn every compressed file into an error.
        logger.warning(
            "%s=%r is not a positive integer; using %d", ENV_DECODE_WORKERS, text, DEFAULT_WORKERS
        )
        workers = DEFAULT_WORKERS
    return workers


def set_default_pool(pool: DecodePool | None) -> DecodePool | None:
    """Replace the process-wide pool (None: make a fresh one on next use); returns the old."""
    global _default
    with _default_lock:
        old, _default = _default, pool
    return old


def close_default_pool() -> None:
    """Stop the process-wide pool's workers (gateway shutdown, interpreter exit)."""
    old = set_default_pool(None)
    if old is not None:
        old.close()


atexit.register(close_default_pool)
