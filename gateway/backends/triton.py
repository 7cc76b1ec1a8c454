"""The Triton backend: the same models, served by a Triton Inference Server over gRPC.

Each model is called through its ensemble `<model>` (network variant + postprocessing), so the
gateway does not care whether a CPU python model, ONNX Runtime or a TensorRT engine runs
behind it. The ensemble also returns the network's logits, which the shared pipeline maps
onto the source slice grid exactly as with the embedded backend. A model's preprocessing plan
comes from the ensemble's config parameters (the same keys as the ONNX metadata).

Readiness follows Triton: `load()` waits (with backoff) until the server and every model are
ready, and a monitor keeps `ready` in step afterwards. tritonclient errors become the
project's typed errors at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from ctjoint.contracts import (
    ENSEMBLE_DIAGNOSIS_LOGITS,
    ENSEMBLE_LESION_LOGITS,
    INPUT_IMAGE,
    MODEL_NAMES,
    POST_PROBS,
)
from ctjoint.gateway.backends.base import (
    InferenceBackend,
    ModelInfo,
    ModelOutputs,
    model_info_from_metadata,
)
from ctjoint.gateway.deadlines import time_left
from ctjoint.gateway.errors import (
    BackendError,
    BackendUnavailableError,
    CtJointError,
    DeadlineExceededError,
    ModelNotFoundError,
)

log = logging.getLogger(__name__)

# How the analysis sends a 2.5D scan to Triton: small requests, many at once, so Triton's
# dynamic batcher (not the gateway) decides the batch, across slices and across scans.
REQUEST_SLICES: Final = 4
MAX_IN_FLIGHT_PER_SCAN: Final = 8
# The logits are what the pipeline needs. `probs` rides along because Triton 2.51 fails an
# ensemble request ("unexpected deadlock") whose outputs include none of the last step's.
REQUESTED_OUTPUTS: Final = (ENSEMBLE_LESION_LOGITS, ENSEMBLE_DIAGNOSIS_LOGITS, POST_PROBS)
# Checks (readiness, configs) are cheap; they get a short timeout of their own.
CHECK_TIMEOUT_S: Final = 5.0
HEALTH_INTERVAL_S: Final = 2.0
_BACKOFF_FIRST_S: Final = 0.5
_BACKOFF_MAX_S: Final = 5.0
# Status codes as tritonclient spells them in InferenceServerException.status().
_UNAVAILABLE: Final = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.CANCELLED"}
)
_DEADLINE: Final = "StatusCode.DEADLINE_EXCEEDED"
_NOT_FOUND: Final = "StatusCode.NOT_FOUND"


class TritonBackend(InferenceBackend):
    """Models served by Triton at `url` (HOST:PORT of its gRPC endpoint).

    `request_timeout_s` bounds one inference when the scan has no deadline of its own;
    `load_timeout_s` (None: wait for ever) bounds how long `load()` waits for Triton.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        models: Sequence[str] = MODEL_NAMES,
        *,
        request_timeout_s: float | None = 300.0,
        load_timeout_s: float | None = None,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        unknown = [m for m in models if m not in MODEL_NAMES]
        if unknown:
            raise ModelNotFoundError(
                f"unknown model {unknown[0]!r}; expected one of {', '.join(MODEL_NAMES)}"
            )
        if not models:
            raise ValueError("a Triton backend needs at least one model")
        if not url or url.startswith(("http://", "https://")):
            raise ValueError(f"the Triton gRPC endpoint must be HOST:PORT, got {url!r}")
        self.url = url
        self._wanted = tuple(models)
        self._request_timeout_s = request_timeout_s
        self._load_timeout_s = load_timeout_s
        self._health_interval_s = health_interval_s
        self._client: triton_aio.InferenceServerClient | None = None
        self._infos: dict[str, ModelInfo] = {}
        self._ready = False
        self._reason = f"Triton at {url} has not been reached yet; retry shortly"
        self._monitor: asyncio.Task[None] | None = None

    # --- InferenceBackend ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def unavailable_reason(self) -> str:
        return self._reason

    def models(self) -> tuple[str, ...]:
        return self._wanted

    def model_info(self, model: str) -> ModelInfo:
        info = self._infos.get(model)
        if info is None:
            if model in self._wanted:
                raise BackendUnavailableError(self._reason)
            raise ModelNotFoundError(
                f"model {model!r} is not served (served: {', '.join(self._wanted)})"
            )
        return info

    async def load(self) -> None:
        """Connect and wait until Triton and every model are ready, then keep watching."""
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.url)
        started = time.monotonic()
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                await self._check()
                break
            except BackendUnavailableError as err:
                self._reason = str(err)
                waited = time.monotonic() - started
                if self._load_timeout_s is not None and waited >= self._load_timeout_s:
                    raise
                if delay == _BACKOFF_FIRST_S:
                    log.warning("waiting for Triton: %s", err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
        log.info(
            "Triton at %s ready with %s in %.2f s",
            self.url,
            ", ".join(f"{i.name} {i.version}" for i in self._infos.values()),
            time.monotonic() - started,
        )
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch(), name="triton-health")

    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        client = self._client
        if client is None or not self._ready:
            raise BackendUnavailableError(self._reason)
        self.model_info(model)
        timeout = self._timeout()
        request = InferInput(INPUT_IMAGE, list(image.shape), "FP32")
        request.set_data_from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        outputs = [InferRequestedOutput(name) for name in REQUESTED_OUTPUTS]
        started = time.perf_counter()
        try:
            result = await client.infer(model, [request], outputs=outputs, client_timeout=timeout)
        except InferenceServerException as err:
            raise self._translate(err, f"model {model!r}") from err
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        seg = result.as_numpy(ENSEMBLE_LESION_LOGITS)
        cls = result.as_numpy(ENSEMBLE_DIAGNOSIS_LOGITS)
        if seg is None or cls is None:
            raise BackendError(
                f"model {model!r}: Triton's answer lacks {ENSEMBLE_LESION_LOGITS!r} or "
                f"{ENSEMBLE_DIAGNOSIS_LOGITS!r}"
            )
        # model_ms is this request's round trip (queueing and batching included).
        return ModelOutputs(seg_logits=seg, cls_logits=cls, model_ms=elapsed_ms)

    async def close(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        client, self._client = self._client, None
        self._ready = False
        self._reason = "the Triton backend is closed"
        if client is not None:
            await client.close()

    # --- internals ----------------------------------------------------------------------------

    def _timeout(self) -> float | None:
        left = time_left()
        if left is None:
            return self._request_timeout_s
        if left <= 0:
            raise DeadlineExceededError("the scan's deadline passed before inference")
        if self._request_timeout_s is None:
            return left
        return min(left, self._request_timeout_s)

    async def _check(self) -> None:
        """Server and models ready; model infos read from the ensembles' configs."""
        client = self._client
        if client is None:
            raise BackendUnavailableError("the Triton backend is closed")
        try:
            if not await client.is_server_ready(client_timeout=CHECK_TIMEOUT_S):
                raise BackendUnavailableError(f"Triton at {self.url} is not ready")
            infos: dict[str, ModelInfo] = {}
            for model in self._wanted:
                if not await client.is_model_ready(model, client_timeout=CHECK_TIMEOUT_S):
                    raise BackendUnavailableError(
                        f"Triton at {self.url} does not have model {model!r} ready"
                    )
                response = await client.get_model_config(
                    model, as_json=True, client_timeout=CHECK_TIMEOUT_S
                )
                infos[model] = self._info_from_config(model, response)
        except InferenceServerException as err:
            self._ready = False
            raise self._translate(err, "readiness check") from err
        except BackendUnavailableError:
            self._ready = False
            raise
        self._infos = infos
        self._ready = True
        self._reason = ""

    def _info_from_config(self, model: str, response: dict[str, Any]) -> ModelInfo:
        config = response.get("config", {})
        parameters = {
            key: value.get("string_value", "")
            for key, value in config.get("parameters", {}).items()
        }
        source = f"Triton model {model!r} at {self.url}"
        inputs = {i["name"]: i for i in config.get("input", [])}
        if INPUT_IMAGE not in inputs:
            raise BackendError(f"{source}: no input {INPUT_IMAGE!r}")
        dims = [-1, *(int(d) for d in inputs[INPUT_IMAGE].get("dims", []))]
        info = model_info_from_metadata(model, parameters, source=source, input_shape=dims)
        return ModelInfo(
            name=info.name,
            version=info.version,
            plan=info.plan,
            classes=info.classes,
            seg_classes=info.seg_classes,
            input_shape=info.input_shape,
            trained_on=info.trained_on,
            max_batch_size=int(config.get("max_batch_size", 0)),
        )

    async def _watch(self) -> None:
        """Keep `ready` in step with Triton, logging each change once."""
        while True:
            await asyncio.sleep(self._health_interval_s)
            was_ready = self._ready
            try:
                await self._check()
            except CtJointError as err:
                self._reason = str(err)
                if was_ready:
                    log.warning("Triton is no longer ready: %s", err)
                continue
            if not was_ready:
                log.info("Triton at %s is ready again", self.url)

    def _translate(self, err: InferenceServerException, what: str) -> CtJointError:
        status = err.status() or ""
        message = err.message() or str(err)
        if status == _DEADLINE:
            return DeadlineExceededError(f"{what}: Triton did not answer in time ({message})")
        if status in _UNAVAILABLE:
            self._ready = False
            self._reason = f"Triton at {self.url} is unavailable: {message}"
            return BackendUnavailableError(f"{what}: {self._reason}")
        if status == _NOT_FOUND:
            return ModelNotFoundError(f"{what}: Triton at {self.url}: {message}")
        return BackendError(f"{what}: Triton at {self.url} failed: {message}")


__all__ = ["MAX_IN_FLIGHT_PER_SCAN", "REQUEST_SLICES", "TritonBackend"]
