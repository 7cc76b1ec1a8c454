"""How low a temperature could bring a 3D model's calibration error on an evaluated set: the
expected calibration error (15 bins, export.metrics) of the report's temperature-1 scan
probabilities re-tempered over a grid of temperatures, its minimum and where it lies.

A temperature keeps every label, so a set with a confidently wrong scan has an ECE floor no
temperature removes; this shows whether a held-out ECE target is out of reach of
calibration and needs a better network instead. Reading the held-out reports chooses
nothing: the bundled temperature stays the one fitted on validation.

    python bench/temperature_floor.py docs/eval/deepsc3d.bundled.*.json --doc docs/models.md

Only for deepsc3d: its scan probabilities are one softmax, so re-tempering them is exact;
jcs2d's come out of a slice vote and need the slice logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from doc_section import publish  # bench/doc_section.py

from ctjoint.contracts import MODEL_DEEPSC3D
from ctjoint.export.metrics import expected_calibration_error

BEGIN = "<!-- bench/temperature_floor.py begin -->"
END = "<!-- bench/temperature_floor.py end -->"
TEMPERATURES = np.exp(np.linspace(np.log(0.1), np.log(10.0), 241))


def retemper(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities the logits would give at `temperature`."""
    logits = np.log(np.clip(probabilities, 1e-300, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return np.asarray(out / out.sum(axis=1, keepdims=True))


def sweep(report: dict[str, Any]) -> dict[str, Any]:
    """ECE at the report's own probabilities, at temperature 1 and at the best temperature."""
    if report["model"] != MODEL_DEEPSC3D:
        raise ValueError(f"{report['model']}: only deepsc3d scan probabilities re-temper exactly")
    classes = list(report["classes"])
    cases = report["per_case"]
    truth = np.array([classes.index(c["label"]) for c in cases])
    raw = np.array([[c["uncalibrated_probabilities"][k] for k in classes] for c in cases])
    errors = [expected_calibration_error(retemper(raw, float(t)), truth) for t in TEMPERATURES]
    best = int(np.argmin(errors))
    return {
        "cases": len(cases),
        "wrong": int((raw.argmax(axis=1) != truth).sum()),
        "ece_t1": expected_calibration_error(raw, truth),
        "ece_bundled": float(report["calibration"]["ece_after"]),
        "ece_min": float(errors[best]),
        "t_min": float(TEMPERATURES[best]),
    }


def render(named: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        "| report | scans | wrong labels | ECE at T = 1 | ECE with the bundled temperature "
        "| lowest ECE over T in 0.1-10 | at T |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in named:
        lines.append(
            f"| {name} | {r['cases']} | {r['wrong']} | {r['ece_t1']:.3f} | {r['ece_bundled']:.3f} "
            f"| {r['ece_min']:.3f} | {r['t_min']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="ctjoint evaluate JSON reports")
    parser.add_argument("--doc", type=Path, help="write the table between the markers here")
    args = parser.parse_args(argv)
    named = [
        (path.name, sweep(json.loads(path.read_text(encoding="utf-8")))) for path in args.reports
    ]
    return publish(render(named), args.doc, BEGIN, END)


if __name__ == "__main__":
    raise SystemExit(main())
