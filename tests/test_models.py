"""The two joint networks: contract shapes, training-only deep supervision, configurations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ctjoint.contracts import CLASS_NAMES, SEG_CLASS_NAMES
from ctjoint.export.configs import NetConfig, RunConfig, get_config
from ctjoint.export.models import DeepSc3d, Jcs2d, build_model, count_parameters
from ctjoint.gateway.preprocess import PreprocessPlan

K = len(SEG_CLASS_NAMES)
C = len(CLASS_NAMES)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.mark.parametrize("batch", [1, 2])
def test_jcs2d_outputs_contract_shapes(batch: int) -> None:
    net = Jcs2d(get_config("jcs2d", "tiny").net).eval()
    with torch.no_grad():
        seg, cls = net(torch.randn(batch, 3, 64, 64))
    assert seg.shape == (batch, K, 64, 64)
    assert cls.shape == (batch, C)


@pytest.mark.parametrize("batch", [1, 2])
def test_deepsc3d_outputs_contract_shapes(batch: int) -> None:
    net = DeepSc3d(get_config("deepsc3d", "tiny").net).eval()
    with torch.no_grad():
        seg, cls = net(torch.randn(batch, 1, 16, 32, 32))
    assert seg.shape == (batch, K, 16, 32, 32)
    assert cls.shape == (batch, C)


def test_jcs2d_deep_supervision_heads_appear_only_in_training_outputs() -> None:
    config = get_config("jcs2d", "tiny")
    net = Jcs2d(config.net)
    out = net.forward_all(torch.randn(2, 3, 64, 64))
    assert [a.shape[-1] for a in out.aux_seg_logits] == [
        64 // 2**level for level in config.net.deep_supervision
    ]
    assert len(net(torch.randn(2, 3, 64, 64))) == 2


def test_deepsc3d_auxiliary_logits_sit_on_coarser_grids() -> None:
    net = DeepSc3d(get_config("deepsc3d", "tiny").net)
    out = net.forward_all(torch.randn(2, 1, 16, 32, 32))
    assert [tuple(a.shape) for a in out.aux_seg_logits] == [(2, K, 4, 8, 8)]


def test_classification_does_not_backpropagate_into_the_lesion_attention() -> None:
    net = Jcs2d(get_config("jcs2d", "tiny").net)
    out = net.forward_all(torch.randn(2, 3, 32, 32))
    out.cls_logits.sum().backward()
    # The segmentation head is reached only through the (detached) attention.
    assert net.seg_head.weight.grad is None or not net.seg_head.weight.grad.any()


def test_tiny_plans_are_the_documented_input_geometry() -> None:
    assert get_config("jcs2d", "tiny").plan == PreprocessPlan.default("jcs2d", 128, 128)
    assert get_config("deepsc3d", "tiny").plan == PreprocessPlan.default("deepsc3d", 128, 128, 64)


@pytest.mark.parametrize("model", ["jcs2d", "deepsc3d"])
def test_tiny_networks_stay_small_enough_to_bundle(model: str) -> None:
    assert count_parameters(build_model(get_config(model, "tiny"))) < 1_500_000


@pytest.mark.parametrize("model", ["jcs2d", "deepsc3d"])
@pytest.mark.parametrize("name", ["tiny", "full"])
def test_config_round_trips_through_its_dict(model: str, name: str) -> None:
    config = get_config(model, name)
    assert RunConfig.from_dict(config.to_dict()) == config


def test_config_rejects_an_input_grid_the_network_cannot_halve() -> None:
    config = get_config("jcs2d", "tiny")
    with pytest.raises(ValueError, match="divisible by the network stride"):
        dataclasses.replace(config, plan=PreprocessPlan.default("jcs2d", 100, 100))


def test_net_config_rejects_deep_supervision_at_the_bottleneck() -> None:
    with pytest.raises(ValueError, match="deep supervision levels"):
        NetConfig(widths=(8, 16, 32), deep_supervision=(2,))


def test_unknown_config_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        get_config("jcs2d", "huge")
