"""Compare a scan with the same patient's prior analysis: changes and a category.

Pure: measurements in, a `Comparison` out, no I/O (gateway/prior.py finds and reads the prior;
the result JSON, the proto, the SR and the overlay caption carry what this returns).

Category rules (docs/follow-up.md has the measured rescan noise they sit above):
- whether a scan shows pneumonia is its label (covid19 or cap: yes; normal: no), not a volume
  floor: the networks report tens of mL of lesion on lesion-free phantoms, more than a small
  pneumonia, while their labels of those scans are right (jcs2d; docs/follow-up.md);
- normal before and now: stable; normal before, pneumonia now: new; pneumonia before,
  normal now: resolved;
- pneumonia before and now: progressed when the total lesion volume grew by more than
  `CHANGE_ML` AND more than `CHANGE_FRACTION` of the prior volume, improved when it fell by
  as much, else stable. Both bounds must hold, so neither a small lesion's large relative
  swing nor a large lesion's rescan noise in mL is called a change.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ctjoint.contracts import CLASS_NAMES
from ctjoint.gateway.errors import CtJointError

# Thresholds above the largest rescan noise bench/followup_noise.py measured (docs/follow-up.md).
CHANGE_ML: Final = 15.0
CHANGE_FRACTION: Final = 0.25
NORMAL: Final = "normal"

NEW: Final = "new"
PROGRESSED: Final = "progressed"
STABLE: Final = "stable"
IMPROVED: Final = "improved"
RESOLVED: Final = "resolved"
CATEGORIES: Final = (NEW, PROGRESSED, STABLE, IMPROVED, RESOLVED)

# The measured quantities a comparison reports the change of, in this order.
MEASURES: Final = (
    "total_ml",
    "ground_glass_ml",
    "consolidation_ml",
    "right_percent_involved",
    "left_percent_involved",
    "severity_score",
)
RULE: Final = (
    "new/resolved by the labels (normal or not); with pneumonia in both, progressed/improved "
    f"when the total lesion volume changes by more than {CHANGE_ML:g} mL and "
    f"{CHANGE_FRACTION:.0%} of the prior, else stable"
)


class ComparisonError(CtJointError, ValueError):
    """Measurements that cannot be compared (a value missing or out of range)."""


@dataclass(frozen=True)
class Measurements:
    """What one analysis measured, as the SR or the result JSON states it."""

    label: str
    ground_glass_ml: float
    consolidation_ml: float
    right_percent_involved: float
    left_percent_involved: float
    severity_score: int
    model: str = ""
    # When the study was made (StudyDate + StudyTime); None when the source does not say.
    study_datetime: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.label not in CLASS_NAMES:
            raise ComparisonError(f"label {self.label!r} is not one of {CLASS_NAMES}")
        for name in (
            "ground_glass_ml",
            "consolidation_ml",
            "right_percent_involved",
            "left_percent_involved",
        ):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ComparisonError(f"{name} must be a finite value >= 0, got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "severity_score", int(self.severity_score))

    @property
    def total_ml(self) -> float:
        return self.ground_glass_ml + self.consolidation_ml

    def value(self, measure: str) -> float:
        return float(getattr(self, measure))


@dataclass(frozen=True)
class Change:
    """Current minus prior, and that as a fraction of the prior (None when the prior is 0)."""

    absolute: float
    relative: float | None

    @classmethod
    def between(cls, prior: float, current: float) -> Change:
        diff = current - prior
        return cls(round(diff, 3), round(diff / prior, 4) if prior > 0 else None)

    def to_dict(self) -> dict[str, float | None]:
        return {"absolute": self.absolute, "relative": self.relative}


@dataclass(frozen=True)
class Comparison:
    """The `comparison` block of a result: available with its numbers, or not and why."""

    available: bool
    reason: str = ""
    category: str = ""
    prior_study_date: str = ""  # ISO date, "" when unknown
    interval_days: float | None = None
    prior_label: str = ""
    current_label: str = ""
    prior_total_ml: float = 0.0
    current_total_ml: float = 0.0
    changes: Mapping[str, Change] = field(default_factory=dict)
    rule: str = RULE

    def __post_init__(self) -> None:
        if self.available and self.category not in CATEGORIES:
            raise ValueError(f"category {self.category!r} is not one of {CATEGORIES}")
        if not self.available and not self.reason:
            raise ValueError("a comparison that is not available says why")

    @classmethod
    def unavailable(cls, reason: str) -> Comparison:
        return cls(available=False, reason=reason)

    @property
    def caption(self) -> str:
        """One short line for the overlay: the category, the total change and the interval."""
        if not self.available:
            return f"vs prior: n/a ({self.reason})"[:90]
        change = self.changes["total_ml"].absolute
        when = f" in {self.interval_days:g} d" if self.interval_days is not None else ""
        return (
            f"vs prior: {self.category.upper()} {self.prior_total_ml:.0f} -> "
            f"{self.current_total_ml:.0f} mL ({change:+.0f}){when}"
        )

    def to_dict(self) -> dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {
            "available": True,
            "category": self.category,
            "prior_study_date": self.prior_study_date or None,
            "interval_days": self.interval_days,
            "prior_label": self.prior_label,
            "current_label": self.current_label,
            "prior_total_ml": self.prior_total_ml,
            "current_total_ml": self.current_total_ml,
            "changes": {name: change.to_dict() for name, change in self.changes.items()},
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        """The inverse of `to_dict` (a result JSON read back)."""
        if not data.get("available"):
            return cls.unavailable(str(data.get("reason") or "unknown"))
        return cls(
            available=True,
            category=str(data["category"]),
            prior_study_date=str(data.get("prior_study_date") or ""),
            interval_days=data.get("interval_days"),
            prior_label=str(data["prior_label"]),
            current_label=str(data["current_label"]),
            prior_total_ml=float(data["prior_total_ml"]),
            current_total_ml=float(data["current_total_ml"]),
            changes={
                name: Change(float(c["absolute"]), c.get("relative"))
                for name, c in data["changes"].items()
            },
            rule=str(data.get("rule", RULE)),
        )


def category(
    prior_label: str, prior_total_ml: float, current_label: str, current_total_ml: float
) -> str:
    """The category of a follow-up (module docstring)."""
    before = prior_label != NORMAL
    now = current_label != NORMAL
    if not before:
        return NEW if now else STABLE
    if not now:
        return RESOLVED
    diff = current_total_ml - prior_total_ml
    if diff > CHANGE_ML and diff > CHANGE_FRACTION * prior_total_ml:
        return PROGRESSED
    if -diff > CHANGE_ML and -diff > CHANGE_FRACTION * prior_total_ml:
        return IMPROVED
    return STABLE


def compare(prior: Measurements, current: Measurements) -> Comparison:
    """Compare two analyses of one patient; the prior must be the earlier study when both
    dates are known."""
    interval: float | None = None
    if prior.study_datetime is not None and current.study_datetime is not None:
        seconds = (current.study_datetime - prior.study_datetime).total_seconds()
        if seconds <= 0:
            raise ComparisonError("the prior study is not earlier than the current one")
        interval = round(seconds / 86400.0, 2)
    return Comparison(
        available=True,
        category=category(prior.label, prior.total_ml, current.label, current.total_ml),
        prior_study_date=(
            prior.study_datetime.date().isoformat() if prior.study_datetime is not None else ""
        ),
        interval_days=interval,
        prior_label=prior.label,
        current_label=current.label,
        prior_total_ml=round(prior.total_ml, 3),
        current_total_ml=round(current.total_ml, 3),
        changes={m: Change.between(prior.value(m), current.value(m)) for m in MEASURES},
    )


def study_datetime(date: str, time: str = "") -> dt.datetime | None:
    """A DICOM StudyDate (YYYYMMDD) and StudyTime (HHMMSS[.FFFFFF], parts optional) as a
    datetime; None when the date is absent or not a date."""
    date = (date or "").strip()
    try:
        day = dt.datetime.strptime(date, "%Y%m%d")
    except ValueError:
        return None
    digits = (time or "").strip().split(".")[0]
    if not digits.isdigit() or len(digits) % 2 or len(digits) > 6:
        return day
    parts = [int(digits[i : i + 2]) for i in range(0, len(digits), 2)] + [0, 0]
    try:
        return day.replace(hour=parts[0], minute=parts[1], second=parts[2])
    except ValueError:
        return day


__all__ = [
    "CATEGORIES",
    "CHANGE_FRACTION",
    "CHANGE_ML",
    "MEASURES",
    "Change",
    "Comparison",
    "ComparisonError",
    "Measurements",
    "category",
    "compare",
    "study_datetime",
]
