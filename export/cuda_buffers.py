"""Device memory and streams for the TensorRT build, through CUDA's own Python bindings
(cuda-python), so building an engine needs no torch.

Only what the build and its parity check use: allocate, copy in, copy out, a stream, the
device's name and compute capability. Every call's status is checked; a failure names the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ctjoint.export.errors import CudaError


def cudart() -> Any:
    """cuda-python's runtime module (newer releases moved it under cuda.bindings)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as err:
            raise CudaError(
                "cuda-python is not installed (pip install the `tensorrt` extra)"
            ) from err
    return runtime


def _check(result: Any, call: str) -> Any:
    """cuda-python returns (status, *values); raise on a status other than success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise CudaError(f"{call} failed: {status}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str


def device_info(index: int = 0) -> DeviceInfo:
    """Name and compute capability of a GPU; CudaError when none is visible."""
    rt = cudart()
    count = _check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if not count:
        raise CudaError("no CUDA device is visible")
    props = _check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return DeviceInfo(name.strip("\x00 "), f"{props.major}.{props.minor}")


class DeviceBuffer:
    """One device allocation of `nbytes`; free it with `free()` (or use `with`)."""

    def __init__(self, nbytes: int) -> None:
        self._rt = cudart()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_check(self._rt.cudaMalloc(self.nbytes), "cudaMalloc"))

    @classmethod
    def from_array(cls, array: np.ndarray) -> DeviceBuffer:
        host = np.ascontiguousarray(array)
        buffer = cls(host.nbytes)
        buffer.upload(host)
        return buffer

    def upload(self, array: np.ndarray) -> None:
        host = np.ascontiguousarray(array)
        if host.nbytes > self.nbytes:
            raise CudaError(f"{host.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self._rt.cudaMemcpy(self.ptr, host.ctypes.data, host.nbytes, kind), "cudaMemcpy")

    def download(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        host = np.empty(shape, dtype)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self._rt.cudaMemcpy(host.ctypes.data, self.ptr, host.nbytes, kind), "cudaMemcpy")
        return host

    def free(self) -> None:
        if self.ptr:
            _check(self._rt.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


class Stream:
    """A CUDA stream; `handle` is what TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        self._rt = cudart()
        self._stream = _check(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        _check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            _check(self._rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
