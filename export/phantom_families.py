"""Shape families of the phantom generator: bodies that share nothing but HU ranges.

A family turns random numbers into a body (outline, lungs, heart, vessels, airways, bones) and
plants the findings of a class in it. The models train on one family (`quadric`, the default)
and are evaluated on both, so a network that learned one family's shapes instead of the
findings is caught on the other (`fourier`). The scanner (`phantom_scanner`) is the same for
both: it is how the image was made, not what was scanned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from ctjoint.export.phantom_anatomy import (
    BACK_FRACTION,
    HU_AIR,
    HU_AIRWAY_WALL,
    HU_BLOOD,
    Anatomy,
    CoarseLungs,
    Grid,
    Point,
    airway_segments,
    draw_arms,
    draw_lesion,
    draw_tubes,
    plan_lesions,
    render_anatomy,
    vessel_segments,
)

FAMILY_QUADRIC: Final = "quadric"
FAMILY_FOURIER: Final = "fourier"
FAMILIES: Final = (FAMILY_QUADRIC, FAMILY_FOURIER)
TRAINING_FAMILY: Final = FAMILY_QUADRIC
# Dependent (posterior basal) density of a mimic: the top of each family's drawn range (HU).
MIMIC_DEPENDENT_HU: Final = {FAMILY_QUADRIC: 220.0, FAMILY_FOURIER: 200.0}

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]


class Planted(Protocol):
    """A planted lesion as the writer reports it."""

    @property
    def side(self) -> int: ...

    def describe(self, to_patient: Callable[[Point], Point]) -> dict[str, object]: ...


@dataclass(frozen=True)
class Rendered:
    """A body rendered on a grid: HU, lung labels, lesion labels, what was planted."""

    hu: FloatArray
    lungs: ByteArray
    lesions: ByteArray
    planted: tuple[Planted, ...]


class Body(Protocol):
    """What the scanner needs to know of a body, and how to render it."""

    @property
    def half_width(self) -> float: ...

    @property
    def half_depth(self) -> float: ...

    @property
    def z_bottom(self) -> float: ...

    @property
    def z_top(self) -> float: ...

    @property
    def back_v(self) -> float:
        """Where the back rests on the table (mm, +v is posterior)."""
        ...

    def outline(self, u: FloatArray, v: FloatArray) -> BoolArray:
        """The body (with arms) on a 2D (v, u) grid."""
        ...

    def mimic(self) -> Body:
        """The same body with what looks like disease without being any at the top of its
        family's range: dependent density, vessel density and calibre, the heart and the
        diaphragm domes in partial volume with lung (hard cases for the review flag)."""
        ...

    def render(
        self,
        grid: Grid,
        kind: str,
        tree_rng: np.random.Generator,
        lesion_rng: np.random.Generator,
        z_range: tuple[float, float],
        lesion_scale: float = 1.0,
    ) -> Rendered:
        """`lesion_scale` grows or shrinks every planted lesion (linear factor; 0: none drawn),
        the same lesions the same random streams plan: a follow-up study of the same patient."""
        ...


@dataclass(frozen=True)
class QuadricBody:
    """The training family: quadric and super-elliptic organs, branching vessel trees."""

    anatomy: Anatomy

    @property
    def half_width(self) -> float:
        return self.anatomy.half_width

    @property
    def half_depth(self) -> float:
        return self.anatomy.half_depth

    @property
    def z_bottom(self) -> float:
        return self.anatomy.z_bottom

    @property
    def z_top(self) -> float:
        return self.anatomy.z_top

    @property
    def back_v(self) -> float:
        return BACK_FRACTION * self.anatomy.half_depth

    def mimic(self) -> QuadricBody:
        a = self.anatomy
        return QuadricBody(
            dataclasses.replace(
                a,
                dependent_hu=MIMIC_DEPENDENT_HU[FAMILY_QUADRIC],
                dependent_mm=22.0,
                vessel_scale=1.3,
                vessel_depth=8,
                heart_power=1.7,
                lung_gradient_hu=max(a.lung_gradient_hu, 60.0),
            )
        )

    def outline(self, u: FloatArray, v: FloatArray) -> BoolArray:
        plane = np.full((v.size, u.size), np.nan, np.float32)[None]
        grid = Grid(u=u, v=v, z=np.zeros(1, np.float32), pixel_mm=1.0, slice_mm=1.0)
        draw_arms(plane, grid, self.anatomy)
        arms = ~np.isnan(plane[0])
        return np.asarray((self.anatomy.skin_depth(u[None, :], v[:, None]) >= 0) | arms)

    def render(
        self,
        grid: Grid,
        kind: str,
        tree_rng: np.random.Generator,
        lesion_rng: np.random.Generator,
        z_range: tuple[float, float],
        lesion_scale: float = 1.0,
    ) -> Rendered:
        a = self.anatomy
        coarse = CoarseLungs.build(a)
        hu, lungs = render_anatomy(a, grid)
        draw_arms(hu, grid, a)
        lung_mask = lungs > 0
        draw_tubes(hu, grid, vessel_segments(tree_rng, a, coarse), HU_BLOOD, within=lung_mask)
        airways = airway_segments(tree_rng, a, coarse)
        draw_tubes(hu, grid, airways, HU_AIRWAY_WALL, grow_mm=1.3)
        draw_tubes(hu, grid, airways, HU_AIR)
        planted = plan_lesions(lesion_rng, kind, a, coarse, z_range)
        if lesion_scale != 1.0:
            planted = [p.scaled(lesion_scale) for p in planted] if lesion_scale > 0 else []
        labels = np.zeros(lungs.shape, np.uint8)
        for lesion in planted:
            draw_lesion(hu, labels, lungs, grid, lesion)
        return Rendered(hu, lungs, labels, tuple(planted))


def make_body(family: str, rng: np.random.Generator) -> Body:
    """Draw a body of a family."""
    if family == FAMILY_QUADRIC:
        return QuadricBody(Anatomy.sample(rng))
    if family == FAMILY_FOURIER:
        from ctjoint.export.phantom_fourier import FourierBody

        return FourierBody.sample(rng)
    raise ValueError(f"unknown phantom family {family!r}; expected one of {', '.join(FAMILIES)}")


__all__ = [
    "FAMILIES",
    "FAMILY_FOURIER",
    "FAMILY_QUADRIC",
    "TRAINING_FAMILY",
    "Body",
    "Planted",
    "QuadricBody",
    "Rendered",
    "make_body",
]
