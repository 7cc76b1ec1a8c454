"""From model outputs to scan-level answers: softmax, the 2D model's slice -> scan vote, and
the fusion of several networks' scan probabilities.

One implementation, used by serving (gateway) and by evaluation (export), so the figures we
report are the figures the product gives.
"""

from __future__ import annotations

import math

import numpy as np

from ctjoint.contracts import CLASS_CAP, CLASS_COVID19, CLASS_NAMES, CLASS_NORMAL

# Fraction of slices (at least MIN_EVIDENCE_SLICES) whose abnormality is averaged into the scan's
# abnormality: lesions occupy a minority of slices, so a mean over every slice would drown them,
# and a single max would let one noisy slice flip a normal scan.
EVIDENCE_FRACTION = 0.05
MIN_EVIDENCE_SLICES = 3

# Operating point of the scan-level abnormality: the top-k mean is mapped through a logit
# shift so that this value becomes 0.5. Lesion-bearing scans put their top slices at
# p(abnormal) ~ 1 while a few false-positive slices in a normal scan reach 0.6-0.9; on the
# phantom validation split (45 scans, jcs2d tiny) the top-k means were <= 0.92 for every
# normal scan and >= 0.9999 for every scan with lesions, so 0.99 sits in that gap.
ABNORMAL_OPERATING_POINT = 0.99


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32."""
    shifted = logits.astype(np.float32) - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def aggregate_slice_probabilities(slice_probs: np.ndarray) -> np.ndarray:
    """Per-slice probabilities [Z, 3] -> scan probabilities [3] (order CLASS_NAMES).

    Scan abnormality = mean of (1 - p_normal) over the top-k most abnormal slices
    (k = max(3, 5% of slices)), calibrated so that ABNORMAL_OPERATING_POINT maps to 0.5.
    The COVID-19 vs CAP split comes from the slices that look abnormal (p_normal < 0.5), each
    weighted by its abnormality; if none does, from all slices.
    """
    if slice_probs.ndim != 2 or slice_probs.shape[1] != len(CLASS_NAMES) or len(slice_probs) == 0:
        raise ValueError(
            f"expected [slices, {len(CLASS_NAMES)}] probabilities, got {slice_probs.shape}"
        )
    probs = slice_probs.astype(np.float64)
    abnormal = 1.0 - probs[:, CLASS_NORMAL]
    k = min(len(abnormal), max(MIN_EVIDENCE_SLICES, math.ceil(EVIDENCE_FRACTION * len(abnormal))))
    scan_abnormal = _shift_operating_point(float(np.mean(np.sort(abnormal)[-k:])))
    evidence = abnormal > 0.5
    weights = abnormal if not evidence.any() else np.where(evidence, abnormal, 0.0)
    covid = float(np.sum(weights * probs[:, CLASS_COVID19]))
    cap = float(np.sum(weights * probs[:, CLASS_CAP]))
    covid_share = covid / (covid + cap) if covid + cap > 0 else 0.5
    out = np.zeros(len(CLASS_NAMES), dtype=np.float32)
    out[CLASS_COVID19] = scan_abnormal * covid_share
    out[CLASS_CAP] = scan_abnormal * (1.0 - covid_share)
    out[CLASS_NORMAL] = 1.0 - scan_abnormal
    return out


def _shift_operating_point(p: float) -> float:
    """Move the 0.5 decision point of a probability to ABNORMAL_OPERATING_POINT (logit shift)."""
    eps = 1e-7
    p = min(max(p, eps), 1.0 - eps)
    t = ABNORMAL_OPERATING_POINT
    shifted = math.log(p / (1.0 - p)) - math.log(t / (1.0 - t))
    return 1.0 / (1.0 + math.exp(-shifted))


def fuse_probabilities(per_model: np.ndarray) -> np.ndarray:
    """Several networks' calibrated scan probabilities [M, 3] -> one fused vector [3].

    The mean: with calibrated members it stays calibrated-ish, a confident member outweighs a
    hesitant one, and two members that disagree leave a probability near their split, which
    the review's confidence rule then sees. The fused label is its argmax.
    """
    probs = np.asarray(per_model, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(CLASS_NAMES) or len(probs) == 0:
        raise ValueError(f"expected [models, {len(CLASS_NAMES)}] probabilities, got {probs.shape}")
    return np.mean(probs, axis=0).astype(np.float32)
