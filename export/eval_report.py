"""Renderings of `ctjoint evaluate` reports: the reliability diagram (matplotlib) and the
markdown tables of docs/models.md, so no figure there is typed by hand.

`python -m ctjoint.export.eval_report REPORT.json... --docs docs/models.md` rewrites the block
between the EVAL_TABLES markers of the docs page from the given reports.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from ctjoint.contracts import CLASS_NAMES, LESION_CLASS_NAMES

BEGIN: Final = "<!-- eval-tables:begin (written by python -m ctjoint.export.eval_report) -->"
END: Final = "<!-- eval-tables:end -->"


def write_reliability_png(report: dict[str, Any], path: Path) -> None:
    """Reliability diagram of the scan probabilities, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = report["calibration"]
    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for key, style, name in (
        ("reliability_before", "o-", "before"),
        ("reliability_after", "s-", "after"),
    ):
        bins = cal[key]
        if bins:
            conf, acc, _ = zip(*bins, strict=True)
            ece = cal["ece_" + name]
            axis.plot(conf, acc, style, markersize=4, label=f"{name} (ECE {_fmt(ece)})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence (top-class probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{report['model']}: {report.get('title', '')}", fontsize=8)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def markdown_table(reports: Sequence[dict[str, Any]]) -> str:
    """One summary table (a row per report) and per-class figures and confusion matrices."""
    lines = [
        "| model | evaluated on | cases | accuracy | lesion Dice | GGO Dice | consolidation Dice "
        "| macro AUC | ECE before -> after | Brier before -> after | normal called abnormal "
        "(p > 0.9) | weights sha256 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        seg, cls, cal = r["segmentation"], r["classification"], r["calibration"]
        per = seg["per_class"]
        normal = r["normal_scans"]
        sha = (r.get("weights_sha256") or r.get("onnx_sha256") or "")[:12]
        lines.append(
            f"| {r['model']} | {r.get('title', r['data'])} | {r['cases']} | "
            f"{_fmt(cls['accuracy'])} | {_fmt(seg['lesion_dice_mean'])} | "
            f"{_fmt(per[LESION_CLASS_NAMES[0]]['dice_mean'])} | "
            f"{_fmt(per[LESION_CLASS_NAMES[1]]['dice_mean'])} | {_fmt(cls['macro_auc'])} | "
            f"{_fmt(cal['ece_before'])} -> {_fmt(cal['ece_after'])} | "
            f"{_fmt(cal['brier_before'])} -> {_fmt(cal['brier_after'])} | "
            f"{normal['called_abnormal_over_0_9']} of {normal['cases']} | `{sha}` |"
        )
    lines += [
        "",
        "Per class (sensitivity / specificity / AUC) and confusion matrices "
        "(rows true, columns predicted; order " + ", ".join(CLASS_NAMES) + "):",
        "",
    ]
    lines.append("| model | evaluated on | " + " | ".join(CLASS_NAMES) + " | confusion |")
    lines.append("|---|---|" + "---|" * len(CLASS_NAMES) + "---|")
    for r in reports:
        cls = r["classification"]
        cells = [
            f"{_fmt(cls['sensitivity'][n])} / {_fmt(cls['specificity'][n])} / {_fmt(cls['auc'][n])}"
            for n in CLASS_NAMES
        ]
        matrix = json.dumps(cls["confusion_matrix"]["matrix"])
        lines.append(
            f"| {r['model']} | {r.get('title', r['data'])} | "
            + " | ".join(cells)
            + f" | `{matrix}` |"
        )
    return "\n".join(lines)


def rewrite_docs(docs: Path, reports: Sequence[dict[str, Any]]) -> None:
    """Replace the marked block of a docs page with the tables of `reports`."""
    text = docs.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{docs}: markers {BEGIN!r} ... {END!r} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{BEGIN}\n{markdown_table(reports)}\n{END}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--docs", type=Path, required=True)
    args = parser.parse_args(argv)
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in args.reports]
    rewrite_docs(args.docs, reports)


if __name__ == "__main__":
    main()
