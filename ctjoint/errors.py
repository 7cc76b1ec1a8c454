"""The root of every error the project raises on purpose, in neutral ground so that the
gateway, the client and export each derive their own from it without importing one another.
The gateway maps its subclasses to gRPC status codes (gateway/interceptors.py); the CLI prints
any of them as one line."""

from __future__ import annotations


class CtJointError(Exception):
    """Root of every error the project raises on purpose."""


__all__ = ["CtJointError"]
