"""Model and training configurations: `tiny` (trains on two CPU cores in minutes) and `full`
(paper scale, for a GPU). One typed spec per (model, size); checkpoints store it, so a file
is rebuilt with the exact network it was trained with even if these defaults change later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ctjoint.contracts import MODEL_DEEPSC3D, MODEL_JCS2D, MODEL_NAMES
from ctjoint.gateway.preprocess import PreprocessPlan

CONFIG_NAMES = ("tiny", "full")
TaskBalance = Literal["fixed", "uncertainty"]
NormKind = Literal["batch", "instance", "group"]


@dataclass(frozen=True)
class NetConfig:
    """Network shape. `widths` are the channels of each encoder level, finest first."""

    widths: tuple[int, ...]
    norm: NormKind = "batch"
    # 3D only: stride of the stem per axis (z, y, x); the decoder ends on the stem's grid and
    # the logits are interpolated back to the input grid, which keeps tiny 3D training cheap.
    stem_stride: tuple[int, ...] = (1, 1, 1)
    # 3D only: channels of the input-resolution refinement that sharpens the interpolated
    # logits with the image itself (0: none). Lesion borders cost Dice on a strided grid.
    refine_channels: int = 0
    # Prior attention mass (fraction of the grid) in the head's attention pooling: lesion
    # evidence smaller than this is damped, so stray false-positive pixels cannot pass for a
    # lesion (see blocks.attention_denominator). 0 disables it.
    attention_prior: float = 0.0
    cls_hidden: int = 64
    dropout: float = 0.2
    # Decoder levels (counted from the finest, 0) that get an auxiliary head during training.
    deep_supervision: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "stem_stride", tuple(int(s) for s in self.stem_stride))
        object.__setattr__(self, "deep_supervision", tuple(int(s) for s in self.deep_supervision))
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ValueError(f"need at least two positive widths, got {self.widths}")
        if any(not 0 < level < len(self.widths) - 1 for level in self.deep_supervision):
            raise ValueError(
                f"deep supervision levels {self.deep_supervision} must lie strictly between the "
                f"finest (0) and the bottleneck ({len(self.widths) - 1})"
            )

    @property
    def total_stride(self) -> int:
        """Downsampling from the stem's grid to the bottleneck (per axis)."""
        return int(2 ** (len(self.widths) - 1))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and sampling settings."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    task_balance: TaskBalance = "fixed"
    seg_weight: float = 1.0
    cls_weight: float = 1.0
    # Weights of the deep-supervision heads, in the order of NetConfig.deep_supervision.
    aux_weights: tuple[float, ...] = (0.5, 0.25)
    # 2.5D sampling: lesion-free slices drawn per epoch, per lesion slice.
    negatives_per_lesion_slice: float = 1.0
    # 2.5D: cap on slices per epoch (None: all lesion slices + their share of negatives).
    max_slices_per_epoch: int | None = None
    # Augmentation in the normalised intensity space ([-1, 1] after the lung window).
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise_std: float = 0.03
    max_shift_px: int = 6
    # Geometric augmentation of the anatomy's shape (not only its place): a random zoom of up
    # to +-`zoom` per axis and an in-plane rotation of up to +-`rotate_deg`, applied to image
    # and labels alike, so the network cannot key on one generator's body and heart shapes.
    zoom: float = 0.0
    rotate_deg: float = 0.0
    # Whole-volume batches: probability per scan that soft tissue in a random part of it
    # becomes fat (train.tissue_fat_augment), for chests fattier than the phantoms draw.
    tissue_fat: float = 0.0
    # Segmentation targets: each model cell's lesion class fractions (soft cross-entropy and
    # soft Dice) instead of nearest-neighbour labels, which cap the source-grid lesion Dice
    # near 0.95 at twice the model's resolution (bench/target_ceiling.py; docs/models.md:
    # the runs with it lost to the bundled weights on fresh scans, so the tiny configs keep
    # it off).
    soft_targets: bool = False
    # Label smoothing of the classification target: a scan-level label from a few hundred
    # phantoms does not justify p = 1.000, and smoothing keeps the logits from running away.
    label_smoothing: float = 0.0
    grad_clip: float = 5.0
    # bfloat16 autocast for training and validation where the CPU computes bf16 natively
    # (AMX / AVX512-BF16: 2-3x faster convolutions); fp32 elsewhere. Exported models are fp32.
    amp: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_weights", tuple(float(w) for w in self.aux_weights))
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs >= 0, batch_size >= 1 and lr > 0 are required")
        if not (0.0 <= self.zoom < 0.5 and 0.0 <= self.rotate_deg <= 45.0):
            raise ValueError("zoom must lie in [0, 0.5) and rotate_deg in [0, 45]")
        if not 0.0 <= self.tissue_fat <= 1.0:
            raise ValueError("tissue_fat is a probability: it must lie in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must lie in [0, 1)")
        if self.task_balance not in ("fixed", "uncertainty"):
            raise ValueError(f"unknown task balance {self.task_balance!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a trained model: its input plan, its network, its training."""

    model: str
    name: str
    plan: PreprocessPlan
    net: NetConfig
    train: TrainConfig
    version: str = field(default="0.1.0")

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MODEL_NAMES}")
        if self.plan.model != self.model:
            raise ValueError(f"plan is for {self.plan.model!r}, config for {self.model!r}")
        if len(self.train.aux_weights) != len(self.net.deep_supervision):
            raise ValueError("one auxiliary loss weight per deep-supervision level is required")
        stride = self.net.total_stride
        grid = list(self.plan.preprocessor().grid())
        strides = [stride, stride]
        if not self.plan.preprocessor().per_slice:
            # The 3D network's strided stem divides every axis once more.
            strides = [stride * s for s in self.net.stem_stride]
        for size, step in zip(grid, strides, strict=True):
            if size % step:
                raise ValueError(
                    f"input grid {grid} must be divisible by the network stride {strides}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "name": self.name,
            "version": self.version,
            "plan": self.plan.to_json(),
            "net": asdict(self.net),
            "train": asdict(self.train),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return cls(
            model=data["model"],
            name=data["name"],
            version=data.get("version", "0.1.0"),
            plan=PreprocessPlan.from_json(data["plan"]),
            net=NetConfig(**data["net"]),
            train=TrainConfig(**data["train"]),
        )

    def with_epochs(self, epochs: int) -> RunConfig:
        return replace(self, train=replace(self.train, epochs=epochs))

    def with_lr(self, lr: float) -> RunConfig:
        """The same run at another base learning rate (fine-tuning from trained weights)."""
        return replace(self, train=replace(self.train, lr=lr))


def _jcs2d(name: str) -> RunConfig:
    if name == "tiny":
        return RunConfig(
            model=MODEL_JCS2D,
            name=name,
            version="0.1.0-tiny-phantom",
            plan=PreprocessPlan.default(MODEL_JCS2D, height=128, width=128),
            net=NetConfig(
                widths=(8, 16, 32, 64, 128), norm="batch", cls_hidden=64, attention_prior=0.002
            ),
            train=TrainConfig(
                epochs=20,
                batch_size=16,
                lr=2e-3,
                negatives_per_lesion_slice=1.0,
                max_slices_per_epoch=2400,
                zoom=0.15,
                rotate_deg=10.0,
                tissue_fat=0.5,
            ),
        )
    # Paper scale: JCS works on 512x512 slices with a deep encoder.
    return RunConfig(
        model=MODEL_JCS2D,
        name=name,
        version="0.1.0-full",
        plan=PreprocessPlan.default(MODEL_JCS2D, height=512, width=512),
        net=NetConfig(
            widths=(32, 64, 128, 256, 512),
            norm="batch",
            cls_hidden=256,
            attention_prior=0.002,
            deep_supervision=(1, 2, 3),
        ),
        train=TrainConfig(
            epochs=60,
            batch_size=16,
            lr=1e-3,
            aux_weights=(0.5, 0.25, 0.125),
            max_slices_per_epoch=None,
        ),
    )


def _deepsc3d(name: str) -> RunConfig:
    if name == "tiny":
        return RunConfig(
            model=MODEL_DEEPSC3D,
            name=name,
            version="0.1.0-tiny-phantom",
            plan=PreprocessPlan.default(MODEL_DEEPSC3D, height=128, width=128, depth=64),
            net=NetConfig(
                widths=(8, 16, 32, 64),
                norm="instance",
                stem_stride=(2, 2, 2),
                refine_channels=4,
                attention_prior=0.0005,
                cls_hidden=64,
                deep_supervision=(1,),
            ),
            train=TrainConfig(
                epochs=30,
                batch_size=2,
                lr=2e-3,
                task_balance="uncertainty",
                aux_weights=(0.5,),
                warmup_steps=30,
                max_shift_px=4,
                zoom=0.15,
                rotate_deg=10.0,
                tissue_fat=0.5,
                label_smoothing=0.05,
            ),
        )
    return RunConfig(
        model=MODEL_DEEPSC3D,
        name=name,
        version="0.1.0-full",
        plan=PreprocessPlan.default(MODEL_DEEPSC3D, height=256, width=256, depth=128),
        net=NetConfig(
            widths=(24, 48, 96, 192, 320),
            norm="instance",
            stem_stride=(1, 2, 2),
            refine_channels=8,
            attention_prior=0.0005,
            cls_hidden=256,
            deep_supervision=(1, 2),
        ),
        train=TrainConfig(
            epochs=200, batch_size=2, lr=1e-3, task_balance="uncertainty", max_shift_px=8
        ),
    )


def get_config(model: str, name: str) -> RunConfig:
    """The named configuration of a model."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown config {name!r}; expected one of {CONFIG_NAMES}")
    if model == MODEL_JCS2D:
        return _jcs2d(name)
    if model == MODEL_DEEPSC3D:
        return _deepsc3d(name)
    raise ValueError(f"unknown model {model!r}; expected one of {MODEL_NAMES}")
