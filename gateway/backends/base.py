"""The one interface every inference backend implements (embedded ONNX Runtime, Triton).

The analysis and the gRPC service only see `InferenceBackend`: they ask for a model's
`ModelInfo` (its preprocessing plan travels with the model) and send batches of the contract
input `image`, getting back the contract outputs `seg_logits` and `cls_logits`.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ctjoint.contracts import (
    CLASS_NAMES,
    INPUT_IMAGE,
    ONNX_META_CLASSES,
    ONNX_META_MODEL,
    ONNX_META_PLAN,
    ONNX_META_SEG_CLASSES,
    ONNX_META_TEMPERATURE,
    ONNX_META_TRAINED_ON,
    ONNX_META_VERSION,
    SEG_CLASS_NAMES,
)
from ctjoint.gateway.errors import BackendError
from ctjoint.gateway.preprocess import PreprocessPlan


@dataclass(frozen=True)
class Temperature:
    """Logit temperatures of a model's two heads (classification, segmentation).

    Fitted on the validation split after training and stored with the model, so the
    probabilities a backend reports are calibrated the same way whichever backend runs it.
    """

    cls: float = 1.0
    seg: float = 1.0

    def __post_init__(self) -> None:
        for name in ("cls", "seg"):
            value = float(getattr(self, name))
            if not value > 0 or value != value or value == float("inf"):
                raise ValueError(f"temperature {name} must be a positive number, got {value}")
            object.__setattr__(self, name, value)

    def to_json(self) -> str:
        return json.dumps({"cls": self.cls, "seg": self.seg}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Temperature:
        """Parse metadata; absent or empty means an uncalibrated model (1, 1)."""
        if not text:
            return cls()
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("temperature metadata must be a JSON object")
        return cls(cls=float(data.get("cls", 1.0)), seg=float(data.get("seg", 1.0)))

    def apply(self, outputs: ModelOutputs) -> ModelOutputs:
        """The outputs with both heads' logits divided by their temperatures."""
        if self.cls == 1.0 and self.seg == 1.0:
            return outputs
        return ModelOutputs(
            seg_logits=outputs.seg_logits / np.float32(self.seg),
            cls_logits=outputs.cls_logits / np.float32(self.cls),
            model_ms=outputs.model_ms,
            cam=outputs.cam,
        )


@dataclass(frozen=True)
class ModelInfo:
    """What a served model is and what it expects. `input_shape` uses -1 for dynamic axes."""

    name: str
    version: str
    plan: PreprocessPlan
    classes: tuple[str, ...] = CLASS_NAMES
    seg_classes: tuple[str, ...] = SEG_CLASS_NAMES
    input_shape: tuple[int, ...] = ()
    trained_on: str = ""
    max_batch_size: int = 0  # 0: no limit known to the backend
    temperature: Temperature = Temperature()
    # SHA-256 of the served weights file (hex) where the backend reads it; "" where it cannot
    # (a remote Triton). SEG and SR name it beside the model's name and version.
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "seg_classes", tuple(self.seg_classes))
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        if not self.input_shape:
            object.__setattr__(self, "input_shape", expected_input_shape(self.plan))

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.plan.kind,
            "classes": list(self.classes),
            "seg_classes": list(self.seg_classes),
            "input_shape": list(self.input_shape),
            "trained_on": self.trained_on,
        }


@dataclass(frozen=True, eq=False)
class ModelOutputs:
    """One batch's outputs: `seg_logits` [B,K,H,W] or [B,K,D,H,W], `cls_logits` [B,3] (float32).

    `model_ms` is the time the backend spent running the model (not queueing or transport).
    """

    seg_logits: np.ndarray
    cls_logits: np.ndarray
    model_ms: float = 0.0
    # Optional `cam` [B, 3, h, w] or [B, 3, d, h, w] (contracts.OUTPUT_CAM); None when the model
    # or the backend does not provide it.
    cam: np.ndarray | None = None

    def __post_init__(self) -> None:
        seg = np.asarray(self.seg_logits, dtype=np.float32)
        cls = np.asarray(self.cls_logits, dtype=np.float32)
        if seg.ndim not in (4, 5) or cls.ndim != 2 or seg.shape[0] != cls.shape[0]:
            raise ValueError(
                f"seg_logits {seg.shape} and cls_logits {cls.shape} break the output contract"
            )
        object.__setattr__(self, "seg_logits", seg)
        object.__setattr__(self, "cls_logits", cls)
        object.__setattr__(self, "model_ms", float(self.model_ms))
        if self.cam is not None:
            cam = np.asarray(self.cam, dtype=np.float32)
            if cam.ndim != seg.ndim or cam.shape[:2] != (seg.shape[0], cls.shape[1]):
                raise ValueError(f"cam {cam.shape} does not match seg_logits {seg.shape}")
            object.__setattr__(self, "cam", cam)


def expected_input_shape(plan: PreprocessPlan) -> tuple[int, ...]:
    """The contract shape of `image` for a plan, batch axis dynamic (-1)."""
    return plan.preprocessor().input_shape(-1)


class InferenceBackend(abc.ABC):
    """Runs exported models. Async so the gateway's event loop never blocks on inference.

    Life cycle: `await load()` (then `ready` is true), any number of concurrent `infer` calls,
    `await close()`. Errors are the project's own: ModelNotFoundError, BackendUnavailableError,
    BackendError.
    """

    name: str

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once models are loaded and requests can be served."""

    @property
    def unavailable_reason(self) -> str:
        """Why the backend is not ready: the message clients get with UNAVAILABLE."""
        return "the inference backend is not ready yet; retry shortly"

    @abc.abstractmethod
    async def load(self) -> None:
        """Load (or connect to) the models; raises if none can be served."""

    @abc.abstractmethod
    def models(self) -> tuple[str, ...]:
        """Names of the models this backend serves."""

    @abc.abstractmethod
    def model_info(self, model: str) -> ModelInfo:
        """What `model` is and expects; ModelNotFoundError if it is not served."""

    @abc.abstractmethod
    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        """Run one batch of the contract input `image` (float32) through `model`."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release sessions, threads and connections; the backend is not ready afterwards."""

    async def __aenter__(self) -> InferenceBackend:
        await self.load()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def model_info_from_metadata(
    model: str, metadata: Mapping[str, str], *, source: str, input_shape: Sequence[int] = ()
) -> ModelInfo:
    """Build `ModelInfo` from an exported model's metadata (contracts.ONNX_META_* keys).

    Refuses a model whose metadata is missing or disagrees with the contracts: serving it with
    a guessed preprocessing plan would give confident nonsense.
    """
    plan_text = metadata.get(ONNX_META_PLAN)
    if not plan_text:
        raise BackendError(
            f"{source}: metadata {ONNX_META_PLAN!r} is missing; re-export the model with "
            "`ctjoint export onnx`"
        )
    try:
        plan = PreprocessPlan.from_json(plan_text)
    except (ValueError, TypeError) as err:
        raise BackendError(f"{source}: metadata {ONNX_META_PLAN!r} is not a valid plan") from err
    declared = metadata.get(ONNX_META_MODEL, model)
    if declared != model or plan.model != model:
        raise BackendError(f"{source}: the file holds model {declared!r}, not {model!r}")
    classes = _name_list(metadata.get(ONNX_META_CLASSES), CLASS_NAMES)
    seg_classes = _name_list(metadata.get(ONNX_META_SEG_CLASSES), SEG_CLASS_NAMES)
    if classes != CLASS_NAMES or seg_classes != SEG_CLASS_NAMES:
        raise BackendError(
            f"{source}: classes {list(classes)} / {list(seg_classes)} differ from the contract "
            f"{list(CLASS_NAMES)} / {list(SEG_CLASS_NAMES)}"
        )
    try:
        temperature = Temperature.from_json(metadata.get(ONNX_META_TEMPERATURE))
    except (ValueError, TypeError) as err:
        raise BackendError(
            f"{source}: metadata {ONNX_META_TEMPERATURE!r} is invalid: {err}"
        ) from err
    expected = expected_input_shape(plan)
    shape = tuple(int(v) for v in input_shape) or expected
    if len(shape) != len(expected) or any(
        s != e for s, e in zip(shape[1:], expected[1:], strict=True) if s > 0
    ):
        raise BackendError(
            f"{source}: input {INPUT_IMAGE!r} has shape {list(shape)}, the plan needs "
            f"{list(expected)}"
        )
    return ModelInfo(
        name=model,
        version=metadata.get(ONNX_META_VERSION, "") or "unversioned",
        plan=plan,
        classes=classes,
        seg_classes=seg_classes,
        input_shape=expected,
        trained_on=metadata.get(ONNX_META_TRAINED_ON, ""),
        temperature=temperature,
    )


def _name_list(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """Class names stored as a JSON list or a comma-separated string."""
    if not text:
        return default
    try:
        value = json.loads(text)
    except ValueError:
        value = text.split(",")
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(v).strip() for v in value)
