"""The pgbench comparison's ``ceiling`` target (bench/ceiling.py): the bare forwarder, started and stopped by
the harness like the other targets, with PostgreSQL itself authenticating the clients through it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import psycopg
import pytest
import uvloop

# bench/ is not an installed package (only proxy is): import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ceiling import Client
from bench.targets import CHECKOUT, CeilingTarget, Credentials, Tools, make_site, tcp_open
from proxy.dev.cluster import DevClusters, find_bindir, wait_until


@pytest.fixture
def ceiling(pg: DevClusters, tmp_path: Path) -> Iterator[CeilingTarget]:
    main = pg.main
    creds = Credentials(main.user, main.password, main.database)
    site = make_site(tmp_path, "ceiling", creds, Tools.find(find_bindir()))
    target = CeilingTarget(site, upstream_port=main.port)
    target.start()  # returns once a real SELECT 1 through it works
    try:
        yield target
    finally:
        target.stop()


def _connect(
    pg: DevClusters, port: int, password: str | None = None
) -> psycopg.Connection[tuple[object, ...]]:
    main = pg.main
    return psycopg.connect(
        host="127.0.0.1", port=port, user=main.user, password=password or main.password, dbname=main.database,
        sslmode="disable", connect_timeout=10, autocommit=True,
    )  # fmt: skip


def test_clients_log_in_to_the_primary_through_it_one_server_connection_each(
    ceiling: CeilingTarget, pg: DevClusters
) -> None:
    with _connect(pg, ceiling.port) as a, _connect(pg, ceiling.port) as b:
        [(port_a, pid_a)] = a.execute("SELECT inet_server_port(), pg_backend_pid()").fetchall()
        [(port_b, pid_b)] = b.execute("SELECT inet_server_port(), pg_backend_pid()").fetchall()
        assert port_a == port_b == pg.main.port  # the primary answers, over TCP from the forwarder
        assert pid_a != pid_b  # no pooling: a server connection per client
        # Messages far larger than one read, both ways.
        big = "x" * 8_000_000
        assert a.execute("SELECT length(%s::text)", (big,)).fetchone() == (len(big),)
        assert a.execute("SELECT repeat('y', 8000000)").fetchone() == ("y" * 8_000_000,)
        # The extended protocol and a transaction pass through untouched too.
        with a.transaction():
            assert a.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
    # A client that leaves takes its server connection with it.
    gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({pid_a}, {pid_b})"
    wait_until(lambda: pg.main.psql(gone) == "0", 30, "the server connections to close after their clients")


def test_a_client_that_stops_reading_pauses_the_upstream_read_then_gets_every_byte() -> None:
    """Back-pressure, in-process on real loopback sockets (bytes only: no PostgreSQL needed)."""
    size = 32 * 1024 * 1024  # more than every socket buffer on the way can hold

    class Source(asyncio.Protocol):  # the upstream: sends ``size`` bytes at once and keeps the connection
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            cast(asyncio.Transport, transport).write(bytes(range(256)) * (size // 256))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(Source, "127.0.0.1", 0)
        full = asyncio.Event()
        clients: list[Client] = []

        class Watched(Client):
            def pause_writing(self) -> None:
                super().pause_writing()
                full.set()

        def accept() -> Client:
            clients.append(Watched(("127.0.0.1", upstream.sockets[0].getsockname()[1])))
            return clients[-1]

        forwarder = await loop.create_server(accept, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", forwarder.sockets[0].getsockname()[1])
        try:
            async with asyncio.timeout(60):
                # We read nothing: the forwarder's write buffer towards us passes its high-water mark, and
                # it stops reading from the upstream.
                await full.wait()
                [client] = clients
                assert client.peer is not None
                assert not client.peer.transport.is_reading()
                assert client.transport.get_write_buffer_size() < 4 * 1024 * 1024
                # Reading again resumes it: every byte arrives, in order.
                data = await reader.readexactly(size)
            assert data == bytes(range(256)) * (size // 256)
        finally:
            writer.close()
            forwarder.close()
            upstream.close()

    uvloop.run(scenario())


def test_the_primary_refuses_a_wrong_password_through_it(ceiling: CeilingTarget, pg: DevClusters) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(pg, ceiling.port, password="not-" + pg.main.password)
    with _connect(pg, ceiling.port) as conn:  # and it still serves the next client
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sigterm_stops_it_cleanly(pg: DevClusters, tmp_path: Path) -> None:
    main = pg.main
    site = make_site(tmp_path, "ceiling", Credentials(main.user, main.password, main.database),
                     Tools.find(find_bindir()))  # fmt: skip
    target = CeilingTarget(site, upstream_port=main.port)
    target.start()
    proc = target.proc
    assert proc is not None
    target.stop()
    assert proc.returncode == 0
    assert not tcp_open("127.0.0.1", target.port)


def test_a_taken_port_is_one_clear_line_that_the_harness_retries_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "bench.ceiling", "--listen", str(port), "--upstream", "127.0.0.1:5432"],
            cwd=CHECKOUT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"ceiling: cannot listen on 127.0.0.1:{port}: ")
    assert "Errno 98" in proc.stderr or "already in use" in proc.stderr  # DaemonTarget.start's retry test
    bad = subprocess.run(
        [sys.executable, "-m", "bench.ceiling", "--listen", "1", "--upstream", "no-port"],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--upstream: expected HOST:PORT, got 'no-port'" in bad.stderr
