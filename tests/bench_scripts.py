"""Import a script of bench/ as a module, so tests can call its functions (bench/ is not a
package: its scripts are run by path)."""

from __future__ import annotations

import importlib.util
import sys
import types

from ctjoint.contracts import repo_root

BENCH = repo_root() / "bench"


def load(name: str) -> types.ModuleType:
    """bench/<name>.py as the module `ctjoint_bench_<name>`."""
    spec = importlib.util.spec_from_file_location(f"ctjoint_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
