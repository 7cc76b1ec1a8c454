"""Where training computes (`--device`) and how batches reach it (loader workers): the
same seed draws the same batches whatever the workers, the log says what ran where, and a
GPU run (skipped without one) trains and writes CPU checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from synthetic_ct import write_nifti_set
from test_training import small_config

from ctjoint.export.configs import get_config
from ctjoint.export.dataset import CaseCache, discover_cases
from ctjoint.export.torch_device import resolve_device
from ctjoint.export.train import (
    EpochBatches,
    TrainingError,
    batch_rng,
    epoch_batches,
    epoch_loader,
    epoch_rng,
    loss_curve,
    make_batch,
    model_from_checkpoint,
    train_model,
    train_run,
)

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def nifti_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nifti_set(tmp_path_factory.mktemp("nifti") / "set", per_class=4, size=32, slices=8)


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it() -> None:
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(CUDA, reason="asks for CUDA where there is none")
def test_cuda_without_a_gpu_says_why() -> None:
    with pytest.raises(
        TrainingError, match=r"--device cuda: torch .* (built without CUDA|sees no)"
    ):
        resolve_device("cuda")


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(TrainingError, match=r"unknown device 'tpu'; expected one of"):
        resolve_device("tpu")


def test_loader_workers_build_the_same_batches_in_the_same_order(nifti_set: Path) -> None:
    config = small_config("jcs2d")
    cases = CaseCache(nifti_set / "cache", config.plan).get_many(discover_cases(nifti_set, "train"))
    batches = epoch_batches(config, cases, epoch_rng(7, 0))
    assert len(batches) >= 3
    dataset = EpochBatches(config, cases, batches, seed=7, epoch=0)
    alone = list(epoch_loader(dataset, 0, pin_memory=False))
    apart = list(epoch_loader(dataset, 2, pin_memory=False))
    assert len(alone) == len(apart) == len(batches)
    for a, b in zip(alone, apart, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.seg, b.seg)
        assert torch.equal(a.cls, b.cls)
    # And batch `step` is what make_batch draws from that step's generator.
    again = make_batch(config, cases, batches[1], True, batch_rng(7, 0, 1))
    assert torch.equal(apart[1].image, again.image)


def test_a_batch_that_cannot_be_built_fails_the_step_that_needs_it(nifti_set: Path) -> None:
    config = small_config("jcs2d")
    cases = CaseCache(nifti_set / "cache", config.plan).get_many(discover_cases(nifti_set, "train"))
    broken = [dataclasses.replace(case, fractions=None) for case in cases]
    soft = dataclasses.replace(config, train=dataclasses.replace(config.train, soft_targets=True))
    batches = epoch_batches(soft, broken, epoch_rng(0, 0))
    loader = epoch_loader(EpochBatches(soft, broken, batches, 0, 0), 2, pin_memory=False)
    with pytest.raises(ValueError, match=r"case \S+ has no lesion fractions"):
        next(iter(loader))


def test_the_log_records_the_device_and_the_throughput(nifti_set: Path, tmp_path: Path) -> None:
    quiet = Console(quiet=True)
    one = train_run(small_config("jcs2d"), nifti_set, tmp_path / "one", device="cpu", console=quiet)
    three = train_run(
        small_config("jcs2d"),
        nifti_set,
        tmp_path / "three",
        device="cpu",
        loader_workers=2,
        console=quiet,
    )
    # Same seed, same batches: the loader's workers change nothing the network sees.
    assert three.history[0]["loss"] == one.history[0]["loss"]
    log = json.loads((tmp_path / "three" / "train_log.json").read_text())
    assert log["device"]["type"] == "cpu"
    epoch = log["epochs"][0]
    config = small_config("jcs2d")
    cases = CaseCache(tmp_path / "three" / "cache", config.plan).get_many(
        discover_cases(nifti_set, "train")
    )
    batches = epoch_batches(config, cases, epoch_rng(0, 0))
    assert (epoch["steps"], epoch["samples"]) == (len(batches), sum(map(len, batches)))
    assert epoch["samples_per_second"] == pytest.approx(
        epoch["samples"] / epoch["train_seconds"], rel=1e-6
    )
    assert 0.0 <= epoch["batch_wait_seconds"] <= epoch["train_seconds"]
    assert len(epoch["loss_curve"]) == min(10, epoch["steps"])
    assert sum(epoch["loss_curve"]) / len(epoch["loss_curve"]) == pytest.approx(
        epoch["loss"], rel=0.2
    )
    assert epoch["peak_memory_gib"] is None


def test_the_loss_curve_averages_equal_shares_of_the_steps() -> None:
    assert loss_curve([4.0, 2.0, 3.0, 1.0], parts=2) == [3.0, 2.0]
    assert loss_curve([5.0, 1.0], parts=10) == [5.0, 1.0]
    assert loss_curve([]) == []


def test_a_negative_number_of_loader_workers_is_refused(nifti_set: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="loader_workers must be 0 or more, not -1"):
        train_run(small_config("jcs2d"), nifti_set, tmp_path / "r", loader_workers=-1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["jcs2d", "deepsc3d"])
def test_training_on_the_gpu_writes_cpu_checkpoints(
    model: str, nifti_set: Path, tmp_path: Path
) -> None:
    run = tmp_path / model
    result = train_run(
        small_config(model, 2), nifti_set, run, device="cuda", console=Console(quiet=True)
    )
    log = json.loads((run / "train_log.json").read_text())
    assert log["device"]["type"] == "cuda"
    assert all(e["peak_memory_gib"] > 0 for e in log["epochs"])
    assert len(result.history) == 2
    _, _, data = model_from_checkpoint(run / "best.pt")
    assert all(t.device.type == "cpu" for t in data["state_dict"].values())
    assert data["temperature"]["cls"] > 0


def test_a_fine_tune_takes_its_own_learning_rate(nifti_set: Path, tmp_path: Path) -> None:
    base = get_config("jcs2d", "tiny")
    assert base.with_lr(5e-4).train == dataclasses.replace(base.train, lr=5e-4)
    with pytest.raises(TrainingError, match=r"--lr must be positive, not 0\.0"):
        train_model("jcs2d", nifti_set, out_dir=tmp_path / "zero", lr=0.0)
    with pytest.raises(TrainingError, match="--lr sets a new run's rate; a resumed run keeps"):
        train_model("jcs2d", nifti_set, out_dir=tmp_path / "resumed", resume=True, lr=1e-4)
