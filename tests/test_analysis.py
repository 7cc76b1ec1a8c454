"""The analysis pipeline with the embedded backend, on tiny contract models (band rules)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from dicom_factory import (
    SMALL_SERIES_CONSOLIDATION_VOXELS,
    SMALL_SERIES_GROUND_GLASS_VOXELS,
    write_ct_series,
)

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, MODEL_NAMES, ONNX_META_PLAN
from ctjoint.gateway.analysis import (
    Progress,
    ScanAnalyzer,
    analyze_directory,
    source_label_map,
)
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.errors import BackendError, ModelNotFoundError, NotCtError
from ctjoint.gateway.preprocess import ResampleGeometry, logits_to_source_labels
from ctjoint.gateway.series import CtVolume, load_series_dir


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_lesions_are_counted_on_the_source_grid(
    model: str, ct_series_dir: Path, contract_model_dir: Path
) -> None:
    analysis = analyze_directory(ct_series_dir, model=model, model_dir=contract_model_dir)
    lesions = analysis.result.lesions
    assert lesions.voxels == {
        "ground_glass": SMALL_SERIES_GROUND_GLASS_VOXELS,
        "consolidation": SMALL_SERIES_CONSOLIDATION_VOXELS,
    }
    voxel_ml = 2.5 * 0.7 * 0.7 / 1000.0
    assert lesions.volumes_ml["ground_glass"] == pytest.approx(
        SMALL_SERIES_GROUND_GLASS_VOXELS * voxel_ml
    )
    assert lesions.slice_pixels["ground_glass"] == (0, 0, 36, 36, 36, 0, 0, 0)
    assert analysis.label_map.shape == analysis.volume_hu.shape == (8, 32, 32)
    assert analysis.label_map.dtype == np.uint8


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_a_scan_with_ground_glass_is_labelled_covid19(
    model: str, ct_series_dir: Path, contract_model_dir: Path
) -> None:
    result = analyze_directory(ct_series_dir, model=model, model_dir=contract_model_dir).result
    assert result.label == "covid19"
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.model == model
    assert result.backend == EmbeddedBackend.name


def test_a_lesion_free_scan_is_labelled_normal(tmp_path: Path, contract_model_dir: Path) -> None:
    write_ct_series(tmp_path / "s", slices=6, size=32)
    result = analyze_directory(tmp_path / "s", model=MODEL_JCS2D, model_dir=contract_model_dir)
    assert result.result.label == "normal"
    assert result.result.lesions.total_voxels == 0


def test_the_2d_model_reports_probabilities_per_slice(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    result = analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=contract_model_dir)
    per_slice = result.result.slice_probabilities
    assert set(per_slice) == {"covid19", "cap", "normal"}
    assert len(per_slice["covid19"]) == 8
    assert per_slice["normal"][0] > 0.5 > per_slice["normal"][3]


def test_the_3d_model_has_no_per_slice_probabilities(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    result = analyze_directory(ct_series_dir, model=MODEL_DEEPSC3D, model_dir=contract_model_dir)
    assert result.result.slice_probabilities == {}


def test_every_stage_is_timed(ct_series_dir: Path, contract_model_dir: Path) -> None:
    timings = analyze_directory(
        ct_series_dir, model=MODEL_JCS2D, model_dir=contract_model_dir
    ).result.timings
    intake = [timings.read_ms, timings.validate_ms, timings.preprocess_ms]
    assert all(t > 0 for t in [*intake, timings.infer_ms, timings.postprocess_ms])
    # Files are read, validated and preprocessed one after another; inference streams
    # alongside them (its wall time overlaps theirs), so each bounds the total on its own.
    assert timings.total_ms >= sum(intake)
    assert timings.total_ms >= timings.infer_ms
    assert timings.total_ms >= timings.postprocess_ms
    assert 0 < timings.model_ms <= timings.infer_ms


def test_the_json_result_has_no_identifier(ct_series_dir: Path, contract_model_dir: Path) -> None:
    analysis = analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=contract_model_dir)
    text = json.dumps(analysis.result.to_dict())
    assert "Test^Phantom" not in text and "TEST0001" not in text
    assert analysis.volume.series_uid not in text
    assert json.loads(text)["label"] == "covid19"


def test_files_streamed_as_bytes_report_progress(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    events: list[Progress] = []

    async def files() -> AsyncIterator[tuple[str, bytes]]:
        for path in sorted(ct_series_dir.iterdir()):
            yield path.name, path.read_bytes()

    async def run() -> None:
        async with EmbeddedBackend([MODEL_JCS2D], model_dir=contract_model_dir) as backend:
            analyzer = ScanAnalyzer(backend, batch_size=3)
            analysis = await analyzer.analyze_files(files(), MODEL_JCS2D, progress=events.append)
            assert analysis.result.lesions.total_voxels > 0

    asyncio.run(run())
    stages = [e.stage for e in events]
    assert stages.count("validated") == 8
    assert [e.done for e in events if e.stage == "inferred"] == [3, 6, 8]
    assert stages[-1] == "postprocessed"


def test_analysis_of_a_nifti_style_volume(contract_model_dir: Path, ct_series_dir: Path) -> None:
    source = load_series_dir(ct_series_dir)
    volume = CtVolume.from_array(np.array(source.hu), source.spacing_mm)

    async def run() -> int:
        async with EmbeddedBackend([MODEL_DEEPSC3D], model_dir=contract_model_dir) as backend:
            analysis = await ScanAnalyzer(backend).analyze_volume(volume, MODEL_DEEPSC3D)
            return analysis.result.lesions.total_voxels

    expected = SMALL_SERIES_GROUND_GLASS_VOXELS + SMALL_SERIES_CONSOLIDATION_VOXELS
    assert asyncio.run(run()) == expected


def test_a_missing_model_file_says_how_to_build_it(ct_series_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no ONNX file .*make onnx.*ctjoint export onnx"):
        analyze_directory(ct_series_dir, model=MODEL_JCS2D, model_dir=tmp_path)


def test_a_model_without_a_plan_is_refused(contract_model_dir: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(contract_model_dir / "jcs2d.onnx"))
    kept = [p for p in proto.metadata_props if p.key != ONNX_META_PLAN]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "jcs2d.onnx"))

    async def load() -> None:
        await EmbeddedBackend([MODEL_JCS2D], model_dir=tmp_path).load()

    with pytest.raises(BackendError, match="preprocess_plan"):
        asyncio.run(load())


def test_a_model_not_loaded_is_not_found(contract_model_dir: Path, ct_series_dir: Path) -> None:
    async def run() -> None:
        async with EmbeddedBackend([MODEL_JCS2D], model_dir=contract_model_dir) as backend:
            await ScanAnalyzer(backend).analyze_files([], MODEL_DEEPSC3D)

    with pytest.raises(ModelNotFoundError, match="'deepsc3d' is not loaded"):
        asyncio.run(run())


def test_bad_input_fails_before_inference(contract_model_dir: Path, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    folder = tmp_path / "mr"
    folder.mkdir()
    (folder / "MR_small.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    with pytest.raises(NotCtError, match=r"file 1 \(MR_small\.dcm\): Modality"):
        analyze_directory(folder, model=MODEL_JCS2D, model_dir=contract_model_dir)


@pytest.mark.parametrize("kind", ["2.5d", "3d"])
@pytest.mark.parametrize("in_plane", [(24, 20), (5, 7), (8, 8)])
def test_sparse_upsampling_matches_the_shared_dense_definition(
    kind: str, in_plane: tuple[int, int]
) -> None:
    rng = np.random.default_rng(1)
    source = (10, *in_plane)
    if kind == "2.5d":
        logits = rng.normal(size=(10, 3, 8, 8)).astype(np.float32)
        logits[:, 0] += 2.5  # mostly background, some slices entirely
        logits[4:6, 0] -= 10.0  # two slices entirely lesion
        model_shape = (10, 8, 8)
    else:
        logits = rng.normal(size=(1, 3, 4, 8, 8)).astype(np.float32)
        logits[:, 0] += 2.5
        logits[0, 0, :2] += 10.0  # the lower half of the model grid is lesion-free
        model_shape = (4, 8, 8)
    geometry = ResampleGeometry(source, model_shape, kind)  # type: ignore[arg-type]
    np.testing.assert_array_equal(
        source_label_map(logits, geometry), logits_to_source_labels(logits, geometry)
    )


def test_missing_models_can_be_skipped(contract_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "jcs2d.onnx").write_bytes((contract_model_dir / "jcs2d.onnx").read_bytes())

    async def served() -> tuple[str, ...]:
        backend = EmbeddedBackend(MODEL_NAMES, model_dir=tmp_path, skip_missing=True)
        async with backend:
            return backend.models()

    assert asyncio.run(served()) == (MODEL_JCS2D,)
