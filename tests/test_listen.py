"""`ctjoint listen`: dcmtk's storescu sends phantom series to the storage SCP; each complete
series reaches the gateway once, and two series interleaved in one association stay apart."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from gateway_process import GatewayProcess
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from real_components import dcmtk_tool
from tls_certs import self_signed

from ctjoint.client.listen import (
    ACCEPTED_TRANSFER_SYNTAXES,
    Forward,
    ListenerSecurity,
    SeriesListener,
    gateway_forward,
    listen,
    series_key,
)
from ctjoint.client.send import RESULT_JSON
from ctjoint.contracts import ENV_PSEUDONYM_KEY
from ctjoint.export.phantom import write_phantom_case
from ctjoint.gateway.series import list_series_files

AE_TITLE = "CTJOINT"


@pytest.fixture(scope="module")
def gateway(contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("listen_gateway") / "gateway.log"
    process = GatewayProcess(contract_model_dir, log).start()
    try:
        yield process.address
    finally:
        process.stop()


def _series(root: Path, seed: int, slices: int) -> list[Path]:
    write_phantom_case(root, kind="covid19", seed=seed, slices=slices, size=32)
    return list_series_files(root / "series")


def test_interleaved_series_are_forwarded_once_each_and_kept_apart(
    gateway: str, tmp_path: Path
) -> None:
    storescu = dcmtk_tool("storescu")
    first = _series(tmp_path / "a", seed=11, slices=4)
    second = _series(tmp_path / "b", seed=12, slices=6)
    # One association, the two series' files interleaved.
    interleaved = [p for pair in zip(first, second, strict=False) for p in pair] + second[4:]
    out = tmp_path / "results"
    ports: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    forward = gateway_forward(
        gateway=gateway, model="jcs2d", out_root=out, timeout=60.0, seg=False, sr=False
    )
    result: dict[str, object] = {}

    def serve() -> None:
        result["listener"] = listen(
            ae_title=AE_TITLE,
            port=0,
            host="127.0.0.1",
            spool=tmp_path / "spool",
            forward=forward,
            quiet_seconds=0.5,
            stop=stop,
            started=lambda port: (ports.append(port), ready.set()),
        )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the listener did not start"
        sent = subprocess.run(
            [storescu, "-aec", AE_TITLE, "127.0.0.1", str(ports[0]), *map(str, interleaved)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        keys = {
            series_key(str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
            for files in (first, second)
        }
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all((out / key / RESULT_JSON).exists() for key in keys):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # a second forward of either series would show up by now
    finally:
        stop.set()
        thread.join(30)
    listener = result["listener"]
    assert sorted(listener.forwarded) == sorted(keys)  # type: ignore[attr-defined]
    slices = {
        key: json.loads((out / key / RESULT_JSON).read_text())["series"]["slices"] for key in keys
    }
    first_key = series_key(
        str(pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID)
    )
    assert slices[first_key] == 4
    assert sorted(slices.values()) == [4, 6]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(keys)


def _event(assoc: object, series: str, instance: str) -> SimpleNamespace:
    dataset = Dataset()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = instance
    dataset.SeriesInstanceUID = series
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return SimpleNamespace(assoc=assoc, dataset=dataset, file_meta=meta)


def test_a_series_is_complete_only_after_its_association_ended_and_a_quiet_time(
    tmp_path: Path,
) -> None:
    forwarded: list[str] = []
    listener = SeriesListener(
        tmp_path, lambda folder, key: forwarded.append(key), quiet_seconds=5.0
    )
    assoc = object()
    listener.on_store(_event(assoc, "1.2.3", "1.2.3.1"))
    later = time.monotonic() + 60
    assert listener.complete_series(now=later) == []  # association still open
    listener.on_association_end(SimpleNamespace(assoc=assoc))
    assert listener.complete_series(now=time.monotonic()) == []  # not quiet yet
    [(uid, series)] = listener.complete_series(now=later)
    assert uid == "1.2.3" and series.files == 1 and series.key == series_key("1.2.3")
    assert "1.2.3" not in series.key


def test_series_names_are_keyed_not_bare_hashes() -> None:
    """A folder name must not be recomputable from the UID alone; with a shared key, two
    processes name a series alike."""
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert series_key(uid) == series_key(uid)
    assert series_key(uid) != hashlib.sha256(uid.encode()).hexdigest()[:12]
    code = f"from ctjoint.client.listen import series_key; print(series_key({uid!r}))"
    env = {**os.environ, ENV_PSEUDONYM_KEY: "a deployment's shared secret"}
    names = {
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(names) == 1 and series_key(uid) not in names


class _FlakyForward:
    """A forward that fails `failures` times, then succeeds; records each call's folder."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[Path] = []

    def __call__(self, folder: Path, key: str) -> None:
        self.calls.append(folder)
        assert any(folder.iterdir())  # the spooled files are there for each try
        if len(self.calls) <= self.failures:
            raise ConnectionError("gateway unavailable")


def _one_complete_series(listener: SeriesListener) -> None:
    assoc = object()
    listener.on_store(_event(assoc, "1.2.3", "1.2.3.1"))
    listener.on_association_end(SimpleNamespace(assoc=assoc))


def test_a_failed_forward_is_retried_and_its_spool_deleted_when_retention_ends(
    tmp_path: Path,
) -> None:
    forward = _FlakyForward(failures=100)
    listener = SeriesListener(tmp_path, forward, quiet_seconds=0.0, retention_seconds=100.0)
    _one_complete_series(listener)
    t0 = time.time()
    assert listener.forward_complete(now=t0) == 0
    key = series_key("1.2.3")
    assert listener.retrying == [key] and (tmp_path / key).is_dir()
    listener.forward_complete(now=t0 + 29)  # the first retry is due after 30 s
    assert len(forward.calls) == 1
    listener.forward_complete(now=t0 + 30)
    assert len(forward.calls) == 2  # retried; the next one is 60 s later
    listener.forward_complete(now=t0 + 89)
    assert len(forward.calls) == 2
    listener.forward_complete(now=t0 + 100)
    assert len(forward.calls) == 3
    assert listener.retrying == [] and listener.dropped == [key]
    assert not (tmp_path / key).exists()


def test_a_retry_that_succeeds_forwards_once_and_deletes_the_spool(tmp_path: Path) -> None:
    forward = _FlakyForward(failures=1)
    listener = SeriesListener(tmp_path, forward, quiet_seconds=0.0, first_retry_seconds=1.0)
    _one_complete_series(listener)
    t0 = time.time()
    assert listener.forward_complete(now=t0) == 0
    assert listener.forward_complete(now=t0 + 1) == 1
    assert listener.forwarded == [series_key("1.2.3")] and listener.retrying == []
    assert list(tmp_path.iterdir()) == []
    assert listener.forward_complete(now=t0 + 1000) == 0 and len(forward.calls) == 2


def test_spools_left_by_an_earlier_run_are_retried_or_deleted_by_age(tmp_path: Path) -> None:
    old, recent = tmp_path / "0123456789ab", tmp_path / "ba9876543210"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "x.dcm").write_bytes(b"spooled")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    forward = _FlakyForward(failures=0)
    listener = SeriesListener(tmp_path, forward, quiet_seconds=0.0, retention_seconds=3600.0)
    assert not old.exists() and listener.dropped == [old.name]
    assert listener.retrying == [recent.name]
    assert listener.forward_complete() == 1
    assert forward.calls == [recent] and not recent.exists()


# --- the hardened SCP: transfer syntaxes, C-ECHO, calling AE titles, TLS -------------------


@contextlib.contextmanager
def running_listener(
    tmp_path: Path, forward: Forward, security: ListenerSecurity | None = None
) -> Iterator[tuple[int, dict[str, SeriesListener]]]:
    """`listen` on a free loopback port in a thread; yields (port, {"listener": ...} once it
    has stopped)."""
    ports: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    holder: dict[str, SeriesListener] = {}

    def serve() -> None:
        holder["listener"] = listen(
            ae_title=AE_TITLE,
            port=0,
            host="127.0.0.1",
            spool=tmp_path / "spool",
            forward=forward,
            quiet_seconds=0.5,
            security=security,
            stop=stop,
            started=lambda port: (ports.append(port), ready.set()),
        )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the listener did not start"
        yield ports[0], holder
    finally:
        stop.set()
        thread.join(30)


def _as_own_series(files: list[Path], folder: Path, syntax: str) -> list[Path]:
    """`files` as a new study of one series (own Study, Series and SOP Instance UIDs: the
    listener forwards one series per study) in `syntax`: dcmtk's own encoders for JPEG
    lossless, JPEG-LS and RLE, pydicom's for JPEG 2000 and deflate."""
    plain = folder / "plain"
    plain.mkdir(parents=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    sources = []
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = plain / f"{index:03d}.dcm"
        if syntax == JPEG2000Lossless:
            ds.compress(JPEG2000Lossless)
        elif syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(target, enforce_file_format=True)
        sources.append(target)
    tools = {JPEGLosslessSV1: "dcmcjpeg", JPEGLSLossless: "dcmcjpls", RLELossless: "dcmcrle"}
    if syntax not in tools:
        return sources
    out = []
    for source in sources:
        target = folder / source.name
        run = subprocess.run(
            [dcmtk_tool(tools[syntax]), str(source), str(target)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        out.append(target)
    return out


def test_compressed_series_from_storescu_reach_the_gateway(gateway: str, tmp_path: Path) -> None:
    """dcmtk's storescu proposes each file's own transfer syntax; the listener accepts them
    and the gateway decodes them (JPEG lossless, JPEG-LS and RLE made by dcmtk itself)."""
    storescu = dcmtk_tool("storescu")
    original = _series(tmp_path / "phantom", seed=21, slices=4)
    syntaxes = (JPEGLosslessSV1, JPEGLSLossless, RLELossless, JPEG2000Lossless,
                DeflatedExplicitVRLittleEndian)  # fmt: skip
    series = {ts: _as_own_series(original, tmp_path / ts, ts) for ts in syntaxes}
    for ts, files in series.items():
        assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    out = tmp_path / "results"
    to_gateway = gateway_forward(
        gateway=gateway, model="jcs2d", out_root=out, timeout=60.0, seg=False, sr=False
    )
    received: dict[str, str] = {}

    def forward(folder: Path, key: str) -> None:
        """Notes the transfer syntax the listener stored the series in, then forwards it."""
        first = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        received[key] = str(first.file_meta.TransferSyntaxUID)
        to_gateway(folder, key)

    keys = {
        ts: series_key(str(pydicom.dcmread(f[0], stop_before_pixels=True).SeriesInstanceUID))
        for ts, f in series.items()
    }
    # storescu proposes one compressed syntax per run, beside the uncompressed ones.
    propose = {JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", RLELossless: "-xr",
               JPEG2000Lossless: "-xv", DeflatedExplicitVRLittleEndian: "-xd"}  # fmt: skip
    with running_listener(tmp_path, forward) as (port, holder):
        for ts, files in series.items():
            sent = subprocess.run(
                [storescu, propose[ts], "-aec", AE_TITLE, "127.0.0.1", str(port), *map(str, files)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, f"{ts}: {sent.stderr}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all((out / key / RESULT_JSON).exists() for key in keys.values()):
                break
            time.sleep(0.2)
    assert sorted(holder["listener"].forwarded) == sorted(keys.values())
    for ts, key in keys.items():
        assert received[key] == ts  # taken as sent, not converted by storescu
        result = json.loads((out / key / RESULT_JSON).read_text())
        assert result["series"]["slices"] == 4, ts


def test_echoscu_is_answered_and_other_calling_ae_titles_are_refused(tmp_path: Path) -> None:
    echoscu, storescu = dcmtk_tool("echoscu"), dcmtk_tool("storescu")
    forwarded: list[str] = []
    security = ListenerSecurity(allowed_calling_aes=("SCANNER1",))
    files = _series(tmp_path / "phantom", seed=22, slices=2)
    with running_listener(tmp_path, lambda folder, key: forwarded.append(key), security) as (
        port,
        _holder,
    ):
        address = ["127.0.0.1", str(port)]
        echo = subprocess.run(
            [echoscu, "-aet", "SCANNER1", "-aec", AE_TITLE, *address],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        for tool, extra in ((echoscu, []), (storescu, [str(f) for f in files])):
            refused = subprocess.run(
                [tool, "-aet", "INTRUDER", "-aec", AE_TITLE, *address, *extra],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert refused.returncode != 0
            assert "Association Rejected" in refused.stdout + refused.stderr
        time.sleep(1.0)
    assert forwarded == [] and not any((tmp_path / "spool").glob("*/*.dcm"))


def test_dicom_over_tls_is_served_and_plain_tcp_is_not(tmp_path: Path) -> None:
    echoscu, storescu = dcmtk_tool("echoscu"), dcmtk_tool("storescu")
    cert, key = self_signed(tmp_path, "listener")
    forwarded: list[str] = []
    files = _series(tmp_path / "phantom", seed=23, slices=2)
    security = ListenerSecurity(tls_cert=cert, tls_key=key)
    with running_listener(tmp_path, lambda folder, key: forwarded.append(key), security) as (
        port,
        _holder,
    ):
        address = ["-aec", AE_TITLE, "127.0.0.1", str(port)]
        # Anonymous TLS on the sender's side, the listener's certificate verified.
        tls = ["+tla", "+cf", str(cert)]
        echo = subprocess.run([echoscu, *tls, *address], capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        sent = subprocess.run(
            [storescu, *tls, *address, *map(str, files)], capture_output=True, text=True, timeout=60
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        plain = subprocess.run([echoscu, *address], capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0
        deadline = time.monotonic() + 20
        while not forwarded and time.monotonic() < deadline:
            time.sleep(0.2)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert forwarded == [series_key(uid)]


def test_every_accepted_transfer_syntax_has_a_decoder_here() -> None:
    """The listener accepts what the gateway decodes: each syntax has a pydicom decoder."""
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        assert get_decoder(syntax).is_available, syntax.name
