"""bench/equality.py's digest: stable across runs of one commit, and it sees a changed mask.

The script proves refactors change nothing for users (issue 18, point 9); these tests prove the
proof: fresh UIDs and times of SEG/SR do not count, one voxel of a mask does.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import bench_scripts
import pytest

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.series import list_series_files


@pytest.fixture(scope="module")
def equality() -> ModuleType:
    return bench_scripts.load("equality")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    case = tmp_path_factory.mktemp("equality") / "case"
    write_phantom_case(case, kind="covid19", seed=11, slices=12, size=64)
    return list_series_files(case / "series")


@pytest.mark.parametrize("model", [MODEL_JCS2D, MODEL_DEEPSC3D])
def test_digest_is_stable_and_sees_one_voxel(
    equality: ModuleType, series: list[Path], model: str
) -> None:
    first = asyncio.run(equality._analyse(series, model, streaming=True))
    again = asyncio.run(equality._analyse(series, model, streaming=False))
    digest = equality.digest_analysis(first)
    # Fresh SEG/SR UIDs and times, and another run of the analysis, give the same digest.
    assert equality.digest_analysis(first) == digest
    assert equality.digest_analysis(again) == digest
    assert set(digest) == {
        "result_json",
        "client_json",
        "label_map",
        "lung_map",
        "cam",
        "slice_probabilities",
        "overlay_png",
        "seg_binary",
        "seg_labelmap",
        "sr",
    }

    label_map = first.label_map.copy()
    z, y, x = (s // 2 for s in label_map.shape)
    label_map[z, y, x] = 2 if label_map[z, y, x] != 2 else 1
    changed = equality.digest_analysis(replace(first, label_map=label_map))
    differs = {field for field in digest if changed[field] != digest[field]}
    # The result JSON holds the statistics computed before; the masks and objects moved.
    assert {"label_map", "seg_binary", "seg_labelmap", "overlay_png"} <= differs
    assert "result_json" not in differs and "lung_map" not in differs
    assert equality.differences({"scan": digest}, {"scan": changed}) == [
        f"scan: {field} differs" for field in sorted(differs)
    ]


def test_timings_are_left_out_and_nothing_else(equality: ModuleType) -> None:
    text = equality.stable_result_json({"label": "cap", "timings": {"total_ms": 1.0}, "x": None})
    assert text == '{\n  "label": "cap",\n  "x": null\n}\n'
