"""The analysis entry point: a series folder analysed in-process (`ctjoint analyze`, scripts),
and the pipeline's names callers import.

The pipeline lives in one module per job: file intake (gateway/intake.py), the analyser
(gateway/analyzer.py), the lung and lesion quantifier (gateway/quantify.py), model outputs
back on the source grid (gateway/source_grid.py). They are re-exported here so the gateway,
the CLI and the export side import the pipeline by one name.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ctjoint.contracts import MODEL_BOTH, MODEL_JCS2D
from ctjoint.gateway.analyzer import (
    BOTH_MODELS,
    DEFAULT_BATCH_SIZE,
    ScanAnalysis,
    ScanAnalyzer,
    fuse_analyses,
)
from ctjoint.gateway.intake import DicomInput, Progress, ProgressCallback, SeriesIntake
from ctjoint.gateway.preprocess import source_label_map
from ctjoint.gateway.quantify import lesion_statistics
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.source_grid import cam_on_source


def analyze_directory(
    series_dir: Path | str,
    *,
    model: str = MODEL_JCS2D,
    model_dir: Path | None = None,
    intra_op_threads: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ScanAnalysis:
    """Analyse a series folder in-process with the embedded ONNX Runtime backend (blocking);
    `model` may be MODEL_BOTH."""
    # Imported here so the pipeline itself does not depend on onnxruntime being installed.
    from ctjoint.gateway.backends.embedded import EmbeddedBackend

    files = list_series_files(Path(series_dir))

    async def run() -> ScanAnalysis:
        models = BOTH_MODELS if model == MODEL_BOTH else (model,)
        backend = EmbeddedBackend(models, model_dir=model_dir, intra_op_threads=intra_op_threads)
        async with backend:
            # Streaming overlaps reading the files with inference here too.
            analyzer = ScanAnalyzer(backend, batch_size=batch_size, streaming=True)
            inputs = [(path.name, path) for path in files]
            return await analyzer.analyze_files(inputs, model, expected_slices=len(files))

    return asyncio.run(run())


__all__ = [
    "BOTH_MODELS",
    "DEFAULT_BATCH_SIZE",
    "DicomInput",
    "Progress",
    "ProgressCallback",
    "ScanAnalysis",
    "ScanAnalyzer",
    "SeriesIntake",
    "analyze_directory",
    "cam_on_source",
    "fuse_analyses",
    "lesion_statistics",
    "source_label_map",
]
