"""Nothing changes for users: digests of what an analysis gives them, to compare across commits.

    .venv/bin/python bench/equality.py --save DIR     # record this commit's digests
    .venv/bin/python bench/equality.py --check DIR    # compare; exit 1 naming each difference

A fixed set of phantom chest CTs (export/phantom.py, the writer behind `ctjoint phantom`: two
seeds per class, 96x96, 24 slices) is analysed end to end in-process with the bundled ONNX
weights of both networks (the embedded backend), streamed as `ctjoint analyze` does and
whole-volume as a non-streaming gateway does, plus `--model both` on one case. For each
analysis the digest holds the SHA-256 of: the result JSON (`ctjoint analyze --json`) and the
client's decoding of the gateway's answer (`client/results.py` of `gateway/wire.py`), both
without the timings, which change every run; the label map, lung map and CAM arrays; the
overlay PNG; the SEG (binary and labelmap) and the SR, after the values made fresh per run
(UIDs not taken from the source, dates and times not taken from it, and the group lengths
that count the UIDs' bytes) are replaced by stable tokens. The phantom series themselves are
digested too, so a change of the inputs is named as such. `--save` also keeps the text
outputs (result JSON, SEG and SR as text) beside the digest, and `--check` writes this run's
when something differs, to diff the two.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ctjoint.client.render import as_result_dict
from ctjoint.client.results import result_dict
from ctjoint.contracts import CLASS_NAMES, MODEL_BOTH, MODEL_DEEPSC3D, MODEL_JCS2D
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.analysis import ScanAnalysis, ScanAnalyzer, cam_on_source
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.dicom_outputs import OutputSettings, analysis_objects
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.wire import result_to_proto
from ctjoint.render import render_overlay

DIGEST_FILE = "digest.json"
SEEDS = (11, 12)
SIZE = 96
SLICES = 24
# Keys of the result JSON that differ from run to run (wall and CPU times).
VOLATILE_RESULT_KEYS = ("timings",)
DATE_TIME_VRS = ("DA", "TM", "DT")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def array_bytes(array: np.ndarray | None) -> bytes:
    """An array's dtype, shape and bytes ("none" for no array)."""
    if array is None:
        return b"none"
    array = np.ascontiguousarray(array)
    return f"{array.dtype.str}{list(array.shape)}".encode() + array.tobytes()


def stable_result_json(result: Mapping[str, Any]) -> str:
    """The result JSON as `ctjoint analyze --json` writes it, without the volatile keys."""
    kept = {key: value for key, value in result.items() if key not in VOLATILE_RESULT_KEYS}
    return json.dumps(kept, indent=2) + "\n"


def _source_values(header: Dataset | None) -> set[str]:
    """Every UID, date and time value of the source header: those are kept as they are."""
    values: set[str] = set()
    if header is None:
        return values
    for element in header.iterall():
        if element.VR in ("UI", *DATE_TIME_VRS) and element.value:
            values.add(str(element.value))
    return values


def canonical_dicom(data: bytes, source: set[str]) -> bytes:
    """The object's elements as text, fresh UIDs numbered by first use and fresh dates/times
    replaced; pixel data and other binary values by their SHA-256."""
    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
    tokens: dict[str, str] = {}
    lines: list[str] = []

    def walk(ds: Dataset, depth: int) -> None:
        if depth == 0:
            lines.extend(_element_line(e, tokens, source, 0) for e in ds.file_meta)
        for element in ds:
            if element.VR == "SQ":
                lines.append(f"{'  ' * depth}{element.tag} SQ {len(element.value)}")
                for item in element.value:
                    lines.append(f"{'  ' * (depth + 1)}item")
                    walk(item, depth + 2)
            else:
                lines.append(_element_line(element, tokens, source, depth))

    walk(dataset, 0)
    return "\n".join(lines).encode()


def _element_line(element: Any, tokens: dict[str, str], source: set[str], depth: int) -> str:
    value = element.value
    if element.tag.element == 0:
        # A group length counts the bytes of the group's fresh UIDs, whose length varies.
        text = "<group length>"
    elif isinstance(value, bytes):
        text = f"bytes:{sha256(value)}"
    elif element.VR == "UI" and value and str(value) not in source:
        text = tokens.setdefault(str(value), f"<uid {len(tokens)}>")
    elif element.VR in DATE_TIME_VRS and value and str(value) not in source:
        text = f"<{element.VR}>"
    else:
        text = repr(value)
    return f"{'  ' * depth}{element.tag} {element.VR} {text}"


def digest_analysis(analysis: ScanAnalysis) -> dict[str, str]:
    """SHA-256 of everything a user gets from one analysis (see the module docstring)."""
    return {field: sha256(data) for field, data in canonical_outputs(analysis).items()}


def canonical_outputs(analysis: ScanAnalysis) -> dict[str, bytes]:
    """What a user gets from one analysis, each as stable bytes (what `digest_analysis` hashes):
    JSON and DICOM as text, arrays as dtype, shape and raw bytes."""
    result = as_result_dict(analysis.result)
    client = result_dict(result_to_proto(analysis.result, request_id="equality"))
    cam = analysis.cam
    overlay = render_overlay(
        analysis.volume_hu,
        analysis.label_map,
        lung_map=analysis.lung_map,
        cam=None if cam is None else cam_on_source(cam, analysis.volume.shape),
        caption=analysis.result.review.caption,
    )
    source = _source_values(analysis.source_header)
    outputs = {
        "result_json": stable_result_json(result).encode(),
        "client_json": stable_result_json(client).encode(),
        "label_map": array_bytes(analysis.label_map),
        "lung_map": array_bytes(analysis.lung_map),
        "cam": array_bytes(cam),
        "slice_probabilities": repr(
            [analysis.result.slice_probabilities.get(name, ()) for name in CLASS_NAMES]
        ).encode(),
        "overlay_png": overlay.png,
    }
    if analysis.source_header is not None:
        for seg_type in ("binary", "labelmap"):
            objects = analysis_objects(
                analysis,
                seg=True,
                sr=seg_type == "binary",
                settings=OutputSettings(seg_type=seg_type),
            )
            assert objects.seg is not None
            outputs[f"seg_{seg_type}"] = canonical_dicom(objects.seg, source)
            if objects.sr is not None:
                outputs["sr"] = canonical_dicom(objects.sr, source)
    return outputs


def _cases() -> Iterator[tuple[str, str, int]]:
    for kind in CLASS_NAMES:
        for seed in SEEDS:
            yield f"{kind}-{seed}", kind, seed


async def _analyse(files: list[Path], model: str, *, streaming: bool) -> ScanAnalysis:
    models = (MODEL_JCS2D, MODEL_DEEPSC3D) if model == MODEL_BOTH else (model,)
    # One thread: the float sums of a run do not depend on how work was split.
    backend = EmbeddedBackend(models, intra_op_threads=1)
    async with backend:
        analyzer = ScanAnalyzer(backend, streaming=streaming)
        inputs = [(path.name, path) for path in files]
        return await analyzer.analyze_files(inputs, model, expected_slices=len(files))


# Outputs kept as text beside the digest (`--save`, and `--check` for what differs), to diff.
TEXT_FIELDS = ("result_json", "client_json", "seg_binary", "seg_labelmap", "sr")


def run_all(work: Path) -> tuple[dict[str, dict[str, str]], dict[str, bytes]]:
    """Digests by "case/model/path", and the text outputs by "case_model_path_field"."""
    digests: dict[str, dict[str, str]] = {}
    texts: dict[str, bytes] = {}
    for name, kind, seed in _cases():
        case = work / name
        write_phantom_case(case, kind=kind, seed=seed, slices=SLICES, size=SIZE)
        files = list_series_files(case / "series")
        digests[f"{name}/input"] = {
            "series": sha256(b"".join(sha256(p.read_bytes()).encode() for p in files))
        }
        runs = [(MODEL_JCS2D, True), (MODEL_JCS2D, False), (MODEL_DEEPSC3D, True)]
        runs.append((MODEL_DEEPSC3D, False))
        if seed == SEEDS[0] and kind == CLASS_NAMES[0]:
            runs.append((MODEL_BOTH, True))
        for model, streaming in runs:
            key = f"{name}/{model}/{'streamed' if streaming else 'whole'}"
            analysis = asyncio.run(_analyse(files, model, streaming=streaming))
            outputs = canonical_outputs(analysis)
            digests[key] = {field: sha256(data) for field, data in outputs.items()}
            for field in TEXT_FIELDS:
                if field in outputs:
                    texts[f"{key.replace('/', '_')}_{field}.txt"] = outputs[field]
            print(f"{key}: {analysis.result.label}", file=sys.stderr)
    return digests, texts


def differences(
    saved: Mapping[str, Mapping[str, str]], now: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """One line per key or field that is missing on one side or differs."""
    lines = []
    for key in sorted(set(saved) | set(now)):
        if key not in now:
            lines.append(f"{key}: in the saved digest only")
        elif key not in saved:
            lines.append(f"{key}: new, not in the saved digest")
        else:
            for field in sorted(set(saved[key]) | set(now[key])):
                if saved[key].get(field) != now[key].get(field):
                    lines.append(f"{key}: {field} differs")
    return lines


def _write_texts(folder: Path, texts: Mapping[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in texts.items():
        (folder / name).write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, metavar="DIR", help="record the digests here")
    mode.add_argument("--check", type=Path, metavar="DIR", help="compare with those saved here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctjoint-equality-") as work:
        digests, texts = run_all(Path(work))
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / DIGEST_FILE).write_text(json.dumps(digests, indent=2) + "\n")
        _write_texts(args.save / "text", texts)
        print(f"saved {len(digests)} digests to {args.save / DIGEST_FILE}")
        return 0
    saved = json.loads((args.check / DIGEST_FILE).read_text())
    found = differences(saved, digests)
    for line in found:
        print(line)
    if found:
        now = Path(tempfile.mkdtemp(prefix="ctjoint-equality-now-"))
        _write_texts(now, texts)
        print(
            f"{len(found)} difference(s) from {args.check / DIGEST_FILE}; this run's text "
            f"outputs are in {now}, to diff with {args.check / 'text'}"
        )
        return 1
    print(f"identical: {len(digests)} digests equal those in {args.check / DIGEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
