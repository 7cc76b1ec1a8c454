"""Follow-up studies of a phantom case: the same synthetic patient scanned again, with truth.

`write_follow_up` (`ctjoint phantom --follow-up-of CASE --change ...`) regenerates the case's
patient from the arguments its label.json keeps ("generation"): the same anatomy, vessels and
planned lesions, then every lesion scaled about its centre so that its volume changes by the
change's documented factor (`CHANGES`), new noise, slices shifted by 0.3-0.7 of their spacing,
the study some days later with new study and series UIDs (same PatientID). Its label.json
adds "follow_up": the change, the nominal volume factor, the lesion volumes of both studies,
and the category a comparison must find (gateway/comparison.py).

The lung boundary cuts a grown lesion, so the measured volume ratio is not exactly the
nominal factor: the truth records both studies' rendered volumes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ctjoint.contracts import CASE_TRUTH_DIR, TRUTH_LABEL
from ctjoint.export.phantom import FollowUp, PhantomCase, PhantomError, write_phantom_case


@dataclass(frozen=True)
class Change:
    """What a follow-up does to the lesions, and the comparison category that says it."""

    volume_factor: float  # nominal; 0 removes every lesion
    category: str


# Factors well outside the measured rescan noise (docs/follow-up.md): a doubling, a fall to
# 40 %, nothing left; `stable` is the same lesions rescanned.
CHANGES: Final[Mapping[str, Change]] = {
    "progress": Change(2.0, "progressed"),
    "stable": Change(1.0, "stable"),
    "improve": Change(0.4, "improved"),
    "resolve": Change(0.0, "resolved"),
}
# Days after the case given, by default.
DEFAULT_INTERVAL_DAYS: Final = 14


def read_generation(case: Path) -> tuple[Path, dict[str, Any]]:
    """(label.json path, its contents) of a case folder, or of its label.json given directly."""
    case = Path(case)
    label = case if case.is_file() else case / CASE_TRUTH_DIR / TRUTH_LABEL
    try:
        info = json.loads(label.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PhantomError(f"{label}: cannot read the case's truth ({err})") from err
    if not isinstance(info, dict) or not isinstance(info.get("generation"), dict):
        raise PhantomError(
            f"{label}: has no 'generation' record (written by an older ctjoint phantom); "
            "write the case again to make follow-ups of it"
        )
    return label, info


def write_follow_up(
    case: Path, out_dir: Path, *, change: str, days: int = DEFAULT_INTERVAL_DAYS
) -> PhantomCase:
    """Write a later study of `case`'s patient with its lesions changed by `change`."""
    if change not in CHANGES:
        raise PhantomError(f"unknown change {change!r}; expected one of {', '.join(CHANGES)}")
    if days < 1:
        raise PhantomError(f"a follow-up comes at least 1 day later, got {days}")
    label, info = read_generation(case)
    gen = info["generation"]
    earlier = gen.get("follow_up") or {"number": 0, "lesion_scale": 1.0, "days": 0}
    prior_ml = {k: float(v) for k, v in info.get("lesion_volume_ml", {}).items()}
    wanted = CHANGES[change]
    if change != "stable" and sum(prior_ml.values()) == 0.0:
        raise PhantomError(f"{label}: the case has no lesions, so there is nothing to {change}")
    follow_up = FollowUp(
        number=int(earlier["number"]) + 1,
        lesion_scale=float(earlier["lesion_scale"]) * wanted.volume_factor ** (1.0 / 3.0),
        days=int(earlier["days"]) + days,
    )
    truth = {
        "follow_up": {
            "change": change,
            "volume_factor": wanted.volume_factor,
            "expected_category": wanted.category,
            "interval_days": days,
            "prior_lesion_volume_ml": prior_ml,
            "prior_label": info.get("label"),
        }
    }
    return write_phantom_case(
        out_dir,
        kind=str(gen["kind"]),
        seed=int(gen["seed"]),
        slices=None if gen.get("slices") is None else int(gen["slices"]),
        size=int(gen["size"]),
        family=str(gen["family"]),
        follow_up=follow_up,
        truth_extra=truth,
        mimic=bool(gen.get("mimic", False)),
    )


__all__ = ["CHANGES", "DEFAULT_INTERVAL_DAYS", "Change", "read_generation", "write_follow_up"]
