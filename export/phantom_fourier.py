"""The held-out phantom family: bodies drawn from Fourier contours, never used in training.

It shares only the tissues' HU values (and the scanner) with the training family
(`phantom_anatomy`): the body and lung cross-sections are Fourier series in the polar angle,
the diaphragm is a tilted plane with a bump instead of a dome, the heart an oblique egg, the
spine a stack of rounded squares, ribs are tubes following the body wall, vessels are
unbranched curving random walks instead of bifurcating trees, and lesions are clusters of
metaballs instead of lobulated ellipsoids. The findings follow the same clinical rules
(COVID-19: bilateral, peripheral, multifocal ground glass, some consolidation; CAP: mostly
unilateral central consolidation with air bronchograms). Coordinates are body-centred mm, LPS:
u to the patient's left, v to the back, z up from the lowest lung point.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from ctjoint.contracts import LUNG_LEFT, LUNG_RIGHT, SEG_CONSOLIDATION, SEG_GROUND_GLASS
from ctjoint.export.phantom_anatomy import (
    HU_AIR,
    HU_AIR_BRONCHOGRAM,
    HU_AIRWAY_WALL,
    HU_BLOOD,
    HU_CANCELLOUS_BONE,
    HU_CORTICAL_BONE,
    HU_DISC,
    HU_FAT,
    HU_LIVER,
    HU_MEDIASTINAL_FAT,
    HU_MUSCLE,
    SIDE_NAMES,
    Grid,
    Point,
    Segment,
    draw_tubes,
)
from ctjoint.export.phantom_families import FAMILY_FOURIER, MIMIC_DEPENDENT_HU, Rendered

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
SIGN = {LUNG_RIGHT: -1.0, LUNG_LEFT: 1.0}
COARSE_MM = 4.0


def _harmonics(
    rng: np.random.Generator, orders: range, amp: float
) -> tuple[tuple[float, ...], ...]:
    return tuple(
        (k, float(rng.normal(0.0, amp / k)), float(rng.uniform(0, 2 * math.pi))) for k in orders
    )


def _contour(theta: FloatArray, terms: tuple[tuple[float, ...], ...]) -> FloatArray:
    out = np.ones_like(theta)
    for k, a, phase in terms:
        out = out + np.float32(a) * np.cos(np.float32(k) * theta + np.float32(phase))
    return out


@dataclass(frozen=True)
class FourierLesion:
    """A metaball cluster: lesion where the summed Gaussian bumps exceed 1."""

    side: int
    kind: str  # "ground_glass" or "consolidation"
    balls: tuple[tuple[float, float, float, float], ...]  # (u, v, z, radius)
    hu: float
    core_level: float  # field above this consolidates (ground glass); 0 = no core
    core_hu: float
    bronchograms: tuple[Segment, ...] = ()

    def scaled(self, factor: float) -> FourierLesion:
        """The same cluster grown or shrunk about its first ball by a linear `factor`: the
        summed field, so the lesion, scales exactly (before the lung boundary cuts it)."""
        cu, cv, cz, _ = self.balls[0]

        def about_first(p: Point) -> Point:
            return (cu + (p[0] - cu) * factor, cv + (p[1] - cv) * factor, cz + (p[2] - cz) * factor)

        balls = tuple((*about_first((u, v, z)), r * factor) for u, v, z, r in self.balls)
        bronchograms = tuple(
            dataclasses.replace(s, p0=about_first(s.p0), p1=about_first(s.p1))
            for s in self.bronchograms
        )
        return dataclasses.replace(self, balls=balls, bronchograms=bronchograms)

    def describe(self, to_patient: Callable[[Point], Point]) -> dict[str, object]:
        u, v, z, _ = self.balls[0]
        centre = to_patient((u, v, z))
        return {
            "lung": SIDE_NAMES[self.side],
            "type": self.kind + ("+consolidation" if self.core_level else ""),
            "centre_mm": [round(c, 1) for c in centre],
            "radius_mm": round(max(b[3] for b in self.balls), 1),
            "metaballs": len(self.balls),
            "air_bronchograms": len(self.bronchograms),
        }


@dataclass(frozen=True)
class FourierBody:
    """One body of the held-out family."""

    rx: float
    ry: float
    body_terms: tuple[tuple[float, ...], ...]
    wall_mm: float
    fat_mm: float
    lung_height: float
    lung_rx: float
    lung_ry: float
    lung_cx: float
    lung_terms: tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]
    notch: float  # depth of the cardiac notch of the left lung
    floor_tilt: float  # mm the diaphragm plane rises per mm towards the front
    bump: float  # height of the diaphragm bump under each lung
    bump_mm: float
    heart: tuple[float, float, float]  # centre
    heart_size: tuple[float, float]  # long and short semi-axes
    heart_axis: tuple[float, float, float]
    heart_egg: float
    spine_v: float
    spine_half: float
    lung_hu: float
    dependent_hu: float
    dependent_mm: float
    aorta: tuple[Point, ...]
    aorta_r: float
    n_vessels: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FourierBody:
        rx = float(rng.uniform(135.0, 185.0))
        ry = rx * float(rng.uniform(0.6, 0.78))
        wall = float(rng.uniform(12.0, 0.22 * ry + 12.0))
        height = float(rng.uniform(170.0, 250.0))
        heart_z = float(rng.uniform(35.0, 70.0))
        spine_half = float(rng.uniform(12.0, 18.0))
        spine_v = ry - wall - spine_half - float(rng.uniform(10.0, 18.0))
        axis = np.array([0.7, -0.5, -0.45]) + rng.normal(0.0, 0.12, 3)
        axis /= np.linalg.norm(axis)
        bend_v = spine_v - 30.0
        aorta = (
            (-10.0, -0.15 * ry, heart_z + 30.0),
            (-8.0, -0.1 * ry, height * 0.72),
            (8.0, bend_v, height * 0.8),
            (22.0, spine_v - 10.0, height * 0.7),
            (20.0, spine_v - 8.0, -60.0),
        )
        return cls(
            rx=rx,
            ry=ry,
            body_terms=_harmonics(rng, range(2, 6), 0.06),
            wall_mm=wall,
            fat_mm=float(rng.uniform(3.0, 0.6 * wall)),
            lung_height=height,
            lung_rx=(rx - wall) * float(rng.uniform(0.40, 0.47)),
            lung_ry=(ry - wall) * float(rng.uniform(0.78, 0.9)),
            lung_cx=(rx - wall) * float(rng.uniform(0.48, 0.55)),
            lung_terms=(_harmonics(rng, range(2, 5), 0.08), _harmonics(rng, range(2, 5), 0.08)),
            notch=float(rng.uniform(0.15, 0.35)),
            floor_tilt=float(rng.uniform(0.1, 0.35)),
            bump=float(rng.uniform(20.0, 60.0)),
            bump_mm=float(rng.uniform(35.0, 60.0)),
            heart=(
                float(rng.uniform(0.05, 0.2)) * rx,
                float(rng.uniform(-0.3, -0.1)) * ry,
                heart_z,
            ),
            heart_size=(float(rng.uniform(55.0, 75.0)), float(rng.uniform(38.0, 50.0))),
            heart_axis=(float(axis[0]), float(axis[1]), float(axis[2])),
            heart_egg=float(rng.uniform(0.1, 0.3)),
            spine_v=spine_v,
            spine_half=spine_half,
            lung_hu=float(rng.uniform(-910.0, -790.0)),
            dependent_hu=float(rng.uniform(0.0, 200.0)) if rng.random() < 0.7 else 0.0,
            dependent_mm=float(rng.uniform(6.0, 25.0)),
            aorta=aorta,
            aorta_r=float(rng.uniform(10.0, 14.0)),
            n_vessels=int(rng.integers(30, 70)),
        )

    # --- the Body protocol ----------------------------------------------------------------
    @property
    def half_width(self) -> float:
        return self.rx * 1.15

    @property
    def half_depth(self) -> float:
        return self.ry * 1.15

    @property
    def z_bottom(self) -> float:
        return 0.0

    @property
    def z_top(self) -> float:
        return self.lung_height

    @property
    def back_v(self) -> float:
        theta = np.linspace(0, 2 * math.pi, 720, dtype=np.float32)
        r = _contour(theta, self.body_terms)
        return float(np.max(self.ry * r * np.sin(theta)))

    def _depth(self, u: FloatArray, v: FloatArray) -> FloatArray:
        """Approximate depth below the skin (mm): radial distance to the Fourier outline."""
        theta = np.arctan2(v / self.ry, u / self.rx).astype(np.float32)
        edge = _contour(theta, self.body_terms)
        rho = np.hypot(u / self.rx, v / self.ry)
        scale = np.hypot(self.rx * np.cos(theta), self.ry * np.sin(theta))
        return ((edge - rho) * scale).astype(np.float32)

    def outline(self, u: FloatArray, v: FloatArray) -> BoolArray:
        return np.asarray(self._depth(u[None, :], v[:, None]) >= 0)

    def mimic(self) -> FourierBody:
        return dataclasses.replace(
            self,
            dependent_hu=MIMIC_DEPENDENT_HU[FAMILY_FOURIER],
            dependent_mm=25.0,
            heart_size=(75.0, 50.0),
            bump=60.0,
            n_vessels=70,
            aorta_r=14.0,
        )

    def _heart(self, u: FloatArray, v: FloatArray, z: FloatArray | float) -> FloatArray:
        """< 1 inside the egg-shaped heart."""
        a = np.asarray(self.heart_axis, np.float32)
        du, dv, dz = u - self.heart[0], v - self.heart[1], z - self.heart[2]
        t = du * a[0] + dv * a[1] + dz * a[2]
        perp2 = du**2 + dv**2 + dz**2 - t**2
        long, short = self.heart_size
        short_t = short * (1.0 + self.heart_egg * t / long)  # broader at the base, pointed apex
        return np.asarray((t / long) ** 2 + perp2 / np.maximum(short_t, 5.0) ** 2, np.float32)

    def lungs(self, u: FloatArray, v: FloatArray, z: FloatArray | float) -> npt.NDArray[np.uint8]:
        shape = np.broadcast_shapes(np.shape(u), np.shape(v), np.shape(z))
        out = np.zeros(shape, np.uint8)
        s = np.clip(np.asarray(z, np.float32) / self.lung_height, 0.0, 1.0)
        # Cross-section grows fast from the floor and closes to an apex like a cosine cap.
        cap = np.clip(np.cos((s - 0.35) / 0.65 * math.pi / 2.0), 0.0, 1.0)
        profile = np.where(s < 0.35, 1.0, cap**0.6)
        inner = self._depth(u, v) > self.wall_mm
        for index, side in enumerate((LUNG_RIGHT, LUNG_LEFT)):
            cu = SIGN[side] * self.lung_cx
            du, dv = (u - cu) / self.lung_rx, (v - 0.05 * self.ry) / self.lung_ry
            theta = np.arctan2(dv, du * SIGN[side]).astype(np.float32)
            edge = _contour(theta, self.lung_terms[index]) * profile
            if side == LUNG_LEFT:  # the cardiac notch, medially and in front
                edge = edge * (1.0 - self.notch * np.exp(-(((theta + 2.4) / 0.5) ** 2)))
            floor = self.bump * np.exp(-((u - cu) ** 2 + (v + 10.0) ** 2) / (2 * self.bump_mm**2))
            floor = floor - self.floor_tilt * v - 10.0
            inside = (np.hypot(du, dv) < edge) & (np.asarray(z) > floor) & (s < 1.0) & inner
            inside &= self._heart(u, v, z) > 1.3
            inside &= np.abs(u) > 0.11 * self.rx  # the mediastinum
            inside &= ~((np.abs(u) < self.spine_half + 20.0) & (v > self.spine_v - 25.0))
            out[np.broadcast_to(inside, shape)] = side
        return out

    def render(
        self,
        grid: Grid,
        kind: str,
        tree_rng: np.random.Generator,
        lesion_rng: np.random.Generator,
        z_range: tuple[float, float],
        lesion_scale: float = 1.0,
    ) -> Rendered:
        shape = (grid.z.size, grid.v.size, grid.u.size)
        hu = np.full(shape, HU_AIR, np.float32)
        lungs = np.zeros(shape, np.uint8)
        u, v = grid.u[None, :], grid.v[:, None]
        depth = self._depth(u, v)
        base = np.where(depth >= 0, HU_FAT, HU_AIR).astype(np.float32)
        base[depth >= self.fat_mm] = HU_MUSCLE
        base[depth >= self.wall_mm - 3.0] = HU_MEDIASTINAL_FAT
        sq = np.abs(u / self.spine_half) ** 4 + np.abs((v - self.spine_v) / self.spine_half) ** 4
        for k, z in enumerate(grid.z.tolist()):
            sl = base.copy()
            sl[(depth > self.wall_mm) & (z < self.bump * 0.8)] = HU_LIVER
            sl[sq <= 1.0] = HU_DISC if (z % 27.0) < 5.0 else HU_CANCELLOUS_BONE
            sl[(sq <= 1.0) & (sq > 0.75)] = HU_CORTICAL_BONE
            sl[self._heart(u, v, z) <= 1.0] = HU_BLOOD
            lung = self.lungs(u, v, float(z))
            inside = lung > 0
            lung_hu = self.lung_hu + self.dependent_hu * np.exp(
                (v - (self.ry - self.wall_mm)) / self.dependent_mm
            ) * max(0.0, 1.0 - z / (0.7 * self.lung_height))
            sl[inside] = np.broadcast_to(lung_hu, sl.shape)[inside]
            hu[k], lungs[k] = sl, lung
        self._draw_ribs(hu, grid)
        aorta = [
            Segment(p, q, self.aorta_r, self.aorta_r) for p, q in itertools.pairwise(self.aorta)
        ]
        draw_tubes(hu, grid, aorta, HU_BLOOD)
        coarse = self._coarse()
        draw_tubes(hu, grid, self._vessels(tree_rng, coarse), HU_BLOOD, within=lungs > 0)
        trachea = [
            Segment(
                (0.0, self.spine_v - 35.0, self.lung_height * 0.72),
                (0.0, self.spine_v - 35.0, self.lung_height + 80.0),
                9.0,
                9.0,
            )
        ]
        for side in (LUNG_RIGHT, LUNG_LEFT):
            end = (SIGN[side] * 0.6 * self.lung_cx, self.spine_v - 30.0, self.lung_height * 0.6)
            trachea.append(Segment(trachea[0].p0, end, 6.0, 4.5))
        draw_tubes(hu, grid, trachea, HU_AIRWAY_WALL, grow_mm=1.5)
        draw_tubes(hu, grid, trachea, HU_AIR)
        planted = self._plan(lesion_rng, kind, coarse, z_range)
        if lesion_scale != 1.0:
            planted = [p.scaled(lesion_scale) for p in planted] if lesion_scale > 0 else []
        labels = np.zeros(shape, np.uint8)
        for lesion in planted:
            _draw(hu, labels, lungs, grid, lesion)
        return Rendered(hu, lungs, labels, tuple(planted))

    def _draw_ribs(self, hu: FloatArray, grid: Grid) -> None:
        segments = []
        for level in range(11):
            z_back = self.lung_height + 10.0 - level * 24.0
            theta = np.linspace(0.2, math.pi - 0.2, 14)
            for side in (-1.0, 1.0):
                pts = []
                for t in theta:
                    polar = math.atan2(math.cos(t), side * math.sin(t))
                    r = float(_contour(np.full(1, polar, np.float32), self.body_terms)[0])
                    radius = r - (self.fat_mm + 6.0) / self.rx
                    pts.append(
                        (
                            side * self.rx * radius * math.sin(t),
                            self.ry * radius * math.cos(t),
                            z_back - 70.0 * (1.0 - math.cos(t)) / 2.0,
                        )
                    )
                segments += [Segment(p, q, 4.0, 4.0) for p, q in itertools.pairwise(pts)]
        draw_tubes(hu, grid, segments, HU_CORTICAL_BONE)

    def _coarse(self) -> tuple[FloatArray, npt.NDArray[np.uint8], FloatArray]:
        axes = (
            np.arange(-self.rx, self.rx, COARSE_MM, dtype=np.float32),
            np.arange(-self.ry, self.ry, COARSE_MM, dtype=np.float32),
            np.arange(0.0, self.lung_height, COARSE_MM, dtype=np.float32),
        )
        labels = self.lungs(axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None])
        pleura = ndimage.distance_transform_edt(labels > 0, sampling=COARSE_MM).astype(np.float32)
        points = np.stack(np.meshgrid(axes[2], axes[1], axes[0], indexing="ij"), -1)[..., ::-1]
        return points.astype(np.float32), labels, pleura

    def _vessels(self, rng: np.random.Generator, coarse: tuple) -> list[Segment]:
        points, labels, _ = coarse
        out: list[Segment] = []
        for _ in range(self.n_vessels):
            side = LUNG_RIGHT if rng.random() < 0.5 else LUNG_LEFT
            p = np.array([SIGN[side] * self.lung_cx * 0.55, -5.0, self.lung_height * 0.55])
            heading = rng.normal(0.0, 1.0, 3) + np.array([SIGN[side] * 1.2, 0.0, 0.0])
            r = float(rng.uniform(2.0, 4.5))
            entered = False
            for _ in range(30):
                heading = heading / np.linalg.norm(heading) + rng.normal(0.0, 0.3, 3)
                heading /= np.linalg.norm(heading)
                q = p + heading * float(rng.uniform(6.0, 12.0))
                inside = _lookup(points, labels, q) == side
                if entered and not inside:
                    break
                entered = entered or inside
                r_next = max(0.5, r * 0.9)
                out.append(Segment(tuple(p.tolist()), tuple(q.tolist()), r, r_next))
                p, r = q, r_next
        return out

    def _plan(
        self, rng: np.random.Generator, kind: str, coarse: tuple, z_range: tuple[float, float]
    ) -> list[FourierLesion]:
        if kind == "normal":
            return []
        points, labels, pleura = coarse
        z = points[..., 2]
        slab = (z >= z_range[0]) & (z <= z_range[1])
        lesions = []
        if kind == "covid19":
            count = int(rng.integers(3, 9))
            sides = [LUNG_RIGHT, LUNG_LEFT] + [
                LUNG_LEFT if rng.random() < 0.5 else LUNG_RIGHT for _ in range(count - 2)
            ]
            for side in sides:
                pick = (labels == side) & slab & (pleura >= 3.0) & (pleura <= 14.0)
                if pick.any():
                    lesions.append(self._cluster(rng, side, points[pick], "ground_glass"))
        elif kind == "cap":
            main = LUNG_RIGHT if rng.random() < 0.6 else LUNG_LEFT
            sides = [main] * int(rng.integers(1, 3))
            if rng.random() < 0.15:
                sides.append(LUNG_LEFT if main == LUNG_RIGHT else LUNG_RIGHT)
            for side in sides:
                pick = (labels == side) & slab & (pleura >= 16.0)
                if not pick.any():
                    pick = (labels == side) & slab
                if pick.any():
                    lesions.append(self._cluster(rng, side, points[pick], "consolidation"))
        else:
            raise ValueError(f"unknown phantom kind {kind!r}")
        return lesions

    def _cluster(
        self, rng: np.random.Generator, side: int, candidates: FloatArray, kind: str
    ) -> FourierLesion:
        centre = candidates[int(rng.integers(len(candidates)))].astype(np.float64)
        ggo = kind == "ground_glass"
        spread = float(rng.uniform(8.0, 16.0) if ggo else rng.uniform(12.0, 22.0))
        n = int(rng.integers(3, 8) if ggo else rng.integers(4, 9))
        balls = tuple(
            (
                *(centre + rng.normal(0.0, spread, 3)).tolist(),
                float(rng.uniform(9.0, 16.0) if ggo else rng.uniform(13.0, 22.0)),
            )
            for _ in range(n)
        )
        bronchograms: list[Segment] = []
        if not ggo:
            for _ in range(int(rng.integers(2, 5))):
                p = centre + rng.normal(0.0, spread * 0.5, 3)
                d = rng.normal(0.0, 1.0, 3)
                for _ in range(4):
                    d = d / np.linalg.norm(d) + rng.normal(0.0, 0.4, 3)
                    q = p + d / np.linalg.norm(d) * 7.0
                    bronchograms.append(Segment(tuple(p.tolist()), tuple(q.tolist()), 1.8, 1.5))
                    p = q
        return FourierLesion(
            side=side,
            kind=kind,
            balls=balls,
            hu=float(rng.uniform(-680.0, -480.0) if ggo else rng.uniform(-40.0, 45.0)),
            core_level=float(rng.uniform(2.0, 3.0)) if ggo and rng.random() < 0.4 else 0.0,
            core_hu=float(rng.uniform(-30.0, 45.0)),
            bronchograms=tuple(bronchograms),
        )


def _lookup(points: FloatArray, labels: npt.NDArray[np.uint8], p: npt.NDArray[np.float64]) -> int:
    origin = points[0, 0, 0]
    idx = np.rint((p - origin) / COARSE_MM).astype(int)[::-1]
    if np.any(idx < 0) or np.any(idx >= labels.shape):
        return 0
    return int(labels[tuple(idx)])


def _draw(
    hu: FloatArray,
    labels: npt.NDArray[np.uint8],
    lungs: npt.NDArray[np.uint8],
    grid: Grid,
    lesion: FourierLesion,
) -> None:
    balls = np.asarray(lesion.balls)
    lo = balls[:, :3].min(0) - balls[:, 3].max() * 1.5
    hi = balls[:, :3].max(0) + balls[:, 3].max() * 1.5
    box = grid.index_box(lo, hi)
    if box is None:
        return
    u, v, z = grid.crop_coords(box)
    field = np.zeros((z.shape[0], v.shape[1], u.shape[2]), np.float32)
    for bu, bv, bz, r in lesion.balls:
        d2 = (u - bu) ** 2 + (v - bv) ** 2 + (z - bz) ** 2
        field += np.float32(1.5) * np.exp(-d2 / np.float32(r * r))
    region = (field > 1.0) & (lungs[box] > 0)
    crop, lab = hu[box], labels[box]
    if lesion.kind == "ground_glass":
        crop[region] = np.maximum(crop[region], np.float32(lesion.hu))
        lab[region & (lab != SEG_CONSOLIDATION)] = SEG_GROUND_GLASS
        if lesion.core_level:
            core = region & (field > lesion.core_level)
            crop[core] = lesion.core_hu
            lab[core] = SEG_CONSOLIDATION
        return
    crop[region] = lesion.hu
    lab[region] = SEG_CONSOLIDATION
    tubes = np.zeros_like(crop)
    shifted = Grid(
        u=grid.u[box[2]],
        v=grid.v[box[1]],
        z=grid.z[box[0]],
        pixel_mm=grid.pixel_mm,
        slice_mm=grid.slice_mm,
    )
    draw_tubes(tubes, shifted, list(lesion.bronchograms), 1.0)
    crop += tubes * region * (np.float32(HU_AIR_BRONCHOGRAM) - crop)


__all__ = ["FourierBody", "FourierLesion"]
