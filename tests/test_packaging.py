"""The distribution maps every room under `ctjoint` and keeps the client light."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from ctjoint.contracts import repo_root

ROOT = repo_root()
ROOMS = {
    "ctjoint": "ctjoint",
    "ctjoint.gateway": "gateway",
    "ctjoint.client": "client",
    "ctjoint.export": "export",
}

# A finder that makes the heavy packages unimportable, as on a scanner-side install.
BLOCK_HEAVY = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'onnxruntime', 'onnx', 'tritonclient', 'scipy'}:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in ROOMS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed


def test_client_extra_has_no_heavy_dependency() -> None:
    client = " ".join(_pyproject()["project"]["optional-dependencies"]["client"])
    for heavy in ("torch", "onnxruntime", "tritonclient", "tensorrt"):
        assert heavy not in client


@pytest.mark.timeout(300)
def test_wheel_has_no_bare_generic_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("ctjoint-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"ctjoint"}


def test_cli_import_pulls_in_no_heavy_package() -> None:
    code = BLOCK_HEAVY + "import ctjoint.cli\nctjoint.cli.app\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_render_imports_without_heavy_packages() -> None:
    code = BLOCK_HEAVY + "import ctjoint.client.render\n"
    subprocess.run([sys.executable, "-c", code], check=True)


# Only torch is blocked: the serving side runs ONNX Runtime, never PyTorch.
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def test_serving_and_the_demo_import_without_torch() -> None:
    modules = [
        "ctjoint.cli",
        "ctjoint.demo",
        "ctjoint.gateway.server",
        "ctjoint.gateway.backends.embedded",
        "ctjoint.gateway.backends.triton",
        "ctjoint.export.phantom",
        "ctjoint.export.bundled",
        "ctjoint.export.triton_check",
        "ctjoint.export.engine_cache",
        "ctjoint.export.tensorrt_build",
    ]
    code = (
        BLOCK_TORCH
        + "".join(f"import {m}\n" for m in modules)
        + (
            "from ctjoint.export.bundled import bundled_onnx\n"
            "assert all(bundled_onnx(m).is_file() for m in ('jcs2d', 'deepsc3d'))\n"
        )
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_serving_extra_pulls_torch() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra in ("client", "gateway", "demo", "tensorrt"):
        assert not [r for r in extras[extra] if r.startswith("torch")], extra
