"""BEGIN sent with the extended protocol (psycopg's pipeline mode, other pipelining drivers) with the replica
configured: deferred like a simple-protocol BEGIN, so the transaction's upstream is chosen by its first real
statement, and a transaction not declared READ ONLY runs on a primary (main, or a domain's role), never on
the replica where its later writes would fail (issue 14)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.protocol import messages as m

from .test_fuzz_socket import Session

ALL_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
TABLE = "ext_begin"
EXECUTE = b"E" + struct.pack("!iBi", 9, 0, 0)  # Execute: unnamed portal, no row limit


@pytest.fixture
def routed(start_proxy: Callable[..., ProxyProcess], schema: None) -> ProxyProcess:
    return start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS})


@pytest.fixture
def table(pg: DevClusters, schema: None) -> Iterator[str]:
    pg.main.psql(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text NOT NULL)", superuser=False)
    pg.wait_replica_caught_up()
    yield TABLE
    pg.main.psql(f"DROP TABLE IF EXISTS {TABLE}", superuser=False)


def connect(proxy: ProxyProcess) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, connect_timeout=10)


def rows_on_main(pg: DevClusters) -> int:
    return int(pg.main.psql(f"SELECT count(*) FROM {TABLE}", superuser=False))


@pytest.mark.parametrize(
    "begin", ["BEGIN", "BEGIN READ WRITE", "BEGIN ISOLATION LEVEL REPEATABLE READ", "START TRANSACTION"]
)
def test_pipeline_begin_and_read_in_one_sync_then_write(
    pg: DevClusters, routed: ProxyProcess, table: str, begin: str
) -> None:
    """The failure that exposed it: BEGIN + SELECT in one sync went to the replica, and the INSERT of the
    next sync failed there (25006, or 25001 'cannot set transaction read-write mode during recovery')."""
    with connect(routed) as conn:
        with conn.pipeline() as p:
            conn.execute(begin)
            read = conn.execute(f"SELECT inet_server_port(), count(*) FROM {table}")
            p.sync()
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            p.sync()
            again = conn.execute(f"SELECT count(*) FROM {table}")
            conn.execute("COMMIT")
        assert read.fetchone() == (pg.main.port, 0)
        assert again.fetchone() == (1,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert rows_on_main(pg) == 1


def test_pipeline_begin_alone_then_read_then_write(pg: DevClusters, routed: ProxyProcess, table: str) -> None:
    """BEGIN alone up to its Sync: answered as PostgreSQL would (status T), run with the first statement."""
    with connect(routed) as conn:
        with conn.pipeline() as p:
            conn.execute("BEGIN")
            p.sync()
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            read = conn.execute(f"SELECT inet_server_port(), count(*) FROM {table}")
            p.sync()
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            conn.execute("COMMIT")
        assert read.fetchone() == (pg.main.port, 0)
    assert rows_on_main(pg) == 1


def test_psycopg_transaction_block_in_pipeline_mode(
    pg: DevClusters, routed: ProxyProcess, table: str
) -> None:
    with connect(routed) as conn, conn.pipeline() as p:
        with conn.transaction():
            read = conn.execute(f"SELECT inet_server_port(), count(*) FROM {table}")
            p.sync()
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        assert read.fetchone() == (pg.main.port, 0)
        # Non-autocommit pipeline: psycopg's own implicit BEGIN before the first statement.
    with psycopg.connect(routed.dsn(APP_USER, APP_PASSWORD), connect_timeout=10) as conn:
        with conn.pipeline() as p:
            read = conn.execute(f"SELECT inet_server_port(), count(*) FROM {table}")
            p.sync()
            conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
        conn.commit()
        assert read.fetchone() == (pg.main.port, 1)
    assert rows_on_main(pg) == 2


def test_pipeline_begin_alone_then_domain_table(pg: DevClusters, routed: ProxyProcess) -> None:
    """The first real statement chooses the upstream: a domain table's transaction runs on its role (an
    extended BEGIN sent to main at once made the statement a cross-upstream refusal, 0A000)."""
    with connect(routed) as conn:
        with conn.pipeline() as p:
            conn.execute("BEGIN")
            p.sync()
            read = conn.execute("SELECT inet_server_port(), count(*) >= 0 FROM user_activity")
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'ext-begin')")
            conn.execute("ROLLBACK")
        assert read.fetchone() == (pg.analytics.port, True)


def test_pipeline_begin_read_only_reads_on_the_replica(
    pg: DevClusters, routed: ProxyProcess, table: str
) -> None:
    with connect(routed) as conn:
        with conn.pipeline() as p:
            conn.execute("BEGIN READ ONLY")
            read = conn.execute(f"SELECT inet_server_port(), count(*) FROM {table}")
            p.sync()
            conn.execute("COMMIT")
        assert read.fetchone() == (pg.read_replica.port, 0)


def test_pipeline_commit_of_a_transaction_that_ran_nothing(routed: ProxyProcess) -> None:
    with connect(routed) as conn:
        with conn.pipeline() as p:
            conn.execute("BEGIN")
            p.sync()
            conn.execute("COMMIT")
            p.sync()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _replies(s: Session, data: bytes) -> list[tuple[int, bytes]]:
    """Send ``data`` and read backend messages up to and including the next ReadyForQuery."""
    s.sock.sendall(data)
    out: list[tuple[int, bytes]] = []
    while not out or out[-1][0] != m.B.READY_FOR_QUERY:
        out.append(s._message())
    return out


def test_extended_begin_replies_in_order(pg: DevClusters, routed: ProxyProcess, table: str) -> None:
    """ParseComplete, BindComplete, NoData, CommandComplete BEGIN, ReadyForQuery T, as PostgreSQL sends
    them; then the transaction runs on main and ends with status I."""
    begin = m.parse("", "BEGIN") + m.bind_raw("", "", b"\x00\x00\x00\x00\x00\x00") + m.describe(b"P", "")
    begin += EXECUTE
    s = Session(routed)
    try:
        got = _replies(s, begin + m.sync())
        assert [t for t, _ in got] == [ord("1"), ord("2"), ord("n"), ord("C"), ord("Z")]
        assert got[3][1] == b"BEGIN\x00"
        assert got[4][1] == b"T"
        got = _replies(s, m.query(f"INSERT INTO {table} VALUES (7, 'x')"))
        assert [t for t, _ in got] == [ord("C"), ord("Z")], got
        assert got[-1][1] == b"T"
        got = _replies(s, m.query("COMMIT"))
        assert got[0][1] == b"COMMIT\x00" and got[-1][1] == b"I"
        # A second BEGIN while one is open: PostgreSQL's warning (25001), still in the transaction.
        got = _replies(s, begin + m.sync())
        assert got[-1][1] == b"T"
        got = _replies(s, begin + m.sync())
        assert [t for t, _ in got] == [ord("1"), ord("2"), ord("n"), ord("N"), ord("C"), ord("Z")]
        assert m.parse_fields(got[3][1])["C"] == "25001"
        got = _replies(s, m.query("ROLLBACK"))
        assert got[-1][1] == b"I"
    finally:
        s.close()
    assert rows_on_main(pg) == 1


def test_asyncpg_transactions_with_the_replica(pg: DevClusters, routed: ProxyProcess, table: str) -> None:
    async def run() -> tuple[int, int, int]:
        conn = await asyncpg.connect(routed.dsn(APP_USER, APP_PASSWORD), timeout=10)
        try:
            async with conn.transaction():
                first = await conn.fetchval(f"SELECT inet_server_port() FROM {table} LIMIT 1 OFFSET 0")
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "a")
                port = await conn.fetchval("SELECT inet_server_port()")
            async with conn.transaction(isolation="repeatable_read"):
                await conn.fetch(f"SELECT * FROM {table} WHERE id = $1", 1)
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 2, "b")
            # Read-your-writes (on by default): this user's read runs on the replica once it has replayed the
            # inserts above, else on main. Wait until the proxy has seen it do so (no token left).
            await asyncio.to_thread(
                wait_until,
                lambda: routed.metric("parafort_proxy_ryw_tokens") == 0,
                30,
                "the replica to replay the inserts",
            )
            async with conn.transaction(readonly=True):
                replica = await conn.fetchval(f"SELECT inet_server_port() + 0 * count(*) FROM {table}")
            assert first is None
            return port, replica, await conn.fetchval(f"SELECT count(*) FROM {table}")
        finally:
            await conn.close()

    port, replica, _ = asyncio.run(asyncio.wait_for(run(), 60))
    assert port == pg.main.port
    assert replica == pg.read_replica.port
    assert rows_on_main(pg) == 2


def test_extended_begin_up_to_flush_then_a_lone_sync(
    pg: DevClusters, routed: ProxyProcess, table: str
) -> None:
    """BEGIN up to a Flush (no ReadyForQuery), then a Sync alone: answered T by the proxy, never opening the
    transaction on the replica (the last upstream used); the write that follows runs on main."""
    s = Session(routed)
    try:
        got = _replies(s, m.query(f"SELECT inet_server_port() FROM {table} LIMIT 1 OFFSET 0"))
        assert got[-1][1] == b"I"  # a read: the last upstream used is now the replica
        s.sock.sendall(
            m.parse("", "BEGIN READ WRITE") + m.bind_raw("", "", b"\x00" * 6) + EXECUTE + m.flush()
        )
        got = [s._message() for _ in range(3)]
        assert [t for t, _ in got] == [ord("1"), ord("2"), ord("C")], got
        got = _replies(s, m.sync())
        assert got == [(m.B.READY_FOR_QUERY, b"T")]
        got = _replies(s, m.query(f"INSERT INTO {table} VALUES (8, 'y') RETURNING inet_server_port()"))
        assert [t for t, _ in got] == [ord("T"), ord("D"), ord("C"), ord("Z")], got
        assert got[1][1].endswith(str(pg.main.port).encode())
        got = _replies(s, m.query("COMMIT"))
        assert got[-1][1] == b"I"
    finally:
        s.close()
    assert rows_on_main(pg) == 1


@pytest.mark.parametrize("end", ["ROLLBACK", "COMMIT"])
def test_extended_end_of_a_deferred_transaction_the_proxy_failed(routed: ProxyProcess, end: str) -> None:
    """BEGIN (answered by the proxy), a statement the proxy refuses (two upstreams: 0A000), then the end of
    the transaction sent with Parse/Bind/Execute/Sync, as JDBC sends it: PostgreSQL's replies (COMMIT of a
    failed transaction reports ROLLBACK), and the connection goes on. Before: 25P02 for either."""
    s = Session(routed)
    try:
        got = _replies(s, m.query("BEGIN"))
        assert got[-1] == (m.B.READY_FOR_QUERY, b"T")
        got = _replies(s, m.query("SELECT count(*) FROM users u JOIN documents d ON d.owner_id = u.id"))
        assert [t for t, _ in got] == [ord("E"), ord("Z")], got
        assert m.parse_fields(got[0][1])["C"] == "0A000"
        assert got[-1][1] == b"E"
        got = _replies(s, m.parse("", end) + m.bind_raw("", "", b"\x00" * 6) + EXECUTE + m.sync())
        assert [t for t, _ in got] == [ord("1"), ord("2"), ord("C"), ord("Z")], got
        assert got[2][1] == b"ROLLBACK\x00"
        assert got[3][1] == b"I"
        got = _replies(s, m.query("SELECT 1"))
        assert [t for t, _ in got] == [ord("T"), ord("D"), ord("C"), ord("Z")], got
    finally:
        s.close()


def test_rollback_to_a_savepoint_in_a_failed_deferred_transaction(routed: ProxyProcess) -> None:
    """ROLLBACK TO SAVEPOINT after the proxy failed a transaction that never reached an upstream: PostgreSQL's
    own answer (no such savepoint, 3B001), as on a direct connection; before, no reply came at all."""
    s = Session(routed)
    try:
        _replies(s, m.query("BEGIN"))
        got = _replies(s, m.query("SELECT count(*) FROM users u JOIN documents d ON d.owner_id = u.id"))
        assert m.parse_fields(got[0][1])["C"] == "0A000"
        got = _replies(s, m.query("ROLLBACK TO SAVEPOINT s"))
        assert [t for t, _ in got] == [ord("E"), ord("Z")], got
        assert m.parse_fields(got[0][1])["C"] == "3B001"
        got = _replies(s, m.query("ROLLBACK"))
        assert got[-1] == (m.B.READY_FOR_QUERY, b"I")
    finally:
        s.close()


def _chain_session(dsn: str, table: str) -> list[object]:
    """COMMIT / ROLLBACK AND CHAIN in simple and pipelined (extended) protocol: what the client sees."""
    seen: list[object] = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        conn.execute("COMMIT AND CHAIN")  # nothing ran: the proxy's deferred transaction
        seen.append(conn.info.transaction_status)
        seen.append(conn.execute("SHOW transaction_isolation").fetchone())
        conn.execute(f"INSERT INTO {table} VALUES (1, 'chained')")
        conn.execute("ROLLBACK AND CHAIN")  # the insert is undone, a transaction is still open
        seen.append(conn.info.transaction_status)
        seen.append(conn.execute(f"SELECT count(*) FROM {table}").fetchone())
        conn.execute("COMMIT")
        seen.append(conn.info.transaction_status)
        with conn.pipeline() as p:
            conn.execute("BEGIN")
            conn.execute("COMMIT AND CHAIN")
            p.sync()
        seen.append(conn.info.transaction_status)
        conn.execute("ROLLBACK")
        try:
            conn.execute("COMMIT AND CHAIN")  # outside a transaction block: PostgreSQL's error
        except psycopg.Error as exc:
            seen.append(exc.sqlstate)
        seen.append(conn.info.transaction_status)
    return seen


def test_commit_and_chain_as_on_postgresql(pg: DevClusters, routed: ProxyProcess, table: str) -> None:
    """AND CHAIN opens the next transaction at once: the proxy does not answer it as the end of a deferred
    transaction (it reported status I, and the statements after it ran in autocommit)."""
    through_proxy = _chain_session(routed.dsn(APP_USER, APP_PASSWORD), table)
    direct = _chain_session(pg.main.dsn, table)
    assert through_proxy == direct
    assert through_proxy[0] == psycopg.pq.TransactionStatus.INTRANS
    assert rows_on_main(pg) == 0
