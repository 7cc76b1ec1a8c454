"""Cost of the paper-scale (`--config full`) training, counted on the meta device.

Counts, per training sample, the floating-point operations of one forward and backward pass
(torch's FlopCounterMode) and the activation memory the backward pass keeps (every module
output, in bf16), for the tiny and full configurations, then turns them into time and memory
estimates for a training set and an assumed sustained GPU throughput. Nothing is allocated:
it runs in seconds on a laptop. Prints a markdown table (docs/models.md).

    python bench/full_config_estimate.py --scans 1260 --slices-per-scan 300 --tflops 100
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ctjoint.export.configs import get_config
from ctjoint.export.models import build_model, count_parameters
from ctjoint.export.onnx_export import input_shape


def measure(model: str, config_name: str) -> tuple[float, float, int]:
    """(FLOP per sample fwd+bwd, activation bytes per sample in bf16, parameters)."""
    config = get_config(model, config_name)
    outputs: list[int] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel())

    with torch.device("meta"):
        net = build_model(config)
        hooks = [m.register_forward_hook(keep) for m in net.modules() if not list(m.children())]
        image = torch.zeros(input_shape(config, 1))
        with FlopCounterMode(display=False) as counter:
            out = net.forward_all(image)
            (out.seg_logits.float().sum() + out.cls_logits.float().sum()).backward()
        for hook in hooks:
            hook.remove()
    return float(counter.get_total_flops()), 2.0 * sum(outputs), count_parameters(net)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=1260, help="training scans")
    parser.add_argument("--slices-per-scan", type=int, default=300, help="jcs2d samples/scan")
    parser.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s")
    args = parser.parse_args()
    print(
        "| model | config | parameters | GFLOP per sample (fwd+bwd) | activations per sample "
        "(bf16) | batch | activations per batch | samples per epoch | epochs | hours per epoch "
        f"at {args.tflops:g} TFLOP/s | hours in all |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in ("jcs2d", "deepsc3d"):
        for name in ("tiny", "full"):
            flops, act, params = measure(model, name)
            config = get_config(model, name)
            samples = args.scans * (args.slices_per_scan if model == "jcs2d" else 1)
            if model == "jcs2d" and config.train.max_slices_per_epoch:
                samples = min(samples, config.train.max_slices_per_epoch)
            hours = samples * flops / (args.tflops * 1e12) / 3600.0
            batch = config.train.batch_size
            print(
                f"| {model} | {name} | {params:,} | {flops / 1e9:.1f} | {act / 2**20:.0f} MiB | "
                f"{batch} | {batch * act / 2**30:.1f} GiB | {samples:,} | "
                f"{config.train.epochs} | {hours:.2f} | {hours * config.train.epochs:.1f} |"
            )


if __name__ == "__main__":
    main()
