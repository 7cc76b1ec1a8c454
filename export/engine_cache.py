"""TensorRT engines cached across container starts, keyed by what makes an engine valid.

An engine only runs on the GPU model and TensorRT version that built it, and only stands for
the ONNX file it came from. The container's start-up (`python -m ctjoint.export.engine_cache`,
called by deploy/entrypoint.sh) computes that key for every model, builds the engines the
cache volume lacks, and writes the GPU Triton repository pointing at the cached engines.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ctjoint import contracts
from ctjoint.errors import CtJointError
from ctjoint.export.triton_repository import write_repository
from ctjoint.export.triton_spec import SERVING

log = logging.getLogger(__name__)

KEY_HEX_CHARS: Final = 16
LOCK_FILE: Final = ".build.lock"
_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on; equal keys mean a reusable engine."""

    model: str
    onnx_sha256: str
    gpu: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    max_batch: int

    def __post_init__(self) -> None:
        # GPU names come from the driver with varying spacing ("NVIDIA  H100 80GB HBM3 ").
        object.__setattr__(self, "gpu", " ".join(self.gpu.split()))
        object.__setattr__(self, "onnx_sha256", self.onnx_sha256.lower())
        if self.model not in contracts.MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; expected {contracts.MODEL_NAMES}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256):
            raise ValueError(f"onnx_sha256 must be 64 hex digits, got {self.onnx_sha256!r}")
        if not self.gpu or not self.tensorrt_version:
            raise ValueError("an engine key needs the GPU name and the TensorRT version")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")

    @property
    def digest(self) -> str:
        """A short hash of every field (canonical JSON, so field order never matters)."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_HEX_CHARS]

    @property
    def file_name(self) -> str:
        """Readable in a directory listing; the digest alone makes it unique."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        return f"{self.model}-{gpu}-trt{self.tensorrt_version}-{self.precision}-{self.digest}.plan"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (3D models are tens of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GpuFacts:
    """The device engines are built for, as the CUDA driver and TensorRT name it."""

    name: str
    compute_capability: str
    tensorrt_version: str


def detect_gpu() -> GpuFacts:
    """GPU 0 and the installed TensorRT; GpuUnavailableError where TensorRT cannot run."""
    from ctjoint.export.cuda_buffers import device_info
    from ctjoint.export.tensorrt_build import GpuUnavailableError, gpu_problem, import_tensorrt

    problem = gpu_problem()
    if problem is not None:
        raise GpuUnavailableError(f"cannot build TensorRT engines here: {problem}")
    device = device_info()
    return GpuFacts(
        name=device.name,
        compute_capability=device.compute_capability,
        tensorrt_version=str(import_tensorrt().__version__),
    )


# (model, onnx file, engine file, timing cache, precision, max batch) -> builds the engine.
Builder = Callable[[str, Path, Path, Path, str, int], object]


def _build_with_tensorrt(
    model: str, onnx: Path, out: Path, timing_cache: Path, precision: str, max_batch: int
) -> object:
    from ctjoint.export.tensorrt_build import build_engine

    record = build_engine(
        model=model,
        precision=precision,
        onnx_file=onnx,
        out=out,
        max_batch=max_batch,
        timing_cache=timing_cache,
    )
    log.info("%s", record.summary())
    return record


@dataclass(frozen=True)
class PreparedEngine:
    """One model's engine in the cache, and whether this start had to build it."""

    key: EngineKey
    path: Path
    built: bool


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise builds: replicas sharing one cache volume must not build the same engine
    twice at once (each build holds the GPU for minutes)."""
    with (cache_dir / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_engines(
    cache_dir: Path,
    onnx_dir: Path,
    gpu: GpuFacts,
    *,
    models: Sequence[str] = contracts.MODEL_NAMES,
    precision: str = "fp16",
    builder: Builder = _build_with_tensorrt,
) -> list[PreparedEngine]:
    """An engine for every model in `cache_dir`, building only those whose key is missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = cache_dir / f"timing-{_slug(gpu)}.cache"
    prepared = []
    with _cache_lock(cache_dir):
        for model in models:
            onnx = contracts.onnx_path(model, onnx_dir)
            if not onnx.is_file():
                raise FileNotFoundError(f"no ONNX file for {model!r} at {onnx}")
            key = EngineKey(
                model=model,
                onnx_sha256=file_sha256(onnx),
                gpu=gpu.name,
                compute_capability=gpu.compute_capability,
                tensorrt_version=gpu.tensorrt_version,
                precision=precision,
                max_batch=SERVING[model].max_batch_size,
            )
            path = cache_dir / key.file_name
            built = not path.is_file()
            if built:
                log.info("no cached engine for %s (key %s): building", model, key.digest)
                builder(model, onnx, path, timing_cache, precision, key.max_batch)
                if not path.is_file():
                    raise FileNotFoundError(f"the engine build for {model!r} wrote no {path}")
            else:
                log.info("cached engine for %s: %s", model, path.name)
            prepared.append(PreparedEngine(key=key, path=path, built=built))
    return prepared


def _slug(gpu: GpuFacts) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-")
    return f"{name}-trt{gpu.tensorrt_version}"


def link_engines(engines: Sequence[PreparedEngine], engine_dir: Path) -> Path:
    """`<engine_dir>/<model>.plan` -> the cached engine: the layout the repository expects."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    for engine in engines:
        link = engine_dir / f"{engine.key.model}.plan"
        link.unlink(missing_ok=True)
        link.symlink_to(engine.path)
    return engine_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Container start-up: engines for this GPU (cached or built), then the GPU repository."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, required=True, help="engine cache folder (volume)")
    parser.add_argument("--onnx-dir", type=Path, required=True, help="exported ONNX files")
    parser.add_argument("--repository", type=Path, required=True, help="repository to write")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--model", action="append", choices=contracts.MODEL_NAMES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    models = tuple(args.model or contracts.MODEL_NAMES)
    try:
        gpu = detect_gpu()
        log.info(
            "GPU %s (compute %s), TensorRT %s",
            gpu.name,
            gpu.compute_capability,
            gpu.tensorrt_version,
        )
        engines = prepare_engines(
            args.cache, args.onnx_dir, gpu, models=models, precision=args.precision
        )
        engine_dir = link_engines(engines, args.repository.parent / "engines")
        report = write_repository(
            args.repository,
            target="gpu",
            models=models,
            onnx_dir=args.onnx_dir,
            engine_dir=engine_dir,
        )
    except (CtJointError, OSError) as err:
        # One line in the container log, and a status the orchestrator shows as a failed start.
        log.error("cannot prepare the Triton repository: %s", err)
        return 2
    log.info("%s", report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
