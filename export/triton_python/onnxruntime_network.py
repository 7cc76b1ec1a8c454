"""Triton python-backend model `<model>_cpu`: the exported ONNX network run with ONNX Runtime.

The CPU Triton build has only the python backend, so this is how a CPU box serves the very
file the embedded backend runs. The requests of one dynamic batch are run as one ONNX Runtime
call (that is what batching is for) and split back into one response per request; a request
that cannot be run gets its error in its own response and the others still run. It answers
exactly the outputs its config declares: the logits always, `cam` when the config has it.

Imports only numpy, onnxruntime, Triton's utilities and the contract constants.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from ctjoint.contracts import (
    INPUT_IMAGE,
    ONNX_META_MODEL,
    OUTPUT_CAM,
    OUTPUT_CLS_LOGITS,
    OUTPUT_SEG_LOGITS,
    TRITON_ONNX_FILE,
    TRITON_PARAM_INTRA_OP_THREADS,
)

# The tensors this model reads and writes; `ctjoint export repository --check` compares them
# with the config (OPTIONAL_OUTPUTS may be absent from it).
INPUTS = (INPUT_IMAGE,)
OUTPUTS = (OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS)
OPTIONAL_OUTPUTS = (OUTPUT_CAM,)


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self._name = config["name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        path = version_dir / TRITON_ONNX_FILE
        if not path.is_file():
            raise pb_utils.TritonModelException(
                f"{self._name}: no {TRITON_ONNX_FILE} in {version_dir}; build it with "
                "`make onnx` and `ctjoint export repository`"
            )
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        input_config = pb_utils.get_input_config_by_name(config, INPUT_IMAGE)
        self._input_dtype = pb_utils.triton_string_to_numpy(input_config["data_type"])
        self._input_dims = tuple(int(d) for d in input_config["dims"])
        declared = tuple(output["name"] for output in config.get("output", []))
        if not set(OUTPUTS) <= set(declared) <= {*OUTPUTS, *OPTIONAL_OUTPUTS}:
            raise pb_utils.TritonModelException(
                f"{self._name}: the config declares outputs {list(declared)}; expected "
                f"{list(OUTPUTS)} and optionally {list(OPTIONAL_OUTPUTS)}"
            )
        self._outputs = declared
        self._output_dtypes = {
            name: pb_utils.triton_string_to_numpy(
                pb_utils.get_output_config_by_name(config, name)["data_type"]
            )
            for name in declared
        }

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get(TRITON_PARAM_INTRA_OP_THREADS, "0"))
        # One batch at a time per instance; inter-op threads would only oversubscribe cores.
        options.inter_op_num_threads = 1
        # Spinning threads would burn the cores the other instances and Triton itself need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        started = time.perf_counter()
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._check_contract(path)
        # Warm-up here rather than in the config (the CPU Triton build crashes on python-backend
        # warm-up): the first scan then does not pay for ONNX Runtime's first-run allocations.
        self._session.run(
            list(self._outputs),
            {INPUT_IMAGE: np.zeros((1, *self._input_dims), self._input_dtype)},
        )
        pb_utils.Logger.log_info(
            f"{self._name}: loaded {path.name} in {time.perf_counter() - started:.2f} s, "
            f"intra_op_threads={options.intra_op_num_threads}"
        )

    def _check_contract(self, path: Path) -> None:
        """Refuse to load a file whose tensors or model name disagree with this config."""
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if INPUT_IMAGE not in inputs or not set(self._outputs) <= outputs:
            raise pb_utils.TritonModelException(
                f"{self._name}: {path.name} does not have input {INPUT_IMAGE!r} and outputs "
                f"{list(self._outputs)}"
            )
        file_dims = tuple(d if isinstance(d, int) else -1 for d in inputs[INPUT_IMAGE][1:])
        if file_dims != self._input_dims:
            raise pb_utils.TritonModelException(
                f"{self._name}: {path.name} takes {INPUT_IMAGE} {list(file_dims)} per sample, "
                f"the config says {list(self._input_dims)}; regenerate the repository from "
                "this file (`ctjoint export repository --onnx-dir ...`)"
            )
        declared = self._session.get_modelmeta().custom_metadata_map.get(ONNX_META_MODEL)
        expected = self._name.rsplit("_", 1)[0]
        if declared is not None and declared != expected:
            raise pb_utils.TritonModelException(
                f"{self._name}: {path.name} holds model {declared!r}, not {expected!r}"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images: list[np.ndarray] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            image = pb_utils.get_input_tensor_by_name(request, INPUT_IMAGE).as_numpy()
            # Non-finite pixels mean broken preprocessing upstream; answering them would
            # return confident nonsense, and they must not poison the batch they arrived in.
            if not np.isfinite(image).all():
                responses[index] = self._error(f"{INPUT_IMAGE} contains NaN or infinite values")
                continue
            images.append(image)
            owners.append(index)
        if images:
            batch = images[0] if len(images) == 1 else np.concatenate(images)
            try:
                results = self._session.run(
                    list(self._outputs), {INPUT_IMAGE: batch.astype(self._input_dtype, copy=False)}
                )
            except Exception as err:  # ONNX Runtime raises plain Exception subclasses
                for index in owners:
                    responses[index] = self._error(f"ONNX Runtime failed: {err}")
            else:
                start = 0
                for index, image in zip(owners, images, strict=True):
                    stop = start + image.shape[0]
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor(
                                name, result[start:stop].astype(self._output_dtypes[name])
                            )
                            for name, result in zip(self._outputs, results, strict=True)
                        ]
                    )
                    start = stop
        return responses

    def _error(self, message: str) -> Any:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self._name}: {message}"))

    def finalize(self) -> None:
        self._session = None
