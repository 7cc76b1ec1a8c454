"""What keeps idle, slow or numerous clients from holding the gateway (docs/security.md).

A scan holds one of a few slots from admission to answer, so a client that opens a scan and
goes silent would hold it for as long as its connection lives. Three guards: an idle timeout
between a scan's messages (the slot is freed and the scan ends with DEADLINE_EXCEEDED), a
limit on scans in progress per peer address, and gRPC's own connection settings (keepalive,
maximum idle and age of a connection, a handshake timeout and a connection cap), so that dead
or silent connections are closed and a flood of them cannot take every file descriptor.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ctjoint.gateway.errors import CtJointError, LimitExceededError

log = logging.getLogger(__name__)

# A scanner sends a series' files back to back (milliseconds apart); a PACS forwarding a study
# may pause for a few seconds between series. 30 s of silence is a client that is gone.
DEFAULT_IDLE_TIMEOUT_S: Final = 30.0
# Connections: pinged after 60 s without traffic, closed when the ping is not answered within
# 20 s, when idle (no call) for 5 minutes, or after 2 hours (then given 60 s to finish calls).
DEFAULT_KEEPALIVE_S: Final = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_S: Final = 20.0
DEFAULT_MAX_CONNECTION_IDLE_S: Final = 300.0
DEFAULT_MAX_CONNECTION_AGE_S: Final = 7200.0
DEFAULT_MAX_CONNECTION_AGE_GRACE_S: Final = 60.0
# A TCP connection that has not finished its HTTP/2 (and TLS) handshake in 5 s is closed.
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 5.0
# Connections the scan port accepts at once; more are closed as they arrive. Far above what a
# hospital's senders open, far below the file descriptors the process gets (see fd_headroom).
DEFAULT_MAX_CONNECTIONS: Final = 1000
# File descriptors kept for everything but the scan port's connections (health port, metrics,
# decode and scan workers, model files, logs).
FD_RESERVE: Final = 512
_WANTED_FDS: Final = 65536

_T = TypeVar("_T")


class IdleTimeoutError(CtJointError, TimeoutError):
    """A scan's client sent nothing for longer than the idle timeout (DEADLINE_EXCEEDED)."""


class PeerLimitError(LimitExceededError):
    """A peer already has as many scans in progress as it may (RESOURCE_EXHAUSTED; retry)."""


@dataclass(frozen=True)
class ClientGuards:
    """The gateway's settings against idle, slow and numerous clients.

    `max_scans_per_peer` None: a peer may use every slot (one sender, a DIMSE listener or a
    PACS, often forwards every scan of a site from one address, so the default does not limit
    it; set it where many senders share the gateway).
    """

    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_scans_per_peer: int | None = None
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    max_connection_idle_s: float = DEFAULT_MAX_CONNECTION_IDLE_S
    max_connection_age_s: float = DEFAULT_MAX_CONNECTION_AGE_S
    max_connection_age_grace_s: float = DEFAULT_MAX_CONNECTION_AGE_GRACE_S
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in (
            "idle_timeout_s",
            "keepalive_s",
            "keepalive_timeout_s",
            "max_connection_idle_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "handshake_timeout_s",
        ):
            value = float(getattr(self, name))
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
            object.__setattr__(self, name, value)
        if self.max_scans_per_peer is not None and self.max_scans_per_peer < 1:
            raise ValueError(
                f"max_scans_per_peer must be at least 1, got {self.max_scans_per_peer}"
            )
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")

    def grpc_options(self, max_connections: int | None = None) -> list[tuple[str, Any]]:
        """The grpc.aio server options these settings stand for (`max_connections`: the cap
        actually applied, see `fd_headroom`)."""

        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        return [
            ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            # Clients may ping idle connections, but not more often than every 10 s.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)),
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_timeout_s)),
            ("grpc.max_allowed_incoming_connections", max_connections or self.max_connections),
        ]


def fd_headroom(wanted_connections: int) -> int:
    """Raise this process's open-file limit towards what the connection cap needs, and return
    the cap that leaves FD_RESERVE descriptors free (lower than asked when the limit is)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, _WANTED_FDS)) if hard != resource.RLIM_INFINITY else _WANTED_FDS
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    cap = max(1, min(wanted_connections, soft - FD_RESERVE))
    if cap < wanted_connections:
        log.warning(
            "open-file limit %d: connections to the scan port capped at %d (asked %d)",
            soft,
            cap,
            wanted_connections,
        )
    return cap


async def idle_bounded(messages: AsyncIterator[_T], idle_timeout_s: float) -> AsyncIterator[_T]:
    """`messages`, ended with IdleTimeoutError when the next one takes longer than
    `idle_timeout_s` to come.

    asyncio.timeout, not wait_for: when a client cancels, gRPC ends the request stream and
    cancels the RPC's task at the same moment, and Python 3.11's wait_for then returns the
    stream's end and drops the cancellation. The scan went on as a complete, empty one, and
    its slot stayed taken until its analysis worker answered that (seconds for a worker at
    niceness 10 on a busy box, up to --scan-wall-seconds for a wedged one)."""
    stream = aiter(messages)
    count = 0
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                message = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            where = "its first message" if count == 0 else f"message {count + 1}"
            raise IdleTimeoutError(
                f"no {where} within {idle_timeout_s:g} s (the gateway's idle timeout between "
                "a scan's messages); the scan is ended and its slot freed"
            ) from None
        count += 1
        yield message


class PeerScans:
    """Scans in progress per peer address (the host, whatever port it calls from).

    Used from the event loop only, like ScanSlots.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()

    def in_progress(self, peer: str) -> int:
        return self._counts[peer_host(peer)]

    @contextmanager
    def hold(self, peer: str) -> Iterator[None]:
        """Count one scan of `peer` while it runs; PeerLimitError when it has its limit."""
        host = peer_host(peer)
        if self.limit is not None and self._counts[host] >= self.limit:
            raise PeerLimitError(
                f"this client already has {self._counts[host]} scans in progress, the limit "
                f"per client is {self.limit}; retry when one is done"
            )
        self._counts[host] += 1
        try:
            yield
        finally:
            self._counts[host] -= 1
            if self._counts[host] <= 0:
                del self._counts[host]


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ('ipv4:10.0.0.5:41234' -> 'ipv4:10.0.0.5',
    'ipv6:[::1]:5000' -> 'ipv6:[::1]'); a Unix socket peer is kept whole."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer
