"""Chest anatomy and pneumonia lesions of the synthetic CT phantom, drawn in millimetres.

Everything here works in body-centred patient coordinates with DICOM LPS axes: `u` (mm towards
the patient's left), `v` (mm towards the back) and `z` (mm towards the head). Shapes are analytic,
so the same description renders at any resolution: `size` only changes the pixel grid, never the
anatomy. `export/phantom.py` turns the rendered volume into a DICOM series and NIfTI truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from ctjoint.contracts import LUNG_LEFT, LUNG_RIGHT, SEG_CONSOLIDATION, SEG_GROUND_GLASS

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
ByteArray = npt.NDArray[np.uint8]
Point = tuple[float, float, float]
Wave = tuple[float, float, float, float]  # (ku, kv, kz) rad/mm and phase
HuValue = float | FloatArray

# Hounsfield units of the tissues (non-contrast chest CT).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -90.0
HU_MUSCLE = 45.0
HU_SOFT_TISSUE = 40.0
HU_LIVER = 55.0
HU_BLOOD = 40.0
HU_CSF = 12.0
HU_DISC = 85.0
HU_CARTILAGE = 120.0
HU_CORTICAL_BONE = 850.0
HU_CANCELLOUS_BONE = 230.0
HU_AIRWAY_WALL = 30.0
HU_AIR_BRONCHOGRAM = -950.0

SIDES: tuple[int, int] = (LUNG_RIGHT, LUNG_LEFT)
SIDE_NAMES: dict[int, str] = {LUNG_RIGHT: "right", LUNG_LEFT: "left"}
# The right lung lies on the patient's right, i.e. at negative u in LPS.
SIDE_SIGN: dict[int, float] = {LUNG_RIGHT: -1.0, LUNG_LEFT: 1.0}

# The back is flattened where the patient lies on the table, at this fraction of half-depth.
BACK_FRACTION = 0.95
# Vertebral body centre to spinal canal centre.
CANAL_OFFSET_MM = 9.0
# Grid step of the coarse lung model used to place lesions and grow vessel trees.
COARSE_STEP_MM = 4.0


@dataclass(frozen=True)
class Segment:
    """A tapered tube (capsule) from p0 to p1, radii in mm."""

    p0: Point
    p1: Point
    r0: float
    r1: float


@dataclass(frozen=True)
class Anatomy:
    """The random parameters of one phantom body (all lengths in mm, z up from the lung base)."""

    half_width: float  # lateral semi-axis of the body outline
    half_depth: float  # antero-posterior semi-axis of the body outline
    fat_mm: float
    muscle_mm: float
    rib_mm: float  # radial thickness of the rib band
    lung_hu: float
    lung_gradient_hu: float  # dependent (posterior) lung is denser by this much
    lung_base: tuple[float, float]  # right, left: lowest point (costophrenic recess)
    lung_apex: tuple[float, float]
    dome_height: tuple[float, float]
    med_half_width: float
    heart_centre: Point
    heart_axes: Point
    spine_v: float  # centre of the vertebral bodies
    spine_radius: float
    aorta_radius: float
    aorta_desc: tuple[float, float]
    aorta_asc: tuple[float, float]
    arch_z: float
    trachea: tuple[float, float]
    trachea_radius: float
    carina_z: float
    rib_top: float
    rib_pitch: float
    rib_height: float
    rib_drop: float
    # Variety that changes no finding (docs/models.md lists each range).
    heart_power: float = 2.0  # super-ellipsoid exponent: <2 a pointed dome, >2 a boxy one
    vessel_scale: float = 1.0  # calibre of the pulmonary vessel trees
    vessel_depth: int = 7  # branching generations (vessel density)
    airway_scale: float = 1.0
    dependent_hu: float = 0.0  # posterior basal (dependent) density: HU added at the pleura
    dependent_mm: float = 10.0  # ... fading to nothing this far from the posterior pleura
    arms_down: bool = False  # arms beside the chest instead of above the head
    arm_gap_mm: float = 15.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        """Draw a plausible adult chest."""
        w = float(rng.uniform(130.0, 190.0))
        d = w * float(rng.uniform(0.62, 0.80))
        fat = float(rng.uniform(3.0, 40.0))
        muscle = float(rng.uniform(6.0, 16.0))
        # A thin chest cannot carry a thick wall: keep room for the heart in front of the spine.
        wall_scale = min(1.0, 0.26 * d / (fat + muscle))
        fat, muscle = fat * wall_scale, muscle * wall_scale
        # Inspiration level: a deep breath makes the lungs taller, flatter-domed and darker.
        inspiration = float(rng.uniform(0.0, 1.0))
        height_r = float(rng.uniform(160.0, 200.0)) + 60.0 * inspiration
        base_r = float(rng.uniform(4.0, 22.0))  # the liver lifts the right dome
        apex_r = base_r + height_r
        apex_l = apex_r - float(rng.uniform(0.0, 10.0))
        dome_r = float(rng.uniform(50.0, 78.0)) - 20.0 * inspiration
        dome_l = dome_r - float(rng.uniform(-4.0, 14.0))
        spine_r = min(float(rng.uniform(13.0, 21.0)), 0.18 * d)
        back = BACK_FRACTION * d
        # The spinal canal lies under the back muscles; the vertebral body just in front of it.
        canal_v = back - fat - muscle - float(rng.uniform(18.0, 26.0)) * min(1.0, d / 100.0)
        spine_v = canal_v - spine_r - CANAL_OFFSET_MM
        # The heart fills the space between the sternum and the oesophagus/aorta.
        heart_front = -d + fat + muscle + 16.0
        heart_back = spine_v - spine_r - 12.0
        heart_v = (heart_front + heart_back) / 2.0
        heart_axes = (
            float(rng.uniform(0.30, 0.46)) * w,
            max(15.0, (heart_back - heart_front) / 2.0 * float(rng.uniform(0.80, 1.0))),
            float(rng.uniform(48.0, 78.0)),
        )
        # How far the heart sinks into the left dome decides how its top meets the lung.
        heart_centre = (
            float(rng.uniform(0.08, 0.22)) * w,
            heart_v + float(rng.uniform(-6.0, 6.0)),
            dome_l + heart_axes[2] * float(rng.uniform(0.30, 0.80)),
        )
        aorta_r = float(rng.uniform(10.0, 13.5))
        carina_z = heart_centre[2] + heart_axes[2] + float(rng.uniform(5.0, 20.0))
        trachea_v = spine_v - spine_r - float(rng.uniform(14.0, 20.0))
        airway_scale = float(rng.uniform(0.8, 1.25))
        return cls(
            half_width=w,
            half_depth=d,
            fat_mm=fat,
            muscle_mm=muscle,
            rib_mm=float(rng.uniform(6.0, 8.0)),
            lung_hu=float(rng.uniform(-840.0, -790.0)) - 70.0 * inspiration,
            lung_gradient_hu=float(rng.uniform(10.0, 60.0)),
            lung_base=(base_r, 0.0),
            lung_apex=(apex_r, apex_l),
            dome_height=(dome_r, dome_l),
            med_half_width=float(rng.uniform(0.08, 0.11)) * w,
            heart_centre=heart_centre,
            heart_axes=heart_axes,
            spine_v=spine_v,
            spine_radius=spine_r,
            aorta_radius=aorta_r,
            aorta_desc=(0.5 * spine_r + aorta_r + 2.0, spine_v - 0.45 * spine_r),
            aorta_asc=(-float(rng.uniform(2.0, 10.0)), heart_centre[1] + 0.25 * d),
            arch_z=carina_z + float(rng.uniform(15.0, 25.0)),
            trachea=(-float(rng.uniform(0.0, 5.0)), trachea_v),
            trachea_radius=float(rng.uniform(8.0, 10.5)) * airway_scale,
            carina_z=carina_z,
            rib_top=apex_r + float(rng.uniform(0.0, 10.0)),
            rib_pitch=float(rng.uniform(20.0, 29.0)),
            rib_height=float(rng.uniform(8.0, 13.0)),
            rib_drop=float(rng.uniform(75.0, 145.0)),
            heart_power=float(rng.uniform(1.7, 2.6)),
            vessel_scale=float(rng.uniform(0.75, 1.3)),
            vessel_depth=int(rng.integers(5, 9)),
            airway_scale=airway_scale,
            dependent_hu=float(rng.uniform(0.0, 220.0)) if rng.random() < 0.7 else 0.0,
            dependent_mm=float(rng.uniform(4.0, 22.0)),
            arms_down=bool(rng.random() < 0.3),
            arm_gap_mm=float(rng.uniform(3.0, 30.0)),
        )

    # --- geometry shared by the renderer and the coarse model ------------------------------
    @property
    def wall_mm(self) -> float:
        """Depth below the skin where the pleural cavity starts."""
        return self.fat_mm + self.muscle_mm + self.rib_mm + 2.0

    @property
    def z_top(self) -> float:
        return max(self.lung_apex)

    @property
    def z_bottom(self) -> float:
        return min(self.lung_base)

    def hilum(self, side: int) -> Point:
        """Where the main bronchus and pulmonary artery enter a lung."""
        sign = SIDE_SIGN[side]
        return (
            sign * (self.med_half_width + 18.0),
            self.trachea[1] + 8.0,
            self.carina_z - 25.0,
        )

    def skin_depth(self, u: FloatArray, v: FloatArray) -> FloatArray:
        """Approximate depth below the skin in mm (negative outside the body)."""
        # A slightly boxy super-ellipse, flattened at the back where the patient lies on the table.
        p = 2.3
        rho = (
            np.abs(u / np.float32(self.half_width)) ** p
            + np.abs(v / np.float32(self.half_depth)) ** p
        ) ** (1.0 / p)
        r = np.hypot(u, v)
        ray = (1.0 - rho) * r / np.maximum(rho, np.float32(1e-3))
        back = np.float32(BACK_FRACTION * self.half_depth) - v
        return np.minimum(ray, back).astype(np.float32)

    def structures(
        self, u: FloatArray, v: FloatArray, z: float | FloatArray
    ) -> tuple[list[tuple[BoolArray, HuValue]], BoolArray]:
        """Mediastinal and spinal structures at (u, v, z): [(mask, HU)] and the lung exclusion.

        The exclusion is every structure grown by a few mm (the fat that separates it from the
        lung) plus a central band, so the lungs' medial borders follow the real organs.
        """
        margin = 4.0
        paint: list[tuple[BoolArray, HuValue]] = []
        exclusion = np.abs(u - np.float32(0.15 * self.med_half_width)) < np.float32(
            self.med_half_width
        )
        exclusion = exclusion & (v < np.float32(self.spine_v))

        def disc(cu: float, cv: float, r: float, zlo: float, zhi: float, hu: float) -> None:
            nonlocal exclusion
            inz = (z >= zlo) & (z <= zhi)
            if np.ndim(inz) == 0 and not inz:
                return
            d2 = (u - np.float32(cu)) ** 2 + (v - np.float32(cv)) ** 2
            paint.append((inz & (d2 <= r * r), hu))
            exclusion = exclusion | (inz & (d2 <= (r + margin) ** 2))

        hc, ha = self.heart_centre, self.heart_axes
        inz = np.abs(z - hc[2]) < ha[2]
        if np.ndim(inz) > 0 or inz:
            p = np.float32(self.heart_power)
            e = (
                np.abs((u - np.float32(hc[0])) / np.float32(ha[0])) ** p
                + np.abs((v - np.float32(hc[1])) / np.float32(ha[1])) ** p
                + np.abs((z - hc[2]) / ha[2]) ** p
            )
            paint.append((e <= 1.0, HU_BLOOD))
            grown = (1.0 + margin / min(ha[0], ha[1])) ** p
            exclusion = exclusion | (e <= grown)
        ra = self.aorta_radius
        disc(*self.aorta_desc, ra, -1e9, self.arch_z, HU_BLOOD)
        disc(*self.aorta_asc, ra * 1.1, hc[2] + 0.5 * ha[2], self.arch_z, HU_BLOOD)
        # The arch joins the two aortae just above the carina.
        inz = np.abs(z - self.arch_z) < ra
        if np.ndim(inz) > 0 or inz:
            half = np.sqrt(np.maximum(ra * ra - (z - self.arch_z) ** 2, 0.0))
            d2 = _segment_dist2_2d(u, v, self.aorta_asc, self.aorta_desc)
            paint.append((inz & (d2 <= half * half), HU_BLOOD))
            exclusion = exclusion | (inz & (d2 <= (half + margin) ** 2))
        # Superior vena cava and pulmonary trunk.
        disc(
            self.aorta_asc[0] - 26.0,
            self.aorta_asc[1] + 4.0,
            9.0,
            hc[2] + 0.4 * ha[2],
            self.z_top + 50.0,
            HU_BLOOD,
        )
        disc(
            self.aorta_asc[0] + 30.0,
            self.aorta_asc[1] - 2.0,
            12.5,
            hc[2] + 0.6 * ha[2],
            self.carina_z - 5.0,
            HU_BLOOD,
        )
        # Trachea (air is cut in later by the airway tree) and oesophagus.
        disc(*self.trachea, self.trachea_radius + 1.5, self.carina_z - 5.0, 1e9, HU_AIRWAY_WALL)
        disc(
            self.trachea[0] + 6.0,
            self.spine_v - self.spine_radius - 5.0,
            6.5,
            -1e9,
            1e9,
            HU_SOFT_TISSUE,
        )
        # Spine: vertebral body (discs every rib pitch), canal, posterior arch, spinous process.
        level = np.mod((z - self.rib_top) / self.rib_pitch, 1.0)
        body_hu = np.where(level < 0.18, HU_DISC, HU_CANCELLOUS_BONE)
        d2 = u**2 + (v - np.float32(self.spine_v)) ** 2
        rs = self.spine_radius
        paint.append((d2 <= rs * rs, HU_CORTICAL_BONE))
        paint.append((d2 <= (rs - 2.0) ** 2, body_hu))
        canal_v = self.spine_v + rs + CANAL_OFFSET_MM
        dc2 = u**2 + (v - np.float32(canal_v)) ** 2
        paint.append((dc2 <= 11.5**2, HU_CORTICAL_BONE))
        paint.append((dc2 <= 7.5**2, HU_CSF))
        spinous = (np.abs(u) < 3.5) & (v > canal_v + 10.0) & (v < canal_v + 26.0)
        paint.append((spinous, HU_CORTICAL_BONE))
        behind = (np.abs(u) < rs + 6.0) & (v > self.spine_v - 4.0)
        exclusion = exclusion | (d2 <= (rs + margin) ** 2) | behind
        return paint, exclusion

    def lungs(
        self,
        u: FloatArray,
        v: FloatArray,
        z: float | FloatArray,
        depth: FloatArray,
        exclusion: BoolArray,
    ) -> ByteArray:
        """Lung label map (0, LUNG_RIGHT, LUNG_LEFT) at (u, v, z)."""
        cavity = (depth > np.float32(self.wall_mm)) & ~exclusion
        out: ByteArray = np.zeros(np.broadcast_shapes(u.shape, v.shape, np.shape(z)), np.uint8)
        for index, side in enumerate(SIDES):
            sign = SIDE_SIGN[side]
            base, apex = self.lung_base[index], self.lung_apex[index]
            t = (z - base) / (apex - base)
            # Cross-sections shrink towards a rounded apex; lower down the chest wall bounds them.
            scale = np.sqrt(np.clip(1.0 - ((t - 0.15) / 0.85) ** 2, 1e-6, 1.0))
            scale = np.where(t < 0.15, 1.0, scale)
            cu = sign * 0.45 * self.half_width
            cv = 0.1 * self.half_depth
            ell = ((u - np.float32(cu)) / (0.5 * self.half_width * scale)) ** 2 + (
                (v - np.float32(cv)) / (1.0 * self.half_depth * scale)
            ) ** 2
            # The diaphragm dome rises into the lung from below; the recesses stay lowest,
            # deepest at the back.
            q2 = ((u - np.float32(0.9 * cu)) / (0.36 * self.half_width)) ** 2 + (
                (v + np.float32(0.05 * self.half_depth)) / (0.55 * self.half_depth)
            ) ** 2
            dome = base + self.dome_height[index] * np.maximum(0.0, 1.0 - q2) ** 0.6
            dome = dome - 12.0 * (v / np.float32(self.half_depth) + 0.2)
            inside = cavity & (ell < 1.0) & (z > dome) & (t < 1.0) & (sign * u > 0)
            out[np.broadcast_to(inside, out.shape)] = side
        return out

    def lung_labels(self, u: FloatArray, v: FloatArray, z: float | FloatArray) -> ByteArray:
        """Lung label map on any broadcastable grid (used by the coarse model)."""
        _, exclusion = self.structures(u, v, z)
        return self.lungs(u, v, z, self.skin_depth(u, v), exclusion)


def _segment_dist2_2d(
    u: FloatArray, v: FloatArray, a: tuple[float, float], b: tuple[float, float]
) -> FloatArray:
    du, dv = b[0] - a[0], b[1] - a[1]
    t = ((u - np.float32(a[0])) * du + (v - np.float32(a[1])) * dv) / (du * du + dv * dv)
    t = np.clip(t, 0.0, 1.0)
    d2 = (u - np.float32(a[0]) - t * du) ** 2 + (v - np.float32(a[1]) - t * dv) ** 2
    return np.asarray(d2, dtype=np.float32)


@dataclass(frozen=True)
class Grid:
    """The pixel grid of the rendered volume in body-centred mm (slices ascending in z)."""

    u: FloatArray  # [X] column centres
    v: FloatArray  # [Y] row centres
    z: FloatArray  # [Z] slice centres, ascending
    pixel_mm: float
    slice_mm: float

    def index_box(
        self,
        lo: Sequence[float] | npt.NDArray[np.float64],
        hi: Sequence[float] | npt.NDArray[np.float64],
    ) -> tuple[slice, slice, slice] | None:
        """Index ranges (z, y, x) of the voxels whose centres lie in the mm box, or None."""
        out = []
        for axis, step, a, b in (
            (self.z, self.slice_mm, lo[2], hi[2]),
            (self.v, self.pixel_mm, lo[1], hi[1]),
            (self.u, self.pixel_mm, lo[0], hi[0]),
        ):
            first = math.ceil((a - float(axis[0])) / step - 1e-6)
            last = math.floor((b - float(axis[0])) / step + 1e-6)
            first, last = max(first, 0), min(last, axis.size - 1)
            if first > last:
                return None
            out.append(slice(first, last + 1))
        return out[0], out[1], out[2]

    def crop_coords(self, box: tuple[slice, slice, slice]) -> tuple[FloatArray, ...]:
        """Broadcastable (u, v, z) coordinates of a crop: shapes [1,1,X], [1,Y,1], [Z,1,1]."""
        return (
            self.u[box[2]][None, None, :],
            self.v[box[1]][None, :, None],
            self.z[box[0]][:, None, None],
        )


def render_anatomy(anatomy: Anatomy, grid: Grid) -> tuple[FloatArray, ByteArray]:
    """HU volume [Z,Y,X] (float32) and lung labels [Z,Y,X] of the body without airways/vessels."""
    a = anatomy
    shape = (grid.z.size, grid.v.size, grid.u.size)
    hu = np.full(shape, HU_AIR, np.float32)
    lungs = np.zeros(shape, np.uint8)
    # Only the body's bounding box needs drawing; the rest stays air.
    box = grid.index_box(
        (-a.half_width - 2.0, -a.half_depth - 2.0, -1e9),
        (a.half_width + 2.0, a.half_depth + 2.0, 1e9),
    )
    if box is None:
        return hu, lungs
    _, rows, cols = box
    u = grid.u[cols][None, :]
    v = grid.v[rows][:, None]
    depth = a.skin_depth(u, v)
    base = np.full(depth.shape, HU_AIR, np.float32)
    base[depth >= 0] = HU_FAT
    base[depth >= a.fat_mm] = HU_MUSCLE
    base[depth >= a.wall_mm - 2.0] = HU_SOFT_TISSUE
    cavity = depth > a.wall_mm
    # Ribs: a band under the muscle; each rib descends from the spine towards the front.
    band = (depth >= a.fat_mm + a.muscle_mm) & (depth < a.fat_mm + a.muscle_mm + a.rib_mm)
    theta = np.arctan2(np.abs(u), v) / np.float32(math.pi)  # 0 at the back, 1 at the front
    band &= (theta > 0.1) & (theta < 0.9)
    drop = np.float32(a.rib_drop) * theta**1.2
    radial = np.abs(2.0 * (depth - a.fat_mm - a.muscle_mm) / a.rib_mm - 1.0)
    cartilage = theta > 0.78
    lung_hu = np.broadcast_to(
        np.float32(a.lung_hu) + np.float32(a.lung_gradient_hu / a.half_depth) * v, depth.shape
    )
    sternum_v = -a.half_depth + a.fat_mm + a.muscle_mm + 6.0
    sternum = (u / 15.0) ** 2 + ((v - np.float32(sternum_v)) / 6.0) ** 2
    for k, z in enumerate(grid.z.tolist()):
        sl = base.copy()
        phase = (np.float32(a.rib_top - z) - drop) / np.float32(a.rib_pitch)
        nearest = np.rint(phase)
        off = np.abs(phase - nearest) * np.float32(2.0 * a.rib_pitch / a.rib_height)
        rib = band & (off < 1.0) & (nearest >= 0) & (nearest <= 11)
        if rib.any():
            cortex = np.maximum(off, radial) > 0.6
            sl[rib] = np.where(cartilage, HU_CARTILAGE, np.where(cortex, HU_CORTICAL_BONE, 300.0))[
                rib
            ]
        if a.heart_centre[2] - a.heart_axes[2] < z < a.z_top:
            sl[sternum <= 1.0] = HU_CORTICAL_BONE
            sl[sternum <= 0.45] = HU_CANCELLOUS_BONE
        paint, exclusion = a.structures(u, v, z)
        if z < a.lung_base[0] + a.dome_height[0] + 10.0:
            sl[cavity] = HU_LIVER
        # Under the diaphragm the midline is abdomen, not mediastinal fat.
        if z > a.z_bottom + 0.6 * min(a.dome_height):
            sl[cavity & exclusion] = HU_MEDIASTINAL_FAT
        for mask, value in paint:
            full = np.broadcast_to(mask, sl.shape)
            if np.ndim(value) == 0:
                sl[full] = value
            else:
                sl[full] = np.broadcast_to(value, sl.shape)[full]
        lung = a.lungs(u, v, z, depth, exclusion)
        inside = lung > 0
        sl[inside] = lung_hu[inside]
        if a.dependent_hu > 0 and inside.any():
            sl += _dependent_density(a, inside, v, z, grid.pixel_mm)
        hu[k, rows, cols] = sl
        lungs[k, rows, cols] = lung
    return hu, lungs


def _dependent_density(
    a: Anatomy, inside: BoolArray, v: FloatArray, z: float, pixel_mm: float
) -> FloatArray:
    """Posterior basal density of a normal supine lung (HU to add; 0 outside the lung).

    Strongest against the posterior pleura of the lower lung and fading inwards and upwards:
    a normal finding that a naive model mistakes for ground glass.
    """
    basal = 1.0 - (z - a.z_bottom) / (0.6 * (a.z_top - a.z_bottom))
    if basal <= 0:
        return np.zeros(inside.shape, np.float32)
    dist = ndimage.distance_transform_edt(inside, sampling=pixel_mm).astype(np.float32)
    posterior = np.clip(v / np.float32(0.5 * a.half_depth), 0.0, 1.0)
    fade = np.clip(1.0 - dist / np.float32(a.dependent_mm), 0.0, 1.0)
    boost = np.float32(a.dependent_hu * min(1.0, basal)) * posterior * fade
    return np.where(inside, boost, np.float32(0.0)).astype(np.float32)


def draw_arms(hu: FloatArray, grid: Grid, a: Anatomy) -> None:
    """Arms by the sides of the chest (when not raised): fat, muscle and a humerus each."""
    if not a.arms_down:
        return
    u = grid.u[None, :]
    v = grid.v[:, None]
    plane = np.full((grid.v.size, grid.u.size), np.nan, np.float32)
    for sign in (-1.0, 1.0):
        radius = 0.3 * a.half_width
        cu = sign * (a.half_width + a.arm_gap_mm + radius)
        cv = 0.1 * a.half_depth
        r = np.hypot((u - np.float32(cu)) * 1.1, v - np.float32(cv))
        plane = np.where(r <= radius, HU_FAT, plane)
        plane = np.where(r <= radius - 6.0, HU_MUSCLE, plane)
        bone = np.hypot(u - np.float32(cu + sign * 0.1 * radius), v - np.float32(cv))
        plane = np.where(bone <= 11.0, HU_CORTICAL_BONE, plane)
        plane = np.where(bone <= 7.0, HU_FAT, plane)  # the marrow of the shaft
    drawn = ~np.isnan(plane)
    hu[:, drawn] = plane[drawn]


@dataclass(frozen=True)
class CoarseLungs:
    """The lungs on a coarse isotropic grid: labels and distance to the pleura (mm)."""

    origin: Point  # (u, v, z) of voxel [0, 0, 0]
    step: float
    labels: ByteArray  # [Z, Y, X]
    pleura_mm: FloatArray  # [Z, Y, X] distance of lung voxels to the nearest non-lung voxel

    @classmethod
    def build(cls, anatomy: Anatomy, step: float = COARSE_STEP_MM) -> CoarseLungs:
        a = anatomy
        u = np.arange(-a.half_width, a.half_width + step, step, dtype=np.float32)
        v = np.arange(-a.half_depth, a.half_depth + step, step, dtype=np.float32)
        z = np.arange(a.z_bottom - 2 * step, a.z_top + 2 * step, step, dtype=np.float32)
        labels = a.lung_labels(u[None, None, :], v[None, :, None], z[:, None, None])
        pleura = ndimage.distance_transform_edt(labels > 0, sampling=step).astype(np.float32)
        return cls((float(u[0]), float(v[0]), float(z[0])), step, labels, pleura)

    def lookup(self, points: npt.NDArray[np.float64]) -> tuple[ByteArray, FloatArray]:
        """Labels and pleural distances at [N, 3] (u, v, z) points (0 outside the grid)."""
        idx = np.rint((points - np.asarray(self.origin)) / self.step).astype(np.int64)
        shape = np.asarray(self.labels.shape[::-1])
        ok = np.all((idx >= 0) & (idx < shape), axis=1)
        labels = np.zeros(len(points), np.uint8)
        dist = np.zeros(len(points), np.float32)
        i = idx[ok]
        labels[ok] = self.labels[i[:, 2], i[:, 1], i[:, 0]]
        dist[ok] = self.pleura_mm[i[:, 2], i[:, 1], i[:, 0]]
        return labels, dist

    def points(self, mask: BoolArray) -> npt.NDArray[np.float64]:
        """(u, v, z) mm of the voxels in a coarse mask, as [N, 3]."""
        zyx = np.argwhere(mask)
        return np.asarray(self.origin) + zyx[:, ::-1].astype(np.float64) * self.step


# --- tubes: airways and vessels ---------------------------------------------------------------
def _unit(vec: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return vec / max(float(np.linalg.norm(vec)), 1e-9)


def _perturb(
    rng: np.random.Generator, direction: npt.NDArray[np.float64], angle_deg: float
) -> npt.NDArray[np.float64]:
    """A unit vector at `angle_deg` from `direction`, rotated about a random perpendicular."""
    # Plain floats: numpy's per-call overhead dominates on 3-vectors, and trees make thousands.
    dx, dy, dz = (float(c) for c in direction)
    hx, hy, hz = (0.0, 0.0, 1.0) if abs(dz) < 0.9 else (1.0, 0.0, 0.0)
    ax, ay, az = dy * hz - dz * hy, dz * hx - dx * hz, dx * hy - dy * hx
    norm = math.sqrt(ax * ax + ay * ay + az * az) or 1.0
    ax, ay, az = ax / norm, ay / norm, az / norm
    bx, by, bz = dy * az - dz * ay, dz * ax - dx * az, dx * ay - dy * ax
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    c, s = math.cos(phi), math.sin(phi)
    angle = math.radians(angle_deg)
    ca, sa = math.cos(angle), math.sin(angle)
    out = np.array(
        [
            ca * dx + sa * (c * ax + s * bx),
            ca * dy + sa * (c * ay + s * by),
            ca * dz + sa * (c * az + s * bz),
        ]
    )
    return _unit(out)


def grow_tree(
    rng: np.random.Generator,
    coarse: CoarseLungs,
    side: int,
    start: npt.NDArray[np.float64],
    direction: npt.NDArray[np.float64],
    radius: float,
    *,
    min_radius: float,
    max_depth: int,
    taper: float,
) -> list[Segment]:
    """A branching tree of tubes that stays inside one lung, thinning towards the periphery."""
    segments: list[Segment] = []
    stack = [(start, _unit(direction), radius, 0)]
    while stack:
        p, d, r, depth = stack.pop()
        length = float(rng.uniform(0.8, 1.2)) * (10.0 + 7.0 * r)
        end = None
        # Branches that would leave the lung try a few other directions, then shorten, so
        # the tree fills the lung instead of dying at the first curve of the pleura.
        for attempt in range(6):
            heading = d if attempt == 0 else _perturb(rng, d, float(rng.uniform(10.0, 50.0)))
            fraction = 1.0 if attempt < 4 else 0.5
            q = p + heading * length * fraction
            labels, _ = coarse.lookup(np.stack([q, (p + q) / 2.0]))
            if np.all(labels == side):
                end, d = q, heading
                break
        if end is None:
            continue
        r_end = r * taper
        segments.append(Segment(_point(p), _point(end), r, r_end))
        if r_end < min_radius or depth + 1 >= max_depth:
            continue
        for _ in range(2):
            child = _perturb(rng, d, float(rng.uniform(20.0, 42.0)))
            stack.append((end, child, r_end * float(rng.uniform(0.85, 1.0)), depth + 1))
    return segments


def _lung_entry(coarse: CoarseLungs, side: int, target: Point) -> npt.NDArray[np.float64]:
    """The lung voxel of `side` nearest to a target point (the hilum sits at the lung's edge)."""
    pts = coarse.points(coarse.labels == side)
    if len(pts) == 0:
        return np.asarray(target, dtype=np.float64)
    d2 = np.sum((pts - np.asarray(target)) ** 2, axis=1)
    return pts[int(np.argmin(d2))]


def vessel_segments(
    rng: np.random.Generator, anatomy: Anatomy, coarse: CoarseLungs
) -> list[Segment]:
    """Pulmonary vessel trees branching from each hilum towards the periphery."""
    segments: list[Segment] = []
    for side in SIDES:
        sign = SIDE_SIGN[side]
        root = _lung_entry(coarse, side, anatomy.hilum(side))
        # Upper, lateral, anterior-inferior, posterior-inferior and basal trunks.
        for direction in (
            (0.3 * sign, 0.0, 1.0),
            (sign, -0.3, 0.1),
            (0.6 * sign, -0.7, -0.6),
            (0.5 * sign, 0.8, -0.7),
            (0.3 * sign, 0.2, -1.0),
        ):
            d = _perturb(rng, _unit(np.asarray(direction)), float(rng.uniform(0.0, 12.0)))
            segments += grow_tree(
                rng,
                coarse,
                side,
                root,
                d,
                float(rng.uniform(3.5, 5.0)) * anatomy.vessel_scale,
                min_radius=0.6,
                max_depth=anatomy.vessel_depth,
                taper=0.78,
            )
    return segments


def airway_segments(
    rng: np.random.Generator, anatomy: Anatomy, coarse: CoarseLungs
) -> list[Segment]:
    """Trachea, main bronchi and a few generations of bronchi (lumen radii)."""
    a = anatomy
    tu, tv = a.trachea
    carina = np.array([tu, tv, a.carina_z])
    r = a.trachea_radius
    segments = [Segment((tu, tv, a.carina_z), (tu, tv, a.z_top + 80.0), r, r)]
    for side in SIDES:
        sign = SIDE_SIGN[side]
        entry = _lung_entry(coarse, side, a.hilum(side))
        main_r = r * (0.72 if side == LUNG_RIGHT else 0.62)
        segments.append(Segment(_point(carina), _point(entry), main_r, main_r))
        for direction in ((0.5 * sign, 0.0, 1.0), (0.6 * sign, 0.3, -1.0), (sign, -0.5, -0.3)):
            segments += grow_tree(
                rng,
                coarse,
                side,
                entry,
                _unit(np.asarray(direction)),
                main_r * 0.7,
                min_radius=1.2 * anatomy.airway_scale,
                max_depth=3,
                taper=0.7,
            )
    return segments


def _capsule_weight(
    grid: Grid, seg: Segment, soft_mm: float
) -> tuple[tuple[slice, slice, slice], FloatArray] | None:
    """Partial-volume coverage (0..1) of a tube over its bounding box, or None if off-grid."""
    p0 = np.asarray(seg.p0, dtype=np.float64)
    p1 = np.asarray(seg.p1, dtype=np.float64)
    pad = max(seg.r0, seg.r1) + soft_mm
    box = grid.index_box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if box is None:
        return None
    u, v, z = grid.crop_coords(box)
    d = (p1 - p0).astype(np.float32)
    length2 = max(float(np.dot(d, d)), 1e-6)
    du, dv, dz = u - np.float32(p0[0]), v - np.float32(p0[1]), z - np.float32(p0[2])
    t = np.clip((du * d[0] + dv * d[1] + dz * d[2]) / np.float32(length2), 0.0, 1.0)
    dist = np.sqrt((du - t * d[0]) ** 2 + (dv - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
    radius = np.float32(seg.r0) + t * np.float32(seg.r1 - seg.r0)
    weight = np.clip((radius - dist) / np.float32(soft_mm) + 0.5, 0.0, 1.0)
    # A tube thinner than a pixel fills only part of it: scale its contrast so that it does
    # not look (and weigh) like a tube one pixel wide.
    weight *= np.minimum(np.float32(1.0), radius * np.float32(2.0 / soft_mm))
    return box, weight.astype(np.float32)


def draw_tubes(
    hu: FloatArray,
    grid: Grid,
    segments: Sequence[Segment],
    value: float,
    *,
    within: BoolArray | None = None,
    grow_mm: float = 0.0,
) -> None:
    """Blend tubes of HU `value` into the volume in place (optionally only inside `within`)."""
    soft = grid.pixel_mm
    for seg in segments:
        grown = Segment(seg.p0, seg.p1, seg.r0 + grow_mm, seg.r1 + grow_mm)
        found = _capsule_weight(grid, grown, soft)
        if found is None:
            continue
        box, weight = found
        if within is not None:
            weight = weight * within[box]
        crop = hu[box]
        crop += weight * (np.float32(value) - crop)


# --- lesions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lesion:
    """One planted lesion: an irregular ellipsoid, optionally with a core or a halo."""

    side: int
    kind: str  # "ground_glass" (optional consolidation core) or "consolidation" (optional halo)
    centre: Point
    axes: Point  # semi-axes in mm along the rows of `basis`
    basis: tuple[Point, Point, Point]
    hu: float  # ground-glass or consolidation level
    core: float  # fraction of the size that consolidates (ground-glass lesions), 0 = none
    core_hu: float
    halo_mm: float  # thin ground-glass rim around a consolidation, 0 = none
    waves: tuple[Wave, ...]  # smooth shape irregularity and texture
    pleural_mm: float  # distance of the centre to the pleura
    bronchograms: tuple[Segment, ...] = ()

    @property
    def radius_mm(self) -> float:
        return float(max(self.axes))

    def scaled(self, factor: float) -> Lesion:
        """The same lesion grown or shrunk about its centre by a linear `factor` (a follow-up
        study: the volume scales by about factor**3 before the lung boundary cuts it)."""
        c = np.asarray(self.centre)

        def about_centre(p: Point) -> Point:
            return _point(c + (np.asarray(p) - c) * factor)

        return dataclasses.replace(
            self,
            axes=_point(np.asarray(self.axes) * factor),
            halo_mm=self.halo_mm * factor,
            bronchograms=tuple(
                dataclasses.replace(s, p0=about_centre(s.p0), p1=about_centre(s.p1))
                for s in self.bronchograms
            ),
        )

    def describe(self, to_patient: Callable[[Point], Point]) -> dict[str, object]:
        """A short JSON-able description (patient LPS centre)."""
        kind = self.kind
        if self.core > 0:
            kind += "+consolidation"
        if self.halo_mm > 0:
            kind += "+ground_glass_halo"
        return {
            "lung": SIDE_NAMES[self.side],
            "type": kind,
            "centre_mm": [round(c, 1) for c in to_patient(self.centre)],
            "radius_mm": round(self.radius_mm, 1),
            "pleura_distance_mm": round(self.pleural_mm, 1),
            "air_bronchograms": len(self.bronchograms),
        }


def _point(values: npt.NDArray[np.float64] | Sequence[float]) -> Point:
    return (float(values[0]), float(values[1]), float(values[2]))


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> tuple[Wave, ...]:
    out = []
    for _ in range(n):
        k = 2.0 * math.pi / float(rng.uniform(*wavelength))
        d = _unit(rng.normal(size=3)) * k
        out.append((float(d[0]), float(d[1]), float(d[2]), float(rng.uniform(0.0, 2.0 * math.pi))))
    return tuple(out)


def _field(waves: Sequence[Wave], u: FloatArray, v: FloatArray, z: FloatArray) -> FloatArray:
    """Sum of plane waves, roughly in [-1, 1]: smooth irregularity and texture."""
    total = np.zeros(np.broadcast_shapes(u.shape, v.shape, z.shape), np.float32)
    for ku, kv, kz, phase in waves:
        total = total + np.cos(
            u * np.float32(ku) + v * np.float32(kv) + z * np.float32(kz) + np.float32(phase)
        )
    return total * np.float32(1.0 / math.sqrt(len(waves)) / 1.5)


def _basis(normal: npt.NDArray[np.float64], rng: np.random.Generator) -> tuple[Point, Point, Point]:
    """An orthonormal basis whose first axis is `normal`, the others randomly turned."""
    n = _unit(normal)
    e1 = _perturb(rng, n, 90.0)
    return (_point(n), _point(e1), _point(np.cross(n, e1).astype(np.float64)))


def _pick(
    rng: np.random.Generator, points: npt.NDArray[np.float64], weights: npt.NDArray[np.float64]
) -> int:
    p = weights / weights.sum()
    return int(rng.choice(len(points), p=p))


def plan_lesions(
    rng: np.random.Generator,
    kind: str,
    anatomy: Anatomy,
    coarse: CoarseLungs,
    z_range: tuple[float, float],
) -> list[Lesion]:
    """Random lesions for a class, following the DeepSC-COVID findings.

    covid19: bilateral, multifocal (3-8), peripheral (centre within ~15 mm of the pleura)
    ground-glass, flattened along the pleura, some with a consolidation core.
    cap: mostly unilateral (~15% bilateral), 1-2 large central (towards the hilum)
    consolidations with air bronchograms and sometimes a ground-glass halo.
    normal: none. Only lungs inside `z_range` (the scanned slab) are candidates.
    """
    if kind == "normal":
        return []
    zc = coarse.points(np.ones_like(coarse.labels, dtype=bool))[:, 2]
    in_slab = ((zc >= z_range[0]) & (zc <= z_range[1])).reshape(coarse.labels.shape)
    lesions: list[Lesion] = []
    if kind == "covid19":
        count = int(rng.integers(3, 9))
        sides = [LUNG_RIGHT, LUNG_LEFT] + [
            SIDES[int(rng.random() < 0.45)] for _ in range(count - 2)
        ]
        for side in sides:
            lesion = _plan_covid(rng, anatomy, coarse, side, in_slab)
            if lesion is not None:
                lesions.append(lesion)
    elif kind == "cap":
        main = LUNG_RIGHT if rng.random() < 0.6 else LUNG_LEFT
        sides = [main] * int(rng.integers(1, 3))
        if rng.random() < 0.15:
            sides.append(LUNG_LEFT if main == LUNG_RIGHT else LUNG_RIGHT)
        for side in sides:
            lesion = _plan_cap(rng, anatomy, coarse, side, in_slab)
            if lesion is not None:
                lesions.append(lesion)
    else:
        raise ValueError(f"unknown phantom kind {kind!r}")
    return lesions


def _candidates(
    coarse: CoarseLungs, side: int, in_slab: BoolArray, lo: float, hi: float
) -> tuple[npt.NDArray[np.float64], FloatArray]:
    mask = (coarse.labels == side) & in_slab
    for low, high in ((lo, hi), (0.0, hi * 2.0), (0.0, 1e9)):
        chosen = mask & (coarse.pleura_mm >= low) & (coarse.pleura_mm <= high)
        if chosen.any():
            return coarse.points(chosen), coarse.pleura_mm[chosen]
    return np.zeros((0, 3)), np.zeros(0, np.float32)


def _pleura_normal(coarse: CoarseLungs, point: npt.NDArray[np.float64]) -> np.ndarray:
    """Direction towards the nearest pleura (minus the gradient of the pleural distance)."""
    offsets = np.eye(3) * coarse.step
    _, plus = coarse.lookup(point + offsets)
    _, minus = coarse.lookup(point - offsets)
    grad = (plus - minus).astype(np.float64)
    if not np.any(grad):
        return np.array([1.0, 0.0, 0.0])
    return _unit(-grad)


def _plan_covid(
    rng: np.random.Generator,
    anatomy: Anatomy,
    coarse: CoarseLungs,
    side: int,
    in_slab: BoolArray,
) -> Lesion | None:
    points, dist = _candidates(coarse, side, in_slab, 2.0, 14.0)
    if len(points) == 0:
        return None
    # COVID-19 favours the posterior and lower lung.
    v = (points[:, 1] + anatomy.half_depth) / (2.0 * anatomy.half_depth)
    low = 1.0 - (points[:, 2] - anatomy.z_bottom) / (anatomy.z_top - anatomy.z_bottom)
    # Subpleural means mostly under the costal pleura, not against the mediastinum.
    lateral = np.abs(points[:, 0]) / anatomy.half_width
    i = _pick(rng, points, 1.0 + 1.2 * v + 0.8 * np.clip(low, 0.0, 1.0) + 1.5 * lateral)
    centre = points[i] + rng.uniform(-0.5, 0.5, size=3) * coarse.step
    # Big enough to stay a few pixels wide on a 128x128 model grid even when flattened.
    radius = float(rng.uniform(14.0, 35.0))
    axes = (radius * float(rng.uniform(0.6, 0.85)), radius, radius * float(rng.uniform(0.7, 1.0)))
    has_core = rng.random() < 0.4
    return Lesion(
        side=side,
        kind="ground_glass",
        centre=_point(centre),
        axes=axes,
        basis=_basis(_pleura_normal(coarse, points[i]), rng),
        hu=float(rng.uniform(-680.0, -480.0)),
        core=float(rng.uniform(0.4, 0.6)) if has_core else 0.0,
        core_hu=float(rng.uniform(-30.0, 45.0)),
        halo_mm=0.0,
        waves=_waves(rng, 6, (12.0, 40.0)),
        pleural_mm=float(dist[i]),
    )


def _plan_cap(
    rng: np.random.Generator,
    anatomy: Anatomy,
    coarse: CoarseLungs,
    side: int,
    in_slab: BoolArray,
) -> Lesion | None:
    points, dist = _candidates(coarse, side, in_slab, 14.0, 1e9)
    if len(points) == 0:
        return None
    hilum = np.asarray(anatomy.hilum(side))
    near = np.exp(-np.linalg.norm(points - hilum, axis=1) / 45.0)
    i = _pick(rng, points, near + 1e-6)
    centre = points[i] + rng.uniform(-0.5, 0.5, size=3) * coarse.step
    radius = float(rng.uniform(22.0, 44.0))
    axes = (radius, radius * float(rng.uniform(0.65, 0.95)), radius * float(rng.uniform(0.6, 0.9)))
    outward = _unit(centre - hilum)
    bronchograms = []
    # Air bronchograms: a few thin tubes running outwards through the consolidation.
    for _ in range(int(rng.integers(2, 5))):
        d = _perturb(rng, outward, float(rng.uniform(0.0, 35.0)))
        start = centre - d * radius * 0.6 + rng.normal(scale=radius * 0.15, size=3)
        end = start + d * radius * float(rng.uniform(0.9, 1.4))
        r0 = float(rng.uniform(1.6, 2.4))
        bronchograms.append(Segment(_point(start), _point(end), r0, r0 * 0.6))
    return Lesion(
        side=side,
        kind="consolidation",
        centre=_point(centre),
        axes=axes,
        basis=_basis(outward, rng),
        hu=float(rng.uniform(-40.0, 45.0)),
        core=0.0,
        core_hu=0.0,
        halo_mm=float(rng.uniform(3.0, 7.0)) if rng.random() < 0.5 else 0.0,
        waves=_waves(rng, 6, (15.0, 50.0)),
        pleural_mm=float(dist[i]),
        bronchograms=tuple(bronchograms),
    )


def _main_component(mask: BoolArray, seed: BoolArray | None = None) -> BoolArray:
    """The largest connected part of a mask (or the parts touching `seed`)."""
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    if seed is not None:
        keep = np.unique(labelled[seed & mask])
        return np.isin(labelled, keep[keep > 0])
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return np.asarray(labelled == int(np.argmax(sizes)))


def draw_lesion(
    hu: FloatArray, labels: ByteArray, lungs: ByteArray, grid: Grid, lesion: Lesion
) -> None:
    """Blend one lesion into the HU volume and its label map, in place.

    The label is set exactly where the lesion intensity was applied (lesion shape intersected
    with the lung), so masks stay faithful to what a network can see. Air bronchograms are
    kept in the consolidation class: they belong to the consolidated region, as annotators
    draw it, and are sub-pixel at model resolution.
    """
    c = np.asarray(lesion.centre)
    reach = max(lesion.axes) * 1.25 + lesion.halo_mm
    box = grid.index_box(c - reach, c + reach)
    if box is None:
        return
    u, v, z = grid.crop_coords(box)
    du, dv, dz = u - np.float32(c[0]), v - np.float32(c[1]), z - np.float32(c[2])
    radius2: FloatArray | float = 0.0
    for row, axis in zip(lesion.basis, lesion.axes, strict=True):
        proj = du * np.float32(row[0]) + dv * np.float32(row[1]) + dz * np.float32(row[2])
        radius2 = radius2 + (proj / np.float32(axis)) ** 2
    shape_noise = _field(lesion.waves, u, v, z)
    # Normalised radius with an irregular (lobulated) boundary.
    rad = np.sqrt(radius2) * (1.0 + np.float32(0.18) * shape_noise)
    lung = lungs[box] > 0
    # One lesion is one connected region: the lung boundary may cut off slivers that would be
    # single stray voxels at model resolution, so they are not drawn at all.
    region = _main_component(lung & (rad < 1.0))
    texture = _field(lesion.waves[::-1], v, z, u) * np.float32(30.0)
    crop, lab = hu[box], labels[box]
    if lesion.kind == "ground_glass":
        # Ground glass raises the parenchyma but leaves vessels visible through it.
        ggo = np.float32(lesion.hu) + texture
        crop[region] = np.maximum(crop, ggo)[region]
        lab[region & (lab != SEG_CONSOLIDATION)] = SEG_GROUND_GLASS
        if lesion.core > 0:
            core = region & (rad < lesion.core)
            crop[core] = (np.float32(lesion.core_hu) + texture)[core]
            lab[core] = SEG_CONSOLIDATION
        return
    if lesion.halo_mm > 0:
        shell = lung & (rad < 1.0 + lesion.halo_mm / max(lesion.axes))
        halo = _main_component(shell, seed=region) & ~region & (lab == 0)
        ggo = np.float32(-600.0) + texture
        crop[halo] = np.maximum(crop, ggo)[halo]
        lab[halo] = SEG_GROUND_GLASS
    crop[region] = (np.float32(lesion.hu) + texture)[region]
    lab[region] = SEG_CONSOLIDATION
    for seg in lesion.bronchograms:
        found = _capsule_weight(grid, seg, grid.pixel_mm)
        if found is None:
            continue
        tube_box, weight = found
        inside = labels[tube_box] == SEG_CONSOLIDATION
        tube = hu[tube_box]
        tube += weight * inside * (np.float32(HU_AIR_BRONCHOGRAM) - tube)
