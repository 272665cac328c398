"""Connection lifecycle through the proxy: cancel, pool exhaustion, killed clients, many short connections,
LISTEN/NOTIFY and authentication failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

StartProxy = Callable[..., ProxyProcess]
Conn = psycopg.Connection[tuple[object, ...]]


def _connect(dsn: str, autocommit: bool = True) -> Conn:
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)


def _active(pg: DevClusters, query: str, state: str = "active") -> int:
    """How many of main's backends are running exactly ``query`` in ``state``."""
    q = query.replace("'", "''")
    return int(
        pg.main.psql(f"SELECT count(*) FROM pg_stat_activity WHERE query = '{q}' AND state = '{state}'")
    )


def _upstream_backends(pg: DevClusters) -> int:
    return int(
        pg.main.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{pg.main.user}' "
            "AND backend_type = 'client backend'"
        )
    )


class _Runner(threading.Thread):
    """Runs ``fn`` in a daemon thread, keeping its result or exception and how long it took."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self.done_at = 0.0

    def run(self) -> None:
        start = time.monotonic()
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done_at = time.monotonic()
            self.elapsed = self.done_at - start


# -- cancel --------------------------------------------------------------------------------------------------


def test_cancel_reaches_only_the_right_statement(start_proxy: StartProxy, pg: DevClusters) -> None:
    proxy = start_proxy()
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    long_sql, short_sql = "SELECT pg_sleep(10)", "SELECT pg_sleep(2)"
    with _connect(dsn) as victim, _connect(dsn) as bystander:
        slow = _Runner(lambda: victim.execute(long_sql).fetchone())
        other = _Runner(lambda: bystander.execute(short_sql).fetchone())
        slow.start()
        other.start()
        wait_until(lambda: _active(pg, long_sql) == 1 and _active(pg, short_sql) == 1, 10, "both statements")
        cancelled_at = time.monotonic()
        victim.cancel()
        slow.join(10)
        other.join(10)
        assert not slow.is_alive() and not other.is_alive()
        assert isinstance(slow.error, psycopg.errors.QueryCanceled), slow.error
        assert slow.done_at - cancelled_at < 5, f"cancel took {slow.done_at - cancelled_at:.1f}s"
        # The other client's statement was not cancelled.
        assert other.error is None, other.error
        assert other.result == ("",)
        # The cancelled client's connection still works, also for another sleep that is left alone.
        assert victim.execute("SELECT 1").fetchone() == (1,)
        assert victim.execute("SELECT pg_sleep(0.1), %s::int", (7,)).fetchone() == ("", 7)
    assert "Traceback" not in proxy.log()


def test_cancel_from_an_idle_client_cancels_nothing(start_proxy: StartProxy, pg: DevClusters) -> None:
    """A client that has finished its statement gave its upstream connection back; its late cancel must not
    hit whoever runs on that connection now."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    sleep_sql = "SELECT pg_sleep(1.5)"
    with _connect(dsn) as idle, _connect(dsn) as busy:
        idle_pid = idle.execute("SELECT pg_backend_pid()").fetchone()  # the pool's only connection
        runner = _Runner(lambda: busy.execute(sleep_sql).fetchone())
        runner.start()
        wait_until(lambda: _active(pg, sleep_sql) == 1, 10, "the busy client's statement")
        idle.cancel()
        runner.join(10)
        assert not runner.is_alive()
        assert runner.error is None, runner.error
        assert runner.result == ("",)
        assert busy.execute("SELECT pg_backend_pid()").fetchone() == idle_pid
        assert idle.execute("SELECT 1").fetchone() == (1,)


# -- pool exhaustion -----------------------------------------------------------------------------------------


def test_pool_exhaustion_is_53300_then_recovers(start_proxy: StartProxy) -> None:
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1, "acquire_timeout": "1s"}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn, autocommit=False) as holder, _connect(dsn) as waiter:
        assert holder.execute("SELECT 1").fetchone() == (1,)  # BEGIN; SELECT 1 — the only connection
        start = time.monotonic()
        with pytest.raises(psycopg.Error) as info:
            waiter.execute("SELECT 1")
        elapsed = time.monotonic() - start
        assert info.value.sqlstate == "53300", info.value
        assert 0.8 <= elapsed < 5, f"53300 after {elapsed:.2f}s"
        # Also with the simple query protocol (no parameters) and the extended one (parameters).
        with pytest.raises(psycopg.Error) as info:
            waiter.execute("SELECT %s::int", (1,))
        assert info.value.sqlstate == "53300", info.value
        holder.commit()
        assert waiter.execute("SELECT 1").fetchone() == (1,)
        assert waiter.execute("SELECT %s::int", (2,)).fetchone() == (2,)
        assert holder.execute("SELECT 3").fetchone() == (3,)
        holder.commit()


def test_pool_exhaustion_in_pipeline_mode(start_proxy: StartProxy) -> None:
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1, "acquire_timeout": "1s"}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn, autocommit=False) as holder, _connect(dsn) as waiter:
        holder.execute("SELECT 1")
        with pytest.raises(psycopg.Error) as info, waiter.pipeline():
            waiter.execute("SELECT %s::int", (1,))
            waiter.execute("SELECT %s::int", (2,))
        assert info.value.sqlstate == "53300", info.value
        with pytest.raises(psycopg.Error) as info, waiter.pipeline():
            waiter.execute("SELECT %s::int", (3,)).fetchone()  # fetching mid-pipeline: a Flush first
        assert info.value.sqlstate == "53300", info.value
        holder.commit()
        with waiter.pipeline():
            a = waiter.execute("SELECT %s::int", (4,))
            b = waiter.execute("SELECT %s::int", (5,))
        assert (a.fetchone(), b.fetchone()) == ((4,), (5,))


def test_client_gone_while_waiting_for_a_connection(start_proxy: StartProxy) -> None:
    """A client that disconnects while queued for the pool must not take the connection with it."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1, "acquire_timeout": "10s"}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn, autocommit=False) as holder:
        holder.execute("SELECT 1")
        with _psql_process(dsn, "-c", "SELECT 1") as waiter:
            # Give the proxy a moment to queue the waiter's statement (the test stays valid if it has not).
            time.sleep(0.5)
            assert waiter.poll() is None  # still waiting for the pool
            os.kill(waiter.pid, signal.SIGKILL)
            waiter.wait(10)
        holder.commit()
    with _connect(dsn) as conn:
        start = time.monotonic()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - start < 3


# -- clients killed mid-transaction --------------------------------------------------------------------------


@contextlib.contextmanager
def _psql_process(dsn: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        ["psql", dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _kill_and_take_lock(
    proxy: ProxyProcess, pg: DevClusters, proc: subprocess.Popen[str], table: str
) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    killed_at = time.monotonic()
    with _connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=False) as conn:
        conn.execute("SET lock_timeout = '2s'")
        cur = conn.execute(f"UPDATE {table} SET v = 100 WHERE id = 1 AND v = 0")
        assert cur.rowcount == 1  # A's increment never became visible
        conn.commit()
    assert time.monotonic() - killed_at < 5
    assert pg.main.psql(f"SELECT v FROM {table} WHERE id = 1") == "100"
    assert pg.main.psql(f"SELECT count(*) FROM {table} WHERE id = 2") == "0"  # A's insert rolled back
    idle_in_tx = (
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
        f"AND usename = '{pg.main.user}'"
    )
    wait_until(lambda: pg.main.psql(idle_in_tx) == "0", 10, "no upstream left idle in transaction")


def _kill_table(pg: DevClusters, table: str) -> None:
    pg.main.psql(f"DROP TABLE IF EXISTS {table}")
    pg.main.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
    pg.main.psql(f"INSERT INTO {table} VALUES (1, 0)")
    pg.main.psql(f"GRANT ALL ON {table} TO {pg.main.user}")


def test_killed_client_running_statement_releases_its_locks(proxy: ProxyProcess, pg: DevClusters) -> None:
    table = "kill_running"
    _kill_table(pg, table)
    script = f"BEGIN; UPDATE {table} SET v = v + 1 WHERE id = 1; INSERT INTO {table} VALUES (2, 2); "
    sleep = "SELECT pg_sleep(60);"
    try:
        with _psql_process(proxy.dsn(APP_USER, APP_PASSWORD), "-c", script + sleep) as proc:
            wait_until(
                lambda: (
                    int(
                        pg.main.psql(
                            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                            f"AND query LIKE '%{sleep}%' AND pid <> pg_backend_pid()"
                        )
                    )
                    == 1
                ),
                10,
                "client A to hold the row lock while sleeping",
            )
            _kill_and_take_lock(proxy, pg, proc, table)
        # The sleeping upstream backend went away rather than sleeping on.
        wait_until(
            lambda: (
                int(
                    pg.main.psql(
                        f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{sleep}%' "
                        "AND pid <> pg_backend_pid()"
                    )
                )
                == 0
            ),
            10,
            "the killed client's statement to stop",
        )
    finally:
        pg.main.psql(f"DROP TABLE IF EXISTS {table}")


def test_killed_client_idle_in_transaction_releases_its_locks(proxy: ProxyProcess, pg: DevClusters) -> None:
    table = "kill_idle_tx"
    _kill_table(pg, table)
    update = f"UPDATE {table} SET v = v + 1 WHERE id = 1;"
    try:
        with _psql_process(proxy.dsn(APP_USER, APP_PASSWORD)) as proc:
            assert proc.stdin is not None
            proc.stdin.write(f"BEGIN;\n{update}\nINSERT INTO {table} VALUES (2, 2);\n")
            proc.stdin.flush()  # stdin stays open: psql waits for more, its transaction idle
            wait_until(
                lambda: (
                    int(
                        pg.main.psql(
                            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                            f"AND query LIKE 'INSERT INTO {table}%'"
                        )
                    )
                    == 1
                ),
                10,
                "client A to be idle in transaction",
            )
            _kill_and_take_lock(proxy, pg, proc, table)
    finally:
        pg.main.psql(f"DROP TABLE IF EXISTS {table}")


# -- many short connections ----------------------------------------------------------------------------------


def test_many_short_connections_leak_no_upstreams(start_proxy: StartProxy, pg: DevClusters) -> None:
    pool_size = 3
    wait_until(lambda: _upstream_backends(pg) == 0, 15, "earlier tests' upstream connections to close")
    proxy = start_proxy(config={"roles": {"main": {"pool_size": pool_size, "acquire_timeout": "5s"}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    for i in range(200):
        if i % 4 == 3:
            # Closed in the middle of a transaction: the proxy must close that upstream connection.
            conn = _connect(dsn, autocommit=False)
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            conn.close()
        else:
            with _connect(dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    wait_until(lambda: _upstream_backends(pg) <= pool_size, 10, f"at most {pool_size} upstream connections")
    assert _upstream_backends(pg) <= pool_size
    # Still fully usable: pool_size clients at once, each in its own transaction.
    conns = [_connect(dsn, autocommit=False) for _ in range(pool_size)]
    try:
        pids = {c.execute("SELECT pg_backend_pid()").fetchone() for c in conns}
        assert len(pids) == pool_size
    finally:
        for c in conns:
            c.close()


# -- LISTEN / NOTIFY -----------------------------------------------------------------------------------------


def _listen_notify(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn) as listener, _connect(dsn) as notifier:
        listener.execute("LISTEN proxy_chan")
        notifier.execute("NOTIFY proxy_chan, 'hello'")
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("proxy_chan", "hello")]
        # The listener keeps its upstream connection across later statements.
        for i in range(5):
            assert listener.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            notifier.execute("SELECT 1")
        notifier.execute("SELECT pg_notify('proxy_chan', 'again')")
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [("proxy_chan", "again")]


def test_listen_notify(proxy: ProxyProcess) -> None:
    _listen_notify(proxy)


def test_listen_notify_asyncpg(proxy: ProxyProcess) -> None:
    async def main() -> list[str]:
        dsn = proxy.dsn(APP_USER, APP_PASSWORD)
        listener = await asyncpg.connect(dsn, timeout=10)
        notifier = await asyncpg.connect(dsn, timeout=10)
        got: asyncio.Queue[str] = asyncio.Queue()
        try:
            await listener.add_listener("proxy_chan_apg", lambda *args: got.put_nowait(args[3]))
            for i in range(3):
                await notifier.execute(f"NOTIFY proxy_chan_apg, 'msg{i}'")
            return [await asyncio.wait_for(got.get(), 5) for _ in range(3)]
        finally:
            await listener.close(timeout=5)
            await notifier.close(timeout=5)

    assert asyncio.run(main()) == ["msg0", "msg1", "msg2"]


def test_listening_connection_is_not_reused(start_proxy: StartProxy) -> None:
    """After a LISTENing client leaves, its upstream connection (still listening) must serve nobody else."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn) as listener:
        listener.execute("LISTEN proxy_leftover")
        assert listener.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (1,)
    with _connect(dsn) as conn:
        conn.execute("NOTIFY proxy_leftover, 'stray'")
        assert conn.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        assert list(conn.notifies(timeout=0.3, stop_after=1)) == []


def test_listen_logs_pinned_event(proxy: ProxyProcess) -> None:
    _listen_notify(proxy)
    wait_until(lambda: "event=pinned" in proxy.log(), 5, "an event=pinned log line")
    assert proxy.metric("parafort_proxy_client_pins_total") >= 1


def test_pinned_clients_gauge(proxy: ProxyProcess) -> None:
    assert proxy.metric("parafort_proxy_pinned_clients") == 0
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as listener:
        listener.execute("LISTEN gauge_check")
        assert proxy.metric("parafort_proxy_pinned_clients") == 1
        with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as other:
            other.execute("SELECT 1")
            assert proxy.metric("parafort_proxy_pinned_clients") == 1
    wait_until(lambda: proxy.metric("parafort_proxy_pinned_clients") == 0, 5, "the pinned client to leave")


# -- authentication ------------------------------------------------------------------------------------------


def _login_error(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10).close()
    return info.value


def test_auth_failures_look_the_same(proxy: ProxyProcess) -> None:
    wrong = _login_error(proxy.dsn(APP_USER, "not-the-password"))
    unknown = _login_error(proxy.dsn("nobody_here", APP_PASSWORD))
    assert f'password authentication failed for user "{APP_USER}"' in str(wrong), str(wrong)
    assert 'password authentication failed for user "nobody_here"' in str(unknown), str(unknown)
    assert str(wrong).replace(f'"{APP_USER}"', '"?"') == str(unknown).replace('"nobody_here"', '"?"')

    async def sqlstates() -> list[str]:
        states = []
        for dsn in (proxy.dsn(APP_USER, "not-the-password"), proxy.dsn("nobody_here", APP_PASSWORD)):
            try:
                conn = await asyncpg.connect(dsn, timeout=10)
            except asyncpg.PostgresError as exc:
                states.append(exc.sqlstate)
            else:
                await conn.close()
                states.append("connected")
        return states

    assert asyncio.run(sqlstates()) == ["28P01", "28P01"]
    # The right password still works.
    with _connect(proxy.dsn(APP_USER, APP_PASSWORD)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
