"""The real components the suite runs against, checked once per session.

Where CI runs (root on Linux, or CTJOINT_CI / CI set, as .ci/run does) a missing or broken
tritonserver, perf_analyzer or h2load fails the run at once, naming the install step that
broke, instead of letting the tests that need it skip and the run stay green. Elsewhere (a
developer's laptop) those tests skip with their own reasons. Only GPU-bound tests may skip in
CI; nothing here needs a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable

ENV_CI = "CTJOINT_CI"
PROBE_TIMEOUT_S = 60.0


def in_ci() -> bool:
    """True where CI runs the suite: a CI variable, or root on Linux (CI's fresh clone).
    CTJOINT_CI=0 says otherwise (a root shell on a bare GPU machine running a few tests)."""
    value = os.environ.get(ENV_CI, os.environ.get("CI", "")).lower()
    if value in ("0", "false", "no"):
        return False
    return value in ("1", "true", "yes") or (sys.platform == "linux" and os.geteuid() == 0)


def _run(
    args: list[str], env: dict[str, str] | None = None, *, expect: str | None = None
) -> str | None:
    """None when the command runs and exits 0 (or, with `expect`, prints that text), else
    what it said."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if expect is not None and expect in done.stdout + done.stderr:
        return None
    if done.returncode != 0 or expect is not None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return f"exit status {done.returncode}: {' | '.join(tail)}"
    return None


def tritonserver_problem() -> str | None:
    from ctjoint.gateway.triton_server import TritonServerError, find_install

    try:
        install = find_install()
    except TritonServerError as err:
        return str(err)
    try:
        env = {**os.environ, **install.env}
        # It prints its usage and exits 1; a broken install fails to load its libraries first.
        failed = _run([str(install.binary), "--help"], env, expect="--model-repository")
    finally:
        if install.scratch is not None:
            shutil.rmtree(install.scratch, ignore_errors=True)
    return None if failed is None else f"{install.binary} --help failed ({failed})"


def perf_analyzer_problem() -> str | None:
    from ctjoint.export.triton_perf import PerfAnalyzerError, find_perf_analyzer, perf_env

    try:
        binary = find_perf_analyzer()
    except PerfAnalyzerError as err:
        return str(err)
    failed = _run([str(binary), "--version"], perf_env(binary))
    return None if failed is None else f"{binary} does not run ({failed})"


def h2load_problem() -> str | None:
    found = shutil.which("h2load")
    if found is None:
        return "h2load is not on PATH"
    failed = _run([found, "--version"])
    return None if failed is None else f"{found} does not run ({failed})"


# component -> (probe, the install step that provides it)
COMPONENTS: dict[str, tuple[Callable[[], str | None], str]] = {
    "tritonserver": (
        tritonserver_problem,
        "`make triton-runtime` (the nvidia-pytriton wheel in .venv-triton; part of `make test`)",
    ),
    "perf_analyzer": (
        perf_analyzer_problem,
        "`make perf-tools` (tritonclient 2.51's binary in .venv-perf, nvidia-cuda-runtime-cu12 "
        "and apt's libb64-0d; part of `make test`)",
    ),
    "h2load": (
        h2load_problem,
        "`make install` as root (apt's nghttp2-client)",
    ),
}


def missing_components() -> list[str]:
    """One line per broken component: what is wrong and which install step provides it."""
    lines = []
    for name, (probe, step) in COMPONENTS.items():
        problem = probe()
        if problem is not None:
            lines.append(f"{name}: {problem}; installed by {step}")
    return lines


def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's `name` (storescu, echoscu, dcmcjpeg, ...): a missing one fails the
    test where CI runs (`make test` installs dcmtk as root) and skips it elsewhere."""
    import pytest

    tool = shutil.which(name)
    if tool is None:
        reason = f"{name} (Debian dcmtk) is not installed"
        if in_ci():
            pytest.fail(f"{reason}; `make test` installs it when run as root")
        pytest.skip(f"{reason}; install dcmtk to test the DIMSE listener")
    return tool
