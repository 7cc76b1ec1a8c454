"""The one place where scanner-side tools open a gRPC channel to the gateway.

Plaintext, TLS (server certificate checked against a CA), mutual TLS (plus our own certificate
and key) and a bearer token, in any sensible combination. `send`, `watch`, `listen` and `bench`
all come through `open_channel`, so a security option added here reaches every command at once.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from ctjoint.client.errors import ChannelConfigError

# The token a client presents, when no --token-file is given.
ENV_TOKEN: Final = "CTJOINT_TOKEN"
AUTHORIZATION_METADATA: Final = "authorization"
BEARER: Final = "Bearer "


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach the gateway. Defaults: plaintext, no token (a loopback gateway)."""

    tls: bool = False
    # CA bundle that signed the gateway's certificate (None with TLS: the system's roots).
    ca_cert: Path | None = None
    # Our certificate and key, for a gateway that requires client certificates (mTLS).
    client_cert: Path | None = None
    client_key: Path | None = None
    # Overrides the name checked against the gateway's certificate (an address by IP, say).
    server_name: str | None = None
    token_file: Path | None = None
    # Read from $CTJOINT_TOKEN when no token file is given; False ignores the environment.
    token_from_env: bool = True

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ChannelConfigError("--client-cert and --client-key go together")
        uses_tls_files = self.ca_cert or self.client_cert or self.server_name
        if uses_tls_files and not self.tls:
            # A CA or client certificate only means something over TLS: imply it.
            object.__setattr__(self, "tls", True)

    def token(self) -> str | None:
        """The bearer token: the first non-comment line of the token file, else $CTJOINT_TOKEN."""
        if self.token_file is not None:
            data = _read(self.token_file, "token file")
            for line in data.splitlines():
                line = line.strip()
                if line and not line.startswith(b"#"):
                    return _checked(line, str(self.token_file))
            raise ChannelConfigError(f"{self.token_file}: the token file holds no token")
        if self.token_from_env:
            value = os.environ.get(ENV_TOKEN, "").strip()
            return _checked(value.encode("utf-8", "replace"), f"${ENV_TOKEN}") if value else None
        return None


def _checked(token: bytes, where: str) -> str:
    """A token fit for an HTTP/2 header: printable ASCII without spaces (never echoed)."""
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise ChannelConfigError(f"{where}: a token is printable ASCII without spaces")
    return token.decode("ascii")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ChannelConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from err


def is_loopback(address: str) -> bool:
    """True for localhost / 127.x / ::1 / unix-socket targets (a token may then go without TLS)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith("[") and "]" in address:
        host = address[1 : address.index("]")]
    elif address.count(":") == 1:
        host = address.split(":", 1)[0]
    else:
        host = address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call on the channel.

    An interceptor rather than call credentials: gRPC refuses call credentials on a plaintext
    channel, and a loopback gateway with a token but no TLS is a legitimate set-up.
    """

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_METADATA, BEARER + token)

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
        credentials: grpc.CallCredentials | None,
        wait_for_ready: bool | None,
        compression: grpc.Compression | None,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel_credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    """TLS credentials: the CA to trust, and our certificate chain for mTLS."""
    root = _read(security.ca_cert, "CA certificate") if security.ca_cert else None
    key = _read(security.client_key, "client key") if security.client_key else None
    chain = _read(security.client_cert, "client certificate") if security.client_cert else None
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )


def open_channel(
    address: str,
    security: ChannelSecurity | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to the gateway at HOST:PORT with the security asked for.

    Refuses to send a bearer token in clear text to anything but a loopback address.
    """
    security = security or ChannelSecurity()
    token = security.token()
    all_options = list(options)
    if security.tls:
        if security.server_name:
            all_options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, channel_credentials(security), all_options)
    else:
        if token is not None and not is_loopback(address):
            raise ChannelConfigError(
                f"a bearer token would travel in clear text to {address}: use --tls "
                "(with --ca-cert) for a gateway that is not on this machine"
            )
        channel = grpc.insecure_channel(address, all_options)
    if token is not None:
        return grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


__all__ = [
    "ENV_TOKEN",
    "ChannelConfigError",
    "ChannelSecurity",
    "channel_credentials",
    "is_loopback",
    "open_channel",
]
