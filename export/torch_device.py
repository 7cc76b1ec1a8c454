"""Where training and calibration compute: the one place that turns `--device` into a torch
device and knows what each kind offers (bf16 autocast, memory figures, a name for the log).

Training builds its batches on the CPU either way (numpy and scipy augmentation); only the
network, the loss and the optimizer move, so a run on a GPU and one on a CPU draw the same
batches from the same seed.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from ctjoint.export.errors import TrainingError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when torch sees one, else the CPU; `cuda` without a
    usable CUDA device is an error that says why."""
    if name not in DEVICE_CHOICES:
        raise TrainingError(f"unknown device {name!r}; expected one of {DEVICE_CHOICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise TrainingError(f"--device cuda: torch {torch.__version__} {why}")
    return torch.device(name)


def autocast(enabled: bool, device: torch.device | None = None) -> torch.autocast:
    """bfloat16 autocast where the device computes bf16 natively (CUDA GPUs from Ampere on;
    CPUs with AMX / AVX512-BF16); a no-op context elsewhere."""
    if device is not None and device.type == "cuda":
        native = enabled and torch.cuda.is_bf16_supported()
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=native)
    native = enabled and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native)


def describe(device: torch.device) -> dict[str, Any]:
    """What the training log records about the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device since the last reset; None on the CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
