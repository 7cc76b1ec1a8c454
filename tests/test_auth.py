"""Access control on real gateway processes: TLS, mutual TLS and bearer tokens, over gRPC and
through `ctjoint send`. Certificates are made at test time (a throwaway CA per module)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import figures
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gateway_process import GatewayProcess, file_bytes, requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctjoint.client.channel import (
    ENV_TOKEN,
    ChannelConfigError,
    ChannelSecurity,
    is_loopback,
    open_channel,
)
from ctjoint.gateway.auth import (
    ENV_TOKENS,
    AuthConfigError,
    TlsConfig,
    TokenAuthInterceptor,
    load_tokens,
)
from ctjoint.v1 import scan_pb2, scan_pb2_grpc

TOKEN = "tok-" + "a1b2c3d4e5f6a7b8c9d0"
OTHER_TOKEN = "tok-" + "ffffffffffffffffffff"
ONE_DAY = datetime.timedelta(days=1)
# One worker for the module: its gateways (or tritonserver) start once, not once per worker.
pytestmark = pytest.mark.xdist_group("gateway-auth")


@dataclass(frozen=True)
class Pki:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1/localhost, a client
    certificate from that CA and one from a CA the gateway does not trust."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1], hashes.SHA256()), key


def _write(folder: Path, stem: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]):
    cert, key = pair
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca("ctjoint test CA")
    rogue_ca = _ca("somebody else's CA")
    ca_path, _ = _write(folder, "ca", ca)
    server_cert, server_key = _write(folder, "server", _leaf("gateway", ca, server=True))
    client_cert, client_key = _write(folder, "client", _leaf("scanner-1", ca, server=False))
    rogue_cert, rogue_key = _write(folder, "rogue", _leaf("scanner-x", rogue_ca, server=False))
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


class SecureGatewayProcess(GatewayProcess):
    """A gateway whose health is checked over the channel the test's clients will use."""

    def __init__(self, *args: object, security: ChannelSecurity, **kwargs: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.security = security

    def health(self, service: str = "") -> int | None:
        with open_channel(self.address, self.security) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return None


@pytest.fixture(scope="module")
def tls_gateway(
    contract_model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureGatewayProcess]:
    """TLS (no client certificate needed) and a bearer token from a file."""
    folder = tmp_path_factory.mktemp("tls-gw")
    tokens = folder / "tokens"
    tokens.write_text(f"# scanners\n{OTHER_TOKEN}\n\n{TOKEN}\n")
    process = SecureGatewayProcess(
        contract_model_dir,
        folder / "gateway.log",
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--token-file", str(tokens), "--log-level", "DEBUG"),
        security=ChannelSecurity(ca_cert=pki.ca, token_from_env=False),
    )
    started = time.perf_counter()
    process.start()
    figures.record("auth: TLS+token gateway start", seconds=round(time.perf_counter() - started, 2))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mtls_gateway(
    contract_model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureGatewayProcess]:
    """Mutual TLS: client certificates required and checked against the test CA."""
    folder = tmp_path_factory.mktemp("mtls-gw")
    process = SecureGatewayProcess(
        contract_model_dir,
        folder / "gateway.log",
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--client-ca", str(pki.ca)),
        security=ChannelSecurity(
            ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
        ),
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def token_gateway(
    contract_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Plaintext on loopback with a token from the environment (no TLS)."""
    folder = tmp_path_factory.mktemp("token-gw")
    os.environ[ENV_TOKENS] = TOKEN
    try:
        process = GatewayProcess(contract_model_dir, folder / "gateway.log")
        process.start()
    finally:
        del os.environ[ENV_TOKENS]
    yield process
    process.stop()


def _model_info(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> object:
    stub = scan_pb2_grpc.ScanServiceStub(channel)
    return stub.GetModelInfo(scan_pb2.GetModelInfoRequest(), timeout=10, metadata=metadata)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code()  # type: ignore[no-any-return,attr-defined]


# --- TLS --------------------------------------------------------------------------------------


def test_tls_with_the_token_analyses_a_scan(
    tls_gateway: SecureGatewayProcess, ct_series_dir: Path
) -> None:
    security = ChannelSecurity(ca_cert=tls_gateway.security.ca_cert, token_from_env=False)
    with open_channel(tls_gateway.address, security) as channel:
        stub = scan_pb2_grpc.ScanServiceStub(channel)
        answer = stub.AnalyzeScan(
            requests(file_bytes(sorted(ct_series_dir.iterdir()))),
            timeout=60,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
    assert answer.label


def test_a_plaintext_client_is_refused_by_a_tls_gateway(tls_gateway: SecureGatewayProcess) -> None:
    with grpc.insecure_channel(tls_gateway.address) as channel:
        code = _code(lambda: _model_info(channel, (("authorization", f"Bearer {TOKEN}"),)))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_client_not_trusting_the_gateways_ca_is_refused(
    tls_gateway: SecureGatewayProcess, pki: Pki
) -> None:
    # The rogue client certificate is not a CA: verification of the gateway must fail.
    wrong = ChannelSecurity(ca_cert=pki.rogue_cert, token_from_env=False)
    with open_channel(tls_gateway.address, wrong) as channel:
        assert _code(lambda: _model_info(channel)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {OTHER_TOKEN[:-1]}x", "Bearer ", f"Basic {TOKEN}", TOKEN],
    ids=["missing", "wrong", "empty", "not-bearer", "no-scheme"],
)
def test_a_missing_or_wrong_token_is_unauthenticated_without_echo(
    tls_gateway: SecureGatewayProcess, authorization: str | None
) -> None:
    metadata = () if authorization is None else (("authorization", authorization),)
    with open_channel(tls_gateway.address, tls_gateway.security) as channel:
        stub = scan_pb2_grpc.ScanServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModelInfo(scan_pb2.GetModelInfoRequest(), timeout=10, metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    details = caught.value.details() or ""
    assert "bearer token is required" in details
    for secret in (TOKEN, OTHER_TOKEN, OTHER_TOKEN[:-1]):
        assert secret not in details
        assert secret not in tls_gateway.log()


def test_a_scan_stream_without_a_token_is_unauthenticated(
    tls_gateway: SecureGatewayProcess, ct_series_dir: Path
) -> None:
    with open_channel(tls_gateway.address, tls_gateway.security) as channel:
        stub = scan_pb2_grpc.ScanServiceStub(channel)
        events = stub.AnalyzeScanWithProgress(
            requests(file_bytes(sorted(ct_series_dir.iterdir()))), timeout=30
        )
        assert _code(lambda: list(events)) == grpc.StatusCode.UNAUTHENTICATED


def test_health_answers_without_a_token_reflection_does_not(
    tls_gateway: SecureGatewayProcess,
) -> None:
    assert tls_gateway.health() == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with open_channel(tls_gateway.address, tls_gateway.security) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        assert _code(lambda: list(replies)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_certificate_name_can_be_overridden_and_is_checked(
    tls_gateway: SecureGatewayProcess, pki: Pki
) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    named = ChannelSecurity(ca_cert=pki.ca, server_name="localhost", token_from_env=False)
    with open_channel(tls_gateway.address, named) as channel:
        assert _model_info(channel, metadata)
    wrong = ChannelSecurity(ca_cert=pki.ca, server_name="gateway.invalid", token_from_env=False)
    with open_channel(tls_gateway.address, wrong) as channel:
        assert _code(lambda: _model_info(channel, metadata)) == grpc.StatusCode.UNAVAILABLE


# --- mutual TLS -------------------------------------------------------------------------------


def test_mtls_with_a_client_certificate_is_served(mtls_gateway: SecureGatewayProcess) -> None:
    with open_channel(mtls_gateway.address, mtls_gateway.security) as channel:
        info = _model_info(channel)
    assert info.models  # type: ignore[attr-defined]


def test_mtls_refuses_a_client_without_a_certificate(
    mtls_gateway: SecureGatewayProcess, pki: Pki
) -> None:
    with open_channel(mtls_gateway.address, ChannelSecurity(ca_cert=pki.ca)) as channel:
        assert _code(lambda: _model_info(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(
    mtls_gateway: SecureGatewayProcess, pki: Pki
) -> None:
    rogue = ChannelSecurity(ca_cert=pki.ca, client_cert=pki.rogue_cert, client_key=pki.rogue_key)
    with open_channel(mtls_gateway.address, rogue) as channel:
        assert _code(lambda: _model_info(channel)) == grpc.StatusCode.UNAVAILABLE


# --- the CLI, each mode -----------------------------------------------------------------------


def _send(series: Path, address: str, *args: str, token: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != ENV_TOKEN}
    if token is not None:
        env[ENV_TOKEN] = token
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ctjoint.cli", "send", str(series), "--gateway", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "COLUMNS": "200"},
    )
    return done, time.perf_counter() - started


def test_cli_send_over_tls_with_a_token_file(
    tls_gateway: SecureGatewayProcess, pki: Pki, ct_series_dir: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    done, seconds = _send(
        ct_series_dir,
        tls_gateway.address,
        *("--ca-cert", str(pki.ca), "--token-file", str(token_file), "--out", str(tmp_path)),
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "result.json").is_file()
    figures.record("auth: ctjoint send over TLS + token", seconds=round(seconds, 2))


def test_cli_send_with_a_wrong_token_says_unauthenticated(
    tls_gateway: SecureGatewayProcess, pki: Pki, ct_series_dir: Path
) -> None:
    done, _ = _send(
        ct_series_dir, tls_gateway.address, "--ca-cert", str(pki.ca), token=OTHER_TOKEN + "z"
    )
    assert done.returncode == 1
    assert "UNAUTHENTICATED" in done.stderr
    assert OTHER_TOKEN not in done.stderr + done.stdout


def test_cli_send_with_mtls(
    mtls_gateway: SecureGatewayProcess, pki: Pki, ct_series_dir: Path
) -> None:
    done, _ = _send(
        ct_series_dir,
        mtls_gateway.address,
        *("--ca-cert", str(pki.ca)),
        *("--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)),
    )
    assert done.returncode == 0, done.stderr


def test_cli_send_without_a_client_certificate_fails_under_mtls(
    mtls_gateway: SecureGatewayProcess, pki: Pki, ct_series_dir: Path
) -> None:
    done, _ = _send(ct_series_dir, mtls_gateway.address, "--ca-cert", str(pki.ca), "--retries", "0")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


def test_cli_send_with_a_token_from_the_environment_on_loopback(
    token_gateway: GatewayProcess, ct_series_dir: Path
) -> None:
    done, _ = _send(ct_series_dir, token_gateway.address, token=TOKEN)
    assert done.returncode == 0, done.stderr
    refused, _ = _send(ct_series_dir, token_gateway.address)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr


def test_cli_watch_stops_at_the_first_unauthenticated_answer(
    token_gateway: GatewayProcess, ct_series_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "incoming"
    for name in ("a", "b"):
        shutil.copytree(ct_series_dir, root / name)
    env = {k: v for k, v in os.environ.items() if k != ENV_TOKEN}
    env[ENV_TOKEN] = OTHER_TOKEN
    command = [sys.executable, "-m", "ctjoint.cli", "watch", str(root), "--once"]
    command += ["--gateway", token_gateway.address, "--settle", "0.2", "--poll", "0.1"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "UNAUTHENTICATED" in done.stderr
    assert done.stdout.count("sending ") == 1  # the second series was not tried


def test_cli_bench_against_a_tls_gateway_with_a_token(
    tls_gateway: SecureGatewayProcess, pki: Pki, ct_series_dir: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["bench", "--gateway", tls_gateway.address, "--series", str(ct_series_dir)]
    args += ["--concurrency", "1", "--scans", "1", "--out", str(tmp_path / "bench")]
    secure = ["--ca-cert", str(pki.ca), "--token-file", str(token_file)]
    run = [sys.executable, "-m", "ctjoint.cli"]
    env = {k: v for k, v in os.environ.items() if k != ENV_TOKEN}
    done = subprocess.run([*run, *args, *secure], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bench" / "bench.json").is_file()
    refused = subprocess.run(
        [*run, *args, "--ca-cert", str(pki.ca)], capture_output=True, text=True, env=env
    )
    assert refused.returncode != 0
    assert "UNAUTHENTICATED" in refused.stdout + refused.stderr


# --- units: token sources and the client's refusals (no sockets) ------------------------------


def test_tokens_come_from_a_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n  {TOKEN}  \n")
    monkeypatch.setenv(ENV_TOKENS, f"{OTHER_TOKEN}, {TOKEN}")
    assert load_tokens(path) == (TOKEN, OTHER_TOKEN)
    assert load_tokens(path, env=False) == (TOKEN,)


def test_a_short_token_is_refused_naming_the_line_not_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\nshort-secret\n")
    with pytest.raises(AuthConfigError, match=r"tokens line 2: a token needs at least 16") as err:
        load_tokens(path, env=False)
    assert "short-secret" not in str(err.value)


def test_the_interceptor_accepts_only_a_known_bearer_token() -> None:
    auth = TokenAuthInterceptor([TOKEN, OTHER_TOKEN])
    assert auth.accepts((("authorization", f"Bearer {TOKEN}"),)) is None
    assert auth.accepts((("authorization", f"bearer {OTHER_TOKEN}"),)) is None
    assert auth.accepts((("authorization", f"Bearer {TOKEN}x"),)) == "unknown token"
    assert auth.accepts(()) == "no authorization metadata"
    doubled = (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}"))
    assert auth.accepts(doubled) == "malformed authorization metadata"


def test_the_client_never_sends_a_token_in_clear_text_off_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    with pytest.raises(ChannelConfigError, match=r"clear text to gateway\.example:50051"):
        open_channel("gateway.example:50051")
    assert is_loopback("[::1]:50051") and is_loopback("localhost:1")
    assert not is_loopback("10.1.2.3:50051")


def test_a_client_key_without_its_certificate_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ChannelConfigError, match="--client-cert and --client-key go together"):
        ChannelSecurity(client_key=tmp_path / "k.pem")


def test_the_container_health_check_speaks_tls_and_mtls(
    tls_gateway: SecureGatewayProcess,
    mtls_gateway: SecureGatewayProcess,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "ctjoint_healthcheck", Path(__file__).parents[1] / "deploy" / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    monkeypatch.setenv("CTJOINT_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("CTJOINT_TLS_CA", str(pki.ca))
    assert healthcheck.gateway_serving(tls_gateway.address) is None
    # Under mTLS the check needs a client certificate of its own.
    refused = healthcheck.gateway_serving(mtls_gateway.address)
    assert refused is not None and "UNAVAILABLE" in refused
    monkeypatch.setenv("CTJOINT_HEALTH_CLIENT_CERT", str(pki.client_cert))
    monkeypatch.setenv("CTJOINT_HEALTH_CLIENT_KEY", str(pki.client_key))
    assert healthcheck.gateway_serving(mtls_gateway.address) is None


def test_tls_files_that_are_not_pem_are_refused_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match=r"server\.key: not a PEM certificate"):
        TlsConfig(cert=pki.server_key, key=pki.server_key).credentials()
    with pytest.raises(AuthConfigError, match=r"ca\.crt: not a PEM private key"):
        TlsConfig(cert=pki.server_cert, key=pki.ca).credentials()
    with pytest.raises(AuthConfigError, match=r"absent\.pem: cannot read the TLS certificate"):
        TlsConfig(cert=tmp_path / "absent.pem", key=pki.server_key).credentials()


def test_gateway_serve_with_a_missing_certificate_is_one_clean_error(tmp_path: Path) -> None:
    tls = ["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "none.key")]
    done = subprocess.run(
        [sys.executable, "-m", "ctjoint.cli", "gateway", "serve", "--port", "0", *tls],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "none.pem: cannot read the TLS certificate" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_token_file_with_non_ascii_is_refused_without_echo(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes("# ours\nsecr\u00e9t-token-value-1234\n".encode())
    with pytest.raises(ChannelConfigError, match="printable ASCII") as err:
        ChannelSecurity(token_file=path).token()
    assert "secr" not in str(err.value)
    path.write_text(f"# ours\n\n  {TOKEN}\n")
    assert ChannelSecurity(token_file=path).token() == TOKEN


# --- abuse: unknown methods, repeated refusals, readable token files (issue 21) ---------------


def _unknown_method(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    call = channel.unary_unary("/ctjoint.v1.ScanService/NoSuchMethod")
    return call(b"", timeout=10, metadata=metadata)  # type: ignore[no-any-return]


def test_an_unknown_method_without_a_token_is_unauthenticated(
    token_gateway: GatewayProcess,
) -> None:
    with grpc.insecure_channel(token_gateway.address) as channel:
        assert _code(lambda: _unknown_method(channel)) == grpc.StatusCode.UNAUTHENTICATED
        with_token = (("authorization", f"Bearer {TOKEN}"),)
        assert _code(lambda: _unknown_method(channel, with_token)) == (
            grpc.StatusCode.UNIMPLEMENTED
        )


def test_repeated_refusals_are_rate_limited_in_the_log(token_gateway: GatewayProcess) -> None:
    time.sleep(1.1)  # past the interval of any refusal logged by an earlier test
    before = token_gateway.log().count("refused /")
    with grpc.insecure_channel(token_gateway.address) as channel:
        for _ in range(50):
            assert _code(lambda: _model_info(channel)) == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(0.2)
    logged = token_gateway.log().count("refused /") - before
    assert 1 <= logged <= 3  # 50 calls in well under 3 s: one line a second at most


def test_a_token_file_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="ctjoint.gateway.auth"):
        assert load_tokens(path, env=False) == (TOKEN,)
    assert caplog.records == []
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="ctjoint.gateway.auth"):
        assert load_tokens(path, env=False) == (TOKEN,)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: the token file is readable by others (mode 644); chmod 600 it"
    ]
