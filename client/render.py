"""Render a scan result for people: a text summary, the JSON file, the overlay PNG file.

Results are taken as the JSON-ready dict that `ScanResult.to_dict()` returns (the client
rebuilds the same dict from the gRPC answer), or as any object with a `to_dict()` method. The
overlay itself is drawn by the neutral `ctjoint.render`, which the gateway uses too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ctjoint.contracts import CLASS_NAMES
from ctjoint.render import MONTAGE_COLUMNS, MONTAGE_TILES, render_overlay

_CLASS_TITLES = {"covid19": "COVID-19 pneumonia", "cap": "community-acquired pneumonia"}
_CLASS_TITLES["normal"] = "no pneumonia"


class HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


ResultLike = Mapping[str, Any] | HasToDict


def as_result_dict(result: ResultLike) -> Mapping[str, Any]:
    """The JSON-ready dict of a result given as a dict or an object with `to_dict()`."""
    if isinstance(result, Mapping):
        return result
    return result.to_dict()


# --- text ------------------------------------------------------------------------------------


def _comparison_line(block: Mapping[str, Any]) -> str:
    """The comparison with the prior analysis in one line (docs/follow-up.md)."""
    if not block.get("available"):
        return f"no comparison ({block.get('reason')})"
    days = block.get("interval_days")
    since = f" since {block.get('prior_study_date')}" if block.get("prior_study_date") else ""
    interval = f" ({days:g} days)" if days is not None else ""
    return (
        f"{block.get('category')}{since}{interval}: {block.get('prior_label')} -> "
        f"{block.get('current_label')}, lesions {block.get('prior_total_ml', 0.0):.1f} -> "
        f"{block.get('current_total_ml', 0.0):.1f} mL"
    )


def format_summary(result: ResultLike) -> str:
    """A short human-readable summary: label, probabilities, lesion volumes, timings."""
    data = as_result_dict(result)
    probabilities: Mapping[str, float] = data.get("probabilities", {})
    label = str(data.get("label", "?"))
    lines = [
        f"Label:         {label} ({_CLASS_TITLES.get(label, label)}), "
        f"p = {probabilities.get(label, float('nan')):.3f}",
        "Probabilities: "
        + "  ".join(f"{name} {probabilities.get(name, float('nan')):.3f}" for name in CLASS_NAMES),
    ]
    review = data.get("review") or {}
    if review:
        lines.append(
            "Review:        "
            + ("needed: " + "; ".join(review.get("details") or review.get("reasons") or ()))
            if review.get("needed")
            else "Review:        not flagged"
        )
    for member in data.get("members") or ():
        member_probs = member.get("probabilities") or {}
        member_label = str(member.get("label"))
        flag = "review" if (member.get("review") or {}).get("needed") else "no flag"
        lines.append(
            f"  {(member.get('model') or {}).get('name')}: {member_label} "
            f"p = {member_probs.get(member_label, float('nan')):.3f}, "
            f"lesions {member.get('lesion_volume_ml', 0.0):.1f} mL, {flag}"
        )
    lesions = data.get("lesions") or {}
    classes = lesions.get("classes") or {}
    if classes:
        parts = [
            f"{name.replace('_', '-')} {stats.get('volume_ml', 0.0):.1f} mL"
            for name, stats in classes.items()
        ]
        total = (lesions.get("total") or {}).get("volume_ml", 0.0)
        slice_pixels = lesions.get("slice_pixels") or {}
        per_slice = [sum(vals) for vals in zip(*slice_pixels.values(), strict=True)]
        involved = sum(1 for v in per_slice if v > 0)
        where = f", on {involved} of {len(per_slice)} slices" if per_slice else ""
        lines.append(f"Lesions:       {', '.join(parts)}; total {total:.1f} mL{where}")
    quantification = data.get("quantification") or {}
    lungs = quantification.get("lungs") or {}
    if lungs:
        sides = "  ".join(
            f"{side} {lung.get('volume_ml', 0.0):.0f} mL ({lung.get('percent_involved', 0.0):.1f}%"
            " involved)"
            for side, lung in lungs.items()
        )
        lines.append(f"Lungs:         {sides}")
        extent = "bilateral" if quantification.get("bilateral") else "not bilateral"
        lines.append(
            f"Distribution:  {extent}, {quantification.get('distribution')} "
            f"(peripheral {quantification.get('peripheral_fraction', 0.0):.0%}), "
            f"severity {quantification.get('severity_score')}/30"
        )
    comparison = data.get("comparison")
    if comparison:
        lines.append(f"Follow-up:     {_comparison_line(comparison)}")
    series = data.get("series") or {}
    if series:
        spacing = " x ".join(f"{v:.2f}" for v in series.get("spacing_mm", ()))
        lines.append(
            f"Series:        {series.get('slices')} slices of "
            f"{series.get('rows')}x{series.get('columns')}, spacing {spacing} mm"
        )
    model = data.get("model") or {}
    if model:
        lines.append(
            f"Model:         {model.get('name')} {model.get('version')} on {data.get('backend')}"
        )
    timings = data.get("timings") or {}
    if timings:
        stages = ("read", "validate", "preprocess", "infer", "postprocess", "total")
        lines.append(
            "Timings (ms):  "
            + "  ".join(f"{s} {timings[f'{s}_ms']:.0f}" for s in stages if f"{s}_ms" in timings)
        )
    return "\n".join(lines)


def write_result_json(result: ResultLike, path: Path) -> None:
    """Write the result as indented JSON (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_result_dict(result), indent=2) + "\n", encoding="utf-8")


# --- overlay montage -------------------------------------------------------------------------


def write_overlay_png(
    volume_hu: np.ndarray,
    label_map: np.ndarray,
    path: Path,
    *,
    tiles: int = MONTAGE_TILES,
    columns: int = MONTAGE_COLUMNS,
    lung_map: np.ndarray | None = None,
    cam: np.ndarray | Callable[[list[int]], np.ndarray] | None = None,
    legend: bool = True,
    caption: str | None = None,
) -> list[int]:
    """Write the overlay montage (`ctjoint.render.render_overlay`) to `path`, creating the
    parent folder; returns the slice indices it shows (ascending)."""
    overlay = render_overlay(
        volume_hu,
        label_map,
        tiles=tiles,
        columns=columns,
        lung_map=lung_map,
        cam=cam,
        legend=legend,
        caption=caption,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(overlay.png)
    return list(overlay.slices)
