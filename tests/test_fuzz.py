"""Mutation fuzzing (issue 8, point 2): seeded mutants of phantom files through the validation +
decode + preprocessing path in-process, and a sample of them through a live gateway.

Only the project's typed errors may come out; no case may take over 2 s or allocate over
256 MB. CI runs 10,000 in-process cases and 500 through the gateway; CTJOINT_FUZZ_CASES and
CTJOINT_FUZZ_GATEWAY_CASES raise them (e.g. 100000), CTJOINT_FUZZ_SEED picks another run.
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import figures
import grpc
import numpy as np
import pydicom
import pytest
from fuzz_mutator import MUTATIONS, Mutator, seed_files, seed_series, to_bytes, walk_elements
from gateway_process import GatewayProcess, analyze, channel
from grpc_health.v1 import health_pb2
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ctjoint.gateway.dicom_io import is_localizer, read_ct_slice
from ctjoint.gateway.errors import InvalidAttributeError, LimitExceededError
from ctjoint.series_rules import CT_IMAGE_STORAGE, ImageFacts
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

TESTS = Path(__file__).parent
IN_PROCESS_CASES = int(os.environ.get("CTJOINT_FUZZ_CASES", "10000"))
GATEWAY_CASES = int(os.environ.get("CTJOINT_FUZZ_GATEWAY_CASES", "500"))
SEED = int(os.environ.get("CTJOINT_FUZZ_SEED", "20261123"))
# What the gateway may answer a mutant: a result, or a typed refusal. UNKNOWN / INTERNAL /
# UNAVAILABLE would mean a crash or an unhandled exception.
TYPED_ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def scan(
    address: str, files: list[bytes], *, expected: int, outputs: scan_pb2.OutputOptions
) -> scan_pb2.ScanResult:
    """One AnalyzeScan with the given outputs; raises grpc.RpcError on a status other than OK."""
    header = scan_pb2.ScanHeader(model="jcs2d", expected_files=expected, outputs=outputs)
    messages = [scan_pb2.ScanRequest(header=header)]
    messages += [scan_pb2.ScanRequest(file=scan_pb2.DicomFile(content=f)) for f in files]
    with channel(address) as ch:
        result: scan_pb2.ScanResult = scan_pb2_grpc.ScanServiceStub(ch).AnalyzeScan(
            iter(messages), timeout=30
        )
    return result


def run_harness(cases: int, seed: int, *extra: str, timeout: float = 600) -> dict[str, object]:
    """tests/fuzz_harness.py in a process of its own (it sets an address-space limit)."""
    completed = subprocess.run(
        [sys.executable, str(TESTS / "fuzz_harness.py"), str(cases), str(seed), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=TESTS,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report: dict[str, object] = json.loads(completed.stdout)
    return report


def test_mutants_are_reproducible_and_differ_from_their_seed() -> None:
    seeds = seed_files(seed_series())
    first, again = Mutator(seeds, seed=7), Mutator(seeds, seed=7)
    other = Mutator(seeds, seed=8)
    cases = [first.case(n) for n in range(60)]
    assert [c.data for c in cases] == [again.case(n).data for n in range(60)]
    assert sum(c.data != other.case(n).data for n, c in enumerate(cases)) > 40
    assert all(c.data != seeds[c.seed] for c in cases)
    assert {k for c in cases for k in c.kinds} == set(MUTATIONS)


def test_the_element_walker_finds_every_top_level_element() -> None:
    data = to_bytes(seed_series()[0])
    ds = pydicom.dcmread(io.BytesIO(data))
    tags = [e.tag for e in walk_elements(data)]
    expected = [(t.group, t.element) for t in [*ds.file_meta.keys(), *ds.keys()]]
    assert tags == expected
    pixel = walk_elements(data)[-1]
    assert pixel.value_at + pixel.length == len(data)


def test_the_memory_guard_reports_a_case_that_allocates_too_much() -> None:
    # The harness must be able to fail: a path that allocates 300 MB per case is reported.
    program = (
        "import sys, json, numpy as np\n"
        "import fuzz_harness as h\n"
        "class Greedy(h.PathUnderTest):\n"
        "    def run(self, data):\n"
        "        block = np.ones(300 * 2**20, dtype=np.uint8)\n"
        "        return 'ok' if block[-1] else 'no'\n"
        "r = h.fuzz(Greedy(), h.default_mutator(0), range(3))\n"
        "print(json.dumps(r.as_dict()))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=TESTS
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    assert report["outcomes"] == {"MemoryError": 3}
    assert len(report["large"]) == 3


# pytest's default 600 s would cut a long run (100,000 cases take several minutes here).
@pytest.mark.timeout(max(600, IN_PROCESS_CASES // 20))
def test_mutants_through_validation_decode_and_preprocessing_raise_only_typed_errors() -> None:
    report = run_harness(IN_PROCESS_CASES, SEED, timeout=max(600, IN_PROCESS_CASES // 20))
    outcomes: dict[str, int] = report["outcomes"]  # type: ignore[assignment]
    figures.record(
        "fuzz in-process (validation + decode + preprocess)",
        cases=report["cases"],
        seconds=round(float(report["seconds"]), 1),  # type: ignore[arg-type]
        unhandled=len(report["unhandled"]),  # type: ignore[arg-type]
        over_2s=len(report["slow"]),  # type: ignore[arg-type]
        over_256MB=len(report["large"]),  # type: ignore[arg-type]
        max_case_s=round(float(report["max_seconds"]), 3),  # type: ignore[arg-type]
        rss_growth_mib=round(
            float(report["rss_end_mib"]) - float(report["rss_start_mib"]),  # type: ignore[arg-type]
            1,
        ),
        decode_workers_lost=report["decode_workers_lost"],
        outcomes=json.dumps(outcomes, sort_keys=True),
    )
    assert report["cases"] == IN_PROCESS_CASES
    assert report["unhandled"] == [], "\n".join(report["unhandled"][:5])  # type: ignore[index]
    assert report["slow"] == []
    assert report["large"] == []
    # The fuzzer reaches the end of the path (preprocessing) for some mutants, and the
    # compressed seeds reach the decode workers.
    assert outcomes.get("ok", 0) > 0
    assert int(report["decode_workers_started"]) >= 1  # type: ignore[call-overload]
    assert set(report["kinds"]) == set(MUTATIONS)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("fuzz_gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log).start()
    try:
        yield process
    finally:
        process.stop()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.timeout(max(600, GATEWAY_CASES // 5))
def test_mutants_through_the_live_gateway_get_typed_answers(gateway: GatewayProcess) -> None:
    series = seed_series()
    neighbours = [to_bytes(ds) for i, ds in enumerate(series) if i != len(series) // 2]
    mutator = Mutator(seed_files(series), seed=SEED + 1)
    answers: Counter[str] = Counter()
    bad: list[str] = []
    started = time.perf_counter()
    slowest = 0.0
    for number in range(GATEWAY_CASES):
        case = mutator.case(number)
        # Every 50th scan also claims 10,000 files in its header. Every 4th sends the mutant
        # first and asks for SEG and SR too: the first file's header is what they copy.
        expected = 10_000 if number % 50 == 0 else 3
        files = [neighbours[0], case.data, neighbours[1]]
        outputs = scan_pb2.OutputOptions()
        if number % 4 == 1:
            files = [case.data, *neighbours]
            outputs = scan_pb2.OutputOptions(seg=True, sr=True, masks=True, overlay=True)
        t0 = time.perf_counter()
        try:
            scan(gateway.address, files, expected=expected, outputs=outputs)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        slowest = max(slowest, time.perf_counter() - t0)
        answers[code.name] += 1
        label = f"case {number} ({case.seed}, {'+'.join(case.kinds)})"
        if code not in TYPED_ANSWERS:
            bad.append(f"{label}: {code.name} {details}")
        elif code == grpc.StatusCode.INVALID_ARGUMENT and "file" not in details:
            bad.append(f"{label}: the message names no file: {details}")
        if expected == 10_000:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    seconds = time.perf_counter() - started
    health = gateway.health()
    figures.record(
        "fuzz through the live gateway",
        cases=GATEWAY_CASES,
        seconds=round(seconds, 1),
        slowest_scan_s=round(slowest, 2),
        untyped_answers=len(bad),
        answers=json.dumps(dict(answers), sort_keys=True),
        serving_after=health == health_pb2.HealthCheckResponse.SERVING,
    )
    assert bad == [], "\n".join(bad[:10])
    assert gateway.alive()
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert answers["OK"] > 0


def test_a_refused_mutant_leaves_no_trace_in_the_next_scan(gateway: GatewayProcess) -> None:
    # After hundreds of refusals the same gateway still analyses the plain series exactly.
    series = [to_bytes(ds) for ds in seed_series()]
    result = analyze(gateway.address, series, timeout=30)
    assert len(result.slice_file_number) == len(series)
    assert pydicom.dcmread(io.BytesIO(series[0])).Modality == "CT"


def deflated(ds: pydicom.Dataset, filler: int = 0) -> bytes:
    """`ds` as a Deflated Explicit VR Little Endian file, optionally with `filler` bytes of
    zeros in a private element (deflate shrinks them ~1000-fold)."""
    ds = copy.deepcopy(ds)
    if filler:
        block = ds.private_block(0x0009, "CTJOINT FUZZ", create=True)
        block.add_new(0x10, "OB", bytes(filler))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_deflated_file_reads_like_the_original() -> None:
    ds = seed_series()[1]
    original = read_ct_slice(to_bytes(ds), source="file 1")
    again = read_ct_slice(deflated(ds), source="file 1")
    np.testing.assert_array_equal(again.hu, original.hu)


def test_a_deflate_bomb_is_refused_before_it_is_inflated() -> None:
    # 200 MiB of zeros deflate to ~200 KB: well inside the gateway's file limit.
    bomb = deflated(seed_series()[1], filler=200 * 2**20)
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match=r"^file 1: its deflated data set inflates"):
            read_ct_slice(bomb, source="file 1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Counted, not kept: the check itself needs next to nothing.
    assert peak < 16 * 2**20


def test_an_image_type_read_as_a_number_is_not_a_localizer_and_not_a_crash() -> None:
    # Found by 100,000 seeded cases (seed 20261123, case 35105): a bit flip turned Image
    # Type's VR CS into IS, and the localizer check iterated over the number.
    ds = seed_series()[1]
    ds.add_new(0x00080008, "IS", "5")
    data = to_bytes(ds)
    parsed = pydicom.dcmread(io.BytesIO(data))
    assert not is_localizer(parsed)
    assert read_ct_slice(data, source="file 1").hu.shape == (32, 32)


def _with_sequence_in_place_of(keyword: str) -> bytes:
    """A seed file whose `keyword` is a sequence holding one element of an unknown VR."""
    ds = seed_series()[1]
    if keyword in ds:
        del ds[keyword]
    item = pydicom.Dataset()
    item.add_new(0x4348524F, "LO", "XY")
    ds.add_new(pydicom.datadict.tag_for_keyword(keyword), "SQ", [item])
    data = to_bytes(ds)
    marker = bytes.fromhex("48434f52") + b"LO"
    assert data.count(marker) == 1
    return data.replace(marker, bytes.fromhex("48434f52") + b"ME")


@pytest.mark.parametrize("keyword", ["Modality", "PhotometricInterpretation", "ImageType"])
def test_a_plain_attribute_read_as_a_sequence_is_a_clear_error(keyword: str) -> None:
    # Found by atheris in CI: Modality's VR became SQ, and str() of the sequence converted
    # its item's element of unknown VR 'ME', which raised NotImplementedError.
    data = _with_sequence_in_place_of(keyword)
    if keyword == "ImageType":
        # Not a localizer, and not needed for CT validation: the file is read as usual.
        assert not is_localizer(pydicom.dcmread(io.BytesIO(data)))
        assert read_ct_slice(data, source="file 1").hu.shape == (32, 32)
        return
    with pytest.raises(InvalidAttributeError, match=rf"^file 1: {keyword}: is a sequence"):
        read_ct_slice(data, source="file 1")


def _with_codestream_size(data: bytes, name: str, height: int, width: int) -> bytes:
    """A compressed seed file whose codestream header declares another image size."""
    if name == "jls":
        at = data.index(b"\xff\xf7") + 5  # SOF55: marker, length, precision, then Y, X
        return data[:at] + struct.pack(">HH", height, width) + data[at + 4 :]
    at = data.index(b"\xff\x4f\xff\x51") + 8  # SOC, SIZ, Lsiz, Rsiz, then Xsiz, Ysiz
    return data[:at] + struct.pack(">II", width, height) + data[at + 8 :]


@pytest.mark.parametrize("name", ["jls", "j2k"])
def test_a_codestream_bigger_than_rows_and_columns_is_refused_before_decoding(
    name: str,
) -> None:
    # Found by atheris (seed 3): a JPEG-LS header mutated to 65279x224 kept a decode worker
    # busy for 4.6 s, decoding pixels that were refused afterwards anyway.
    seeds = seed_files(seed_series())
    if name not in seeds:
        pytest.skip(f"no {name} encoder on this machine")
    assert read_ct_slice(seeds[name], source="file 1").hu.shape == (32, 32)
    bomb = _with_codestream_size(seeds[name], name, 4000, 4000)
    started = time.perf_counter()
    with pytest.raises(
        InvalidAttributeError,
        match=r"^file 1: PixelData: its codestream is 4000x4000, Rows x Columns say 32x32$",
    ):
        read_ct_slice(bomb, source="file 1")
    assert time.perf_counter() - started < 0.5


def test_a_source_without_type2_patient_attributes_still_gets_its_seg_and_sr(
    gateway: GatewayProcess,
) -> None:
    # Found by the mutants sent first with SEG/SR asked for: the phantom files carry no
    # Patient Birth Date, Patient Sex, Study Date, ... (anonymised exports drop them too), and
    # highdicom's attribute reads answered INTERNAL.
    series = [to_bytes(ds) for ds in seed_series()]
    assert "PatientBirthDate" not in pydicom.dcmread(io.BytesIO(series[0]))
    outputs = scan_pb2.OutputOptions(seg=True, sr=True)
    result = scan(gateway.address, series, expected=len(series), outputs=outputs)
    assert pydicom.dcmread(io.BytesIO(result.seg_dicom)).Modality == "SEG"
    assert pydicom.dcmread(io.BytesIO(result.sr_dicom)).Modality == "SR"


def test_a_seg_without_a_frame_of_reference_is_a_clear_error(gateway: GatewayProcess) -> None:
    datasets = seed_series()
    for ds in datasets:
        del ds.FrameOfReferenceUID
    series = [to_bytes(ds) for ds in datasets]
    with pytest.raises(grpc.RpcError) as caught:
        scan(gateway.address, series, expected=3, outputs=scan_pb2.OutputOptions(seg=True))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FrameOfReferenceUID" in (caught.value.details() or "")


@pytest.mark.parametrize("keyword", ["SOPClassUID", "ConvolutionKernel"])
def test_the_series_rules_read_a_sequence_in_place_of_an_attribute_as_absent(keyword: str) -> None:
    # Found by atheris in CI: SOPClassUID's VR became SQ, and the series rules' str() of the
    # sequence converted an item's element of the wrong length (BytesLengthException).
    header = pydicom.dcmread(io.BytesIO(_with_sequence_in_place_of("ConvolutionKernel")))
    if keyword == "SOPClassUID":  # moved there (a file written so would fail its file meta)
        sequence = header["ConvolutionKernel"].value
        del header["ConvolutionKernel"]
        header.add_new(pydicom.datadict.tag_for_keyword(keyword), "SQ", sequence)
    facts = ImageFacts.from_header(header)
    read = {"SOPClassUID": facts.sop_class, "ConvolutionKernel": facts.kernel}
    assert read[keyword] == ""
    if keyword == "ConvolutionKernel":
        assert facts.sop_class == CT_IMAGE_STORAGE
