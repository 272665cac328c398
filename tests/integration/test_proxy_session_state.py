"""Session settings follow each client across pooled upstream connections and never leak to other clients."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
import pytest

from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

StartProxy = Callable[..., ProxyProcess]
Conn = psycopg.Connection[tuple[object, ...]]

PARAMS = ("search_path", "application_name", "TimeZone")


def _connect(dsn: str, autocommit: bool = True) -> Conn:
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)


def _show(conn: Conn, name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None and isinstance(row[0], str)
    return row[0]


def _state(conn: Conn) -> dict[str, str]:
    """Each parameter read by its own autocommit statement (each one a separate lease)."""
    return {name: _show(conn, name) for name in PARAMS}


def _pid(conn: Conn) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None and isinstance(row[0], int)
    return row[0]


@pytest.fixture
def small_proxy(start_proxy: StartProxy) -> ProxyProcess:
    return start_proxy(config={"roles": {"main": {"pool_size": 2}}})


def _defaults(pg: DevClusters) -> dict[str, str]:
    with psycopg.connect(pg.main.dsn, autocommit=True, connect_timeout=10) as conn:
        return _state(conn)


def test_settings_follow_client_and_do_not_leak(small_proxy: ProxyProcess, pg: DevClusters) -> None:
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    defaults = _defaults(pg)
    assert defaults["TimeZone"] not in ("Asia/Tokyo", "America/Sao_Paulo", "Pacific/Auckland")
    conns = [_connect(dsn) for _ in range(4)]
    # Client-side expectations; clients 0-2 change their settings at different points, client 3 never does.
    expected = [dict(defaults) for _ in conns]
    plans: list[dict[int, list[tuple[str, str, str]]]] = [
        {
            0: [
                ("SET search_path TO sp_client0, public", "search_path", "sp_client0, public"),
                ("SET application_name = 'client0'", "application_name", "client0"),
                ("SET TIME ZONE 'Asia/Tokyo'", "TimeZone", "Asia/Tokyo"),
            ],
            15: [("SET TIME ZONE 'Pacific/Auckland'", "TimeZone", "Pacific/Auckland")],
        },
        {
            3: [
                ("SET application_name TO 'client1'", "application_name", "client1"),
                ("SET timezone = 'America/Sao_Paulo'", "TimeZone", "America/Sao_Paulo"),
            ],
            10: [("RESET ALL", "", "")],
            20: [("SET search_path = sp_client1", "search_path", "sp_client1")],
        },
        {
            5: [("SET search_path TO sp_client2", "search_path", "sp_client2")],
            12: [("RESET search_path", "search_path", defaults["search_path"])],
            18: [("SET application_name = 'client2'", "application_name", "client2")],
        },
        {},
    ]
    rounds = 25
    errors: list[BaseException] = []
    pids: list[set[int]] = [set() for _ in conns]

    def worker(c: int) -> None:
        conn = conns[c]
        try:
            for r in range(rounds):
                for stmt, name, value in plans[c].get(r, []):
                    conn.execute(stmt)
                    if name:
                        expected[c][name] = value
                    else:
                        expected[c] = dict(defaults)
                got = _state(conn)
                assert got == expected[c], f"client {c} round {r}: {got} != {expected[c]}"
                pids[c].add(_pid(conn))
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "workers did not finish within 60s"
        assert not errors, errors[0]
        # Several clients really shared the two upstream connections.
        assert len(set().union(*pids)) == 2
        assert sum(len(p) > 1 for p in pids) >= 2
        # Final check, sequentially, on whichever connection each lands on.
        for c, conn in enumerate(conns):
            for _ in range(3):
                assert _state(conn) == expected[c]
        assert expected[0] == {
            "search_path": "sp_client0, public",
            "application_name": "client0",
            "TimeZone": "Pacific/Auckland",
        }
        assert expected[1] == {**defaults, "search_path": "sp_client1"}
        assert expected[2] == {**defaults, "application_name": "client2"}
        assert expected[3] == defaults
    finally:
        for conn in conns:
            conn.close()


def test_settings_on_a_different_upstream_connection(small_proxy: ProxyProcess, pg: DevClusters) -> None:
    """Deterministic: a holder keeps one upstream busy so the next statement must use the other one."""
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    defaults = _defaults(pg)
    with (
        _connect(dsn) as setter,
        _connect(dsn) as plain,
        _connect(dsn, autocommit=False) as holder,
    ):
        setter_pid = _pid(setter)
        setter.execute("SET application_name = 'setter'")
        setter.execute("SET TIME ZONE 'Asia/Tokyo'")
        # The holder takes (most likely) the setter's connection; either way, the setter and the plain client
        # now run on both connections in turn.
        seen: set[int] = set()
        for i in range(6):
            if i % 2 == 0:
                holder.execute("SELECT 1")
            seen.add(_pid(setter))
            assert _show(setter, "application_name") == "setter"
            assert _show(setter, "TimeZone") == "Asia/Tokyo"
            assert _state(plain) == defaults
            holder.commit()
            assert _state(holder) == defaults
            holder.commit()
        seen.add(setter_pid)
        assert len(seen) == 2, "the setter never ran on the second upstream connection"


def test_set_local_and_rolled_back_set_do_not_persist(small_proxy: ProxyProcess, pg: DevClusters) -> None:
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    defaults = _defaults(pg)
    with _connect(dsn) as conn, _connect(dsn) as other:
        conn.execute("SET application_name = 'kept'")
        # SET LOCAL: visible in its transaction only.
        with conn.transaction():
            conn.execute("SET LOCAL TIME ZONE 'Asia/Tokyo'")
            conn.execute("SET LOCAL search_path TO sp_local")
            assert _show(conn, "TimeZone") == "Asia/Tokyo"
            assert _show(conn, "search_path") == "sp_local"
        # A SET inside a transaction that rolls back.
        with conn.transaction(force_rollback=True):
            conn.execute("SET application_name = 'rolled_back'")
            conn.execute("SET TIME ZONE 'Pacific/Auckland'")
            assert _show(conn, "application_name") == "rolled_back"
        # A SET inside a transaction that fails and is rolled back.
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute("SET search_path TO sp_failed")
            conn.execute("SELECT 1/0")
        # A SET inside a transaction that commits does persist.
        with conn.transaction():
            conn.execute("SET TIME ZONE 'America/Sao_Paulo'")
        for _ in range(5):
            assert _state(conn) == {**defaults, "application_name": "kept", "TimeZone": "America/Sao_Paulo"}
            assert _state(other) == defaults
        # RESET ALL goes back to the defaults, on every later transaction.
        conn.execute("RESET ALL")
        for _ in range(5):
            assert _state(conn) == defaults
            assert _state(other) == defaults
        # A SET in the middle of a failing multi-statement query is not applied either.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SET application_name = 'multi'; SELECT 1/0")
        assert _state(conn) == defaults


def test_settings_sent_in_pipeline_and_startup(small_proxy: ProxyProcess, pg: DevClusters) -> None:
    """SET through the extended protocol (pipeline) and settings given at connect time (startup options)."""
    defaults = _defaults(pg)
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    startup_dsn = small_proxy.dsn(
        APP_USER, APP_PASSWORD, application_name="from_startup", options="-c%20TimeZone%3DAsia/Tokyo"
    )
    with _connect(dsn) as piped, _connect(startup_dsn) as started, _connect(dsn) as plain:
        with piped.pipeline():
            piped.execute("SET search_path TO sp_pipeline")
            piped.execute("SET application_name = 'piped'")
        for _ in range(5):
            assert _state(piped) == {**defaults, "search_path": "sp_pipeline", "application_name": "piped"}
            assert _state(started) == {
                **defaults,
                "application_name": "from_startup",
                "TimeZone": "Asia/Tokyo",
            }
            assert _state(plain) == defaults
        started.execute("RESET ALL")  # back to the startup values, as PostgreSQL does
        assert _state(started) == {**defaults, "application_name": "from_startup", "TimeZone": "Asia/Tokyo"}
        started.execute("SET application_name = 'changed'")
        started.execute("RESET application_name")
        assert _show(started, "application_name") == "from_startup"


def _setting_everywhere(conn: Conn, holder: Conn, name: str) -> dict[int, set[str]]:
    """``name`` as ``conn`` sees it on each of the (two) upstream connections: the holder keeps one busy
    every other time, so ``conn`` runs on both."""
    seen: dict[int, set[str]] = {}
    for i in range(4):
        if i % 2:
            holder.execute("SELECT 1")
        row = conn.execute("SELECT pg_backend_pid(), current_setting(%s)", (name,)).fetchone()
        assert row is not None and isinstance(row[0], int) and isinstance(row[1], str)
        seen.setdefault(row[0], set()).add(row[1])
        holder.commit()
    assert len(seen) == 2, f"expected to run on both upstream connections, saw {seen}"
    return seen


def test_set_in_rolled_back_savepoint_does_not_persist(small_proxy: ProxyProcess, pg: DevClusters) -> None:
    """BEGIN; SAVEPOINT s; SET ...; ROLLBACK TO SAVEPOINT s; COMMIT — PostgreSQL undoes the SET."""
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    defaults = _defaults(pg)
    with _connect(dsn) as conn, _connect(dsn, autocommit=False) as holder:
        with conn.transaction(), conn.transaction() as savepoint:
            conn.execute("SET application_name = 'in_rolled_back_savepoint'")
            raise psycopg.Rollback(savepoint)
        seen = _setting_everywhere(conn, holder, "application_name")
        assert all(values == {defaults["application_name"]} for values in seen.values()), seen


def test_set_before_failed_savepoint_persists(small_proxy: ProxyProcess) -> None:
    """BEGIN; SET ...; SAVEPOINT s; <error>; ROLLBACK TO SAVEPOINT s; COMMIT — PostgreSQL keeps the SET."""
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn) as conn, _connect(dsn, autocommit=False) as holder:
        with conn.transaction():
            conn.execute("SET application_name = 'before_savepoint'")
            with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
                conn.execute("SELECT 1/0")
        seen = _setting_everywhere(conn, holder, "application_name")
        assert all(values == {"before_savepoint"} for values in seen.values()), seen


def test_set_in_released_savepoint_persists(small_proxy: ProxyProcess) -> None:
    """BEGIN; SAVEPOINT s; SET ...; RELEASE SAVEPOINT s; COMMIT — PostgreSQL keeps the SET."""
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn) as conn, _connect(dsn, autocommit=False) as holder:
        with conn.transaction(), conn.transaction():
            conn.execute("SET TIME ZONE 'Asia/Tokyo'")
        seen = _setting_everywhere(conn, holder, "TimeZone")
        assert all(values == {"Asia/Tokyo"} for values in seen.values()), seen


def test_session_parameters_reported_to_client(small_proxy: ProxyProcess) -> None:
    """ParameterStatus: what the client's driver believes (psycopg converts timestamptz with it) matches the
    session: startup options at login, and SET TIME ZONE afterwards, also after moving connections."""
    dsn = small_proxy.dsn(APP_USER, APP_PASSWORD)
    startup_dsn = small_proxy.dsn(APP_USER, APP_PASSWORD, options="-c%20TimeZone%3DAsia/Tokyo")
    with _connect(startup_dsn) as started, _connect(dsn) as setter, _connect(dsn, autocommit=False) as holder:
        assert started.info.parameter_status("TimeZone") == "Asia/Tokyo"
        setter.execute("SET TIME ZONE 'Pacific/Auckland'")
        for i in range(4):
            if i % 2:
                holder.execute("SELECT 1")
            for conn, zone in ((started, "Asia/Tokyo"), (setter, "Pacific/Auckland")):
                row = conn.execute(
                    "SELECT '2024-01-01 00:00:00+00'::timestamptz, current_setting('TimeZone')"
                ).fetchone()
                assert row is not None
                assert row[1] == zone
                assert conn.info.parameter_status("TimeZone") == zone
                assert str(getattr(row[0], "tzinfo", None)) == zone
            holder.commit()


def test_a_failed_deallocate_leaves_the_connection_to_others(start_proxy: StartProxy) -> None:
    """DEALLOCATE of a name PostgreSQL does not know fails and does nothing: the connection it ran on
    still serves other clients (it was kept for its client alone, and the pool of one starved)."""
    proxy = start_proxy(config={"roles": {"main": {"pool_size": 1, "acquire_timeout": "3s"}}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with _connect(dsn) as first, _connect(dsn) as second:
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            first.execute("DEALLOCATE no_such_statement")
        assert second.execute("SELECT 1").fetchone() == (1,)
        assert first.execute("SELECT 2").fetchone() == (2,)
