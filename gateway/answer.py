"""One scan from its files to its answer: analysis, then the result message and DICOM objects.

The same code runs wherever a scan is analysed: in a supervised worker process (the gateway's
way, gateway/scan_workers.py) or in the serving process (a gateway given a backend object).
What comes out, `ScanAnswer`, is what the serving process needs and nothing more, small enough
to cross a pipe: the answer message, the objects for the PACS, the figures it logs.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ctjoint.gateway.analysis import (
    DicomInput,
    Progress,
    ProgressCallback,
    ScanAnalysis,
    ScanAnalyzer,
    cam_on_source,
)
from ctjoint.gateway.dicom_outputs import OutputSettings, ScanObjects, analysis_objects
from ctjoint.gateway.errors import InputError
from ctjoint.gateway.limits import cpu_bound
from ctjoint.gateway.wire import MASK_ZLIB_LEVEL, encode_label_map, result_to_proto
from ctjoint.v1 import scan_pb2

_FILE_NUMBER: Final = re.compile(r"^file (\d+)")


@dataclass(frozen=True)
class ScanOrder:
    """What one scan asks for, as the serving process read it from the ScanHeader."""

    model: str
    expected_slices: int | None
    max_slices: int
    outputs: scan_pb2.OutputOptions
    request_id: str
    # SEG and SR are built for a configured PACS even when the caller did not ask for them.
    pacs: bool
    # Seconds left of the caller's deadline when the scan began (None: no deadline).
    deadline_s: float | None = None
    # Whether the caller follows progress (AnalyzeScanWithProgress).
    progress: bool = False
    # The operator's SEG/SR settings (docs/interoperability.md).
    dicom: OutputSettings = field(default_factory=OutputSettings)


@dataclass(frozen=True)
class ScanAnswer:
    """An analysed scan as the serving process needs it."""

    message: scan_pb2.ScanResult
    # SEG and SR for the PACS, or why they could not be built.
    objects: ScanObjects | BaseException
    model: str
    slices: int
    label: str
    lesion_ml: float
    # Busy milliseconds by metrics stage ("decode", "preprocess", "infer", "postprocess").
    stage_ms: tuple[tuple[str, float], ...]
    encode_ms: float


async def analyze_scan(
    analyzer: ScanAnalyzer,
    order: ScanOrder,
    files: AsyncIterable[DicomInput],
    *,
    progress: ProgressCallback | None,
    receive_ms: Callable[[], float],
) -> ScanAnswer:
    """Analyse the files as they come and build the answer; `receive_ms` is read once the
    files are all in (the time spent waiting on the network, reported in the answer)."""
    analysis = await analyzer.analyze_files(
        files,
        order.model,
        expected_slices=order.expected_slices,
        max_slices=order.max_slices,
        progress=progress,
    )
    started = time.perf_counter()
    if progress is not None:
        progress(Progress("postprocessed", 1, 1))
    message, objects = await cpu_bound(
        result_message,
        analysis,
        order.outputs,
        order.request_id,
        receive_ms(),
        pacs=order.pacs,
        dicom=order.dicom,
    )
    timings = analysis.result.timings
    return ScanAnswer(
        message=message,
        objects=objects,
        model=analysis.result.model,
        slices=analysis.result.series.slices,
        label=analysis.result.label,
        lesion_ml=analysis.result.lesions.total_volume_ml,
        stage_ms=(
            ("decode", timings.read_ms + timings.validate_ms),
            ("preprocess", timings.preprocess_ms),
            ("infer", timings.infer_ms),
            ("postprocess", timings.postprocess_ms),
        ),
        encode_ms=(time.perf_counter() - started) * 1000.0,
    )


def result_message(
    analysis: ScanAnalysis,
    outputs: scan_pb2.OutputOptions,
    request_id: str,
    receive_ms: float,
    *,
    pacs: bool,
    dicom: OutputSettings | None = None,
) -> tuple[scan_pb2.ScanResult, ScanObjects | BaseException]:
    """Build the answer (mask compression, PNG, SEG and SR take real time: run it off the
    loop), and the DICOM objects for the PACS, or why they could not be built."""
    numbers = [_file_number(name) for name in analysis.volume.source_names]
    message = result_to_proto(
        analysis.result,
        request_id=request_id,
        slice_file_numbers=numbers,
        extra_timings_ms={"receive": receive_ms},
    )
    if outputs.masks:
        message.mask.CopyFrom(encode_label_map(analysis.label_map))
    if outputs.overlay:
        message.overlay_png = _overlay_png(analysis)
    if outputs.cam and analysis.cam is not None:
        heat = cam_on_source(analysis.cam, analysis.volume.shape)
        message.cam.shape.extend(int(v) for v in heat.shape)
        message.cam.data = zlib.compress(heat.tobytes(), MASK_ZLIB_LEVEL)
    objects: ScanObjects | BaseException = ScanObjects(None, None)
    if outputs.seg or outputs.sr or pacs:
        started = time.perf_counter()
        try:
            objects = analysis_objects(
                analysis, seg=outputs.seg or pacs, sr=outputs.sr or pacs, settings=dicom
            )
        except (InputError, ValueError) as err:
            if outputs.seg or outputs.sr:
                raise
            # Only the PACS wanted them: the scan result still goes back, saying why not.
            objects = err
        else:
            message.seg_dicom = (objects.seg or b"") if outputs.seg else b""
            message.sr_dicom = (objects.sr or b"") if outputs.sr else b""
        message.timings.add(
            stage="dicom_outputs", milliseconds=round((time.perf_counter() - started) * 1e3, 3)
        )
    return message, objects


def _file_number(source: str) -> int:
    match = _FILE_NUMBER.match(source)
    return int(match.group(1)) if match else 0


def _overlay_png(analysis: ScanAnalysis) -> bytes:
    """The overlay montage as PNG bytes, drawn by the same renderer `ctjoint analyze` uses."""
    from ctjoint.render import render_overlay

    return render_overlay(
        analysis.volume.hu,
        analysis.label_map,
        lung_map=analysis.lung_map,
        cam=_cam_slices(analysis),
        caption=analysis.result.review.caption,
    ).png


def _cam_slices(analysis: ScanAnalysis) -> Callable[[list[int]], np.ndarray] | None:
    """The overlay's CAM source: only the slices it shows are mapped onto the source grid."""
    cam = analysis.cam
    if cam is None:
        return None
    shape = analysis.volume.shape
    return lambda slices: cam_on_source(cam, shape, slices)


__all__ = ["ScanAnswer", "ScanOrder", "analyze_scan", "result_message"]
