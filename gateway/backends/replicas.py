"""Several Triton replicas behind one backend: which endpoints there are, which are healthy,
and which one takes the next request.

`--triton-url` may name several HOST:PORT endpoints (repeated or comma-separated), and a
name that resolves to several addresses (a Kubernetes headless Service) counts once per
address. A replica that fails its health check or answers UNAVAILABLE is ejected and probed
again after a growing back-off; requests go to the healthy replica with the fewest requests
in flight. This module holds the bookkeeping only; the Triton backend does the talking.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

PROBE_FIRST_S: Final = 0.5
# An ejected replica is probed again after 0.5 s, 1 s, then every 2 s: a restarted Triton is
# back in rotation within ~2 s of being ready, and probing a dead address costs next to nothing.
PROBE_MAX_S: Final = 2.0


@dataclass(frozen=True)
class Endpoint:
    """One HOST:PORT as the operator wrote it (HOST may be a name, an IPv4 or an [IPv6])."""

    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", self.host.strip().strip("[]"))
        if not self.host:
            raise ValueError("a Triton endpoint needs a host")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"port {self.port} of {self.host!r} is out of range")
        object.__setattr__(self, "port", int(self.port))

    @property
    def target(self) -> str:
        """The gRPC target: IPv6 literals in brackets."""
        return _target(self.host, self.port)

    @property
    def is_literal(self) -> bool:
        """True for an IP address, which needs no DNS."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(spec: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """Endpoints from one string or several, each possibly comma-separated; duplicates dropped.

    Only gRPC HOST:PORT is accepted: an http:// URL here is a configuration mistake (Triton's
    HTTP port) that would otherwise surface later as a confusing connection error.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    endpoints: list[Endpoint] = []
    for item in items:
        for part in item.split(","):
            text = part.strip()
            if not text:
                continue
            if "://" in text:
                raise ValueError(f"the Triton gRPC endpoint must be HOST:PORT, got {text!r}")
            host, sep, port = text.rpartition(":")
            if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
                raise ValueError(f"the Triton gRPC endpoint must be HOST:PORT, got {text!r}")
            endpoint = Endpoint(host, int(port))
            if endpoint not in endpoints:
                endpoints.append(endpoint)
    if not endpoints:
        raise ValueError(f"no Triton gRPC endpoint in {spec!r}; expected HOST:PORT[,HOST:PORT]")
    return tuple(endpoints)


async def resolve(endpoint: Endpoint) -> tuple[str, ...]:
    """The gRPC targets behind an endpoint: itself for an IP, else one per DNS address.

    IPv4 answers win when there are any, so `localhost` (127.0.0.1 and ::1) is one replica,
    not a second one that a server bound to 0.0.0.0 would never answer on.
    """
    if endpoint.is_literal:
        return (endpoint.target,)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError:
        return ()
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})
    return tuple(_target(host, endpoint.port) for host in (v4 or v6))


@dataclass
class Replica:
    """One Triton server as the gateway sees it. Mutable: the pool keeps it up to date."""

    address: str
    endpoint: str
    healthy: bool = False
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    ejections: int = 0
    reason: str = "not checked yet"
    next_probe: float = 0.0
    backoff_s: float = PROBE_FIRST_S
    # Set when it failed in a way its health check cannot see (a dead python stub): it then
    # has to answer an inference before it is healthy again.
    verify_inference: bool = False

    def eject(self, reason: str, now: float, first_s: float, max_s: float) -> None:
        """Take it out of rotation; probe again after a back-off that doubles while it fails."""
        if self.healthy:
            self.ejections += 1
            self.backoff_s = first_s
        else:
            self.backoff_s = min(max(self.backoff_s * 2, first_s), max_s)
        self.healthy = False
        self.reason = reason
        self.next_probe = now + self.backoff_s

    def restore(self, first_s: float) -> None:
        self.healthy = True
        self.reason = ""
        self.backoff_s = first_s
        self.next_probe = 0.0

    def probe_due(self, now: float) -> bool:
        return not self.healthy and now >= self.next_probe


@dataclass(frozen=True)
class ReplicaStats:
    """A snapshot of one replica's counters, for logs, metrics and tests."""

    address: str
    endpoint: str
    healthy: bool
    in_flight: int
    requests: int
    failures: int
    ejections: int
    reason: str


@runtime_checkable
class Replicated(Protocol):
    """A backend that spreads work over replicas (the Triton backend), as metrics see it."""

    @property
    def retried_slices(self) -> int: ...

    def replica_stats(self) -> tuple[ReplicaStats, ...]: ...


@dataclass(frozen=True)
class ReplicaChange:
    """A replica went out of rotation (`healthy` False) or came back, as one process's backend
    saw it. The gateway's analysis workers each have a backend of their own: a failure only an
    inference shows (a dead python stub) is seen by the worker that ran it, and goes to the
    serving process (health, admission, metrics) and to the other workers through these."""

    address: str
    healthy: bool
    reason: str = ""
    # It must answer a test inference before it is healthy again (a dead python stub).
    verify_inference: bool = False


@runtime_checkable
class SharedReplicaHealth(Protocol):
    """A replicated backend that tells of its replicas' changes and heeds others' reports."""

    def on_replica_change(self, listener: Callable[[ReplicaChange], None] | None) -> None:
        """Call `listener` whenever this backend itself takes a replica out or back."""
        ...

    def replica_changed(self, change: ReplicaChange) -> None:
        """Another process's backend saw `change`: eject at once, or probe now."""
        ...


class ReplicaPool:
    """The replicas currently known, and the choice of one for each request."""

    def __init__(self, *, probe_first_s: float = PROBE_FIRST_S, probe_max_s: float = PROBE_MAX_S):
        if probe_first_s <= 0 or probe_max_s < probe_first_s:
            raise ValueError("probe back-off must be positive and its maximum at least its start")
        self.probe_first_s = probe_first_s
        self.probe_max_s = probe_max_s
        self._replicas: dict[str, Replica] = {}
        # Breaks ties between equally loaded replicas in turn, so an idle pool still alternates.
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def replicas(self) -> tuple[Replica, ...]:
        return tuple(self._replicas.values())

    @property
    def healthy_count(self) -> int:
        return sum(1 for r in self._replicas.values() if r.healthy)

    def sync(self, targets: Iterable[tuple[str, str]]) -> tuple[list[Replica], list[Replica]]:
        """Make the pool hold exactly `targets` ((address, endpoint) pairs): (added, removed).

        Known replicas keep their state and counters; new ones start unhealthy and due for
        a probe, so no request reaches a server before it has passed a health check.
        """
        wanted = dict(targets)
        added = [
            Replica(address=a, endpoint=e) for a, e in wanted.items() if a not in self._replicas
        ]
        removed = [r for a, r in self._replicas.items() if a not in wanted]
        for replica in removed:
            del self._replicas[replica.address]
        for replica in added:
            self._replicas[replica.address] = replica
        return added, removed

    def eject(self, replica: Replica, reason: str) -> bool:
        """Eject `replica`; True when it was healthy until now (the caller logs the change)."""
        was_healthy = replica.healthy
        replica.eject(reason, time.monotonic(), self.probe_first_s, self.probe_max_s)
        return was_healthy

    def restore(self, replica: Replica) -> bool:
        """Put `replica` back in rotation; True when it was ejected until now."""
        was_healthy = replica.healthy
        replica.restore(self.probe_first_s)
        return not was_healthy

    def pick(self, avoid: frozenset[str] = frozenset()) -> Replica | None:
        """The healthy replica with the fewest requests in flight (None if none is healthy).

        Replicas in `avoid` (those that already failed this request) are used only when no
        other healthy replica is left.
        """
        healthy = [r for r in self._replicas.values() if r.healthy]
        preferred = [r for r in healthy if r.address not in avoid] or healthy
        if not preferred:
            return None
        turn = next(self._turn)
        count = len(preferred)
        order = {r.address: (i - turn) % count for i, r in enumerate(preferred)}
        return min(preferred, key=lambda r: (r.in_flight, order[r.address]))

    def due_for_probe(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self._replicas.values() if r.probe_due(now)]

    def stats(self) -> tuple[ReplicaStats, ...]:
        return tuple(
            ReplicaStats(
                address=r.address,
                endpoint=r.endpoint,
                healthy=r.healthy,
                in_flight=r.in_flight,
                requests=r.requests,
                failures=r.failures,
                ejections=r.ejections,
                reason=r.reason,
            )
            for r in self._replicas.values()
        )


__all__ = [
    "Endpoint",
    "Replica",
    "ReplicaChange",
    "ReplicaPool",
    "ReplicaStats",
    "Replicated",
    "SharedReplicaHealth",
    "parse_endpoints",
    "resolve",
]
