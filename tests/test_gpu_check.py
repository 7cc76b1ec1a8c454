"""`make gpu-check`'s script runs to its report: here on CPU in its smoke mode (no GPU on this
project's machines; docs/deployment.md says which figures exist)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctjoint.contracts import repo_root


@pytest.mark.timeout(300)
def test_the_smoke_run_writes_one_json_with_parity_per_mode(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(repo_root() / "bench" / "gpu_models.py"), "--smoke",
         "--models", "jcs2d", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    points = {(p["mode"], p["batch"]): p for p in report["points"]}
    assert sorted(points) == [
        ("autocast bf16", 1), ("autocast bf16", 2), ("eager fp32", 1), ("eager fp32", 2),
    ]  # fmt: skip
    # fp32 against itself is exact; bf16 differs a little and keeps nearly every mask voxel.
    assert points[("eager fp32", 2)]["max_prob_diff"] == 0.0
    assert points[("eager fp32", 2)]["mask_agreement"] == 1.0
    assert 0.0 < points[("autocast bf16", 2)]["max_prob_diff"] < 0.1
    assert points[("autocast bf16", 2)]["mask_agreement"] > 0.99
    assert (tmp_path / "gpu_check.png").stat().st_size > 10_000
