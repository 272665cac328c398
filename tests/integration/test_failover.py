"""Fallback and failover with real servers stopped and started while clients keep working."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import psycopg
import pytest

from proxy.demo import DEMO_DOMAINS
from proxy.devcluster import DevClusters, wait_until
from proxy.testing import APP_PASSWORD, APP_USER, ProxyProcess

ALL_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
FAST_HEALTH = {"interval": "200ms", "timeout": "500ms", "failures_before_down": 2, "successes_before_up": 1}


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess], schema: None) -> ProxyProcess:
    return start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS, "health": FAST_HEALTH})


def databases(proxy: ProxyProcess) -> dict[str, bool]:
    url = f"http://127.0.0.1:{proxy.admin_port}/api/health/databases"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: dict[str, bool] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 while main is down: same body
        body = json.loads(exc.read())
    return body


def connect(proxy: ProxyProcess) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, connect_timeout=10)


def count(pg: DevClusters, role: str, sql: str) -> int:
    return int(pg[role].psql(sql, superuser=False))


@pytest.fixture
def restore(pg: DevClusters) -> Iterator[None]:
    """Whatever a test stops is running again afterwards (the clusters are shared by the session)."""
    yield
    for role in ("main", "analytics", "read_replica"):
        if not pg[role].running:
            pg[role].start()
    pg.wait_replica_caught_up(timeout=60)


def test_analytics_outage_falls_back_to_main_and_back(
    pg: DevClusters, proxy: ProxyProcess, restore: None
) -> None:
    committed = 0
    with connect(proxy) as conn:

        def insert(tag: str) -> None:
            nonlocal committed
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, %s)", (tag,))
            committed += 1

        insert("before")
        pg.analytics.stop()
        # Every insert succeeds: a failed connect moves the unit to main before anything is sent.
        for _ in range(5):
            insert("during")
        wait_until(lambda: databases(proxy)["analytics"] is False, 10, "analytics reported down")
        insert("during")
        pg.analytics.start()
        wait_until(lambda: databases(proxy)["analytics"] is True, 10, "analytics reported up")
        insert("after")
    where = "action IN ('before', 'during', 'after')"
    on_analytics = count(pg, "analytics", f"SELECT count(*) FROM user_activity WHERE {where}")
    on_main = count(pg, "main", f"SELECT count(*) FROM user_activity WHERE {where}")
    assert on_analytics + on_main == committed == 8
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'during'") == 6
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action = 'after'") == 1
    assert "event=fallback" in proxy.log()


def test_main_down_reads_from_replica_writes_refused(
    pg: DevClusters, proxy: ProxyProcess, restore: None
) -> None:
    with connect(proxy) as conn:
        conn.execute("INSERT INTO users (email, full_name) VALUES ('main-down@example.com', 'Main Down')")
        pg.wait_replica_caught_up()
        pg.main.stop()
        wait_until(lambda: databases(proxy)["main"] is False, 10, "main reported down")
        row = conn.execute(
            "SELECT pg_is_in_recovery(), count(*) FROM users WHERE email LIKE 'main-down%'"
        ).fetchone()
        assert row == (True, 1)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            conn.execute("INSERT INTO users (email, full_name) VALUES ('refused@example.com', 'Refused')")
        assert "main is unavailable" in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.main.start()
        wait_until(lambda: databases(proxy)["main"] is True, 15, "main reported up")
        conn.execute("INSERT INTO users (email, full_name) VALUES ('main-back@example.com', 'Main Back')")
    assert count(pg, "main", "SELECT count(*) FROM users WHERE email = 'main-back@example.com'") == 1
    assert count(pg, "main", "SELECT count(*) FROM users WHERE email = 'refused@example.com'") == 0


def test_replica_down_reads_go_to_main(pg: DevClusters, proxy: ProxyProcess, restore: None) -> None:
    with connect(proxy) as conn:
        assert conn.execute("SELECT pg_is_in_recovery() FROM users LIMIT 1 OFFSET 0").fetchone() in (
            (True,),
            None,
        )
        pg.read_replica.stop()
        wait_until(lambda: databases(proxy)["readReplica"] is False, 10, "replica reported down")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        pg.read_replica.start()
        wait_until(lambda: databases(proxy)["readReplica"] is True, 15, "replica reported up")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
