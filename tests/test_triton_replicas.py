"""The replica bookkeeping behind `--triton-url`: parsing, DNS expansion, ejection, choice.

Unit tests: no server, no sockets (DNS is asked only for `localhost`).
"""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from ctjoint.cli import app
from ctjoint.gateway.backends.replicas import (
    Endpoint,
    ReplicaPool,
    parse_endpoints,
    resolve,
)


def test_endpoints_come_comma_separated_or_repeated_without_duplicates() -> None:
    endpoints = parse_endpoints(["a:8001,b:8001", " c:9001 ", "a:8001"])
    assert [e.target for e in endpoints] == ["a:8001", "b:8001", "c:9001"]


def test_an_ipv6_endpoint_keeps_its_brackets_in_the_target() -> None:
    (endpoint,) = parse_endpoints("[::1]:8001")
    assert endpoint.host == "::1" and endpoint.target == "[::1]:8001" and endpoint.is_literal


@pytest.mark.parametrize("bad", ["http://triton:8000", "triton", "triton:port", ",", "::1:8001"])
def test_a_malformed_endpoint_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_endpoints(bad)


def test_a_port_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        Endpoint("triton", 70000)


def test_an_ip_endpoint_needs_no_dns() -> None:
    assert asyncio.run(resolve(Endpoint("10.0.0.7", 8001))) == ("10.0.0.7:8001",)


def test_localhost_is_one_replica_not_one_per_address_family() -> None:
    assert asyncio.run(resolve(Endpoint("localhost", 8001))) == ("127.0.0.1:8001",)


def _pool(*addresses: str) -> ReplicaPool:
    pool = ReplicaPool(probe_first_s=0.5, probe_max_s=4.0)
    pool.sync((a, a) for a in addresses)
    for replica in pool.replicas:
        pool.restore(replica)
    return pool


def test_new_replicas_get_no_request_before_a_health_check() -> None:
    pool = ReplicaPool()
    added, _ = pool.sync([("a:1", "a:1")])
    assert not added[0].healthy and pool.pick() is None
    assert pool.due_for_probe() == added


def test_requests_alternate_between_idle_healthy_replicas() -> None:
    pool = _pool("a:1", "b:1")
    picks = [pool.pick() for _ in range(4)]
    assert [p.address for p in picks if p] == ["a:1", "b:1", "a:1", "b:1"]


def test_the_least_busy_replica_takes_the_next_request() -> None:
    pool = _pool("a:1", "b:1", "c:1")
    a, b, c = pool.replicas
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert pool.pick() is b


def test_an_ejected_replica_gets_no_requests_until_restored() -> None:
    pool = _pool("a:1", "b:1")
    a, b = pool.replicas
    assert pool.eject(a, "UNAVAILABLE") is True
    assert {pool.pick() is b for _ in range(3)} == {True}
    assert a.ejections == 1 and pool.healthy_count == 1
    assert pool.restore(a) is True
    assert {p.address for p in (pool.pick(), pool.pick()) if p} == {"a:1", "b:1"}


def test_a_replica_that_keeps_failing_is_probed_less_often_up_to_a_cap() -> None:
    pool = _pool("a:1")
    (a,) = pool.replicas
    backoffs = []
    for _ in range(5):
        pool.eject(a, "down")
        backoffs.append(a.backoff_s)
    assert backoffs == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert a.ejections == 1  # one ejection; the rest are failed probes


def test_a_retry_avoids_the_replica_that_failed_unless_it_is_the_only_one() -> None:
    pool = _pool("a:1", "b:1")
    a, b = pool.replicas
    assert {pool.pick(frozenset({"a:1"})) is b for _ in range(3)} == {True}
    pool.eject(b, "down")
    assert pool.pick(frozenset({"a:1"})) is a


def test_sync_keeps_known_replicas_and_their_counters() -> None:
    pool = _pool("a:1", "b:1")
    a, _ = pool.replicas
    a.requests = 7
    added, removed = pool.sync([("a:1", "svc:1"), ("c:1", "svc:1")])
    assert [r.address for r in added] == ["c:1"] and [r.address for r in removed] == ["b:1"]
    assert pool.replicas[0] is a and a.requests == 7 and a.healthy


def test_the_gateway_command_refuses_a_malformed_triton_url_before_starting() -> None:
    args = ["gateway", "serve", "--backend", "triton", "--triton-url", "127.0.0.1:8001"]
    result = CliRunner().invoke(
        app, [*args, "--triton-url", "http://triton:8000"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2
    assert "--triton-url" in result.output and "http://triton:8000" in result.output
