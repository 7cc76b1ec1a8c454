"""Streaming inference (gateway/streaming.py): slices inferred while the series arrives give
exactly the whole-volume answer, whatever the arrival order, and a bad file mid-stream still
fails the scan cleanly with nothing left running."""

from __future__ import annotations

import asyncio
import random
import re
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import figures
import grpc
import numpy as np
import pytest
from dicom_factory import (
    CONSOLIDATION_HU,
    GROUND_GLASS_HU,
    SMALL_SERIES_LESIONS,
    Lesion,
    chest_volume,
    write_ct_series,
)
from gateway_process import GatewayProcess, analyze, file_bytes
from pydicom import dcmread
from pydicom.uid import generate_uid

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, SEG_CLASS_NAMES
from ctjoint.gateway import intake as intake_module
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.errors import DuplicateSliceError, MixedSeriesError
from ctjoint.gateway.lesions import segment_lungs
from ctjoint.gateway.preprocess import (
    PreprocessPlan,
    ResampleGeometry,
    SliceStacks,
    inplane_slices,
    resize_inplane,
    slice_label_maps,
    source_label_map,
    window_normalise,
)
from ctjoint.gateway.quantify import (
    air_lungs,
    lesions_in_lungs,
)
from ctjoint.gateway.series import CtVolume

SLICES = 24
# Lesions spread over the series, so many slices carry evidence and masks.
LESIONS = (
    *SMALL_SERIES_LESIONS,
    Lesion(9, 14, 8, 14, 6, 12, GROUND_GLASS_HU),
    Lesion(16, 21, 18, 24, 20, 26, CONSOLIDATION_HU),
)
# Seconds between files in the paced in-process runs: the tiny contract model infers a batch
# in a few ms, so each stack is done before the next file comes.
PACE_S = 0.02
_REUSED = re.compile(r"request_id=(\S+) streamed inference: (\d+) of (\d+) slices reused")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("stream") / "series"
    return write_ct_series(folder, slices=SLICES, size=32, lesions=LESIONS)


@pytest.fixture(scope="module")
def other_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("other") / "series"
    return write_ct_series(folder, slices=4, size=32)


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log, "--model", MODEL_JCS2D).start()
    try:
        yield process
    finally:
        process.stop()


def _ordered(items: Sequence[bytes], order: str) -> list[bytes]:
    if order == "reversed":
        return list(items)[::-1]
    if order == "shuffled":
        return random.Random(7).sample(list(items), len(items))
    return list(items)


def _reference(files: Sequence[bytes], model_dir: Path) -> ScanAnalysis:
    """The whole-volume path: no streaming, every stack inferred after assembly."""

    async def run() -> ScanAnalysis:
        async with EmbeddedBackend([MODEL_JCS2D], model_dir=model_dir) as backend:
            analyzer = ScanAnalyzer(backend, streaming=False)
            return await analyzer.analyze_files([("", f) for f in files], MODEL_JCS2D)

    return asyncio.run(run())


async def _paced(files: Sequence[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    for content in files:
        yield "", content
        await asyncio.sleep(PACE_S)


def _streamed(
    files: Sequence[bytes], model_dir: Path, *, expected: int | None
) -> tuple[ScanAnalysis, int]:
    """A streaming analysis of files arriving one by one, and the asyncio tasks left after."""

    async def run() -> tuple[ScanAnalysis, int]:
        async with EmbeddedBackend([MODEL_JCS2D], model_dir=model_dir) as backend:
            analyzer = ScanAnalyzer(backend, streaming=True, batch_size=4)
            analysis = await analyzer.analyze_files(
                _paced(files), MODEL_JCS2D, expected_slices=expected
            )
            return analysis, len(asyncio.all_tasks()) - 1

    return asyncio.run(run())


@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_the_gateway_streams_and_answers_exactly_as_the_whole_volume_path(
    order: str, series: list[Path], gateway: GatewayProcess, contract_model_dir: Path
) -> None:
    files = _ordered(file_bytes(series), order)
    reference = _reference(files, contract_model_dir)
    message = analyze(gateway.address, files, masks=True, expected=len(files))

    assert message.label == reference.result.label
    wanted = [reference.result.probabilities[name] for name in message.class_names]
    np.testing.assert_allclose(message.probabilities, wanted, atol=1e-6)
    per_slice = np.array([list(s.probabilities) for s in message.slices])
    expected = np.array(
        [reference.result.slice_probabilities[name] for name in message.class_names]
    ).T
    np.testing.assert_allclose(per_slice, expected, atol=1e-6)
    mask = np.frombuffer(zlib.decompress(message.mask.data), dtype=np.uint8)
    assert list(message.mask.shape) == list(reference.label_map.shape)
    assert np.array_equal(mask.reshape(reference.label_map.shape), reference.label_map)
    assert reference.label_map.max() == SEG_CLASS_NAMES.index("consolidation")

    timings = {t.stage: t.milliseconds for t in message.timings}
    assert 0 < timings["after_last_file"] <= timings["gateway_total"]
    reused = [m for m in _REUSED.finditer(gateway.log()) if m.group(1) == message.request_id]
    assert reused and int(reused[-1].group(3)) == SLICES
    figures.record(
        f"streaming gateway ({order}, {SLICES} slices)",
        reused=int(reused[-1].group(2)),
        after_last_file_ms=round(timings["after_last_file"], 1),
        model_ms=round(timings["model"], 1),
    )


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_series_in_order_are_inferred_while_they_arrive(
    order: str, series: list[Path], contract_model_dir: Path
) -> None:
    files = _ordered(file_bytes(series), order)
    analysis, left = _streamed(files, contract_model_dir, expected=len(files))
    assert analysis.stream is not None
    assert analysis.stream.reused == SLICES
    assert analysis.stream.inferred_at_end == 0
    assert analysis.stream.streamed == SLICES  # nothing was inferred twice
    assert left == 0


def test_a_shuffled_series_repeats_only_the_stacks_whose_neighbours_changed(
    series: list[Path], contract_model_dir: Path
) -> None:
    files = _ordered(file_bytes(series), "shuffled")
    reference = _reference(files, contract_model_dir)
    analysis, left = _streamed(files, contract_model_dir, expected=None)
    assert analysis.stream is not None
    assert analysis.stream.reused + analysis.stream.inferred_at_end == SLICES
    assert analysis.stream.inferred_at_end >= 2  # the two edge stacks wait for the end
    np.testing.assert_allclose(
        analysis.result.slice_probabilities["normal"],
        reference.result.slice_probabilities["normal"],
        atol=1e-6,
    )
    assert np.array_equal(analysis.label_map, reference.label_map)
    assert np.array_equal(analysis.lung_map, reference.lung_map)
    assert left == 0


def test_a_file_of_another_series_mid_stream_fails_the_scan_and_stops_streamed_work(
    series: list[Path], other_series: list[Path], contract_model_dir: Path
) -> None:
    files = [*file_bytes(series[:13]), other_series[0].read_bytes(), *file_bytes(series[13:])]
    left: list[int] = []

    async def run() -> None:
        async with EmbeddedBackend([MODEL_JCS2D], model_dir=contract_model_dir) as backend:
            analyzer = ScanAnalyzer(backend, streaming=True, batch_size=4)
            try:
                await analyzer.analyze_files(_paced(files), MODEL_JCS2D)
            finally:
                left.append(len(asyncio.all_tasks()) - 1)

    with pytest.raises(MixedSeriesError, match=r"^file 14: .*another study"):
        asyncio.run(run())
    assert left == [0]


def test_a_late_duplicate_slice_fails_after_streaming_with_nothing_left_running(
    series: list[Path], contract_model_dir: Path
) -> None:
    # Slice 6 again as another instance: only the sorted series shows two at one position.
    dataset = dcmread(series[5])
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = series[5].parent.parent / "duplicate.dcm"
    dataset.save_as(path)
    files = [*file_bytes(series), path.read_bytes()]

    with pytest.raises(DuplicateSliceError, match="same position"):
        _streamed(files, contract_model_dir, expected=None)


def test_the_gateway_names_the_bad_file_and_then_serves_the_next_scan(
    series: list[Path], other_series: list[Path], gateway: GatewayProcess
) -> None:
    files = [*file_bytes(series[:13]), other_series[0].read_bytes(), *file_bytes(series[13:])]
    with pytest.raises(grpc.RpcError) as failed:
        analyze(gateway.address, files, expected=len(files))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "file 14" in (failed.value.details() or "")
    message = analyze(gateway.address, file_bytes(series), expected=SLICES)
    assert message.label and len(message.slices) == SLICES


def test_in_plane_preprocessing_of_one_slice_equals_that_of_the_volume() -> None:
    plan = PreprocessPlan.default(MODEL_JCS2D, height=32, width=32)
    rng = np.random.default_rng(3)
    hu = rng.normal(-500.0, 500.0, (6, 128, 128)).astype(np.float32)
    volume = inplane_slices(hu, plan)
    alone = np.stack([inplane_slices(plane, plan) for plane in hu])
    assert np.array_equal(volume, alone)
    # The fast path is the documented window -> resize -> normalise, up to float rounding.
    classic = resize_inplane(window_normalise(hu, plan), 32, 32, "area")
    np.testing.assert_allclose(volume, classic, atol=1e-6)


def test_the_3d_model_preprocesses_as_files_arrive_and_answers_the_same(
    series: list[Path], contract_model_dir: Path
) -> None:
    files = _ordered(file_bytes(series), "shuffled")

    async def run(streaming: bool) -> ScanAnalysis:
        async with EmbeddedBackend([MODEL_DEEPSC3D], model_dir=contract_model_dir) as backend:
            analyzer = ScanAnalyzer(backend, streaming=streaming)
            return await analyzer.analyze_files([("", f) for f in files], MODEL_DEEPSC3D)

    streamed, whole = asyncio.run(run(True)), asyncio.run(run(False))
    assert streamed.stream is None  # nothing to infer before the whole scan is in
    assert streamed.result.probabilities == whole.result.probabilities
    assert np.array_equal(streamed.label_map, whole.label_map)
    assert np.array_equal(streamed.lung_map, whole.lung_map)


def test_lesions_added_to_precomputed_air_lungs_give_the_lungs_of_segment_lungs() -> None:
    volume = CtVolume.from_array(chest_volume(12, 64, LESIONS), (2.5, 0.7, 0.7))
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[2:6, 20:30, 8:24] = 1  # reaches from the right lung into the body wall
    labels[7:9, 40:50, 36:60] = 2  # from the left lung out into the air beside the body
    air = air_lungs(volume)
    assert np.count_nonzero((labels > 0) & (air.lungs == 0)) > 0  # lesion voxels outside the air
    combined = lesions_in_lungs(air, labels, volume).added_to(air.lungs)
    assert np.array_equal(combined, segment_lungs(volume, labels))


def test_label_maps_made_while_streaming_join_the_rest_into_the_whole_volume_map() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 3, 16, 16)).astype(np.float32)
    logits[1, 0] += 50.0  # a slice without lesion: streaming keeps None for it
    geometry = ResampleGeometry((6, 40, 40), (6, 16, 16), "2.5d")
    whole = source_label_map(logits, geometry)
    streamed = slice_label_maps(logits[:3], 40, 40)
    assert streamed[1] is None and streamed[0] is not None
    known = dict(enumerate(streamed))  # slices 3..5 were inferred after the last file
    assert np.array_equal(SliceStacks.to_source(logits, geometry, known), whole)
    # Streaming drops a labelled stack's logits: the known slices' labels are used, whatever
    # their rows of logits hold (here: lesion everywhere, had they been read).
    dropped = logits.copy()
    dropped[:3, 1] = 1e6
    assert np.array_equal(SliceStacks.to_source(dropped, geometry, known), whole)


def test_a_failed_label_map_while_streaming_fails_the_scan_and_leaves_nothing_running(
    series: list[Path], contract_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(seg_logits: np.ndarray, rows: int, columns: int) -> list[np.ndarray | None]:
        raise RuntimeError("labelling broke")

    monkeypatch.setattr(intake_module, "slice_label_maps", broken)
    files = _ordered(file_bytes(series), "in_order")
    with pytest.raises(RuntimeError, match="labelling broke"):
        _streamed(files, contract_model_dir, expected=len(files))
