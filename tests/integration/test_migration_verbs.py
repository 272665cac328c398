"""The migration verbs wired to the replication library (issue 17): ``start`` through the CLI and the admin
console with writers running, copying -> streaming with the lag in ``status``, refusals of verbs the state
does not allow, ``rollback`` back to planned, and two proxy instances racing to start."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest

from proxy.config.dsn import parse_dsn
from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.migration.replication import current_lsn, wait_caught_up

from .test_migration_plan import (
    ADMIN,
    ADMIN_PASSWORD,
    ROLES,
    StartProxy,
    cli,
    connect,
    console,
    count,
)
from .test_migration_replication import DEADLINE, digest, leftovers, scrub

TABLES = ("user_activity", "business_metrics")


@pytest.fixture
def moving(pg: DevClusters, schema: None) -> Iterator[None]:
    """Analytics rows in main (the seed's phase 1), none in analytics, no stored state and no replication;
    all of it removed afterwards (a slot left on main would hold WAL for the rest of the session)."""
    used = [pg.main, pg.analytics]
    main = pg.main
    for cluster in used:  # the stored state, and the write guards of a cutover (their function is there)
        cluster.psql("DROP SCHEMA IF EXISTS parafort_migration CASCADE")
    main.psql(
        "INSERT INTO user_activity (user_id, action) SELECT g % 10, 'seed-' || g"
        " FROM generate_series(1, 500) g;"
        "INSERT INTO business_metrics (entity_id, metric, value) VALUES (1, 'revenue', 10.5)",
        superuser=False,
    )
    pg.wait_replica_caught_up()
    try:
        yield
    finally:
        scrub([c for c in used if c.running])
        for cluster in used:
            if cluster.running:
                cluster.psql("DROP SCHEMA IF EXISTS parafort_migration CASCADE")
        main.psql("TRUNCATE user_activity, business_metrics", superuser=False)
        pg.analytics.psql("TRUNCATE user_activity, business_metrics", superuser=False)
        assert all(leftovers(c) == "" for c in used if c.running)


def start(
    start_proxy: StartProxy,
    pg: DevClusters,
    *,
    logins: bool = True,
    expect: str = "planned",
    main_login: str | None = None,
    migration: dict[str, object] | None = None,
) -> ProxyProcess:
    roles: dict[str, object] = {}
    if logins:
        roles = {
            "main": {"migration_url": main_login or pg.main.super_dsn},
            "analytics": {"migration_url": pg.analytics.super_dsn},
        }
    proxy = start_proxy(
        roles=ROLES,
        config={
            "domains": DEMO_DOMAINS,
            "auth": {"admin_users": [ADMIN]},
            "health": {"interval": "300ms"},
            "roles": roles,
            "migration": migration or {},
        },
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )
    wait_until(lambda: status(proxy)["state"] == expect, DEADLINE, f"analytics {expect}")
    return proxy


def status(proxy: ProxyProcess) -> dict[str, str]:
    return console(proxy, "MIGRATE analytics STATUS")[0]


def refused(proxy: ProxyProcess, command: str) -> str:
    """The error line the console answers ``command`` with."""
    with pytest.raises(AssertionError) as info:
        console(proxy, command)
    return str(info.value).splitlines()[0]


def caught_up(pg: DevClusters) -> None:
    main, target = parse_dsn(pg.main.super_dsn), parse_dsn(pg.analytics.super_dsn)

    async def wait() -> None:
        lsn = await current_lsn(main)
        assert await wait_caught_up(main, target, "analytics", lsn, DEADLINE)

    asyncio.run(wait())


class Writers:
    """A thread inserting rows of user_activity through the proxy, one autocommit statement at a time."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.written = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with connect(self.proxy) as conn:
            while not self.stop.is_set():
                conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'during-migration')")
                self.written += 1

    def __enter__(self) -> Writers:
        self.thread.start()
        wait_until(lambda: self.written > 0, DEADLINE, "a first write")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()


def after_rollback(pg: DevClusters, proxy: ProxyProcess, copied: int) -> None:
    """Planned again: main serves, the copied rows stay in analytics, and a new start says what to do."""
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity") == copied  # rows stay
    with connect(proxy) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'after-rollback')")
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'after-rollback'") == 1
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action = 'after-rollback'") == 0
    # A new start finds the copied rows and says what to do (the proxy never empties a table).
    line = refused(proxy, "MIGRATE analytics START")
    assert "already holds rows and is not subscribed" in line and "the state is unchanged" in line
    assert status(proxy)["state"] == "planned"
    assert leftovers(pg.main) == leftovers(pg.analytics) == ""


def test_start_with_writers_streams_then_rollback_returns_to_planned(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = start(start_proxy, pg)
    with Writers(proxy) as writers:
        out = cli(pg, "migrate", "analytics", "start", config=proxy.config_path)
        assert out.returncode == 0, out.stderr
        lines = [[c.strip() for c in line.split(" | ")] for line in out.stdout.splitlines()[2:-1]]
        assert lines[0][:2] == ["state", "copying"]
        assert sorted(line[1] for line in lines if line[0] == "existing") == sorted(TABLES)
        # copying -> streaming once the initial copy is done (the monitor or status notices)
        wait_until(lambda: status(proxy)["state"] == "streaming", DEADLINE, "analytics streaming")
        row = status(proxy)
        assert row["served_by"] == "main" and int(row["lag_bytes"]) >= 0
        assert "tables copied: 2/2, streaming" in row["detail"]
        assert 'parafort_proxy_migration_lag_bytes{role="analytics"}' in proxy.metrics()
        before = writers.written
        wait_until(lambda: writers.written > before, DEADLINE, "writes while streaming")
    caught_up(pg)
    written = count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'during-migration'")
    assert written == writers.written  # every write of the clients went to main (main serves)
    for table in TABLES:  # ...and reached the target exactly once
        assert digest(pg.analytics, table) == digest(pg.main, table)
    with connect(proxy) as conn:  # reads keep their history: still main's
        assert conn.execute("SELECT count(*) FROM user_activity").fetchone() == (500 + written,)

    # What the state does not allow is refused with one line, and nothing changes.
    assert "start: not possible in state streaming" in refused(proxy, "MIGRATE analytics START")
    line = refused(proxy, "MIGRATE analytics FINISH")
    assert "finish: not possible in state streaming (possible: cutover, rollback)" in line
    assert status(proxy)["state"] == "streaming"

    # A restarted proxy resumes from the stored state: main serves, the lag is read again.
    proxy.stop()
    proxy = start(start_proxy, pg, expect="streaming")
    wait_until(lambda: status(proxy)["lag_bytes"] != "", DEADLINE, "lag read after the restart")
    with connect(proxy) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (7, 'after-restart')")
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'after-restart'") == 1
    written += 1
    caught_up(pg)  # the row reached the target before the rollback removes the subscription

    out = cli(pg, "migrate", "analytics", "rollback", config=proxy.config_path)
    assert out.returncode == 0, out.stderr
    assert [c.strip() for c in out.stdout.splitlines()[2].split(" | ")][:2] == ["state", "planned"]
    assert "stay there" in out.stdout and "TRUNCATE" in out.stdout
    assert leftovers(pg.main) == leftovers(pg.analytics) == ""
    wait_until(lambda: status(proxy)["state"] == "planned", DEADLINE, "analytics planned again")
    assert status(proxy)["lag_bytes"] == ""
    assert "parafort_proxy_migration_lag_bytes{" not in proxy.metrics()
    after_rollback(pg, proxy, 500 + written)


def test_two_proxies_racing_to_start_one_wins_the_other_is_told(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    first, second = start(start_proxy, pg), start(start_proxy, pg)

    def attempt(proxy: ProxyProcess) -> str:
        try:
            console(proxy, "MIGRATE analytics START")
        except AssertionError as exc:
            return str(exc).splitlines()[0]
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(attempt, (first, second)))
    assert outcomes.count("ok") == 1, outcomes
    lost = next(o for o in outcomes if o != "ok")
    assert "another migrate command for analytics is under way" in lost or (
        "start: not possible in state copying" in lost
    ), lost
    for proxy in (first, second):
        wait_until(lambda p=proxy: status(p)["state"] in ("copying", "streaming"), DEADLINE, "started")
    console(second, "MIGRATE analytics ROLLBACK")
    for proxy in (first, second):
        wait_until(lambda p=proxy: status(p)["state"] == "planned", DEADLINE, "planned again")


def test_without_migration_logins_the_verbs_say_what_is_missing(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = start(start_proxy, pg, logins=False)
    out = cli(pg, "migrate", "analytics", "start", config=proxy.config_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "parafort-proxy: migrate analytics start: roles.main.migration_url "
        "(MIGRATION_DATABASE_URL) is not set: it needs a login to main's database that may set up logical "
        "replication (PostgreSQL 15: a superuser)"
    ]
    assert status(proxy)["state"] == "planned"
    assert leftovers(pg.main) == leftovers(pg.analytics) == ""


def test_a_migration_login_to_another_database_is_refused_before_anything_is_created(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = start(start_proxy, pg, main_login=pg.documents.super_dsn)
    line = refused(proxy, "MIGRATE analytics START")
    assert "roles.main.migration_url reaches database" in line and "nothing changed" in line
    assert pg.documents.super_password not in line and pg.main.super_password not in line
    assert status(proxy)["state"] == "planned"
    assert leftovers(pg.main) == leftovers(pg.analytics) == leftovers(pg.documents) == ""
