"""How often each "needs review" rule fires, and the thresholds chosen on validation.

    .venv/bin/python bench/review_flags.py [--per-class 5] [--size 256] [--work DIR]
                                           [--doc docs/review.md]

Three sets of fresh phantoms, each analysed with `--model both` (one decode, both networks):
  validation: the training shape family (quadric), seeds no training run uses; the only set
              thresholds are chosen on;
  held-out:   the held-out family (fourier), never used to choose anything;
  hard:       held-out cases made hard on purpose: a slab through the mid lungs (apex and base
              cut off), whole chests re-sliced to keep every k-th slice (>= 7.5 mm), and
              mimics: normal chests with every look-alike of disease at the top of its range
              (`ctjoint phantom --mimic`: dependent density, vessels, heart, diaphragm domes).
Per case the signals of gateway/review.py are stored (WORK/signals.json; a rerun reuses them
while the networks' ONNX files and the gateway's code are those they were measured with),
the thresholds are chosen on validation (rules below), and every set is scored with them:
every wrong label should be flagged, at most 10 % of right labels. `--doc` writes the tables
between the markers of docs/review.md.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from ctjoint.contracts import (
    CASE_SERIES_DIR,
    CLASS_NAMES,
    MODEL_BOTH,
    MODEL_DEEPSC3D,
    MODEL_JCS2D,
    default_model_dir,
)
from ctjoint.export.phantom import write_phantom_case
from ctjoint.export.phantom_scanner import SLICE_MM_RANGE
from ctjoint.gateway import review as review_module
from ctjoint.gateway.aggregate import fuse_probabilities
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.gateway.review import (
    DEFAULT_POLICY,
    REASONS,
    ReviewPolicy,
    ReviewSignals,
    fused_review,
    review_of,
)

MODELS = (MODEL_JCS2D, MODEL_DEEPSC3D)
BEGIN = "<!-- review_flags: begin -->"
END = "<!-- review_flags: end -->"
# Seeds far from any training run's (those start at 0 and count cases).
VALIDATION_SEED = 9_100_000
HELD_OUT_SEED = 9_200_000
HARD_SEED = 9_300_000
THICK_MM = 7.5
SLAB_SLICES = 16
HARD_VARIANTS = ("slab", "thick", "mimic")


# --- cases ------------------------------------------------------------------------------------


def _thick(source: Path, out: Path) -> None:
    """Keep every k-th slice so the spacing is at least THICK_MM; SliceThickness follows."""
    files = sorted(source.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    spacing = abs(
        float(datasets[1].ImagePositionPatient[2]) - float(datasets[0].ImagePositionPatient[2])
    )
    step = max(2, math.ceil(THICK_MM / spacing))
    out.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets[::step]):
        ds.SliceThickness = f"{spacing * step:.2f}"
        ds.save_as(out / f"IM{i + 1:05d}.dcm", enforce_file_format=True)


def cases(per_class: int, size: int, work: Path) -> list[dict[str, object]]:
    """The plan: (set, kind, seed, family, variant) per case; files written on demand."""
    plan: list[dict[str, object]] = []
    for set_name, family, base in (
        ("validation", "quadric", VALIDATION_SEED),
        ("held-out", "fourier", HELD_OUT_SEED),
    ):
        for i in range(per_class * len(CLASS_NAMES)):
            kind = CLASS_NAMES[i % len(CLASS_NAMES)]
            plan.append(
                {"set": set_name, "kind": kind, "seed": base + i, "family": family, "variant": ""}
            )
    hard = max(1, per_class // 2)
    for offset, variant in enumerate(HARD_VARIANTS):
        for i in range(hard * len(CLASS_NAMES)):
            # A mimic is a normal chest that looks diseased: all of them normal.
            kind = "normal" if variant == "mimic" else CLASS_NAMES[i % len(CLASS_NAMES)]
            seed = HARD_SEED + 1000 * offset + i
            plan.append(
                {"set": "hard", "kind": kind, "seed": seed, "family": "fourier", "variant": variant}
            )
    for case in plan:
        case["name"] = f"{case['set']}-{case['variant'] or 'whole'}-{case['kind']}-{case['seed']}"
        case["size"] = size
    return plan


def series_of(case: dict[str, object], work: Path) -> tuple[Path, str]:
    """Write the case; (its series folder, the generator's coverage)."""
    root = work / str(case["name"])
    slices = SLAB_SLICES if case["variant"] == "slab" else None
    written = write_phantom_case(
        root,
        kind=str(case["kind"]),
        seed=int(case["seed"]),  # type: ignore[call-overload]
        slices=slices,
        size=int(case["size"]),  # type: ignore[call-overload]
        family=str(case["family"]),
        mimic=case["variant"] == "mimic",
    )
    series = written.out_dir / CASE_SERIES_DIR
    truth = json.loads((written.out_dir / "truth" / "label.json").read_text())
    coverage = "slab" if slices else truth["scanner"]["coverage"]
    if case["variant"] == "thick":
        thick = root / "thick"
        _thick(series, thick)
        shutil.rmtree(series)
        series = thick
    return series, coverage


def measure(plan: list[dict[str, object]], work: Path, model_dir: Path) -> list[dict[str, object]]:
    """Signals of every case (cached in WORK/signals.json by case name, for one analysis key:
    signals measured with other weights or another pipeline are measured again)."""
    cache_path = work / "signals.json"
    key = analysis_key(model_dir)
    stored = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    cache: dict[str, Any] = stored.get("cases", {}) if stored.get("key") == key else {}
    rows = []
    for case in plan:
        name = str(case["name"])
        if name not in cache:
            started = time.perf_counter()
            series, coverage = series_of(case, work)
            result = analyze_directory(
                series, model=MODEL_BOTH, model_dir=model_dir, intra_op_threads=2
            ).result
            members = {}
            for member in result.members:
                assert member.review.signals is not None
                members[member.model] = {
                    "label": member.label,
                    "probabilities": dict(member.probabilities),
                    "signals": member.review.signals.to_dict(),
                }
            cache[name] = {**case, "coverage": coverage, "members": members}
            cache_path.write_text(json.dumps({"key": key, "cases": cache}, indent=1))
            shutil.rmtree(work / name, ignore_errors=True)
            print(
                f"{name}: "
                + ", ".join(f"{m} {v['label']}" for m, v in members.items())
                + f" ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        rows.append(cache[name])
    return rows


# --- thresholds, chosen on validation only ------------------------------------------------------


def _signals(row: dict[str, object], model: str) -> ReviewSignals:
    return ReviewSignals(**row["members"][model]["signals"])  # type: ignore[index]


def _right(row: dict[str, object], model: str) -> bool:
    return row["members"][model]["label"] == row["kind"]  # type: ignore[index]


def _fused(row: dict[str, object]) -> tuple[str, float]:
    """The fused answer of `--model both` (gateway/aggregate.py `fuse_probabilities`): the
    argmax of the members' mean probabilities, and that mean's value."""
    members = row["members"]  # type: ignore[assignment]
    mean = fuse_probabilities(
        np.array([[members[m]["probabilities"][c] for c in CLASS_NAMES] for m in MODELS])  # type: ignore[index]
    )
    return CLASS_NAMES[int(np.argmax(mean))], float(mean.max())


def _label(row: dict[str, object], model: str) -> str:
    if model == MODEL_BOTH:
        return _fused(row)[0]
    return str(row["members"][model]["label"])  # type: ignore[index]


def _confidence(row: dict[str, object], model: str) -> float:
    return _fused(row)[1] if model == MODEL_BOTH else _signals(row, model).confidence


def choose_policy(validation: list[dict[str, object]]) -> tuple[ReviewPolicy, list[str]]:
    """Thresholds from the validation rows alone, with the reasoning for each as text."""
    notes = []
    confidence = {}
    for model in (*MODELS, MODEL_BOTH):
        # The fused answer's confidence is the mean probability of its label (`_fused`).
        right = [_confidence(r, model) for r in validation if _label(r, model) == r["kind"]]
        wrong = [_confidence(r, model) for r in validation if _label(r, model) != r["kind"]]
        # Catch every wrong validation label if that costs at most 10 % of the right ones;
        # without wrong labels, flag the least confident 5 % of the right ones.
        cap = float(np.quantile(right, 0.10)) if right else 1.0
        if wrong:
            point = min(max(wrong) + 1e-3, cap)
        else:
            point = float(np.quantile(right, 0.05)) if right else 0.5
        confidence[model] = round(point, 3)
        notes.append(
            f"{model}: {len(wrong)} wrong validation labels (highest p "
            f"{max(wrong) if wrong else float('nan'):.3f}); 10th percentile of right ones "
            f"{cap:.3f}; operating point {confidence[model]:.3f}"
        )
    rows = [(r, m) for r in validation for m in MODELS if _right(r, m)]
    # Location rules question abnormal labels only: their limits come from right ones.
    lesioned = [
        _signals(r, m)
        for r, m in rows
        if r["kind"] != "normal" and _signals(r, m).lesion_ml >= DEFAULT_POLICY.min_lesion_ml
    ]
    smallest = min((s.lesion_ml for s in lesioned), default=float("nan"))
    normal_ml = max(
        (_signals(r, m).lesion_ml for r, m in rows if r["kind"] == "normal"), default=float("nan")
    )
    outside = max((s.outside_fraction for s in lesioned), default=0.0)
    between = max((s.between_fraction for s in lesioned), default=0.0)
    full = [_signals(r, m) for r, m in rows if r["coverage"] == "full"]
    ends = max(
        (max(s.first_slice_lung_fraction, s.last_slice_lung_fraction) for s in full), default=0.0
    )
    lungs = [_signals(r, m).lung_ml for r, m in rows]
    policy = replace(
        DEFAULT_POLICY,
        min_confidence=confidence,
        # A margin above the largest value a right validation answer had.
        max_outside_fraction=round(min(0.95, outside + 0.1), 2),
        max_between_fraction=round(min(0.95, between + 0.1), 2),
        max_end_lung_fraction=round(min(0.95, ends + 0.05), 2),
        plausible_lung_ml=(
            round(min(lungs) * 0.7, -1) if lungs else 1000.0,
            round(max(lungs) * 1.4, -1) if lungs else 9000.0,
        ),
        max_slice_mm=SLICE_MM_RANGE[1],
    )
    notes.append(
        f"right validation answers with lesions: outside fraction up to {outside:.3f}, between "
        f"up to {between:.3f}; full-coverage end-slice lung fraction up to {ends:.3f}; lungs "
        f"{min(lungs):.0f}-{max(lungs):.0f} mL; training slices up to {SLICE_MM_RANGE[1]:g} mm"
    )
    notes.append(
        f"lesion burden (set by hand, not chosen here: {policy.min_abnormal_lesion_ml:g} mL): "
        f"right abnormal validation answers carried at least {smallest:.1f} mL, right normal "
        f"ones at most {normal_ml:.1f} mL"
    )
    return policy, notes


# --- scoring -----------------------------------------------------------------------------------


def answers(row: dict[str, object], policy: ReviewPolicy) -> dict[str, tuple[str, tuple[str, ...]]]:
    """(label, reasons) per network and for the fused answer, under `policy`."""
    members = row["members"]  # type: ignore[assignment]
    out = {}
    reviews = {}
    for model in MODELS:
        label = members[model]["label"]  # type: ignore[index]
        review = review_of(_signals(row, model), model, policy, label=label)
        reviews[model] = (label, review)
        out[model] = (label, review.reasons)
    label, confidence = _fused(row)
    fused = fused_review(reviews, confidence, policy, label=label)
    out[MODEL_BOTH] = (label, fused.reasons)
    return out


def score(rows: list[dict[str, object]], policy: ReviewPolicy) -> list[dict[str, object]]:
    table = []
    for set_name in ("validation", "held-out", "hard"):
        subset = [r for r in rows if r["set"] == set_name]
        for model in (*MODELS, MODEL_BOTH):
            right = wrong = right_flagged = wrong_flagged = clean = clean_flagged = 0
            fired = {reason: [0, 0] for reason in REASONS}  # [on right, on wrong]
            misses = []
            for row in subset:
                label, reasons = answers(row, policy)[model]
                ok = label == row["kind"]
                right += ok
                wrong += not ok
                right_flagged += ok and bool(reasons)
                # Right answers on series acquired as trained on (whole chest, thin slices).
                acquired_well = row["coverage"] == "full" and row["variant"] != "thick"
                clean += ok and acquired_well
                clean_flagged += ok and acquired_well and bool(reasons)
                wrong_flagged += (not ok) and bool(reasons)
                if not ok and not reasons:
                    misses.append(f"{row['kind']}->{label}")
                for reason in reasons:
                    fired[reason][0 if ok else 1] += 1
            table.append(
                {
                    "set": set_name,
                    "model": model,
                    "cases": len(subset),
                    "right": right,
                    "wrong": wrong,
                    "wrong_flagged": wrong_flagged,
                    "right_flagged": right_flagged,
                    "clean": clean,
                    "clean_flagged": clean_flagged,
                    "fired": fired,
                    "unflagged_wrong": misses,
                }
            )
    return table


def policy_lines(policy: ReviewPolicy, notes: list[str], header: dict[str, object]) -> list[str]:
    lines = [
        f"Measured by `{header['command']}` on {header['date']}: phantoms of "
        f"{header['size']}x{header['size']}, weights {header['weights']}.",
        "",
        "Thresholds chosen on the validation set (training family):",
        "",
        "| rule | threshold chosen here | in force (gateway/review.py) |",
        "|---|---|---|",
    ]
    for field, value in asdict(policy).items():
        lines.append(f"| {field} | {value} | {getattr(DEFAULT_POLICY, field)} |")
    return [*lines, "", *(f"- {n}" for n in notes), ""]


def score_lines(table: list[dict[str, object]]) -> list[str]:
    lines = [
        "| set | model | cases | right | wrong | wrong flagged | right flagged | right flagged, "
        "whole chest and thin slices | wrong not flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        right = int(t["right"])  # type: ignore[call-overload]
        flagged = int(t["right_flagged"])  # type: ignore[call-overload]
        share = f"{flagged / right:.0%}" if right else "-"
        misses = ", ".join(t["unflagged_wrong"]) or "-"  # type: ignore[arg-type]
        clean = int(t["clean"])  # type: ignore[call-overload]
        clean_flagged = int(t["clean_flagged"])  # type: ignore[call-overload]
        clean_share = f"{clean_flagged / clean:.0%}" if clean else "-"
        lines.append(
            f"| {t['set']} | {t['model']} | {t['cases']} | {right} | {t['wrong']} | "
            f"{t['wrong_flagged']}/{t['wrong']} | {flagged}/{right} ({share}) | "
            f"{clean_flagged}/{clean} ({clean_share}) | {misses} |"
        )
    lines += [
        "",
        "How often each reason fired (on right labels / on wrong labels):",
        "",
        "| set | model | " + " | ".join(REASONS) + " |",
        "|---|---|" + "---|" * len(REASONS),
    ]
    for t in table:
        fired = t["fired"]
        lines.append(
            f"| {t['set']} | {t['model']} | "
            + " | ".join(f"{fired[r][0]} / {fired[r][1]}" for r in REASONS)  # type: ignore[index]
            + " |"
        )
    return lines


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def analysis_key(model_dir: Path) -> str:
    """What the signals depend on besides the phantoms: the networks' ONNX files and the
    gateway's code (a postprocessing change moves them as much as new weights do). Of
    gateway/review.py only the code that measures counts: new thresholds or rules re-score
    the stored signals without measuring them again."""
    digest = hashlib.sha256()
    for model in MODELS:
        digest.update((model_dir / f"{model}.onnx").read_bytes())
    gateway = Path(review_module.__file__).parent
    review_file = Path(review_module.__file__).resolve()
    for source in sorted(gateway.rglob("*.py")):
        if source.resolve() == review_file:
            continue
        digest.update(source.relative_to(gateway).as_posix().encode() + source.read_bytes())
    for measuring in MEASURING:
        digest.update(inspect.getsource(measuring).encode())
    return digest.hexdigest()


# What in gateway/review.py computes the signals (the rest decides on them).
MEASURING = (
    review_module.ReviewSignals,
    review_module.measure,
    review_module.location_fractions,
    review_module.lesion_location,
    review_module.between_lungs,
    review_module._row_extents,
    review_module.end_slice_fractions,
    review_module.end_fractions,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("out/review_flags"))
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    plan = cases(args.per_class, args.size, args.work)
    rows = measure(plan, args.work, model_dir)
    validation = [r for r in rows if r["set"] == "validation"]
    policy, notes = choose_policy(validation)
    table = score(rows, policy)
    in_force = score(rows, DEFAULT_POLICY)
    header = {
        "command": f"bench/review_flags.py --per-class {args.per_class} --size {args.size}",
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "weights": ", ".join(f"{m} {_sha(model_dir / f'{m}.onnx')}" for m in MODELS),
    }
    text = "\n".join(
        [
            *policy_lines(policy, notes, header),
            "Scored with the thresholds chosen here:",
            "",
            *score_lines(table),
            "",
            "Scored with the thresholds in force (gateway/review.py):",
            "",
            *score_lines(in_force),
        ]
    )
    print(text)
    if args.doc is not None:
        doc = args.doc.read_text(encoding="utf-8")
        if BEGIN not in doc or END not in doc:
            print(f"{args.doc} has no {BEGIN} ... {END} markers", file=sys.stderr)
            return 1
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        args.doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
