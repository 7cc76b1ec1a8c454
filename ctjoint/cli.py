"""The one command line, `ctjoint`. Every subcommand imports its implementation lazily, so
`ctjoint send` runs with only the client extra installed (no torch, no onnxruntime)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ctjoint import contracts

app = typer.Typer(
    name="ctjoint",
    help="Joint COVID-19 / CAP / normal chest-CT classification and lesion segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
export_app = typer.Typer(
    help="Export trained models (ONNX, TensorRT, Triton repository).", no_args_is_help=True
)
app.add_typer(export_app, name="export")
gateway_app = typer.Typer(help="The gRPC gateway that serves the models.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")
triton_app = typer.Typer(help="Run and measure a Triton Inference Server.", no_args_is_help=True)
app.add_typer(triton_app, name="triton")

F = TypeVar("F", bound=Callable[..., Any])


class ModelName(StrEnum):
    jcs2d = contracts.MODEL_JCS2D
    deepsc3d = contracts.MODEL_DEEPSC3D


class ScanModel(StrEnum):
    """A network for one scan, or both on the same upload (fused answer plus each one's)."""

    jcs2d = contracts.MODEL_JCS2D
    deepsc3d = contracts.MODEL_DEEPSC3D
    both = contracts.MODEL_BOTH


class PhantomKind(StrEnum):
    covid19 = "covid19"
    cap = "cap"
    normal = "normal"


class ConfigName(StrEnum):
    tiny = "tiny"
    full = "full"


class TrainDevice(StrEnum):
    """Where `ctjoint train` computes (export/torch_device.py)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class FollowUpChange(StrEnum):
    """What a follow-up study does to the lesions (export/phantom_followup.py)."""

    progress = "progress"
    stable = "stable"
    improve = "improve"
    resolve = "resolve"


class PhantomFamily(StrEnum):
    """Shape families of the phantom generator (export/phantom_families.py)."""

    quadric = "quadric"
    fourier = "fourier"


class BackendName(StrEnum):
    embedded = "embedded"
    triton = "triton"


class TritonTarget(StrEnum):
    cpu = contracts.TRITON_TARGET_CPU
    gpu = contracts.TRITON_TARGET_GPU


class GpuEngine(StrEnum):
    trt = contracts.TRITON_VARIANT_TRT
    onnx = contracts.TRITON_VARIANT_ONNX


class Precision(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


def _secret(path: Path | None) -> str:
    """A password or token kept in a file (never on the command line); "" without one."""
    return path.read_text(encoding="utf-8").strip() if path is not None else ""


class SegType(StrEnum):
    binary = "binary"
    labelmap = "labelmap"


SegTypeOption = Annotated[
    SegType,
    typer.Option(
        help="DICOM SEG encoding: binary (empty frames left out) or labelmap (Supplement 243)."
    ),
]
SourceEquipmentOption = Annotated[
    bool,
    typer.Option(
        "--seg-source-equipment",
        help="SEG/SR also carry the source's acquisition equipment (institution, station, "
        "device serial, acquisition time); off: they name neither hospital nor scanner.",
    ),
]


DEFAULT_GATEWAY = "127.0.0.1:50051"

# Client-side channel security, the same options on every command that talks to the gateway.
TlsOption = Annotated[
    bool, typer.Option("--tls", help="Use TLS (implied by --ca-cert / --client-cert).")
]
CaCertOption = Annotated[
    Path | None,
    typer.Option(help="PEM CA that signed the gateway's certificate (default: system roots)."),
]
ClientCertOption = Annotated[
    Path | None, typer.Option(help="PEM client certificate, for a gateway requiring mTLS.")
]
ClientKeyOption = Annotated[Path | None, typer.Option(help="PEM key of --client-cert.")]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(help="File whose first line is the bearer token (default: $CTJOINT_TOKEN)."),
]
ServerNameOption = Annotated[
    str | None,
    typer.Option(help="Name to check the gateway's certificate against (default: its host)."),
]


def _channel_security(
    tls: bool,
    ca_cert: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    token_file: Path | None,
    server_name: str | None = None,
) -> Any:
    """The client's ChannelSecurity; an impossible combination is a usage error."""
    from ctjoint.client.channel import ChannelConfigError, ChannelSecurity

    try:
        return ChannelSecurity(
            tls=tls,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
            token_file=token_file,
            server_name=server_name,
        )
    except ChannelConfigError as err:
        raise typer.BadParameter(str(err)) from None


def clean_errors(func: F) -> F:
    """Turn the project's own errors into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ctjoint.gateway.errors import CtJointError

        try:
            return func(*args, **kwargs)
        except CtJointError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@clean_errors
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Case folder to create (series/ and truth/).")],
    kind: Annotated[
        PhantomKind, typer.Option(help="Which findings to plant.")
    ] = PhantomKind.covid19,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
    slices: Annotated[int | None, typer.Option(help="Number of slices (default: random).")] = None,
    size: Annotated[int, typer.Option(help="Rows and columns of each slice.")] = 512,
    family: Annotated[
        PhantomFamily,
        typer.Option(help="Shape family: quadric (training) or fourier (held out)."),
    ] = PhantomFamily.quadric,
    follow_up_of: Annotated[
        Path | None,
        typer.Option(
            help="An earlier case (folder or its truth/label.json): write a later study of the "
            "same patient instead (--kind/--seed/--slices/--size/--family come from it)."
        ),
    ] = None,
    change: Annotated[
        FollowUpChange, typer.Option(help="With --follow-up-of: what became of the lesions.")
    ] = FollowUpChange.stable,
    days: Annotated[int, typer.Option(help="With --follow-up-of: days after that study.")] = 14,
    mimic: Annotated[
        bool,
        typer.Option(
            help="Push every look-alike of disease to the top of its range (dependent density, "
            "vessels, heart, diaphragm domes): a hard case for the review flag."
        ),
    ] = False,
) -> None:
    """Write a synthetic chest-CT DICOM series plus NIfTI ground truth and its label."""
    if follow_up_of is not None:
        from ctjoint.export.phantom_followup import write_follow_up

        typer.echo(write_follow_up(follow_up_of, out_dir, change=change.value, days=days).summary())
        return
    from ctjoint.export.phantom import write_phantom_case

    case = write_phantom_case(
        out_dir,
        kind=kind.value,
        seed=seed,
        slices=slices,
        size=size,
        family=family.value,
        mimic=mimic,
    )
    typer.echo(case.summary())


@app.command("phantom-set")
@clean_errors
def phantom_set(
    out_dir: Annotated[Path, typer.Argument(help="Set folder to create (labels.csv + cases).")],
    n: Annotated[int, typer.Option(help="Number of cases, balanced over the three classes.")] = 300,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    size: Annotated[int, typer.Option(help="Rows and columns of each slice.")] = 256,
    workers: Annotated[int, typer.Option(help="Processes to generate with.")] = 2,
    family: Annotated[
        PhantomFamily,
        typer.Option(help="Shape family: quadric (training) or fourier (held out)."),
    ] = PhantomFamily.quadric,
    mimic_share: Annotated[
        float,
        typer.Option(
            help="Share (0-1) of the normal cases drawn as mimics (see `phantom --mimic`): "
            "hard negatives for training."
        ),
    ] = 0.0,
) -> None:
    """Write a labelled train/val/test set of phantom cases."""
    from ctjoint.export.phantom import write_phantom_set

    summary = write_phantom_set(
        out_dir,
        n=n,
        seed=seed,
        size=size,
        workers=workers,
        family=family.value,
        mimic_share=mimic_share,
    )
    typer.echo(summary)


@app.command()
@clean_errors
def train(
    model: Annotated[ModelName, typer.Option(help="Which network.")],
    data: Annotated[Path, typer.Option(help="Data set folder (phantom or real-data layout).")],
    config: Annotated[ConfigName, typer.Option(help="Model/training size.")] = ConfigName.tiny,
    out: Annotated[Path | None, typer.Option(help="Run folder (checkpoints, log).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the config's epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Resume from the run folder's last checkpoint.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads.")] = None,
    init: Annotated[
        Path | None, typer.Option(help="Start from this checkpoint's weights (fine-tune).")
    ] = None,
    device: Annotated[
        TrainDevice, typer.Option(help="Where the network computes: auto = CUDA if present.")
    ] = TrainDevice.auto,
    loader_workers: Annotated[
        int,
        typer.Option(min=0, help="Processes that build augmented batches ahead (0: none)."),
    ] = 0,
    prepare_workers: Annotated[
        int, typer.Option(min=1, help="Processes that fill the preprocessing cache.")
    ] = 1,
    lr: Annotated[
        float | None, typer.Option(help="Override the config's base learning rate.")
    ] = None,
) -> None:
    """Train a joint network with its joint loss; checkpoints are resumable."""
    from ctjoint.export.train import train_model

    result = train_model(
        model=model.value,
        data_dir=data,
        config_name=config.value,
        out_dir=out,
        epochs=epochs,
        seed=seed,
        resume=resume,
        threads=threads,
        init=init,
        device=device.value,
        loader_workers=loader_workers,
        prepare_workers=prepare_workers,
        lr=lr,
    )
    typer.echo(result)


@app.command()
@clean_errors
def calibrate(
    weights: Annotated[Path, typer.Option(help="Checkpoint to calibrate (best.pt).")],
    data: Annotated[Path, typer.Option(help="Data set folder; its 'val' split is used.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the checkpoint (default: in place).")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 2,
) -> None:
    """Fit the logit temperature of each head on the validation split; store it in the
    checkpoint (exported as ONNX metadata, applied by every backend)."""
    from ctjoint.export.calibrate import calibrate_checkpoint

    typer.echo(calibrate_checkpoint(weights, data, out=out, threads=threads))


@app.command()
@clean_errors
def evaluate(
    model: Annotated[ModelName, typer.Option(help="Which network.")],
    data: Annotated[Path, typer.Option(help="Data set folder (phantom or real-data layout).")],
    split: Annotated[str, typer.Option(help="Which split of the set to evaluate.")] = "test",
    onnx: Annotated[
        Path | None, typer.Option(help="ONNX file (default: the exported one).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the JSON report.")] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Checkpoint the ONNX file came from (its SHA-256 enters the report)."),
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the report's markdown table here.")
    ] = None,
    title: Annotated[str | None, typer.Option(help="What the data is, for the tables.")] = None,
) -> None:
    """Evaluate an exported model through the serving pipeline: Dice, sens/spec, AUC,
    confusion, calibration (ECE, Brier, reliability diagram). `--split all`: every case."""
    from ctjoint.export.evaluate import evaluate_model

    report = evaluate_model(
        model=model.value,
        data_dir=data,
        split=split,
        onnx_file=onnx,
        out=out,
        weights=weights,
        markdown=markdown,
        title=title,
    )
    typer.echo(report)


@export_app.command("onnx")
@clean_errors
def export_onnx_command(
    model: Annotated[ModelName, typer.Option(help="Which network.")],
    weights: Annotated[
        Path | None, typer.Option(help="Checkpoint (default: bundled weights).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="ONNX file (default: build/onnx/<model>.onnx).")
    ] = None,
) -> None:
    """Export to ONNX (dynamic batch, opset 17+), check it and compare it with PyTorch."""
    from ctjoint.export.onnx_export import export_onnx

    report = export_onnx(model=model.value, weights=weights, out=out)
    typer.echo(report)


@export_app.command("repository")
@clean_errors
def export_repository_command(
    out: Annotated[Path, typer.Argument(help="Repository folder to write (or refresh).")],
    target: Annotated[TritonTarget, typer.Option(help="Which Triton runs it.")] = (
        TritonTarget.cpu
    ),
    model: Annotated[
        list[ModelName] | None, typer.Option(help="Model to include (repeat; default: all).")
    ] = None,
    onnx_dir: Annotated[
        Path | None, typer.Option(help="Folder of exported ONNX files (default: build/onnx).")
    ] = None,
    engine_dir: Annotated[
        Path | None, typer.Option(help="Folder of TensorRT engines (default: build/trt).")
    ] = None,
    configs_only: Annotated[
        bool,
        typer.Option(help="Write configs and python sources only (what model_repository/ keeps)."),
    ] = False,
    config: Annotated[
        ConfigName, typer.Option(help="Model configuration the shapes come from (configs only).")
    ] = ConfigName.tiny,
    gpu_engine: Annotated[
        GpuEngine, typer.Option(help="gpu target: the network behind each ensemble.")
    ] = GpuEngine.trt,
    check: Annotated[
        bool,
        typer.Option(
            help="Write nothing: check OUT against the exported ONNX (--onnx-dir) and its own "
            "python models and ensembles; exit 1 on any disagreement."
        ),
    ] = False,
) -> None:
    """Write a Triton model repository (config.pbtxt, python models, artefacts) from the spec."""
    from ctjoint.export.triton_repository import write_repository

    if check:
        from ctjoint.export.triton_check import check_repository

        checked = check_repository(out, onnx_dir=onnx_dir)
        typer.echo(checked.summary())
        if not checked.ok:
            raise typer.Exit(code=1)
        return

    models = tuple(dict.fromkeys(m.value for m in model)) if model else contracts.MODEL_NAMES
    report = write_repository(
        out,
        target=target.value,
        models=models,
        onnx_dir=onnx_dir,
        engine_dir=engine_dir,
        config_name=config.value,
        configs_only=configs_only,
        gpu_engine=gpu_engine.value,
    )
    typer.echo(report.summary())


@export_app.command("trt")
@clean_errors
def export_trt_command(
    model: Annotated[ModelName, typer.Option(help="Which network.")],
    precision: Annotated[Precision, typer.Option(help="Engine precision.")] = Precision.fp16,
    onnx: Annotated[
        Path | None, typer.Option(help="ONNX file (default: build/onnx/<model>.onnx).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Engine file (default: build/trt/<model>.plan).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest batch of the profile (default: the spec's).")
    ] = None,
    calibration_scans: Annotated[
        int, typer.Option(help="int8: phantom scans to calibrate on.")
    ] = 8,
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file (default: build/trt/timing.cache).")
    ] = None,
) -> None:
    """Build a TensorRT engine (needs an NVIDIA GPU), check it against ONNX Runtime."""
    from ctjoint.export.tensorrt_build import build_engine

    record = build_engine(
        model=model.value,
        precision=precision.value,
        onnx_file=onnx,
        out=out,
        max_batch=max_batch,
        calibration_scans=calibration_scans,
        timing_cache=timing_cache,
    )
    typer.echo(record.summary())


@triton_app.command("serve")
@clean_errors
def triton_serve(
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository (default: model_repository/cpu of the checkout)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface).")] = (
        "127.0.0.1"
    ),
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    http_port: Annotated[
        int | None, typer.Option(help="Open Triton's HTTP API on this port (default: off).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Open Triton's Prometheus metrics port (default: off).")
    ] = None,
    server: Annotated[
        Path | None,
        typer.Option(help="tritonserver binary (default: PATH, else the nvidia-pytriton wheel)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every model.")] = 180.0,
) -> None:
    """Run tritonserver on a repository until interrupted (every model READY or it exits)."""
    import logging

    from ctjoint.gateway.triton_server import TritonServerConfig, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    folder = repository or contracts.repo_root() / "model_repository" / contracts.TRITON_TARGET_CPU
    config = TritonServerConfig(
        repository=folder,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
    code = serve_forever(config, binary=server, timeout=timeout)
    raise typer.Exit(code=code)


@triton_app.command("perf")
@clean_errors
def triton_perf(
    model: Annotated[ModelName, typer.Option(help="Ensemble to measure.")] = ModelName.jcs2d,
    url: Annotated[str, typer.Option(help="Triton gRPC endpoint HOST:PORT.")] = ("127.0.0.1:8001"),
    concurrency: Annotated[
        str, typer.Option(help="perf_analyzer concurrency range START:END[:STEP].")
    ] = "1:4",
    batch: Annotated[int, typer.Option(help="Samples per request.")] = 1,
    out: Annotated[Path, typer.Option(help="Folder for the CSV and JSON reports.")] = Path(
        "out/perf"
    ),
    measurement_ms: Annotated[int, typer.Option(help="Measurement window per step.")] = 3000,
    stability: Annotated[
        int, typer.Option(help="Percent by which windows may differ and still count stable.")
    ] = 30,
) -> None:
    """Run perf_analyzer against a served ensemble (concurrency sweep, CSV + JSON)."""
    from ctjoint.export.triton_perf import run_perf_analyzer

    report = run_perf_analyzer(
        model=model.value,
        url=url,
        concurrency=concurrency,
        batch=batch,
        out_dir=out,
        measurement_ms=measurement_ms,
        stability_percent=stability,
    )
    typer.echo(report.summary())


@app.command()
@clean_errors
def analyze(
    series_dir: Annotated[
        Path, typer.Argument(help="Folder with the DICOM files of one CT series.")
    ],
    model: Annotated[
        ScanModel, typer.Option(help="Which network; both: the two on one scan, fused.")
    ] = ScanModel.jcs2d,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON.")
    ] = None,
    png_out: Annotated[
        Path | None, typer.Option("--png", help="Write an overlay montage PNG.")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Folder of exported ONNX models.")] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="ONNX Runtime threads per inference (default: all cores)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Slices per inference batch (2D model).")
    ] = 16,
    seg_out: Annotated[
        Path | None,
        typer.Option("--seg", help="Write a DICOM Segmentation (lesion classes and lungs)."),
    ] = None,
    sr_out: Annotated[
        Path | None,
        typer.Option("--sr", help="Write a DICOM Comprehensive 3D SR (TID 1500 measurements)."),
    ] = None,
    seg_type: SegTypeOption = SegType.binary,
    seg_source_equipment: SourceEquipmentOption = False,
) -> None:
    """Analyse a series in-process with ONNX Runtime and print the result."""
    from ctjoint.client.render import format_summary, write_overlay_png, write_result_json
    from ctjoint.gateway.analysis import analyze_directory, cam_on_source

    analysis = analyze_directory(
        series_dir,
        model=model.value,
        model_dir=model_dir,
        intra_op_threads=threads,
        batch_size=batch_size,
    )
    typer.echo(format_summary(analysis.result))
    if json_out is not None:
        write_result_json(analysis.result, json_out)
        typer.echo(f"wrote {json_out}")
    if png_out is not None:
        cam = analysis.cam
        write_overlay_png(
            analysis.volume_hu,
            analysis.label_map,
            png_out,
            lung_map=analysis.lung_map,
            cam=None
            if cam is None
            else (lambda slices: cam_on_source(cam, analysis.volume.shape, slices)),
            caption=analysis.result.review.caption,
        )
        typer.echo(f"wrote {png_out}")
    if seg_out is not None or sr_out is not None:
        from ctjoint.gateway.dicom_outputs import OutputSettings, analysis_objects

        settings = OutputSettings(
            copy_source_equipment=seg_source_equipment, seg_type=seg_type.value
        )
        objects = analysis_objects(
            analysis, seg=seg_out is not None, sr=sr_out is not None, settings=settings
        )
        for path, data in ((seg_out, objects.seg), (sr_out, objects.sr)):
            if path is not None and data is not None:
                path.write_bytes(data)
                typer.echo(f"wrote {path}")


@app.command()
@clean_errors
def compare(
    prior: Annotated[Path, typer.Argument(help="The earlier analysis: its SR or result JSON.")],
    current: Annotated[Path, typer.Argument(help="The later analysis: its SR or result JSON.")],
) -> None:
    """Compare two analyses of one patient and print the comparison block (JSON).

    Categories and thresholds: docs/follow-up.md. A result JSON holds no study date, so the
    interval is known only when both are SRs."""
    import json

    from ctjoint.gateway.comparison import compare as compare_measurements
    from ctjoint.gateway.prior_report import read_measurements

    before, _ = read_measurements(prior)
    after, _ = read_measurements(current)
    typer.echo(json.dumps(compare_measurements(before, after).to_dict(), indent=2))


@gateway_app.command("serve")
@clean_errors
def gateway_serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="gRPC port (0: any free port, logged).")] = 50051,
    backend: Annotated[BackendName, typer.Option(help="Inference backend.")] = BackendName.embedded,
    triton_url: Annotated[
        list[str] | None,
        typer.Option(
            help="Triton gRPC endpoint HOST:PORT (triton backend). Repeat it, or separate "
            "with commas, for several replicas; a name resolving to several addresses (a "
            "headless Service) counts as one replica per address."
        ),
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Folder of exported ONNX models (embedded backend).")
    ] = None,
    model: Annotated[
        list[ModelName] | None,
        typer.Option(help="Model to serve (repeat; default: every model whose file exists)."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port (0: any).")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address of the /metrics server (loopback unless opened).")
    ] = "127.0.0.1",
    health_port: Annotated[
        int | None,
        typer.Option(help="Also serve health alone on this port, whatever the scan port's load."),
    ] = None,
    idle_timeout: Annotated[
        float,
        typer.Option(help="Seconds a scan may go without a message before it is ended."),
    ] = 30.0,
    max_scans_per_peer: Annotated[
        int | None,
        typer.Option(help="Scans one client address may have in progress (default: all slots)."),
    ] = None,
    max_connections: Annotated[
        int, typer.Option(help="Connections the scan port accepts at once; more are closed.")
    ] = 1000,
    max_file_bytes: Annotated[int, typer.Option(help="Largest DICOM file accepted.")] = (
        8 * 1024 * 1024
    ),
    max_slices: Annotated[int, typer.Option(help="Most slices in one scan.")] = 1000,
    max_scan_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Decoded bytes (rows x columns x slices x 4) one scan may hold; a larger "
            "scan is refused (RESOURCE_EXHAUSTED) before it is decoded.",
        ),
    ] = 1536 * 1024 * 1024,
    memory_budget: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Decoded bytes all scans in flight may hold together; a scan past it is "
            "refused (RESOURCE_EXHAUSTED). Default: what the box or memory cgroup leaves, "
            "divided by what analysis takes per decoded byte (docs/reliability.md).",
        ),
    ] = None,
    kept_freed_memory: Annotated[
        int,
        typer.Option(
            min=0,
            help="Bytes of freed memory each gateway process may keep for reuse; past it, "
            "freed memory goes back to the system during a scan and after it.",
        ),
    ] = 64 * 1024 * 1024,
    max_concurrent_scans: Annotated[
        int, typer.Option(help="Scans at once; more are refused with RESOURCE_EXHAUSTED.")
    ] = 4,
    grace: Annotated[
        float, typer.Option(help="Seconds in-flight scans get to finish on SIGTERM.")
    ] = 30.0,
    threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime threads per inference (default: all cores).")
    ] = None,
    cpu_threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="Threads for scans' CPU-bound work (DICOM parsing, preprocessing, lesion "
            "measures); most of it holds Python's GIL, so more rarely helps.",
        ),
    ] = 2,
    scan_cpu_seconds: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="CPU seconds one scan's analysis may use in its worker process before the "
            "worker is ended and the scan refused (RESOURCE_EXHAUSTED).",
        ),
    ] = 300.0,
    scan_wall_seconds: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds from a scan's last file to its answer before its worker is ended.",
        ),
    ] = 300.0,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
    log_format: Annotated[LogFormat, typer.Option(help="Log line format.")] = LogFormat.text,
    pacs_ae: Annotated[
        str | None, typer.Option(help="After each scan, C-STORE its SEG and SR to this AE title.")
    ] = None,
    pacs_host: Annotated[str, typer.Option(help="The PACS host.")] = "127.0.0.1",
    pacs_port: Annotated[int, typer.Option(help="The PACS DIMSE port.")] = 104,
    pacs_calling_ae: Annotated[str, typer.Option(help="Our AE title towards the PACS.")] = (
        "CTJOINT"
    ),
    pacs_attempts: Annotated[
        int, typer.Option(min=1, help="Attempts per scan before the push is reported failed.")
    ] = 3,
    pacs_wait: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=10.0,
            help="Seconds a scan's answer waits for its push, and none while the PACS is slow; "
            "a slower push goes on in the background and the answer says so (pending).",
        ),
    ] = 1.0,
    prior_deadline: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=30.0,
            help="Seconds the look-up of the patient's prior analysis in the PACS may take "
            "(runs beside the analysis; on time or not, the answer says why a comparison is "
            "missing); 0: no look-up.",
        ),
    ] = 2.0,
    pacs_stow_url: Annotated[
        str | None,
        typer.Option(
            help="After each scan, store its SEG and SR by STOW-RS at this DICOMweb root "
            "(http(s)://HOST:PORT/PATH), instead of --pacs-ae."
        ),
    ] = None,
    pacs_stow_user: Annotated[
        str, typer.Option(help="STOW-RS basic-auth user (password: --pacs-stow-password-file).")
    ] = "",
    pacs_stow_password_file: Annotated[
        Path | None, typer.Option(help="File holding the STOW-RS basic-auth password.")
    ] = None,
    pacs_stow_token_file: Annotated[
        Path | None, typer.Option(help="File holding a STOW-RS bearer token.")
    ] = None,
    pacs_stow_ca: Annotated[
        Path | None, typer.Option(help="CA bundle of an https STOW-RS server.")
    ] = None,
    seg_type: SegTypeOption = SegType.binary,
    seg_source_equipment: SourceEquipmentOption = False,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate (chain) of the gateway: serve TLS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA for client certificates: require and verify them (mTLS)."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="Accepted bearer tokens, one per line (also $CTJOINT_GATEWAY_TOKENS); "
            "with any token, every call but health needs one."
        ),
    ] = None,
) -> None:
    """Serve AnalyzeScan, GetModelInfo, health and reflection over gRPC until SIGTERM."""
    from ctjoint.gateway.auth import TlsConfig, load_tokens
    from ctjoint.gateway.backends.replicas import parse_endpoints
    from ctjoint.gateway.dicom_outputs import OutputSettings
    from ctjoint.gateway.guards import ClientGuards
    from ctjoint.gateway.limits import GatewayLimits
    from ctjoint.gateway.logging_setup import configure_logging
    from ctjoint.gateway.pacs import Destination, PacsDestination, StowDestination
    from ctjoint.gateway.server import GatewayConfig, run

    if pacs_ae and pacs_stow_url:
        raise typer.BadParameter("give --pacs-ae or --pacs-stow-url, not both")
    destination: Destination | None = None
    try:
        if pacs_ae:
            destination = PacsDestination(
                ae_title=pacs_ae,
                host=pacs_host,
                port=pacs_port,
                calling_ae_title=pacs_calling_ae,
                attempts=pacs_attempts,
                wait_s=pacs_wait,
            )
        elif pacs_stow_url:
            destination = StowDestination(
                pacs_stow_url,
                username=pacs_stow_user,
                password=_secret(pacs_stow_password_file),
                token=_secret(pacs_stow_token_file),
                ca_file=str(pacs_stow_ca or ""),
                attempts=pacs_attempts,
                wait_s=pacs_wait,
            )
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err

    if triton_url:
        # A malformed endpoint is a usage error: refuse it before anything starts.
        try:
            parse_endpoints(triton_url)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--triton-url") from None
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise typer.BadParameter("--client-ca (mTLS) needs --tls-cert and --tls-key")
    tls = (
        TlsConfig(cert=tls_cert, key=tls_key, client_ca=client_ca)
        if tls_cert is not None and tls_key is not None
        else None
    )
    tokens = load_tokens(token_file)
    configure_logging(log_level, log_format.value)
    models = tuple(dict.fromkeys(m.value for m in model)) if model else contracts.MODEL_NAMES
    try:
        config = GatewayConfig(
            host=host,
            port=port,
            backend=backend.value,
            triton_url=",".join(triton_url) if triton_url else None,
            model_dir=model_dir,
            models=models,
            default_model=contracts.DEFAULT_MODEL
            if contracts.DEFAULT_MODEL in models
            else models[0],
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            health_port=health_port,
            guards=ClientGuards(
                idle_timeout_s=idle_timeout,
                max_scans_per_peer=max_scans_per_peer,
                max_connections=max_connections,
            ),
            limits=GatewayLimits(
                max_file_bytes=max_file_bytes,
                max_slices=max_slices,
                max_concurrent_scans=max_concurrent_scans,
                max_scan_bytes=max_scan_bytes,
                memory_budget_bytes=memory_budget,
                kept_freed_bytes=kept_freed_memory,
            ),
            grace_seconds=grace,
            threads=threads,
            cpu_threads=cpu_threads,
            scan_cpu_seconds=scan_cpu_seconds,
            scan_wall_seconds=scan_wall_seconds,
            # Named models must all load; by default, serve whichever have been exported.
            require_all_models=bool(model),
            pacs=destination,
            prior_deadline_s=prior_deadline,
            dicom_outputs=OutputSettings(
                copy_source_equipment=seg_source_equipment, seg_type=seg_type.value
            ),
            tls=tls,
            tokens=tokens,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    run(config)


@app.command()
def send(
    series_dir: Annotated[
        Path, typer.Argument(help="Folder with the DICOM files of one CT series.")
    ],
    gateway: Annotated[str, typer.Option(help="Gateway address HOST:PORT.")] = DEFAULT_GATEWAY,
    model: Annotated[
        ScanModel, typer.Option(help="Which network; both: the two on one scan, fused.")
    ] = ScanModel.jcs2d,
    out: Annotated[
        Path | None,
        typer.Option(help="Write result.json, overlay.png and masks.npz into this folder."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Deadline for the whole scan, in seconds.")
    ] = 600.0,
    retries: Annotated[
        int, typer.Option(help="Retries while the gateway is UNAVAILABLE (with backoff).")
    ] = 5,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    seg: Annotated[
        bool, typer.Option("--seg", help="Ask for a DICOM SEG; written to --out as seg.dcm.")
    ] = False,
    sr: Annotated[
        bool, typer.Option("--sr", help="Ask for a DICOM SR; written to --out as sr.dcm.")
    ] = False,
    tls: TlsOption = False,
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    token_file: TokenFileOption = None,
    tls_server_name: ServerNameOption = None,
) -> None:
    """Stream a series to the gateway and print (and save) what comes back."""
    from ctjoint.client.send import SendError, send_series

    security = _channel_security(tls, ca_cert, client_cert, client_key, token_file, tls_server_name)
    try:
        send_series(
            series_dir,
            gateway=gateway,
            model=model.value,
            out_dir=out,
            timeout=timeout,
            retries=retries,
            show_progress=progress,
            seg=seg,
            sr=sr,
            security=security,
        )
    except SendError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=err.exit_code) from None


@app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="Folder to watch for new series folders.")],
    gateway: Annotated[str, typer.Option(help="Gateway address HOST:PORT.")] = DEFAULT_GATEWAY,
    model: Annotated[
        ScanModel, typer.Option(help="Which network; both: the two on one scan, fused.")
    ] = ScanModel.jcs2d,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Results root, one folder per series (default: FOLDER-results beside FOLDER)."
        ),
    ] = None,
    settle: Annotated[
        float, typer.Option(help="A series is complete after this many seconds without change.")
    ] = 5.0,
    poll: Annotated[float, typer.Option(help="Seconds between scans of the folder.")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Deadline per series, in seconds.")] = 600.0,
    once: Annotated[
        bool, typer.Option(help="Send what is there once it has settled, then exit.")
    ] = False,
    tls: TlsOption = False,
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    token_file: TokenFileOption = None,
    tls_server_name: ServerNameOption = None,
) -> None:
    """Send each new complete series folder under FOLDER to the gateway, once."""
    from ctjoint.client.send import SendError
    from ctjoint.client.watch import watch_folder

    security = _channel_security(tls, ca_cert, client_cert, client_key, token_file, tls_server_name)
    try:
        watch_folder(
            folder,
            gateway=gateway,
            model=model.value,
            out_root=out,
            settle_seconds=settle,
            poll_seconds=poll,
            timeout=timeout,
            once=once,
            security=security,
        )
    except SendError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=err.exit_code) from None


@app.command()
def listen(
    ae_title: Annotated[str, typer.Option(help="Our AE title (what the scanner calls).")] = (
        "CTJOINT"
    ),
    port: Annotated[int, typer.Option(help="DIMSE port to listen on (0: any free port).")] = 11112,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    gateway: Annotated[str, typer.Option(help="Gateway address HOST:PORT.")] = DEFAULT_GATEWAY,
    model: Annotated[
        ScanModel, typer.Option(help="Which network; both: the two on one scan, fused.")
    ] = ScanModel.jcs2d,
    out: Annotated[
        Path, typer.Option(help="Results root, one folder per series (a hash of its UID).")
    ] = Path("ctjoint-results"),
    spool: Annotated[
        Path | None, typer.Option(help="Where received files wait (default: OUT/.spool).")
    ] = None,
    quiet: Annotated[
        float,
        typer.Option(
            help="A series is complete when its associations ended and no file came for this "
            "many seconds."
        ),
    ] = 5.0,
    timeout: Annotated[float, typer.Option(help="Deadline per series, in seconds.")] = 600.0,
    spool_retention: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds a series whose forward failed keeps its spool (patient data) and is "
            "retried; then the spool is deleted.",
        ),
    ] = 3600.0,
    allow_ae: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-ae",
            help="Admit only this calling AE title (repeat for more); others are rejected.",
        ),
    ] = None,
    scp_tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate: serve DICOM over TLS to the scanner.")
    ] = None,
    scp_tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --scp-tls-cert.")] = (
        None
    ),
    scp_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA: senders must present a certificate it signed.")
    ] = None,
    stow_port: Annotated[
        int | None,
        typer.Option(
            help="Also take series by STOW-RS (POST /studies) on this port (0: any free one); "
            "TLS with --scp-tls-cert/--scp-tls-key."
        ),
    ] = None,
    stow_token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token STOW-RS senders must give.")
    ] = None,
    seg: Annotated[bool, typer.Option("--seg", help="Ask for and write seg.dcm.")] = False,
    sr: Annotated[bool, typer.Option("--sr", help="Ask for and write sr.dcm.")] = False,
    tls: TlsOption = False,
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    token_file: TokenFileOption = None,
    tls_server_name: ServerNameOption = None,
) -> None:
    """Receive CT series by C-STORE and forward each complete series to the gateway, once."""
    import logging

    from ctjoint.client.listen import ListenerSecurity, gateway_forward
    from ctjoint.client.listen import listen as serve_storage
    from ctjoint.client.stow import StowSettings

    stow = (
        StowSettings(host=host, port=stow_port, token=_secret(stow_token_file))
        if stow_port is not None
        else None
    )

    try:
        scp_security = ListenerSecurity(
            allowed_calling_aes=tuple(allow_ae or ()),
            tls_cert=scp_tls_cert,
            tls_key=scp_tls_key,
            tls_client_ca=scp_client_ca,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err

    # Only the listener's own lines (series keys, counts): no identifiers reach the log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    security = _channel_security(tls, ca_cert, client_cert, client_key, token_file, tls_server_name)
    forward = gateway_forward(
        gateway=gateway,
        model=model.value,
        out_root=out,
        timeout=timeout,
        seg=seg,
        sr=sr,
        security=security,
    )
    try:
        serve_storage(
            ae_title=ae_title,
            port=port,
            host=host,
            spool=spool or out / ".spool",
            forward=forward,
            quiet_seconds=quiet,
            retention_seconds=spool_retention,
            security=scp_security,
            stow=stow,
            results=out,
        )
    except KeyboardInterrupt:
        typer.echo("stopped")


@app.command()
def bench(
    gateway: Annotated[
        str | None, typer.Option(help="A running gateway HOST:PORT (or --spawn).")
    ] = None,
    spawn: Annotated[
        bool, typer.Option(help="Start tritonserver and a gateway on loopback for the run.")
    ] = False,
    backend: Annotated[
        BackendName, typer.Option(help="With --spawn: the gateway's backend.")
    ] = BackendName.triton,
    series: Annotated[
        Path | None, typer.Option(help="A series folder to send (default: a phantom).")
    ] = None,
    size: Annotated[int, typer.Option(help="Phantom rows and columns.")] = 256,
    slices: Annotated[int, typer.Option(help="Phantom slices.")] = 64,
    model: Annotated[ModelName, typer.Option(help="Model to run.")] = ModelName.jcs2d,
    concurrency: Annotated[
        str, typer.Option(help="Scans in flight per point: 1,2,4 or 1:4.")
    ] = "1,2,4",
    scans: Annotated[int, typer.Option(min=1, help="Scans per concurrency point.")] = 8,
    out: Annotated[Path, typer.Option(help="Folder for bench.json/.csv/.png.")] = Path("out/bench"),
    gateway_pid: Annotated[
        int | None, typer.Option(help="Gateway process id (CPU and RSS; with --gateway).")
    ] = None,
    triton_pid: Annotated[
        int | None, typer.Option(help="tritonserver process id (CPU and RSS; with --gateway).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="With --spawn: ONNX Runtime threads of the gateway.")
    ] = None,
    tls: TlsOption = False,
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    token_file: TokenFileOption = None,
    tls_server_name: ServerNameOption = None,
) -> None:
    """End-to-end throughput/latency sweep over concurrency with the gateway's stage times."""
    from ctjoint.bench import (
        BenchError,
        parse_concurrency,
        phantom_series,
        run_bench,
        spawned_stack,
    )

    if (gateway is None) == (not spawn):
        raise typer.BadParameter("give either --gateway HOST:PORT or --spawn")
    try:
        levels = parse_concurrency(concurrency)
        series_dir = series or phantom_series(out / "phantoms", size=size, slices=slices)
        if spawn:
            with spawned_stack(out / "logs", backend=backend.value, threads=threads) as stack:
                report = run_bench(
                    address=stack.address,
                    series_dir=series_dir,
                    model=model.value,
                    levels=levels,
                    scans=scans,
                    out_dir=out,
                    pids=stack.pids,
                )
        else:
            pids = {
                name: pid
                for name, pid in (("gateway", gateway_pid), ("triton", triton_pid))
                if pid is not None
            }
            report = run_bench(
                address=str(gateway),
                series_dir=series_dir,
                model=model.value,
                levels=levels,
                scans=scans,
                out_dir=out,
                pids=pids,
                # A running gateway may want TLS or a token; a spawned one is loopback plaintext.
                security=_channel_security(
                    tls, ca_cert, client_cert, client_key, token_file, tls_server_name
                ),
            )
    except BenchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(report.summary())
    typer.echo(f"wrote {out / 'bench.json'}, {out / 'bench.csv'}, {out / 'bench.png'}")


@app.command()
@clean_errors
def demo(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder for the phantom and every output.")
    ] = Path("out/demo"),
    kind: Annotated[
        PhantomKind, typer.Option(help="Which findings to plant.")
    ] = PhantomKind.covid19,
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 2026,
    size: Annotated[int, typer.Option(help="Rows and columns of each slice.")] = 512,
    slices: Annotated[int, typer.Option(help="Number of slices.")] = 100,
) -> None:
    """A phantom series analysed in-process and through client -> gateway -> Triton."""
    from ctjoint.demo import run_demo

    run_demo(out_dir, kind=kind.value, seed=seed, size=size, slices=slices)


def main() -> None:
    """Entry point of the `ctjoint` script."""
    app()


if __name__ == "__main__":
    main()
