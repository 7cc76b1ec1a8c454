"""Who may talk to the gateway: TLS / mutual-TLS server credentials and bearer tokens.

Tokens come from a file (one per line, `#` comments) and/or $CTJOINT_GATEWAY_TOKENS (separated
by commas or whitespace), never from the command line (it would show in `ps`). A call must
carry `authorization: Bearer <token>`; the token is compared in constant time with every
accepted one. A refused call gets UNAUTHENTICATED with a message that never repeats what was
sent. The standard health service stays open so probes and load balancers need no secret: it
says SERVING or not, nothing more. Reflection and the scan service need the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio

from ctjoint.gateway.errors import CtJointError
from ctjoint.gateway.logging_setup import RateLimit, bounded_text

log = logging.getLogger(__name__)

ENV_TOKENS: Final = "CTJOINT_GATEWAY_TOKENS"
AUTHORIZATION_METADATA: Final = "authorization"
# Methods anyone may call: health answers only SERVING / NOT_SERVING.
OPEN_METHOD_PREFIXES: Final = ("/grpc.health.v1.Health/",)
# Refusals are logged as one line per this many seconds, with the count of the others.
REFUSAL_LOG_INTERVAL_S: Final = 1.0
# Shorter tokens are guessable; refuse to start with one.
MIN_TOKEN_CHARS: Final = 16
_TOKEN_RE: Final = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces (HTTP/2 header)


class AuthConfigError(CtJointError):
    """A TLS file or token source that cannot be used (the gateway refuses to start)."""


@dataclass(frozen=True)
class TlsConfig:
    """The gateway's certificate and key; with `client_ca`, client certificates are required
    and must chain to that CA (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        chain = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        for path, data, marker, what in (
            (self.cert, chain, b"-----BEGIN CERTIFICATE-----", "certificate"),
            (self.key, key, b"PRIVATE KEY-----", "private key"),
        ):
            if marker not in data:
                raise AuthConfigError(f"{path}: not a PEM {what}")
        root = _read(self.client_ca, "client CA certificate") if self.client_ca else None
        if root is not None and b"-----BEGIN CERTIFICATE-----" not in root:
            raise AuthConfigError(f"{self.client_ca}: not a PEM certificate")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=root, require_client_auth=root is not None
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise AuthConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from err


def load_tokens(token_file: Path | None = None, *, env: bool = True) -> tuple[str, ...]:
    """Accepted tokens from `token_file` and (when `env`) $CTJOINT_GATEWAY_TOKENS.

    Errors name the file and line, never the token.
    """
    tokens: list[str] = []
    if token_file is not None:
        text = _read(token_file, "token file").decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            _check_token(line, f"{token_file} line {number}")
            tokens.append(line)
        if not tokens:
            raise AuthConfigError(f"{token_file}: the token file holds no token")
        _warn_if_readable_by_others(token_file)
    if env:
        for index, value in enumerate(os.environ.get(ENV_TOKENS, "").replace(",", " ").split()):
            _check_token(value, f"${ENV_TOKENS} entry {index + 1}")
            tokens.append(value)
    return tuple(dict.fromkeys(tokens))


def _warn_if_readable_by_others(path: Path) -> None:
    """Tokens are secrets: a file others may read gives them away (warned, not refused, so a
    secret mounted by an orchestrator with its own permissions still works)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "%s: the token file is readable by others (mode %o); chmod 600 it", path, mode & 0o777
        )


def _check_token(token: str, where: str) -> None:
    if not _TOKEN_RE.match(token):
        raise AuthConfigError(f"{where}: a token is printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise AuthConfigError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps even the accepted tokens' lengths out of the timing.
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health without a valid bearer token (UNAUTHENTICATED)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise AuthConfigError("token authentication needs at least one token")
        self._digests = tuple(_digest(t) for t in tokens)
        # A client retrying without a token must not write a log line per call.
        self._log_limit = RateLimit(REFUSAL_LOG_INTERVAL_S)

    def accepts(self, metadata: Sequence[Any] | None) -> str | None:
        """None when the call may proceed, else why not (for the log; never the token)."""
        values = [v for k, v in (metadata or ()) if k == AUTHORIZATION_METADATA]
        if not values:
            return "no authorization metadata"
        if len(values) > 1 or not isinstance(values[0], str):
            return "malformed authorization metadata"
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "authorization is not a bearer token"
        candidate = _digest(presented.strip())
        matched = False
        for accepted in self._digests:  # no early exit: every token costs the same
            matched |= hmac.compare_digest(candidate, accepted)
        return None if matched else "unknown token"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        reason = self.accepts(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        skipped = self._log_limit.allow()
        if skipped is not None:
            # The method name is the caller's text: bounded and escaped.
            log.warning(
                "refused %s: %s (and %d more refusals since the last line)",
                bounded_text(method, 128),
                reason,
                skipped,
            )
        # Unknown methods too: without a token, a caller learns nothing, not even which
        # methods exist (UNIMPLEMENTED would tell it).
        return _denying(handler) if handler is not None else _DENY_ANY


_MESSAGE: Final = "a valid bearer token is required (metadata 'authorization: Bearer <token>')"


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED at once."""
    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attribute, make in kinds.items():
        if getattr(handler, attribute) is not None:
            return make(
                _deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


# For a method this server does not have: any request (raw bytes), answered UNAUTHENTICATED.
_DENY_ANY: Final = grpc.stream_stream_rpc_method_handler(_deny)


__all__ = ["ENV_TOKENS", "AuthConfigError", "TlsConfig", "TokenAuthInterceptor", "load_tokens"]
