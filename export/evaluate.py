"""Evaluation of an exported model through the serving pipeline, on the source grid.

Each case is read like the product reads it (the gateway's DICOM reader, or a NIfTI volume
turned into the same `CtVolume`), analysed by the gateway's `ScanAnalyzer` on the embedded ONNX
Runtime backend (preprocessing from the model's own plan, the 2D slice vote, logits mapped back
onto the source slices), and compared with ground truth voxel for voxel on the source grid.
The figures reported are therefore the figures the product gives.

Calibration: the backend applies the model's logit temperatures (ONNX metadata); the report
gives expected calibration error (15 bins) and Brier score of the scan probabilities with them
("after") and without them ("before", from the same logits divided back), and a reliability
diagram PNG beside the JSON report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctjoint import contracts
from ctjoint.contracts import CLASS_NAMES, LESION_CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.export.dataset import DatasetError, discover_cases, load_case
from ctjoint.export.metrics import (
    OverlapCounts,
    brier_score,
    confusion_matrix,
    expected_calibration_error,
    one_vs_rest_auc,
    overlap,
    reliability_bins,
    sensitivity_specificity,
)
from ctjoint.export.train import json_safe
from ctjoint.gateway.aggregate import softmax
from ctjoint.gateway.analysis import ScanAnalyzer
from ctjoint.gateway.backends.base import ModelOutputs
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.errors import ModelNotFoundError
from ctjoint.gateway.preprocess import PREPROCESSORS

EVAL_THREADS = 2
EVAL_BATCH = 32
ECE_BINS = 15
# A normal scan called abnormal with more than this probability is a confident false alarm.
FALSE_ALARM_PROBABILITY = 0.9
ALL_SPLITS = "all"


@dataclass(frozen=True)
class CaseOutcome:
    """One case's prediction against its truth."""

    case_id: str
    label: int
    probabilities: tuple[float, ...]
    uncalibrated: tuple[float, ...]  # the same scan at temperature 1
    lesion: OverlapCounts  # any lesion vs background
    per_class: tuple[OverlapCounts, ...]  # one per LESION_CLASS_NAMES
    seconds: float

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case_id,
            "label": CLASS_NAMES[self.label],
            "predicted": CLASS_NAMES[self.predicted],
            "probabilities": dict(zip(CLASS_NAMES, self.probabilities, strict=True)),
            "uncalibrated_probabilities": dict(zip(CLASS_NAMES, self.uncalibrated, strict=True)),
            "lesion_dice": self.lesion.dice if self.lesion.truth else None,
            "lesion_voxels_truth": self.lesion.truth,
            "lesion_voxels_predicted": self.lesion.predicted,
            "dice_per_class": {
                name: counts.dice if counts.truth else None
                for name, counts in zip(LESION_CLASS_NAMES, self.per_class, strict=True)
            },
            "seconds": self.seconds,
        }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def summarise(outcomes: list[CaseOutcome]) -> dict[str, Any]:
    """Segmentation and classification figures over a list of case outcomes."""
    truth = np.array([o.label for o in outcomes], dtype=np.int64)
    predicted = np.array([o.predicted for o in outcomes], dtype=np.int64)
    probabilities = np.array([o.probabilities for o in outcomes], dtype=np.float64)
    matrix = confusion_matrix(truth, predicted, len(CLASS_NAMES))
    sens_spec = sensitivity_specificity(matrix)
    macro_auc, aucs = one_vs_rest_auc(probabilities, truth)

    pooled = OverlapCounts(0, 0, 0)
    for o in outcomes:
        pooled = pooled + o.lesion
    per_class: dict[str, Any] = {}
    for k, name in enumerate(LESION_CLASS_NAMES):
        counts = [o.per_class[k] for o in outcomes]
        pooled_k = OverlapCounts(0, 0, 0)
        for c in counts:
            pooled_k = pooled_k + c
        with_class = [c.dice for c in counts if c.truth]
        per_class[name] = {
            "dice_mean": _mean(with_class),
            "dice_global": pooled_k.dice,
            "cases": len(with_class),
        }
    lesion_cases = [o.lesion.dice for o in outcomes if o.lesion.truth]
    lesion_free = [o for o in outcomes if not o.lesion.truth]
    raw = np.array([o.uncalibrated for o in outcomes], dtype=np.float64)
    normal = CLASS_NAMES.index("normal")
    normal_abnormal = [1.0 - o.probabilities[normal] for o in outcomes if o.label == normal]
    return {
        "cases": len(outcomes),
        "classification": {
            "accuracy": float(np.mean(truth == predicted)) if outcomes else math.nan,
            "macro_auc": macro_auc,
            "auc": dict(zip(CLASS_NAMES, aucs, strict=True)),
            "sensitivity": {n: s for n, (s, _) in zip(CLASS_NAMES, sens_spec, strict=True)},
            "specificity": {n: s for n, (_, s) in zip(CLASS_NAMES, sens_spec, strict=True)},
            "confusion_matrix": {
                "rows": "true class",
                "columns": "predicted class",
                "classes": list(CLASS_NAMES),
                "matrix": matrix.tolist(),
            },
        },
        "segmentation": {
            "lesion_dice_mean": _mean(lesion_cases),
            "lesion_dice_global": pooled.dice,
            "cases_with_lesions": len(lesion_cases),
            "per_class": per_class,
            "lesion_free_cases": len(lesion_free),
            "lesion_free_cases_with_false_positives": sum(
                1 for o in lesion_free if o.lesion.predicted
            ),
        },
        "calibration": {
            "bins": ECE_BINS,
            "ece_before": expected_calibration_error(raw, truth, ECE_BINS),
            "ece_after": expected_calibration_error(probabilities, truth, ECE_BINS),
            "brier_before": brier_score(raw, truth),
            "brier_after": brier_score(probabilities, truth),
            "reliability_after": reliability_bins(probabilities, truth, ECE_BINS),
            "reliability_before": reliability_bins(raw, truth, ECE_BINS),
        },
        "normal_scans": {
            "cases": len(normal_abnormal),
            "max_abnormal_probability": max(normal_abnormal) if normal_abnormal else None,
            "called_abnormal_over_0_9": sum(
                1 for p in normal_abnormal if p > FALSE_ALARM_PROBABILITY
            ),
        },
        "seconds_per_case": _mean([o.seconds for o in outcomes]),
    }


def _model_dir_for(
    model: str, onnx_file: Path
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The backend loads <model_dir>/<model>.onnx; a file named otherwise is linked into a
    temporary folder under that name."""
    if onnx_file.name == f"{model}.onnx":
        return onnx_file.parent, None
    holder = tempfile.TemporaryDirectory(prefix="ctjoint-eval-")
    os.symlink(onnx_file.resolve(), Path(holder.name) / f"{model}.onnx")
    return Path(holder.name), holder


class _RecordingBackend(EmbeddedBackend):
    """The embedded backend, keeping the classification logits of the case under way so the
    report can show the probabilities before calibration too (logits x temperature)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cls_logits: list[np.ndarray] = []

    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        outputs = await super().infer(model, image)
        self.cls_logits.append(outputs.cls_logits * self.model_info(model).temperature.cls)
        return outputs


def _uncalibrated(cls_logits: list[np.ndarray], kind: str) -> tuple[float, ...]:
    """Scan probabilities at temperature 1, computed the way the analysis computes them."""
    probs = softmax(np.concatenate(cls_logits).astype(np.float64), axis=1)
    scan = PREPROCESSORS[kind].scan_probabilities(probs)[0]
    return tuple(float(p) for p in scan)


async def _run_cases(model: str, model_dir: Path, refs: list[Any]) -> tuple[list[CaseOutcome], str]:
    backend = _RecordingBackend((model,), model_dir=model_dir, intra_op_threads=EVAL_THREADS)
    outcomes: list[CaseOutcome] = []
    async with backend:
        info = backend.model_info(model)
        version = info.version
        analyzer = ScanAnalyzer(backend, batch_size=EVAL_BATCH)
        for ref in refs:
            started = time.perf_counter()
            loaded = await asyncio.to_thread(load_case, ref)
            backend.cls_logits = []
            analysis = await analyzer.analyze_volume(loaded.volume, model)
            label_map = analysis.label_map
            truth = loaded.lesions
            outcomes.append(
                CaseOutcome(
                    case_id=ref.case_id,
                    label=ref.label,
                    probabilities=tuple(
                        float(analysis.result.probabilities[name]) for name in CLASS_NAMES
                    ),
                    uncalibrated=_uncalibrated(backend.cls_logits, info.plan.kind),
                    lesion=overlap(label_map > 0, truth > 0),
                    per_class=tuple(
                        overlap(label_map == value, truth == value)
                        for value, name in enumerate(SEG_CLASS_NAMES)
                        if name in LESION_CLASS_NAMES
                    ),
                    seconds=time.perf_counter() - started,
                )
            )
    return outcomes, version


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file (the report names exactly the weights it describes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_model(
    model: str,
    data_dir: Path,
    split: str = "test",
    onnx_file: Path | None = None,
    out: Path | None = None,
    *,
    weights: Path | None = None,
    markdown: Path | None = None,
    title: str | None = None,
) -> str:
    """Evaluate an exported model on one split of a data set (`all`: every case); writes a
    JSON report (default runs/<model>-<split>.eval.json), its reliability diagram
    (<report>.reliability.png) and optionally a markdown table; returns a short summary.

    `weights` names the checkpoint the ONNX file was exported from: its SHA-256 goes into
    the report so a committed report can be checked against the committed weights.
    """
    from ctjoint.export.eval_report import markdown_table, write_reliability_png

    if model not in contracts.MODEL_NAMES:
        raise ModelNotFoundError(
            f"unknown model {model!r}; expected one of {contracts.MODEL_NAMES}"
        )
    onnx_path = Path(onnx_file) if onnx_file is not None else contracts.onnx_path(model)
    if not onnx_path.is_file():
        raise ModelNotFoundError(
            f"{onnx_path}: no exported model; run `ctjoint export onnx --model {model}`"
        )
    if weights is not None and not Path(weights).is_file():
        raise ModelNotFoundError(f"{weights}: checkpoint not found")
    refs = discover_cases(data_dir, None if split == ALL_SPLITS else split)
    if not refs:
        raise DatasetError(f"{data_dir}: no cases in split {split!r}")
    started = time.perf_counter()
    model_dir, holder = _model_dir_for(model, onnx_path)
    try:
        outcomes, version = asyncio.run(_run_cases(model, model_dir, refs))
    finally:
        if holder is not None:
            holder.cleanup()
    report = {
        "model": model,
        "model_version": version,
        "title": title or f"{model} on {Path(data_dir).name} ({split})",
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_file(onnx_path),
        "weights_sha256": sha256_file(Path(weights)) if weights is not None else None,
        "data": str(data_dir),
        "split": split,
        "classes": list(CLASS_NAMES),
        "grid": "source (every figure is computed on the original slice grid)",
        **summarise(outcomes),
        "wall_seconds": time.perf_counter() - started,
        "per_case": [o.to_dict() for o in outcomes],
    }
    target = Path(out) if out is not None else Path("runs") / f"{model}-{split}.eval.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(json_safe(report), indent=2) + "\n", encoding="utf-8")
    diagram = target.with_suffix(".reliability.png")
    write_reliability_png(report, diagram)
    written = [str(target), str(diagram)]
    if markdown is not None:
        Path(markdown).write_text(markdown_table([json_safe(report)]) + "\n", encoding="utf-8")
        written.append(str(markdown))
    return format_summary(report) + f"\nwrote {', '.join(written)}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    cls = report["classification"]
    seg = report["segmentation"]
    lines = [
        f"{report['model']} {report['model_version']} on {report['cases']} {report['split']} "
        f"cases: accuracy {_pct(cls['accuracy'])}, macro AUC {_pct(cls['macro_auc'])}, "
        f"lesion Dice {_pct(seg['lesion_dice_mean'])} (mean over {seg['cases_with_lesions']} "
        f"cases with lesions), global {_pct(seg['lesion_dice_global'])}",
    ]
    for name in CLASS_NAMES:
        lines.append(
            f"  {name:8s} sensitivity {_pct(cls['sensitivity'][name])} "
            f"specificity {_pct(cls['specificity'][name])} AUC {_pct(cls['auc'][name])}"
        )
    for name, figures in seg["per_class"].items():
        lines.append(
            f"  {name:14s} Dice {_pct(figures['dice_mean'])} (global "
            f"{_pct(figures['dice_global'])}, {figures['cases']} cases)"
        )
    matrix = cls["confusion_matrix"]["matrix"]
    lines.append("  confusion (rows true, columns predicted): " + json.dumps(matrix))
    cal = report["calibration"]
    lines.append(
        f"  calibration: ECE {_pct(cal['ece_before'])} -> {_pct(cal['ece_after'])}, Brier "
        f"{_pct(cal['brier_before'])} -> {_pct(cal['brier_after'])} (before -> after)"
    )
    normal = report["normal_scans"]
    lines.append(
        f"  normal scans called abnormal with p > {FALSE_ALARM_PROBABILITY}: "
        f"{normal['called_abnormal_over_0_9']} of {normal['cases']}"
    )
    return "\n".join(lines)
