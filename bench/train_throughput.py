"""What a `ctjoint train` run measured, as a table: loss per epoch (and how it moved inside
the epoch), samples/s, the share of time the step waited for its batch, peak GPU memory and
the validation figures, read from the runs' train_log.json; then the schedule that
throughput implies for a training set of a given size.

    python bench/train_throughput.py docs/gpu/*_train_log.json --scans 1260 --doc docs/models.md

The first epoch of a run also pays for cuDNN's kernel search (torch.backends.cudnn
.benchmark) and warm caches, so the steady rate is the median of the later epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from doc_section import publish  # bench/doc_section.py

from ctjoint.export.configs import get_config

BEGIN = "<!-- bench/train_throughput.py begin -->"
END = "<!-- bench/train_throughput.py end -->"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def steady_rate(epochs: list[dict[str, Any]], busy_only: bool = False) -> float:
    """Median samples/s of the epochs after the first (the first when there is only one);
    `busy_only`: over the time the step did not wait for its batch (what the network alone
    sustains, reached when the loader keeps ahead)."""
    later = epochs[1:] or epochs

    def rate(e: dict[str, Any]) -> float:
        seconds = e["train_seconds"] - (e["batch_wait_seconds"] if busy_only else 0.0)
        return float(e["samples"] / max(seconds, 1e-9))

    return float(statistics.median(rate(e) for e in later))


def run_table(log: dict[str, Any]) -> list[str]:
    """One row per epoch of one run."""
    rows = []
    for e in log["epochs"]:
        curve = e.get("loss_curve") or []
        inside = f"{curve[0]:.2f} -> {curve[-1]:.2f}" if curve else "-"
        wait = e["batch_wait_seconds"] / max(e["train_seconds"], 1e-9)
        val = e.get("val") or {}
        rows.append(
            f"| {log['model']} | {e['epoch']} | {e['loss']:.3f} | {inside} | {e['samples']} "
            f"| {e['samples_per_second']:.1f} | {wait:.0%} | {_fmt(e['peak_memory_gib'], 1)} "
            f"| {_fmt(val.get('dice'))} | {_fmt(val.get('accuracy'))} |"
        )
    return rows


def schedule(log: dict[str, Any], scans: int, train_scans: int) -> str:
    """Hours per epoch and in all (the configuration's own epochs) for `scans` training
    scans, between the measured rate and the rate without waiting for batches, with the
    samples per scan this run's sampler drew."""
    measured = steady_rate(log["epochs"])
    busy = steady_rate(log["epochs"], busy_only=True)
    per_scan = log["epochs"][-1]["samples"] / train_scans
    epochs = get_config(log["model"], log["config"]["name"]).train.epochs
    samples = scans * per_scan
    slow, fast = samples / measured / 3600, samples / busy / 3600
    return (
        f"| {log['model']} | {measured:.1f} - {busy:.1f} | {per_scan:.1f} | {samples:,.0f} "
        f"| {fast:.2f} - {slow:.2f} | {epochs} | {fast * epochs:.1f} - {slow * epochs:.1f} |"
    )


def render(logs: list[dict[str, Any]], train_scans: list[int], scans: int) -> str:
    device = logs[0]["device"]
    lines = [
        f"Measured on {device.get('name')} (torch {device.get('torch')}), `--config full`, "
        "bf16 autocast:",
        "",
        "| model | epoch | loss | loss inside the epoch (first -> last tenth) | samples "
        "| samples/s | step waiting for its batch | peak GPU memory (GiB) | val lesion Dice "
        "| val accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for log in logs:
        lines += run_table(log)
    lines += [
        "",
        f"The schedule for {scans:,} training scans and the configuration's epochs, with the "
        "samples per scan this run's sampler drew, between the measured rate (median of epochs "
        "2 on) and the rate of the steps alone (the time spent waiting for batches taken out):",
        "",
        "| model | samples/s (measured - steps alone) | samples per scan | samples per epoch "
        "| hours per epoch | epochs | hours in all |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [schedule(log, scans, n) for log, n in zip(logs, train_scans, strict=True)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="train_log.json files")
    parser.add_argument(
        "--train-scans",
        type=int,
        help="training scans of the runs, for logs older than their train_cases field",
    )
    parser.add_argument("--scans", type=int, default=1260, help="training scans to plan for")
    parser.add_argument("--doc", type=Path, help="write the table between the markers here")
    args = parser.parse_args(argv)
    logs = [json.loads(p.read_text(encoding="utf-8")) for p in args.logs]
    counts = [log.get("train_cases", args.train_scans) for log in logs]
    if None in counts:
        parser.error("a log has no train_cases field: give --train-scans")
    return publish(render(logs, counts, args.scans), args.doc, BEGIN, END)


if __name__ == "__main__":
    raise SystemExit(main())
