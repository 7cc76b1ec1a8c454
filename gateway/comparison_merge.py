"""Merge the prior look-up into a scan's answer: the comparison block, the SR, the caption.

The serving process runs the look-up beside the analysis (gateway/prior.py) and, once the
worker's answer is in, adds what came of it: `ScanResult.comparison` (available or why not),
the comparison group and the prior's reference in the SR (gateway/comparison_sr.py), and
one caption line on the overlay. A failure here costs the comparison, never the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ctjoint.gateway.comparison import Comparison, ComparisonError, compare
from ctjoint.gateway.comparison_sr import add_comparison
from ctjoint.gateway.dicom_outputs import ScanObjects
from ctjoint.gateway.limits import cpu_bound
from ctjoint.gateway.prior import PriorKeys, PriorOutcome
from ctjoint.gateway.prior_report import measurements_from_message
from ctjoint.v1 import scan_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorMatch:
    """The current scan's keys (or why it has none) and what the look-up found."""

    keys: PriorKeys | str
    outcome: PriorOutcome


def comparison_to_proto(comparison: Comparison) -> scan_pb2.Comparison:
    message = scan_pb2.Comparison(available=comparison.available, reason=comparison.reason)
    if not comparison.available:
        return message
    message.category = comparison.category
    message.prior_study_date = comparison.prior_study_date
    if comparison.interval_days is not None:
        message.interval_days = comparison.interval_days
    message.prior_label = comparison.prior_label
    message.current_label = comparison.current_label
    message.prior_total_ml = comparison.prior_total_ml
    message.current_total_ml = comparison.current_total_ml
    message.rule = comparison.rule
    for name, change in comparison.changes.items():
        item = message.changes.add(measure=name, absolute=change.absolute)
        if change.relative is not None:
            item.relative = change.relative
    return message


def _amend(
    match: PriorMatch, result: scan_pb2.ScanResult, objects: ScanObjects | BaseException
) -> tuple[Comparison, ScanObjects | BaseException]:
    """The comparison of a found prior, and the SR and overlay that carry it (CPU work)."""
    report = match.outcome.report
    if report is None or isinstance(match.keys, str):
        return Comparison.unavailable(match.outcome.reason or "no prior analysis"), objects
    try:
        current = measurements_from_message(result, match.keys.study_datetime)
        comparison = compare(report.measurements, current)
    except ComparisonError as err:
        return Comparison.unavailable(str(err)), objects
    if isinstance(objects, ScanObjects) and objects.sr:
        amended = add_comparison(objects.sr, comparison, report.reference)
        objects = ScanObjects(objects.seg, amended)
        if result.sr_dicom:
            result.sr_dicom = amended
    if result.overlay_png:
        from ctjoint.render import add_caption

        result.overlay_png = add_caption(result.overlay_png, comparison.caption)
    return comparison, objects


async def merge_comparison(
    task: asyncio.Future[PriorMatch],
    result: scan_pb2.ScanResult,
    objects: ScanObjects | BaseException,
) -> ScanObjects | BaseException:
    """Set `result.comparison` from the look-up (bounded by its own deadline) and return the
    objects for the PACS, the SR amended when a prior was found.

    Two timings go into the answer: `prior_lookup`, the look-up's own time (beside the
    analysis), and `prior_wait`, how long the answer waited for it after the analysis: the
    latency the look-up added."""
    try:
        started = time.perf_counter()
        match = await task
        waited_ms = (time.perf_counter() - started) * 1e3
        result.timings.add(stage="prior_lookup", milliseconds=round(match.outcome.elapsed_ms, 3))
        result.timings.add(stage="prior_wait", milliseconds=round(waited_ms, 3))
        comparison, objects = await cpu_bound(_amend, match, result, objects)
    except Exception as err:  # a bug here must not cost the scan its answer
        log.error("comparison with the prior failed: %s", type(err).__name__)
        comparison = Comparison.unavailable(f"the comparison failed ({type(err).__name__})")
    result.comparison.CopyFrom(comparison_to_proto(comparison))
    return objects


__all__ = ["PriorMatch", "comparison_to_proto", "merge_comparison"]
