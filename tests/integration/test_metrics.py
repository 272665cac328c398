"""Each metric moves as it should: routed statements, waits and timeouts, lag while replay is paused."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import yaml

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

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


def zero_series(scrape: str, family: str, *labels: str) -> set[tuple[str, ...]]:
    """The label values (in the order of ``labels``) of every sample of ``family``; each must be 0."""
    out = set()
    for line in scrape.splitlines():
        if not line.startswith(family + "{"):
            continue
        key, value = line.rsplit(" ", 1)
        assert float(value) == 0, line
        named = dict(pair.split("=", 1) for pair in key[len(family) + 1 : -1].split(","))
        assert set(named) == set(labels), line
        out.add(tuple(named[label].strip('"') for label in labels))
    return out


def rewrite(proxy: ProxyProcess, change: Callable[[dict[str, Any]], None]) -> None:
    doc = yaml.safe_load(proxy.config_path.read_text())
    change(doc)
    proxy.config_path.write_text(yaml.safe_dump(doc))


def test_labelled_counters_have_zero_series_from_start_and_after_reload(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess]
) -> None:
    """Issue 15: a labelled counter had no series before its first event, so rate() and alerts saw nothing.
    Right after start, with no client yet, every label set a counter can take is there at 0."""
    proxy = start_proxy(
        roles=("main", "analytics"),
        config={"domains": DEMO_DOMAINS, "roles": {"analytics": {"fallback": "main"}}},
    )
    scrape = proxy.metrics()
    roles = ("main", "analytics")
    routed = {(role, kind) for role in roles for kind in ("read", "write")}
    kinds = ("prepared", "reused", "evicted", "prepared_again_after_ddl")
    events = {(role, event) for role in roles for event in kinds}
    assert zero_series(scrape, "parafort_proxy_routed_statements_total", "role", "kind") == routed
    assert zero_series(scrape, "parafort_proxy_upstream_statements_total", "role", "event") == events
    # Main may serve analytics (configured, fallback main) and the unconfigured documents and compliance.
    fallbacks = {("analytics",), ("documents",), ("compliance",)}
    assert zero_series(scrape, "parafort_proxy_fallbacks_total", "role") == fallbacks
    # Writes main may take for analytics while it is down: one series per table the map names.
    tables = {("analytics", "user_activity"), ("analytics", "business_metrics")}
    assert zero_series(scrape, "parafort_proxy_fallback_writes_total", "role", "table") == tables
    assert zero_series(scrape, "parafort_proxy_down_refusals_total", "role") == set()  # analytics falls back
    assert "parafort_proxy_cross_upstream_refusals_total 0.0" in scrape.splitlines()

    # A reload that configures documents (its URL needs a restart: main still serves it) and turns
    # analytics' fallback off (main no longer serves analytics).
    def change(doc: dict[str, Any]) -> None:
        doc["roles"]["analytics"]["fallback"] = None
        doc["roles"]["documents"] = {"url": pg.env()["DOCUMENTS_DATABASE_URL"]}

    rewrite(proxy, change)
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.metric("parafort_proxy_config_reloads_total") == 1, 20, "the reload")
    assert "event=reload_needs_restart keys=roles.documents.url" in proxy.log()
    scrape = proxy.metrics()
    assert zero_series(scrape, "parafort_proxy_routed_statements_total", "role", "kind") == routed
    assert zero_series(scrape, "parafort_proxy_upstream_statements_total", "role", "event") == events
    assert zero_series(scrape, "parafort_proxy_fallbacks_total", "role") == {("documents",), ("compliance",)}
    # analytics without a fallback: refused with 57P03 while down, no writes for main to take.
    assert zero_series(scrape, "parafort_proxy_down_refusals_total", "role") == {("analytics",)}
    assert zero_series(scrape, "parafort_proxy_fallback_writes_total", "role", "table") == set()
