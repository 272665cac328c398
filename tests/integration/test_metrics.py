"""Each metric moves as it should: routed statements, waits and timeouts, lag while replay is paused."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import pytest

from proxy.demo import DEMO_DOMAINS
from proxy.devcluster import DevClusters, wait_until
from proxy.testing import APP_PASSWORD, APP_USER, ProxyProcess

ALL_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")


def test_routed_statements_by_role_and_kind(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None
) -> None:
    proxy = start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS})
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT count(*) FROM users").fetchone()
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'metric')")
        conn.execute("INSERT INTO users (email, full_name) VALUES ('metric@example.com', 'M')")
    assert proxy.metric("parafort_proxy_routed_statements_total", role="read_replica", kind="read") >= 3
    assert proxy.metric("parafort_proxy_routed_statements_total", role="analytics", kind="write") == 1
    assert proxy.metric("parafort_proxy_routed_statements_total", role="main", kind="write") == 1


def test_waits_and_timeouts_under_pool_exhaustion(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess]
) -> None:
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1, "acquire_timeout": "1s"}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    waited = "parafort_proxy_pool_acquire_wait_seconds_count"
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1")  # holds main's only connection in a transaction
        with psycopg.connect(dsn, autocommit=True) as waiter:
            result: list[BaseException] = []
            thread = threading.Thread(target=lambda: _expect_timeout(waiter, result))
            thread.start()
            wait_until(
                lambda: (
                    proxy.metric("parafort_proxy_pool_waiting_clients", role="main", upstream="main") == 1
                ),
                5,
                "a waiting client",
            )
            thread.join(10)
            assert result and getattr(result[0], "sqlstate", None) == "53300"
        holder.commit()
    assert proxy.metric("parafort_proxy_pool_acquire_timeouts_total", role="main", upstream="main") == 1
    assert proxy.metric("parafort_proxy_pool_waiting_clients", role="main", upstream="main") == 0
    assert proxy.metric(waited, role="main", upstream="main") >= 1
    assert proxy.metric("parafort_proxy_pool_acquire_wait_seconds_sum", role="main", upstream="main") >= 1.0


def _expect_timeout(conn: psycopg.Connection[tuple[object, ...]], out: list[BaseException]) -> None:
    try:
        conn.execute("SELECT 1")
    except psycopg.Error as exc:
        out.append(exc)


@pytest.mark.usefixtures("schema")
def test_lag_metrics_while_replay_is_paused(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess]
) -> None:
    health = {"interval": "200ms", "timeout": "500ms", "failures_before_down": 2, "successes_before_up": 1}
    proxy = start_proxy(roles=ALL_ROLES, config={"health": health})
    lag_bytes = "parafort_proxy_replica_lag_bytes"
    wait_until(lambda: lag_bytes in proxy.metrics(), 10, "a lag sample")
    pg.read_replica.psql("SELECT pg_wal_replay_pause()")
    try:

        def lagging() -> bool:
            pg.main.psql(
                "CREATE TABLE IF NOT EXISTS lag_probe (x int);"
                " INSERT INTO lag_probe SELECT generate_series(1, 2000)"
            )
            return proxy.metric(lag_bytes, upstream="read_replica") > 10_000

        wait_until(lagging, 20, "the lag in bytes to grow", interval=0.2)
    finally:
        pg.read_replica.psql("SELECT pg_wal_replay_resume()")
    wait_until(lambda: proxy.metric(lag_bytes, upstream="read_replica") < 10_000, 20, "the lag to shrink")
    pg.main.psql("DROP TABLE IF EXISTS lag_probe")
