"""The image's Python packages: every pin in deploy/requirements-image.txt installs on the NGC
base's Python (manylinux x86_64, binary wheels only), the file is complete (resolving it pulls
nothing it does not pin), and its TensorRT bindings match the base image's TensorRT as the
version table in docs/deployment.md gives it. Asks the package registry (pip's resolver in
dry-run mode; nothing is installed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctjoint.contracts import repo_root

ROOT = repo_root()
REQUIREMENTS = ROOT / "deploy" / "requirements-image.txt"
DOCS = ROOT / "docs" / "deployment.md"
# pip matches only the platform tags it is given: the wheels these pins resolve to are tagged
# from manylinux1 to manylinux_2_28 (the base is Ubuntu 24.04, glibc 2.39).
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)


def _versions_row() -> dict[str, str]:
    """The docs' version-table row of the Dockerfile's base tag."""
    (base,) = re.findall(
        r"^ARG TRITON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE
    )
    lines = [line for line in DOCS.read_text().splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| NGC base tag |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == base:
            return dict(zip(names, cells, strict=True))
    raise AssertionError(f"docs/deployment.md has no version row for the base {base}")


def _pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?==(\S+)", line)
        assert match, f"{REQUIREMENTS.name}: {line!r} is not pinned with =="
        pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[3]
    return pins


def test_every_requirement_of_the_gateway_and_tensorrt_extras_is_pinned() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    wanted = {
        re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]).lower()
        for extra in ("client", "gateway", "tensorrt")
        for requirement in extras[extra]
    }
    assert sorted(wanted - set(_pins())) == []


def test_the_tensorrt_bindings_match_the_base_images_tensorrt() -> None:
    row = _versions_row()
    assert row["TensorRT wheel"] == f"tensorrt-cu12-bindings=={row['TensorRT']}"
    assert _pins()["tensorrt-cu12-bindings"] == row["TensorRT"]
    assert "torch" not in _pins()


@pytest.mark.timeout(300)
def test_every_pin_resolves_for_the_images_python_and_nothing_is_left_unpinned(
    tmp_path: Path,
) -> None:
    python = _versions_row()["Python"]
    report = tmp_path / "report.json"
    args = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
        "--report", str(report), "--only-binary=:all:", "--python-version", python,
        "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3",
        "--abi", "none", *(f"--platform={p}" for p in PLATFORMS), "-r", str(REQUIREMENTS),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=280, check=False)
    errors = [line for line in done.stderr.splitlines() if "WARNING" not in line]
    assert done.returncode == 0, "\n".join(errors[-15:])
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved == _pins()
