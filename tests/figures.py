"""Figures a test measured (files tried, cases fuzzed, RSS growth, recovery times), printed at
the end of the run. Tests run in xdist workers whose stdout is swallowed, so each record is a
JSON file under one folder that the controller reads in its terminal summary."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FIGURES_DIR = Path(os.environ.get("CTJOINT_TEST_FIGURES", "build/test-figures"))


def record(name: str, **figures: Any) -> None:
    """Keep `figures` (JSON-able values) under `name` for the end-of-run summary."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    (FIGURES_DIR / f"{safe}.json").write_text(json.dumps({"name": name, "figures": figures}))


def clear() -> None:
    """Forget the previous run's figures (called once, by the controller, at session start)."""
    if FIGURES_DIR.is_dir():
        for path in FIGURES_DIR.glob("*.json"):
            path.unlink()


def summary_lines() -> list[str]:
    lines = []
    for path in sorted(FIGURES_DIR.glob("*.json")) if FIGURES_DIR.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        parts = ", ".join(f"{k}={v}" for k, v in data["figures"].items())
        lines.append(f"{data['name']}: {parts}")
    return lines
