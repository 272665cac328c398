"""Fallback and failover with real servers stopped and started while clients keep working."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

ALL_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
FAST_HEALTH = {"interval": "200ms", "timeout": "500ms", "failures_before_down": 2, "successes_before_up": 1}


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess], schema: None) -> ProxyProcess:
    return start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS, "health": FAST_HEALTH})


def databases(proxy: ProxyProcess) -> dict[str, bool]:
    url = f"http://127.0.0.1:{proxy.admin_port}/api/health/databases"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: dict[str, bool] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 while main is down: same body
        body = json.loads(exc.read())
    return body


def connect(proxy: ProxyProcess) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, connect_timeout=10)


def count(pg: DevClusters, role: str, sql: str) -> int:
    return int(pg[role].psql(sql, superuser=False))


@pytest.fixture
def restore(pg: DevClusters) -> Iterator[None]:
    """Whatever a test stops is running again afterwards (the clusters are shared by the session)."""
    yield
    for role in ("main", "analytics", "read_replica"):
        if not pg[role].running:
            pg[role].start()
    pg.wait_replica_caught_up(timeout=60)


class Writers:
    """Clients inserting into user_activity in a loop, each insert recorded under the phase it ran in.

    ``pause()`` returns once no insert is in flight (each writer holds its lock for one insert), so the
    test can stop or start a server between inserts: every insert runs wholly before or after a
    transition, and what it may answer depends only on the phase, never on timing luck.
    """

    def __init__(self, proxy: ProxyProcess, n: int) -> None:
        self.phase = "before"
        self.outcomes: list[tuple[str, str, str | None]] = []  # (phase, tag, sqlstate or None if committed)
        self.lock = threading.Lock()
        self.open = threading.Event()
        self.open.set()
        self.stop = threading.Event()
        self.paused = False
        self.turns = [threading.Lock() for _ in range(n)]
        self.conns = [connect(proxy) for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        conn, turn, k = self.conns[i], self.turns[i], 0
        while not self.stop.is_set():
            self.open.wait(1)
            with turn:
                if not self.open.is_set() or self.stop.is_set():
                    continue  # paused while this writer waited for its turn
                phase, k = self.phase, k + 1
                tag = f"out-{phase}-{i}-{k}"
                try:
                    conn.execute("INSERT INTO user_activity (user_id, action) VALUES (%s, %s)", (i, tag))
                    sqlstate = None
                except psycopg.Error as exc:
                    sqlstate = exc.sqlstate or "?"
                with self.lock:
                    self.outcomes.append((phase, tag, sqlstate))

    def pause(self) -> None:
        self.open.clear()
        for turn in self.turns:
            turn.acquire()
        self.paused = True

    def resume(self, phase: str) -> None:
        self.phase = phase
        self.paused = False
        self.open.set()
        for turn in self.turns:
            turn.release()

    def count(self, phase: str, committed: bool) -> int:
        with self.lock:
            return sum(1 for p, _, state in self.outcomes if p == phase and (state is None) == committed)

    def close(self) -> None:
        self.stop.set()
        if self.paused:  # a test that failed between pause() and resume()
            self.resume(self.phase)
        self.open.set()
        for t in self.threads:
            t.join(20)
        for conn in self.conns:
            conn.close()


def test_analytics_outage_refuses_its_writes_and_loses_none(
    pg: DevClusters, proxy: ProxyProcess, restore: None
) -> None:
    """Issue 13 finding 6: four clients insert into user_activity while analytics goes away and comes back.

    Down, analytics' statements are refused with 57P03 (by default a configured role has no fallback):
    no acknowledged insert goes to main's copy of the table, where the proxy would never show it again.
    """
    writers = Writers(proxy, 4)
    try:
        wait_until(lambda: writers.count("before", True) > 20, 20, "inserts before the outage")
        writers.pause()  # nothing in flight while analytics stops
        pg.analytics.stop()
        wait_until(lambda: databases(proxy)["analytics"] is False, 20, "analytics reported down")
        writers.resume("during")
        wait_until(lambda: writers.count("during", False) > 20, 20, "inserts refused during the outage")
        writers.pause()  # nothing in flight while analytics starts
        pg.analytics.start()
        wait_until(lambda: databases(proxy)["analytics"] is True, 20, "analytics reported up")
        writers.resume("after")
        wait_until(lambda: writers.count("after", True) > 20, 20, "inserts after the outage")
    finally:
        writers.close()
    states = {(phase, state) for phase, _, state in writers.outcomes}
    assert states == {("before", None), ("during", "57P03"), ("after", None)}, states
    committed = {tag for _, tag, state in writers.outcomes if state is None}
    # Every acknowledged insert is where the proxy reads user_activity from, and nothing went to main.
    with connect(proxy) as conn:
        rows = conn.execute("SELECT action FROM user_activity WHERE action LIKE 'out-%'").fetchall()
    assert {row[0] for row in rows} == committed
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action LIKE 'out-%'") == 0
    assert proxy.metric("parafort_proxy_down_refusals_total", role="analytics") == writers.count(
        "during", False
    )
    assert proxy.metric("parafort_proxy_fallbacks_total", role="analytics") == 0


def test_analytics_down_gets_57P03_for_reads_and_writes_at_once(
    pg: DevClusters, proxy: ProxyProcess, restore: None
) -> None:
    """A configured, down role: its reads and writes get 57P03 naming it, without a connect attempt;
    other roles' statements, and the client's connection, carry on."""
    with connect(proxy) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'down-before')")
        pg.analytics.stop()
        wait_until(lambda: databases(proxy)["analytics"] is False, 20, "analytics reported down")
        for sql in (
            "SELECT count(*) FROM user_activity",
            "INSERT INTO user_activity (user_id, action) VALUES (1, 'down-refused')",
        ):
            with pytest.raises(psycopg.errors.CannotConnectNow) as info:
                conn.execute(sql)
            assert "the analytics upstream is down" in str(info.value), info.value
        conn.execute("INSERT INTO users (email, full_name) VALUES ('down-ok@example.com', 'Down OK')")
        assert conn.execute("SELECT count(*) FROM documents").fetchone() is not None
        # In a transaction: refused, the transaction is aborted for the client, ROLLBACK works.
        conn.execute("BEGIN")
        conn.execute("INSERT INTO users (email, full_name) VALUES ('down-tx@example.com', 'Down Tx')")
        with pytest.raises(psycopg.errors.CannotConnectNow):
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'down-tx')")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action LIKE 'down-%'") == 0
    assert count(pg, "main", "SELECT count(*) FROM users WHERE email = 'down-tx@example.com'") == 0
    assert proxy.metric("parafort_proxy_down_refusals_total", role="analytics") == 3


def test_analytics_fallback_main_writes_are_counted_and_logged_per_table(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None, restore: None
) -> None:
    """``fallback: main`` (an explicit choice): main takes analytics' statements while it is down, and
    each write is counted per table and logged once per table per outage, with a summary when it is back."""
    config = {"domains": DEMO_DOMAINS, "health": FAST_HEALTH, "roles": {"analytics": {"fallback": "main"}}}
    proxy = start_proxy(roles=ALL_ROLES, config=config)
    with connect(proxy) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'fb-before')")
        pg.analytics.stop()
        wait_until(lambda: databases(proxy)["analytics"] is False, 20, "analytics reported down")
        for n in range(5):
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, %s)", (f"fb-during-{n}",))
        conn.execute("INSERT INTO business_metrics (entity_id, metric, value) VALUES (1, 'fb-during', 1)")
        conn.execute("SELECT count(*) FROM user_activity").fetchone()  # a read: not a write to reconcile
        assert (
            proxy.metric("parafort_proxy_fallback_writes_total", role="analytics", table="user_activity") == 5
        )
        assert (
            proxy.metric("parafort_proxy_fallback_writes_total", role="analytics", table="business_metrics")
            == 1
        )
        assert proxy.metric("parafort_proxy_fallbacks_total", role="analytics") == 7
        pg.analytics.start()
        wait_until(lambda: databases(proxy)["analytics"] is True, 20, "analytics reported up")
        # What fallback means: the rows are in main's copy, and the proxy reads analytics' again.
        rows = conn.execute("SELECT count(*) FROM user_activity WHERE action LIKE 'fb-during-%'").fetchone()
        assert rows == (0,)
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action LIKE 'fb-during-%'") == 5
    log = proxy.log()
    started = [line for line in log.splitlines() if "event=fallback_writes_started" in line]
    assert len(started) == 2, started
    assert any("table=user_activity" in line for line in started)
    assert any("table=business_metrics" in line for line in started)
    wait_until(lambda: "event=fallback_writes_summary" in proxy.log(), 10, "the outage's summary")
    summary = [line for line in proxy.log().splitlines() if "event=fallback_writes_summary" in line]
    assert any("role=analytics table=user_activity writes=5" in line for line in summary), summary
    assert any("role=analytics table=business_metrics writes=1" in line for line in summary), summary


def test_write_succeeds_as_soon_as_main_accepts_connections(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None, restore: None
) -> None:
    """Issue 13 finding 8: a data-path connection to main ends degraded read-only mode at once.

    The probes are slow here (every 30 s, two successes before up), so only the data path can notice
    main is back in time: the first write once main accepts connections must succeed.
    """
    health = {"interval": "30s", "timeout": "1s", "failures_before_down": 1, "successes_before_up": 2}
    proxy = start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS, "health": health})
    # A statement in flight when main shuts down gets its FATAL and the client connection ends, as on a
    # direct connection: the client then connects again, as an application's pool would.
    conns = [connect(proxy)]
    try:
        conns[-1].execute("INSERT INTO users (email, full_name) VALUES ('back-0@example.com', 'Back')")
        pg.main.stop()

        def refused() -> bool:
            try:
                if conns[-1].closed:
                    conns.append(connect(proxy))
                conns[-1].execute("INSERT INTO users (email, full_name) VALUES ('back-x@example.com', 'X')")
            except psycopg.errors.ReadOnlySqlTransaction:
                return True
            except psycopg.Error as exc:  # the connection main's shutdown took, or a first failed connect
                assert exc.sqlstate is not None and (exc.sqlstate[:2] == "08" or exc.sqlstate == "57P01"), exc
                return False
            raise AssertionError("a write succeeded while main is stopped")

        wait_until(refused, 20, "a write refused with 25006")
        assert databases(proxy)["main"] is False
        pg.main.start()
        wait_until(lambda: _accepts(pg.main.dsn), 30, "main accepting connections")
        conns[-1].execute("INSERT INTO users (email, full_name) VALUES ('back-1@example.com', 'Back')")
        assert databases(proxy)["main"] is True
    finally:
        for conn in conns:
            conn.close()
    assert count(pg, "main", "SELECT count(*) FROM users WHERE email = 'back-1@example.com'") == 1
    assert "reason='data path connected'" in proxy.log()


def _accepts(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


def test_main_down_reads_from_replica_writes_refused(
    pg: DevClusters, proxy: ProxyProcess, restore: None
) -> None:
    with connect(proxy) as conn:
        conn.execute("INSERT INTO users (email, full_name) VALUES ('main-down@example.com', 'Main Down')")
        pg.wait_replica_caught_up()
        pg.main.stop()
        wait_until(lambda: databases(proxy)["main"] is False, 10, "main reported down")
        row = conn.execute(
            "SELECT pg_is_in_recovery(), count(*) FROM users WHERE email LIKE 'main-down%'"
        ).fetchone()
        assert row == (True, 1)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            conn.execute("INSERT INTO users (email, full_name) VALUES ('refused@example.com', 'Refused')")
        assert "main is unavailable" in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.main.start()
        wait_until(lambda: databases(proxy)["main"] is True, 15, "main reported up")
        conn.execute("INSERT INTO users (email, full_name) VALUES ('main-back@example.com', 'Main Back')")
    assert count(pg, "main", "SELECT count(*) FROM users WHERE email = 'main-back@example.com'") == 1
    assert count(pg, "main", "SELECT count(*) FROM users WHERE email = 'refused@example.com'") == 0


def test_replica_down_reads_go_to_main(pg: DevClusters, proxy: ProxyProcess, restore: None) -> None:
    with connect(proxy) as conn:
        assert conn.execute("SELECT pg_is_in_recovery() FROM users LIMIT 1 OFFSET 0").fetchone() in (
            (True,),
            None,
        )
        pg.read_replica.stop()
        wait_until(lambda: databases(proxy)["readReplica"] is False, 10, "replica reported down")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        pg.read_replica.start()
        wait_until(lambda: databases(proxy)["readReplica"] is True, 15, "replica reported up")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


class Readers:
    """Clients reading in a loop on their own connections, recording where each read ran and any error."""

    def __init__(self, proxy: ProxyProcess, n: int, sql: str) -> None:
        self.proxy = proxy
        self.sql = sql
        self.results: list[tuple[int, object]] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.conns = [connect(proxy) for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.conns]
        for t in self.threads:
            t.start()

    def _run(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        while not self.stop.is_set():
            try:
                row = conn.execute(self.sql).fetchone()
            except psycopg.Error as exc:
                with self.lock:
                    self.errors.append(exc)
                if conn.closed:  # its upstream went away mid-statement: so did its connection
                    conn = self._reconnect(conn)
                continue
            assert row is not None
            with self.lock:
                self.results.append((time.monotonic_ns(), row[0]))

    def _reconnect(
        self, old: psycopg.Connection[tuple[object, ...]]
    ) -> psycopg.Connection[tuple[object, ...]]:
        conn = connect(self.proxy)
        with self.lock:
            self.conns[self.conns.index(old)] = conn
        return conn

    def seen_since(self, mark: int) -> set[object]:
        with self.lock:
            return {value for t, value in self.results if t > mark}

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        for conn in self.conns:
            conn.close()


def test_replica_stopped_under_eight_readers(pg: DevClusters, proxy: ProxyProcess, restore: None) -> None:
    readers = Readers(proxy, 8, "SELECT pg_is_in_recovery() FROM (SELECT count(*) FROM users) AS s")
    try:
        mark = time.monotonic_ns()
        wait_until(lambda: True in readers.seen_since(mark), 10, "reads on the replica")
        pg.read_replica.stop()
        stopped = time.monotonic_ns()
        # failures_before_down x interval + timeout = 0.9 s; allow scheduling slack on a busy machine.
        wait_until(lambda: databases(proxy)["readReplica"] is False, 0.9 + 4, "the replica reported down")
        mark = time.monotonic_ns()
        wait_until(lambda: False in readers.seen_since(mark), 10, "reads continuing on main")
        assert readers.seen_since(mark) == {False}
        pg.read_replica.start()
        wait_until(lambda: databases(proxy)["readReplica"] is True, 15, "the replica reported up")
        mark = time.monotonic_ns()
        wait_until(lambda: True in readers.seen_since(mark), 10, "reads back on the replica")
    finally:
        readers.close()
    # Only reads in flight when the replica went away failed, each with a connection-class error.
    assert len(readers.errors) <= 8, readers.errors
    for exc in readers.errors:
        assert exc.sqlstate is not None and (exc.sqlstate.startswith("08") or exc.sqlstate == "57P01"), exc
    assert stopped > 0


def test_replay_paused_sends_reads_to_main(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None, restore: None
) -> None:
    health = {**FAST_HEALTH, "max_replica_lag": "1s", "max_replica_lag_bytes": 1}
    proxy = start_proxy(roles=ALL_ROLES, config={"domains": DEMO_DOMAINS, "health": health})
    with connect(proxy) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        pg.read_replica.psql("SELECT pg_wal_replay_pause()")
        try:

            def lagging() -> bool:
                pg.main.psql("INSERT INTO users (email, full_name) SELECT 'lag' || g || random(), 'Lag' "
                             "FROM generate_series(1, 50) g", superuser=False)  # fmt: skip
                return databases(proxy)["readReplica"] is False

            wait_until(lagging, 20, "the replica reported lagging", interval=0.2)
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        finally:
            pg.read_replica.psql("SELECT pg_wal_replay_resume()")
        wait_until(lambda: databases(proxy)["readReplica"] is True, 20, "the replica caught up")
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


def test_two_replicas_share_reads_and_cover_for_each_other(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None, restore: None
) -> None:
    second = pg.add_replica("replica2")
    try:
        main = pg.main
        replicas = [
            {"name": "r1", "url": pg.read_replica.dsn},
            {"name": "r2", "url": second.dsn_for(main.user, main.password, main.database)},
        ]
        proxy = start_proxy(
            roles=("main",),
            config={"health": FAST_HEALTH, "roles": {"read_replica": {"replicas": replicas}}},
        )
        readers = Readers(proxy, 8, "SELECT inet_server_port() FROM pg_sleep(0.02)")
        try:
            mark = time.monotonic_ns()
            both = {pg.read_replica.port, second.port}
            wait_until(lambda: both <= readers.seen_since(mark), 15, "reads on both replicas")
            second.stop()
            wait_until(lambda: databases(proxy)["readReplica"] is True, 5, "r1 still usable")
            url = f"http://127.0.0.1:{proxy.admin_port}/metrics"

            def r2_down() -> bool:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    text = resp.read().decode()
                return 'parafort_proxy_upstream_up{role="read_replica",upstream="r2"} 0.0' in text

            wait_until(r2_down, 10, "r2 reported down")
            mark = time.monotonic_ns()
            wait_until(lambda: len(readers.seen_since(mark)) > 0, 10, "reads continuing")
            time.sleep(0.5)  # let a few hundred reads run: every one of them must be on r1
            assert readers.seen_since(mark) == {pg.read_replica.port}
        finally:
            readers.close()
        assert len(readers.errors) <= 8, readers.errors
    finally:
        pg.remove_replica("replica2")
