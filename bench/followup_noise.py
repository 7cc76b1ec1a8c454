"""Rescan noise of the measurements, and the comparison's categories against phantom truth.

    .venv/bin/python bench/followup_noise.py [--seeds 3 --size 96 --slices 24]
                                             [--doc docs/follow-up.md] [--json OUT]

For each seed and each abnormal kind (covid19, cap) a phantom case is written, then four
follow-ups of it (`ctjoint phantom --follow-up-of`: stable, progress, improve, resolve), and
for each seed a normal case and its stable rescan. Every study is analysed in-process with the
bundled weights of both networks. Printed per network:
- the rescan noise: for each first study and its stable follow-up (same patient, same lesions,
  new noise and slice positions), the absolute and relative difference of every measure the
  comparison reports (median and largest);
- what the network measures on lesion-free scans (normal cases and resolved follow-ups): the
  floor under which the comparison says "no lesions";
- the category gateway/comparison.py gives each follow-up against the truth's.
`--doc` writes the tables between the marker lines of the topic file.

A benchmark, not a test: the figures depend on the weights and the phantoms, not the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from doc_section import publish  # bench/doc_section.py

from ctjoint.export.phantom import write_phantom_case
from ctjoint.export.phantom_followup import CHANGES, write_follow_up
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.gateway.comparison import MEASURES, Measurements, compare
from ctjoint.gateway.prior_report import measurements_from_result

MODELS = ("jcs2d", "deepsc3d")
ABNORMAL = ("covid19", "cap")
DOC_BEGIN = "<!-- bench/followup_noise.py begin -->"
DOC_END = "<!-- bench/followup_noise.py end -->"


def _measure(case: Path, model: str) -> Measurements:
    analysis = analyze_directory(case / "series", model=model, intra_op_threads=2)
    return measurements_from_result(analysis.result.to_dict(), str(case))


def _studies(root: Path, seeds: int, size: int, slices: int) -> list[dict[str, Any]]:
    """Every first study and its follow-ups: (name, kind, change or '', truth category)."""
    plan: list[dict[str, Any]] = []
    for seed in range(seeds):
        for kind in (*ABNORMAL, "normal"):
            first = root / f"{kind}_{seed}"
            write_phantom_case(first, kind=kind, seed=100 + seed, slices=slices, size=size)
            plan.append({"case": first, "first": None, "change": "", "truth": ""})
            changes = CHANGES if kind != "normal" else {"stable": CHANGES["stable"]}
            for change, wanted in changes.items():
                later = root / f"{kind}_{seed}_{change}"
                write_follow_up(first, later, change=change)
                plan.append({"case": later, "first": first, "change": change,
                             "truth": wanted.category, "kind": kind})  # fmt: skip
    return plan


def _noise_rows(pairs: list[tuple[Measurements, Measurements]]) -> list[str]:
    rows = []
    for measure in MEASURES:
        absolute = [abs(b.value(measure) - a.value(measure)) for a, b in pairs]
        relative = [
            abs(b.value(measure) - a.value(measure)) / a.value(measure)
            for a, b in pairs
            if a.value(measure) > 0
        ]
        rel = (
            f"{100 * statistics.median(relative):.1f} % / {100 * max(relative):.1f} %"
            if relative
            else "-"
        )
        rows.append(
            f"| {measure} | {statistics.median(absolute):.2f} / {max(absolute):.2f} | {rel} |"
        )
    return rows


def run(seeds: int, size: int, slices: int) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    record: dict[str, Any] = {"seeds": seeds, "size": size, "slices": slices, "models": {}}
    with tempfile.TemporaryDirectory(prefix="ctjoint-followup-") as tmp:
        plan = _studies(Path(tmp), seeds, size, slices)
        for model in MODELS:
            measured = {str(s["case"]): _measure(s["case"], model) for s in plan}
            stable_pairs = [
                (measured[str(s["first"])], measured[str(s["case"])])
                for s in plan
                if s["change"] == "stable" and s["kind"] != "normal"
            ]
            free = [
                measured[str(s["case"])].total_ml
                for s in plan
                if s["case"].name.startswith("normal") or s["change"] == "resolve"
            ]
            confusion: Counter[tuple[str, str]] = Counter()
            details = ["| follow-up | truth | labels | total mL | found |", "|---|---|---|---|---|"]
            for s in plan:
                if s["first"] is None:
                    continue
                a, b = measured[str(s["first"])], measured[str(s["case"])]
                found = compare(a, b).category
                confusion[(s["truth"], found)] += 1
                details.append(
                    f"| {s['case'].name} | {s['truth']} | {a.label} -> {b.label} | "
                    f"{a.total_ml:.1f} -> {b.total_ml:.1f} | {found} |"
                )
            right = sum(n for (truth, found), n in confusion.items() if truth == found)
            total = sum(confusion.values())
            lines += [
                f"### {model}",
                "",
                f"Rescan noise over {len(stable_pairs)} first studies and their stable "
                "follow-ups (median / largest):",
                "",
                "| measure | absolute | relative |",
                "|---|---|---|",
                *_noise_rows(stable_pairs),
                "",
                f"Total lesion volume on {len(free)} lesion-free scans (normal cases and their "
                f"rescans, resolved follow-ups): median {statistics.median(free):.1f} mL, "
                f"largest {max(free):.1f} mL.",
                "",
                f"Categories against truth: {right} of {total} right.",
                "",
                "| truth | found |",
                "|---|---|",
                *(
                    f"| {truth} | "
                    + ", ".join(
                        f"{found} x{n}" for (t, found), n in sorted(confusion.items()) if t == truth
                    )
                    + " |"
                    for truth in sorted({t for t, _ in confusion})
                ),
                "",
                "<details><summary>every follow-up</summary>",
                "",
                *details,
                "",
                "</details>",
                "",
            ]
            record["models"][model] = {
                "right": right,
                "total": total,
                "lesion_free_ml": free,
                "confusion": {f"{t}->{f}": n for (t, f), n in confusion.items()},
                "stable_pairs": [
                    {m: [a.value(m), b.value(m)] for m in MEASURES} for a, b in stable_pairs
                ],
            }
    return "\n".join(lines), record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--doc", type=Path, help="topic file whose marked table to rewrite")
    parser.add_argument("--json", type=Path, help="write every measured figure here")
    args = parser.parse_args(argv)
    table, record = run(args.seeds, args.size, args.slices)
    command = (
        f".venv/bin/python bench/followup_noise.py --seeds {args.seeds} --size {args.size} "
        f"--slices {args.slices}"
    )
    text = f"Measured by `{command}` (bundled weights, embedded ONNX Runtime):\n\n{table}"
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return publish(text, args.doc, DOC_BEGIN, DOC_END)


if __name__ == "__main__":
    sys.exit(main())
