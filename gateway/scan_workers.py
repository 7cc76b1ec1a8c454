"""Scan analysis in supervised worker processes: a wedged, crashed or runaway analysis costs
its own scan, never the serving process.

Threads cannot be stopped, so analysis that may run away belongs in a process that can be
killed. Each admitted scan is handed to one worker process for its whole life: its files go to
the worker as bytes as they arrive, progress and the answer come back (`answer.ScanAnswer`).
The worker runs exactly what a gateway given a backend object runs in-process
(`answer.analyze_scan`), inference included, with its own backend: a Triton client or its own
ONNX Runtime sessions. Tensors therefore never cross the pipe, only files in and the answer
out. The serving process keeps gRPC, admission, health and the PACS push; its event loop
shares the GIL with no analysis thread, which is what lets it refuse a burst of excess scans
within milliseconds while scans are at work.

Bounds: a scan may use `cpu_seconds` of CPU time (RLIMIT_CPU, set by the worker as the scan
begins, so the kernel ends the worker whatever it is stuck in) and `wall_seconds` from its
last file to its answer (then the serving process kills the worker). A worker that dies (a
crash, an out-of-memory kill, a bound) fails its scan with a clear status (AnalysisLimitError:
RESOURCE_EXHAUSTED; AnalysisCrashedError: INTERNAL) and is replaced in the background.
Workers are fresh interpreters, as in decode_pool (fork is unsafe beside grpc's threads).

Size: one job, the analysis worker processes: their life cycle (start, hand a scan over, bound,
kill, replace) and the worker's own loop, which speak one pipe protocol and change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ctjoint.gateway.analysis import Progress, ProgressCallback
from ctjoint.gateway.answer import ScanAnswer, ScanOrder
from ctjoint.gateway.backends.replicas import ReplicaChange, SharedReplicaHealth
from ctjoint.gateway.errors import (
    AnalysisCrashedError,
    AnalysisLimitError,
    AnalysisMemoryError,
    BackendUnavailableError,
)
from ctjoint.gateway.limits import OVERLOAD_GATE
from ctjoint.gateway.memory import (
    FreedMemory,
    MemoryLedger,
    ScanMemory,
    memory_limit_bytes,
    oom_kills,
)

if TYPE_CHECKING:
    from ctjoint.gateway.server import GatewayConfig

log = logging.getLogger(__name__)

# A chest CT analyses in a few CPU seconds here; minutes mean input that makes the pipeline
# run away (or a box far too small for the scan).
DEFAULT_SCAN_CPU_SECONDS: Final = 300.0
# From the last file to the answer: inference waits on Triton too, so wall time, not CPU.
DEFAULT_SCAN_WALL_SECONDS: Final = 300.0
# A worker imports numpy, pydicom and its backend, and loads the models: seconds on a busy box.
START_TIMEOUT_S: Final = 120.0
# A cancelled scan's worker gets this long to stop it before it is killed and replaced.
CANCEL_WAIT_S: Final = 2.0
# Restarts after failed starts back off from the first to the last delay, doubling.
RESTART_DELAYS_S: Final = (0.5, 10.0)
_FRAME = struct.Struct("!Q")
# One frame carries at most a DICOM file or an answer: room for the stream reader to buffer.
_READ_LIMIT: Final = 16 * 1024 * 1024
_PR_SET_PDEATHSIG: Final = 1
# Workers run at this niceness: when the cores are busy with analysis, the kernel still gives
# the serving process (gRPC, admission, refusals) the CPU the moment it wants it (CFS weight
# 1024 against 110 per worker). Analysis loses nothing while the serving process idles.
WORKER_NICENESS: Final = 10


@dataclass(frozen=True)
class WorkerBounds:
    """How much one scan's analysis may take before its worker is ended."""

    cpu_seconds: float = DEFAULT_SCAN_CPU_SECONDS
    wall_seconds: float = DEFAULT_SCAN_WALL_SECONDS

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds"):
            value = float(getattr(self, name))
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is told as it starts: the gateway's configuration (it builds the same
    backend and pipeline from it), the logging to use, its CPU bound per scan, and the memory
    budgets (gateway/memory.py: decoded bytes per scan, and for the gateway)."""

    config: GatewayConfig
    log_level: str
    log_format: str
    cpu_seconds: float
    max_scan_bytes: int
    budget_bytes: int


class _Channel:
    """Length-prefixed pickles over a stream socket: the two ends are our own processes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def over(cls, sock: socket.socket) -> _Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_READ_LIMIT)
        return cls(reader, writer)

    def send_nowait(self, message: object) -> None:
        """Queue a message whole (frames never interleave); small ones need no flow control."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_FRAME.pack(len(data)))
        self._writer.write(data)

    async def send(self, message: object) -> None:
        self.send_nowait(message)
        await self._writer.drain()

    async def recv(self) -> Any:
        """The next message; EOFError once the other end has gone."""
        try:
            (size,) = _FRAME.unpack(await self._reader.readexactly(_FRAME.size))
            return pickle.loads(await self._reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            raise EOFError("the other end closed the channel") from err

    def close(self) -> None:
        self._writer.close()


_GONE: Final = ("gone",)


class _Worker:
    """One worker process, its channel, and what it has said (`inbox`), read by one task for
    the worker's life so that a cancelled scan never cuts a message in half."""

    def __init__(self, process: subprocess.Popen[bytes], channel: _Channel, slot: int) -> None:
        self.process = process
        self.channel = channel
        # Its slot in the memory ledger, freed once the process is gone.
        self.slot = slot
        # The memory cgroup's OOM kills when its current scan began (None: not readable).
        self.oom_kills_at_scan: int | None = None
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.gone = False
        # Why we killed it, if we did: the scan's error names the bound.
        self.killed_for: str | None = None
        # Told when the worker goes (the pool replaces a worker that dies while idle).
        self.on_gone: Callable[[_Worker], None] | None = None
        # Told of the Triton replica changes its backend saw (not queued in the inbox: they
        # come whenever they happen, during a scan or between scans).
        self.on_replica: Callable[[_Worker, ReplicaChange], None] | None = None
        self._reader = asyncio.ensure_future(self._read())

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(cls, setup: WorkerSetup, ledger: MemoryLedger, slot: int) -> _Worker:
        ours, theirs = socket.socketpair()
        path = os.pathsep.join(p for p in sys.path if p)
        command = [
            sys.executable,
            "-c",
            "from ctjoint.gateway.scan_workers import worker_main; worker_main()",
            str(theirs.fileno()),
            f"{ledger.fd},{ledger.slots},{slot}",
        ]
        try:
            process = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(), ledger.fd),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        finally:
            theirs.close()
        try:
            worker = cls(process, await _Channel.over(ours), slot)
            await worker.channel.send(setup)
            reply = await asyncio.wait_for(worker.inbox.get(), START_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as err:
            process.kill()
            process.wait()
            raise BackendUnavailableError(f"an analysis worker did not start ({err!r})") from err
        except BaseException:
            # Cancelled while starting (the gateway is stopping): leave no process behind.
            process.kill()
            process.wait()
            raise
        if reply != ("ready",):
            await worker.kill()
            code = _exit_description(process.poll())
            raise BackendUnavailableError(f"an analysis worker failed to start ({code})")
        return worker

    async def _read(self) -> None:
        try:
            while True:
                message = await self.channel.recv()
                if message[0] == "replica":
                    if self.on_replica is not None:
                        self.on_replica(self, message[1])
                    continue
                self.inbox.put_nowait(message)
        except EOFError:
            pass
        finally:
            self.gone = True
            self.inbox.put_nowait(_GONE)
            if self.on_gone is not None:
                self.on_gone(self)

    async def kill(self, reason: str | None = None) -> int | None:
        """SIGKILL (if still running) and reap; the exit status, None if it would not go."""
        if reason is not None and self.killed_for is None:
            self.killed_for = reason
        if self.process.poll() is None:
            self.process.kill()
        self.channel.close()
        return await self.exit_code(5.0)

    async def exit_code(self, wait_s: float) -> int | None:
        deadline = time.monotonic() + wait_s
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.process.poll()


class ScanWorkerPool:
    """`size` worker processes, one per scan slot, each analysing one scan at a time.

    Used from the event loop only. `live` counts workers that are up (idle or busy): health
    follows it, and admission refuses with UNAVAILABLE while it is zero.
    """

    def __init__(self, setup: WorkerSetup, size: int, bounds: WorkerBounds) -> None:
        if size < 1:
            raise ValueError(f"a scan worker pool needs at least 1 worker, got {size}")
        self.size = size
        self.bounds = bounds
        self._setup = setup
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._starting = 0
        self._failures = 0
        self._last_start_error: BaseException | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._scans = 0
        # Decoded bytes each worker's scan holds (gateway/memory.py): a slot per worker, twice
        # as many as workers so that a replacement starts while the one it replaces is reaped.
        self.ledger = MemoryLedger.create(2 * size)
        self._free_slots = list(range(2 * size))
        # Figures for logs and tests: workers started, and lost (died or killed).
        self.started = 0
        self.lost = 0
        # The serving process's backend, when it shares replica health (Triton).
        self._replicas: SharedReplicaHealth | None = None

    @property
    def live(self) -> int:
        return len(self._idle) + len(self._busy)

    @property
    def pids(self) -> tuple[int, ...]:
        """Process ids of the workers that are up (operators and tests find them here)."""
        return tuple(w.pid for w in (*self._idle, *self._busy))

    def share_replica_health(self, backend: object) -> None:
        """Keep the replica health of `backend` (the serving process's) and the workers'
        backends in step, when it has replicas (Triton).

        Each worker talks to Triton through a backend of its own, and some failures only an
        inference shows (a python stub that died while its model stays READY). What a worker's
        backend sees goes to `backend`, so health turns NOT_SERVING and admission refuses at
        once when no replica is left, as when the analysis ran in this process, and to the
        other workers, so that each does not find a broken replica again on a scan of its
        own. What `backend` sees (its probes) goes to every worker.
        """
        if isinstance(backend, SharedReplicaHealth):
            self._replicas = backend
            backend.on_replica_change(self._replica_changed)

    def start(self) -> None:
        """Start every worker in the background; `wait_ready` waits for the first."""
        for _ in range(self.size):
            self._spawn(0.0)

    async def wait_ready(self) -> None:
        """Until a worker can take a scan; raises the start error if every first start failed."""
        async with self._changed:
            while self.live == 0:
                if self.started == 0 and self._failures >= self.size:
                    raise BackendUnavailableError(
                        f"no analysis worker could start: {self._last_start_error}"
                    ) from self._last_start_error
                await self._changed.wait()

    async def close(self) -> None:
        """Kill every worker now (the server has already stopped its scans)."""
        self._closed = True
        if self._replicas is not None:
            self._replicas.on_replica_change(None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        await asyncio.gather(*(w.kill() for w in workers))
        self.ledger.close()

    async def analyze(
        self,
        order: ScanOrder,
        files: AsyncIterator[tuple[str, bytes]],
        *,
        progress: ProgressCallback | None,
        receive_ms: Callable[[], float],
    ) -> ScanAnswer:
        """Analyse one scan in a worker: its files are forwarded as they come."""
        worker = await self._take()
        self._scans += 1
        scan = self._scans
        ended = False
        worker.oom_kills_at_scan = oom_kills()
        try:
            await worker.channel.send(("scan", scan, order))
            answer = asyncio.ensure_future(self._answer(worker, scan, progress))
            try:
                # Each next file is awaited against the answer, so a worker that dies (or
                # answers early) while the client is between files ends the scan at once.
                incoming = aiter(files)
                while not worker.gone:
                    upcoming = asyncio.ensure_future(anext(incoming))
                    try:
                        await asyncio.wait({upcoming, answer}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        # Stopped early (the answer came, or this scan was cancelled): the
                        # pending read goes too, its outcome retrieved.
                        if not upcoming.done():
                            upcoming.cancel()
                            await asyncio.gather(upcoming, return_exceptions=True)
                        elif not upcoming.cancelled():
                            # Done as this scan was cancelled (the client's stream ended
                            # with StopAsyncIteration): retrieved, or asyncio logs it.
                            upcoming.exception()
                    if upcoming.cancelled():
                        break
                    try:
                        _, content = upcoming.result()
                    except StopAsyncIteration:
                        break
                    if answer.done():
                        break
                    # Forwarding a file costs this loop a copy or two: during a burst of
                    # refusals it waits (bounded) so that the refusals go out first.
                    await OVERLOAD_GATE.wait()
                    await worker.channel.send(("file", content))
                await worker.channel.send(("end", receive_ms()))
                done, _ = await asyncio.wait({answer}, timeout=self.bounds.wall_seconds)
                if not done:
                    log.warning(
                        "a scan's analysis ran past %.0f s after its last file; its worker "
                        "(pid %d) is killed",
                        self.bounds.wall_seconds,
                        worker.pid,
                    )
                    await worker.kill("wall")
                ended = True
                return await answer
            finally:
                if not answer.done():
                    answer.cancel()
                    await asyncio.gather(answer, return_exceptions=True)
        except ConnectionError:
            # The worker went away while we were writing: its exit says why.
            raise await self._death(worker) from None
        finally:
            # Idle again once it says the scan is over (at once after an answer; a scan
            # stopped early is cancelled first), in the background: the RPC need not wait.
            self._track(asyncio.ensure_future(self._settle(worker, scan, cancel=not ended)))

    # --- internals ---------------------------------------------------------------------------

    async def _answer(
        self, worker: _Worker, scan: int, progress: ProgressCallback | None
    ) -> ScanAnswer:
        while True:
            message = await worker.inbox.get()
            kind = message[0]
            if kind == "gone":
                raise await self._death(worker)
            if message[1] != scan:
                continue  # the tail of a scan stopped before (never expected; harmless)
            if kind == "progress":
                if progress is not None:
                    progress(Progress(*message[2:]))
            elif kind == "answer":
                answer: ScanAnswer = message[2]
                return answer
            elif kind == "error":
                error: BaseException = message[2]
                raise error

    async def _death(self, worker: _Worker) -> Exception:
        """The error for the scan of a worker that died, naming why."""
        code = await worker.exit_code(2.0)
        if worker.killed_for == "wall":
            return AnalysisLimitError(
                f"the analysis did not finish within {self.bounds.wall_seconds:g} s of the "
                "last file and was ended"
            )
        if code == -signal.SIGXCPU:
            return AnalysisLimitError(
                f"the analysis used more than {self.bounds.cpu_seconds:g} s of CPU time and "
                "was ended"
            )
        kills, before = oom_kills(), worker.oom_kills_at_scan
        if code == -signal.SIGKILL and kills is not None and before is not None and kills > before:
            return AnalysisMemoryError(
                "the process analysing this scan was killed by the kernel for memory (the "
                f"gateway's memory limit is {memory_limit_bytes()} bytes; lower "
                "--memory-budget or --max-scan-bytes to refuse such scans instead)"
            )
        return AnalysisCrashedError(
            f"the process analysing this scan died ({_exit_description(code)}); the scan was "
            "not analysed"
        )

    async def _take(self) -> _Worker:
        async with self._changed:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self._idle:
                if self._closed:
                    raise BackendUnavailableError("the gateway is stopping")
                if self.live == 0 and self._starting == 0:
                    raise BackendUnavailableError("no analysis worker can take work")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailableError("no analysis worker became free in time")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            worker = self._idle.pop()
            self._busy.add(worker)
            return worker

    async def _settle(self, worker: _Worker, scan: int, *, cancel: bool) -> None:
        """Back to idle once the worker says `scan` is over; after a scan stopped early it is
        told to cancel first. A worker that is gone, or silent for CANCEL_WAIT_S, is killed
        and replaced."""
        if worker.gone or worker.killed_for is not None:
            self._lose(worker)
            return
        deadline = time.monotonic() + CANCEL_WAIT_S
        try:
            if cancel:
                await worker.channel.send(("cancel", scan))
            while True:
                message = await asyncio.wait_for(
                    worker.inbox.get(), max(deadline - time.monotonic(), 0.0)
                )
                if message == ("over", scan):
                    break
                if message == _GONE:
                    raise EOFError
        except (TimeoutError, ConnectionError, EOFError):
            self._lose(worker)
            return
        self._busy.discard(worker)
        if self._closed:
            await worker.kill()
            return
        self._idle.append(worker)
        self._notify()

    def _replica_changed(self, change: ReplicaChange, source: _Worker | None = None) -> None:
        """A backend saw a replica change: the serving process's backend and every other
        worker's are told (`source` None: the serving process's own backend saw it)."""
        if self._closed:
            return
        if source is not None and self._replicas is not None:
            self._replicas.replica_changed(change)
        for worker in (*self._idle, *self._busy):
            if worker is not source and not worker.gone:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    worker.channel.send_nowait(("replica", change))

    def _from_worker(self, worker: _Worker, change: ReplicaChange) -> None:
        self._replica_changed(change, worker)

    def _gone(self, worker: _Worker) -> None:
        """A worker died while idle (a scan's death is its scan's business): replace it."""
        if worker in self._idle:
            self._idle.remove(worker)
            log.warning("an idle analysis worker (pid %d) died; it is replaced", worker.pid)
            self._lose(worker)

    def _lose(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        self.lost += 1
        self._track(asyncio.ensure_future(self._reap(worker)))
        if not self._closed:
            self._spawn(0.0)
        self._notify()

    async def _reap(self, worker: _Worker) -> None:
        """Kill and reap a lost worker, then free what its scan held in the ledger."""
        if await worker.kill() is not None and not self._closed:  # closed: no ledger left
            self.ledger.clear(worker.slot)
            self._free_slots.append(worker.slot)

    def _spawn(self, delay_s: float) -> None:
        self._starting += 1
        self._track(asyncio.ensure_future(self._start_one(delay_s)))

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks.discard)

    async def _start_one(self, delay_s: float) -> None:
        if not self._free_slots:  # every slot is held by a worker that would not go
            self._starting -= 1
            log.error("no memory ledger slot is free: an analysis worker is not replaced")
            return
        slot = self._free_slots.pop()
        try:
            await asyncio.sleep(delay_s)
            worker = await _Worker.start(self._setup, self.ledger, slot)
        except (BackendUnavailableError, OSError) as err:
            self._free_slots.append(slot)
            self._starting -= 1
            self._failures += 1
            self._last_start_error = err
            log.warning("an analysis worker failed to start: %s", err)
            if not self._closed:
                first, last = RESTART_DELAYS_S
                self._spawn(min(last, first * 2 ** min(self._failures - 1, 8)))
            self._notify()
            return
        except asyncio.CancelledError:
            self._free_slots.append(slot)
            self._starting -= 1
            raise
        self._starting -= 1
        if self._closed:
            await worker.kill()
            return
        self._failures = 0
        self.started += 1
        worker.on_gone = self._gone
        worker.on_replica = self._from_worker
        if worker.gone:
            self._lose(worker)
            return
        self._idle.append(worker)
        log.info("analysis worker pid %d ready", worker.pid)
        self._notify()

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        self._track(asyncio.ensure_future(notify()))


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


# --- the worker process ------------------------------------------------------------------------


def worker_main() -> None:
    """A worker's main: `python -c ...worker_main()` FD (the gateway's end of a socket pair)."""
    fd = int(sys.argv[1])
    ledger_fd, ledger_slots, slot = (int(v) for v in sys.argv[2].split(","))
    _die_with_parent()
    # The gateway handles SIGINT/SIGTERM and then stops its workers; they just follow.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A worker ended by its CPU bound (SIGXCPU) must not leave a core file with patient data.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    asyncio.run(_serve_scans(socket.socket(fileno=fd), MemoryLedger(ledger_fd, ledger_slots), slot))


def _die_with_parent() -> None:
    """SIGKILL this worker when the gateway process goes, however it goes (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


async def _serve_scans(sock: socket.socket, ledger: MemoryLedger, slot: int) -> None:
    from ctjoint.gateway.decode_pool import close_default_pool
    from ctjoint.gateway.limits import SCAN_CPU
    from ctjoint.gateway.logging_setup import configure_logging
    from ctjoint.gateway.server import (
        _freeze_startup_objects,
        create_analyzer,
        create_backend,
    )

    channel = await _Channel.over(sock)
    setup: WorkerSetup = await channel.recv()
    configure_logging(setup.log_level, "json" if setup.log_format == "json" else "text")
    freed = FreedMemory(setup.config.limits.kept_freed_bytes)
    freed.tune()
    SCAN_CPU.configure(setup.config.cpu_threads)
    backend = create_backend(setup.config)
    # One reader for the worker's life (a cancelled wait never cuts a message in half).
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    replicas = backend if isinstance(backend, SharedReplicaHealth) else None
    reader = asyncio.ensure_future(_read_into(channel, inbox, replicas))
    try:
        await backend.load()
        if replicas is not None:
            # What this worker's inferences find out about Triton replicas, the gateway hears.
            replicas.on_replica_change(lambda change: _tell(channel, ("replica", change)))
        analyzer = create_analyzer(setup.config, backend)
        _freeze_startup_objects()
        await channel.send(("ready",))
        while (message := await inbox.get()) != _GONE:
            # Anything else between scans (a late "cancel") is left unanswered.
            if message[0] == "scan":
                scan, order = message[1], message[2]
                memory = ScanMemory(
                    setup.max_scan_bytes,
                    ledger=ledger,
                    slot=slot,
                    budget_bytes=setup.budget_bytes,
                    bound=True,
                )
                # What the scan freed is bounded while it runs and handed back after it.
                bounding = asyncio.ensure_future(freed.bounding())
                try:
                    if not await _one_scan(
                        channel, inbox, analyzer, scan, order, memory, setup.cpu_seconds
                    ):
                        return
                finally:
                    bounding.cancel()
                    freed.release()
    finally:
        reader.cancel()
        await backend.close()
        close_default_pool()
        SCAN_CPU.shutdown()


async def _read_into(
    channel: _Channel, inbox: asyncio.Queue[Any], replicas: SharedReplicaHealth | None
) -> None:
    try:
        while True:
            message = await channel.recv()
            if message[0] == "replica":
                # Seen by the gateway or another worker: heeded at once, whatever is running.
                if replicas is not None:
                    replicas.replica_changed(message[1])
                continue
            inbox.put_nowait(message)
    except EOFError:
        inbox.put_nowait(_GONE)


def _tell(channel: _Channel, message: object) -> None:
    """Send without waiting, from a callback; a gateway that has gone hears nothing."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        channel.send_nowait(message)


async def _one_scan(
    channel: _Channel,
    inbox: asyncio.Queue[Any],
    analyzer: Any,
    scan: int,
    order: ScanOrder,
    memory: ScanMemory,
    cpu_seconds: float,
) -> bool:
    """One scan: files from the gateway into the pipeline; its answer (or error) back as soon
    as there is one, then ("over", scan) once the gateway has ended or cancelled it too.
    False when the gateway has gone."""
    from ctjoint.gateway.answer import analyze_scan
    from ctjoint.gateway.deadlines import set_deadline
    from ctjoint.gateway.logging_setup import REQUEST_ID
    from ctjoint.gateway.memory import scan_memory

    files: asyncio.Queue[bytes | None] = asyncio.Queue()
    receive = [0.0]

    async def inputs() -> AsyncIterator[tuple[str, bytes]]:
        while (content := await files.get()) is not None:
            yield "", content

    def progress(event: Progress) -> None:
        if order.progress:
            channel.send_nowait(("progress", scan, event.stage, event.done, event.total))

    async def run() -> ScanAnswer:
        REQUEST_ID.set(order.request_id)
        set_deadline(order.deadline_s)
        with scan_memory(memory):
            try:
                return await analyze_scan(
                    analyzer,
                    order,
                    inputs(),
                    progress=progress,
                    receive_ms=lambda: receive[0],
                )
            except MemoryError as err:
                raise memory.out_of_memory() from err

    _bound_cpu(cpu_seconds)
    task = asyncio.ensure_future(run())
    reported = stopped = False
    try:
        while not (reported and stopped):
            waits: set[asyncio.Future[Any]] = set()
            getter = None
            if not stopped:
                getter = asyncio.ensure_future(inbox.get())
                waits.add(getter)
            if not reported:
                waits.add(task)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if getter is not None and not getter.done():
                getter.cancel()
            elif getter is not None:
                message = getter.result()
                if message == _GONE:
                    return False
                if message[0] == "file":
                    files.put_nowait(message[1])
                elif message[0] == "end":
                    receive[0] = message[1]
                    files.put_nowait(None)
                    stopped = True
                elif message[0] == "cancel":
                    task.cancel()
                    stopped = True
            if task.done() and not reported:
                reported = True
                if not task.cancelled():
                    error = task.exception()
                    if error is None:
                        await channel.send(("answer", scan, task.result()))
                    else:
                        await channel.send(("error", scan, _sendable(error)))
        await channel.send(("over", scan))
        return True
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        _bound_cpu(None)


def _bound_cpu(seconds: float | None) -> None:
    """Let the kernel end this process once the scan starting now has used `seconds` of CPU
    (SIGXCPU); None lifts the bound again."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if seconds is None:
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _sendable(error: BaseException) -> BaseException:
    """The error as it can cross the pipe: our own errors as they are; a bug is logged here,
    with its traceback, and goes back as a RuntimeError naming its type."""
    from ctjoint.gateway.errors import CtJointError

    if not isinstance(error, (CtJointError, TimeoutError, MemoryError)):
        log.error("analysis failed", exc_info=error)
        error = RuntimeError(f"{type(error).__name__} in the analysis worker")
    try:
        pickle.dumps(error)
    except Exception:  # an error that will not pickle still ends the scan, as what it was
        error = RuntimeError(f"{type(error).__name__} in the analysis worker")
    return error


__all__ = [
    "DEFAULT_SCAN_CPU_SECONDS",
    "DEFAULT_SCAN_WALL_SECONDS",
    "ScanWorkerPool",
    "WorkerBounds",
    "WorkerSetup",
    "worker_main",
]
