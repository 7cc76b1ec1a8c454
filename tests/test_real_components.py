"""In CI a missing real component fails the whole run, naming its install step (it does not
let the tests that need it skip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import real_components

from ctjoint.contracts import repo_root


def test_a_missing_tritonserver_is_named_with_its_install_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTJOINT_TRITON_ENV", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    lines = real_components.missing_components()
    triton = [line for line in lines if line.startswith("tritonserver: ")]
    assert len(triton) == 1
    assert f"no nvidia-pytriton wheel in {tmp_path}" in triton[0]
    assert triton[0].endswith(
        "installed by `make triton-runtime` (the nvidia-pytriton wheel in .venv-triton; part "
        "of `make test`)"
    )


def test_ci_fails_the_run_instead_of_skipping_without_tritonserver(tmp_path: Path) -> None:
    env = {**os.environ, "CTJOINT_CI": "1", "CTJOINT_TRITON_ENV": str(tmp_path / "none")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "tests/test_triton_perf.py",
        ],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 3, done.stdout[-2000:]
    assert "real components missing or broken (CI fails rather than skips)" in done.stdout
    assert "tritonserver: no tritonserver on PATH" in done.stdout
    assert "passed" not in done.stdout.splitlines()[-1]
