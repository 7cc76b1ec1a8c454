"""The embedded backend: exported ONNX models run in-process with ONNX Runtime (CPU).

The default when no Triton server is configured, so the whole product runs on a laptop.
Sessions run in a small thread pool of their own, so the event loop stays free while a batch
is computed, and ONNX Runtime's own thread count is set explicitly (the machine is shared).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ctjoint.contracts import (
    INPUT_IMAGE,
    MODEL_NAMES,
    OUTPUT_CAM,
    OUTPUT_CLS_LOGITS,
    OUTPUT_SEG_LOGITS,
    default_model_dir,
    onnx_path,
)
from ctjoint.gateway.backends.base import (
    InferenceBackend,
    ModelInfo,
    ModelOutputs,
    model_info_from_metadata,
)
from ctjoint.gateway.errors import BackendError, BackendUnavailableError, ModelNotFoundError

logger = logging.getLogger(__name__)


class EmbeddedBackend(InferenceBackend):
    """ONNX Runtime sessions, one per model, loaded from `contracts.onnx_path(model, model_dir)`.

    `intra_op_threads` bounds ONNX Runtime's threads per inference (None: its default, all
    cores); `workers` bounds how many batches run at once (1 keeps a small box from
    oversubscribing; more helps only with cores to spare). With `skip_missing`, models whose
    ONNX file is absent are left out (logged) as long as one model loads.
    """

    name = "embedded-onnxruntime"

    def __init__(
        self,
        models: Sequence[str] = MODEL_NAMES,
        *,
        model_dir: Path | None = None,
        intra_op_threads: int | None = None,
        workers: int = 1,
        skip_missing: bool = False,
    ) -> None:
        unknown = [m for m in models if m not in MODEL_NAMES]
        if unknown:
            raise ModelNotFoundError(
                f"unknown model {unknown[0]!r}; expected one of {', '.join(MODEL_NAMES)}"
            )
        if not models:
            raise ValueError("an embedded backend needs at least one model")
        self._wanted = tuple(models)
        self._model_dir = model_dir or default_model_dir()
        self._intra_op_threads = intra_op_threads
        self._workers = max(1, workers)
        self._skip_missing = skip_missing
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._infos: dict[str, ModelInfo] = {}
        self._executor: ThreadPoolExecutor | None = None

    @property
    def ready(self) -> bool:
        return self._executor is not None and bool(self._sessions)

    def models(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    async def load(self) -> None:
        if self.ready:
            return
        executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="onnxrt")
        loop = asyncio.get_running_loop()
        missing: list[ModelNotFoundError] = []
        try:
            for model in self._wanted:
                try:
                    session, info = await loop.run_in_executor(executor, self._load_one, model)
                except ModelNotFoundError as err:
                    if not self._skip_missing:
                        raise
                    logger.warning("%s; serving the other models", err)
                    missing.append(err)
                    continue
                self._sessions[model] = session
                self._infos[model] = info
            if not self._sessions:
                raise missing[0]
        except BaseException:
            executor.shutdown(wait=False)
            self._sessions.clear()
            self._infos.clear()
            raise
        self._executor = executor

    def model_info(self, model: str) -> ModelInfo:
        info = self._infos.get(model)
        if info is None:
            raise self._not_loaded(model)
        return info

    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        executor = self._executor
        if executor is None:
            raise BackendUnavailableError("the embedded backend is not loaded")
        session = self._sessions.get(model)
        if session is None:
            raise self._not_loaded(model)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._run, model, session, image)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        self._sessions.clear()
        self._infos.clear()
        if executor is not None:
            # Waiting in a thread lets a batch in flight finish without blocking the loop.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    def _not_loaded(self, model: str) -> ModelNotFoundError:
        served = ", ".join(self._infos) or "none"
        return ModelNotFoundError(f"model {model!r} is not loaded (served: {served})")

    # --- in the executor ---------------------------------------------------------------------

    def _load_one(self, model: str) -> tuple[ort.InferenceSession, ModelInfo]:
        path = onnx_path(model, self._model_dir)
        if not path.is_file():
            raise ModelNotFoundError(
                f"model {model!r}: no ONNX file at {path}; build it with `make onnx` or "
                f"`ctjoint export onnx --model {model}` (or pass --model-dir)"
            )
        options = ort.SessionOptions()
        if self._intra_op_threads is not None:
            options.intra_op_num_threads = self._intra_op_threads
        # One batch at a time per session: inter-op parallelism only adds threads here.
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle ONNX Runtime workers spin by default, stealing the cores that preprocessing and
        # postprocessing (numpy, same process) need between batches; on a small box that
        # costs more than the wake-up latency it saves.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        started = time.perf_counter()
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:
            # onnxruntime's exceptions derive from Exception only (InvalidProtobuf, Fail, ...).
            raise BackendError(
                f"model {model!r}: ONNX Runtime cannot load {path.name} ({type(err).__name__})"
            ) from err
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = {OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS} - outputs
        if INPUT_IMAGE not in inputs or missing:
            raise BackendError(
                f"model {model!r}: {path.name} does not follow the tensor contract (input "
                f"{INPUT_IMAGE!r}, outputs {OUTPUT_SEG_LOGITS!r}, {OUTPUT_CLS_LOGITS!r})"
            )
        shape = [d if isinstance(d, int) else -1 for d in inputs[INPUT_IMAGE].shape]
        metadata = session.get_modelmeta().custom_metadata_map
        info = model_info_from_metadata(model, metadata, source=path.name, input_shape=shape)
        info = dataclasses.replace(info, weights_sha256=_file_sha256(path))
        logger.info(
            "loaded %s version %s from %s in %.0f ms",
            model,
            info.version,
            path.name,
            (time.perf_counter() - started) * 1000.0,
        )
        return session, info

    def _run(self, model: str, session: ort.InferenceSession, image: np.ndarray) -> ModelOutputs:
        info = self._infos[model]
        expected = info.input_shape
        if image.dtype != np.float32 or image.ndim != len(expected):
            raise BackendError(
                f"model {model!r}: input must be float32 of rank {len(expected)}, got "
                f"{image.dtype} {list(image.shape)}"
            )
        if any(e > 0 and s != e for s, e in zip(image.shape, expected, strict=True)):
            raise BackendError(
                f"model {model!r}: input shape {list(image.shape)} does not match {list(expected)}"
            )
        # The class activation map is optional: models exported before it have no such output.
        names = [OUTPUT_SEG_LOGITS, OUTPUT_CLS_LOGITS]
        if OUTPUT_CAM in {o.name for o in session.get_outputs()}:
            names.append(OUTPUT_CAM)
        started = time.perf_counter()
        try:
            seg, cls, *cam = session.run(names, {INPUT_IMAGE: np.ascontiguousarray(image)})
        except Exception as err:
            raise BackendError(
                f"model {model!r}: inference failed ({type(err).__name__}: {err})"
            ) from err
        elapsed = (time.perf_counter() - started) * 1000.0
        outputs = ModelOutputs(
            seg_logits=seg, cls_logits=cls, model_ms=elapsed, cam=cam[0] if cam else None
        )
        return info.temperature.apply(outputs)


def _file_sha256(path: Path) -> str:
    """The weights file's SHA-256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
