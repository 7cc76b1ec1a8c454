"""Average two checkpoints of one network, weight by weight (a "model soup").

    .venv/bin/python bench/weight_average.py A.pt B.pt --weight W --out SOUP.pt
    .venv/bin/ctjoint calibrate --weights SOUP.pt --data SET

Two fine-tunes from a common ancestor lie in one basin of the loss; the point between them
often generalises better than either end (Wortsman et al., 2022, "Model soups"). The result
is (1 - W) * A + W * B for every floating-point tensor (BatchNorm running statistics
included); integer buffers (batch counts) are A's. Temperatures and validation metrics of
A are dropped: the averaged network is a new one, so `ctjoint calibrate` fits its
temperatures on the validation split before it is evaluated or bundled. The checkpoint
records what it was made from (`averaged_from`: each parent's sha256 and weight).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctjoint.export.errors import TrainingError
from ctjoint.export.evaluate import sha256_file
from ctjoint.export.train import load_checkpoint, save_atomic


class AverageError(Exception):
    """The two checkpoints cannot be averaged (named, with the reason)."""


def average(first: Path, second: Path, weight: float) -> dict[str, object]:
    """The averaged checkpoint: `first`'s metadata, the weighted mean of both state dicts."""
    if not 0.0 <= weight <= 1.0:
        raise AverageError(f"weight {weight} is not in [0, 1]")
    a, b = load_checkpoint(first), load_checkpoint(second)
    for key in ("model", "config_name", "plan"):
        if a.get(key) != b.get(key):
            raise AverageError(f"{first} and {second} differ in {key}: {a.get(key)} / {b.get(key)}")
    sa, sb = a["state_dict"], b["state_dict"]
    if sa.keys() != sb.keys():
        raise AverageError(f"{first} and {second} hold different tensors")
    mixed = {}
    for name, ta in sa.items():
        tb = sb[name]
        if ta.shape != tb.shape:
            raise AverageError(
                f"{name}: shape {tuple(ta.shape)} in {first}, {tuple(tb.shape)} in {second}"
            )
        if ta.is_floating_point():
            mixed[name] = (ta.double() * (1.0 - weight) + tb.double() * weight).to(ta.dtype)
        else:
            mixed[name] = ta.clone()
    out = {key: value for key, value in a.items() if key not in ("temperature", "calibration")}
    out["state_dict"] = mixed
    out["metrics"] = {}
    out["averaged_from"] = [
        {"sha256": sha256_file(first), "weight": 1.0 - weight},
        {"sha256": sha256_file(second), "weight": weight},
    ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--weight", type=float, default=0.5, help="share of the second (0-1)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        soup = average(args.first, args.second, args.weight)
    except (AverageError, TrainingError) as err:
        print(f"weight_average: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(soup, args.out)
    mix = f"{1 - args.weight:g} x {args.first.name} + {args.weight:g} x {args.second.name}"
    print(f"wrote {args.out} ({mix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
