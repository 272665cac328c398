"""statements.cache_unnamed: clients' unnamed extended-protocol statements kept prepared upstream.

psycopg runs with ``prepare_threshold=None``, so every query is an unnamed Parse/Bind/Execute (libpq's
PQsendQueryParams), the pattern of pgbench ``-M extended``, JDBC and most drivers. Pools have one upstream
connection so that what the tests read from ``pg_prepared_statements`` is the connection they used.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator

import psycopg
import pytest

from proxy.config.loader import ROLE_ENV
from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

StartProxy = Callable[..., ProxyProcess]
ONE_CONNECTION = {"pool_size": 1}


def start(start_proxy: StartProxy, pg: DevClusters, **statements: object) -> ProxyProcess:
    return start_proxy(
        config={
            "statements": {"cache_unnamed": True, **statements},
            "roles": {"main": ONE_CONNECTION},
        }
    )


def connect(proxy: ProxyProcess) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, prepare_threshold=None)


def upstream_statements(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """The pf_ statements of the upstream connection this client is on (simple protocol: not cached)."""
    cur = conn.cursor()
    cur.execute(
        b"SELECT statement FROM pg_prepared_statements WHERE name LIKE 'pf%' ORDER BY 1", prepare=False
    )
    return [str(row[0]) for row in cur.fetchall()]


def main_exec(pg: DevClusters, sql: str) -> None:
    """Run ``sql`` on main directly, as the role's own user (the owner of what the tests touch)."""
    with psycopg.connect(pg.env()[ROLE_ENV["main"]], autocommit=True) as conn:
        conn.pgconn.exec_(sql.encode())


@pytest.fixture
def table(pg: DevClusters) -> Iterator[str]:
    main_exec(pg, "DROP TABLE IF EXISTS cached_t; CREATE TABLE cached_t (id int PRIMARY KEY, a text)")
    main_exec(pg, "INSERT INTO cached_t SELECT g, 'row' || g FROM generate_series(1, 50) g")
    try:
        yield "cached_t"
    finally:
        main_exec(pg, "DROP TABLE IF EXISTS cached_t")


def test_unnamed_statements_are_prepared_once_and_results_stay_right(
    start_proxy: StartProxy, pg: DevClusters, table: str
) -> None:
    proxy = start(start_proxy, pg)
    with connect(proxy) as conn:
        for i in range(1, 51):
            row = conn.execute("SELECT id, a FROM cached_t WHERE id = %s", (i,)).fetchone()
            assert row == (i, f"row{i}")
        # Describe of the unnamed statement (psycopg's cursor.description needs the row shape).
        cur = conn.execute("SELECT a FROM cached_t WHERE id > %s ORDER BY id", (48,))
        assert [d.name for d in cur.description or []] == ["a"]
        assert cur.fetchall() == [("row49",), ("row50",)]
        held = upstream_statements(conn)
    assert held == [
        "SELECT a FROM cached_t WHERE id > $1 ORDER BY id",
        "SELECT id, a FROM cached_t WHERE id = $1",
    ]
    metric = "parafort_proxy_upstream_statements_total"
    assert proxy.metric(metric, role="main", event="prepared") == 2
    assert proxy.metric(metric, role="main", event="reused") == 49


def test_result_type_change_is_prepared_again_unseen(
    start_proxy: StartProxy, pg: DevClusters, table: str
) -> None:
    """DDL that changes a kept statement's columns: outside a transaction the proxy prepares it again and
    runs it again (the client sees the new columns, no error); inside one the failure has already aborted
    the transaction, so the client gets PostgreSQL's error, as with its own named statements."""
    proxy = start(start_proxy, pg)
    query = "SELECT * FROM cached_t WHERE id = %s"
    with connect(proxy) as conn:
        assert conn.execute(query, (1,)).fetchone() == (1, "row1")
        conn.pgconn.exec_(b"ALTER TABLE cached_t ADD COLUMN b int DEFAULT 7")
        assert conn.execute(query, (1,)).fetchone() == (1, "row1", 7)
        assert conn.execute(query, (2,)).fetchone() == (2, "row2", 7)
        conn.pgconn.exec_(b"ALTER TABLE cached_t ADD COLUMN c int DEFAULT 8")
        with (
            pytest.raises(
                psycopg.errors.FeatureNotSupported, match="cached plan must not change result type"
            ),
            conn.transaction(),
        ):
            conn.execute(query, (1,))
        assert conn.execute(query, (1,)).fetchone() == (1, "row1", 7, 8)
    assert proxy.log().count("event=statement_prepared_again") == 1
    metric = "parafort_proxy_upstream_statements_total"
    assert proxy.metric(metric, role="main", event="prepared_again_after_ddl") == 1


def test_statements_per_connection_are_capped(start_proxy: StartProxy, pg: DevClusters, table: str) -> None:
    proxy = start(start_proxy, pg, max_per_connection=3)
    with connect(proxy) as conn:
        for i in range(10):
            assert conn.execute(f"SELECT id + {i} FROM cached_t WHERE id = %s", (1,)).fetchone() == (1 + i,)
        held = upstream_statements(conn)
        # Eviction happens between transactions, before the next batch: at most one over the cap.
        assert len(held) <= 4, held
        assert "SELECT id + 9 FROM cached_t WHERE id = $1" in held
        # An evicted statement is prepared again when it comes back.
        assert conn.execute("SELECT id + 0 FROM cached_t WHERE id = %s", (5,)).fetchone() == (5,)
    assert proxy.metric("parafort_proxy_upstream_statements_total", role="main", event="evicted") >= 6


def test_session_and_utility_statements_are_not_cached(
    start_proxy: StartProxy, pg: DevClusters, table: str
) -> None:
    proxy = start(start_proxy, pg)
    with connect(proxy) as conn:
        conn.execute("SET application_name = 'cache-test'")
        conn.execute("SHOW application_name")
        with conn.transaction():
            conn.execute("UPDATE cached_t SET a = %s WHERE id = %s", ("changed", 3))
        assert conn.execute("SELECT a FROM cached_t WHERE id = %s", (3,)).fetchone() == ("changed",)
        held = upstream_statements(conn)
    assert held == [
        "SELECT a FROM cached_t WHERE id = $1",
        "UPDATE cached_t SET a = $1 WHERE id = $2",
    ]


def test_bind_without_parse_never_runs_another_clients_statement(
    start_proxy: StartProxy, pg: DevClusters
) -> None:
    """A client that binds the unnamed statement without having parsed one gets PostgreSQL's error, even
    when the upstream connection holds another client's unnamed statement (one not cached: SHOW)."""
    proxy = start(start_proxy, pg)
    with connect(proxy) as first:
        assert first.execute("SHOW application_name").fetchone() is not None
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as second:
        pgconn = second.pgconn
        pgconn.send_query_prepared(b"", None)
        results = []
        while (res := pgconn.get_result()) is not None:
            results.append(res)
        assert results and results[0].status == psycopg.pq.ExecStatus.FATAL_ERROR
        message = (results[0].error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()
        assert "unnamed prepared statement does not exist" in message
        assert second.execute("SELECT 1").fetchone() == (1,)
    with connect(proxy) as first:
        assert first.execute("SHOW application_name").fetchone() is not None
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as third:
        # Describe of the unnamed statement: not the other client's row shape either.
        described = third.pgconn.describe_prepared(b"")
        assert described.status == psycopg.pq.ExecStatus.FATAL_ERROR, described.nfields
        assert b"unnamed prepared statement does not exist" in (described.error_message or b"")


def test_pgbench_extended_with_the_cache(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_proxy(config={"statements": {"cache_unnamed": True}})
    env = {"PGPASSWORD": APP_PASSWORD, "PGSSLMODE": "disable", "PATH": os.environ["PATH"]}
    base = ["pgbench", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", APP_USER]
    init = subprocess.run(
        [*base, "-i", "-s", "1", "-q", "app"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    try:
        assert init.returncode == 0, init.stderr
        run = subprocess.run(
            [*base, "-n", "-M", "extended", "-c", "8", "-j", "2", "-t", "200", "app"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert "number of transactions actually processed: 1600/1600" in run.stdout, run.stdout
        failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
        assert failed is not None and failed.group(1) == "0", run.stdout
        assert (
            pg.main.psql(
                "SELECT (SELECT sum(bbalance) FROM pgbench_branches)"
                " = (SELECT sum(delta) FROM pgbench_history)"
            )
            == "t"
        )
    finally:
        pg.main.psql(
            "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"
        )
