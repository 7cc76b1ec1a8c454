"""One answer from several networks' results of the same scan (`--model both`).

The networks see the same volume through their own preprocessing; their calibrated scan
probabilities are averaged (gateway/aggregate.py `fuse_probabilities`), their review reasons
joined (`review.fused_review`: the fused answer's confidence is its own), and each member's
own answer kept in the fused result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctjoint.contracts import CLASS_NAMES, MODEL_BOTH
from ctjoint.gateway.aggregate import fuse_probabilities
from ctjoint.gateway.result import ModelAnswer, ScanResult, StageTimings
from ctjoint.gateway.review import fused_review


def fuse_results(results: Sequence[ScanResult]) -> ScanResult:
    """One answer from several networks' results of the same volume.

    Label: the argmax of the mean of their calibrated scan probabilities
    (`fuse_probabilities`). Lesion statistics, quantification and per-slice evidence (and, in
    the analysis, masks, lungs and CAM): the first network's (jcs2d: 2.5D at full in-plane
    resolution). Review (`fused_review`): every member's reasons but its low confidence (and,
    for a member with another label, those that questioned that label), the fused
    probability of the label against the fused operating point, and `models_disagree` when
    their labels differ. Each member's own answer is kept in `result.members`.
    """
    if len(results) < 2:
        raise ValueError("fusion needs at least two analyses")
    first = results[0]
    probabilities = fuse_probabilities(
        np.array([[r.probabilities[name] for name in CLASS_NAMES] for r in results])
    )
    review = fused_review(
        {r.model: (r.label, r.review) for r in results},
        float(probabilities.max()),
        label=CLASS_NAMES[int(np.argmax(probabilities))],
    )
    timings = [r.timings for r in results]
    return ScanResult.from_probabilities(
        probabilities.tolist(),
        lesions=first.lesions,
        series=first.series,
        model=MODEL_BOTH,
        model_version=" + ".join(f"{r.model} {r.model_version}" for r in results),
        model_sha256=" + ".join(r.model_sha256 for r in results if r.model_sha256),
        backend=first.backend,
        timings=StageTimings(
            read_ms=timings[0].read_ms,
            validate_ms=timings[0].validate_ms,
            preprocess_ms=sum(t.preprocess_ms for t in timings),
            infer_ms=sum(t.infer_ms for t in timings),
            postprocess_ms=sum(t.postprocess_ms for t in timings),
            total_ms=sum(t.total_ms for t in timings),
            model_ms=sum(t.model_ms for t in timings),
        ),
        slice_probabilities=first.slice_probabilities,
        quantification=first.quantification,
        review=review,
        members=tuple(
            ModelAnswer(
                model=r.model,
                model_version=r.model_version,
                label=r.label,
                probabilities=r.probabilities,
                lesion_volume_ml=r.lesions.total_volume_ml,
                review=r.review,
            )
            for r in results
        ),
    )


__all__ = ["fuse_results"]
