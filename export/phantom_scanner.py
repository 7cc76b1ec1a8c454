"""The scanner side of a phantom: what the CT scanner and its reconstruction do to the body.

Every factor here is drawn independently of the body and of the findings, so a network cannot
read the class from how the image was made: slice thickness and spacing (thick slices average
the heart dome, the diaphragm and the great vessels with the lung around them), the
reconstruction kernel (smooth to sharp, with edge overshoot), correlated noise, streaks and
cupping (beam hardening), the patient table, pixel padding outside the reconstruction circle
and how pixels are stored (signed or unsigned, intercept 0 or -1024). docs/models.md lists
every range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]

PIXEL_MM_RANGE: Final = (0.5, 0.98)  # in-plane spacing of a 512 x 512 reconstruction
SLICE_MM_RANGE: Final = (0.6, 5.0)  # thickness and spacing
# Thin-slice rendering step: a thick slice is the average of sub-slices this far apart at most.
SUBSLICE_MM: Final = 1.25
NOISE_HU_RANGE: Final = (6.0, 70.0)
PixelConvention = Literal["signed", "signed-1024", "unsigned-1024"]
CONVENTIONS: Final[tuple[PixelConvention, ...]] = ("signed", "signed-1024", "unsigned-1024")
CONVENTION_INTERCEPT: Final[dict[str, int]] = {
    "signed": 0,
    "signed-1024": -1024,
    "unsigned-1024": -1024,
}
# Stored value outside the reconstruction circle per convention (PixelPaddingValue).
CONVENTION_PADDING: Final[dict[str, int]] = {
    "signed": -2000,
    "signed-1024": -1000,
    "unsigned-1024": 0,
}
Coverage = Literal["full", "apex-cut", "base-cut"]


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel: in-plane resolution, edge enhancement and noise texture."""

    name: str
    sigma_mm: tuple[float, float]  # Gaussian blur of the point spread (range)
    sharpen: tuple[float, float]  # unsharp-mask gain: edge overshoot of sharp kernels
    noise_cutoff: tuple[float, float]  # noise power peak, fraction of the Nyquist frequency
    noise_hu: tuple[float, float]


KERNELS: Final = (
    Kernel("SOFT", (0.75, 1.1), (0.0, 0.0), (0.15, 0.25), (6.0, 18.0)),
    Kernel("STANDARD", (0.55, 0.8), (0.0, 0.2), (0.25, 0.4), (10.0, 30.0)),
    Kernel("B45f", (0.45, 0.65), (0.2, 0.5), (0.35, 0.5), (18.0, 45.0)),
    Kernel("LUNG", (0.35, 0.55), (0.4, 0.9), (0.45, 0.65), (25.0, 60.0)),
    Kernel("B70f", (0.3, 0.45), (0.7, 1.2), (0.55, 0.8), (35.0, 70.0)),
)


@dataclass(frozen=True)
class Streak:
    """A straight streak (beam hardening / photon starvation) across part of the scan."""

    point: tuple[float, float]  # (u, v) mm it passes through, body-centred
    angle: float  # radians
    width_mm: float
    hu: float  # signed: dark or bright
    z_centre: float
    z_half: float  # mm over which it fades in and out


@dataclass(frozen=True)
class Scanner:
    """How one phantom was scanned and stored."""

    pixel_mm_512: float
    slice_mm: float  # spacing between slice centres
    thickness_mm: float
    coverage: Coverage
    cut_mm: float  # lung height left out by a partial coverage
    kernel: Kernel
    sigma_mm: float
    sharpen: float
    noise_hu: float
    noise_cutoff: float
    cupping_hu: float
    streaks: tuple[Streak, ...]
    table: bool
    table_gap_mm: float
    table_mm: float  # total thickness of the table
    convention: PixelConvention
    random_names: bool  # file names that say nothing about the order
    kvp: int

    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        *,
        half_width: float,
        half_depth: float,
        z_span: tuple[float, float],
    ) -> Scanner:
        """Draw a scan of a body `half_width` x `half_depth` mm whose lungs span `z_span`."""
        # Thin, medium and thick reconstructions are all common; thin ones cost the most slices.
        band = rng.choice(3, p=(0.25, 0.35, 0.40))
        thickness = float(rng.uniform(*((0.6, 1.25), (1.25, 3.0), (3.0, 5.0))[band]))
        # Overlapping reconstructions (spacing < thickness) are common, gaps are not made.
        spacing = thickness if rng.random() < 0.7 else thickness * float(rng.uniform(0.5, 0.9))
        spacing = max(SLICE_MM_RANGE[0], round(spacing * 20.0) / 20.0)
        thickness = round(thickness * 20.0) / 20.0
        kernel = KERNELS[int(rng.integers(len(KERNELS)))]
        coverage: Coverage = str(  # type: ignore[assignment]
            rng.choice(["full", "apex-cut", "base-cut"], p=(0.76, 0.12, 0.12))
        )
        height = z_span[1] - z_span[0]
        streaks = tuple(
            _sample_streak(rng, half_width, half_depth, z_span) for _ in range(rng.integers(0, 5))
        )
        return cls(
            pixel_mm_512=float(rng.uniform(*PIXEL_MM_RANGE)),
            slice_mm=spacing,
            thickness_mm=thickness,
            coverage=coverage,
            cut_mm=float(rng.uniform(0.06, 0.2)) * height,
            kernel=kernel,
            sigma_mm=float(rng.uniform(*kernel.sigma_mm)),
            sharpen=float(rng.uniform(*kernel.sharpen)),
            noise_hu=float(rng.uniform(*kernel.noise_hu)),
            noise_cutoff=float(rng.uniform(*kernel.noise_cutoff)),
            cupping_hu=float(rng.uniform(0.0, 30.0)),
            streaks=streaks,
            table=bool(rng.random() < 0.85),
            table_gap_mm=float(rng.uniform(0.0, 25.0)),
            table_mm=float(rng.uniform(25.0, 60.0)),
            convention=CONVENTIONS[int(rng.integers(len(CONVENTIONS)))],
            random_names=bool(rng.random() < 0.3),
            kvp=int(rng.choice([100, 120, 140])),
        )

    @property
    def intercept(self) -> int:
        return CONVENTION_INTERCEPT[self.convention]

    @property
    def padding(self) -> int:
        return CONVENTION_PADDING[self.convention]


def _sample_streak(
    rng: np.random.Generator, half_width: float, half_depth: float, z_span: tuple[float, float]
) -> Streak:
    # Streaks start at dense structures: shoulders near the apex, spine and ribs lower down.
    apex = rng.random() < 0.5
    z0, z1 = z_span
    z_centre = z1 - float(rng.uniform(0.0, 0.2)) * (z1 - z0) if apex else float(rng.uniform(z0, z1))
    return Streak(
        point=(
            float(rng.uniform(-0.6, 0.6)) * half_width,
            float(rng.uniform(-0.3, 0.8)) * half_depth,
        ),
        angle=float(rng.normal(0.0, 0.25)) if apex else float(rng.uniform(0.0, math.pi)),
        width_mm=float(rng.uniform(1.5, 6.0)),
        hu=float(rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 110.0)),
        z_centre=z_centre,
        z_half=float(rng.uniform(5.0, 40.0)),
    )


def fine_positions(out_z: npt.NDArray[np.float64], thickness: float) -> tuple[float, float, int]:
    """(first z, step, count) of the regular sub-slice grid that covers every slab."""
    m = max(1, math.ceil(thickness / SUBSLICE_MM - 1e-9))
    step = thickness / m
    first = float(out_z[0]) - thickness / 2.0 + step / 2.0
    count = math.floor((float(out_z[-1]) + thickness / 2.0 - first) / step + 1e-6) + 1
    return first, step, count


def _slab_weights(
    fine_z: npt.NDArray[np.float64], step: float, centre: float, thickness: float
) -> tuple[slice, npt.NDArray[np.float32]]:
    """Overlap of each sub-slice with the slab [centre - t/2, centre + t/2], as weights."""
    lo, hi = centre - thickness / 2.0, centre + thickness / 2.0
    overlap = np.minimum(fine_z + step / 2.0, hi) - np.maximum(fine_z - step / 2.0, lo)
    overlap = np.clip(overlap, 0.0, None)
    nonzero = np.flatnonzero(overlap > 1e-9)
    span = slice(int(nonzero[0]), int(nonzero[-1]) + 1)
    weights = overlap[span] / overlap[span].sum()
    return span, weights.astype(np.float32)


def slab_average(
    fine_hu: FloatArray,
    fine_lesions: ByteArray,
    fine_lungs: ByteArray,
    fine_z: npt.NDArray[np.float64],
    step: float,
    out_z: npt.NDArray[np.float64],
    thickness: float,
) -> tuple[FloatArray, ByteArray, ByteArray]:
    """Thick slices from sub-slices: HU averaged (partial volume), labels by majority.

    A voxel is lesion when lesion covers at least half of its slab (the class with more of it);
    lung likewise. So a thin lesion edge that a thick slice washes out is not in the truth.
    """
    shape = (len(out_z), *fine_hu.shape[1:])
    hu = np.empty(shape, np.float32)
    lesions = np.zeros(shape, np.uint8)
    lungs = np.zeros(shape, np.uint8)
    for k, centre in enumerate(out_z):
        span, w = _slab_weights(fine_z, step, float(centre), thickness)
        if w.size == 1:
            hu[k], lesions[k], lungs[k] = (
                fine_hu[span][0],
                fine_lesions[span][0],
                fine_lungs[span][0],
            )
            continue
        hu[k] = np.tensordot(w, fine_hu[span], axes=1)
        lesions[k] = _majority(fine_lesions[span], w)
        lungs[k] = _majority(fine_lungs[span], w)
    return hu, lesions, lungs


def _majority(labels: ByteArray, weights: npt.NDArray[np.float32]) -> ByteArray:
    """Label map of a slab: non-zero where non-zero labels cover >= half of it."""
    a = np.tensordot(weights, (labels == 1).astype(np.float32), axes=1)
    b = np.tensordot(weights, (labels == 2).astype(np.float32), axes=1)
    out = np.zeros(labels.shape[1:], np.uint8)
    labelled = (a + b) >= 0.5 - 1e-6
    out[labelled] = np.where(b[labelled] > a[labelled], 2, 1)
    return out


def table_plane(
    u: FloatArray, v: FloatArray, back_v: float, scanner: Scanner
) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    """The patient table under the back: a curved carbon-fibre shell around a foam core."""
    top = back_v + scanner.table_gap_mm
    # Curved upwards at the sides, like a cradle.
    surface = top - 0.0006 * u**2
    depth = v - surface
    inside = (depth >= 0) & (depth <= scanner.table_mm) & (np.abs(u) <= 240.0)
    shell = (depth <= 2.5) | (depth >= scanner.table_mm - 2.5)
    value = np.where(shell, np.float32(350.0), np.float32(-850.0)).astype(np.float32)
    return inside, value


def _unsharp(hu: FloatArray, sigma_px: float, gain: float) -> FloatArray:
    if gain <= 0:
        return hu
    blurred = ndimage.gaussian_filter(hu, sigma=(0.0, 2.0 * sigma_px, 2.0 * sigma_px))
    return (hu + np.float32(gain) * (hu - blurred)).astype(np.float32)


def correlated_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], cutoff: float, std: float
) -> FloatArray:
    """CT-like noise: white noise band-passed in-plane (a difference of Gaussians).

    Filtered back projection multiplies the noise by |f| and the kernel's apodisation, so the
    noise is grainy at a scale set by the kernel, not white; a difference of Gaussians has the
    same rising-then-falling power spectrum, peaking near `cutoff` (fraction of Nyquist).
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    fine = 0.25 / max(cutoff, 1e-3)
    shaped = ndimage.gaussian_filter(white, sigma=(0.0, fine, fine))
    shaped -= ndimage.gaussian_filter(white, sigma=(0.0, 2.5 * fine, 2.5 * fine))
    scale = float(shaped.std()) or 1.0
    shaped *= np.float32(std / scale)
    return shaped


def reconstruct(
    hu: FloatArray,
    rng: np.random.Generator,
    scanner: Scanner,
    *,
    pixel_mm: float,
    u: FloatArray,
    v: FloatArray,
    z: npt.NDArray[np.float64],
    body: npt.NDArray[np.bool_],
) -> FloatArray:
    """Kernel blur and edge overshoot, cupping, streaks and correlated noise, in place order.

    `u`, `v` are the body-centred column and row positions, `z` the slice positions, `body`
    the 2D body outline (cupping lies inside it).
    """
    sigma_px = max(0.3, scanner.sigma_mm / pixel_mm)
    out = ndimage.gaussian_filter(hu, sigma=(0.0, sigma_px, sigma_px)).astype(np.float32)
    out = _unsharp(out, sigma_px, scanner.sharpen)
    if scanner.cupping_hu > 0 and body.any():
        dist = ndimage.distance_transform_edt(body).astype(np.float32)
        depth = dist / max(float(dist.max()), 1.0)
        out -= np.float32(scanner.cupping_hu) * depth[None]
    for streak in scanner.streaks:
        cu, cv = streak.point
        normal = (-math.sin(streak.angle), math.cos(streak.angle))
        d = (u[None, :] - np.float32(cu)) * np.float32(normal[0]) + (
            v[:, None] - np.float32(cv)
        ) * np.float32(normal[1])
        profile = np.exp(-((d / np.float32(streak.width_mm)) ** 2)).astype(np.float32)
        fade = np.clip(1.0 - np.abs(z - streak.z_centre) / streak.z_half, 0.0, 1.0)
        for k in np.flatnonzero(fade > 0):
            out[k] += np.float32(streak.hu * fade[k]) * profile
    out += correlated_noise(rng, hu.shape, scanner.noise_cutoff, scanner.noise_hu)
    return out


def recon_circle(size: int) -> npt.NDArray[np.bool_]:
    """Pixels inside the reconstruction circle of a size x size image."""
    idx = np.arange(size) - (size - 1) / 2.0
    return np.asarray(np.hypot(idx[:, None], idx[None, :]) <= size / 2.0)


__all__ = [
    "CONVENTIONS",
    "KERNELS",
    "PIXEL_MM_RANGE",
    "SLICE_MM_RANGE",
    "Kernel",
    "Scanner",
    "Streak",
    "correlated_noise",
    "fine_positions",
    "recon_circle",
    "reconstruct",
    "slab_average",
    "table_plane",
]
