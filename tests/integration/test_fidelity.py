"""Fidelity with real clients (issue 14, part 2): what PostgreSQL would do, the proxy does too."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
from collections.abc import Callable

import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.protocol import messages as m
from proxy.protocol.framing import startup_message

ADMIN, ADMIN_PASSWORD = "ops", "ops-secret-pw"


def connect(proxy: ProxyProcess, **kw: object) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, **kw)  # type: ignore[arg-type]


@pytest.fixture
def replicated(start_proxy: Callable[..., ProxyProcess], schema: None) -> ProxyProcess:
    return start_proxy(roles=("main", "read_replica"), config={"domains": DEMO_DOMAINS})


# -- two-phase commit --------------------------------------------------------------------------------------
def test_two_phase_commit_runs_on_main(pg: DevClusters, replicated: ProxyProcess) -> None:
    """psycopg's TPC API through the proxy with a replica: PREPARE TRANSACTION, then COMMIT PREPARED and
    ROLLBACK PREPARED on their own (outside any transaction, where the router picks a role afresh)."""
    gids = ("pf_2pc_commit", "pf_2pc_rollback")
    try:
        with psycopg.connect(replicated.dsn(APP_USER, APP_PASSWORD)) as conn:
            for gid in gids:
                conn.tpc_begin(gid)  # a plain transaction id: the gid PostgreSQL sees
                conn.execute(
                    "INSERT INTO users (email, full_name) VALUES (%s, '2pc')", (f"{gid}@example.com",)
                )
                conn.tpc_prepare()  # PREPARE TRANSACTION
                conn.tpc_commit() if gid.endswith("commit") else conn.tpc_rollback()
        with connect(replicated) as conn:
            # Plain SQL, each statement its own unit.
            conn.execute("BEGIN")
            conn.execute("INSERT INTO users (email, full_name) VALUES ('pf_2pc_sql@example.com', '2pc')")
            conn.execute("PREPARE TRANSACTION 'pf_2pc_sql'")
            conn.execute("COMMIT PREPARED 'pf_2pc_sql'")
    finally:
        for gid in pg.main.psql("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE '%pf_2pc%'").split():
            pg.main.psql(f"ROLLBACK PREPARED '{gid}'")
    emails = pg.main.psql("SELECT string_agg(email, ',' ORDER BY email) FROM users WHERE full_name = '2pc'")
    assert emails == "pf_2pc_commit@example.com,pf_2pc_sql@example.com"
    pg.main.psql("DELETE FROM users WHERE full_name = '2pc'", superuser=False)


# -- the admin console's database name ---------------------------------------------------------------------
def psql(
    proxy: ProxyProcess, user: str, password: str, database: str, sql: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", proxy.dsn(user, password, database=database), "-X", "-A", "-t", "-c", sql],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_database_parafort_is_an_application_database(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(
        roles=("main",),
        config={"auth": {"admin_users": [ADMIN]}},
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )
    for user, password in ((APP_USER, APP_PASSWORD), (ADMIN, ADMIN_PASSWORD)):
        out = psql(proxy, user, password, "parafort", "SELECT 40 + 2")
        assert (out.returncode, out.stdout.strip()) == (0, "42"), out.stderr
    console = psql(proxy, ADMIN, ADMIN_PASSWORD, "parafort_admin", "SHOW POOLS")
    assert console.returncode == 0 and "main" in console.stdout, console.stderr


def test_admin_database_is_a_setting(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(
        roles=("main",),
        config={"admin": {"database": "ops_console"}, "auth": {"admin_users": [ADMIN]}},
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )
    console = psql(proxy, ADMIN, ADMIN_PASSWORD, "ops_console", "SHOW POOLS")
    assert console.returncode == 0 and "main" in console.stdout, console.stderr
    refused = psql(proxy, APP_USER, APP_PASSWORD, "ops_console", "SHOW POOLS")
    assert "not allowed to use the admin console" in refused.stderr
    ordinary = psql(proxy, ADMIN, ADMIN_PASSWORD, "parafort_admin", "SELECT 40 + 2")
    assert (ordinary.returncode, ordinary.stdout.strip()) == (0, "42"), ordinary.stderr


# -- ParameterStatus as PostgreSQL spells it ----------------------------------------------------------------
def raw_login(sock: socket.socket, params: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A trust login with these startup parameters: (ParameterStatus by name, ErrorResponse fields)."""
    sock.sendall(startup_message(params))
    sock.settimeout(30)
    buf = b""
    status: dict[str, str] = {}
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack_from("!i", buf, 1)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; so far {status}")
            buf += chunk
        mtype, length = buf[0:1], struct.unpack_from("!i", buf, 1)[0]
        payload, buf = buf[5 : 1 + length], buf[1 + length :]
        if mtype == b"S":
            status.update([m.decode_parameter_status(payload)])
        elif mtype == b"E":
            return status, m.parse_fields(payload)
        elif mtype == b"Z":
            return status, {}
        elif mtype == b"R":
            assert m.decode_auth(payload)[0] == 0, "trust login expected"


def direct_login(pg: DevClusters, params: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    main = pg.main
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(main.sockdir / f".s.PGSQL.{main.port}"))
        return raw_login(sock, {"user": main.user, "database": main.database, **params})


def proxy_login(proxy: ProxyProcess, params: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        return raw_login(sock, {"user": APP_USER, "database": "app", **params})


STARTUP_CASES = [
    {"client_encoding": "utf8"},
    {"client_encoding": "eucjp"},
    {"client_encoding": "'utf-8'"},  # what asyncpg sends
    {"client_encoding": "Latin1"},
    {"DateStyle": "german, dmy"},
    {"datestyle": "sql,mdy"},
    {"TimeZone": "utc"},
    {"timezone": "europe/paris"},
    {"IntervalStyle": "SQL_STANDARD"},
    {"standard_conforming_strings": "ON"},
    {"application_name": "caf\u00e9 app"},
    {"options": "-c datestyle=iso,dmy -c timezone=UTC -c intervalstyle=iso_8601"},
]


@pytest.fixture
def trusting(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(roles=("main",), config={"auth": {"method": "trust"}})


@pytest.mark.parametrize("params", STARTUP_CASES, ids=[repr(p) for p in STARTUP_CASES])
def test_parameter_status_is_postgresqls_own(
    pg: DevClusters, trusting: ProxyProcess, params: dict[str, str]
) -> None:
    direct, direct_error = direct_login(pg, params)
    proxied, proxy_error = proxy_login(trusting, params)
    assert direct_error == {} and proxy_error == {}, (direct_error, proxy_error)
    if "application_name" not in params:  # unset: the proxy reports its upstream connection's own
        direct.pop("application_name", None)
        proxied.pop("application_name", None)
    assert proxied == direct


@pytest.mark.parametrize(
    "params",
    [{"client_encoding": "bogus"}, {"DateStyle": "bogus"}, {"options": "-c timezone=Nowhere/City"}],
    ids=["client_encoding", "DateStyle", "options-timezone"],
)
def test_invalid_startup_setting_gets_postgresqls_error(
    pg: DevClusters, trusting: ProxyProcess, params: dict[str, str]
) -> None:
    _, direct_error = direct_login(pg, params)
    _, proxy_error = proxy_login(trusting, params)
    keys = ("S", "V", "C", "M", "D", "H")
    assert direct_error["C"] == "22023"
    assert {k: proxy_error.get(k) for k in keys} == {k: direct_error.get(k) for k in keys}
    assert trusting.metric("parafort_proxy_login_failures_total", reason="invalid_parameter") >= 1


# -- user functions' volatility from main's catalog ---------------------------------------------------------
FUNCTIONS = """
CREATE FUNCTION pf_stable_fn() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
CREATE FUNCTION pf_immutable_fn(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE FUNCTION pf_volatile_fn() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 2';
CREATE FUNCTION pf_mixed_fn(int) RETURNS int LANGUAGE sql STABLE AS 'SELECT $1';
CREATE FUNCTION pf_mixed_fn(text) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 3';
CREATE SCHEMA pf_lib;
CREATE FUNCTION pf_lib.pf_lib_fn() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 4';
"""
DROP_FUNCTIONS = """
DROP FUNCTION IF EXISTS pf_stable_fn(), pf_immutable_fn(int), pf_volatile_fn(), pf_mixed_fn(int),
  pf_mixed_fn(text), pf_late_fn();
DROP SCHEMA IF EXISTS pf_lib CASCADE;
"""


def loaded(proxy: ProxyProcess, times: int) -> None:
    wait_until(
        lambda: proxy.log().count("event=function_catalog_loaded") >= times, 30, "main's functions to be read"
    )


def test_user_functions_volatility_comes_from_main(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess]
) -> None:
    pg.main.psql(DROP_FUNCTIONS + FUNCTIONS, superuser=False)
    try:
        pg.wait_replica_caught_up()
        proxy = start_proxy(roles=("main", "read_replica"))
        loaded(proxy, 1)
        main, replica = pg.main.port, pg.read_replica.port
        with connect(proxy) as conn:

            def port(sql: str) -> int:
                row = conn.execute(f"SELECT inet_server_port(), {sql}").fetchone()
                assert row is not None
                return int(str(row[0]))

            assert port("pf_stable_fn()") == replica
            assert port("pf_immutable_fn(7)") == replica
            assert port("public.pf_stable_fn()") == replica
            assert port("pf_lib.pf_lib_fn()") == replica
            assert port("pf_volatile_fn()") == main
            assert port("pf_mixed_fn(1)") == main  # one overload is VOLATILE: the name is a write
            assert port("pf_stable_fn(), pf_volatile_fn()") == main

            # A function created later is a write until the catalog is read again (SIGHUP).
            pg.main.psql(
                "CREATE FUNCTION pf_late_fn() RETURNS int LANGUAGE sql STABLE AS 'SELECT 5'", superuser=False
            )
            pg.wait_replica_caught_up()
            assert port("pf_late_fn()") == main
            proxy.signal(signal.SIGHUP)
            loaded(proxy, 2)
            assert port("pf_late_fn()") == replica
    finally:
        pg.main.psql(DROP_FUNCTIONS, superuser=False)


def test_functions_are_read_when_main_comes_back(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess]
) -> None:
    """Main down when the proxy starts: the failed read is logged once, calls stay writes, and the catalog
    is read as soon as main is up again."""
    pg.main.psql(DROP_FUNCTIONS + FUNCTIONS, superuser=False)
    try:
        pg.wait_replica_caught_up()
        pg.main.stop()
        health = {"interval": "500ms", "timeout": "1s", "failures_before_down": 1, "successes_before_up": 1}
        proxy = start_proxy(roles=("main", "read_replica"), config={"health": health})
        wait_until(lambda: "event=function_catalog_failed" in proxy.log(), 30, "the failed read logged")
        pg.main.start()
        loaded(proxy, 1)
        assert proxy.log().count("event=function_catalog_failed") == 1
        with connect(proxy) as conn:
            row = conn.execute("SELECT inet_server_port(), pf_stable_fn()").fetchone()
            assert row == (pg.read_replica.port, 1)
            row = conn.execute("SELECT inet_server_port(), pf_volatile_fn()").fetchone()
            assert row == (pg.main.port, 2)
    finally:
        if not pg.main.running:
            pg.main.start()
        pg.main.psql(DROP_FUNCTIONS, superuser=False)


# -- a Close the server never ran ---------------------------------------------------------------------------
def _replies(sock: socket.socket, data: bytes) -> list[tuple[bytes, bytes]]:
    """Send ``data``; the messages that come back up to ReadyForQuery: (type, payload)."""
    sock.sendall(data)
    buf, out = b"", []
    while True:
        while len(buf) < 5 or len(buf) < 1 + struct.unpack_from("!i", buf, 1)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed after {out}")
            buf += chunk
        length = struct.unpack_from("!i", buf, 1)[0]
        message, buf = (buf[0:1], buf[5 : 1 + length]), buf[1 + length :]
        out.append(message)
        if message[0] == b"Z":
            return out


EXECUTE_UNNAMED = b"E" + struct.pack("!i", 9) + b"\x00" + struct.pack("!i", 0)
CLOSE_SKIPPED = [
    m.parse("s1", "SELECT 41 + 1") + m.sync(),
    # The Parse fails: PostgreSQL skips the Close up to the Sync, so s1 still exists.
    m.parse("", "SELEC bad") + m.close(b"S", "s1") + m.sync(),
    m.bind_raw("", "s1", b"\x00\x00\x00\x00\x00\x00") + EXECUTE_UNNAMED + m.sync(),
]


def _script(sock: socket.socket) -> list[list[tuple[bytes, str]]]:
    """CLOSE_SKIPPED's replies: message types, with the SQLSTATE of errors and the value of rows."""
    result = []
    for data in CLOSE_SKIPPED:
        seen = []
        for mtype, payload in _replies(sock, data):
            detail = m.parse_fields(payload).get("C", "") if mtype == b"E" else ""
            seen.append((mtype, detail or (payload[6:].decode() if mtype == b"D" else "")))
        result.append(seen)
    return result


def test_a_close_skipped_after_an_error_leaves_the_statement(pg: DevClusters, trusting: ProxyProcess) -> None:
    """The proxy answers a Close of a client's statement itself; when an earlier message of the batch fails,
    PostgreSQL skips the Close, so the statement must stay usable through the proxy too."""
    main = pg.main
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(main.sockdir / f".s.PGSQL.{main.port}"))
        raw_login(sock, {"user": main.user, "database": main.database})
        direct = _script(sock)
    with socket.create_connection(("127.0.0.1", trusting.port)) as sock:
        raw_login(sock, {"user": APP_USER, "database": "app"})
        proxied = _script(sock)
    assert direct[1][0] == (b"E", "42601")
    assert direct[2] == [(b"2", ""), (b"D", "42"), (b"C", ""), (b"Z", "")]
    assert proxied == direct
