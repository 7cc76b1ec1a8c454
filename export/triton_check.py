"""`ctjoint export repository --check DIR`: does a Triton repository agree with the models?

Triton reports most of these mismatches only when a model loads on the server, and some (an
engine output without a config, an ensemble tensor nobody produces) only on the GPU box. This
reads what is on disk instead, on any machine: every `config.pbtxt` against the exported ONNX
graph it serves (names, data types, dimensions with the batch axis; a TensorRT engine has one
output per graph output), every python-backend model against the tensors its source reads
and writes, and every ensemble step against the models it names.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from google.protobuf import text_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2

from ctjoint import contracts
from ctjoint.export.errors import RepositoryCheckError

CONFIG_FILE: Final = "config.pbtxt"
# ONNX TensorProto element types and Triton's names for them.
ONNX_TO_TRITON: Final = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    16: "TYPE_BF16",
}
# Platforms and backends that run an exported network graph.
_GRAPH_PLATFORMS: Final = ("tensorrt_plan", "onnxruntime_onnx")
_GRAPH_BACKENDS: Final = ("onnxruntime", "tensorrt")
# Module-level names a python-backend source declares its tensors with.
_SOURCE_NAMES: Final = ("INPUTS", "OUTPUTS", "OPTIONAL_OUTPUTS")


@dataclass(frozen=True)
class Tensor:
    """A tensor as a config or a graph declares it; `dims` include the batch axis (-1 where
    it varies)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class CheckReport:
    """What was checked and every disagreement found (each names its file)."""

    root: Path
    models: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.root}: {len(self.models)} models consistent ({', '.join(self.models)})"
        lines = [f"{self.root}: {len(self.problems)} problem(s) in {len(self.models)} models"]
        return "\n".join([*lines, *(f"  {p}" for p in self.problems)])


def _config_tensors(config: model_config_pb2.ModelConfig, kind: str) -> dict[str, Tensor]:
    batch = (-1,) if config.max_batch_size > 0 else ()
    entries = config.input if kind == "input" else config.output
    return {
        t.name: Tensor(
            t.name, model_config_pb2.DataType.Name(t.data_type), (*batch, *(int(d) for d in t.dims))
        )
        for t in entries
    }


def graph_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Inputs and outputs of an ONNX graph (symbolic dimensions as -1)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as err:
        raise RepositoryCheckError(f"{path}: cannot read the ONNX file ({err})") from err

    def read(values: object) -> dict[str, Tensor]:
        out = {}
        for value in values:  # type: ignore[attr-defined]
            tensor_type = value.type.tensor_type
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim
            )
            data_type = ONNX_TO_TRITON.get(tensor_type.elem_type, f"ONNX:{tensor_type.elem_type}")
            out[value.name] = Tensor(value.name, data_type, dims)
        return out

    initializers = {i.name for i in proto.graph.initializer}
    inputs = read(v for v in proto.graph.input if v.name not in initializers)
    return inputs, read(proto.graph.output)


def source_tensors(path: Path) -> dict[str, tuple[str, ...]]:
    """INPUTS / OUTPUTS / OPTIONAL_OUTPUTS of a python-backend source, read without running
    it (it imports Triton's utilities, which exist only inside Triton)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError) as err:
        raise RepositoryCheckError(f"{path}: cannot read the python model ({err})") from err
    found: dict[str, tuple[str, ...]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not (isinstance(target, ast.Name) and target.id in _SOURCE_NAMES):
            continue
        if not isinstance(node.value, ast.Tuple):
            raise RepositoryCheckError(f"{path}: {target.id} must be a tuple of tensor names")
        names = []
        for element in node.value.elts:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                names.append(element.value)
            elif isinstance(element, ast.Name) and isinstance(
                getattr(contracts, element.id, None), str
            ):
                names.append(getattr(contracts, element.id))
            else:
                raise RepositoryCheckError(
                    f"{path}: {target.id} holds {ast.unparse(element)!r}, which is neither a "
                    "string nor a ctjoint.contracts constant"
                )
        found[target.id] = tuple(names)
    return found


def _compare(
    where: str, what: str, config: Mapping[str, Tensor], graph: Mapping[str, Tensor]
) -> list[str]:
    problems = []
    for name in sorted(set(graph) - set(config)):
        problems.append(f"{where}: {what} {name!r} of the graph is not configured")
    for name in sorted(set(config) - set(graph)):
        problems.append(f"{where}: configured {what} {name!r} is not in the graph")
    for name in sorted(set(config) & set(graph)):
        want, have = graph[name], config[name]
        if want.data_type != have.data_type:
            problems.append(
                f"{where}: {what} {name!r} is {have.data_type} in the config, "
                f"{want.data_type} in the graph"
            )
        if not _dims_match(have.dims, want.dims):
            problems.append(
                f"{where}: {what} {name!r} has dims {list(have.dims)} (batch axis first) in the "
                f"config, {list(want.dims)} in the graph"
            )
    return problems


def _dims_match(config: tuple[int, ...], graph: tuple[int, ...]) -> bool:
    """Equal rank, and every axis equal (-1 in the config must be -1 in the graph: a fixed
    size there would refuse other sizes; -1 in the graph must be -1 in the config)."""
    return len(config) == len(graph) and all(c == g for c, g in zip(config, graph, strict=True))


@dataclass(frozen=True)
class _Model:
    folder: Path
    config: model_config_pb2.ModelConfig
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


def _load(folder: Path) -> _Model:
    path = folder / CONFIG_FILE
    try:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as err:
        raise RepositoryCheckError(f"{path}: not a Triton model config ({err})") from err
    return _Model(
        folder, config, _config_tensors(config, "input"), _config_tensors(config, "output")
    )


def _network_of(name: str) -> str | None:
    for model in contracts.MODEL_NAMES:
        if name.startswith(f"{model}_"):
            return model
    return None


def check_repository(
    root: Path, onnx_files: Mapping[str, Path] | None = None, *, onnx_dir: Path | None = None
) -> CheckReport:
    """Check every model under `root`. A network model is compared with the ONNX file in its
    version folder when there is one, else with `onnx_files[model]` (default:
    `<onnx_dir>/<model>.onnx`): the file its engine or session is built from."""
    if not root.is_dir():
        raise RepositoryCheckError(f"{root}: no such repository folder")
    folders = sorted(p.parent for p in root.glob(f"*/{CONFIG_FILE}"))
    if not folders:
        raise RepositoryCheckError(f"{root}: no model (no */{CONFIG_FILE})")
    models = {folder.name: _load(folder) for folder in folders}
    problems: list[str] = []
    for name, model in models.items():
        where = str(model.folder / CONFIG_FILE)
        if model.config.name != name:
            problems.append(f"{where}: names model {model.config.name!r}, folder is {name!r}")
        if model.config.platform == "ensemble":
            problems += _check_ensemble(where, model, models)
        elif model.config.backend == "python":
            problems += _check_python(where, model, onnx_files, onnx_dir)
        elif model.config.platform in _GRAPH_PLATFORMS or model.config.backend in _GRAPH_BACKENDS:
            problems += _check_graph(where, model, onnx_files, onnx_dir)
        else:
            problems.append(f"{where}: unknown platform/backend; nothing to check it against")
    return CheckReport(root, tuple(models), tuple(problems))


def _onnx_for(
    model: _Model, onnx_files: Mapping[str, Path] | None, onnx_dir: Path | None
) -> Path | str:
    """The graph a network model serves, or why there is none."""
    local = model.folder / "1" / contracts.TRITON_ONNX_FILE
    if local.is_file():
        return local
    network = _network_of(model.folder.name)
    if network is None:
        return f"{model.folder.name!r} names no known network ({', '.join(contracts.MODEL_NAMES)})"
    if onnx_files and network in onnx_files:
        path = onnx_files[network]
    else:
        path = contracts.onnx_path(network, onnx_dir)
    if not path.is_file():
        return f"no ONNX file for {network!r} at {path} (run `make onnx`)"
    return path


def _check_graph(
    where: str, model: _Model, onnx_files: Mapping[str, Path] | None, onnx_dir: Path | None
) -> list[str]:
    found = _onnx_for(model, onnx_files, onnx_dir)
    if isinstance(found, str):
        return [f"{where}: {found}"]
    graph_in, graph_out = graph_tensors(found)
    where = f"{where} vs {found.name}"
    # A TensorRT engine built from this graph has exactly its outputs, and Triton's TensorRT
    # backend wants a config for every one of them.
    return _compare(where, "input", model.inputs, graph_in) + _compare(
        where, "output", model.outputs, graph_out
    )


def _check_python(
    where: str, model: _Model, onnx_files: Mapping[str, Path] | None, onnx_dir: Path | None
) -> list[str]:
    source = model.folder / "1" / contracts.TRITON_PYTHON_FILE
    if not source.is_file():
        return [f"{where}: no python model at {source}"]
    declared = source_tensors(source)
    problems = []
    missing = [n for n in ("INPUTS", "OUTPUTS") if n not in declared]
    if missing:
        return [f"{source}: declares no {' / '.join(missing)} (the tensors it reads and writes)"]
    optional = set(declared.get("OPTIONAL_OUTPUTS", ()))
    if set(model.inputs) != set(declared["INPUTS"]):
        problems.append(
            f"{where}: inputs {sorted(model.inputs)}, but {source.name} reads "
            f"{sorted(declared['INPUTS'])}"
        )
    outputs = set(model.outputs)
    if not set(declared["OUTPUTS"]) <= outputs <= set(declared["OUTPUTS"]) | optional:
        problems.append(
            f"{where}: outputs {sorted(outputs)}, but {source.name} writes "
            f"{sorted(declared['OUTPUTS'])}"
            + (f" (optionally {sorted(optional)})" if optional else "")
        )
    # The python network model runs an ONNX file: its config must match that graph too.
    if contracts.INPUT_IMAGE in declared["INPUTS"]:
        problems += _check_graph(where, model, onnx_files, onnx_dir)
    return problems


def _check_ensemble(where: str, model: _Model, models: Mapping[str, _Model]) -> list[str]:
    problems = []
    steps = model.config.ensemble_scheduling.step
    if not steps:
        return [f"{where}: an ensemble without steps"]
    # Ensemble tensors known so far (the ensemble's inputs, then each step's outputs), with the
    # shape of whatever produces them.
    available: dict[str, Tensor] = dict(model.inputs)
    producer: dict[str, str] = {name: "the ensemble's input" for name in model.inputs}
    consumed: set[str] = set()
    for index, step in enumerate(steps):
        label = f"{where}: step {index} ({step.model_name})"
        target = models.get(step.model_name)
        if target is None:
            problems.append(f"{label}: no model {step.model_name!r} in the repository")
            continue
        if 0 < target.config.max_batch_size < model.config.max_batch_size:
            problems.append(
                f"{label}: max_batch_size {target.config.max_batch_size} is below the "
                f"ensemble's {model.config.max_batch_size}"
            )
        for name in sorted(set(target.inputs) - set(step.input_map)):
            problems.append(f"{label}: input {name!r} of {step.model_name} is not mapped")
        for model_tensor, ensemble_tensor in sorted(step.input_map.items()):
            consumed.add(ensemble_tensor)
            wanted = target.inputs.get(model_tensor)
            if wanted is None:
                problems.append(f"{label}: {step.model_name} has no input {model_tensor!r}")
                continue
            have = available.get(ensemble_tensor)
            if have is None:
                problems.append(
                    f"{label}: tensor {ensemble_tensor!r} is neither an ensemble input nor an "
                    "output of an earlier step"
                )
            elif (have.data_type, have.dims) != (wanted.data_type, wanted.dims):
                problems.append(
                    f"{label}: tensor {ensemble_tensor!r} is {have.data_type} {list(have.dims)} "
                    f"from {producer[ensemble_tensor]}, input {model_tensor!r} wants "
                    f"{wanted.data_type} {list(wanted.dims)}"
                )
        for model_tensor, ensemble_tensor in sorted(step.output_map.items()):
            produced = target.outputs.get(model_tensor)
            if produced is None:
                problems.append(f"{label}: {step.model_name} has no output {model_tensor!r}")
                continue
            if ensemble_tensor in available:
                problems.append(f"{label}: tensor {ensemble_tensor!r} is produced twice")
            available[ensemble_tensor] = Tensor(ensemble_tensor, produced.data_type, produced.dims)
            producer[ensemble_tensor] = f"step {index} ({step.model_name})"
    for name, output in sorted(model.outputs.items()):
        produced_as = available.get(name)
        if produced_as is None or name in model.inputs:
            problems.append(f"{where}: ensemble output {name!r} is produced by no step")
        elif (produced_as.data_type, produced_as.dims) != (output.data_type, output.dims):
            problems.append(
                f"{where}: ensemble output {name!r} is {output.data_type} {list(output.dims)}, "
                f"{producer[name]} produces {produced_as.data_type} {list(produced_as.dims)}"
            )
    for name in sorted(set(available) - set(model.inputs) - consumed - set(model.outputs)):
        problems.append(f"{where}: tensor {name!r} is produced but neither used nor returned")
    for name in sorted(set(model.inputs) - consumed):
        problems.append(f"{where}: ensemble input {name!r} is used by no step")
    return problems
