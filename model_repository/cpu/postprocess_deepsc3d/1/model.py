"""Triton python-backend model `postprocess_<model>`: a joint network's logits become a uint8
label mask and lesion pixel counts per slice and lesion class.

No class probabilities here: the ensemble returns the logits, and the gateway (or any client)
divides them by the model's temperature and takes the one softmax (gateway/aggregate.py), so
calibration lives in one place for every backend.

Runs inside Triton's python stub: imports only numpy, Triton's utilities and the contract
constants. The config is read once in `initialize`; every request gets exactly one response,
and a request that cannot be processed gets its error in its own response, so one bad request
never fails the others the dynamic batcher put beside it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ctjoint.contracts import (
    CLASS_NAMES,
    LESION_CLASS_NAMES,
    OUTPUT_CLS_LOGITS,
    OUTPUT_SEG_LOGITS,
    POST_LESION_AREA,
    POST_MASK,
    SEG_CLASS_NAMES,
)

# The tensors this model reads and writes; `ctjoint export repository --check` compares them
# with the config.
INPUTS = (OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS)
OUTPUTS = (POST_MASK, POST_LESION_AREA)

# Label values of the lesion classes in the mask, in LESION_CLASS_NAMES order.
LESION_VALUES = tuple(SEG_CLASS_NAMES.index(name) for name in LESION_CLASS_NAMES)


def label_mask(seg_logits: np.ndarray) -> np.ndarray:
    """[B, K, *grid] logits -> [B, *grid] label map (argmax over the class axis)."""
    return np.argmax(seg_logits, axis=1).astype(np.uint8)


def lesion_area(mask: np.ndarray) -> np.ndarray:
    """[B, *grid] label map -> [B, *grid[:-2], L] pixel counts per slice and lesion class."""
    counts = [np.count_nonzero(mask == value, axis=(-2, -1)) for value in LESION_VALUES]
    return np.stack(counts, axis=-1).astype(np.int64)


class RequestError(ValueError):
    """What is wrong with one request (answered in that request's own response)."""


class TritonPythonModel:
    """Logits in, mask and lesion counts out."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self._model_name = config["name"]
        seg_config = pb_utils.get_input_config_by_name(config, OUTPUT_SEG_LOGITS)
        cls_config = pb_utils.get_input_config_by_name(config, OUTPUT_CLS_LOGITS)
        if seg_config is None or cls_config is None:
            raise pb_utils.TritonModelException(
                f"{self._model_name}: inputs {OUTPUT_SEG_LOGITS!r} and {OUTPUT_CLS_LOGITS!r} "
                "are required"
            )
        seg_dims = tuple(int(d) for d in seg_config["dims"])
        cls_dims = tuple(int(d) for d in cls_config["dims"])
        if seg_dims[0] != len(SEG_CLASS_NAMES) or cls_dims != (len(CLASS_NAMES),):
            raise pb_utils.TritonModelException(
                f"{self._model_name}: input dims {list(seg_dims)} / {list(cls_dims)} do not "
                f"match {len(SEG_CLASS_NAMES)} segmentation and {len(CLASS_NAMES)} classes"
            )
        declared = (
            {i["name"] for i in config.get("input", [])},
            {o["name"] for o in config.get("output", [])},
        )
        if declared != (set(INPUTS), set(OUTPUTS)):
            raise pb_utils.TritonModelException(
                f"{self._model_name}: the config declares inputs {sorted(declared[0])} and "
                f"outputs {sorted(declared[1])}; expected {list(INPUTS)} and {list(OUTPUTS)}"
            )
        self._dtypes = {}
        for name in OUTPUTS:
            output = pb_utils.get_output_config_by_name(config, name)
            if output is None:
                raise pb_utils.TritonModelException(f"{self._model_name}: output {name!r}")
            self._dtypes[name] = pb_utils.triton_string_to_numpy(output["data_type"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                tensors = self._process(request)
            except RequestError as err:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self._model_name}: {err}")
                    )
                )
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def _process(self, request: Any) -> list[Any]:
        seg = pb_utils.get_input_tensor_by_name(request, OUTPUT_SEG_LOGITS).as_numpy()
        cls = pb_utils.get_input_tensor_by_name(request, OUTPUT_CLS_LOGITS).as_numpy()
        if seg.shape[0] != cls.shape[0]:
            raise RequestError(
                f"{OUTPUT_SEG_LOGITS} has {seg.shape[0]} samples, {OUTPUT_CLS_LOGITS} "
                f"{cls.shape[0]}"
            )
        # A NaN would silently become class 0 under argmax: refuse it instead.
        if not (np.isfinite(cls).all() and np.isfinite(seg).all()):
            raise RequestError("logits contain NaN or infinite values")
        mask = label_mask(seg)
        return [
            pb_utils.Tensor(POST_MASK, mask.astype(self._dtypes[POST_MASK])),
            pb_utils.Tensor(
                POST_LESION_AREA, lesion_area(mask).astype(self._dtypes[POST_LESION_AREA])
            ),
        ]

    def finalize(self) -> None:
        self._dtypes = {}
