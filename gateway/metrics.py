"""Prometheus metrics of the gateway, in their own registry, every name prefixed `ctjoint_`.

Labels are bounded sets (stage, outcome, status code, model name from MODEL_NAMES), never
request ids or anything from the DICOM files, so cardinality stays fixed and no patient data
can reach a scrape.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from ctjoint.contracts import MODEL_NAMES
from ctjoint.gateway.backends.replicas import Replicated

STAGES: Final = ("receive", "decode", "assemble", "preprocess", "infer", "postprocess", "encode")
# Seconds: a 512-pixel slice decodes in ~1 ms, a whole 3D inference on CPU takes tens of seconds.
STAGE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
UNKNOWN_MODEL: Final = "unknown"


def model_label(model: str) -> str:
    """A model name fit for a label: only the known names, so clients cannot add series."""
    return model if model in MODEL_NAMES else UNKNOWN_MODEL


class GatewayMetrics:
    """The gateway's metrics; one instance per server, each with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.scans = Counter(
            "ctjoint_scans",
            "Scans finished, by model, outcome (ok, error, cancelled) and gRPC status code.",
            ("model", "outcome", "code"),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "ctjoint_stage_seconds",
            "Wall time of one pipeline stage of one scan.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.scan_seconds = Histogram(
            "ctjoint_scan_seconds",
            "Wall time of a whole scan, first message to result.",
            ("model",),
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.slices = Counter(
            "ctjoint_slices_processed",
            "Slices that went through the whole pipeline.",
            ("model",),
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "ctjoint_received_bytes",
            "DICOM bytes received in scan requests.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ctjoint_scans_in_flight",
            "Scans being received or processed right now.",
            registry=self.registry,
        )
        self.backend_ready = Gauge(
            "ctjoint_backend_ready",
            "1 when the inference backend is ready to serve, else 0.",
            registry=self.registry,
        )
        # Replicas are counted by state only: pod addresses come and go, labels must not.
        self.triton_replicas = Gauge(
            "ctjoint_triton_replicas",
            "Triton replicas this gateway knows, by state (healthy, ejected).",
            ("state",),
            registry=self.registry,
        )
        self.retried_slices = Counter(
            "ctjoint_retried_slices",
            "Slices re-sent to another Triton replica after theirs failed.",
            registry=self.registry,
        )
        self._retried_seen = 0
        # Pre-create the stage series so dashboards see every stage from the first scrape.
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def record_scan(self, model: str, outcome: str, code: str) -> None:
        self.scans.labels(model=model_label(model), outcome=outcome, code=code).inc()

    def observe_replicas(self, backend: object) -> None:
        """Replica states and retries of a replicated backend (Triton); others are ignored."""
        if not isinstance(backend, Replicated):
            return
        replicas = backend.replica_stats()
        healthy = sum(1 for r in replicas if r.healthy)
        self.triton_replicas.labels(state="healthy").set(healthy)
        self.triton_replicas.labels(state="ejected").set(len(replicas) - healthy)
        retried = backend.retried_slices
        if retried > self._retried_seen:
            self.retried_slices.inc(retried - self._retried_seen)
            self._retried_seen = retried

    def exposition(self) -> bytes:
        """The text exposition format of this registry (what a scrape returns)."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> Any:
        """Expose /metrics on a background thread; returns the HTTP server (has .shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
