"""The right series out of a whole study (issue 19, point 4) through `ctjoint listen` and the
gateway: one study of phantom series of each kind (a thin lung-kernel series with a localizer
image inside, its soft-tissue and bone-kernel twins, a thick one, a localizer series, a dose SR
and a secondary capture), pushed by dcmtk's storescu to a real listener forwarding to a real
gateway, and streamed to the gateway directly; the same series must be chosen everywhere, each
other one skipped with its reason."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import subprocess
import threading
import time
import urllib.request
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pydicom
import pytest
from gateway_process import GatewayProcess, analyze, file_bytes
from pydicom.uid import SecondaryCaptureImageStorage, XRayRadiationDoseSRStorage, generate_uid
from real_components import dcmtk_tool

from ctjoint.client.listen import SELECTION_JSON, gateway_forward, listen, series_key
from ctjoint.client.results import result_dict
from ctjoint.client.send import RESULT_JSON
from ctjoint.client.stow import StowSettings
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.analysis import (
    Progress,
    ScanAnalysis,
    ScanAnalyzer,
    SeriesIntake,
    analyze_directory,
)
from ctjoint.gateway.backends.embedded import EmbeddedBackend
from ctjoint.gateway.series import list_series_files
from ctjoint.gateway.wire import result_to_proto
from ctjoint.series_rules import (
    CT_IMAGE_STORAGE,
    LOCALIZERS_ONLY,
    NOT_CT,
    NOT_ORIGINAL,
    ImageFacts,
    SeriesFacts,
    choose,
)

AE_TITLE = "CTJOINT"
RESULT_SCHEMA_PATH = (
    Path(__file__).resolve().parent.parent / "client" / "schema" / "scan_result.schema.json"
)
# Series number -> the reason it is skipped (the chosen one is series 2).
EXPECTED_SKIPS = {
    3: "soft kernel; a lung kernel is preferred",
    7: "bone kernel; a lung kernel is preferred",
    4: "slice thickness 10.0 mm is further from 1.0-5.0 mm",
    1: LOCALIZERS_ONLY,
    6: NOT_ORIGINAL,
    98: NOT_CT,
    99: NOT_CT,
}


def _copy_as(
    source: list[Path], folder: Path, number: int, study: str, **changes: Any
) -> list[Path]:
    """`source` copied into `folder` as series `number` of `study` with `changes` set."""
    uid = generate_uid()
    out = []
    for path in source:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, uid, number
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        if "SOPClassUID" in changes:
            ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
        target = folder / f"s{number:02d}_{path.name}"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    """(every file of the study, the Series Instance UID of the series to choose)."""
    root = tmp_path_factory.mktemp("whole_study")
    write_phantom_case(root / "case", kind="covid19", seed=5, slices=24, size=32)
    source = list_series_files(root / "case" / "series")
    folder = root / "study"
    folder.mkdir()
    study_uid = generate_uid()
    files = _copy_as(source, folder, 2, study_uid, ConvolutionKernel="B70f")
    chosen = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    # A localizer image carrying the chosen series' UID: dropped with a note.
    scout = pydicom.dcmread(files[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.save_as(folder / "s02_scout.dcm", enforce_file_format=True)
    files.append(folder / "s02_scout.dcm")
    files += _copy_as(source, folder, 3, study_uid, ConvolutionKernel="B30f")
    files += _copy_as(source, folder, 7, study_uid, ConvolutionKernel="BONE")
    files += _copy_as(source, folder, 4, study_uid, ConvolutionKernel="B70f", SliceThickness="10")
    files += _copy_as(
        source[:1], folder, 1, study_uid, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
    )
    files += _copy_as(source, folder, 6, study_uid, ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    files += _copy_as(
        source[:1],
        folder,
        98,
        study_uid,
        SOPClassUID=SecondaryCaptureImageStorage,
        ImageType=["DERIVED", "SECONDARY"],
    )
    dose = pydicom.dcmread(source[0], stop_before_pixels=True)
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = XRayRadiationDoseSRStorage
    dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dose.StudyInstanceUID, dose.SeriesInstanceUID = study_uid, generate_uid()
    dose.SeriesNumber, dose.Modality = 99, "SR"
    dose.save_as(folder / "s99_dose.dcm", enforce_file_format=True)
    files.append(folder / "s99_dose.dcm")
    return files, chosen


def _assert_selection(selection: dict[str, Any]) -> None:
    assert selection["analysed"]["number"] == 2 and selection["analysed"]["images"] == 24
    assert selection["analysed"]["kernel"] == "lung"
    assert selection["notes"] == ["1 localizer image(s) in the series dropped"]
    assert {s["number"]: s["reason"] for s in selection["skipped"]} == EXPECTED_SKIPS


def test_the_rules_are_pure_and_name_each_reason() -> None:
    """The neutral rules on header values alone (what both the client and the gateway call)."""
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    def series(key: str, number: int, kernel: str, thickness: float, count: int) -> SeriesFacts:
        images = [
            ImageFacts(
                sop_class=CT_IMAGE_STORAGE,
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                orientation=axial,
                position=(0.0, 0.0, z * thickness),
                thickness_mm=thickness,
                kernel=kernel,
                series_number=number,
            )
            for z in range(count)
        ]
        return SeriesFacts.of(key, images)

    lung = series("a", 1, "LUNG", 1.25, 200)
    soft = series("b", 2, "STANDARD", 1.25, 200)
    thin = series("c", 3, "LUNG", 0.6, 400)
    short = series("d", 4, "LUNG", 1.25, 10)
    selection = choose([soft, thin, short, lung])
    assert selection.chosen == lung
    assert dict((c.key, why) for c, why in selection.skipped) == {
        "b": "soft kernel; a lung kernel is preferred",
        "c": "slice thickness 0.6 mm is further from 1.0-5.0 mm",
        "d": "too short to cover the lungs (10 slices over 11 mm; at least 20 over 100)",
    }


@pytest.fixture(scope="module")
def gateway(contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("study_gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log).start()
    try:
        yield process.address
    finally:
        process.stop()


def _stow(port: int, files: list[Path]) -> int:
    """One STOW-RS request holding every file; returns the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
            for path in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/studies",
        data=body,
        method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return int(answer.status)


@pytest.mark.parametrize("way", ["dimse", "stow-rs"])
def test_listen_forwards_only_the_chosen_series_of_a_study(
    study: tuple[list[Path], str], gateway: str, tmp_path: Path, way: str
) -> None:
    storescu = dcmtk_tool("storescu") if way == "dimse" else ""
    files, chosen_uid = study
    out = tmp_path / "results"
    to_gateway = gateway_forward(
        gateway=gateway, model="jcs2d", out_root=out, timeout=60.0, seg=False, sr=False
    )
    forwarded: dict[str, int] = {}

    def forward(folder: Path, key: str) -> None:
        forwarded[key] = len(list(folder.glob("*.dcm")))
        to_gateway(folder, key)

    ports: dict[str, int] = {}
    ready, stop = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        holder["listener"] = listen(
            ae_title=AE_TITLE,
            port=0,
            host="127.0.0.1",
            spool=tmp_path / "spool",
            forward=forward,
            quiet_seconds=0.5,
            stow=StowSettings(),
            results=out,
            stop=stop,
            stow_started=lambda port: ports.update(stow=port),
            started=lambda port: (ports.update(dimse=port), ready.set()),
        )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    key = series_key(chosen_uid)
    try:
        assert ready.wait(10), "the listener did not start"
        if way == "dimse":
            # -R: propose each file's own SOP class (storescu's default list lacks the dose SR).
            sent = subprocess.run(
                [storescu, "-R", "-aec", AE_TITLE, "127.0.0.1", str(ports["dimse"]),
                 *map(str, files)],
                capture_output=True,
                text=True,
                timeout=60,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
        else:
            assert _stow(ports["stow"], files) == 200  # every instance taken
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / key / RESULT_JSON).exists():
            time.sleep(0.2)
        time.sleep(1.0)  # another forward would show up by now
    finally:
        stop.set()
        thread.join(30)
    assert holder["listener"].forwarded == [key]
    assert forwarded == {key: 24}  # the localizer image left out of the spool
    assert json.loads((out / key / RESULT_JSON).read_text())["series"]["slices"] == 24
    _assert_selection(json.loads((out / key / SELECTION_JSON).read_text()))
    assert chosen_uid not in (out / key / SELECTION_JSON).read_text()
    assert sorted(p.name for p in out.iterdir()) == [key]
    assert not any((tmp_path / "spool").iterdir())  # no other series' spool is kept


def _number(path: Path) -> int:
    """The series number in a study file's name (s02_..., s99_dose.dcm)."""
    return int(path.name[1:3])


@pytest.mark.parametrize("chosen_first", [False, True])
def test_the_gateway_analyses_the_chosen_series_of_a_streamed_study(
    study: tuple[list[Path], str], gateway: str, chosen_first: bool
) -> None:
    """All the study's files in one AnalyzeScan stream: the dose SR first, then either the
    soft-kernel series (assembled first, so the gateway switches to the chosen one from the
    files it set aside) or the chosen one; the answer is the same series either way."""
    files, chosen_uid = study
    order = [98, 99, 2, 3, 7, 4, 1, 6] if chosen_first else [99, 3, 7, 1, 2, 4, 98, 6]
    ordered = sorted(files, key=lambda p: (order.index(_number(p)), p.name))
    message = analyze(gateway, file_bytes(ordered), masks=True)
    positions = {i: p for i, p in enumerate(ordered, start=1)}
    assert message.geometry.slices == 24
    analysed = [positions[n] for n in message.slice_file_number]
    assert {_number(p) for p in analysed} == {2} and "scout" not in {p.stem for p in analysed}
    selection = message.series_selection
    assert selection.analysed.number == 2 and selection.analysed.images == 24
    assert selection.analysed.kernel == "lung" and selection.analysed.series.startswith("h:")
    assert list(selection.notes) == ["1 localizer image(s) in the series dropped"]
    assert {s.number: s.reason for s in selection.skipped} == EXPECTED_SKIPS
    assert chosen_uid not in str(message)


def test_a_study_with_no_series_to_analyse_is_refused_with_each_reason(
    study: tuple[list[Path], str], gateway: str
) -> None:
    files, _ = study
    unusable = [p for p in files if _number(p) in (1, 6, 98, 99)]
    with pytest.raises(grpc.RpcError) as info:
        analyze(gateway, file_bytes(unusable))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("no series to analyse (")
    for number in (1, 6, 98, 99):
        assert f"series {number}: {EXPECTED_SKIPS[number]}" in details


def test_the_selection_reads_the_same_in_result_json_directly_and_over_the_wire(
    study: tuple[list[Path], str], contract_model_dir: Path
) -> None:
    """`ctjoint analyze` on the study's folder chooses alike; its result.json and the one a
    client rebuilds from the answer carry the same selection, valid under the schema."""
    files, chosen_uid = study
    result = analyze_directory(files[0].parent, model="jcs2d", model_dir=contract_model_dir).result
    schema = json.loads(RESULT_SCHEMA_PATH.read_text(encoding="utf-8"))
    direct = json.loads(json.dumps(result.to_dict()))
    rebuilt = result_dict(result_to_proto(result, request_id="r1"))
    jsonschema.validate(direct, schema)
    jsonschema.validate(rebuilt, schema)
    assert rebuilt["series_selection"] == direct["series_selection"]
    _assert_selection(direct["series_selection"])
    assert chosen_uid not in json.dumps(direct)


def test_a_file_whose_series_uid_is_damaged_is_named_when_its_series_falls_short(
    study: tuple[list[Path], str], gateway: str
) -> None:
    """A damaged Series Instance UID makes a file look like a series of its own; the series it
    left, too short now, fails naming the file that was set aside."""
    files, _ = study
    three = [p.read_bytes() for p in files[:3]]
    damaged = pydicom.dcmread(files[1])
    damaged.SeriesInstanceUID = generate_uid()
    buffer = io.BytesIO()
    damaged.save_as(buffer, enforce_file_format=True)
    three[1] = buffer.getvalue()
    with pytest.raises(grpc.RpcError) as info:
        analyze(gateway, three)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").endswith(
        "has 2 slice(s), expected at least 3 (file 2 of the scan belong to other series of "
        "the study and were set aside)"
    )


def test_a_series_uid_that_is_no_uid_is_refused_not_set_aside(
    study: tuple[list[Path], str], gateway: str
) -> None:
    files, _ = study
    contents = [p.read_bytes() for p in files[:4]]
    damaged = pydicom.dcmread(files[1])
    damaged.SeriesInstanceUID = "1.2.840.NOT-A-UID"
    buffer = io.BytesIO()
    damaged.save_as(buffer, enforce_file_format=True)
    contents[1] = buffer.getvalue()
    with pytest.raises(grpc.RpcError) as info:
        analyze(gateway, contents)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("file 2: SeriesInstanceUID: is not a valid UID")
    assert "NOT-A-UID" not in details


def test_switching_series_frees_the_first_series_before_the_second_is_assembled(
    study: tuple[list[Path], str], contract_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soft-kernel series, first in the stream, is assembled and then dropped for the
    chosen one: while the chosen one is read, no other intake (and its volume) is alive.
    Only this analysis's intakes are counted (weak references taken as each is made), so an
    intake another test of the same process still holds cannot be mistaken for a leak."""
    files, _ = study
    order = [3, 2, 7, 4, 1, 6, 98, 99]
    ordered = sorted(files, key=lambda p: (order.index(_number(p)), p.name))
    alive: list[int] = []
    made: weakref.WeakSet[SeriesIntake] = weakref.WeakSet()
    original_init = SeriesIntake.__init__

    def counted_init(self: SeriesIntake, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        made.add(self)

    monkeypatch.setattr(SeriesIntake, "__init__", counted_init)

    def progress(event: Progress) -> None:
        if event.stage == "validated" and event.total == 24 and event.done == 1:
            # A worker thread of the first series (an inference the switch cancelled keeps
            # running in its thread) may hold it for a moment under load: wait up to 2 s for
            # threads, with the event loop (and so the analysis) stopped here. A reference
            # the analysis keeps never goes away while it is stopped.
            for _ in range(100):
                gc.collect()
                if len(made) <= 1:
                    break
                time.sleep(0.02)
            alive.append(len(made))

    async def run() -> ScanAnalysis:
        async with EmbeddedBackend(["jcs2d"], model_dir=contract_model_dir) as backend:
            analyzer = ScanAnalyzer(backend, streaming=True)
            inputs = [(p.name, p.read_bytes()) for p in ordered]
            return await analyzer.analyze_files(inputs, "jcs2d", progress=progress)

    analysis = asyncio.run(run())
    assert analysis.volume.shape[0] == 24 and alive == [1]
    assert analysis.result.series_selection is not None
    assert analysis.result.series_selection.chosen is not None
    assert analysis.result.series_selection.chosen.number == 2
