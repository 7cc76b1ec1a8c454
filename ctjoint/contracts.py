"""Names and shapes shared by every side (export, gateway, Triton models, client).

One module so that a tensor name, a class order or a file layout cannot drift between the
side that writes it and the side that reads it. Pure Python: importable everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

# --- Models ---------------------------------------------------------------------------------
MODEL_JCS2D: Final = "jcs2d"
MODEL_DEEPSC3D: Final = "deepsc3d"
MODEL_NAMES: Final = (MODEL_JCS2D, MODEL_DEEPSC3D)
DEFAULT_MODEL: Final = MODEL_JCS2D
# A scan request may name this instead of one model: every network on the same upload, one
# fused answer beside each one's own (docs/review.md gives the fusion rule).
MODEL_BOTH: Final = "both"

# --- Classes (order is the order of `cls_logits` / `probs`) -----------------------------------
CLASS_NAMES: Final = ("covid19", "cap", "normal")
CLASS_COVID19: Final = 0
CLASS_CAP: Final = 1
CLASS_NORMAL: Final = 2

# Lesion segmentation classes (channel order of `seg_logits`, values of the label mask).
# Lungs are not a model channel: the gateway segments them classically (documented in README).
SEG_CLASS_NAMES: Final = ("background", "ground_glass", "consolidation")
SEG_BACKGROUND: Final = 0
SEG_GROUND_GLASS: Final = 1
SEG_CONSOLIDATION: Final = 2
LESION_CLASS_NAMES: Final = SEG_CLASS_NAMES[1:]

# Lung label map values in phantom ground truth (truth/lungs.nii.gz).
LUNG_RIGHT: Final = 1
LUNG_LEFT: Final = 2

# --- Tensors ----------------------------------------------------------------------------------
INPUT_IMAGE: Final = "image"  # float32 [B,3,H,W] (jcs2d) or [B,1,D,H,W] (deepsc3d)
OUTPUT_SEG_LOGITS: Final = "seg_logits"  # float32 [B,K,H,W] or [B,K,D,H,W]
OUTPUT_CLS_LOGITS: Final = "cls_logits"  # float32 [B,3]
# Optional: float32 [B,3,h,w] (2D) or [B,3,d,h,w] (3D), >= 0: Grad-CAM of each class (CLASS_NAMES
# order) on the last feature map the classification head pools (its own coarse grid, aligned
# with the input grid at the network's total stride). Models exported before it lack it.
OUTPUT_CAM: Final = "cam"
POST_MASK: Final = "mask"  # uint8 [B,H,W] (or [B,D,H,W]) label map
# int64 [B, L] (2D) or [B, D, L] (3D): lesion pixels per slice and per lesion class, in
# LESION_CLASS_NAMES order (per-slice evidence a reader can check, for both models).
POST_LESION_AREA: Final = "lesion_area"

# --- Triton model repository ------------------------------------------------------------------
# `<model>` is the ensemble clients call: `<model>_<variant>` (logits) -> `postprocess_<model>`.
# Variants: `cpu` (python backend running the ONNX file with ONNX Runtime), `onnx`
# (onnxruntime_onnx with the TensorRT execution provider), `trt` (tensorrt_plan engine).
TRITON_VARIANT_CPU: Final = "cpu"
TRITON_VARIANT_ONNX: Final = "onnx"
TRITON_VARIANT_TRT: Final = "trt"
TRITON_VARIANTS: Final = (TRITON_VARIANT_CPU, TRITON_VARIANT_ONNX, TRITON_VARIANT_TRT)
TRITON_TARGET_CPU: Final = "cpu"
TRITON_TARGET_GPU: Final = "gpu"
TRITON_TARGETS: Final = (TRITON_TARGET_CPU, TRITON_TARGET_GPU)
# Ensemble tensors between the network and its postprocessing; the ensemble also returns them,
# because the gateway maps logits (not the model-grid mask) back onto the source slice grid.
ENSEMBLE_LESION_LOGITS: Final = "lesion_logits"  # the network's seg_logits
ENSEMBLE_DIAGNOSIS_LOGITS: Final = "diagnosis_logits"  # the network's cls_logits
# Config parameter of the python-backend network model: ONNX Runtime intra-op threads.
TRITON_PARAM_INTRA_OP_THREADS: Final = "intra_op_threads"
# File names inside a model version folder (Triton's defaults for each platform).
TRITON_ONNX_FILE: Final = "model.onnx"
TRITON_PLAN_FILE: Final = "model.plan"
TRITON_PYTHON_FILE: Final = "model.py"


def triton_model_name(model: str, variant: str) -> str:
    """The Triton name of a model's network for one variant, e.g. `jcs2d_cpu`."""
    if variant not in TRITON_VARIANTS:
        raise ValueError(f"unknown Triton variant {variant!r}; expected one of {TRITON_VARIANTS}")
    return f"{model}_{variant}"


def triton_postprocess_name(model: str) -> str:
    """The Triton name of a model's postprocessing (python backend)."""
    return f"postprocess_{model}"


# --- ONNX metadata keys (the exported file carries its own preprocessing plan) ----------------
ONNX_META_MODEL: Final = "ctjoint.model"
ONNX_META_VERSION: Final = "ctjoint.version"
ONNX_META_PLAN: Final = "ctjoint.preprocess_plan"
ONNX_META_CLASSES: Final = "ctjoint.classes"
ONNX_META_SEG_CLASSES: Final = "ctjoint.seg_classes"
ONNX_META_TRAINED_ON: Final = "ctjoint.trained_on"
# Logit temperatures fitted on the validation split, JSON {"cls": T, "seg": T}: every backend
# divides the logits by them before anything reads probabilities (absent: 1, uncalibrated).
ONNX_META_TEMPERATURE: Final = "ctjoint.temperature"
# Provenance of the bundled weights (ONNX metadata and the Triton ensembles' parameters).
TRAINED_ON_PHANTOMS: Final = "synthetic phantoms, not for clinical use"

# --- On-disk layout of a case (phantoms and the DICOM real-data layout) -----------------------
# CASE/series/*.dcm        the CT series, one file per slice
# CASE/truth/lesions.nii.gz   label map SEG_CLASS_NAMES, array order (x, y, z) as NIfTI stores it
# CASE/truth/lungs.nii.gz     0 outside, LUNG_RIGHT, LUNG_LEFT
# CASE/truth/label.json       {"label": one of CLASS_NAMES, ...}
# A set: SET/labels.csv with columns case,label,split and SET/<case>/ folders as above.
CASE_SERIES_DIR: Final = "series"
CASE_TRUTH_DIR: Final = "truth"
TRUTH_LESIONS: Final = "lesions.nii.gz"
TRUTH_LUNGS: Final = "lungs.nii.gz"
TRUTH_LABEL: Final = "label.json"
SET_LABELS_CSV: Final = "labels.csv"
SPLITS: Final = ("train", "val", "test")

# --- Artefact locations -----------------------------------------------------------------------
ENV_MODEL_DIR: Final = "CTJOINT_MODEL_DIR"

# --- Patient data ------------------------------------------------------------------------------
# Key of the HMAC pseudonyms that stand for UIDs in logs and in the listener's folder names: a
# secret shared by a deployment (so names correlate across processes), else random per process.
ENV_PSEUDONYM_KEY: Final = "CTJOINT_PSEUDONYM_KEY"

# --- gRPC metadata ------------------------------------------------------------------------------
# Initial metadata the gateway sends as soon as a scan holds a slot. Clients wait for it (or for
# the call's status) before streaming files: a refused scan then uploads nothing, and the client
# sees the refusal's own status rather than a failed write (grpc.aio clients report a write into
# an already finished call as INTERNAL).
ADMITTED_METADATA: Final = "x-ctjoint-admitted"
# The request id: sent by the client, adopted (or made) by the gateway, echoed in its trailers.
REQUEST_ID_METADATA: Final = "x-request-id"

# --- Scan result -------------------------------------------------------------------------------
# Schema id of the JSON result (client/schema/scan_result.schema.json), written by the gateway's
# and the client's encoders alike.
RESULT_SCHEMA: Final = "ctjoint.scan_result/1"


def repo_root() -> Path:
    """The checkout root when running from the repository (editable install)."""
    return Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    """Where exported ONNX models live: $CTJOINT_MODEL_DIR, else <repo>/build/onnx."""
    configured = os.environ.get(ENV_MODEL_DIR)
    if configured:
        return Path(configured)
    return repo_root() / "build" / "onnx"


def onnx_path(model: str, model_dir: Path | None = None) -> Path:
    """The ONNX file of a model inside a model directory."""
    return (model_dir or default_model_dir()) / f"{model}.onnx"
