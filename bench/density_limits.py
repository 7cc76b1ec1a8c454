"""Lesion Dice of the bundled networks for several limits of the density rule (gateway/density.py).

    .venv/bin/python bench/density_limits.py --choose SET [--choose-split val]
                                             [--score DIR ...] [--per-class 5]
                                             [--doc docs/models.md]

Each abnormal case (the first `--per-class` of each abnormal class) is analysed in-process
with the rule off, then the rule is applied to the networks' lesion map with each limit of
LIMITS and the lesion Dice against the truth is computed on the source grid (what
`ctjoint evaluate` reports). The limit is chosen on `--choose` (the validation split of the
training family's set): the highest mean Dice over both networks. `--score` sets (the held-out
family) are only reported. Also printed: the share of the truth's lesion voxels the rule keeps
(a truth lesion voxel in aerated lung is one the rule would cut).
`--doc` writes the table between the marker lines of the topic file.

A benchmark, not a test: the figures depend on the weights and the phantoms, not the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np
from doc_section import publish  # bench/doc_section.py

from ctjoint.contracts import CLASS_NAMES, MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.export.dataset import CaseRef, discover_cases, load_case
from ctjoint.export.metrics import dice_score
from ctjoint.gateway.analysis import ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.density import AERATED_MAX_HU, drop_aerated, neighbourhood_mean_hu
from ctjoint.gateway.quantify import LesionVoxels

MODELS = (MODEL_JCS2D, MODEL_DEEPSC3D)
LIMITS = (-850.0, -800.0, -750.0, -700.0)
DOC_BEGIN = "<!-- bench/density_limits.py begin -->"
DOC_END = "<!-- bench/density_limits.py end -->"


def _abnormal(data: Path, split: str | None, per_class: int) -> list[CaseRef]:
    refs = discover_cases(data, split)
    chosen: list[CaseRef] = []
    for label in range(len(CLASS_NAMES) - 1):  # covid19, cap: the classes with lesions
        chosen += [r for r in refs if r.label == label][:per_class]
    return chosen


async def _rows(refs: list[CaseRef], model: str) -> list[list[float]]:
    """Per case: Dice with the rule off, then with each limit; then the truth kept at each."""
    rows = []
    backend = EmbeddedBackend((model,), intra_op_threads=2)
    async with backend:
        analyzer = ScanAnalyzer(backend, aerated_max_hu=None)
        for ref in refs:
            loaded = load_case(ref)
            analysis = await analyzer.analyze_volume(loaded.volume, model)
            truth = loaded.lesions > 0
            hu = loaded.volume.hu
            row = [dice_score(analysis.label_map > 0, truth)]
            for limit in LIMITS:
                label_map = analysis.label_map.copy()
                drop_aerated(label_map, LesionVoxels.of(label_map), hu, limit)
                row.append(dice_score(label_map > 0, truth))
            # The rule keeps a voxel whose neighbourhood mean is above the limit.
            truth_mean = neighbourhood_mean_hu(hu, LesionVoxels.of(truth.view(np.uint8)))
            kept = [float(np.mean(truth_mean > limit)) for limit in LIMITS]
            rows.append(row + kept)
            print(f"  {model} {ref.case_id}: " + " ".join(f"{v:.3f}" for v in row), flush=True)
    return rows


def _table(results: dict[tuple[str, str], list[list[float]]]) -> list[str]:
    limits = " | ".join(f"{limit:g} HU" for limit in LIMITS)
    kept = " | ".join(f"truth kept at {limit:g}" for limit in LIMITS)
    lines = [
        f"| set | model | cases | rule off | {limits} | {kept} |",
        "|---|---|---|---|" + "---|" * (2 * len(LIMITS)),
    ]
    for (name, model), rows in results.items():
        mean = np.mean(rows, axis=0)
        cells = " | ".join(f"{v:.3f}" for v in mean)
        lines.append(f"| {name} | {model} | {len(rows)} | {cells} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--choose", type=Path, required=True, help="set the limit is chosen on")
    parser.add_argument("--choose-split", default="val")
    parser.add_argument("--score", type=Path, nargs="*", default=[], help="sets only reported")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--doc", type=Path)
    args = parser.parse_args(argv)

    sets = [(f"{args.choose.name} ({args.choose_split}, chooses)", args.choose, args.choose_split)]
    sets += [(f"{path.name} (all, scored only)", path, None) for path in args.score]
    results: dict[tuple[str, str], list[list[float]]] = {}
    for name, path, split in sets:
        refs = _abnormal(path, split, args.per_class)
        if not refs:
            print(f"{path}: no abnormal cases in split {split}", file=sys.stderr)
            return 2
        for model in MODELS:
            results[(name, model)] = asyncio.run(_rows(refs, model))
    chooser = np.mean([np.mean(results[(sets[0][0], m)], axis=0) for m in MODELS], axis=0)
    best = LIMITS[int(np.argmax(chooser[1 : 1 + len(LIMITS)]))]
    lines = [
        f"Mean lesion Dice of the abnormal cases ({args.per_class} per class) on the source grid,"
        " bundled weights; `truth kept`: share of the truth's lesion voxels the rule keeps.",
        "",
        *_table(results),
        "",
        f"Chosen on the validation set (highest mean Dice of both networks): {best:g} HU;"
        f" in force (gateway/density.py): {AERATED_MAX_HU:g} HU.",
    ]
    return publish("\n".join(lines), args.doc, DOC_BEGIN, DOC_END)


if __name__ == "__main__":
    sys.exit(main())
