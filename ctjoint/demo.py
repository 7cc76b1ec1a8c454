"""`ctjoint demo`: one phantom chest CT through the whole product, as a user would run it.

A 512x512x100 phantom series is analysed three ways and the answers are compared:
in-process (embedded ONNX Runtime), and streamed by the scanner-side client through the gRPC
gateway backed by a real tritonserver. Every output lands in one folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from ctjoint import contracts
from ctjoint.errors import CtJointError


class DemoError(CtJointError):
    """A part of the stack did not come up for the demo."""


@dataclass(frozen=True)
class DemoRun:
    """One model's answers: embedded and through gateway + Triton."""

    model: str
    embedded_label: str
    embedded_seconds: float
    gateway_label: str
    gateway_seconds: float
    mask_agreement: float


def run_demo(out_dir: Path, *, kind: str, seed: int, size: int, slices: int) -> list[DemoRun]:
    """Generate the phantom, analyse it embedded and through gateway + Triton, compare."""
    from ctjoint.client.render import format_summary, write_overlay_png, write_result_json
    from ctjoint.client.send import send_series
    from ctjoint.export.phantom import write_phantom_case
    from ctjoint.gateway.analysis import analyze_directory
    from ctjoint.launch import LaunchError, serving_stack

    console = Console(soft_wrap=True, highlight=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    case_dir = out_dir / "case"
    if not (case_dir / contracts.CASE_SERIES_DIR).is_dir():
        case = write_phantom_case(case_dir, kind=kind, seed=seed, slices=slices, size=size)
        console.print(case.summary(), markup=False)
    series = case_dir / contracts.CASE_SERIES_DIR

    embedded = {}
    for model in contracts.MODEL_NAMES:
        console.rule(f"{model}: embedded ONNX Runtime (ctjoint analyze)")
        started = time.perf_counter()
        analysis = analyze_directory(series, model=model)
        seconds = time.perf_counter() - started
        console.print(format_summary(analysis.result), markup=False)
        write_result_json(analysis.result, out_dir / f"embedded_{model}.json")
        write_overlay_png(analysis.volume_hu, analysis.label_map, out_dir / f"embedded_{model}.png")
        embedded[model] = (analysis.result.label, seconds, analysis.label_map)

    runs: list[DemoRun] = []
    console.rule("starting tritonserver and the gateway (--backend triton)")
    try:
        with serving_stack(out_dir, backend="triton") as stack:
            for model in contracts.MODEL_NAMES:
                console.rule(f"{model}: ctjoint send -> gateway -> Triton")
                outcome = send_series(
                    series,
                    gateway=stack.address,
                    model=model,
                    out_dir=out_dir / f"gateway_{model}",
                    show_progress=False,
                    console=console,
                )
                with np.load(out_dir / f"gateway_{model}" / "masks.npz") as masks:
                    agreement = float(np.mean(masks["labels"] == embedded[model][2]))
                label, seconds, _ = embedded[model]
                runs.append(
                    DemoRun(
                        model, label, seconds, outcome.result["label"], outcome.seconds, agreement
                    )
                )
    except LaunchError as err:
        raise DemoError(str(err)) from err
    console.rule("summary")
    for run in runs:
        console.print(
            f"{run.model}: embedded {run.embedded_label} in {run.embedded_seconds:.2f} s | "
            f"gateway+Triton {run.gateway_label} in {run.gateway_seconds:.2f} s | "
            f"masks agree on {100 * run.mask_agreement:.3f}% of voxels",
            markup=False,
        )
    console.print(f"outputs in {out_dir}", markup=False)
    return runs
