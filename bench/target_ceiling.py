"""The lesion Dice a perfect network could reach on the source grid, given its training targets.

    .venv/bin/python bench/target_ceiling.py [--per-kind 3] [--sizes 160 256]
                                             [--doc docs/models.md]

The networks see a resampled volume (tiny plans: 128 x 128 in-plane; deepsc3d also 64 slices)
and learn lesion labels brought onto that grid; `ctjoint evaluate` scores their label maps on
the source grid, where the gateway puts them (logits interpolated linearly, then argmax). A
network that reproduced its targets exactly would score:
- `nearest`: targets resampled by nearest neighbour (`preprocess.resample_labels`, what
  `ctjoint train` uses), the network's logits one-hot;
- `area`: targets as the fraction of each model cell every class covers (the area average the
  image itself gets: `dataset.lesion_fractions`, what `TrainConfig.soft_targets` trains on),
  the network's logits their logarithm.
Both are upsampled by the gateway's own `source_label_map` and compared with the phantom's
truth (any lesion), on fresh abnormal phantoms of both shape families, rendered in memory.
The gap between the two is what hard targets cost whatever the network learns.

A benchmark, not a test: the figures depend on the plans and the phantoms, not the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from doc_section import publish  # bench/doc_section.py

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, SEG_CLASS_NAMES
from ctjoint.export.configs import get_config
from ctjoint.export.dataset import lesion_fractions
from ctjoint.export.phantom import generate_phantom
from ctjoint.export.phantom_families import FAMILIES
from ctjoint.gateway.preprocess import (
    PreprocessPlan,
    ResampleGeometry,
    resample_labels,
    source_label_map,
)

BEGIN = "<!-- target_ceiling: begin -->"
END = "<!-- target_ceiling: end -->"
# Seeds no training or evaluation set uses.
SEED = 9_400_000
KINDS = ("covid19", "cap")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2.0 * np.count_nonzero(a & b) / total if total else 1.0


def ceilings(truth: np.ndarray, plan: PreprocessPlan) -> tuple[float, float]:
    """(nearest, area) source-grid Dice of a network that reproduces its targets exactly."""
    z, y, x = truth.shape
    depth = z if plan.kind == "2.5d" else int(plan.depth)
    shape = (depth, int(plan.height), int(plan.width))
    geometry = ResampleGeometry((z, y, x), shape, plan.kind)
    eye = np.eye(len(SEG_CLASS_NAMES), dtype=np.float32)
    hard = np.moveaxis(eye[resample_labels(truth, shape)], -1, 0) * 10.0  # [K, D, H, W]
    # What `ctjoint train` learns with soft targets: the lesion fractions it caches (255ths),
    # the background what they leave.
    lesions = lesion_fractions(truth, shape).astype(np.float32) / 255.0
    background = np.clip(1.0 - lesions.sum(axis=0, keepdims=True), 0.0, 1.0)
    soft = np.log(np.concatenate([background, lesions]) + 1e-4)
    found = []
    for logits in (hard, soft):
        # The gateway's layouts: 2.5D [slices, K, H, W], 3D [1, K, D, H, W].
        batch = np.moveaxis(logits, 0, 1) if plan.kind == "2.5d" else logits[None]
        found.append(_dice(source_label_map(np.ascontiguousarray(batch), geometry) > 0, truth > 0))
    return found[0], found[1]


def measure(per_kind: int, sizes: list[int]) -> list[dict[str, object]]:
    plans = {m: get_config(m, "tiny").plan for m in (MODEL_JCS2D, MODEL_DEEPSC3D)}
    rows = []
    for size in sizes:
        for family in FAMILIES:
            scores: dict[str, list[tuple[float, float]]] = {m: [] for m in plans}
            for i in range(per_kind * len(KINDS)):
                phantom = generate_phantom(
                    kind=KINDS[i % len(KINDS)], seed=SEED + i, size=size, family=family
                )
                for model, plan in plans.items():
                    scores[model].append(ceilings(phantom.lesions, plan))
            for model, pairs in scores.items():
                rows.append(
                    {
                        "size": size,
                        "family": family,
                        "model": model,
                        "cases": len(pairs),
                        "nearest": statistics.mean(p[0] for p in pairs),
                        "area": statistics.mean(p[1] for p in pairs),
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, object]], command: str) -> str:
    lines = [
        f"Measured by `{command}` (abnormal phantoms rendered in memory, seeds from {SEED}):",
        "",
        "| source size | family | model | cases | Dice ceiling, nearest targets | "
        "Dice ceiling, area targets |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['family']} | {r['model']} | {r['cases']} | "
            f"{r['nearest']:.3f} | {r['area']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 256])
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    rows = measure(args.per_kind, args.sizes)
    sizes = " ".join(str(s) for s in args.sizes)
    command = f"bench/target_ceiling.py --per-kind {args.per_kind} --sizes {sizes}"
    return publish(table(rows, command), args.doc, BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
