"""Lesion quantification (gateway/lesions.py) against phantom truth, and the result's schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from scipy import ndimage

from ctjoint.client.results import result_dict
from ctjoint.contracts import (
    LESION_CLASS_NAMES,
    LUNG_LEFT,
    LUNG_RIGHT,
    MODEL_NAMES,
    SEG_CLASS_NAMES,
)
from ctjoint.export.phantom import PhantomVolume, generate_phantom
from ctjoint.gateway.analysis import analyze_directory
from ctjoint.gateway.lesions import (
    LUNG_THRESHOLD_HU,
    LungSlices,
    peripheral_mask,
    segment_lungs,
    severity_score,
)
from ctjoint.gateway.quantify import quantify
from ctjoint.gateway.result import Quantification
from ctjoint.gateway.series import CtVolume
from ctjoint.gateway.wire import result_to_proto

SCHEMA = Path(__file__).resolve().parent.parent / "client" / "schema" / "scan_result.schema.json"
# (kind, seed): each planted pattern twice; size 96, 32 slices keeps each case ~1 s.
CASES = [("covid19", 3), ("covid19", 23), ("cap", 3), ("cap", 11), ("normal", 5)]
TOLERANCE = 0.15


def _phantom(kind: str, seed: int) -> tuple[PhantomVolume, CtVolume]:
    phantom = generate_phantom(kind=kind, seed=seed, slices=32, size=96)
    g = phantom.geometry
    volume = CtVolume.from_array(phantom.hu, (g.slice_mm, g.pixel_mm, g.pixel_mm))
    return phantom, volume


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{s}" for k, s in CASES])
def measured(request: pytest.FixtureRequest) -> tuple[PhantomVolume, CtVolume, Quantification]:
    phantom, volume = _phantom(*request.param)
    # The truth lesion map stands in for a perfect model: what is tested is the quantification.
    return phantom, volume, quantify(phantom.lesions, volume)


def test_lung_volumes_agree_with_the_truth(
    measured: tuple[PhantomVolume, CtVolume, Quantification],
) -> None:
    phantom, volume, q = measured
    for side, value in (("right", LUNG_RIGHT), ("left", LUNG_LEFT)):
        truth = np.count_nonzero(phantom.lungs == value) * volume.voxel_volume_ml
        assert q.lung(side).volume_ml == pytest.approx(truth, rel=TOLERANCE)


def test_lesion_volumes_per_lung_agree_with_the_truth(
    measured: tuple[PhantomVolume, CtVolume, Quantification],
) -> None:
    phantom, volume, q = measured
    for side, value in (("right", LUNG_RIGHT), ("left", LUNG_LEFT)):
        for name in LESION_CLASS_NAMES:
            in_truth = (phantom.lungs == value) & (phantom.lesions == SEG_CLASS_NAMES.index(name))
            truth = np.count_nonzero(in_truth) * volume.voxel_volume_ml
            assert q.lung(side).lesion_volume_ml[name] == pytest.approx(
                truth, rel=TOLERANCE, abs=0.05
            )


def test_bilateral_flag_and_dominant_distribution_follow_the_pattern(
    measured: tuple[PhantomVolume, CtVolume, Quantification],
) -> None:
    phantom, _, q = measured
    assert q.bilateral == (phantom.lesion_sides() == {LUNG_RIGHT, LUNG_LEFT})
    expected = {"covid19": "peripheral", "cap": "central", "normal": "none"}[phantom.kind]
    assert q.distribution == expected
    if phantom.kind != "normal":
        assert q.peripheral_fraction + q.central_fraction == pytest.approx(1.0)


def test_severity_is_zero_without_lesions_and_bounded_with_them(
    measured: tuple[PhantomVolume, CtVolume, Quantification],
) -> None:
    phantom, _, q = measured
    assert (q.severity_score == 0) == (phantom.kind == "normal")
    assert 0 <= q.severity_score <= 30
    for lung in q.lungs:
        assert [z.zone for z in lung.zones] == ["upper", "middle", "lower"]
        assert sum(z.lung_volume_ml for z in lung.zones) == pytest.approx(lung.volume_ml)


@pytest.mark.parametrize(
    ("percent", "score"),
    [(0.0, 0), (0.1, 1), (4.99, 1), (5.0, 2), (25.0, 3), (50.0, 4), (75.0, 5), (100.0, 5)],
)
def test_severity_scale_per_zone(percent: float, score: int) -> None:
    assert severity_score(percent) == score


def test_right_lung_follows_the_image_orientation_not_the_column_order() -> None:
    phantom, volume = _phantom("normal", 5)
    flipped = CtVolume.from_array(
        volume.hu[:, :, ::-1], volume.spacing_mm, orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    )
    lungs = segment_lungs(flipped)
    truth = phantom.lungs[:, :, ::-1]
    agree = np.count_nonzero((lungs == truth) & (truth > 0)) / np.count_nonzero(truth)
    assert agree > 0.9


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_results_match_the_json_schema_directly_and_over_the_wire(
    model: str, ct_series_dir: Path, contract_model_dir: Path
) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    result = analyze_directory(ct_series_dir, model=model, model_dir=contract_model_dir).result
    assert result.quantification is not None
    direct = json.loads(json.dumps(result.to_dict()))
    jsonschema.validate(direct, schema)
    rebuilt = result_dict(result_to_proto(result, request_id="r1"))
    jsonschema.validate(rebuilt, schema)
    assert rebuilt["quantification"] == direct["quantification"]


def test_the_schema_rejects_a_severity_outside_the_scale(
    ct_series_dir: Path, contract_model_dir: Path
) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    result = analyze_directory(ct_series_dir, model=MODEL_NAMES[0], model_dir=contract_model_dir)
    document = result.result.to_dict()
    document["quantification"]["lungs"]["right"]["zones"][0]["severity"] = 6
    with pytest.raises(jsonschema.ValidationError, match="6 is greater than the maximum of 5"):
        jsonschema.validate(document, schema)


def test_upper_zone_is_where_the_head_is_whichever_way_the_slices_run() -> None:
    phantom, volume = _phantom("covid19", 23)
    q = quantify(phantom.lesions, volume)
    # The same patient with slices running head to feet and rows anterior to posterior
    # reversed: column direction -y makes the slice normal (row x column) point to the feet.
    reversed_volume = CtVolume.from_array(
        volume.hu[::-1, ::-1], volume.spacing_mm, orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    )
    q_reversed = quantify(phantom.lesions[::-1, ::-1], reversed_volume)
    for side in ("right", "left"):
        ours = [z.lesion_volume_ml for z in q.lung(side).zones]
        theirs = [z.lesion_volume_ml for z in q_reversed.lung(side).zones]
        assert ours == pytest.approx(theirs, rel=0.02, abs=0.05)
    assert q.lung("right").zones[0].zone == "upper"


def _whole_volume_lungs(volume: CtVolume, lesion_map: np.ndarray | None = None) -> np.ndarray:
    """The module doc's four steps written the plain way: one 3D labelling of all the air, holes
    filled by scipy slice by slice. Slow; the reference the slice-wise computation must equal."""
    air = volume.hu < LUNG_THRESHOLD_HU
    components, count = ndimage.label(air)
    border = np.zeros(count + 1, dtype=bool)
    for edge in (components[:, 0], components[:, -1], components[:, :, 0], components[:, :, -1]):
        border[np.unique(edge)] = True
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[border] = 0
    sizes[0] = 0
    keep = sizes >= max(1, 0.01 * sizes.max()) if sizes.max() else sizes > 0
    lungs = np.stack([ndimage.binary_fill_holes(plane) for plane in keep[components]])
    if lesion_map is not None:
        lungs |= lesion_map > 0
    body = volume.hu > -500.0
    columns = np.arange(volume.shape[2], dtype=np.float64)
    mass = body.sum(axis=1)
    totals = mass.sum(axis=1)
    mid = np.where(
        totals > 0, (mass * columns).sum(axis=1) / np.maximum(totals, 1), (columns[-1]) / 2.0
    )
    before = columns[None, None, :] < mid[:, None, None]
    right_first = volume.orientation[0] >= 0
    out = np.zeros(volume.shape, dtype=np.uint8)
    out[lungs & before] = LUNG_RIGHT if right_first else LUNG_LEFT
    out[lungs & ~before] = LUNG_LEFT if right_first else LUNG_RIGHT
    return out


# Where `_awkward_air` carves (96-pixel phantoms: rows 0..20 are air above the body, rows
# 66..70 soft tissue under the lungs).
_POCKET = (slice(10, 16), slice(40, 50))
_BIG = (slice(8, 24), slice(67, 70), slice(30, 66))
_BUBBLE = (4, 68, 50)


def _awkward_air(volume: CtVolume) -> CtVolume:
    """Air that only a 3D view judges right, carved into a phantom:
    - a pocket of the outside air walled off in its own slice, joined to the outside through
      the slice above (outside: it must go);
    - a large pocket enclosed in every slice it spans (kept, like a lung);
    - a one-voxel bubble (far under 1 % of the largest: dropped as noise)."""
    hu = np.array(volume.hu)
    z = hu.shape[0] // 2
    hu[z, 8:18, 38:52] = 50.0
    hu[(z, *_POCKET)] = -1000.0
    hu[_BIG] = -900.0
    hu[_BUBBLE] = -1000.0
    return CtVolume.from_array(hu, volume.spacing_mm, orientation=volume.orientation)


@pytest.mark.parametrize("kind", ["covid19", "cap", "normal"])
@pytest.mark.parametrize("awkward", [False, True], ids=["phantom", "awkward-air"])
def test_slice_wise_lungs_equal_the_whole_volume_definition(kind: str, awkward: bool) -> None:
    phantom, volume = _phantom(kind, 7)
    if awkward:
        volume = _awkward_air(volume)
        reference = _whole_volume_lungs(volume)
        z = volume.shape[0] // 2
        assert (volume.hu[(z + 1, *_POCKET)] < LUNG_THRESHOLD_HU).all()
        assert not reference[(z, *_POCKET)].any()
        assert reference[_BIG].all()
        assert reference[_BUBBLE] == 0
    lesions = phantom.lesions
    assert np.array_equal(segment_lungs(volume), _whole_volume_lungs(volume))
    assert np.array_equal(segment_lungs(volume, lesions), _whole_volume_lungs(volume, lesions))
    # Streamed: slots in arrival order (shuffled), sorted at the end, as the gateway does.
    order = np.random.default_rng(1).permutation(volume.shape[0])
    streamed = LungSlices()
    for slot, index in enumerate(order):
        streamed.add(slot, volume.hu[index])
    slots = [int(s) for s in np.argsort(order)]
    assert np.array_equal(streamed.lungs(slots, volume.orientation), _whole_volume_lungs(volume))


def test_slice_wise_lungs_follow_a_flipped_orientation_like_the_definition() -> None:
    _, volume = _phantom("covid19", 7)
    flipped = CtVolume.from_array(
        volume.hu[:, :, ::-1], volume.spacing_mm, orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    )
    assert np.array_equal(segment_lungs(flipped), _whole_volume_lungs(flipped))


def test_a_volume_without_enclosed_air_has_no_lungs() -> None:
    volume = CtVolume.from_array(np.full((4, 16, 16), -1000.0), (1.0, 1.0, 1.0))
    assert not segment_lungs(volume).any()
    assert not segment_lungs(CtVolume.from_array(np.zeros((4, 16, 16)), (1.0, 1.0, 1.0))).any()


@pytest.mark.parametrize("through", [-1, 1], ids=["slice-before", "slice-after"])
@pytest.mark.parametrize("lung", [False, True], ids=["pocket-alone", "beside-a-lung"])
def test_enclosed_air_joined_to_the_outside_through_one_neighbour_slice_is_not_lung(
    through: int, lung: bool
) -> None:
    """Alone, the pocket is the edge of the box the 3D step works in; beside a lung spanning
    every slice, it is inside that box. Either way only one neighbour joins it to the outside."""
    hu = np.zeros((5, 16, 16), dtype=np.float32)
    hu[:, :2] = -1000.0  # outside air along the top edge of every slice
    hu[2, 5:9, 5:9] = -1000.0  # enclosed in slice 2 ...
    hu[2 + through, 2:9, 5:9] = -1000.0  # ... but a channel from the edge reaches it
    if lung:
        hu[:, 10:14, 10:14] = -900.0
    volume = CtVolume.from_array(hu, (1.0, 1.0, 1.0))
    reference = _whole_volume_lungs(volume)
    assert not reference[2, 5:9, 5:9].any()
    assert reference[:, 10:14, 10:14].all() == lung
    assert np.array_equal(segment_lungs(volume), reference)


def _ellipsoid_lung_with_lesions(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A lung big enough to have a centre more than PERIPHERAL_MM from its surface, with
    lesion blobs scattered in it (a label map with classes 1 and 2)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[:30, :100, :100]
    lung = ((zz - 15) / 14.0) ** 2 + ((yy - 50) / 48.0) ** 2 + ((xx - 50) / 48.0) ** 2 <= 1.0
    labels = np.zeros(lung.shape, dtype=np.uint8)
    for _ in range(6):
        z, y, x = rng.integers(5, 25), rng.integers(20, 80), rng.integers(20, 80)
        labels[z - 2 : z + 2, y - 6 : y + 6, x - 6 : x + 6] = rng.integers(1, 3)
    labels[~lung] = 0
    return lung, labels


@pytest.mark.parametrize("kind", ["covid19", "cap"])
def test_the_analysis_peripheral_count_on_awkward_air_equals_the_plain_rule(kind: str) -> None:
    """The analysis counts peripheral lesion voxels with gateway/pleura.py on the air lungs
    after the slice-wise 3D step; on a phantom with awkward air (a pocket the step drops)
    that must equal the plain rule on the whole-volume lungs."""
    phantom, volume = _phantom(kind, 7)
    volume = _awkward_air(volume)
    plain_air = segment_lungs(volume)
    expected = int(np.count_nonzero(peripheral_mask(plain_air, phantom.lesions, volume.spacing_mm)))
    assert expected > 0
    quantification = quantify(phantom.lesions, volume)
    lesion_voxels = int(np.count_nonzero(phantom.lesions))
    assert quantification.peripheral_fraction == expected / lesion_voxels


def test_near_pleura_equals_scipys_distance_rule() -> None:
    # Blobs of lung with holes, anisotropic spacing, more slices than a chunk: every voxel's
    # verdict equals the whole-volume distance transform's (issue 22, points 3 and 4).
    from ctjoint.gateway.lesions import PERIPHERAL_MM, _near_pleura

    rng = np.random.default_rng(22)
    noise = ndimage.gaussian_filter(rng.random((27, 40, 44)), 2.0)
    lungs = noise > np.quantile(noise, 0.2)
    for spacing in ((5.0, 1.5, 1.5), (2.5, 2.0, 2.0), (8.0, 1.0, 1.2)):
        expected = ndimage.distance_transform_edt(lungs, sampling=spacing) <= PERIPHERAL_MM
        near = _near_pleura(lungs, spacing)
        np.testing.assert_array_equal(near, expected)
        assert near.any() and not near.all()


def test_lungs_that_release_the_air_codes_are_the_same_lungs() -> None:
    # The analysis frees the codes once read (issue 22, point 3); awkward air keeps the 3D
    # step's edge-air and dropped-pocket paths busy.
    _, volume = _phantom("covid19", 7)
    volume = _awkward_air(volume)
    order = range(volume.shape[0])
    kept = LungSlices.of(volume.hu)
    released = LungSlices.of(volume.hu)
    expected = kept.lungs(order, volume.orientation)
    np.testing.assert_array_equal(released.lungs(order, volume.orientation, release=True), expected)
    np.testing.assert_array_equal(expected, _whole_volume_lungs(volume))
    with pytest.raises(ValueError, match="no air codes"):
        released.lungs(order, volume.orientation)
    assert kept.lungs(order, volume.orientation).tolist() == expected.tolist()


def _streamed_lungs(
    volume: CtVolume,
    arrival: np.ndarray,
    *,
    distances: bool,
    capacity: str = "none",
    sides_at: str = "arrival",
) -> np.ndarray:
    """The lungs from slices fed in `arrival` order (slice indices) as an intake feeds them:
    slot = arrival number, with each slice's distance along the normal when `distances`.
    `capacity`: the slice count an intake was told ("exact"), none, a few too few ("short",
    the slices past it kept aside) or too many ("long")."""
    n = volume.shape[0]
    told = {"none": None, "exact": n, "short": n - 3, "long": n + 5}[capacity]
    streamed = LungSlices(capacity=told)
    # `sides_at`: the series' orientation given with each slice ("arrival"), a flipped one
    # (the sides written as slices arrive must be redone), or none (written at the end).
    flipped = (-volume.orientation[0], *volume.orientation[1:])
    given = {"arrival": volume.orientation, "flipped": flipped, "end": None}[sides_at]
    for slot, index in enumerate(arrival):
        distance = 2.5 * float(index) if distances else None
        streamed.add(slot, volume.hu[index], distance, given)
    slots = [int(s) for s in np.argsort(arrival)]
    return streamed.lungs(slots, volume.orientation)


@pytest.mark.parametrize("capacity", ["none", "exact", "short", "long"])
@pytest.mark.parametrize("arrival", ["shuffled", "descending", "ascending"])
@pytest.mark.parametrize("distances", [True, False], ids=["with-distance", "without"])
@pytest.mark.parametrize("kind", ["covid19", "cap"])
def test_lungs_of_slices_arriving_in_any_order_equal_the_whole_volume_definition(
    kind: str, arrival: str, distances: bool, capacity: str
) -> None:
    # Links between adjacent slices are found as slices arrive (with distances) or at the end
    # (without); awkward air makes them decide which pockets are lungs (issue 22, point 1).
    _, volume = _phantom(kind, 7)
    volume = _awkward_air(volume)
    n = volume.shape[0]
    order = {
        "shuffled": np.random.default_rng(5).permutation(n),
        "descending": np.arange(n)[::-1],
        "ascending": np.arange(n),
    }[arrival]
    expected = _whole_volume_lungs(volume)
    streamed = _streamed_lungs(volume, order, distances=distances, capacity=capacity)
    assert np.array_equal(streamed, expected)


def _random_air(seed: int, shape: tuple[int, int, int], sigma: float, fraction: float) -> CtVolume:
    """Smoothed noise cut at a quantile: air pockets of every size, some joined to the image
    border in-plane or through other slices, others enclosed."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    hu = np.where(noise < np.quantile(noise, fraction), -1000.0, 40.0)
    return CtVolume.from_array(hu.astype(np.float32), (2.5, 1.0, 1.0))


@pytest.mark.parametrize("seed", range(6))
def test_lungs_of_random_air_equal_the_whole_volume_definition(seed: int) -> None:
    volume = _random_air(seed, (12, 40, 48), sigma=1.0 + 0.4 * seed, fraction=0.35)
    expected = _whole_volume_lungs(volume)
    arrival = np.random.default_rng(100 + seed).permutation(volume.shape[0])
    assert np.array_equal(_streamed_lungs(volume, arrival, distances=True), expected)
    written = _streamed_lungs(volume, arrival, distances=True, capacity="exact")
    assert np.array_equal(written, expected)
    assert np.array_equal(segment_lungs(volume), expected)


def test_slices_with_more_enclosed_pockets_than_a_byte_numbers_are_the_same_lungs() -> None:
    # 31 x 31 one-pixel pockets a slice (codes past 255), columns of them joined through the
    # slices, and a large pocket so the keep rule drops the small ones in some slices only.
    hu = np.full((6, 64, 64), 40.0, dtype=np.float32)
    hu[:, 1:63:2, 1:63:2] = -1000.0
    hu[2:4, 1:63:2, 1:63:2] = 40.0
    hu[:, 66 // 2 : 60, 40:62] = -900.0
    volume = CtVolume.from_array(hu, (2.5, 1.0, 1.0))
    expected = _whole_volume_lungs(volume)
    assert expected.any() and not expected[:, 1:31:2, 1:31:2].any()
    arrival = np.random.default_rng(3).permutation(6)
    assert np.array_equal(_streamed_lungs(volume, arrival, distances=True), expected)
    written = _streamed_lungs(volume, arrival, distances=True, capacity="exact")
    assert np.array_equal(written, expected)


@pytest.mark.parametrize("sides_at", ["arrival", "flipped", "end"])
def test_lungs_split_into_sides_as_slices_arrive_equal_the_definition(sides_at: str) -> None:
    _, volume = _phantom("covid19", 7)
    volume = _awkward_air(volume)  # the keep rule drops a pocket: some slices are redone
    arrival = np.random.default_rng(11).permutation(volume.shape[0])
    expected = _whole_volume_lungs(volume)
    written = _streamed_lungs(volume, arrival, distances=True, capacity="exact", sides_at=sides_at)
    assert np.array_equal(written, expected)
    slices = LungSlices(capacity=volume.shape[0])
    for index, plane in enumerate(volume.hu):
        slices.add(index, plane, float(index), volume.orientation if sides_at != "end" else None)
    counts = np.zeros((2, volume.shape[0]), dtype=np.int64)
    lungs = slices.lungs(range(volume.shape[0]), volume.orientation, side_voxels=counts)
    plain = [np.count_nonzero(lungs == side, axis=(1, 2)) for side in (1, 2)]
    np.testing.assert_array_equal(counts, plain)


def test_the_lung_map_written_as_slices_arrive_is_handed_out_once() -> None:
    _, volume = _phantom("covid19", 7)
    slices = LungSlices(capacity=volume.shape[0])
    for index, plane in enumerate(volume.hu):
        slices.add(index, plane, float(index))
    order = range(volume.shape[0])
    assert np.array_equal(slices.lungs(order, volume.orientation), segment_lungs(volume))
    with pytest.raises(ValueError, match="handed out already"):
        slices.lungs(order, volume.orientation)


def test_a_slice_arriving_between_two_linked_slices_unlinks_them() -> None:
    """Slices 0 and 2 arrive first, adjacent then, their pockets overlapping; slice 1 lands
    between them later. Slice 2's pocket reaches the outside through slice 3; slice 0's pocket
    is its own component and stays lung, which it would not if 0 and 2 were still linked."""
    hu = np.zeros((5, 16, 16), dtype=np.float32)
    hu[:, :2] = -1000.0  # outside air along the top edge of every slice
    hu[:, 10:14, 10:14] = -900.0  # a lung through every slice
    hu[0, 5:9, 5:9] = -1000.0
    hu[2, 5:9, 5:9] = -1000.0
    hu[3, 2:9, 5:9] = -1000.0  # a channel from the edge over slice 2's pocket
    volume = CtVolume.from_array(hu, (1.0, 1.0, 1.0))
    expected = _whole_volume_lungs(volume)
    assert expected[0, 5:9, 5:9].all() and not expected[2, 5:9, 5:9].any()
    for arrival in ([0, 2, 4, 3, 1], [2, 0, 1, 4, 3], [4, 0, 2, 1, 3]):
        lungs = _streamed_lungs(volume, np.array(arrival), distances=True)
        assert np.array_equal(lungs, expected), arrival
