"""Health against the real clusters: the seed's endpoints, an optional role going down and back, replica lag,
and main down (503). Every cluster stopped or paused here is restored in ``finally``: ``pg`` is shared."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import ProxyProcess

StartProxy = Callable[..., ProxyProcess]

FIVE_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
SEED_KEYS = ["main", "analytics", "documents", "compliance", "readReplica"]
CONNECTION_KEYS = {"totalConnections", "idleConnections", "waitingConnections"}
INTERVAL, TIMEOUT, FAILURES = 0.2, 0.5, 2
FAST = {
    "interval": f"{int(INTERVAL * 1000)}ms",
    "timeout": f"{int(TIMEOUT * 1000)}ms",
    "failures_before_down": FAILURES,
    "successes_before_up": 1,
}
# Detection takes failures x interval + timeout; the rest is margin for a loaded machine.
DETECT = FAILURES * INTERVAL + TIMEOUT + 8


def get(proxy: ProxyProcess, path: str) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body) of a GET on the admin listener; 5xx is an answer, not an error."""
    url = f"http://127.0.0.1:{proxy.admin_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def databases(proxy: ProxyProcess) -> dict[str, bool]:
    status, body = get(proxy, "/api/health/databases")
    assert status == (200 if body["main"] else 503), (status, body)
    assert list(body) == SEED_KEYS
    return dict(body)


def start_five(start_proxy: StartProxy, **health: Any) -> ProxyProcess:
    proxy = start_proxy(roles=FIVE_ROLES, config={"health": {**FAST, **health}})
    wait_until(lambda: all(databases(proxy).values()), DETECT, "every upstream healthy")
    return proxy


def test_endpoints_have_the_seeds_shape(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_five(start_proxy)
    status, body = get(proxy, "/api/health/databases")
    assert status == 200
    assert list(body) == SEED_KEYS
    assert all(type(v) is bool and v for v in body.values()), body

    status, body = get(proxy, "/api/health/connections")
    assert status == 200
    assert list(body) == SEED_KEYS
    for role, stats in body.items():
        assert set(stats) == CONNECTION_KEYS, role
        assert all(type(v) is int and v >= 0 for v in stats.values()), (role, stats)
        assert stats["idleConnections"] <= stats["totalConnections"]

    assert get(proxy, "/ready") == (200, {"status": "ready"})
    assert get(proxy, "/live") == (200, {"status": "ok"})
    for role in ("main", "analytics", "documents", "compliance"):
        assert proxy.metric("parafort_proxy_upstream_up", role=role, upstream=role) == 1
    assert proxy.metric("parafort_proxy_upstream_up", role="read_replica", upstream="read_replica") == 1
    assert proxy.metric("parafort_proxy_probe_duration_seconds", role="main", upstream="main") > 0
    # Lag in bytes is known from the first replica probe that follows a probe of main.
    lag_bytes = 'parafort_proxy_replica_lag_bytes{upstream="read_replica"}'
    wait_until(lambda: lag_bytes in proxy.metrics(), DETECT, "replica lag in bytes")
    text = proxy.metrics()
    assert 'parafort_proxy_replica_lag_seconds{upstream="read_replica"}' in text
    assert 'parafort_proxy_health_transitions_total{role="main",upstream="main"} 0.0' in text


def test_only_configured_roles_are_true(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_proxy(roles=("main", "documents"), config={"health": FAST})
    wait_until(lambda: databases(proxy)["main"], DETECT, "main healthy")
    assert databases(proxy) == dict.fromkeys(SEED_KEYS, False) | {"main": True, "documents": True}
    status, body = get(proxy, "/api/health/connections")
    assert (status, list(body)) == (200, ["main", "documents"])


def test_analytics_down_and_back(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_five(start_proxy)
    labels = {"role": "analytics", "upstream": "analytics"}
    try:
        stopped_at = time.monotonic()
        pg.analytics.stop()
        wait_until(lambda: not databases(proxy)["analytics"], DETECT, "analytics reported down")
        assert time.monotonic() - stopped_at < DETECT
        status, body = get(proxy, "/api/health/databases")
        assert status == 200  # main is healthy: an optional role down is no outage
        assert body == dict.fromkeys(SEED_KEYS, True) | {"analytics": False}
        assert get(proxy, "/ready")[0] == 200
        assert proxy.metric("parafort_proxy_upstream_up", **labels) == 0
    finally:
        pg.analytics.start()
    wait_until(lambda: databases(proxy)["analytics"], DETECT, "analytics reported up again")
    assert proxy.metric("parafort_proxy_upstream_up", **labels) == 1
    assert proxy.metric("parafort_proxy_health_transitions_total", **labels) == 2
    log = proxy.log()
    assert "event=health_change upstream=analytics role=analytics up=false" in log
    assert "event=health_change upstream=analytics role=analytics up=true" in log
    assert pg.analytics.password not in log


def test_lagging_replica_takes_no_reads(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_five(start_proxy, max_replica_lag="1s", max_replica_lag_bytes=1)
    table = "health_lag_probe"
    try:
        pg.read_replica.psql("SELECT pg_wal_replay_pause()")
        pg.main.psql(f"CREATE TABLE IF NOT EXISTS {table} (id int, v text)")

        def lagging() -> bool:
            pg.main.psql(f"INSERT INTO {table} SELECT g, repeat('x', 100) FROM generate_series(1, 100) g")
            # Seconds may trip first (the last replayed commit can be old); bytes need main's next probe.
            lag_bytes = proxy.metric("parafort_proxy_replica_lag_bytes", upstream="read_replica")
            return not databases(proxy)["readReplica"] and lag_bytes > 1

        wait_until(lagging, DETECT, "the paused replica reported lagging", interval=0.2)
        status, body = get(proxy, "/api/health/databases")
        assert status == 200 and body["main"] and not body["readReplica"]
        assert proxy.metric("parafort_proxy_upstream_up", role="read_replica", upstream="read_replica") == 1
    finally:
        pg.read_replica.psql("SELECT pg_wal_replay_resume()")
        pg.main.psql(f"DROP TABLE IF EXISTS {table}")
    pg.wait_replica_caught_up()
    wait_until(lambda: databases(proxy)["readReplica"], DETECT, "the replica usable again")
    assert "event=replica_lag upstream=read_replica lagging=true" in proxy.log()


@pytest.mark.timeout(90)
def test_main_down_is_503(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_five(start_proxy)
    try:
        pg.main.stop()
        wait_until(lambda: not databases(proxy)["main"], DETECT, "main reported down")
        status, body = get(proxy, "/api/health/databases")
        assert status == 503
        # Degraded read-only: the replica, level with main's last position, still takes reads.
        assert body == dict.fromkeys(SEED_KEYS, True) | {"main": False}
        status, ready = get(proxy, "/ready")
        assert status == 503 and ready["status"] == "not ready" and ready["reason"].startswith("main is down")
        assert pg.main.password not in ready["reason"]
        assert proxy.metric("parafort_proxy_upstream_up", role="main", upstream="main") == 0
    finally:
        pg.main.start()
    wait_until(lambda: databases(proxy)["main"], DETECT, "main reported up again")
    assert get(proxy, "/ready") == (200, {"status": "ready"})
    pg.wait_replica_caught_up()
