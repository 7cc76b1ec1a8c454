"""Preprocessing shared by training and serving: HU window, normalisation, resampling.

Driven by a saved `PreprocessPlan` (the exported ONNX file carries it), and every run records
the `ResampleGeometry` needed to put model outputs back onto the source slice grid exactly.
`export/` imports this module, so training and serving cannot drift apart.

Size: one job, the plan and what it drives both ways: the shared in-plane steps and one
Preprocessor per model kind, which must agree with each other.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import ClassVar, Final, Literal

import numpy as np

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, MODEL_NAMES
from ctjoint.gateway.aggregate import aggregate_slice_probabilities
from ctjoint.gateway.resample import resample_matrix
from ctjoint.gateway.source_grid import inplane_labels

InputKind = Literal["2.5d", "3d"]

# Lung window (centre -600 HU, width 1500 HU): lung, ground-glass and consolidation all fall
# inside it with room to spare, which is what both tasks need to see.
LUNG_WINDOW_CENTER = -600.0
LUNG_WINDOW_WIDTH = 1500.0


@dataclass(frozen=True)
class PreprocessPlan:
    """How a HU volume becomes model input. Saved with every exported model."""

    model: str
    kind: InputKind
    height: int
    width: int
    depth: int = 0  # 3D only: slices after resampling the whole scan
    context: int = 1  # 2.5D only: neighbours on each side of the slice
    window_center: float = LUNG_WINDOW_CENTER
    window_width: float = LUNG_WINDOW_WIDTH
    norm_mean: float = 0.5
    norm_std: float = 0.5

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MODEL_NAMES}")
        if self.kind not in PREPROCESSORS:
            raise ValueError(f"unknown input kind {self.kind!r}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"model input {self.height}x{self.width} is too small")
        PREPROCESSORS[self.kind].check(self)
        if self.window_width <= 0 or self.norm_std <= 0:
            raise ValueError("window width and normalisation std must be positive")
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "depth", int(self.depth))
        object.__setattr__(self, "context", int(self.context))

    @property
    def channels(self) -> int:
        return PREPROCESSORS[self.kind].channels(self)

    def preprocessor(self) -> Preprocessor:
        """The one object that knows this plan's kind (`Preprocessor`)."""
        return PREPROCESSORS[self.kind](self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessPlan:
        return cls(**json.loads(text))

    @classmethod
    def default(
        cls, model: str, height: int = 128, width: int = 128, depth: int = 64
    ) -> PreprocessPlan:
        if model == MODEL_JCS2D:
            return cls(model=model, kind="2.5d", height=height, width=width)
        if model == MODEL_DEEPSC3D:
            return cls(model=model, kind="3d", height=height, width=width, depth=depth)
        raise ValueError(f"unknown model {model!r}; expected one of {MODEL_NAMES}")


@dataclass(frozen=True)
class ResampleGeometry:
    """What preprocessing did to the grid, so outputs can be mapped back onto the source."""

    source_shape: tuple[int, int, int]  # (slices, rows, columns) of the assembled series
    model_shape: tuple[int, int, int]  # (slices or depth, height, width) seen by the model
    kind: InputKind


# Slices per pass of `inplane_slices` over a volume (8 MiB temporaries at 512x512).
INPLANE_CHUNK = 8


def resize_inplane(
    stack: np.ndarray, height: int, width: int, mode: Literal["area", "linear"]
) -> np.ndarray:
    """Resize the last two axes of a [..., Y, X] float array to [..., height, width]."""
    y, x = stack.shape[-2:]
    if mode == "area" and y % height == 0 and x % width == 0:
        # Whole-number downsampling (512 -> 128, the common case): a block mean is the same
        # area average as the matrix form. Summed as strided row then column views: about 20x
        # faster than a mean over a reshaped 6-axis view (0.08 ms instead of 1.5 ms per
        # 512x512 slice), and each output depends only on its own slice, so a slice resized
        # alone is bitwise equal to the same slice resized in a volume.
        fy, fx = y // height, x // width
        source = stack.astype(np.float32, copy=False)
        rows = source[..., 0::fy, :].copy()
        for i in range(1, fy):
            rows += source[..., i::fy, :]
        out = rows[..., 0::fx].copy()
        for i in range(1, fx):
            out += rows[..., i::fx]
        out *= np.float32(1.0 / (fy * fx))
        return out
    ry = resample_matrix(stack.shape[-2], height, mode)
    rx = resample_matrix(stack.shape[-1], width, mode)
    out = np.matmul(stack.astype(np.float32, copy=False), rx.T)
    return np.matmul(ry, out)


def window_normalise(hu: np.ndarray, plan: PreprocessPlan) -> np.ndarray:
    """HU -> lung window clipped to [0, 1] -> (x - mean) / std, float32."""
    low = plan.window_center - plan.window_width / 2.0
    scaled = (hu.astype(np.float32, copy=False) - np.float32(low)) / np.float32(plan.window_width)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled -= np.float32(plan.norm_mean)
    scaled /= np.float32(plan.norm_std)
    return scaled


def inplane_slices(hu: np.ndarray, plan: PreprocessPlan) -> np.ndarray:
    """HU slices [..., Y, X] -> windowed, resized to the plan's grid, normalised [..., H, W].

    The per-slice half of preprocessing: it needs nothing but the slice itself, so a gateway
    can run it on each file as it arrives. Equal to `window_normalise` then `resize_inplane`
    up to float rounding: the window is clipped in HU, and the affine part of windowing and
    normalisation (one multiply-add) runs after the resize, on 16x fewer pixels. A volume is
    done INPLANE_CHUNK slices at a time, each slice on its own (a slice alone gives the
    same bits as in a volume), so the full-size temporaries stay small enough to be reused
    from the allocator instead of being fresh pages each time (0.70 -> 0.32 ms per 512x512
    slice).
    """
    if hu.ndim < 3 or hu.shape[0] <= INPLANE_CHUNK:
        return _inplane_chunk(hu, plan)
    out = np.empty((*hu.shape[:-2], plan.height, plan.width), dtype=np.float32)
    for start in range(0, hu.shape[0], INPLANE_CHUNK):
        out[start : start + INPLANE_CHUNK] = _inplane_chunk(hu[start : start + INPLANE_CHUNK], plan)
    return out


def _inplane_chunk(hu: np.ndarray, plan: PreprocessPlan) -> np.ndarray:
    low = plan.window_center - plan.window_width / 2.0
    clipped = np.clip(hu, np.float32(low), np.float32(low + plan.window_width), dtype=np.float32)
    out = resize_inplane(clipped, plan.height, plan.width, "area")
    # ((x - low) / width - mean) / std as one multiply-add.
    out *= np.float32(1.0 / (plan.window_width * plan.norm_std))
    out += np.float32((-low / plan.window_width - plan.norm_mean) / plan.norm_std)
    return out


def context_stack(slices: np.ndarray, context: int) -> np.ndarray:
    """[Z, H, W] -> [Z, 2*context+1, H, W]: each slice with its neighbours (edges repeated)."""
    z = slices.shape[0]
    offsets = np.arange(-context, context + 1)
    index = np.clip(np.arange(z)[:, None] + offsets[None, :], 0, z - 1)
    return np.ascontiguousarray(slices[index])


def context_view(padded: np.ndarray, context: int) -> np.ndarray:
    """`context_stack` of `padded[context:-context]`, as a read-only view of `padded`: a
    [Z + 2*context, H, W] array whose first and last `context` slices repeat its edge slices.

    Equal to `context_stack` element by element, without its copy of 2*context+1 times the
    slices: streaming has inferred most stacks before the last file, and indexing the view
    copies only the ones still needed (a 400-slice scan: 79 MB of fresh pages less).
    """
    if context == 0:
        return padded[:, None]
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * context + 1, axis=0)
    return np.moveaxis(windows, -1, 1)  # [Z, 2*context+1, H, W]


def resample_labels(labels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour resample of an integer label volume [Z, Y, X] to `shape`.

    Used to bring ground-truth masks onto the model grid for training.
    """
    idx = [
        np.clip(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), 0, n_in - 1)
        for n_in, n_out in zip(labels.shape, shape, strict=True)
    ]
    return labels[np.ix_(*idx)]


# --- One interface for the two model kinds ----------------------------------------------------


class Preprocessor(abc.ABC):
    """What a model kind sees, and how its answer goes back to the source grid.

    nnU-Net's plan-driven style: chosen once from the plan (`PreprocessPlan.preprocessor`),
    `run(volume)` gives the model input and its geometry and `to_source(seg_logits, geometry)`
    the label map on the source grid. The rest that differs between 2.5D and 3D (the input
    shape, how scan probabilities come from the classifier, which CAM belongs to the scan) is
    a method here too, so no caller tests the plan's kind.
    """

    kind: ClassVar[InputKind]
    # The batch axis holds source slices (2.5D): requests may split it and slices can be
    # inferred as their files arrive. Otherwise one sample is the whole scan.
    per_slice: ClassVar[bool]

    def __init__(self, plan: PreprocessPlan) -> None:
        if plan.kind != self.kind:
            raise ValueError(f"a {self.kind} preprocessor was given a {plan.kind} plan")
        self.plan = plan

    @staticmethod
    @abc.abstractmethod
    def check(plan: PreprocessPlan) -> None:
        """Raise ValueError when the plan lacks what this kind needs."""

    @staticmethod
    def channels(plan: PreprocessPlan) -> int:
        """Channels of one sample of `image`."""
        return 1

    @abc.abstractmethod
    def grid(self) -> tuple[int, ...]:
        """The spatial grid of one sample: (H, W) or (D, H, W)."""

    @abc.abstractmethod
    def model_shape(self, source_slices: int) -> tuple[int, int, int]:
        """(slices or depth, H, W) the model sees of a scan of `source_slices` slices."""

    @abc.abstractmethod
    def from_planes(self, planes: np.ndarray) -> np.ndarray:
        """In-plane preprocessed slices [Z, H, W] (sorted along the normal) -> model input."""

    @classmethod
    @abc.abstractmethod
    def scan_probabilities(cls, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The scan's class probabilities [K] and, per source slice, [Z, K] (None when the
        model has no per-slice answer), from the softmax of `cls_logits` [batch, K]."""

    @abc.abstractmethod
    def scan_cam(self, cam: np.ndarray, label_index: int) -> np.ndarray:
        """The class activation map of class `label_index`: [Z, h, w] (one per source slice)
        or [d, h, w] (the volume's), from the model's `cam` output."""

    @abc.abstractmethod
    def planes(self, image: np.ndarray) -> np.ndarray:
        """The preprocessed slices [Z or D, H, W] of a model input (training's grid)."""

    @classmethod
    @abc.abstractmethod
    def _on_source_z(
        cls, seg_logits: np.ndarray, source_slices: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The logits as [K, slices, H, W] and the [Z, slices] z interpolation onto the
        source's slices (None: they are on them already)."""

    @classmethod
    @abc.abstractmethod
    def _lesion_slices(
        cls, seg_logits: np.ndarray, source_slices: int, among: np.ndarray | None = None
    ) -> np.ndarray:
        """Indices of the source slices whose labels can be other than background, of
        those in `among` (all: None)."""

    @classmethod
    @abc.abstractmethod
    def _source_slice_logits(
        cls, seg_logits: np.ndarray, source_slices: int
    ) -> Callable[[np.ndarray], np.ndarray]:
        """The [n, K, h, w] logits of the source slices it is given, on the source's z."""

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """The contract shape of `image` (`batch`: -1 for a dynamic batch axis)."""
        return (batch, self.channels(self.plan), *self.grid())

    def geometry(self, source_shape: tuple[int, int, int]) -> ResampleGeometry:
        return ResampleGeometry(source_shape, self.model_shape(source_shape[0]), self.kind)

    def run(self, hu: np.ndarray) -> tuple[np.ndarray, ResampleGeometry]:
        """A HU volume [Z, Y, X] (sorted along the slice normal) -> model input and geometry."""
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise ValueError(f"expected a [slices, rows, columns] volume, got shape {hu.shape}")
        z, y, x = (int(s) for s in hu.shape)
        return self.from_planes(inplane_slices(hu, self.plan)), self.geometry((z, y, x))

    @classmethod
    def to_source(
        cls,
        seg_logits: np.ndarray,
        geometry: ResampleGeometry,
        known: Mapping[int, np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """Label map uint8 [Z, Y, X] on the source grid: `to_source_dense`, computed sparsely
        (gateway/source_grid.py); lesion-free slices need nothing at all. `known`: source
        slices labelled already (streaming), by index, None for one without lesion."""
        z, y, x = geometry.source_shape
        out = np.zeros((z, y, x), dtype=np.uint8)
        among = None
        if known:
            for index, plane in known.items():
                if plane is not None:
                    # Only the rows that hold lesions: the others' pages stay untouched.
                    held = np.flatnonzero(plane.any(axis=1))
                    out[index, held[0] : held[-1] + 1] = plane[held[0] : held[-1] + 1]
            # Known slices' logits are not read (streaming drops them once labelled).
            among = np.flatnonzero(~np.isin(np.arange(z), list(known)))
        rows = cls._lesion_slices(seg_logits, z, among)
        return inplane_labels(out, rows, cls._source_slice_logits(seg_logits, z))

    @classmethod
    def to_source_dense(
        cls, seg_logits: np.ndarray, geometry: ResampleGeometry, chunk: int = 16
    ) -> np.ndarray:
        """Model seg logits -> uint8 label map [Z, Y, X] on the source slice grid: the
        definition `to_source` computes faster.

        Logits (not labels) are interpolated linearly, then argmax: smooth, faithful
        boundaries. Works in chunks of source slices so a 512x512x300 scan never needs K
        full-size volumes.
        """
        z, y, x = geometry.source_shape
        volume, rz = cls._on_source_z(seg_logits, z)
        ry = resample_matrix(volume.shape[2], y, "linear")
        rx = resample_matrix(volume.shape[3], x, "linear")
        out = np.empty((z, y, x), dtype=np.uint8)
        for start in range(0, z, chunk):
            stop = min(start + chunk, z)
            if rz is None:
                part = volume[:, start:stop].astype(np.float32, copy=False)
            else:
                logits = volume.astype(np.float32, copy=False)
                part = np.moveaxis(np.tensordot(rz[start:stop], logits, axes=(1, 1)), 0, 1)
            up = np.matmul(ry, np.matmul(part, rx.T))  # [K, chunk, Y, X]
            out[start:stop] = np.argmax(up, axis=0).astype(np.uint8)
        return out


class SliceStacks(Preprocessor):
    """2.5D: one sample per source slice, the slice with `context` neighbours on each side as
    channels [Z, 2*context+1, H, W]; the scan's answer is the slices' vote."""

    kind = "2.5d"
    per_slice = True

    @staticmethod
    def check(plan: PreprocessPlan) -> None:
        if plan.context < 0:
            raise ValueError("a 2.5D plan needs context >= 0")

    @staticmethod
    def channels(plan: PreprocessPlan) -> int:
        return 2 * plan.context + 1

    def grid(self) -> tuple[int, ...]:
        return (self.plan.height, self.plan.width)

    def model_shape(self, source_slices: int) -> tuple[int, int, int]:
        return (source_slices, self.plan.height, self.plan.width)

    def from_planes(self, planes: np.ndarray) -> np.ndarray:
        return context_stack(planes, self.plan.context)

    @classmethod
    def scan_probabilities(cls, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return aggregate_slice_probabilities(probabilities), probabilities

    def scan_cam(self, cam: np.ndarray, label_index: int) -> np.ndarray:
        return cam[:, label_index]

    def planes(self, image: np.ndarray) -> np.ndarray:
        # The centre plane of each stack; neighbours are re-stacked per sample.
        return image[:, self.plan.context]

    @classmethod
    def _on_source_z(
        cls, seg_logits: np.ndarray, source_slices: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        volume = np.moveaxis(seg_logits, 1, 0)  # [K, Z, H, W]
        if volume.shape[1] != source_slices:
            raise ValueError(
                f"2.5D logits have {volume.shape[1]} slices, the series has {source_slices}"
            )
        return volume, None

    @classmethod
    def _lesion_slices(
        cls, seg_logits: np.ndarray, source_slices: int, among: np.ndarray | None = None
    ) -> np.ndarray:
        rows = np.arange(seg_logits.shape[0]) if among is None else among
        # 16 slices at a time: argmax's int64 result for every slice at once was 52 MB at
        # 400 slices of 128x128.
        found = [
            np.argmax(seg_logits[rows[start : start + 16]], axis=1).any(axis=(1, 2))
            for start in range(0, rows.size, 16)
        ]
        return rows[np.concatenate(found)] if found else np.zeros(0, dtype=np.intp)

    @classmethod
    def _source_slice_logits(
        cls, seg_logits: np.ndarray, source_slices: int
    ) -> Callable[[np.ndarray], np.ndarray]:
        return lambda rows: seg_logits[rows]


class WholeVolume(Preprocessor):
    """3D: the whole scan, resampled along z to the plan's depth, as one sample
    [1, 1, D, H, W]; outputs are interpolated back along z."""

    kind = "3d"
    per_slice = False

    @staticmethod
    def check(plan: PreprocessPlan) -> None:
        if plan.depth < 4:
            raise ValueError("a 3D plan needs depth >= 4")

    def grid(self) -> tuple[int, ...]:
        return (self.plan.depth, self.plan.height, self.plan.width)

    def model_shape(self, source_slices: int) -> tuple[int, int, int]:
        return (self.plan.depth, self.plan.height, self.plan.width)

    def from_planes(self, planes: np.ndarray) -> np.ndarray:
        rz = resample_matrix(planes.shape[0], self.plan.depth, "area")
        out = np.empty((1, 1, *self.model_shape(planes.shape[0])), dtype=np.float32)
        # Each depth slice averages the few source slices it covers (about Z / depth + 1):
        # their weighted sum, not a product with the mostly-zero [depth, Z] matrix
        # (512x512x400 -> 64 deep: 0.40 s -> 0.02 s after the last file).
        for k, row in enumerate(rz):
            taps = np.flatnonzero(row)
            out[0, 0, k] = np.tensordot(row[taps], planes[taps], axes=(0, 0))
        return out

    @classmethod
    def scan_probabilities(cls, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return probabilities[0], None

    def scan_cam(self, cam: np.ndarray, label_index: int) -> np.ndarray:
        return cam[0, label_index]

    def planes(self, image: np.ndarray) -> np.ndarray:
        return image[0, 0]

    @classmethod
    def _on_source_z(
        cls, seg_logits: np.ndarray, source_slices: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        volume = seg_logits[0] if seg_logits.ndim == 5 else seg_logits  # [K, D, H, W]
        return volume, resample_matrix(volume.shape[1], source_slices, "linear")

    @classmethod
    def _lesion_slices(
        cls, seg_logits: np.ndarray, source_slices: int, among: np.ndarray | None = None
    ) -> np.ndarray:
        volume, rz = cls._on_source_z(seg_logits, source_slices)
        assert rz is not None
        model_lesion = np.argmax(volume, axis=0).any(axis=(1, 2))  # [D]
        rows = np.flatnonzero((rz[:, model_lesion] > 0).any(axis=1))
        return rows if among is None else rows[np.isin(rows, among)]

    @classmethod
    def _source_slice_logits(
        cls, seg_logits: np.ndarray, source_slices: int
    ) -> Callable[[np.ndarray], np.ndarray]:
        volume, rz = cls._on_source_z(seg_logits, source_slices)
        assert rz is not None
        # The z interpolation, restricted to the slices asked for: each source slice mixes
        # at most two model slices, so two weighted slices instead of a product with the
        # mostly-zero matrix (400 source slices from 64: 0.47 s -> 0.05 s).
        first = np.argmax(rz != 0, axis=1)
        second = np.minimum(first + 1, rz.shape[1] - 1)
        rows_all = np.arange(rz.shape[0])
        w_first, w_second = rz[rows_all, first], rz[rows_all, second]
        w_second = np.where(second != first, w_second, np.float32(0.0)).astype(np.float32)
        rebuilt = np.zeros_like(rz)
        rebuilt[rows_all, first] = w_first
        rebuilt[rows_all, second] += w_second
        if not np.array_equal(rebuilt, rz):  # not two adjacent taps a row: stay dense
            return lambda rows: np.tensordot(rz[rows], volume, axes=(1, 1))
        logits = np.moveaxis(volume, 0, 1)  # [D, K, H, W], a view

        def on_source(rows: np.ndarray) -> np.ndarray:
            near = logits[first[rows]].astype(np.float32, copy=False)
            far = logits[second[rows]]
            near *= w_first[rows, None, None, None]
            near += far * w_second[rows, None, None, None]
            return near

        return on_source


PREPROCESSORS: Final[dict[str, type[Preprocessor]]] = {
    SliceStacks.kind: SliceStacks,
    WholeVolume.kind: WholeVolume,
}


def preprocess_volume(hu: np.ndarray, plan: PreprocessPlan) -> tuple[np.ndarray, ResampleGeometry]:
    """A HU volume [Z, Y, X] (sorted along the slice normal) -> model input and its geometry:
    `plan.preprocessor().run(hu)`."""
    return plan.preprocessor().run(hu)


def source_label_map(seg_logits: np.ndarray, geometry: ResampleGeometry) -> np.ndarray:
    """The label map on the source grid of the kind `geometry` records (`to_source`)."""
    return PREPROCESSORS[geometry.kind].to_source(seg_logits, geometry)


def logits_to_source_labels(seg_logits: np.ndarray, geometry: ResampleGeometry) -> np.ndarray:
    """The definition `source_label_map` computes faster (`to_source_dense`)."""
    return PREPROCESSORS[geometry.kind].to_source_dense(seg_logits, geometry)


def slice_label_maps(seg_logits: np.ndarray, rows: int, columns: int) -> list[np.ndarray | None]:
    """The source-grid label maps of a batch of 2.5D slices [n, K, h, w] on a `rows` x
    `columns` grid, one per slice, None for a slice without lesion (what streaming keeps)."""
    n, _, h, w = seg_logits.shape
    geometry = ResampleGeometry((n, rows, columns), (n, h, w), SliceStacks.kind)
    maps = SliceStacks.to_source(seg_logits, geometry)
    return [plane if plane.any() else None for plane in maps]
