"""Every error of the model side (training, evaluation, export, TensorRT, the Triton
repository, the phantoms), one subclass per cause under one root.

The python-backend models (triton_python/) keep their own request error: they run inside
Triton, where only numpy, onnxruntime and ctjoint.contracts are at hand.
"""

from __future__ import annotations

from ctjoint.errors import CtJointError


class ExportError(CtJointError):
    """Root of the export side's errors."""


class DatasetError(ExportError):
    """A data set folder, its label table or one of its cases is unusable."""


class TrainingError(ExportError):
    """A training run cannot start or continue (bad run folder, no data, bad checkpoint)."""


class OnnxExportError(ExportError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


class GpuUnavailableError(ExportError):
    """TensorRT cannot run here (no NVIDIA GPU, driver, TensorRT bindings or cuda-python)."""


class EngineBuildError(ExportError):
    """TensorRT refused the network, or the engine disagrees with ONNX Runtime."""


class CudaError(ExportError):
    """A CUDA runtime call failed (or CUDA cannot be used here)."""


class SpecError(ExportError):
    """A model spec that Triton would refuse (or that breaks the tensor contract)."""


class RepositoryCheckError(ExportError):
    """The repository cannot be checked at all (no folder, an unreadable model)."""


class PerfAnalyzerError(ExportError):
    """perf_analyzer is missing, cannot start, or failed."""


class PhantomError(ExportError):
    """Bad arguments for the phantom generator (size, slices, kind, seed, output folder)."""


__all__ = [
    "CudaError",
    "DatasetError",
    "EngineBuildError",
    "ExportError",
    "GpuUnavailableError",
    "OnnxExportError",
    "PerfAnalyzerError",
    "PhantomError",
    "RepositoryCheckError",
    "SpecError",
    "TrainingError",
]
