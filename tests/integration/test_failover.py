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

from proxy.demo import DEMO_DOMAINS
from proxy.devcluster import DevClusters, wait_until
from proxy.testing import APP_PASSWORD, APP_USER, ProxyProcess

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


def test_analytics_outage_falls_back_to_main_and_back(
    pg: DevClusters, proxy: ProxyProcess, restore: None
) -> None:
    """Four clients insert into user_activity while analytics goes away and comes back."""
    phase = ["before"]
    committed: list[str] = []
    failed: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(n: int) -> None:
        with connect(proxy) as conn:
            while not stop.is_set():
                tag = phase[0]
                try:
                    conn.execute(
                        "INSERT INTO user_activity (user_id, action) VALUES (%s, %s)", (n, f"out-{tag}")
                    )
                except psycopg.Error as exc:
                    with lock:
                        failed.append(exc)
                    continue
                with lock:
                    committed.append(tag)

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(committed) > 20, 10, "inserts before the outage")
        pg.analytics.stop()
        phase[0] = "during"
        wait_until(lambda: databases(proxy)["analytics"] is False, 10, "analytics reported down")
        wait_until(lambda: committed.count("during") > 20, 10, "inserts during the outage")
        pg.analytics.start()
        wait_until(lambda: databases(proxy)["analytics"] is True, 10, "analytics reported up")
        phase[0] = "after"
        wait_until(lambda: committed.count("after") > 20, 10, "inserts after the outage")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    found = count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action LIKE 'out-%'") + count(
        pg, "main", "SELECT count(*) FROM user_activity WHERE action LIKE 'out-%'"
    )
    # Every insert a client saw committed is there; an insert in flight when analytics stopped may have
    # committed without its client hearing so, never the other way round.
    assert len(committed) <= found <= len(committed) + len(failed)
    assert len(failed) <= 4, failed
    for exc in failed:
        assert exc.sqlstate is not None and (exc.sqlstate.startswith("08") or exc.sqlstate == "57P01"), exc
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'out-during'") > 0
    assert count(
        pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'out-after'"
    ) < committed.count("after")
    assert proxy.metric("parafort_proxy_fallbacks_total", role="analytics") > 0


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
                continue
            assert row is not None
            with self.lock:
                self.results.append((time.monotonic_ns(), row[0]))

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
