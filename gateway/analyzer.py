"""The scan analyser: one scan's files or volume through preprocessing, inference and
postprocessing on any `InferenceBackend`, into a `ScanAnalysis`.

Intake (gateway/intake.py) takes the files; the model's plan drives preprocessing
(gateway/preprocess.py); inference runs batch by batch, or streams while files arrive
(gateway/streaming.py); outputs go back to the source grid (gateway/source_grid.py) and the
lungs are quantified beside inference (gateway/quantify.py). The steps of one scan run in a
task group (gateway/tasks.py): a failing step cancels the others and its error is the scan's.
CPU-heavy steps run in worker threads so a gateway's event loop keeps serving other scans.

Size: one job, one scan's steps in their order, with the two-network case and the series
switch; intake, inference, quantification and fusion are modules of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset

from ctjoint.contracts import CLASS_NAMES, MODEL_BOTH, MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.gateway.aggregate import softmax
from ctjoint.gateway.backends.base import InferenceBackend, ModelInfo, ModelOutputs
from ctjoint.gateway.density import AERATED_MAX_HU, drop_aerated
from ctjoint.gateway.fusion import fuse_results
from ctjoint.gateway.inference import ScanInference, check_outputs, inferred_progress
from ctjoint.gateway.intake import DicomInput, Progress, ProgressCallback, SeriesIntake
from ctjoint.gateway.limits import cpu_bound
from ctjoint.gateway.preprocess import (
    PreprocessPlan,
    ResampleGeometry,
    context_view,
)
from ctjoint.gateway.quantify import (
    AirLungs,
    LesionVoxels,
    air_lungs,
    lesion_statistics,
    quantify_lungs,
)
from ctjoint.gateway.result import (
    LesionStatistics,
    ScanResult,
    SeriesInfo,
    StageTimings,
)
from ctjoint.gateway.review import measure, review_of
from ctjoint.gateway.series import CtVolume, SeriesSwitch
from ctjoint.gateway.streaming import StreamingInference, StreamStats
from ctjoint.gateway.tasks import Stopwatch, task_group

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16

# What MODEL_BOTH runs, in this order: the first one's masks, CAM and slice evidence are the
# fused answer's (`fuse_analyses`).
BOTH_MODELS: tuple[str, ...] = (MODEL_JCS2D, MODEL_DEEPSC3D)


@dataclass(frozen=True, eq=False)
class ScanAnalysis:
    """A result plus the arrays it was computed from, for overlays and the SEG writer.

    `label_map` is uint8 [Z, Y, X] on the source grid (values: SEG_CLASS_NAMES indices), in the
    slice order of `volume` (ascending along the slice normal).
    """

    result: ScanResult
    volume: CtVolume
    label_map: np.ndarray
    # Lungs on the same grid (0 outside, 1 right, 2 left; gateway/lesions.py); None for
    # analyses built without one.
    lung_map: np.ndarray | None = None
    # The first file's data set without pixel data (patient, study, equipment): what the SEG
    # and SR writers copy and reference. None for volumes that did not come from DICOM.
    source_header: Dataset | None = None
    # Class activation map of the scan's label on the model's coarse grid: [Z, h, w] for
    # 2.5D (one per source slice), [d, h, w] for 3D; None when the model has no `cam` output.
    # `cam_on_source` maps it onto the source grid.
    cam: np.ndarray | None = None
    # What streaming inference reused (2.5D models fed file by file); None otherwise.
    stream: StreamStats | None = None

    @property
    def volume_hu(self) -> np.ndarray:
        return self.volume.hu


class ScanAnalyzer:
    """Runs the pipeline on one backend. Safe to share between concurrent scans.

    `batch_size` is the number of 2.5D slices per inference request; `max_in_flight` how many
    such requests one scan keeps outstanding (1 for in-process CPU; more pays off with Triton's
    dynamic batching across replicas). With `streaming` (the gateway's choice), files are
    preprocessed as they arrive and a 2.5D model infers slices before the last file is in
    (gateway/streaming.py), its "inferred" progress counting stacks as they are inferred;
    without it, everything after assembly runs on the whole volume, batch after batch. Both
    give the same result. `aerated_max_hu`: the density rule's limit (gateway/density.py);
    None leaves the networks' lesion maps as they are (benchmarks of the rule itself).
    """

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int = 1,
        skip_localizers: bool = True,
        streaming: bool = False,
        aerated_max_hu: float | None = AERATED_MAX_HU,
    ) -> None:
        if batch_size < 1 or max_in_flight < 1:
            raise ValueError("batch_size and max_in_flight must be at least 1")
        self.skip_localizers = skip_localizers
        self.backend = backend
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.streaming = streaming
        self.aerated_max_hu = aerated_max_hu

    async def analyze_files(
        self,
        inputs: Iterable[DicomInput] | AsyncIterable[DicomInput],
        model: str,
        *,
        expected_slices: int | None = None,
        max_slices: int | None = None,
        progress: ProgressCallback | None = None,
        file_numbers: Sequence[int] | None = None,
    ) -> ScanAnalysis:
        """Validate and assemble the files, then analyse the volume with `model`, or with
        every network when `model` is MODEL_BOTH (`fuse_analyses`). When the files hold
        several series of a study, the one the rules choose (gateway/series.py StudySorter)."""
        try:
            return await self._analyze_files(
                inputs,
                model,
                expected_slices=expected_slices,
                max_slices=max_slices,
                progress=progress,
                file_numbers=file_numbers,
            )
        except SeriesSwitch as switch:
            files, selection = switch.files, switch.selection
        # The series assembled as files arrived is not the one chosen: analyse the chosen one
        # from the files set aside, keeping their numbers in the stream. Outside the except
        # block, so that its traceback, and the first series' volume it holds, are gone. The
        # rules' notes already count the chosen series' localizers (never set aside).
        chosen = await self._analyze_files(
            [(f.name, f.data) for f in files],
            model,
            expected_slices=len(files),
            max_slices=max_slices,
            progress=progress,
            file_numbers=[f.number for f in files],
        )
        return replace(chosen, result=replace(chosen.result, series_selection=selection))

    async def _analyze_files(
        self,
        inputs: Iterable[DicomInput] | AsyncIterable[DicomInput],
        model: str,
        *,
        expected_slices: int | None = None,
        max_slices: int | None = None,
        progress: ProgressCallback | None = None,
        file_numbers: Sequence[int] | None = None,
    ) -> ScanAnalysis:
        started = time.perf_counter()
        models = BOTH_MODELS if model == MODEL_BOTH else (model,)
        # An unknown model fails before any file is read.
        infos = [self.backend.model_info(name) for name in models]
        # The first network's plan drives what is done as files arrive (and its streaming).
        info = infos[0]
        plan = info.plan if self.streaming else None
        intake = SeriesIntake(
            expected_slices=expected_slices,
            max_slices=max_slices,
            progress=progress,
            skip_localizers=self.skip_localizers,
            # The in-plane half of preprocessing needs only the slice: done as files arrive
            # (for the 3D model too, whose z resampling waits for the whole series).
            plan=plan,
            file_numbers=file_numbers,
        )
        streamer: StreamingInference | None = None
        if self.streaming and info.plan.preprocessor().per_slice:
            streamer = StreamingInference(
                self.backend,
                info,
                intake.planes,
                batch_size=self.batch_size,
                max_in_flight=self.max_in_flight,
                expected_slices=expected_slices,
                check=check_outputs,
                on_inferred=inferred_progress(progress, expected_slices),
                slice_labels=intake.label_slices,
            )
            intake.on_slice = streamer.add
        try:
            if isinstance(inputs, AsyncIterable):
                async for name, data in inputs:
                    await intake.add(data, name)
            else:
                for name, data in inputs:
                    await intake.add(data, name)
            volume = await intake.finish()
            prior = StageTimings(
                read_ms=intake.read_ms,
                validate_ms=intake.validate_ms,
                preprocess_ms=intake.preprocess_ms,
            )
            if len(models) == 1:
                analysis = await self.analyze_volume(
                    volume,
                    model,
                    progress=progress,
                    prior=prior,
                    prepared=_Prepared(intake, streamer, plan),
                )
            else:
                # One decode, one assembly, one lung segmentation; each network its own input.
                order = intake.sorted_slots
                async with task_group() as tasks:
                    air = tasks.create_task(cpu_bound(air_lungs, volume, intake.lung_slices, order))
                    members = []
                    for i, name in enumerate(models):
                        first = i == 0
                        prepared = _Prepared(
                            intake, streamer if first else None, plan if first else None, air
                        )
                        members.append(
                            await self.analyze_volume(
                                volume,
                                name,
                                progress=progress,
                                prior=prior if first else None,
                                prepared=prepared,
                            )
                        )
                analysis = fuse_analyses(members)
        finally:
            if streamer is not None:
                # A failed or cancelled scan leaves no request of its own running.
                await streamer.cancel()
        total = (time.perf_counter() - started) * 1000.0
        timings = replace(analysis.result.timings, total_ms=total)
        return replace(
            analysis,
            result=replace(analysis.result, timings=timings, series_selection=intake.selection),
            source_header=intake.header,
        )

    async def analyze_volume(
        self,
        volume: CtVolume,
        model: str,
        *,
        progress: ProgressCallback | None = None,
        prior: StageTimings | None = None,
        prepared: _Prepared | None = None,
    ) -> ScanAnalysis:
        """Analyse an assembled volume. `prior` carries read/validate/preprocess times of an
        intake; `prepared` what it already did (in-plane slices, streamed inference)."""
        started = time.perf_counter()
        info = self.backend.model_info(model)
        z = volume.shape[0]
        before = prior or StageTimings()
        clock = Stopwatch()
        clock.add("preprocess", before.preprocess_ms)
        # An intake has done the per-slice half of the lungs already: postprocessing done early.
        lung_slices = None if prepared is None else prepared.intake.lung_slices
        order = range(z) if prepared is None else prepared.intake.sorted_slots
        if prepared is not None:
            clock.add("postprocess", prepared.intake.lungs_ms)

        async with task_group() as tasks:
            # The lungs' air segmentation needs only HU: it runs while the model does, and the
            # model's lesions are added afterwards (gateway/quantify.py). Shared by the
            # networks of MODEL_BOTH, it is shielded from one member's cancellation.
            if prepared is not None and prepared.air is not None:
                air: Awaitable[AirLungs] = asyncio.shield(prepared.air)
            else:
                air = tasks.create_task(cpu_bound(air_lungs, volume, lung_slices, order))
            with clock.timed("preprocess"):
                image, geometry = await self._preprocess(info, volume, prepared)
            if progress is not None:
                progress(Progress("preprocessed", z, z))
            inference = ScanInference(
                self.backend, batch_size=self.batch_size, max_in_flight=self.max_in_flight
            )
            outputs, infer_ms, stream, streamed_labels = await inference.timed(
                info,
                image,
                z,
                progress,
                streamer=None if prepared is None else prepared.streamer,
                order=() if prepared is None else prepared.intake.sorted_slots,
            )
            del image
            if prepared is not None and prepared.plan == info.plan:
                # The input is made and inferred: its in-plane slices are done with (the
                # other network of MODEL_BOTH makes its own).
                prepared.intake.release_planes()
            with clock.timed("postprocess"):
                labels = await cpu_bound(
                    _labels, info, outputs, geometry, volume, streamed_labels, self.aerated_max_hu
                )
            probabilities, slice_probs, label_map, voxels, lesions = labels
            # The label map holds what the logits said: they go (79 MB at 400 2.5D slices).
            model_cam, model_ms = outputs.cam, outputs.model_ms
            del outputs, labels
            done, lungs = await quantify_lungs(
                air,
                label_map,
                volume,
                # The networks of MODEL_BOTH share the air lungs: each writes into a copy.
                keep_air=prepared is not None and prepared.air is not None,
                voxels=voxels,
            )
        # Busy time: the air step overlapped inference.
        clock.add("postprocess", done.ms + lungs.ms)
        with clock.timed("postprocess"):
            label = CLASS_NAMES[int(np.argmax(probabilities))]
            # From what the quantifier counted: no pass over a volume.
            signals = measure(
                label=label,
                probabilities=dict(zip(CLASS_NAMES, probabilities.tolist(), strict=True)),
                location=lungs.location,
                slice_lung_voxels=lungs.slice_lung_voxels,
                voxel_ml=volume.voxel_volume_ml,
                spacing_mm=volume.spacing_mm,
                slice_thickness_mm=volume.slice_thickness_mm,
            )
        if progress is not None:
            progress(Progress("postprocessed", z, z))
        elapsed = (time.perf_counter() - started) * 1000.0
        timings = StageTimings(
            read_ms=before.read_ms,
            validate_ms=before.validate_ms,
            preprocess_ms=clock["preprocess"],
            infer_ms=infer_ms,
            postprocess_ms=clock["postprocess"],
            total_ms=before.read_ms + before.validate_ms + before.preprocess_ms + elapsed,
            model_ms=model_ms,
        )
        result = ScanResult.from_probabilities(
            probabilities.tolist(),
            lesions=lesions,
            quantification=lungs.quantification,
            series=SeriesInfo(
                slices=z,
                rows=volume.shape[1],
                columns=volume.shape[2],
                spacing_mm=volume.spacing_mm,
                slice_thickness_mm=volume.slice_thickness_mm,
            ),
            model=info.name,
            model_version=info.version,
            model_sha256=info.weights_sha256,
            backend=self.backend.name,
            timings=timings,
            review=review_of(signals, info.name, label=label),
            slice_probabilities=(
                {}
                if slice_probs is None
                else {name: tuple(slice_probs[:, i]) for i, name in enumerate(CLASS_NAMES)}
            ),
        )
        logger.info(
            "analysed %d slices with %s: %s (p=%.3f), lesions %.1f mL, %.0f ms "
            "(preprocess %.0f, infer %.0f, postprocess %.0f)",
            z,
            info.name,
            result.label,
            result.probabilities[result.label],
            lesions.total_volume_ml,
            timings.total_ms,
            timings.preprocess_ms,
            infer_ms,
            timings.postprocess_ms,
        )
        cam = None
        if model_cam is not None:
            # The scan label's map (not each slice's own argmax). 2.5D: one map per source
            # slice; 3D: the one volume's map.
            label_index = CLASS_NAMES.index(result.label)
            cam = info.plan.preprocessor().scan_cam(model_cam, label_index)
        return ScanAnalysis(
            result=result,
            volume=volume,
            label_map=label_map,
            lung_map=lungs.lung_map,
            cam=cam,
            stream=stream,
        )

    async def _preprocess(
        self, info: ModelInfo, volume: CtVolume, prepared: _Prepared | None
    ) -> tuple[np.ndarray, ResampleGeometry]:
        """The model's input and its geometry, from what an intake prepared when it can."""
        preprocessor = info.plan.preprocessor()
        # In-plane slices an intake prepared serve only the plan they were made for.
        reuse = prepared is not None and prepared.plan == info.plan
        if prepared is not None and reuse and prepared.streamer is not None:
            # Streaming (per-slice models) needs only the stacks it did not infer: a view,
            # copied per stack.
            context = info.plan.context
            padded = prepared.intake.sorted_planes(pad=context)
            if padded is None:
                raise RuntimeError("a streamed scan has no in-plane slices")
            return context_view(padded, context), preprocessor.geometry(volume.shape)
        planes = prepared.intake.sorted_planes() if prepared is not None and reuse else None
        if planes is None:
            return await cpu_bound(preprocessor.run, volume.hu)
        image = await cpu_bound(preprocessor.from_planes, planes)
        return image, preprocessor.geometry(volume.shape)


def fuse_analyses(members: Sequence[ScanAnalysis]) -> ScanAnalysis:
    """One answer from several networks' analyses of the same volume: the first one's arrays
    with the fused result (gateway/fusion.py)."""
    if len(members) < 2:
        raise ValueError("fusion needs at least two analyses")
    return replace(members[0], result=fuse_results([m.result for m in members]))


@dataclass(eq=False)
class _Prepared:
    """What an intake did while files arrived, handed to `analyze_volume`: its in-plane slices
    (made for `plan`; None: none to reuse), its streamed inference, and the air lungs when
    several networks share them."""

    intake: SeriesIntake
    streamer: StreamingInference | None
    plan: PreprocessPlan | None = None
    air: asyncio.Task[AirLungs] | None = None


_Labels = tuple[np.ndarray, np.ndarray | None, np.ndarray, LesionVoxels, LesionStatistics]


def _labels(
    info: ModelInfo,
    outputs: ModelOutputs,
    geometry: ResampleGeometry,
    volume: CtVolume,
    known: dict[int, np.ndarray | None] | None,
    aerated_max_hu: float | None,
) -> _Labels:
    """Probabilities (scan and, for 2.5D, per slice), the source-grid label map, its lesion
    voxels and lesion statistics. `known`: label maps of 2.5D slices made while the series
    streamed in (None: no lesion), by slice; `aerated_max_hu`: the density rule's limit (None:
    off)."""
    preprocessor = info.plan.preprocessor()
    probabilities, slice_probs = preprocessor.scan_probabilities(
        softmax(outputs.cls_logits, axis=1)
    )
    label_map = preprocessor.to_source(outputs.seg_logits, geometry, known)
    voxels = LesionVoxels.of(label_map)
    if aerated_max_hu is not None:
        voxels = drop_aerated(label_map, voxels, volume.hu, aerated_max_hu)
    return probabilities, slice_probs, label_map, voxels, lesion_statistics(voxels, volume)


__all__ = [
    "BOTH_MODELS",
    "DEFAULT_BATCH_SIZE",
    "ScanAnalysis",
    "ScanAnalyzer",
    "fuse_analyses",
]
