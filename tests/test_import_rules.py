"""The import contracts of pyproject.toml ([tool.importlinter], DESIGN.md "Who may import whom")
hold, and each one bites: lint-imports runs on a copy of the package as it is installed
(pyproject's package-dir mapping), once as it is and once per planted violation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

from ctjoint.contracts import repo_root

ROOT = repo_root()
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# What the python-backend models may import besides the standard library and ctjoint.contracts.
REPOSITORY_MODELS_MAY_IMPORT = {"numpy", "onnxruntime", "triton_python_backend_utils"}


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]


def _contract(contract_id: str) -> dict:
    (contract,) = [c for c in _config()["importlinter"]["contracts"] if c["id"] == contract_id]
    return contract


def _package_copy(root: Path) -> Path:
    """The Python files of the package laid out as installed (ctjoint/gateway/... for gateway/)."""
    mapping = _config()["setuptools"]["package-dir"]

    def not_python(folder: str, names: list[str]) -> set[str]:
        return {
            name
            for name in names
            if name == "__pycache__"
            or (not name.endswith(".py") and not Path(folder, name).is_dir())
        }

    for package in sorted(mapping, key=lambda name: name.count(".")):
        shutil.copytree(
            ROOT / mapping[package],
            root / package.replace(".", "/"),
            ignore=not_python,
            dirs_exist_ok=True,
        )
    return root


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    # From inside the copy: lint-imports puts its working folder first on sys.path.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(PYPROJECT)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_every_import_contract(tmp_path: Path) -> None:
    done = _lint(_package_copy(tmp_path))
    kept = len(_config()["importlinter"]["contracts"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {kept} kept, 0 broken." in done.stdout


# One planted import per contract: (contract id, file in the installed layout, planted line).
PLANTED = [
    ("layers", "ctjoint/contracts.py", "from ctjoint import cli"),
    ("layers", "ctjoint/render.py", "from ctjoint.gateway import errors"),
    ("gateway", "ctjoint/gateway/errors.py", "import torch"),
    ("gateway", "ctjoint/gateway/errors.py", "from ctjoint.export import phantom"),
    ("client", "ctjoint/client/render.py", "from ctjoint.gateway import errors"),
    ("client", "ctjoint/client/send.py", "import onnxruntime"),
    ("repository-models", "ctjoint/export/triton_python/postprocess.py", "import scipy"),
    ("repository-models", "ctjoint/export/triton_python/postprocess.py", "import ctjoint.v1"),
]


@pytest.mark.parametrize(("contract_id", "where", "line"), PLANTED)
def test_a_planted_violation_fails_lint_imports(
    tmp_path: Path, contract_id: str, where: str, line: str
) -> None:
    root = _package_copy(tmp_path)
    with (root / where).open("a") as handle:
        handle.write(f"\n{line}  # planted by the test\n")
    done = _lint(root)
    assert done.returncode == 1, done.stdout + done.stderr
    name = " ".join(_contract(contract_id)["name"].split())
    output = " ".join(done.stdout.split())  # lint-imports wraps long names
    assert f"{name} BROKEN" in output


def test_a_new_top_level_module_must_be_placed_in_a_layer(tmp_path: Path) -> None:
    root = _package_copy(tmp_path)
    (root / "ctjoint" / "unplaced.py").write_text('"""Planted by the test."""\n')
    done = _lint(root)
    assert done.returncode == 1
    assert "ctjoint.unplaced" in done.stdout


def test_the_repository_models_contract_forbids_everything_else_the_project_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forbidden list works as an allow-list: every third-party package that any ctjoint
    module imports, and every neutral or sibling room, is on it unless the models may use it."""
    root = _package_copy(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "ctjoint" or m.startswith("ctjoint.")]:
        monkeypatch.delitem(sys.modules, name)
    graph = grimp.build_graph("ctjoint", include_external_packages=True, cache_dir=None)
    external = {
        name
        for name in graph.modules
        if name.split(".")[0] != "ctjoint" and name not in sys.stdlib_module_names
    }
    forbidden = set(_contract("repository-models")["forbidden_modules"])
    assert sorted(external - REPOSITORY_MODELS_MAY_IMPORT - forbidden) == []
    layers = _contract("layers")["layers"]
    rooms = {
        f"ctjoint.{part.strip().strip('()')}"
        for layer in layers[1:]
        for part in layer.split(":")
        if f"ctjoint.{part.strip().strip('()')}" in graph.modules
    }
    allowed = {"ctjoint.contracts", "ctjoint.export"}
    assert sorted(rooms - allowed - forbidden) == []
