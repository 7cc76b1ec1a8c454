"""The committed gRPC code in ctjoint/v1 is exactly what scan.proto generates today."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctjoint.contracts import repo_root

ROOT = repo_root()
GENERATED = ("scan_pb2.py", "scan_pb2.pyi", "scan_pb2_grpc.py")


def test_generated_code_is_current(tmp_path: Path) -> None:
    # Same command as `make proto`, run from a copy so the include path (and so the generated
    # import lines) match the repository layout.
    (tmp_path / "ctjoint" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "ctjoint" / "v1" / "scan.proto", tmp_path / "ctjoint" / "v1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "ctjoint/v1/scan.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "ctjoint" / "v1" / name).read_text()
        committed = (ROOT / "ctjoint" / "v1" / name).read_text()
        if fresh != committed:
            pytest.fail(f"ctjoint/v1/{name} is stale: run `make proto` and commit the result")


def test_generated_imports_are_package_qualified() -> None:
    text = (ROOT / "ctjoint" / "v1" / "scan_pb2_grpc.py").read_text()
    assert "from ctjoint.v1 import scan_pb2" in text


def test_service_has_the_three_rpcs() -> None:
    from ctjoint.v1 import scan_pb2

    service = scan_pb2.DESCRIPTOR.services_by_name["ScanService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"AnalyzeScan", "AnalyzeScanWithProgress", "GetModelInfo"}
    assert methods["AnalyzeScan"].client_streaming and not methods["AnalyzeScan"].server_streaming
    progress = methods["AnalyzeScanWithProgress"]
    assert progress.client_streaming and progress.server_streaming
    assert scan_pb2.DESCRIPTOR.package == "ctjoint.v1"
