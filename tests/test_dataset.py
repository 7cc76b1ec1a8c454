"""Case discovery in both layouts, NIfTI reorientation, labels, splits and the cache."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import GROUND_GLASS_HU, Lesion, write_ct_series
from synthetic_ct import synthetic_case, write_nifti_set

from ctjoint.contracts import CASE_TRUTH_DIR, SPLITS, TRUTH_LESIONS
from ctjoint.export import dataset
from ctjoint.export.dataset import (
    CaseCache,
    DatasetError,
    context_window,
    discover_cases,
    hash_split,
    load_case,
)
from ctjoint.gateway.preprocess import PreprocessPlan, preprocess_volume


@pytest.fixture
def nifti_set(tmp_path: Path) -> Path:
    return write_nifti_set(tmp_path / "set", per_class=4, size=32, slices=8)


def test_nifti_layout_lists_every_case_with_its_split(nifti_set: Path) -> None:
    cases = discover_cases(nifti_set)
    assert len(cases) == 12
    assert {c.layout for c in cases} == {"nifti"}
    assert [c.split for c in cases[:4]] == ["train", "train", "val", "test"]
    assert len(discover_cases(nifti_set, "val")) == 3


def test_missing_split_column_is_filled_by_case_hash(tmp_path: Path) -> None:
    root = write_nifti_set(tmp_path / "set", per_class=2, size=32, slices=8, with_split=False)
    cases = discover_cases(root)
    assert [c.split for c in cases] == [hash_split(c.case_id) for c in cases]
    assert {c.split for c in cases} <= set(SPLITS)


def test_hash_split_is_roughly_70_15_15() -> None:
    splits = [hash_split(f"case-{i}") for i in range(3000)]
    assert splits.count("train") / 3000 == pytest.approx(0.70, abs=0.03)
    assert splits.count("val") / 3000 == pytest.approx(0.15, abs=0.03)


def test_nifti_volume_is_reoriented_onto_the_dicom_axes(tmp_path: Path) -> None:
    # write_nifti_set stores [Z, Y, X] arrays as RAS+ NIfTI (x and y flipped); loading must undo
    # the flips so image and mask come back exactly as generated (its first case, same seed).
    root = write_nifti_set(tmp_path / "set", per_class=1, seed=5, size=32, slices=8)
    expected_hu, expected_lesions = synthetic_case("covid19", np.random.default_rng(5), 32, 8)
    ref = next(c for c in discover_cases(root) if c.case_id == "covid19-00")
    loaded = load_case(ref)
    np.testing.assert_array_equal(loaded.volume.hu, expected_hu.astype(np.int16))
    np.testing.assert_array_equal(loaded.lesions, expected_lesions)
    assert loaded.volume.spacing_mm == pytest.approx((2.5, 0.8, 0.8))


def test_case_without_mask_file_is_lesion_free(nifti_set: Path) -> None:
    (nifti_set / "masks" / "normal-00.nii.gz").unlink()
    ref = next(c for c in discover_cases(nifti_set) if c.case_id == "normal-00")
    assert ref.mask is None
    assert not load_case(ref).lesions.any()


def test_mask_values_outside_the_seg_classes_are_refused(nifti_set: Path) -> None:
    path = nifti_set / "masks" / "cap-00.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), path)
    ref = next(c for c in discover_cases(nifti_set) if c.case_id == "cap-00")
    with pytest.raises(DatasetError, match=r"mask values must lie in 0\.\.2"):
        load_case(ref)


def test_unknown_label_is_refused_with_its_line(nifti_set: Path) -> None:
    table = nifti_set / "labels.csv"
    table.write_text(table.read_text().replace("cap-01,cap", "cap-01,flu"))
    with pytest.raises(DatasetError, match=r"labels.csv:7: unknown label 'flu'"):
        discover_cases(nifti_set)


def test_folder_without_labels_csv_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no labels\.csv"):
        discover_cases(tmp_path)


def test_dicom_layout_reads_series_and_transposed_truth(tmp_path: Path) -> None:
    root = tmp_path / "set"
    lesion = Lesion(2, 5, 10, 16, 8, 14, GROUND_GLASS_HU)
    write_ct_series(root / "c1" / "series", slices=8, size=32, lesions=(lesion,))
    truth = np.zeros((8, 32, 32), dtype=np.uint8)
    truth[2:5, 10:16, 8:14] = 1
    (root / "c1" / CASE_TRUTH_DIR).mkdir()
    nib.save(
        nib.Nifti1Image(truth.transpose(2, 1, 0), np.eye(4)),
        root / "c1" / CASE_TRUTH_DIR / TRUTH_LESIONS,
    )
    (root / "labels.csv").write_text("case,label,split\nc1,covid19,test\n")
    (ref,) = discover_cases(root)
    loaded = load_case(ref)
    assert ref.layout == "dicom"
    np.testing.assert_array_equal(loaded.lesions, truth)
    assert np.all(loaded.volume.hu[loaded.lesions == 1] == GROUND_GLASS_HU)


def test_context_window_matches_the_serving_stack() -> None:
    planes = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    plan = PreprocessPlan.default("jcs2d", 16, 16)
    hu = planes * plan.norm_std * plan.window_width  # any volume works: compare stacks only
    served, _ = preprocess_volume(hu, plan)
    centre = served[:, plan.context]
    for z in range(5):
        np.testing.assert_array_equal(context_window(centre, z, plan.context), served[z])


def test_cache_serves_a_prepared_case_without_rereading(
    nifti_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = discover_cases(nifti_set)[0]
    cache = CaseCache(tmp_path / "cache", PreprocessPlan.default("deepsc3d", 16, 16, 8))
    first = cache.get(ref)

    def fail(_: object) -> None:
        raise AssertionError("the cache re-read its source")

    monkeypatch.setattr(dataset, "load_case", fail)
    second = cache.get(ref)
    np.testing.assert_array_equal(first.image, second.image)
    assert first.image.shape == (8, 16, 16)


def test_two_writers_of_one_cache_entry_do_not_trip_over_each_other(
    nifti_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs sharing a cache prepare the same case at once: both have written their
    partial file before either moves it into place (a barrier holds them there)."""
    ref = discover_cases(nifti_set)[0]
    plan = PreprocessPlan.default("deepsc3d", 16, 16, 8)
    both_written = threading.Barrier(2, timeout=30)
    savez = np.savez

    def savez_then_wait(file: object, **arrays: object) -> None:
        savez(file, **arrays)  # type: ignore[arg-type]
        both_written.wait()

    monkeypatch.setattr(dataset.np, "savez", savez_then_wait)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(CaseCache(tmp_path / "shared", plan).get, ref) for _ in range(2)]
        first, second = (run.result() for run in runs)
    monkeypatch.undo()
    np.testing.assert_array_equal(first.image, second.image)
    cache = CaseCache(tmp_path / "shared", plan)
    assert cache.is_current(ref)
    names = [entry.name for entry in cache.folder.iterdir()]  # no partial file left behind
    assert len(names) == 1 and names[0].startswith(ref.case_id) and ".tmp" not in names[0]


def test_a_failed_cache_write_leaves_no_partial_file(
    nifti_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = discover_cases(nifti_set)[0]
    cache = CaseCache(tmp_path / "cache", PreprocessPlan.default("deepsc3d", 16, 16, 8))

    def disk_full(file: object, **arrays: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset.np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        cache.get(ref)
    assert list(cache.folder.iterdir()) == []


def test_cache_rebuilds_when_the_source_changes(nifti_set: Path, tmp_path: Path) -> None:
    ref = discover_cases(nifti_set)[0]
    cache = CaseCache(tmp_path / "cache", PreprocessPlan.default("deepsc3d", 16, 16, 8))
    cache.get(ref)
    assert ref.mask is not None
    image = nib.load(ref.mask)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), ref.mask)
    assert not cache.get(ref).labels.any()


def test_worker_processes_fill_the_cache_with_what_one_process_makes(
    nifti_set: Path, tmp_path: Path
) -> None:
    plan = PreprocessPlan.default("deepsc3d", 32, 32, 8)
    refs = discover_cases(nifti_set)
    ticks: list[int] = []
    apart = CaseCache(tmp_path / "apart", plan).get_many(refs, lambda: ticks.append(1), workers=3)
    alone = CaseCache(tmp_path / "alone", plan).get_many(refs)
    assert len(ticks) == len(refs)  # one progress tick per case, prepared apart or not
    for a, b in zip(apart, alone, strict=True):
        assert (a.case_id, a.label) == (b.case_id, b.label)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
        assert a.fractions is not None and b.fractions is not None
        assert np.array_equal(a.fractions, b.fractions)
    cache = CaseCache(tmp_path / "apart", plan)
    assert all(cache.is_current(ref) for ref in refs)
    with pytest.raises(DatasetError, match="workers must be at least 1, not 0"):
        cache.get_many(refs, workers=0)
