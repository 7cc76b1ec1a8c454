"""`ctjoint export repository`: write a Triton model repository from the typed spec.

For each model of `export/triton_spec.py`: `config.pbtxt`, a version folder `1/`, the
python-backend source as `1/model.py`, and the built artefact the platform needs (`model.onnx`
from `make onnx`, `model.plan` from `ctjoint export trt`). `--configs-only` writes just what
is committed under `model_repository/` (configs and python sources, no built artefacts).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ctjoint import contracts
from ctjoint.export.triton_spec import (
    PYTHON_SOURCES,
    GpuEngine,
    ModelFacts,
    ModelSpec,
    SpecError,
    Target,
    repository_specs,
)

CONFIG_FILE: Final = "config.pbtxt"
VERSION: Final = "1"
# Git keeps no empty folder, and an ensemble's (empty) version folder must exist to load.
KEEP_FILE: Final = ".gitkeep"


def default_engine_dir() -> Path:
    """Where `ctjoint export trt` writes engines: <repo>/build/trt."""
    return contracts.repo_root() / "build" / "trt"


def engine_path(model: str, engine_dir: Path | None = None) -> Path:
    """The engine the repository takes for a model (the precision chosen at build time)."""
    return (engine_dir or default_engine_dir()) / f"{model}.plan"


@dataclass(frozen=True)
class RepositoryReport:
    """What was written."""

    root: Path
    target: str
    models: tuple[str, ...]
    artefacts: tuple[Path, ...]

    def summary(self) -> str:
        lines = [f"wrote {len(self.models)} models for target {self.target} to {self.root}"]
        lines += [f"  {name}" for name in self.models]
        if self.artefacts:
            lines.append(f"  copied {len(self.artefacts)} built artefacts")
        return "\n".join(lines)


def facts_for(
    models: tuple[str, ...], *, onnx_dir: Path | None, config_name: str
) -> dict[str, ModelFacts]:
    """Model facts from the ONNX files when there are any, else from the named configuration."""
    facts: dict[str, ModelFacts] = {}
    for model in models:
        if onnx_dir is None:
            facts[model] = ModelFacts.from_config(model, config_name)
            continue
        path = contracts.onnx_path(model, onnx_dir)
        if not path.is_file():
            raise SpecError(
                f"model {model!r}: no ONNX file at {path}; build it with `make onnx` or "
                f"`ctjoint export onnx --model {model}`"
            )
        found = ModelFacts.from_onnx(path)
        if found.model != model:
            raise SpecError(f"{path}: holds model {found.model!r}, not {model!r}")
        facts[model] = found
    return facts


def write_repository(
    out: Path,
    *,
    target: Target,
    models: tuple[str, ...] = contracts.MODEL_NAMES,
    onnx_dir: Path | None = None,
    engine_dir: Path | None = None,
    config_name: str = "tiny",
    configs_only: bool = False,
    gpu_engine: GpuEngine = "trt",
) -> RepositoryReport:
    """Write (or refresh) a repository for `target` under `out`.

    Shapes, version and plan come from the ONNX files in `onnx_dir` (default: build/onnx)
    unless `configs_only`, which takes them from `config_name` and copies no artefact.
    """
    if configs_only:
        facts = facts_for(models, onnx_dir=None, config_name=config_name)
    else:
        facts = facts_for(
            models, onnx_dir=onnx_dir or contracts.default_model_dir(), config_name=config_name
        )
    specs = repository_specs(target, facts, gpu_engine=gpu_engine)
    out.mkdir(parents=True, exist_ok=True)
    for relative, text in committed_files(specs).items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        _write_text(out / relative, text)
    copied: list[Path] = []
    if not configs_only:
        for spec in specs:
            if spec.artefact is not None:
                copied.append(
                    _copy_artefact(
                        spec,
                        _model_of(spec, facts),
                        out / spec.name / VERSION,
                        onnx_dir=onnx_dir,
                        engine_dir=engine_dir,
                    )
                )
    return RepositoryReport(out, target, tuple(s.name for s in specs), tuple(copied))


def generated_files(
    target: Target, *, config_name: str = "tiny", models: tuple[str, ...] = contracts.MODEL_NAMES
) -> dict[Path, str]:
    """The committed files of a repository (relative path -> text), generated in memory."""
    facts = facts_for(models, onnx_dir=None, config_name=config_name)
    return committed_files(repository_specs(target, facts))


def committed_files(specs: tuple[ModelSpec, ...]) -> dict[Path, str]:
    """Configs, python sources and ensemble placeholders of `specs` (no built artefact)."""
    files: dict[Path, str] = {}
    for spec in specs:
        folder = Path(spec.name)
        files[folder / CONFIG_FILE] = spec.to_pbtxt()
        if spec.python_source is not None:
            files[folder / VERSION / contracts.TRITON_PYTHON_FILE] = (
                PYTHON_SOURCES / spec.python_source
            ).read_text()
        if spec.is_ensemble:
            files[folder / VERSION / KEEP_FILE] = ""
    return files


def _model_of(spec: ModelSpec, facts: Mapping[str, ModelFacts]) -> str:
    for model in facts:
        if spec.name.startswith(f"{model}_"):
            return model
    raise SpecError(f"model {spec.name!r} belongs to no network")


def _copy_artefact(
    spec: ModelSpec,
    model: str,
    version_dir: Path,
    *,
    onnx_dir: Path | None,
    engine_dir: Path | None,
) -> Path:
    if spec.artefact == "onnx":
        source = contracts.onnx_path(model, onnx_dir)
        target = version_dir / contracts.TRITON_ONNX_FILE
        hint = "`make onnx`"
    else:
        source = engine_path(model, engine_dir)
        target = version_dir / contracts.TRITON_PLAN_FILE
        hint = f"`ctjoint export trt --model {model}` on the GPU machine"
    if not source.is_file():
        raise SpecError(f"model {spec.name!r}: {source} is missing; build it with {hint}")
    # A network model (trt, onnx) has no committed file in its version folder to create it.
    version_dir.mkdir(parents=True, exist_ok=True)
    # Copied beside the target, then renamed: a running Triton never sees half a file.
    with tempfile.NamedTemporaryFile(dir=version_dir, suffix=".tmp", delete=False) as handle:
        temp = Path(handle.name)
    shutil.copyfile(source, temp)
    os.replace(temp, target)
    return target


def _write_text(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return  # unchanged: keep the timestamp, so make and Triton's polling see no change
    path.write_text(text)
