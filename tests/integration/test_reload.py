"""SIGHUP reload: a changed pool size and domain map apply live; a broken config keeps the old one."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import psycopg
import yaml

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

ALL_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
NO_ANALYTICS_TABLES = {"analytics": ["analytics.*"], "documents": ["documents", "document_shares"]}
WITH_ANALYTICS_TABLES = {**NO_ANALYTICS_TABLES, "analytics": ["user_activity", "business_metrics"]}


def rewrite(proxy: ProxyProcess, change: Callable[[dict[str, object]], None]) -> None:
    doc = yaml.safe_load(proxy.config_path.read_text())
    change(doc)
    proxy.config_path.write_text(yaml.safe_dump(doc))


def test_reload_under_load(pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None) -> None:
    proxy = start_proxy(
        roles=ALL_ROLES, config={"domains": NO_ANALYTICS_TABLES, "roles": {"main": {"pool_size": 2}}}
    )
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    errors: list[BaseException] = []
    done = [0]
    stop = threading.Event()

    def client() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    conn.execute("SELECT count(*) FROM users").fetchone()
                    done[0] += 1
                except psycopg.Error as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'reload-before')")
            assert int(pg.main.psql("SELECT count(*) FROM user_activity WHERE action = 'reload-before'")) == 1

            def change(doc: dict[str, object]) -> None:
                doc["domains"] = WITH_ANALYTICS_TABLES
                doc["roles"] = {"main": {"pool_size": 5}}

            rewrite(proxy, change)
            proxy.signal(signal.SIGHUP)
            wait_until(lambda: proxy.metric("parafort_proxy_config_reloads_total") == 1, 10, "the reload")
            assert proxy.metric("parafort_proxy_pool_max_connections", role="main", upstream="main") == 5
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'reload-after')")
            analytics = pg.analytics.psql("SELECT count(*) FROM user_activity WHERE action = 'reload-after'")
            assert int(analytics) == 1

            # A broken configuration: one log line, a counted failure, the old configuration still serving.
            rewrite(proxy, lambda doc: doc.update({"roles": {"main": {"pool_sise": 3}}}))
            proxy.signal(signal.SIGHUP)
            wait_until(
                lambda: proxy.metric("parafort_proxy_config_reload_failures_total") == 1, 10, "the failure"
            )
            assert "event=reload_failed" in proxy.log() and "pool_sise" in proxy.log()
            assert proxy.metric("parafort_proxy_pool_max_connections", role="main", upstream="main") == 5
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'reload-broken')")
            analytics = pg.analytics.psql("SELECT count(*) FROM user_activity WHERE action = 'reload-broken'")
            assert int(analytics) == 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert done[0] > 0
