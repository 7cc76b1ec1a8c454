"""Where the bundled (phantom-trained, tiny) models live in the package, without torch.

Serving needs only the ONNX file, committed beside the checkpoint it was exported from
(`make bundled-onnx` re-exports it; tests/test_bundled_onnx.py checks that a fresh export of
the checkpoint still gives the same outputs), so a machine that only runs the stack never
installs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

WEIGHTS_DIR: Final = Path(__file__).resolve().parent / "weights"


def bundled_weights(model: str) -> Path:
    """The phantom-trained tiny checkpoint shipped with the package."""
    return WEIGHTS_DIR / f"{model}_tiny.pt"


def bundled_onnx(model: str) -> Path:
    """The ONNX export of that checkpoint, shipped beside it."""
    return WEIGHTS_DIR / f"{model}_tiny.onnx"
