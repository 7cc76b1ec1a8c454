"""bench/weight_average.py: the averaged checkpoint is the weighted mean, refuses what differs."""

from __future__ import annotations

from pathlib import Path

import bench_scripts
import pytest
import torch

from ctjoint.export.bundled import bundled_weights
from ctjoint.export.evaluate import sha256_file


def test_the_average_is_the_weighted_mean_and_drops_the_temperatures(tmp_path: Path) -> None:
    soup = bench_scripts.load("weight_average")
    first = bundled_weights("deepsc3d")
    data = torch.load(first, weights_only=True)
    data["state_dict"] = {
        k: (v * 3 if v.is_floating_point() else v + 5) for k, v in data["state_dict"].items()
    }
    second = tmp_path / "second.pt"
    torch.save(data, second)
    out = soup.average(first, second, 0.25)
    parent = torch.load(first, weights_only=True)["state_dict"]
    for name, value in out["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, parent[name] * 1.5)  # 0.75 x + 0.25 x 3x
        else:
            assert torch.equal(value, parent[name])  # integer buffers: the first's
    assert "temperature" not in out and "calibration" not in out
    assert [p["weight"] for p in out["averaged_from"]] == [0.75, 0.25]
    assert [p["sha256"] for p in out["averaged_from"]] == [sha256_file(first), sha256_file(second)]


def test_checkpoints_of_different_networks_or_weights_out_of_range_are_refused() -> None:
    soup = bench_scripts.load("weight_average")
    with pytest.raises(soup.AverageError, match="differ in model: deepsc3d / jcs2d"):
        soup.average(bundled_weights("deepsc3d"), bundled_weights("jcs2d"), 0.5)
    with pytest.raises(soup.AverageError, match=r"weight 1.5 is not in \[0, 1\]"):
        soup.average(bundled_weights("deepsc3d"), bundled_weights("deepsc3d"), 1.5)
