"""Which series of a folder to send, when it holds several (issue 19): the file-reading front
of the rules in ctjoint/series_rules.py (docs/interoperability.md lists them).

Each file's header is read without its pixels; files are grouped by Series Instance UID, each
series summarised, and the rules pick one. The choice names series by number and a keyed
pseudonym of their UID, never the UID itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from ctjoint.client.listen import series_key
from ctjoint.series_rules import (
    MIN_COVERAGE_MM,
    MIN_SLICES,
    MODEL_THICKNESS_MM,
    ImageFacts,
    SeriesFacts,
    choose,
    kernel_family,
)


@dataclass(frozen=True)
class SeriesCandidate:
    """One series of the folder: what the rules read of it, and its files."""

    facts: SeriesFacts
    files: tuple[Path, ...]
    localizers: tuple[Path, ...]

    @property
    def key(self) -> str:
        return self.facts.key

    @property
    def number(self) -> int | None:
        return self.facts.number

    def to_dict(self) -> dict[str, Any]:
        return self.facts.to_dict()


@dataclass(frozen=True)
class SeriesChoice:
    """The series to send (None when no series qualifies), why, and why not the others."""

    chosen: SeriesCandidate | None
    reason: str
    skipped: tuple[tuple[SeriesCandidate, str], ...] = ()
    unreadable: int = 0
    notes: tuple[str, ...] = field(default=())
    series_count: int = 0

    @property
    def files(self) -> tuple[Path, ...]:
        return self.chosen.files if self.chosen is not None else ()

    @property
    def several(self) -> bool:
        """More than one series in the folder: the choice decides what is sent."""
        return self.series_count > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysed": None if self.chosen is None else self.chosen.to_dict(),
            "reason": self.reason,
            "notes": list(self.notes),
            "skipped": [{**c.to_dict(), "reason": why} for c, why in self.skipped],
            "unreadable_files": self.unreadable,
        }


def _read(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None


def choose_series(
    files: Sequence[Path],
    *,
    thickness_mm: tuple[float, float] = MODEL_THICKNESS_MM,
    min_slices: int = MIN_SLICES,
    min_coverage_mm: float = MIN_COVERAGE_MM,
) -> SeriesChoice:
    """Group `files` by series and pick one by the rules of ctjoint/series_rules.py."""
    groups: dict[str, list[tuple[Path, ImageFacts]]] = {}
    unreadable = 0
    for path in files:
        dataset = _read(path)
        uid = str(dataset.get("SeriesInstanceUID", "") or "") if dataset is not None else ""
        if dataset is None or not uid:
            unreadable += 1
            continue
        groups.setdefault(uid, []).append((path, ImageFacts.from_header(dataset)))
    candidates: dict[str, SeriesCandidate] = {}
    for uid, items in groups.items():
        facts = SeriesFacts.of(series_key(uid), [f for _, f in items])
        candidates[facts.key] = SeriesCandidate(
            facts,
            files=tuple(p for p, f in items if not f.localizer),
            localizers=tuple(p for p, f in items if f.localizer),
        )
    selection = choose(
        [c.facts for c in candidates.values()],
        thickness_mm=thickness_mm,
        min_slices=min_slices,
        min_coverage_mm=min_coverage_mm,
    )
    return SeriesChoice(
        chosen=None if selection.chosen is None else candidates[selection.chosen.key],
        reason=selection.reason,
        skipped=tuple((candidates[c.key], why) for c, why in selection.skipped),
        unreadable=unreadable,
        notes=selection.notes,
        series_count=len(groups),
    )


__all__ = ["SeriesCandidate", "SeriesChoice", "choose_series", "kernel_family"]
