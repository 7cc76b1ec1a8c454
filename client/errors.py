"""Every error of the scanner-side client, one subclass per cause under one root (itself under
the project's root, ctjoint/errors.py); the CLI turns them into a line and an exit status."""

from __future__ import annotations

from typing import Final

from ctjoint.errors import CtJointError

# Exit status: the gateway refused or failed the scan / the problem is on this side.
EXIT_GATEWAY: Final = 1
EXIT_LOCAL: Final = 2


class ClientError(CtJointError):
    """Root of the client's errors."""


class ChannelConfigError(ClientError, ValueError):
    """A security option that cannot work (missing file, key without certificate, ...)."""


class ResultFormatError(ClientError, ValueError):
    """The gateway's answer does not decode (a version mismatch, or a corrupted message)."""


class SendError(ClientError):
    """A scan that did not come back; `code` is the gRPC status name when the gateway said so."""

    def __init__(self, message: str, *, code: str | None = None, exit_code: int = EXIT_GATEWAY):
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code


__all__ = [
    "EXIT_GATEWAY",
    "EXIT_LOCAL",
    "ChannelConfigError",
    "ClientError",
    "ResultFormatError",
    "SendError",
]
