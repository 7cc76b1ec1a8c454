"""The in-process path every fuzz case takes: what the gateway does with one received file.

Parse, series-selection check, CT validation and pixel decoding (compressed syntaxes in the
decode worker pool), assembly into a small series with valid neighbours, and the model's
preprocessing. The only acceptable failures are the project's own `CtJointError` subclasses;
anything else escaping `run` is a bug the fuzzer found. Shared by tests/test_fuzz.py and the
atheris harness (tests/fuzz_atheris.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from fuzz_mutator import Mutator, seed_files, seed_series, to_bytes
from pydicom.dataset import Dataset

from ctjoint.contracts import MODEL_JCS2D
from ctjoint.gateway.analysis import SeriesIntake
from ctjoint.gateway.decode_pool import DecodePool, close_default_pool, set_default_pool
from ctjoint.gateway.errors import CtJointError
from ctjoint.gateway.preprocess import PreprocessPlan, preprocess_volume

# The gateway's default per-scan slice limit (gateway/limits.py); the mutant is file 2 of 3.
MAX_SLICES = 1000
# Per-case limits the issue sets: wall time and allocation.
CASE_SECONDS = 2.0
CASE_BYTES = 256 * 1024 * 1024


class PathUnderTest:
    """One file between two valid slices, through the gateway's own intake.

    `SeriesIntake` as the gateway drives it (parse, localizer rule, CT validation, decode,
    consistency checks, in-plane preprocessing as each file arrives), then `finish` (sort,
    spacing) and the whole-volume preprocessing of `ctjoint analyze`. One event loop serves
    every case, so a case costs what the pipeline costs, not a loop's start-up.
    """

    def __init__(self, series: Sequence[Dataset] | None = None) -> None:
        self.series = list(series) if series is not None else seed_series()
        middle = len(self.series) // 2
        self.neighbours = [to_bytes(ds) for i, ds in enumerate(self.series) if i != middle]
        self.plan = PreprocessPlan.default(MODEL_JCS2D)
        self._loop = asyncio.new_event_loop()

    def run(self, data: bytes) -> str:
        """'ok' when the file is taken; the project's errors propagate."""
        return self._loop.run_until_complete(self._scan(data))

    async def _scan(self, data: bytes) -> str:
        intake = SeriesIntake(
            expected_slices=len(self.series), max_slices=MAX_SLICES, plan=self.plan
        )
        await intake.add(self.neighbours[0])
        await intake.add(data)
        for neighbour in self.neighbours[1:]:
            await intake.add(neighbour)
        volume = await intake.finish()
        planes = intake.sorted_planes()
        if planes is None or planes.shape[0] != volume.shape[0]:
            raise AssertionError("in-plane preprocessing lost a slice")
        preprocess_volume(volume.hu, self.plan)
        return "ok" if not intake.skipped_localizers else "localizer"


@dataclass
class FuzzReport:
    """What a run found: outcomes by name, the slowest and largest cases, every bug."""

    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    unhandled: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    large: list[str] = field(default_factory=list)
    max_seconds: float = 0.0
    seconds: float = 0.0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    decode_workers_started: int = 0
    decode_workers_lost: int = 0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "outcomes": dict(self.outcomes), "kinds": dict(self.kinds)}


def fuzz(path: PathUnderTest, mutator: Mutator, cases: range) -> FuzzReport:
    """Run `cases` of `mutator` through `path`, timing each case and bounding its memory.

    Memory: before each case the soft address-space limit (RLIMIT_AS) is set to what the
    process maps now plus CASE_BYTES, so any allocation past 256 MB in that case fails with
    MemoryError, which is then found in the error's cause chain (the code under test may wrap
    it) and reported as a large case. A limit rather than tracemalloc because tracemalloc
    triples the cost of pydicom's many small objects (10k cases would no longer fit CI), and a
    limit also covers C-level allocations. Decoding of compressed pixels happens in the decode
    workers, which run under their own limit (the pool is built with CASE_BYTES). Run this in
    a process of its own (`main`): the limit applies to the whole process.
    """
    report = FuzzReport(rss_start_mib=_rss_mib())
    started = time.perf_counter()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with warnings.catch_warnings():
            # pydicom warns about every odd value it meets; thousands of them say nothing here.
            warnings.simplefilter("ignore")
            for number in cases:
                case = mutator.case(number)
                report.kinds.update(case.kinds)
                label = f"case {number} ({case.seed}, {'+'.join(case.kinds)})"
                resource.setrlimit(resource.RLIMIT_AS, (mapped_bytes() + CASE_BYTES, hard))
                t0 = time.perf_counter()
                try:
                    outcome = path.run(case.data)
                except CtJointError as err:
                    outcome = type(err).__name__
                    if out_of_memory(err):
                        report.large.append(f"{label}: {err}")
                except MemoryError:
                    outcome = "MemoryError"
                    report.large.append(f"{label}: MemoryError")
                except Exception:
                    outcome = "UNHANDLED"
                    report.unhandled.append(f"{label}:\n{traceback.format_exc(limit=6)}")
                finally:
                    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
                elapsed = time.perf_counter() - t0
                report.cases += 1
                report.outcomes[outcome] += 1
                report.max_seconds = max(report.max_seconds, elapsed)
                if elapsed > CASE_SECONDS:
                    report.slow.append(f"{label}: {elapsed:.2f} s")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    report.seconds = time.perf_counter() - started
    report.rss_end_mib = _rss_mib()
    return report


def out_of_memory(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, MemoryError) or "MemoryError" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def mapped_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def default_mutator(seed: int = 0) -> Mutator:
    return Mutator(seed_files(seed_series()), seed=seed)


def main() -> None:
    """`python tests/fuzz_harness.py CASES SEED [FIRST]`: run, print the report as JSON."""
    cases, seed = int(sys.argv[1]), int(sys.argv[2])
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    pool = DecodePool(memory_bytes=CASE_BYTES)
    set_default_pool(pool)
    try:
        path, mutator = PathUnderTest(), default_mutator(seed)
        # Warm-up outside the timed loop: the first compressed seed starts a decode worker
        # (an interpreter start, a second or more on a busy machine), which is no case's cost.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for data in mutator.seeds.values():
                path.run(data)
        report = fuzz(path, mutator, range(first, first + cases))
    finally:
        report_pool = (pool.started, pool.lost)
        close_default_pool()
    report.decode_workers_started, report.decode_workers_lost = report_pool
    json.dump(report.as_dict(), sys.stdout)


if __name__ == "__main__":
    main()
