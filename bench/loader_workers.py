"""How much `ctjoint train --loader-workers` speeds up drawing augmented batches: the same
batches of one epoch built in the training process and by N DataLoader worker processes,
alternating, with the ratio of each pair measured in one run (these machines are noisy).

    python bench/loader_workers.py --data DATASET --model deepsc3d --workers 2 --batches 16

The data set's cases are prepared into --cache first (a run folder's cache/ is reused).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctjoint.export.configs import get_config
from ctjoint.export.dataset import CaseCache, discover_cases
from ctjoint.export.train import EpochBatches, epoch_batches, epoch_loader, epoch_rng


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("out/loader-cache"))
    parser.add_argument("--model", default="deepsc3d")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--cases", type=int, default=40, help="training cases to draw from")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = get_config(args.model, args.config)
    refs = discover_cases(args.data, "train")[: args.cases]
    cases = CaseCache(args.cache, config.plan).get_many(refs)
    batches = epoch_batches(config, cases, epoch_rng(0, 0))[: args.batches]
    dataset = EpochBatches(config, cases, batches, seed=0, epoch=0)

    def seconds(workers: int) -> float:
        started = time.perf_counter()
        built = sum(1 for _ in epoch_loader(dataset, workers, pin_memory=False))
        elapsed = time.perf_counter() - started
        if built != len(batches):
            raise SystemExit(f"{workers} workers built {built} of {len(batches)} batches")
        return elapsed

    for r in range(args.rounds):
        alone, apart = seconds(0), seconds(args.workers)
        print(
            f"round {r + 1}: {len(batches)} {args.model} {args.config} batches: "
            f"{alone:.2f} s in the training process, {apart:.2f} s with {args.workers} workers "
            f"(x{alone / apart:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
