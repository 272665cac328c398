"""Read-your-writes (issue 14, part 1) against a replica that is really behind.

The replica applies commits 300 ms late (``recovery_min_apply_delay``) or has its replay paused; a read
right after a write must still see it (``routing.read_your_writes``), and with ``scope: off`` it does not:
the same test proves it can fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from urllib.parse import quote

import asyncpg
import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.frontend.ryw import PARAMETER
from proxy.health import parse_lsn
from proxy.protocol import messages as m

from .test_extended_begin import EXECUTE, _replies
from .test_fuzz_socket import Session

StartProxy = Callable[..., ProxyProcess]
BIND = m.bind_raw("", "", b"\x00" * 6)  # unnamed portal and statement, no parameters, text results
ROUNDS = 200
# Paused replay makes the replica's lag grow (the age of its last replayed commit): it must stay usable, so
# that the reads these tests make are decided by read-your-writes, not by the lag limit.
FAST_HEALTH = {"interval": "200ms", "timeout": "1s", "max_replica_lag": "1h"}
Conn = psycopg.Connection[tuple[object, ...]]


def connect(proxy: ProxyProcess, **params: str) -> Conn:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD, **params), autocommit=True)


def ryw_proxy(start_proxy: StartProxy, scope: str, max_wait: str = "10ms") -> ProxyProcess:
    config = {
        "routing": {"read_your_writes": {"scope": scope, "max_wait": max_wait}},
        "health": FAST_HEALTH,
        "domains": {"documents": ["ryw_doc"]},
        "auth": {"admin_users": [APP_USER]},
    }
    proxy = start_proxy(roles=("main", "read_replica", "documents"), config=config)
    # The replica is probed (and usable) before the test reads: a read before that would go to main anyway.
    probed = "event=health_initial upstream=read_replica"
    wait_until(lambda: probed in proxy.log(), 30, "the replica's first probe")
    return proxy


@pytest.fixture
def table(pg: DevClusters) -> Iterator[str]:
    pg.main.psql("DROP TABLE IF EXISTS ryw_t; CREATE TABLE ryw_t (id int PRIMARY KEY)", superuser=False)
    pg.wait_replica_caught_up()
    yield "ryw_t"
    pg.main.psql("DROP TABLE IF EXISTS ryw_t", superuser=False)


@pytest.fixture
def delayed(pg: DevClusters, table: str) -> Iterator[None]:
    """The replica applies each commit 300 ms after main made it."""
    pg.read_replica.psql("ALTER SYSTEM SET recovery_min_apply_delay = '300ms'")
    pg.read_replica.psql("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        pg.read_replica.psql("ALTER SYSTEM RESET recovery_min_apply_delay")
        pg.read_replica.psql("SELECT pg_reload_conf()")
        pg.wait_replica_caught_up()


@pytest.fixture
def paused(pg: DevClusters, table: str) -> Iterator[None]:
    """The replica replays nothing until the test ends."""
    pg.read_replica.psql("SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        if pg.read_replica.running:
            pg.read_replica.psql("SELECT pg_wal_replay_resume()")
        pg.wait_replica_caught_up()


def stale_reads(writer: Conn, reader: Conn, base: int) -> int:
    """ROUNDS inserts on ``writer``, each read back at once on ``reader``: how many reads missed the row."""
    missed = 0
    for i in range(base, base + ROUNDS):
        writer.execute("INSERT INTO ryw_t VALUES (%s)", (i,))
        row = reader.execute("SELECT count(*) FROM ryw_t WHERE id = %s", (i,)).fetchone()
        assert row is not None
        missed += row[0] == 0
    return missed


@pytest.mark.parametrize("scope", ["off", "user", "connection"])
def test_insert_then_select(scope: str, delayed: None, start_proxy: StartProxy) -> None:
    proxy = ryw_proxy(start_proxy, scope)
    with connect(proxy) as one, connect(proxy) as two:
        same = stale_reads(one, one, 0)
        across = stale_reads(one, two, 1000)
    if scope == "off":
        # Proof that the test can fail: without read-your-writes the delayed replica answers, and misses.
        assert same > 0
        assert across > 0
        assert proxy.metric("parafort_proxy_replica_reads_total", outcome="main_for_consistency") == 0
        return
    assert same == 0
    if scope == "user":
        assert across == 0  # two connections of one user share one token
    assert proxy.metric("parafort_proxy_replica_reads_total", outcome="main_for_consistency") > 0


@pytest.mark.parametrize("commit", ["simple", "extended"])
def test_write_transactions_then_select(commit: str, paused: None, start_proxy: StartProxy) -> None:
    """A write transaction's COMMIT carries read-your-writes' capture behind it (in the same write, on the
    fast path): the client hears its new write position before the COMMIT returns, and reads right after
    it, on the connection that wrote and on another of the user's, see the row although the replica
    replays nothing."""
    proxy = ryw_proxy(start_proxy, "user")
    positions: list[int] = []
    with connect(proxy) as one, connect(proxy) as two:
        for i in range(20):
            one.execute("BEGIN")
            one.execute("INSERT INTO ryw_t VALUES (%s)", (i,))
            if commit == "simple":
                one.execute("COMMIT")
            else:
                with one.pipeline():
                    one.execute("COMMIT")  # Parse/Bind/Describe/Execute/Sync
            position = parse_lsn(one.info.parameter_status(PARAMETER) or "")
            assert position is not None
            positions.append(position)
            for reader in (one, two):
                row = reader.execute("SELECT count(*) FROM ryw_t WHERE id = %s", (i,)).fetchone()
                assert row == (1,)
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert proxy.metric("parafort_proxy_replica_reads_total", outcome="main_for_consistency") >= 40


def test_ddl_then_read(delayed: None, start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = ryw_proxy(start_proxy, "user")
    try:
        with connect(proxy) as conn:
            for i in range(20):
                conn.execute(f"CREATE TABLE ryw_ddl_{i} (a int)")
                conn.execute(f"SELECT * FROM ryw_ddl_{i}")  # "relation does not exist" on a stale replica
    finally:
        pg.main.psql("".join(f"DROP TABLE IF EXISTS ryw_ddl_{i};" for i in range(20)), superuser=False)


def test_domain_write_then_read(delayed: None, start_proxy: StartProxy, pg: DevClusters) -> None:
    """A domain role has no replica: its reads never wait, and see its writes."""
    pg.documents.psql("DROP TABLE IF EXISTS ryw_doc; CREATE TABLE ryw_doc (id int)", superuser=False)
    try:
        proxy = ryw_proxy(start_proxy, "user")
        with connect(proxy) as conn:
            for i in range(20):
                conn.execute("INSERT INTO ryw_doc VALUES (%s)", (i,))
                row = conn.execute("SELECT count(*), inet_server_port() FROM ryw_doc WHERE id = %s", (i,))
                assert row.fetchone() == (1, pg.documents.port)
        assert proxy.metric("parafort_proxy_read_wait_seconds_count") == 0
        assert proxy.metric("parafort_proxy_ryw_tokens") == 0  # no write on main: nothing captured
    finally:
        pg.documents.psql("DROP TABLE IF EXISTS ryw_doc", superuser=False)


def test_read_without_write_goes_to_replica(table: str, start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = ryw_proxy(start_proxy, "user")
    with connect(proxy) as conn:
        row = conn.execute("SELECT inet_server_port() FROM (SELECT count(*) FROM ryw_t) t").fetchone()
        assert row is not None
        assert row[0] == pg.read_replica.port
    assert proxy.metric("parafort_proxy_replica_reads_total", outcome="replica") >= 1
    assert proxy.metric("parafort_proxy_ryw_tokens") == 0


def test_token_never_reached_goes_to_main_after_max_wait(
    paused: None, start_proxy: StartProxy, pg: DevClusters
) -> None:
    proxy = ryw_proxy(start_proxy, "user", max_wait="50ms")
    with connect(proxy) as conn:
        conn.execute("INSERT INTO ryw_t VALUES (1)")
        row = conn.execute("SELECT count(*), inet_server_port() FROM ryw_t WHERE id = 1").fetchone()
        assert row == (1, pg.main.port)
    assert proxy.metric("parafort_proxy_replica_reads_total", outcome="main_for_consistency") == 1
    assert proxy.metric("parafort_proxy_read_wait_seconds_count") == 1
    # It waited all of max_wait: asyncio runs a timer once ``time() + clock_resolution`` reaches it (a clock
    # tick early at most), and the sum goes through float arithmetic, so allow a microsecond.
    assert proxy.metric("parafort_proxy_read_wait_seconds_sum") >= 0.05 - 1e-6
    assert proxy.metric("parafort_proxy_ryw_tokens") == 1
    # The admin console says why.
    console = proxy.dsn(APP_USER, APP_PASSWORD, database="parafort_admin")
    with psycopg.connect(console, autocommit=True) as admin:
        rows = admin.execute("SHOW CONSISTENCY").fetchall()
    reasons = [str(r[2]) for r in rows if str(r[0]).startswith("to_main:")]
    assert any("behind token" in r for r in reasons), rows


def test_write_lsn_and_min_lsn_across_connections(
    delayed: None, start_proxy: StartProxy, pg: DevClusters
) -> None:
    """A writer hears its position (ParameterStatus parafort.write_lsn) after each write; another
    connection, with no token of its own (scope connection), asks for it with SET parafort.min_lsn."""
    proxy = ryw_proxy(start_proxy, "connection")
    with connect(proxy) as writer, connect(proxy) as reader:
        assert writer.info.parameter_status(PARAMETER) is None
        seen: list[int] = []
        for i in range(5):
            writer.execute("INSERT INTO ryw_t VALUES (%s)", (i,))
            writer.execute("SELECT 1")  # libpq reads the ParameterStatus that followed the INSERT's reply
            token = writer.info.parameter_status(PARAMETER)
            assert token is not None
            lsn = parse_lsn(token)
            assert lsn is not None
            assert not seen or lsn > seen[-1]
            seen.append(lsn)
            reader.execute(f"SET parafort.min_lsn = '{token}'")
            row = reader.execute("SELECT count(*) FROM ryw_t WHERE id = %s", (i,)).fetchone()
            assert row == (1,)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            reader.execute("SET parafort.min_lsn = 'not a position'")
        reader.execute("RESET parafort.min_lsn")
        # The same as a startup option (options=-c parafort.min_lsn=...).
        writer.execute("INSERT INTO ryw_t VALUES (100)")
        writer.execute("SELECT 1")
        token = writer.info.parameter_status(PARAMETER)
        assert token is not None
        with connect(proxy, options=quote(f"-c parafort.min_lsn={token}")) as third:
            row = third.execute("SELECT count(*) FROM ryw_t WHERE id = 100").fetchone()
            assert row == (1,)


def test_main_restarted_between_write_and_read(
    paused: None, start_proxy: StartProxy, pg: DevClusters
) -> None:
    proxy = ryw_proxy(start_proxy, "user")
    with connect(proxy) as conn:
        conn.execute("INSERT INTO ryw_t VALUES (7)")
    pg.main.restart()
    wait_until(lambda: pg.main.psql("SELECT 1") == "1", 30, "main to take connections")
    with connect(proxy) as conn:
        row = conn.execute("SELECT count(*), inet_server_port() FROM ryw_t WHERE id = 7").fetchone()
    assert row == (1, pg.main.port)


def test_min_lsn_as_a_startup_parameter(delayed: None, start_proxy: StartProxy) -> None:
    """asyncpg sends server_settings as startup parameters: ``parafort.min_lsn`` is the proxy's own (never
    passed to PostgreSQL), and an invalid one ends the login with 22023."""
    proxy = ryw_proxy(start_proxy, "connection")
    with connect(proxy) as writer:
        writer.execute("INSERT INTO ryw_t VALUES (1)")
        writer.execute("SELECT 1")
        token = writer.info.parameter_status(PARAMETER)
        assert token is not None

    async def read(min_lsn: str) -> object:
        conn = await asyncpg.connect(
            proxy.dsn(APP_USER, APP_PASSWORD), server_settings={"parafort.min_lsn": min_lsn}
        )
        try:
            return await conn.fetchval("SELECT count(*) FROM ryw_t WHERE id = 1")
        finally:
            await conn.close()

    assert asyncio.run(read(token)) == 1
    with pytest.raises(asyncpg.InvalidParameterValueError):
        asyncio.run(read("nope"))


def written_token(writer: Conn, row_id: int) -> str:
    writer.execute("INSERT INTO ryw_t VALUES (%s)", (row_id,))
    writer.execute("SELECT 1")  # libpq reads the ParameterStatus that followed the INSERT's reply
    token = writer.info.parameter_status(PARAMETER)
    assert token is not None
    return token.decode() if isinstance(token, bytes) else str(token)


def test_min_lsn_through_the_extended_protocol(paused: None, start_proxy: StartProxy) -> None:
    """SET parafort.min_lsn as JDBC and psycopg's pipeline mode send it (Parse/Bind/Describe/Execute up to
    Sync or Flush, answered by the proxy), as a named prepared statement (psycopg ``prepare=True``: it runs
    upstream as a placeholder setting and takes effect once it succeeded), and RESET the same ways. The
    replica replays nothing: a read that honours the position goes to main and sees the row, one that does
    not goes to the replica and misses it."""
    proxy = ryw_proxy(start_proxy, "connection")

    def count(conn: Conn, row_id: int) -> object:
        row = conn.execute("SELECT count(*) FROM ryw_t WHERE id = %s", (row_id,)).fetchone()
        return None if row is None else row[0]

    with connect(proxy) as writer, connect(proxy) as reader:
        token = written_token(writer, 1)
        assert count(reader, 1) == 0  # no position asked for: the replica, which is behind
        with reader.pipeline() as p:
            reader.execute(f"SET parafort.min_lsn = '{token}'")
            p.sync()
            read = reader.execute("SELECT count(*) FROM ryw_t WHERE id = 1")
        assert read.fetchone() == (1,)
        reader.execute("RESET parafort.min_lsn", prepare=True)
        assert count(reader, 1) == 0

        token = written_token(writer, 2)
        reader.execute(f"SET parafort.min_lsn = '{token}'", prepare=True)
        assert count(reader, 2) == 1
        with reader.pipeline():
            # Not the text prepared above (psycopg would Bind that statement): Parse/Bind/Execute up to Sync,
            # answered by the proxy. psycopg then sends a lone Flush, which must not hold an upstream
            # connection for this client (the read below would then run on main).
            reader.execute("reset parafort.min_lsn")
        assert count(reader, 2) == 0

        with pytest.raises(psycopg.errors.InvalidParameterValue), reader.pipeline():
            reader.execute("SET parafort.min_lsn = 'not a position'")
        assert reader.execute("SELECT 1").fetchone() == (1,)


def test_min_lsn_extended_error_skips_to_sync(delayed: None, start_proxy: StartProxy) -> None:
    """An invalid position sent with Parse/Bind/Execute/Flush: ParseComplete, BindComplete, the error
    (22023); then everything up to Sync is ignored, as PostgreSQL does after an error in the extended
    protocol, and the connection goes on."""
    proxy = ryw_proxy(start_proxy, "connection")
    s = Session(proxy)
    try:
        s.sock.sendall(m.parse("", "SET parafort.min_lsn = 'x/y'") + BIND + EXECUTE + m.flush())
        got = [s._message() for _ in range(3)]
        assert [t for t, _ in got] == [ord("1"), ord("2"), ord("E")], got
        assert m.parse_fields(got[2][1])["C"] == "22023"
        got = _replies(s, m.parse("", "SELECT 1") + BIND + EXECUTE + m.sync())
        assert got == [(m.B.READY_FOR_QUERY, b"I")]
        got = _replies(s, m.parse("", "RESET parafort.min_lsn") + BIND + EXECUTE + m.sync())
        assert [t for t, _ in got] == [ord("1"), ord("2"), ord("C"), ord("Z")], got
        assert got[2][1] == b"RESET\x00"
        got = _replies(s, m.query("SELECT 2"))
        assert [t for t, _ in got] == [ord("T"), ord("D"), ord("C"), ord("Z")], got
    finally:
        s.close()


def test_unnamed_statement_outlives_the_capture(table: str, start_proxy: StartProxy) -> None:
    """A client may Bind its unnamed statement again in a later Sync without a new Parse (PostgreSQL keeps
    it until the next unnamed Parse or simple Query). The capture after an autocommit write is a simple
    Query on the same connection, which destroys the unnamed statement upstream: the client's Bind must
    still succeed, as it would on a direct connection."""
    proxy = ryw_proxy(start_proxy, "user")
    s = Session(proxy)
    try:
        insert = m.parse("", "INSERT INTO ryw_t SELECT coalesce(max(id), 0) + 1 FROM ryw_t")
        again = BIND + EXECUTE + m.sync()
        for send in (insert + again, again, again):
            got = _replies(s, send)
            types = [t for t, _ in got if t != m.B.PARAMETER_STATUS]
            assert types[-3:] == [ord("2"), ord("C"), ord("Z")], got
        got = _replies(s, m.query("SELECT count(*) FROM ryw_t"))
        assert [p for t, p in got if t == ord("D")] == [b"\x00\x01\x00\x00\x00\x013"], got
    finally:
        s.close()
