"""Shared fixtures: small, generic, cheap. Helpers live in their own modules beside this one."""

from __future__ import annotations

from pathlib import Path

import figures
import pytest
import real_components
from contract_models import export_contract_model
from dicom_factory import SMALL_SERIES_LESIONS, write_ct_series

from ctjoint.contracts import MODEL_NAMES


@pytest.fixture(scope="session")
def contract_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with tiny band-rule ONNX stand-ins for every model (see contract_models)."""
    folder = tmp_path_factory.mktemp("contract_models")
    for model in MODEL_NAMES:
        export_contract_model(model, folder)
    return folder


@pytest.fixture
def ct_series_dir(tmp_path: Path) -> Path:
    """A valid 8-slice 32x32 CT series (files named in reverse slice order) with lesions."""
    folder = tmp_path / "series"
    write_ct_series(folder, slices=8, size=32, lesions=SMALL_SERIES_LESIONS, reverse_names=True)
    return folder


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller, not an xdist worker
        figures.clear()
        # In CI a broken real component fails the run here, instead of skipping its tests.
        if real_components.in_ci():
            broken = real_components.missing_components()
            if broken:
                pytest.exit(
                    "real components missing or broken (CI fails rather than skips):\n  "
                    + "\n  ".join(broken),
                    returncode=3,
                )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = figures.summary_lines()
    if lines:
        terminalreporter.section("measured figures")
        for line in lines:
            terminalreporter.write_line(line)
