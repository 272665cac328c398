"""An upstream backend that goes away under a client, and cancels that race the end of a statement.

PostgreSQL's own behaviour is the reference: a client whose backend dies gets one error (the server's
FATAL, or a lost connection) and loses its connection, so nothing it sends afterwards can run outside the
transaction it believes is open. A client that had nothing on the lost backend loses nothing. And a
CancelRequest only ever cancels the statements of the client that sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.config.loader import ROLE_ENV
from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

StartProxy = Callable[..., ProxyProcess]
Conn = psycopg.Connection[tuple[object, ...]]

POOL = "parafort_proxy_pool_connections"


def _pool_connections(proxy: ProxyProcess) -> float:
    return sum(proxy.metric(POOL, role="main", upstream="main", state=s) for s in ("idle", "active"))


def _backends(pg: DevClusters, where: str) -> list[int]:
    """Pids of main's client backends matching ``where`` (the querying session excluded)."""
    out = pg.main.psql(
        f"SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
        f"AND pid <> pg_backend_pid() AND {where}"
    )
    return [int(line) for line in out.split()]


def _backend_running(pg: DevClusters, query: str, state: str) -> int:
    q = query.replace("'", "''")
    found: list[int] = []

    def one() -> bool:
        found[:] = _backends(pg, f"query = '{q}' AND state = '{state}'")
        return len(found) == 1

    wait_until(one, 20, f"one backend {state}: {query}")
    return found[0]


def _terminate(pg: DevClusters, pid: int) -> None:
    assert pg.main.psql(f"SELECT pg_terminate_backend({pid})") == "t"
    wait_until(lambda: not _backends(pg, f"pid = {pid}"), 20, f"backend {pid} to exit")


@pytest.fixture
def table(pg: DevClusters) -> Iterator[str]:
    name = "upstream_loss_rows"
    pg.main.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int PRIMARY KEY)")
    pg.main.psql(f"GRANT ALL ON {name} TO {pg.main.user}")
    yield name
    pg.main.psql(f"DROP TABLE IF EXISTS {name}")


# -- finding 2: half a transaction must not commit -----------------------------------------------------------


def _psql_script_with_kill(pg: DevClusters, dsn: str, script: Path) -> tuple[int, str]:
    """Run ``script`` in psql; terminate its backend while it sleeps; psql's exit code and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        ["psql", dsn, "-X", "-q", "-f", str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        pid = _backend_running(pg, "SELECT pg_sleep(60);", "active")
        assert pg.main.psql(f"SELECT pg_terminate_backend({pid})") == "t"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, err


def test_backend_terminated_mid_transaction_commits_nothing(
    proxy: ProxyProcess, pg: DevClusters, table: str, tmp_path: Path
) -> None:
    """BEGIN; INSERT 1; sleep (backend terminated here); INSERT 2; INSERT 3; COMMIT: nothing commits,
    psql reports one error and fails, through the proxy exactly as directly."""
    script = tmp_path / "tx.sql"
    script.write_text(
        f"BEGIN;\nINSERT INTO {table} VALUES (1);\nSELECT pg_sleep(60);\n"
        f"INSERT INTO {table} VALUES (2);\nINSERT INTO {table} VALUES (3);\nCOMMIT;\n"
    )
    results = {}
    for name, dsn in (("direct", pg.main.dsn), ("proxy", proxy.dsn(APP_USER, APP_PASSWORD))):
        code, err = _psql_script_with_kill(pg, dsn, script)
        rows = pg.main.psql(f"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM {table}")
        errors = re.findall(r"^psql:[^:]+:\d+: (?:ERROR|FATAL):.*$", err, re.MULTILINE)
        results[name] = (code, rows, errors)
        assert rows == "", f"{name}: rows {rows} committed after the backend was terminated\n{err}"
        assert code != 0, f"{name}: psql exited 0\n{err}"
        assert len(errors) == 1, f"{name}: expected one error, got {errors}\n{err}"
        assert "57P01" in err or "terminating connection" in errors[0], err
    assert results["proxy"][0] == results["direct"][0]
    assert "Traceback" not in proxy.log()


class _Cuttable:
    """A TCP forwarder between the proxy and main whose connections the test can cut: the proxy's upstream
    connection then ends without a word from PostgreSQL, as in a network failure."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self.socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.cut()
        with self.lock:
            for sock in self.socks:
                sock.close()


def test_upstream_cut_without_a_word_is_one_08006(pg: DevClusters) -> None:
    """The network to main fails under a client's statement (PostgreSQL says nothing): the client gets the
    proxy's 08006 as a FATAL, nothing else, and its connection ends."""
    wire = _Cuttable(pg.main.port)
    proxy = ProxyProcess({ROLE_ENV["main"]: pg.main.dsn_for(pg.main.user, pg.main.password).replace(
        f":{pg.main.port}/", f":{wire.port}/")}, users={APP_USER: APP_PASSWORD})  # fmt: skip
    sleep = "SELECT pg_sleep(60)"
    victim = psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), connect_timeout=10)
    notices: list[str] = []
    victim.add_notice_handler(lambda diag: notices.append(f"{diag.severity} {diag.sqlstate}"))
    outcome: list[BaseException | None] = []

    def transaction() -> None:
        try:
            victim.execute(sleep)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=transaction, daemon=True)
    try:
        runner.start()
        pid = _backend_running(pg, sleep, "active")
        wire.cut()
        runner.join(30)
        assert outcome, "the statement got no answer within 30s"
        exc = outcome[0]
        assert isinstance(exc, psycopg.OperationalError), exc
        assert exc.sqlstate == "08006", (exc.sqlstate, str(exc))
        assert "connection to the main upstream was lost" in str(exc)
        assert victim.closed
        assert not notices, notices
        _terminate(pg, pid)  # still sleeping: it has not noticed the cut yet
        assert "Traceback" not in proxy.log()
    finally:
        victim.pgconn.finish()
        proxy.stop()
        wire.close()


# -- finding 3: a client idle in a transaction whose backend ends --------------------------------------------


Kill = Callable[[DevClusters, int], None]


def _kill_terminate(pg: DevClusters, pid: int) -> None:
    _terminate(pg, pid)


def _kill_idle_timeout(pg: DevClusters, pid: int) -> None:
    # The transaction set idle_in_transaction_session_timeout: its backend ends itself.
    wait_until(lambda: not _backends(pg, f"pid = {pid}"), 30, f"backend {pid} to time out")


KILLS = {"terminate": _kill_terminate, "idle_timeout": _kill_idle_timeout}
TIMEOUT_SQL = "SET LOCAL idle_in_transaction_session_timeout = '300ms'"


@pytest.mark.parametrize("kill", sorted(KILLS))
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_idle_in_transaction_backend_gone_asyncpg(
    proxy: ProxyProcess, pg: DevClusters, kill: str, protocol: str
) -> None:
    """asyncpg idle in a transaction, its backend ends: the next statement fails promptly (no hang, no
    stale error) and the connection is closed; a bystander in its own transaction is untouched."""
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)

    async def main() -> None:
        victim = await asyncpg.connect(dsn, timeout=10)
        bystander = await asyncpg.connect(dsn, timeout=10)
        try:
            await bystander.execute("BEGIN")
            assert await bystander.fetchval("SELECT 41 + 1") == 42
            await victim.execute("BEGIN")
            if kill == "idle_timeout":
                await victim.execute(TIMEOUT_SQL)
            # From here on the backend is idle in the transaction (its timeout, if set, is running).
            pid = await victim.fetchval("SELECT pg_backend_pid()")
            await asyncio.to_thread(KILLS[kill], pg, pid)
            nxt: Awaitable[object] = (
                victim.execute("SELECT 1") if protocol == "simple" else victim.fetchval("SELECT 1")
            )
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                await asyncio.wait_for(nxt, 30)
            assert victim.is_closed()
            assert await bystander.fetchval("SELECT 6 * 7") == 42
            await bystander.execute("COMMIT")
            assert await bystander.fetchval("SELECT 1") == 1
        finally:
            victim.terminate()
            await bystander.close(timeout=10)

    asyncio.run(main())
    assert "upstream_protocol_error" not in proxy.log()


@pytest.mark.parametrize("kill", sorted(KILLS))
def test_idle_in_transaction_backend_gone_psycopg(proxy: ProxyProcess, pg: DevClusters, kill: str) -> None:
    """psycopg 3 (extended protocol), the same: an error at once and a closed connection."""
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    victim = psycopg.connect(dsn, connect_timeout=10)
    try:
        with psycopg.connect(dsn, connect_timeout=10) as other:
            assert other.execute("SELECT 41 + 1").fetchone() == (42,)  # its own transaction, held open
            if kill == "idle_timeout":
                victim.execute(TIMEOUT_SQL)
            row = victim.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pid = int(str(row[0]))
            KILLS[kill](pg, pid)
            outcome: list[BaseException | None] = []

            def next_statement() -> None:
                try:
                    victim.execute("SELECT 1")
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)

            runner = threading.Thread(target=next_statement, daemon=True)
            runner.start()
            runner.join(30)
            assert outcome, "the next statement got no answer within 30s"
            assert isinstance(outcome[0], psycopg.Error), outcome[0]
            assert victim.closed, f"the connection is still open after {outcome[0]!r}"
            assert other.execute("SELECT 6 * 7").fetchone() == (42,)
            other.commit()
    finally:
        victim.pgconn.finish()  # not close(): that waits for a statement still stuck in the thread
    assert "upstream_protocol_error" not in proxy.log()


def test_lingering_backend_terminated_costs_nothing(proxy: ProxyProcess, pg: DevClusters) -> None:
    """A client between transactions keeps (lingers on) its upstream connection; that backend is
    terminated: the client's next statements just work, on another connection, with no error."""
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(str(row[0]))
        assert _pool_connections(proxy) == 1
        _terminate(pg, pid)
        wait_until(lambda: _pool_connections(proxy) == 0, 20, "the proxy to drop the lost connection")
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None and row[0] != pid
        assert not conn.closed
    log = proxy.log()
    assert "upstream_protocol_error" not in log
    assert "Traceback" not in log


def test_pinned_client_loses_its_connection_with_its_backend(proxy: ProxyProcess, pg: DevClusters) -> None:
    """A pinned client (LISTEN: state no other connection has) whose backend is terminated while it is
    idle is told (the backend's FATAL) and disconnected, as it would be without the proxy."""
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    listener = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    try:
        listener.execute("LISTEN loss_channel")
        listener.execute("SELECT 'pinned-marker'")
        pid = _backend_running(pg, "SELECT 'pinned-marker'", "idle")
        _terminate(pg, pid)
        with pytest.raises(psycopg.Error):
            listener.execute("SELECT 1")
        assert listener.closed
    finally:
        listener.pgconn.finish()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)


# -- finding 4: cancels land only on the cancelling client ---------------------------------------------------

CANCEL_SECONDS = 10.0


class _Canceller(threading.Thread):
    """Runs short statements back to back on one connection while a second thread cancels them at random
    moments: many cancels arrive just as a statement ends, the race that hit other clients."""

    def __init__(self, dsn: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = stop
        self.cancelled = self.completed = 0
        self.error: BaseException | None = None
        self.rng = random.Random(13)
        self.busy = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                cancels = threading.Thread(target=self._cancel_loop, args=(conn,), daemon=True)
                cancels.start()
                try:
                    self._statements(conn)
                finally:
                    self.stop.set()
                    cancels.join(15)
        except BaseException as exc:
            self.error = exc
            self.stop.set()

    def _statements(self, conn: Conn) -> None:
        while not self.stop.is_set():
            self.busy.set()
            try:
                conn.execute(f"SELECT pg_sleep({self.rng.uniform(0.0, 0.006):.4f})")
                self.completed += 1
            except psycopg.errors.QueryCanceled:
                self.cancelled += 1
            finally:
                self.busy.clear()

    def _cancel_loop(self, conn: Conn) -> None:
        while not self.stop.is_set():
            if self.busy.wait(0.1):
                time.sleep(self.rng.uniform(0.0, 0.004))
                conn.cancel_safe(timeout=10)


async def _bystanders(dsn: str, stop: threading.Event, clients: int) -> tuple[int, int]:
    """``clients`` connections running short statements until ``stop``: (57014 seen, statements done)."""
    hits = served = 0

    async def one() -> None:
        nonlocal hits, served
        conn = await asyncpg.connect(dsn, timeout=30)
        try:
            while not stop.is_set():
                try:
                    await conn.execute("SELECT pg_sleep(0.002)")
                    served += 1
                except asyncpg.QueryCanceledError:
                    hits += 1
        finally:
            await conn.close(timeout=30)

    await asyncio.gather(*(one() for _ in range(clients)))
    return hits, served


def test_cancels_never_hit_bystanders(start_proxy: StartProxy) -> None:
    """40 bystanders share a pool of 3 with a client that cancels its own statements in a loop: the
    bystanders see no 57014 at all; the canceller sees its own."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 3, "acquire_timeout": 60}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    stop = threading.Event()
    canceller = _Canceller(dsn, stop)
    timer = threading.Timer(CANCEL_SECONDS, stop.set)

    async def main() -> tuple[int, int]:
        canceller.start()
        timer.start()
        return await _bystanders(dsn, stop, 40)

    try:
        hits, served = asyncio.run(main())
    finally:
        stop.set()
        timer.cancel()
        canceller.join(30)
    assert canceller.error is None, canceller.error
    own = f"canceller: {canceller.cancelled} cancelled, {canceller.completed} completed"
    print(f"bystander 57014: {hits} of {hits + served}; {own}")
    assert served > 0
    assert canceller.cancelled > 0, own
    assert hits == 0, f"{hits} bystander statements cancelled by another client's cancel ({own})"
    assert "Traceback" not in proxy.log()
