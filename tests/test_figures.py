"""The figures summary: a record made in a worker reaches the controller's end-of-run lines."""

from __future__ import annotations

from pathlib import Path

import figures
import pytest


def test_record_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figures, "FIGURES_DIR", tmp_path / "figs")
    figures.record("fuzz/in-process", cases=10000, crashes=0)
    assert figures.summary_lines() == ["fuzz/in-process: cases=10000, crashes=0"]
    figures.clear()
    assert figures.summary_lines() == []
