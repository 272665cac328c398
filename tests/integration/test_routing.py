"""Routing on the five-cluster test bed: where rows really land and where reads really run."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from psycopg import pq

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

ALL_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")


@pytest.fixture
def routed(start_proxy: Callable[..., ProxyProcess], schema: None) -> ProxyProcess:
    return start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS})


def connect(proxy: ProxyProcess, **kw: object) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, **kw)  # type: ignore[arg-type]


def count(pg: DevClusters, role: str, table: str, where: str = "true") -> int:
    return int(pg[role].psql(f"SELECT count(*) FROM {table} WHERE {where}", superuser=False))


def port_of(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(str(row[0]))


def replica_has_writes(proxy: ProxyProcess) -> None:
    """Read-your-writes: a read right after a write runs on the replica once it has replayed that write
    (else on main). Wait until the proxy has seen the replica pass every write so far (no token left)."""
    wait_until(lambda: proxy.metric("parafort_proxy_ryw_tokens") == 0, 30, "the replica to replay the writes")


def test_domain_writes_land_in_their_cluster(pg: DevClusters, routed: ProxyProcess) -> None:
    with connect(routed) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'routing-test')")
        conn.execute("INSERT INTO business_metrics (entity_id, metric, value) VALUES (1, 'routing-test', 1)")
        conn.execute("INSERT INTO documents (owner_id, title, storage_key) VALUES (1, 'routing-test', 'k')")
        conn.execute("INSERT INTO boir_filings (entity_id, status) VALUES (1, 'routing-test')")
        conn.execute("INSERT INTO users (email, full_name) VALUES ('route@example.com', 'Routing Test')")
    assert count(pg, "analytics", "user_activity", "action = 'routing-test'") == 1
    assert count(pg, "main", "user_activity", "action = 'routing-test'") == 0
    assert count(pg, "analytics", "business_metrics", "metric = 'routing-test'") == 1
    assert count(pg, "main", "business_metrics", "metric = 'routing-test'") == 0
    assert count(pg, "documents", "documents", "title = 'routing-test'") == 1
    assert count(pg, "main", "documents", "title = 'routing-test'") == 0
    assert count(pg, "compliance", "boir_filings", "status = 'routing-test'") == 1
    assert count(pg, "main", "boir_filings", "status = 'routing-test'") == 0
    assert count(pg, "main", "users", "email = 'route@example.com'") == 1


def test_reads_run_where_they_should(pg: DevClusters, routed: ProxyProcess) -> None:
    with connect(routed) as conn:
        assert port_of(conn, "SELECT inet_server_port() FROM users LIMIT 1 OFFSET 0") in (
            pg.read_replica.port,
        )
        replica = conn.execute("SELECT pg_is_in_recovery(), count(*) >= 0 FROM users").fetchone()
        assert replica == (True, True)
        assert port_of(conn, "SELECT inet_server_port() FROM users FOR UPDATE") == pg.main.port
        assert port_of(conn, "SELECT inet_server_port() FROM user_activity LIMIT 1 OFFSET 0") in (
            pg.analytics.port,
        )
        replica_has_writes(routed)  # SELECT ... FOR UPDATE wrote (row locks) on main
        assert port_of(conn, "SELECT inet_server_port()") == pg.read_replica.port
        assert port_of(conn, "/* route: main */ SELECT inet_server_port()") == pg.main.port


def test_transactions_stay_on_one_primary(pg: DevClusters, routed: ProxyProcess) -> None:
    with connect(routed) as conn:
        conn.execute("INSERT INTO users (email, full_name) VALUES ('tx@example.com', 'Tx')")
        conn.execute("BEGIN")
        assert port_of(conn, "SELECT inet_server_port() FROM users LIMIT 1") == pg.main.port
        conn.execute("UPDATE users SET full_name = 'Tx2' WHERE email = 'tx@example.com'")
        assert port_of(conn, "SELECT inet_server_port()") == pg.main.port
        conn.execute("COMMIT")
        replica_has_writes(routed)
        conn.execute("BEGIN READ ONLY")
        assert conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone() == (
            True,
            pg.read_replica.port,
        )
        conn.execute("COMMIT")
        # An empty transaction never needs an upstream at all.
        conn.execute("BEGIN")
        conn.execute("ROLLBACK")
    assert count(pg, "main", "users", "full_name = 'Tx2'") == 1


def test_psycopg_transaction_block(pg: DevClusters, routed: ProxyProcess) -> None:
    with psycopg.connect(routed.dsn(APP_USER, APP_PASSWORD)) as conn:  # non-autocommit: psycopg sends BEGIN
        assert port_of(conn, "SELECT inet_server_port() FROM users") == pg.main.port
        conn.execute("INSERT INTO users (email, full_name) VALUES ('psy@example.com', 'Psy')")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (2, 'psy-tx')")
            assert port_of(conn, "SELECT inet_server_port()") == pg.analytics.port
    assert count(pg, "analytics", "user_activity", "action = 'psy-tx'") == 1
    assert count(pg, "main", "users", "email = 'psy@example.com'") == 1


def test_unconfigured_analytics_falls_back_to_main(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None
) -> None:
    proxy = start_proxy(
        roles=("main", "documents", "compliance", "read_replica"), config={"domains": DEMO_DOMAINS}
    )
    try:
        with connect(proxy) as conn:
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (3, 'fallback-test')")
            # With analytics on main, a join of users and user_activity is one upstream: fine.
            conn.execute("SELECT count(*) FROM users u JOIN user_activity a ON a.user_id = u.id").fetchone()
        assert count(pg, "main", "user_activity", "action = 'fallback-test'") == 1
        assert count(pg, "analytics", "user_activity", "action = 'fallback-test'") == 0
    finally:
        # Analytics rows left in main would make the next proxy with an analytics URL keep serving them
        # from main (migration state planned, issue 17) while analytics' copy is empty.
        pg.main.psql("DELETE FROM user_activity WHERE action = 'fallback-test'", superuser=False)
    # Not a fallback write to reconcile: an unconfigured role's tables live on main.
    writes = "parafort_proxy_fallback_writes_total"
    assert proxy.metric(writes, role="analytics", table="user_activity") == 0


def test_cross_domain_join_refused_and_connection_usable(pg: DevClusters, routed: ProxyProcess) -> None:
    with connect(routed) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("SELECT * FROM documents d JOIN compliance_records c ON c.entity_id = d.owner_id")
        message = str(info.value)
        assert "documents" in message and "compliance_records" in message and "compliance" in message
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Inside a transaction: refused, the transaction is aborted for the client, ROLLBACK works.
        conn.execute("BEGIN")
        conn.execute("INSERT INTO users (email, full_name) VALUES ('rolled@example.com', 'Rolled back')")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (4, 'never')")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert count(pg, "main", "users", "email = 'rolled@example.com'") == 0
    assert count(pg, "analytics", "user_activity", "action = 'never'") == 0


def test_extended_batch_with_read_and_write_goes_to_a_primary(pg: DevClusters, routed: ProxyProcess) -> None:
    """A libpq pipeline: two statements, one Sync: one unit, one upstream (main, because of the write)."""
    with connect(routed) as conn:
        pgconn = conn.pgconn
        pgconn.enter_pipeline_mode()
        pgconn.send_query_params(b"SELECT inet_server_port() FROM users LIMIT 1", None)
        pgconn.send_query_params(
            b"INSERT INTO users (email, full_name) VALUES ('pipe@example.com', 'Pipe')"
            b" RETURNING inet_server_port()",
            None,
        )
        pgconn.pipeline_sync()
        ports = []
        while True:
            res = pgconn.get_result()
            if res is None:
                continue
            if res.status == pq.ExecStatus.PIPELINE_SYNC:
                break
            assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
            ports.append(int(res.get_value(0, 0) or b"0"))
        pgconn.exit_pipeline_mode()
    assert ports == [pg.main.port, pg.main.port]
    assert count(pg, "main", "users", "email = 'pipe@example.com'") == 1
