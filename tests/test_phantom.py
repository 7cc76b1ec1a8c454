"""The synthetic chest-CT phantom: DICOM series, NIfTI truth, findings per class, sets, CLI."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage
from typer.testing import CliRunner

from ctjoint.cli import app
from ctjoint.contracts import (
    CASE_SERIES_DIR,
    CASE_TRUTH_DIR,
    CLASS_NAMES,
    LUNG_LEFT,
    LUNG_RIGHT,
    SEG_CONSOLIDATION,
    SEG_GROUND_GLASS,
    SET_LABELS_CSV,
    SPLITS,
    TRUTH_LESIONS,
)
from ctjoint.export.phantom import (
    PhantomCase,
    PhantomError,
    PhantomVolume,
    generate_phantom,
    mimic_cases,
    plan_set,
    read_truth,
    write_phantom_case,
    write_phantom_set,
)
from ctjoint.export.phantom_anatomy import Anatomy, CoarseLungs, plan_lesions
from ctjoint.export.phantom_families import QuadricBody
from ctjoint.export.phantom_scanner import CONVENTIONS, KERNELS, Scanner, slab_average

SIZE = 128
SLICES = 24


def _write(root: Path, kind: str, seed: int) -> Path:
    out = root / f"{kind}_{seed}"
    write_phantom_case(out, kind=kind, seed=seed, slices=SLICES, size=SIZE)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small case per class (written once for the whole module)."""
    root = tmp_path_factory.mktemp("phantoms")
    return {kind: _write(root, kind, seed=11) for kind in CLASS_NAMES}


def _read_series(case: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((case / CASE_SERIES_DIR).glob("*.dcm"))]


def _hu_volume(case: Path) -> np.ndarray:
    """HU [Z,Y,X] sorted ascending along the slice normal (never by file name)."""
    datasets = _read_series(case)
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )


def _pleura_distance(lungs: np.ndarray, spacing: list[float]) -> np.ndarray:
    return ndimage.distance_transform_edt(lungs > 0, sampling=spacing)


def test_series_is_ct_image_storage_in_explicit_little_endian(cases: dict[str, Path]) -> None:
    for ds in _read_series(cases["covid19"]):
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "CT"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)


@pytest.mark.parametrize(
    ("convention", "representation", "dtype", "intercept", "padding"),
    [
        ("signed", 1, np.int16, 0.0, -2000),
        ("signed-1024", 1, np.int16, -1024.0, -1000),
        ("unsigned-1024", 0, np.uint16, -1024.0, 0),
    ],
)
def test_pixel_conventions_are_written_as_declared(
    tmp_path: Path,
    convention: str,
    representation: int,
    dtype: type,
    intercept: float,
    padding: int,
) -> None:
    # The first seed whose scanner stores pixels this way (the convention is drawn per scan).
    seed = next(
        s
        for s in range(200)
        if Scanner.sample(
            np.random.default_rng(np.random.SeedSequence([s, 0x0C7]).spawn(6)[0]),
            half_width=150.0,
            half_depth=100.0,
            z_span=(0.0, 200.0),
        ).convention
        == convention
    )
    phantom = generate_phantom(kind="normal", seed=seed, slices=3, size=48)
    assert phantom.scanner.convention == convention
    write_phantom_case(tmp_path / "c", kind="normal", seed=seed, slices=3, size=48)
    ds = _read_series(tmp_path / "c")[0]
    assert ds.PixelRepresentation == representation
    assert ds.pixel_array.dtype == dtype
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, intercept)
    assert ds.PixelPaddingValue == padding
    assert ds.pixel_array[0, 0] == padding  # a corner lies outside the reconstruction circle


def test_series_geometry_is_consistent(cases: dict[str, Path]) -> None:
    datasets = _read_series(cases["cap"])
    assert len(datasets) == SLICES
    assert {tuple(map(float, ds.ImageOrientationPatient)) for ds in datasets} == {
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    }
    assert len({tuple(map(float, ds.PixelSpacing)) for ds in datasets}) == 1
    normal = np.array([0.0, 0.0, 1.0])
    along = sorted(
        float(np.dot(normal, list(map(float, ds.ImagePositionPatient)))) for ds in datasets
    )
    gaps = np.diff(along)
    thickness = float(datasets[0].SliceThickness)
    np.testing.assert_allclose(gaps, thickness, atol=1e-3)
    assert float(datasets[0].SpacingBetweenSlices) == thickness
    assert len({ds.SOPInstanceUID for ds in datasets}) == SLICES
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert len({ds.get(keyword) for ds in datasets}) == 1


def test_files_are_written_head_first(cases: dict[str, Path]) -> None:
    # Some scanners name files by UID: order by instance number, never by name.
    datasets = sorted(_read_series(cases["normal"]), key=lambda ds: int(ds.InstanceNumber))
    numbers = [int(ds.InstanceNumber) for ds in datasets]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert numbers == list(range(1, SLICES + 1))
    assert z == sorted(z, reverse=True)


def test_patient_attributes_look_real_and_are_marked_synthetic(cases: dict[str, Path]) -> None:
    ds = _read_series(cases["covid19"])[0]
    last, first = str(ds.PatientName).split("^")
    assert last.isalpha() and first.isalpha()
    assert len(ds.PatientID) == 8 and ds.PatientID.isdigit()
    assert len(ds.PatientBirthDate) == 8 and ds.PatientBirthDate < ds.StudyDate
    assert ds.PatientSex in ("F", "M")
    assert ds.Manufacturer == "ctjoint phantom"
    assert "synthetic" in ds.ImageComments


def test_truth_affine_is_the_dicom_geometry_in_ras(cases: dict[str, Path]) -> None:
    case = cases["covid19"]
    datasets = sorted(_read_series(case), key=lambda ds: float(ds.ImagePositionPatient[2]))
    affine = nib.load(case / CASE_TRUTH_DIR / TRUTH_LESIONS).affine
    row, col = map(float, datasets[0].PixelSpacing)
    for k in (0, len(datasets) - 1):
        x, y, z = map(float, datasets[k].ImagePositionPatient)
        # Voxel (column 3, row 5, slice k) in LPS, then flipped to RAS.
        expected = np.array([-(x + 3 * col), -(y + 5 * row), z, 1.0])
        np.testing.assert_allclose(affine @ np.array([3.0, 5.0, k, 1.0]), expected, atol=1e-3)


def test_truth_round_trips_through_read_truth(tmp_path: Path) -> None:
    phantom = generate_phantom(kind="cap", seed=4, slices=10, size=64)
    write_phantom_case(tmp_path / "case", kind="cap", seed=4, slices=10, size=64)
    lesions, lungs, info = read_truth(tmp_path / "case")
    np.testing.assert_array_equal(lesions, phantom.lesions)
    np.testing.assert_array_equal(lungs, phantom.lungs)
    assert info["label"] == "cap"
    assert info["n_slices"] == 10
    assert info["spacing_mm"] == [phantom.geometry.slice_mm, *[phantom.geometry.pixel_mm] * 2]


def test_truth_slices_match_the_series_sorted_by_position(tmp_path: Path) -> None:
    phantom = generate_phantom(kind="normal", seed=8, slices=12, size=64)
    write_phantom_case(tmp_path / "case", kind="normal", seed=8, slices=12, size=64)
    _assert_same_inside_circle(_hu_volume(tmp_path / "case"), phantom)


def _assert_same_inside_circle(hu: np.ndarray, phantom: PhantomVolume) -> None:
    """Read-back HU equals the phantom in the reconstruction circle, padding outside it."""
    assert phantom.outside is not None
    inside = ~phantom.outside
    np.testing.assert_array_equal(hu[:, inside], phantom.hu[:, inside])
    padding_hu = phantom.scanner.padding + phantom.scanner.intercept
    assert np.all(hu[:, phantom.outside] == padding_hu)


def test_gateway_series_reader_assembles_the_phantom_onto_the_truth_grid(tmp_path: Path) -> None:
    from ctjoint.gateway.series import load_series_dir

    phantom = generate_phantom(kind="cap", seed=12, slices=9, size=64)
    write_phantom_case(tmp_path / "case", kind="cap", seed=12, slices=9, size=64)
    volume = load_series_dir(tmp_path / "case" / CASE_SERIES_DIR)
    lesions, _, info = read_truth(tmp_path / "case")
    _assert_same_inside_circle(volume.hu, phantom)
    assert volume.shape == lesions.shape
    np.testing.assert_allclose(volume.spacing_mm, info["spacing_mm"])


def test_lung_is_about_minus_850_hu(cases: dict[str, Path]) -> None:
    hu = _hu_volume(cases["normal"])
    _, lungs, _ = read_truth(cases["normal"])
    core = ndimage.binary_erosion(lungs > 0, iterations=2)
    assert -900.0 < float(np.median(hu[core])) < -800.0


def test_ground_glass_is_between_minus_700_and_minus_450_hu(cases: dict[str, Path]) -> None:
    hu = _hu_volume(cases["covid19"])
    lesions, _, _ = read_truth(cases["covid19"])
    ggo = lesions == SEG_GROUND_GLASS
    assert ggo.sum() > 100
    assert -700.0 < float(hu[ggo].mean()) < -450.0


def test_consolidation_is_between_minus_100_and_60_hu(cases: dict[str, Path]) -> None:
    hu = _hu_volume(cases["cap"])
    lesions, _, _ = read_truth(cases["cap"])
    consolidation = lesions == SEG_CONSOLIDATION
    assert consolidation.sum() > 100
    # The median, because thin air bronchograms belong to the consolidation class.
    assert -100.0 < float(np.median(hu[consolidation])) < 60.0


def test_covid19_lesions_are_bilateral(cases: dict[str, Path]) -> None:
    lesions, lungs, info = read_truth(cases["covid19"])
    assert set(np.unique(lungs[lesions > 0])) == {LUNG_RIGHT, LUNG_LEFT}
    assert info["bilateral"] is True
    assert 3 <= len(info["lesions"]) <= 8


def test_covid19_lesions_are_more_peripheral_than_cap(cases: dict[str, Path]) -> None:
    mean_depth = {}
    for kind in ("covid19", "cap"):
        lesions, lungs, info = read_truth(cases[kind])
        depth = _pleura_distance(lungs, info["spacing_mm"])
        mean_depth[kind] = float(depth[lesions > 0].mean())
    assert mean_depth["covid19"] < mean_depth["cap"]


def test_cap_is_mostly_unilateral() -> None:
    unilateral = 0
    trials = 40
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        anatomy = Anatomy.sample(rng)
        coarse = CoarseLungs.build(anatomy)
        lesions = plan_lesions(rng, "cap", anatomy, coarse, (anatomy.z_bottom, anatomy.z_top))
        assert lesions
        unilateral += len({lesion.side for lesion in lesions}) == 1
    assert unilateral >= 0.7 * trials


def test_covid19_plans_lesions_in_both_lungs_for_every_seed() -> None:
    for seed in range(20):
        rng = np.random.default_rng(seed)
        anatomy = Anatomy.sample(rng)
        coarse = CoarseLungs.build(anatomy)
        lesions = plan_lesions(rng, "covid19", anatomy, coarse, (anatomy.z_bottom, anatomy.z_top))
        assert {lesion.side for lesion in lesions} == {LUNG_RIGHT, LUNG_LEFT}


def test_covid19_single_slice_still_shows_lesions_in_both_lungs() -> None:
    phantom = generate_phantom(kind="covid19", seed=6, slices=1, size=64)
    assert phantom.lesion_sides() == {LUNG_RIGHT, LUNG_LEFT}


def test_normal_has_no_lesion_voxels(cases: dict[str, Path]) -> None:
    lesions, lungs, info = read_truth(cases["normal"])
    assert not lesions.any()
    assert lungs.any()
    assert info["lesions"] == []
    assert info["lesion_volume_ml"] == {"ground_glass": 0.0, "consolidation": 0.0}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _write(tmp_path / "a", "covid19", seed=5)
    second = _write(tmp_path / "b", "covid19", seed=5)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_different_seed_gives_different_images_and_uids(tmp_path: Path) -> None:
    a = generate_phantom(kind="covid19", seed=1, slices=8, size=64)
    b = generate_phantom(kind="covid19", seed=2, slices=8, size=64)
    assert not np.array_equal(a.hu, b.hu)
    case_a, case_b = _write(tmp_path, "normal", 1), _write(tmp_path, "normal", 2)
    uid_a = _read_series(case_a)[0].SeriesInstanceUID
    assert uid_a != _read_series(case_b)[0].SeriesInstanceUID


def test_size_changes_resolution_not_anatomy() -> None:
    small = generate_phantom(kind="normal", seed=3, slices=6, size=64)
    large = generate_phantom(kind="normal", seed=3, slices=6, size=128)
    assert small.geometry.pixel_mm == pytest.approx(2 * large.geometry.pixel_mm, rel=1e-5)
    voxel = {p.geometry.size: p.geometry.voxel_ml for p in (small, large)}
    lung_ml = {
        p.geometry.size: np.count_nonzero(p.lungs) * voxel[p.geometry.size] for p in (small, large)
    }
    assert lung_ml[64] == pytest.approx(lung_ml[128], rel=0.05)


def test_scan_geometry_stays_in_the_documented_ranges() -> None:
    from ctjoint.export.phantom import _sample_geometry

    for seed in range(40):
        rng = np.random.default_rng(seed)
        body = QuadricBody(Anatomy.sample(rng))
        scanner = Scanner.sample(
            rng, half_width=body.half_width, half_depth=body.half_depth, z_span=(0.0, 220.0)
        )
        geometry = _sample_geometry(rng, body, scanner, None, 512)
        assert 0.5 <= geometry.pixel_mm <= 0.98
        assert 0.6 <= geometry.slice_mm <= geometry.thickness_mm <= 5.0
        assert 250.0 <= (geometry.n_slices - 1) * geometry.slice_mm <= 321.0


@pytest.mark.parametrize(("slices", "thickness"), [(2, 5.0), (600, 0.6)])
def test_slice_thickness_is_clipped_to_0_6_to_5_mm(slices: int, thickness: float) -> None:
    phantom = generate_phantom(kind="normal", seed=0, slices=slices, size=32)
    assert phantom.geometry.slice_mm == thickness
    assert phantom.hu.shape == (slices, 32, 32)


def test_case_summary_names_findings_without_identifiers(tmp_path: Path) -> None:
    case = write_phantom_case(tmp_path / "c", kind="cap", seed=2, slices=8, size=64)
    assert isinstance(case, PhantomCase)
    text = case.summary()
    assert "cap" in text and "consolidation" in text
    patient = _read_series(tmp_path / "c")[0]
    assert str(patient.PatientName).split("^")[0] not in text
    assert patient.PatientID not in text


def test_cli_phantom_writes_a_case(tmp_path: Path) -> None:
    out = tmp_path / "cli_case"
    result = CliRunner().invoke(
        app, ["phantom", str(out), "--kind", "cap", "--seed", "3", "--slices", "6", "--size", "48"]
    )
    assert result.exit_code == 0, result.output
    assert "cap" in result.output
    assert len(list((out / CASE_SERIES_DIR).glob("*.dcm"))) == 6
    assert read_truth(out)[2]["label"] == "cap"


def test_cli_phantom_reports_bad_arguments_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["phantom", str(tmp_path / "x"), "--size", "16"])
    assert result.exit_code == 2
    assert "error: size must be between 32 and 2048, got 16" in result.output
    assert "Traceback" not in result.output


def test_phantom_set_has_balanced_labels_and_stratified_splits(tmp_path: Path) -> None:
    summary = write_phantom_set(tmp_path / "set", n=6, seed=1, size=32, workers=1)
    with (tmp_path / "set" / SET_LABELS_CSV).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "label", "split"]
    assert Counter(row["label"] for row in rows) == dict.fromkeys(CLASS_NAMES, 2)
    assert {row["split"] for row in rows} <= set(SPLITS)
    for label in CLASS_NAMES:
        splits = {row["split"] for row in rows if row["label"] == label}
        assert splits == {"train", "test"}  # 2 per class: one to train, one held out
    for row in rows:
        assert read_truth(tmp_path / "set" / row["case"])[2]["label"] == row["label"]
    assert "6 cases" in summary


@pytest.mark.parametrize(("share", "expected"), [(0.0, 0), (0.5, 5), (0.3, 3), (1.0, 10)])
def test_mimic_share_picks_that_many_normal_cases_and_only_normal_ones(
    share: float, expected: int
) -> None:
    plan = plan_set(30, seed=3)
    chosen = mimic_cases(plan, share)
    assert len(chosen) == expected
    labels = {name: label for name, label, _, _ in plan}
    assert {labels[name] for name in chosen} <= {"normal"}


def test_mimic_share_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(PhantomError, match=r"mimic share must be within 0-1, got 1\.5"):
        mimic_cases(plan_set(6, seed=1), 1.5)


def test_cli_phantom_set_refuses_a_mimic_share_outside_zero_to_one_before_writing(
    tmp_path: Path,
) -> None:
    args = ["phantom-set", str(tmp_path / "set"), "--n", "6", "--size", "32"]
    result = CliRunner().invoke(app, [*args, "--mimic-share", "1.5"])
    assert result.exit_code == 2
    assert "error: mimic share must be within 0-1, got 1.5" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "set").exists()


def test_cli_phantom_set_records_which_normal_cases_are_mimics(tmp_path: Path) -> None:
    args = ["phantom-set", str(tmp_path / "set"), "--n", "6", "--seed", "2", "--size", "32"]
    result = CliRunner().invoke(app, [*args, "--workers", "1", "--mimic-share", "0.5"])
    assert result.exit_code == 0, result.output
    assert "1 normal cases drawn as mimics" in result.output
    with (tmp_path / "set" / SET_LABELS_CSV).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    flags = {
        row["case"]: read_truth(tmp_path / "set" / row["case"])[2]["generation"]["mimic"]
        for row in rows
    }
    normals = [row["case"] for row in rows if row["label"] == "normal"]
    assert [flags[name] for name in normals] == [False, True]
    assert sum(flags.values()) == 1


def test_phantom_set_is_the_same_with_one_or_two_workers(tmp_path: Path) -> None:
    write_phantom_set(tmp_path / "one", n=4, seed=7, size=32, workers=1)
    write_phantom_set(tmp_path / "two", n=4, seed=7, size=32, workers=2)
    for path in sorted((tmp_path / "one").rglob("*")):
        twin = tmp_path / "two" / path.relative_to(tmp_path / "one")
        if path.is_file():
            assert path.read_bytes() == twin.read_bytes(), path


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 16}, "size must be between 32 and 2048, got 16"),
        ({"slices": 0}, "slices must be between 1 and 2000, got 0"),
        ({"kind": "flu"}, "unknown kind 'flu'"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_phantom_error(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"kind": "covid19", "seed": 0, "slices": 4, "size": 32} | kwargs
    with pytest.raises(PhantomError, match=message):
        write_phantom_case(tmp_path / "case", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "case").exists()


def test_non_empty_output_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "keep.txt").write_text("mine")
    with pytest.raises(PhantomError, match="exists and is not empty"):
        write_phantom_case(tmp_path / "case", kind="normal", seed=0, slices=4, size=32)
    assert (tmp_path / "case" / "keep.txt").read_text() == "mine"


# --- variety and the held-out family (issue 16) ------------------------------------------------
def test_scanner_variety_covers_every_kernel_convention_and_coverage() -> None:
    scanners = [
        Scanner.sample(
            np.random.default_rng(seed), half_width=150.0, half_depth=100.0, z_span=(0.0, 220.0)
        )
        for seed in range(300)
    ]
    assert {s.kernel.name for s in scanners} == {k.name for k in KERNELS}
    assert {s.convention for s in scanners} == set(CONVENTIONS)
    assert {s.coverage for s in scanners} == {"full", "apex-cut", "base-cut"}
    assert {s.table for s in scanners} == {True, False}
    assert min(s.thickness_mm for s in scanners) < 0.8
    assert max(s.thickness_mm for s in scanners) > 4.5


def test_thick_slice_labels_follow_the_majority_of_the_slab() -> None:
    # Four sub-slices per 5 mm slice; the lesion fills the first three of slice 0 and one of 1.
    fine_z = np.arange(8) * 1.25 + 0.625
    lesions = np.zeros((8, 1, 2), np.uint8)
    lesions[:3, 0, 0] = SEG_GROUND_GLASS
    lesions[4, 0, 0] = SEG_CONSOLIDATION
    hu = np.where(lesions > 0, -500.0, -900.0).astype(np.float32)
    out_hu, out_lesions, _ = slab_average(
        hu, lesions, np.zeros_like(lesions), fine_z, 1.25, np.array([2.5, 7.5]), 5.0
    )
    assert out_lesions[:, 0, 0].tolist() == [SEG_GROUND_GLASS, 0]
    assert out_hu[0, 0, 0] == pytest.approx(0.75 * -500.0 + 0.25 * -900.0)
    assert out_hu[1, 0, 0] == pytest.approx(0.25 * -500.0 + 0.75 * -900.0)


@pytest.fixture(scope="module")
def fourier() -> dict[str, PhantomVolume]:
    return {
        kind: generate_phantom(kind=kind, seed=21, slices=20, size=64, family="fourier")
        for kind in CLASS_NAMES
    }


def test_fourier_family_has_two_lungs_and_no_lesions_when_normal(
    fourier: dict[str, PhantomVolume],
) -> None:
    normal = fourier["normal"]
    assert set(np.unique(normal.lungs).tolist()) == {0, LUNG_RIGHT, LUNG_LEFT}
    assert not normal.lesions.any()
    assert normal.family == "fourier"


def test_fourier_family_covid_is_bilateral_and_cap_is_consolidation(
    fourier: dict[str, PhantomVolume],
) -> None:
    assert fourier["covid19"].lesion_sides() == {LUNG_RIGHT, LUNG_LEFT}
    assert np.count_nonzero(fourier["covid19"].lesions == SEG_GROUND_GLASS) > 0
    cap = fourier["cap"]
    assert np.count_nonzero(cap.lesions == SEG_CONSOLIDATION) > np.count_nonzero(
        cap.lesions == SEG_GROUND_GLASS
    )


def test_families_render_different_bodies_for_one_seed(fourier: dict[str, PhantomVolume]) -> None:
    quadric = generate_phantom(kind="normal", seed=21, slices=20, size=64)
    other = fourier["normal"]
    assert quadric.lungs.shape[1:] == other.lungs.shape[1:]
    assert np.mean(quadric.lungs != other.lungs) > 0.02


def test_unknown_family_is_refused() -> None:
    with pytest.raises(PhantomError, match="unknown family 'ellipse'"):
        generate_phantom(kind="normal", seed=0, slices=2, size=32, family="ellipse")


def test_cli_phantom_writes_the_requested_family(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "phantom",
            str(tmp_path / "c"),
            "--kind",
            "normal",
            "--seed",
            "3",
            "--slices",
            "4",
            "--size",
            "48",
            "--family",
            "fourier",
        ],
    )
    assert result.exit_code == 0, result.output
    _, _, info = read_truth(tmp_path / "c")
    assert info["family"] == "fourier"


@pytest.mark.parametrize("family", ["quadric", "fourier"])
def test_a_mimic_is_the_same_patient_with_denser_look_alikes_and_no_lesion(family: str) -> None:
    plain = generate_phantom(kind="normal", seed=31, slices=16, size=64, family=family)
    mimic = generate_phantom(kind="normal", seed=31, slices=16, size=64, family=family, mimic=True)
    assert plain.hu.shape == mimic.hu.shape
    assert not mimic.lesions.any()
    # Dependent density and denser vessels: the lungs both share are brighter in the mimic.
    shared = (plain.lungs > 0) & (mimic.lungs > 0)
    assert shared.sum() > 0.5 * (plain.lungs > 0).sum()
    assert float(mimic.hu[shared].mean()) > float(plain.hu[shared].mean()) + 10.0


def test_cli_phantom_mimic_is_recorded_and_its_follow_up_stays_one(tmp_path: Path) -> None:
    args = ["phantom", str(tmp_path / "m"), "--kind", "normal", "--seed", "3", "--slices", "4"]
    args += ["--size", "48", "--family", "fourier", "--mimic"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    _, _, info = read_truth(tmp_path / "m")
    assert info["generation"]["mimic"] is True
    later = CliRunner().invoke(
        app, ["phantom", str(tmp_path / "later"), "--follow-up-of", str(tmp_path / "m")]
    )
    assert later.exit_code == 0, later.output
    _, _, after = read_truth(tmp_path / "later")
    assert after["generation"]["mimic"] is True
