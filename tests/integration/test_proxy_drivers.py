"""Client drivers through the proxy: asyncpg's statement cache, psycopg 3 plain/pipeline/COPY/prepared,
and extended-protocol error recovery."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Callable
from decimal import Decimal

import asyncpg
import psycopg
import pytest
from psycopg import sql

from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

StartProxy = Callable[..., ProxyProcess]


def _connect(dsn: str, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)


def _drop(pg: DevClusters, *tables: str) -> None:
    pg.main.psql("DROP TABLE IF EXISTS " + ", ".join(tables))


# -- asyncpg -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_size", [None, 0], ids=["default_cache", "no_cache"])
def test_asyncpg_statement_cache_over_small_pool(
    start_proxy: StartProxy, pg: DevClusters, cache_size: int | None
) -> None:
    """50 tasks on 5 asyncpg connections over 3 upstream connections.

    With the default statement cache asyncpg uses named statements; with statement_cache_size=0 it parses
    unnamed statements in one Sync unit and binds them in the next."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 3}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    prefix = f"apg_cache_{cache_size}"
    options = {} if cache_size is None else {"statement_cache_size": cache_size}
    tasks_n, conns_n = 50, 5

    async def task(pool: asyncpg.Pool, i: int) -> set[int]:
        table = f"{prefix}_{i}"
        pids: set[int] = set()
        async with pool.acquire() as conn:
            await conn.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, v text NOT NULL)")
            for k in range(4):
                x = i * 100 + k
                assert await conn.fetchval("SELECT $1::int * 2", x) == x * 2
                row = await conn.fetchrow("SELECT $1::text || $2::text, $3::bigint + 1", f"a{i}", f"b{k}", x)
                assert tuple(row) == (f"a{i}b{k}", x + 1)
                pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            async with conn.transaction():
                await conn.executemany(
                    f"INSERT INTO {table} (n, v) VALUES ($1, $2)", [(k, f"t{i}-{k}") for k in range(5)]
                )
                await conn.execute(f"INSERT INTO {table} (n, v) VALUES ($1, $2)", 99, f"last{i}")
            rows = await conn.fetch(f"SELECT n, v FROM {table} WHERE n >= $1 ORDER BY n", 2)
            assert [tuple(r) for r in rows] == [(k, f"t{i}-{k}") for k in (2, 3, 4)] + [(99, f"last{i}")]
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE v LIKE $1", f"t{i}-%") == 5
            assert await conn.fetchval("SELECT $1::int * 2", -i) == -2 * i
            await conn.execute(f"DROP TABLE {table}")
        return pids

    async def main() -> set[int]:
        pool = await asyncpg.create_pool(dsn, min_size=conns_n, max_size=conns_n, timeout=10, **options)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(task(pool, i) for i in range(tasks_n))), timeout=90
            )
        finally:
            await asyncio.wait_for(pool.close(), 10)
        return set().union(*results)

    try:
        pids = asyncio.run(main())
        # The statements met several upstream connections (never more than the pool allows).
        assert 1 < len(pids) <= 3
    finally:
        _drop(pg, *(f"{prefix}_{i}" for i in range(tasks_n)))


# -- psycopg 3 -----------------------------------------------------------------------------------------------


def test_psycopg_plain_queries(dsn: str, pg: DevClusters) -> None:
    table = "pg3_plain"
    try:
        with _connect(dsn, autocommit=False) as conn:
            row = conn.execute(
                "SELECT %s::int, %s::text, %s::numeric, %s::date, %s::bytea, %s::int IS NULL",
                (7, "héllo", Decimal("1.25"), datetime.date(2024, 2, 29), b"\x00\xff", None),
            ).fetchone()
            assert row == (7, "héllo", Decimal("1.25"), datetime.date(2024, 2, 29), b"\x00\xff", True)
            assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
            conn.commit()
            conn.execute(f"INSERT INTO {table} VALUES (3, 'c')")
            conn.rollback()
            rows = conn.execute(f"SELECT id, v FROM {table} ORDER BY id").fetchall()
            assert rows == [(1, "a"), (2, "b")]
            conn.commit()
            cur = conn.cursor()
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"v{i}") for i in range(10, 20)])
            conn.commit()
            assert conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (
                12,
                3 + sum(range(10, 20)),
            )
            conn.commit()
        assert pg.main.psql(f"SELECT count(*) FROM {table}") == "12"
    finally:
        _drop(pg, table)


def test_psycopg_pipeline_mode(dsn: str, pg: DevClusters) -> None:
    table = "pg3_pipeline"
    try:
        with _connect(dsn) as conn:
            conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, v text NOT NULL)")
            with conn.pipeline():
                ins = conn.execute(f"INSERT INTO {table} (v) VALUES (%s), (%s) RETURNING id", ("x", "y"))
                sel = conn.execute(f"SELECT v FROM {table} ORDER BY id")
                calc = conn.execute("SELECT %s::int + %s::int", (20, 22))
                cur = conn.cursor()
                cur.executemany(f"INSERT INTO {table} (v) VALUES (%s)", [(f"m{i}",) for i in range(5)])
                cnt = conn.execute(f"SELECT count(*) FROM {table}")
            assert [r[0] for r in ins.fetchall()] == [1, 2]
            assert sel.fetchall() == [("x",), ("y",)]
            assert calc.fetchone() == (42,)
            assert cnt.fetchone() == (7,)
            # A pipeline inside an explicit transaction, then plain use again.
            with conn.transaction(), conn.pipeline():
                conn.execute(f"UPDATE {table} SET v = upper(v) WHERE v = %s", ("x",))
                up = conn.execute(f"SELECT v FROM {table} WHERE id = %s", (1,))
            assert up.fetchone() == ("X",)
            assert conn.execute(f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}").fetchone() == (
                "X,y,m0,m1,m2,m3,m4",
            )
    finally:
        _drop(pg, table)


def test_psycopg_copy(dsn: str, pg: DevClusters) -> None:
    table = "pg3_copy"
    rows = [(i, f"row {i}\twith tab" if i % 5 == 0 else f"row {i}") for i in range(1, 1001)]
    try:
        with _connect(dsn) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL)")
            cur = conn.cursor()
            with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            assert cur.rowcount == len(rows)
            with cur.copy(f"COPY {table} (id, v) TO STDOUT") as copy:
                copy.set_types(["int4", "text"])
                got = list(copy.rows())
            assert sorted(got) == rows
            # Binary COPY both ways, inside a transaction.
            with conn.transaction():
                with cur.copy(f"COPY {table} (id, v) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "text"])
                    for i in range(2001, 2101):
                        copy.write_row((i, f"bin {i}"))
                with cur.copy(
                    f"COPY (SELECT id, v FROM {table} WHERE id > 2000 ORDER BY id) TO STDOUT (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["int4", "text"])
                    assert list(copy.rows()) == [(i, f"bin {i}") for i in range(2001, 2101)]
            # A COPY that fails (duplicate key) leaves the connection usable.
            with (
                pytest.raises(psycopg.errors.UniqueViolation),
                cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy,
            ):
                copy.write_row((5000, "new"))
                copy.write_row((1, "duplicate"))
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (len(rows) + 100,)
            assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
        assert pg.main.psql(f"SELECT count(*) FROM {table} WHERE id = 5000") == "0"
    finally:
        _drop(pg, table)


def test_psycopg_prepared_statements_across_pooled_connections(start_proxy: StartProxy) -> None:
    """``prepare=True`` statements from several clients over 2 upstream connections.

    psycopg names its statements _pg3_0, _pg3_1, ... per connection, so the same client-side name means a
    different statement on each client here (each prepares its queries in a different order)."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 2}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    queries: list[tuple[str, Callable[[int], tuple[object, ...]], Callable[[int], tuple[object, ...]]]] = [
        ("SELECT pg_backend_pid(), %s::int * 3", lambda x: (x,), lambda x: (x * 3,)),
        ("SELECT pg_backend_pid(), %s::text || '-suffix'", lambda x: (str(x),), lambda x: (f"{x}-suffix",)),
        ("SELECT pg_backend_pid(), %s::int + %s::int", lambda x: (x, 1000), lambda x: (x + 1000,)),
        (
            "SELECT pg_backend_pid(), length(repeat('ab', %s::int))",
            lambda x: (x % 50,),
            lambda x: (2 * (x % 50),),
        ),
    ]

    def run(conn: psycopg.Connection[tuple[object, ...]], q: int, x: int) -> int:
        text, args, expect = queries[q]
        row = conn.execute(text, args(x), prepare=True).fetchone()
        assert row is not None
        assert tuple(row[1:]) == expect(x), (text, x, row)
        pid = row[0]
        assert isinstance(pid, int)
        return pid

    conns = [_connect(dsn) for _ in range(4)]
    holder = _connect(dsn, autocommit=False)
    try:
        # Deterministic part: client 0 prepares while the holder keeps the other upstream connection busy.
        # Then a third client's transaction takes client 0's connection (the one that has lingered longest
        # between transactions), so client 0's next statements run on the holder's connection, which has
        # never seen them: the proxy must prepare them there first.
        holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()
        first = {run(conns[0], q, 1) for q in range(len(queries))}
        holder.commit()
        assert holder_pid is not None and holder_pid[0] not in first
        third = _connect(dsn, autocommit=False)
        try:
            assert third.execute("SELECT pg_backend_pid()").fetchone() == (next(iter(first)),)
            seen = {run(conns[0], q, x) for x in range(2, 6) for q in range(len(queries))}
            third.commit()
        finally:
            third.close()
        assert seen == {holder_pid[0]}, "client 0's statements did not move to the second upstream connection"

        # Concurrent part: every client prepares the queries in its own order; names collide across clients.
        errors: list[BaseException] = []
        pids_by_client: list[set[int]] = [set() for _ in conns]

        def worker(c: int) -> None:
            try:
                order = [(q + c) % len(queries) for q in range(len(queries))]
                for x in range(60):
                    for q in order:
                        pids_by_client[c].add(run(conns[c], q, x * 10 + c))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(1, len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "workers did not finish in 60s"
        assert not errors, errors
        assert len(set().union(*pids_by_client)) == 2
        # psycopg really prepared them (server-side names are per client).
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in [*conns, holder]:
            conn.close()


def _schema_change_psycopg(dsn: str, pg: DevClusters, table: str) -> list[tuple[object, ...]]:
    """Client A prepares ``SELECT * FROM table``; the table gains a column; a fresh client B prepares the same
    text. B must see the new column (its statement is new to PostgreSQL)."""
    with _connect(dsn) as a:
        a.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        a.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        for _ in range(3):
            assert a.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [(1, "a")]
        pg.main.psql(f"ALTER TABLE {table} ADD COLUMN extra int NOT NULL DEFAULT 7")
        with _connect(dsn) as b:
            return b.execute(f"SELECT * FROM {table}", prepare=True).fetchall()


def test_prepared_statement_after_schema_change(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1}}})
    table = "pg3_schema_change"
    try:
        got = _schema_change_psycopg(proxy.dsn(APP_USER, APP_PASSWORD), pg, table)
        assert got == [(1, "a", 7)]
    finally:
        _drop(pg, table)


def test_asyncpg_statement_cache_after_schema_change(start_proxy: StartProxy, pg: DevClusters) -> None:
    """asyncpg re-prepares a cached statement whose result type changed (InvalidCachedStatementError)."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 2}}})
    table = "apg_schema_change"

    async def main() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(proxy.dsn(APP_USER, APP_PASSWORD), timeout=10)
        try:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            for _ in range(3):
                rows = await conn.fetch(f"SELECT * FROM {table} WHERE id = $1", 1)
                assert [tuple(r) for r in rows] == [(1, "a")]
            await conn.execute(f"ALTER TABLE {table} ADD COLUMN extra int NOT NULL DEFAULT 7")
            rows = await conn.fetch(f"SELECT * FROM {table} WHERE id = $1", 1)
            return [tuple(r) for r in rows]
        finally:
            await conn.close(timeout=5)

    try:
        assert asyncio.run(main()) == [(1, "a", 7)]
    finally:
        _drop(pg, table)


# -- extended protocol edge cases ----------------------------------------------------------------------------


def test_pipeline_error_midway_then_next_sync_works(dsn: str, pg: DevClusters) -> None:
    table = "pg3_pipe_err"
    try:
        with _connect(dsn) as conn:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
            with conn.pipeline() as p:
                ok1 = conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (1,))
                conn.execute("SELECT 1 / %s::int", (0,))
                after = conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (2,))
                with pytest.raises(psycopg.errors.DivisionByZero):
                    p.sync()
                # The insert before the error ran, but in the unit's implicit transaction, which failed.
                assert ok1.fetchone() == (1,)
                with pytest.raises(psycopg.ProgrammingError, match="no result available"):
                    after.fetchone()  # skipped by the server after the error
                # The next sync unit runs normally.
                nxt = conn.execute("SELECT %s::int * 2", (21,))
                ins = conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (3,))
                p.sync()
                assert nxt.fetchone() == (42,)
                assert ins.fetchone() == (3,)
                # A parse error (bad SQL) in the middle of a unit.
                conn.execute("SELECT %s::int", (1,))
                conn.execute("SELEC broken syntax")
                conn.execute("SELECT 2")
                with pytest.raises(psycopg.errors.SyntaxError):
                    p.sync()
                last = conn.execute("SELECT count(*) FROM " + table)
            assert last.fetchone() == (1,)
            assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == ([3],)
    finally:
        _drop(pg, table)


def test_statement_errors_leave_connection_usable(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 2}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    table = "pg3_stmt_err"
    try:
        with _connect(dsn) as conn, _connect(dsn, autocommit=False) as other:
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
            # Errors in the simple and extended protocols, a parse error, a failing prepared statement.
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            assert conn.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / %s::int", (0,))
            assert conn.execute("SELECT %s::int", (2,)).fetchone() == (2,)
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT * FROM pg3_no_such_table WHERE x = %s", (1,))
            with pytest.raises(psycopg.errors.SyntaxError):
                conn.execute("SELEC %s", (1,), prepare=True)
            for i in range(6):
                # The same prepared statement alternately fails and succeeds, on whichever upstream is free.
                if i % 2:
                    other.execute("SELECT 1")  # hold one upstream connection in a transaction
                if i % 3 == 0:
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        conn.execute("SELECT 10 / %s::int", (0,), prepare=True)
                else:
                    assert conn.execute("SELECT 10 / %s::int", (i,), prepare=True).fetchone() == (10 // i,)
                other.rollback()
            # Errors inside a transaction: the transaction is aborted until rollback, then all is well.
            conn.autocommit = False
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.rollback()
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
            conn.commit()
            assert conn.execute(f"SELECT array_agg(id) FROM {table}").fetchone() == ([2],)
            conn.commit()
            # Composed (client-side) SQL with identifiers also works after all that.
            q = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            assert conn.execute(q).fetchone() == (1,)
    finally:
        _drop(pg, table)


def test_deallocate_of_client_statements_is_answered_by_the_proxy(start_proxy: StartProxy) -> None:
    """psycopg with a small prepared cache DEALLOCATEs the statements it evicts (a simple Query naming
    its own _pg3_N): the proxy answers it (the upstream name differs, and the upstream statement may be
    shared), then a DEALLOCATE ALL, and every statement keeps working after both."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1}}})
    with _connect(proxy.dsn(APP_USER, APP_PASSWORD)) as conn:
        conn.prepared_max = 2
        conn.prepare_threshold = 0
        for x in range(1, 4):
            for k in range(5):
                row = conn.execute(f"SELECT %s::int * {k + 2}", (x,)).fetchone()
                assert row == (x * (k + 2),)
        assert conn.execute("DEALLOCATE ALL", prepare=False).statusmessage == "DEALLOCATE ALL"
        for k in range(5):
            assert conn.execute(f"SELECT %s::int * {k + 2}", (7,)).fetchone() == (7 * (k + 2),)
