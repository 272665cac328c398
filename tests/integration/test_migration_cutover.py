"""Cutover and rollback from cutover (issue 17, point 5 and 6): writers and readers through plan, start,
cutover, rollback, cutover again and finish lose and duplicate nothing and never miss history; the hold
takes only the transactions on the moving tables; a cutover that times out changes nothing; the copies
replication keeps refuse writes; a restarted proxy routes by the stored state."""

from __future__ import annotations

import threading
from typing import Any

import pglast
import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

from .test_migration_plan import (
    ADMIN,
    ADMIN_PASSWORD,
    JOIN,
    ROLES,
    StartProxy,
    cli,
    connect,
    console,
    count,
)
from .test_migration_replication import DEADLINE, leftovers
from .test_migration_verbs import TABLES, caught_up, moving, start, status

__all__ = ["moving"]  # the fixture, used by name

SEED = 500  # rows of user_activity the fixture puts in main


STABLE = "SELECT count(*) FROM user_activity WHERE action LIKE 'seed-%'"  # rows no writer touches


def shadowed(proxy: ProxyProcess, outcome: str) -> float:
    return proxy.metric("parafort_proxy_migration_shadow_reads_total", role="analytics", outcome=outcome)


def rows(out: str) -> list[list[str]]:
    """The rows of a verb's table as the CLI prints it (kind, name, detail)."""
    return [[c.strip() for c in line.split(" | ")] for line in out.splitlines()[2:-1]]


def verb(pg: DevClusters, proxy: ProxyProcess, name: str) -> list[list[str]]:
    out = cli(pg, "migrate", "analytics", name, config=proxy.config_path)
    assert out.returncode == 0, out.stderr
    return rows(out.stdout)


class Traffic:
    """Writers inserting uniquely tagged rows of user_activity and readers counting them, through the
    proxy, each on its own connection, until stopped. Every outcome is kept."""

    def __init__(self, proxy: ProxyProcess, writers: int = 2, readers: int = 2) -> None:
        self.proxy = proxy
        self.lock = threading.Lock()
        self.written: list[str] = []  # tags of the writes that succeeded
        self.errors: list[BaseException] = []
        self.reads: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(writers)]
        self.threads += [threading.Thread(target=self._read, daemon=True) for _ in range(readers)]

    def _write(self, i: int) -> None:
        with connect(self.proxy) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                tag = f"w{i}-{n}"
                try:
                    conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, %s)", (tag,))
                except psycopg.Error as exc:
                    with self.lock:
                        self.errors.append(exc)
                    continue
                with self.lock:
                    self.written.append(tag)

    def _read(self) -> None:
        with connect(self.proxy) as conn:
            while not self.stop.is_set():
                with self.lock:
                    committed = len(self.written)
                try:
                    row = conn.execute("SELECT count(*) FROM user_activity").fetchone()
                except psycopg.Error as exc:
                    with self.lock:
                        self.errors.append(exc)
                    continue
                assert row is not None
                with self.lock:
                    # Never missing history: every seeded row and every write committed before the read.
                    self.reads.append(row[0] - SEED - committed)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        self.more()
        return self

    def more(self) -> None:
        """Wait for some writes and reads from now on."""
        with self.lock:
            w, r = len(self.written), len(self.reads)
        wait_until(lambda: len(self.written) > w + 5 and len(self.reads) > r + 5, DEADLINE, "traffic")

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(DEADLINE)
        assert not any(t.is_alive() for t in self.threads)


def kinds(table: list[list[str]], kind: str) -> list[list[str]]:
    return [r for r in table if r[0] == kind]


def refused_write(pg: DevClusters, role: str) -> str:
    """A direct write to ``role``'s copy of user_activity, as the application's login: its error."""
    with (
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info,
        psycopg.connect(pg[role].dsn, autocommit=True) as conn,
    ):
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'direct')")
    return str(info.value)


def test_cutover_rollback_cutover_finish_with_traffic(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = start(start_proxy, pg, migration={"shadow_sample": 1.0})
    with Traffic(proxy) as traffic:
        with connect(proxy) as conn:  # main serves both: a join of moving and staying tables runs
            conn.execute(JOIN).fetchall()
        planned = [r for r in console(proxy, "MIGRATE analytics PLAN") if r["kind"] == "statement"]
        assert [r["name"] for r in planned] == [pglast.parser.fingerprint(JOIN)]  # ...and is listed
        verb(pg, proxy, "start")
        wait_until(lambda: status(proxy)["state"] == "streaming", DEADLINE, "analytics streaming")
        traffic.more()
        # Shadow reads while streaming: a read of rows the writers do not touch is compared and matches
        # (the writers' count(*) changes under every comparison: inconclusive, never diverged).
        with connect(proxy) as conn:
            wait_until(
                lambda: conn.execute(STABLE).fetchone() == (SEED,) and shadowed(proxy, "match") > 0,
                DEADLINE,
                "a shadow read that matches",
            )
        assert shadowed(proxy, "diverged") == 0
        assert status(proxy)["divergences"] == "0"

        out = verb(pg, proxy, "cutover")
        assert out[0][:2] == ["state", "cutover"]
        assert kinds(out, "held")[0][1] == "2 table(s)"
        assert [r[1] for r in kinds(out, "sequence")] == [
            "public.business_metrics_id_seq",
            "public.user_activity_id_seq",
        ]
        assert sorted(r[1] for r in kinds(out, "guarded")) == [f"main: {t}" for t in sorted(TABLES)]
        row = status(proxy)
        assert (row["state"], row["served_by"], row["held_transactions"]) == ("cutover", "analytics", "0")
        before = count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action LIKE 'w%'")
        traffic.more()  # writes now land in analytics...
        assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action LIKE 'w%'") > before
        assert "is not served by this database" in refused_write(pg, "main")  # ...main's copy follows only
        with connect(proxy) as conn, pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(JOIN)  # it would need two databases now

        out = verb(pg, proxy, "rollback")
        assert out[0][:2] == ["state", "streaming"]
        assert sorted(r[1] for r in kinds(out, "guarded")) == [f"analytics: {t}" for t in sorted(TABLES)]
        assert status(proxy)["served_by"] == "main"
        traffic.more()
        assert "is not served by this database" in refused_write(pg, "analytics")

        assert verb(pg, proxy, "cutover")[0][:2] == ["state", "cutover"]
        traffic.more()
    assert traffic.errors == []
    assert traffic.reads and min(traffic.reads) >= 0  # no read ever missed a committed write
    assert shadowed(proxy, "diverged") == 0  # cutover, rollback, cutover: the shadow never saw a difference

    # Every committed write is in the database that serves the table, once; main's copy followed it.
    caught_up_reverse = "SELECT count(*) FROM user_activity WHERE action LIKE 'w%'"
    written = len(traffic.written)
    assert count(pg, "analytics", caught_up_reverse) == written
    tags = pg.analytics.psql(
        "SELECT count(DISTINCT action) FROM user_activity WHERE action LIKE 'w%'", superuser=False
    )
    assert int(tags) == written
    wait_until(lambda: count(pg, "main", caught_up_reverse) == written, DEADLINE, "main's copy current")

    finish_then_restart(pg, proxy, start_proxy, written)


def finish_then_restart(pg: DevClusters, proxy: ProxyProcess, start_proxy: StartProxy, written: int) -> None:
    """finish: replication and main's guards removed, main's copies listed to drop; a restarted proxy
    routes by the stored state."""
    out = verb(pg, proxy, "finish")
    assert out[0][:2] == ["state", "finished"]
    assert sorted(r[1] for r in kinds(out, "may_drop")) == [f"main: {t}" for t in sorted(TABLES)]
    assert sorted(r[1] for r in kinds(out, "unguarded")) == [f"main: {t}" for t in sorted(TABLES)]
    assert leftovers(pg.main) == leftovers(pg.analytics) == ""
    # A restarted proxy routes by the stored state: analytics serves its tables, with their history.
    proxy.stop()
    proxy = start(start_proxy, pg, expect="finished")
    with connect(proxy) as conn:
        assert conn.execute("SELECT count(*) FROM user_activity").fetchone() == (SEED + written,)
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'after-finish')")
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action = 'after-finish'") == 1


def streaming(pg: DevClusters, start_proxy: StartProxy, **config: Any) -> ProxyProcess:
    proxy = start(start_proxy, pg, **config)
    verb(pg, proxy, "start")
    wait_until(lambda: status(proxy)["state"] == "streaming", DEADLINE, "analytics streaming")
    return proxy


def test_the_hold_takes_only_transactions_on_the_moving_tables_and_a_timeout_changes_nothing(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = streaming(pg, start_proxy)
    caught_up(pg)
    # A transaction writing user_activity on main, open: the cutover's lock waits for it.
    blocker = psycopg.connect(pg.main.dsn)
    blocker.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'blocker')")
    result: dict[str, Any] = {}
    cutover = threading.Thread(
        target=lambda: result.update(out=cli(pg, "migrate", "analytics", "cutover", config=proxy.config_path))
    )
    held: dict[str, Any] = {}

    def held_insert() -> None:
        with connect(proxy) as conn:
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'held')")
            held["done"] = True

    inserter = threading.Thread(target=held_insert)
    try:
        cutover.start()
        wait_until(lambda: "holding new transactions" in status(proxy)["detail"], DEADLINE, "the hold")
        inserter.start()
        wait_until(lambda: status(proxy)["held_transactions"] == "1", DEADLINE, "the insert held")
        # Transactions on other tables run meanwhile, reads and writes.
        with connect(proxy) as conn:
            conn.execute("INSERT INTO users (email, full_name) VALUES ('bystander@example.com', 'B')")
            assert conn.execute("SELECT count(*) FROM users WHERE email = 'bystander@example.com'").fetchone()
        assert "holding new transactions" in status(proxy)["detail"]  # still holding
        assert "done" not in held
        cutover.join(DEADLINE)  # cutover_timeout (10 s) passes while the blocker stays open
        assert not cutover.is_alive()
    finally:
        blocker.rollback()
        blocker.close()
        inserter.join(DEADLINE)
    out = result["out"]
    assert out.returncode == 1
    assert "did not end within cutover_timeout" in out.stderr and "nothing changed" in out.stderr
    assert held.get("done")  # released, and run where the unchanged state sends it: main
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'held'") == 1
    row = status(proxy)
    assert (row["state"], row["served_by"], row["held_transactions"]) == ("streaming", "main", "0")
    assert "holding" not in row["detail"]
    caught_up(pg)  # forward replication still runs: the held row reached analytics too
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action = 'held'") == 1
    assert pg.main.psql("SELECT count(*) FROM pg_trigger WHERE tgname = 'parafort_migration_guard'") == "0"
    assert 'parafort_proxy_migration_held_transactions_total{role="analytics"} 1.0' in proxy.metrics()
    # Once nothing blocks it, the same cutover goes through; a restarted proxy resumes from it.
    assert verb(pg, proxy, "cutover")[0][:2] == ["state", "cutover"]
    proxy.stop()
    proxy = start(start_proxy, pg, expect="cutover")
    assert status(proxy)["served_by"] == "analytics"
    with connect(proxy) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'after-restart')")
        assert conn.execute("SELECT count(*) FROM user_activity").fetchone() == (
            SEED + 2,
        )  # the held row and this one
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action = 'after-restart'") == 1


def test_a_second_instance_holds_and_switches_at_the_notice_not_at_its_next_poll(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    first = start(start_proxy, pg)
    # The second polls the stored state every 30 s: only the notices can switch it within the test.
    second = start_proxy(
        roles=ROLES,
        config={
            "domains": DEMO_DOMAINS,
            "auth": {"admin_users": [ADMIN]},
            "health": {"interval": "30s"},
        },
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )
    assert status(second)["state"] == "planned"
    with Traffic(second) as traffic:
        verb(pg, first, "start")
        wait_until(lambda: status(first)["state"] == "streaming", DEADLINE, "analytics streaming")
        traffic.more()
        assert verb(pg, first, "cutover")[0][:2] == ["state", "cutover"]
        wait_until(lambda: status(second)["served_by"] == "analytics", DEADLINE / 4, "the second switched")
        traffic.more()
        assert verb(pg, first, "rollback")[0][:2] == ["state", "streaming"]
        wait_until(lambda: status(second)["served_by"] == "main", DEADLINE / 4, "the second back on main")
        traffic.more()
    assert traffic.errors == []
    assert traffic.reads and min(traffic.reads) >= 0
    log = second.log()
    assert "event=migration_notice kind=hold role=analytics" in log
    assert "event=migration_notice kind=changed role=analytics" in log
    caught_up(pg)  # forward again: every write the second made is in main, and reached analytics once
    written = len(traffic.written)
    tagged = "SELECT count(*) FROM user_activity WHERE action LIKE 'w%'"
    assert count(pg, "main", tagged) == written
    assert count(pg, "analytics", tagged) == written
