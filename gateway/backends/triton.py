"""The Triton backend: the same models, served by a Triton Inference Server over gRPC.

Each model is called through its ensemble `<model>` (network variant + postprocessing), so the
gateway does not care whether a CPU python model, ONNX Runtime or a TensorRT engine runs
behind it. The ensemble also returns the network's logits, which the shared pipeline maps
onto the source slice grid exactly as with the embedded backend. A model's preprocessing plan
comes from the ensemble's config parameters (the same keys as the ONNX metadata).

Several Triton replicas may stand behind one backend (see replicas.py): each request goes to
the healthy replica with the fewest requests in flight; a replica that fails its health check
or answers UNAVAILABLE is ejected and probed again later, and the request is re-sent to
another replica (inference is idempotent), so a scan survives a dying replica. A replica
whose python-backend stub died (READY to health checks, failing every inference) is ejected
the same way and comes back only after a test inference passes. With no healthy replica a
request waits briefly for one, then fails UNAVAILABLE well before its deadline. Readiness
follows Triton: `load()` waits (with backoff) until one replica has every model ready, and a
monitor keeps `ready` in step afterwards. tritonclient errors become the project's typed
errors at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
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
    OUTPUT_CAM,
    POST_LESION_AREA,
)
from ctjoint.gateway.backends.base import (
    InferenceBackend,
    ModelInfo,
    ModelOutputs,
    model_info_from_metadata,
)
from ctjoint.gateway.backends.replicas import (
    PROBE_FIRST_S,
    PROBE_MAX_S,
    Replica,
    ReplicaChange,
    ReplicaPool,
    ReplicaStats,
    parse_endpoints,
    resolve,
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
# The logits are what the pipeline needs: the gateway divides them by the model's temperature
# and takes the one softmax, as with the embedded backend (the ensemble computes none).
# `lesion_area` (a few integers per slice) rides along because Triton 2.51 fails an ensemble
# request ("unexpected deadlock") whose outputs include none of the last step's.
REQUESTED_OUTPUTS: Final = (ENSEMBLE_LESION_LOGITS, ENSEMBLE_DIAGNOSIS_LOGITS, POST_LESION_AREA)
# Requested too where the ensemble's config declares it (models exported with a `cam` output):
# the class activation map, exactly as the embedded backend returns it.
OPTIONAL_OUTPUTS: Final = (OUTPUT_CAM,)
# Checks (readiness, configs) are cheap; they get a short timeout of their own.
CHECK_TIMEOUT_S: Final = 5.0
# A dead Triton is noticed within this (plus a probe) even with no scan running, so health
# turns NOT_SERVING within ~1-2 s of a crash.
HEALTH_INTERVAL_S: Final = 1.0
# A name can resolve to more (or fewer) replicas over time (Kubernetes headless Service).
DNS_REFRESH_S: Final = 15.0
# How long a request whose replica died waits for another one to become healthy when none
# is: long enough for a flapping replica's next probe, short enough that with every Triton
# down the scan fails UNAVAILABLE (the scanner retries later) instead of holding its slot until
# its deadline. A restarted Triton needs its model load time anyway, far more than this.
FAILOVER_WAIT_S: Final = 2.0
# The wait ends this long before the scan's deadline, so the caller learns the real cause
# (UNAVAILABLE) rather than DEADLINE_EXCEEDED.
FAILOVER_DEADLINE_MARGIN_S: Final = 0.2
_BACKOFF_FIRST_S: Final = 0.5
_BACKOFF_MAX_S: Final = 5.0
# Status codes as tritonclient spells them in InferenceServerException.status().
# These mean "this replica cannot answer now", never "this request is wrong": the request is
# re-sent to another replica.
_UNAVAILABLE: Final = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.CANCELLED"}
)
# A python-backend model whose stub process died answers every request with this (Triton
# 2.51 does not restart the stub, and the model still reports READY): the replica, not the
# request, is broken, so it is ejected and must pass a real inference before it comes back.
_DEAD_STUB: Final = re.compile(r"Stub process '[^']*' is not healthy")
_DEADLINE: Final = "StatusCode.DEADLINE_EXCEEDED"
_NOT_FOUND: Final = "StatusCode.NOT_FOUND"


class TritonBackend(InferenceBackend):
    """Models served by one or more Tritons: `url` is HOST:PORT of a gRPC endpoint, several
    of them (a sequence, or comma-separated), or a name resolving to several addresses.

    `request_timeout_s` bounds one inference when the scan has no deadline of its own;
    `load_timeout_s` (None: wait for ever) bounds how long `load()` waits for a first replica.
    """

    name = "triton"

    def __init__(
        self,
        url: str | Sequence[str],
        models: Sequence[str] = MODEL_NAMES,
        *,
        request_timeout_s: float | None = 300.0,
        load_timeout_s: float | None = None,
        health_interval_s: float = HEALTH_INTERVAL_S,
        probe_first_s: float = PROBE_FIRST_S,
        probe_max_s: float = PROBE_MAX_S,
        failover_wait_s: float = FAILOVER_WAIT_S,
        dns_refresh_s: float = DNS_REFRESH_S,
    ) -> None:
        unknown = [m for m in models if m not in MODEL_NAMES]
        if unknown:
            raise ModelNotFoundError(
                f"unknown model {unknown[0]!r}; expected one of {', '.join(MODEL_NAMES)}"
            )
        if not models:
            raise ValueError("a Triton backend needs at least one model")
        self._endpoints = parse_endpoints(url)
        self.url = ",".join(e.target for e in self._endpoints)
        self._wanted = tuple(models)
        self._request_timeout_s = request_timeout_s
        self._load_timeout_s = load_timeout_s
        self._health_interval_s = health_interval_s
        self._failover_wait_s = failover_wait_s
        self._dns_refresh_s = dns_refresh_s
        self._pool = ReplicaPool(probe_first_s=probe_first_s, probe_max_s=probe_max_s)
        self._clients: dict[str, triton_aio.InferenceServerClient] = {}
        # Replicas DNS no longer lists, closed once their last request has finished.
        self._retiring: list[Replica] = []
        self._infos: dict[str, ModelInfo] = {}
        # Per model, the optional outputs its ensemble declares (read with its config).
        self._optional: dict[str, tuple[str, ...]] = {}
        self._healthy = asyncio.Event()
        self._closed = False
        self._resolved_at = 0.0
        self._retried_slices = 0
        self._reason = f"Triton at {self.url} has not been reached yet; retry shortly"
        self._monitor: asyncio.Task[None] | None = None
        # Told of the replicas this backend takes out or puts back (ReplicaChange).
        self._listener: Callable[[ReplicaChange], None] | None = None
        # Probes asked for by other processes' reports, by replica address.
        self._probes: dict[str, asyncio.Task[None]] = {}

    # --- InferenceBackend ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._pool.healthy_count > 0

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
        """Find the replicas and wait until one has every model ready, then keep watching."""
        self._closed = False
        started = time.monotonic()
        delay = _BACKOFF_FIRST_S
        while True:
            await self._refresh_replicas(force=True)
            await asyncio.gather(*(self._probe(r) for r in self._pool.replicas))
            if self.ready:
                break
            waited = time.monotonic() - started
            if self._load_timeout_s is not None and waited >= self._load_timeout_s:
                raise BackendUnavailableError(self._reason)
            if delay == _BACKOFF_FIRST_S:
                log.warning("waiting for Triton: %s", self._reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)
        log.info(
            "Triton ready at %d of %d replicas (%s) with %s in %.2f s",
            self._pool.healthy_count,
            len(self._pool),
            self.url,
            ", ".join(f"{i.name} {i.version}" for i in self._infos.values()),
            time.monotonic() - started,
        )
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch(), name="triton-health")

    async def infer(self, model: str, image: np.ndarray) -> ModelOutputs:
        if self._closed or not self._pool.replicas:
            raise BackendUnavailableError(self._reason)
        self.model_info(model)
        request = InferInput(INPUT_IMAGE, list(image.shape), "FP32")
        request.set_data_from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        names = (*REQUESTED_OUTPUTS, *self._optional.get(model, ()))
        outputs = [InferRequestedOutput(name) for name in names]
        failed: set[str] = set()
        # Each replica may fail a request once or twice (a flapping one); more means the
        # failure is not about replicas and retrying would only hide it.
        attempts = 2 * max(len(self._pool), 1) + 1
        for attempt in range(attempts):
            replica = await self._next_replica(frozenset(failed))
            timeout = self._timeout()
            client = self._client_for(replica)
            replica.in_flight += 1
            replica.requests += 1
            started = time.perf_counter()
            try:
                result = await client.infer(
                    model, [request], outputs=outputs, client_timeout=timeout
                )
            except InferenceServerException as err:
                replica.failures += 1
                dead_stub = _DEAD_STUB.search(err.message() or str(err)) is not None
                if dead_stub:
                    # READY as far as Triton's health goes: only an inference tells.
                    replica.verify_inference = True
                if not (dead_stub or (err.status() or "") in _UNAVAILABLE):
                    raise self._translate(err, f"model {model!r}", replica.address) from err
                if replica.healthy:
                    # Only the first failure ejects: the others were in flight on the same
                    # dying replica and must not stretch its probe back-off.
                    self._eject(replica, f"{err.status()}: {err.message() or err}")
                if attempt + 1 == attempts:
                    raise BackendUnavailableError(
                        f"model {model!r}: Triton at {replica.address} is unavailable: "
                        f"{err.message() or err}"
                    ) from err
                # The replica (not the request) failed: send the same slices to another one.
                # Inference is idempotent, so a duplicate costs only time.
                failed.add(replica.address)
                self._retried_slices += int(image.shape[0]) if image.ndim else 1
                continue
            finally:
                replica.in_flight -= 1
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            seg = result.as_numpy(ENSEMBLE_LESION_LOGITS)
            cls = result.as_numpy(ENSEMBLE_DIAGNOSIS_LOGITS)
            if seg is None or cls is None:
                raise BackendError(
                    f"model {model!r}: Triton at {replica.address} answered without "
                    f"{ENSEMBLE_LESION_LOGITS!r} or {ENSEMBLE_DIAGNOSIS_LOGITS!r}"
                )
            cam = result.as_numpy(OUTPUT_CAM) if OUTPUT_CAM in names else None
            # model_ms is this request's round trip (queueing and batching included).
            answer = ModelOutputs(seg_logits=seg, cls_logits=cls, model_ms=elapsed_ms, cam=cam)
            return self.model_info(model).temperature.apply(answer)
        raise BackendUnavailableError(f"model {model!r}: {self._reason}")  # pragma: no cover

    async def close(self) -> None:
        self._closed = True
        self._listener = None
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for replica in self._pool.replicas:
            self._pool.eject(replica, "the Triton backend is closed")
        self._healthy.clear()
        self._reason = "the Triton backend is closed"
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    # --- replicas -----------------------------------------------------------------------------

    @property
    def retried_slices(self) -> int:
        """Slices re-sent to another replica after theirs failed, since start."""
        return self._retried_slices

    def replica_stats(self) -> tuple[ReplicaStats, ...]:
        """Per-replica health and request counters."""
        return self._pool.stats()

    def on_replica_change(self, listener: Callable[[ReplicaChange], None] | None) -> None:
        """Call `listener` whenever this backend takes a replica out of rotation or puts it
        back (not for changes it was told of: reports never echo)."""
        self._listener = listener

    def replica_changed(self, change: ReplicaChange) -> None:
        """Another process's backend saw `change` (gateway/scan_workers.py). An ejection is
        taken as it is, so this backend stops sending to a replica whose failure only an
        inference shows; a replica back in rotation elsewhere is probed now, not trusted."""
        replica = next((r for r in self._pool.replicas if r.address == change.address), None)
        if replica is None or self._closed:
            return
        if not change.healthy:
            replica.verify_inference = replica.verify_inference or change.verify_inference
            if replica.healthy:
                self._eject(replica, change.reason, tell=False)
        elif not replica.healthy and change.address not in self._probes:
            probe = asyncio.ensure_future(self._probe(replica))
            self._probes[change.address] = probe
            probe.add_done_callback(lambda _: self._probes.pop(change.address, None))

    async def _next_replica(self, failed: frozenset[str]) -> Replica:
        """A healthy replica, waiting (bounded) for one to come back when none is."""
        replica = self._pool.pick(avoid=failed)
        if replica is not None:
            return replica
        wait = self._failover_wait_s
        left = time_left()
        if left is not None:
            wait = min(wait, max(left - FAILOVER_DEADLINE_MARGIN_S, 0.0))
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout=wait)
        except TimeoutError:
            raise BackendUnavailableError(self._reason) from None
        replica = self._pool.pick(avoid=failed)
        if replica is None or self._closed:
            raise BackendUnavailableError(self._reason)
        return replica

    def _client_for(self, replica: Replica) -> triton_aio.InferenceServerClient:
        client = self._clients.get(replica.address)
        if client is None:
            client = triton_aio.InferenceServerClient(replica.address)
            self._clients[replica.address] = client
        return client

    async def _drop_client(self, address: str) -> None:
        client = self._clients.pop(address, None)
        if client is not None:
            await client.close()

    def _eject(self, replica: Replica, reason: str, *, tell: bool = True) -> None:
        if self._pool.eject(replica, reason):
            log.warning(
                "Triton replica %s ejected (%d of %d healthy): %s",
                replica.address,
                self._pool.healthy_count,
                len(self._pool),
                reason,
            )
            if tell:
                self._tell(replica)
        self._update_health()

    def _tell(self, replica: Replica) -> None:
        if self._listener is not None:
            self._listener(
                ReplicaChange(
                    replica.address, replica.healthy, replica.reason, replica.verify_inference
                )
            )

    def _update_health(self) -> None:
        if self._pool.healthy_count:
            self._healthy.set()
            self._reason = ""
            return
        self._healthy.clear()
        reasons = "; ".join(f"Triton at {r.address}: {r.reason}" for r in self._pool.replicas)
        self._reason = f"no Triton replica is ready ({reasons or f'none found for {self.url}'})"

    async def _refresh_replicas(self, *, force: bool = False) -> None:
        """Re-read the replica list from DNS (names only; IPs stand for themselves)."""
        now = time.monotonic()
        if not force and now - self._resolved_at < self._dns_refresh_s:
            return
        self._resolved_at = now
        resolved = await asyncio.gather(*(resolve(e) for e in self._endpoints))
        targets = [
            (a, e.target) for e, addrs in zip(self._endpoints, resolved, strict=True) for a in addrs
        ]
        if not targets and len(self._pool):
            # A failed lookup is not "no replicas": keep what is known rather than drop it.
            return
        added, removed = self._pool.sync(targets)
        for replica in added:
            log.info("Triton replica %s (%s) found", replica.address, replica.endpoint)
        for replica in removed:
            log.info("Triton replica %s is no longer listed by DNS", replica.address)
            self._retiring.append(replica)
        still: list[Replica] = []
        for replica in self._retiring:
            if replica.in_flight:
                still.append(replica)
            else:
                await self._drop_client(replica.address)
        self._retiring = still
        self._update_health()

    async def _probe(self, replica: Replica) -> None:
        """Health-check one replica: server and models ready, model infos as the pool's."""
        if not replica.healthy and not replica.in_flight:
            # An ejected replica gets a fresh channel: the old one may sit in gRPC's reconnect
            # back-off (up to minutes), which would hide a restarted server that long. Not
            # while requests still run on it: closing a channel cancels its calls.
            await self._drop_client(replica.address)
        client = self._client_for(replica)
        try:
            infos = await self._check(client, replica.address)
            if replica.verify_inference:
                await self._canary(client, replica.address, infos)
                replica.verify_inference = False
            others = [r for r in self._pool.replicas if r.healthy and r is not replica]
            if others and self._infos and infos != self._infos:
                raise BackendError(
                    f"Triton at {replica.address} serves other model versions or plans than "
                    "the healthy replicas; not mixing them in one scan"
                )
        except CtJointError as err:
            self._eject(replica, str(err))
            return
        self._infos = infos
        restored = self._pool.restore(replica)
        self._update_health()
        if restored:
            log.info(
                "Triton replica %s is healthy (%d of %d)",
                replica.address,
                self._pool.healthy_count,
                len(self._pool),
            )
            self._tell(replica)

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

    async def _check(
        self, client: triton_aio.InferenceServerClient, address: str
    ) -> dict[str, ModelInfo]:
        """Server and models ready; model infos read from the ensembles' configs."""
        try:
            if not await client.is_server_ready(client_timeout=CHECK_TIMEOUT_S):
                raise BackendUnavailableError(f"Triton at {address} is not ready")
            infos: dict[str, ModelInfo] = {}
            for model in self._wanted:
                if not await client.is_model_ready(model, client_timeout=CHECK_TIMEOUT_S):
                    raise BackendUnavailableError(
                        f"Triton at {address} does not have model {model!r} ready"
                    )
                response = await client.get_model_config(
                    model, as_json=True, client_timeout=CHECK_TIMEOUT_S
                )
                infos[model] = self._info_from_config(model, response, address)
        except InferenceServerException as err:
            raise self._translate(err, "readiness check", address) from err
        return infos

    async def _canary(
        self, client: triton_aio.InferenceServerClient, address: str, infos: dict[str, ModelInfo]
    ) -> None:
        """One tiny inference per model: a replica whose model failed in a way its readiness
        does not show (a dead python stub) comes back only once it answers again."""
        for model, info in infos.items():
            shape = [1 if d < 1 else d for d in info.input_shape]
            request = InferInput(INPUT_IMAGE, shape, "FP32")
            request.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
            outputs = [InferRequestedOutput(name) for name in REQUESTED_OUTPUTS]
            try:
                await client.infer(
                    model, [request], outputs=outputs, client_timeout=CHECK_TIMEOUT_S
                )
            except InferenceServerException as err:
                raise BackendUnavailableError(
                    f"Triton at {address} is ready but model {model!r} fails: "
                    f"{err.message() or err}"
                ) from err

    def _info_from_config(self, model: str, response: dict[str, Any], address: str) -> ModelInfo:
        config = response.get("config", {})
        parameters = {
            key: value.get("string_value", "")
            for key, value in config.get("parameters", {}).items()
        }
        source = f"Triton model {model!r} at {address}"
        inputs = {i["name"]: i for i in config.get("input", [])}
        if INPUT_IMAGE not in inputs:
            raise BackendError(f"{source}: no input {INPUT_IMAGE!r}")
        dims = [-1, *(int(d) for d in inputs[INPUT_IMAGE].get("dims", []))]
        declared = {o.get("name") for o in config.get("output", [])}
        self._optional[model] = tuple(n for n in OPTIONAL_OUTPUTS if n in declared)
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
            temperature=info.temperature,
        )

    async def _watch(self) -> None:
        """Keep every replica's health in step: re-check the healthy, probe the ejected when
        their back-off is over, and follow DNS."""
        while True:
            await asyncio.sleep(self._health_interval_s)
            was_ready = self.ready
            await self._refresh_replicas()
            due = [r for r in self._pool.replicas if r.healthy]
            due.extend(self._pool.due_for_probe())
            await asyncio.gather(*(self._probe(r) for r in due))
            if was_ready and not self.ready:
                log.warning("Triton is no longer ready: %s", self._reason)
            elif self.ready and not was_ready:
                log.info("Triton is ready again (%s)", self.url)

    def _translate(self, err: InferenceServerException, what: str, address: str) -> CtJointError:
        status = err.status() or ""
        message = err.message() or str(err)
        if status == _DEADLINE:
            return DeadlineExceededError(f"{what}: Triton did not answer in time ({message})")
        if status in _UNAVAILABLE:
            return BackendUnavailableError(f"{what}: Triton at {address} is unavailable: {message}")
        if status == _NOT_FOUND:
            return ModelNotFoundError(f"{what}: Triton at {address}: {message}")
        return BackendError(f"{what}: Triton at {address} failed: {message}")


__all__ = ["MAX_IN_FLIGHT_PER_SCAN", "REQUEST_SLICES", "TritonBackend"]
