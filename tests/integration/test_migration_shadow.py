"""Shadow reads while a domain migrates (issue 17 point 4, proxy/migration/shadow.py): with analytics
streaming from main, a sampled share of the reads of its tables runs again on analytics off the client's path
and is compared: matches counted, a row changed on the target counted as a divergence under its statement's
fingerprint (metrics, SHOW SHADOW, SHOW MIGRATION), a target that goes away costs the clients nothing, and
``shadow_sample: 0`` samples nothing until a reload changes it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pglast
import psycopg
import yaml

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

from .test_migration_plan import ADMIN, ADMIN_PASSWORD, ROLES, StartProxy, connect, console
from .test_migration_replication import DEADLINE
from .test_migration_verbs import caught_up, moving, status

__all__ = ["moving"]  # the fixture, used by name

READS = "parafort_proxy_migration_shadow_reads_total"
BY_USER = "SELECT id, action FROM user_activity WHERE user_id = %s ORDER BY id"
BY_ID = "SELECT action FROM user_activity WHERE id = %s"


def streaming(start_proxy: StartProxy, pg: DevClusters, sample: float) -> ProxyProcess:
    """A proxy with analytics moved to streaming (initial copy done) and ``shadow_sample`` set."""
    proxy = start_proxy(
        roles=ROLES,
        config={
            "domains": DEMO_DOMAINS,
            "auth": {"admin_users": [ADMIN]},
            "health": {"interval": "300ms"},
            "migration": {"shadow_sample": sample},
            "roles": {
                "main": {"migration_url": pg.main.super_dsn},
                "analytics": {"migration_url": pg.analytics.super_dsn},
            },
        },
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )
    wait_until(lambda: status(proxy)["state"] == "planned", DEADLINE, "analytics planned")
    console(proxy, "MIGRATE analytics START")
    wait_until(lambda: status(proxy)["state"] == "streaming", DEADLINE, "analytics streaming")
    caught_up(pg)
    return proxy


def outcomes(proxy: ProxyProcess) -> dict[str, float]:
    return {
        outcome: proxy.metric(READS, role="analytics", outcome=outcome)
        for outcome in ("match", "diverged", "inconclusive", "error", "dropped", "skipped")
    }


def shadow_rows(proxy: ProxyProcess) -> dict[str, dict[str, str]]:
    return {row["fingerprint"]: row for row in console(proxy, "SHOW SHADOW") if row["role"] == "analytics"}


def fingerprint(sql: str) -> str:
    """The fingerprint of ``sql`` as psycopg sends it (placeholders as $n)."""
    return str(pglast.parser.fingerprint(sql.replace("%s", "$1")))


def reads_until(
    proxy: ProxyProcess, sql: str, params: tuple[Any, ...], done: Callable[[], bool]
) -> list[Any]:
    """Run ``sql`` through the proxy until ``done()``; every answer is returned (the client's view)."""
    answers: list[Any] = []
    with connect(proxy) as conn:

        def read() -> bool:
            answers.append(conn.execute(sql, params).fetchall())
            return done()

        try:
            wait_until(read, DEADLINE, f"shadow outcome of {sql!r}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {outcomes(proxy)}, {console(proxy, 'SHOW SHADOW')}") from None
    return answers


def asyncpg_read(proxy: ProxyProcess, sql: str, *args: object) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(proxy.dsn(APP_USER, APP_PASSWORD))
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def test_streaming_reads_match_and_a_row_changed_on_the_target_diverges(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = streaming(start_proxy, pg, 1.0)
    expected = pg.main.psql(
        "SELECT string_agg(id || ':' || action, ',' ORDER BY id) FROM user_activity WHERE user_id = 3",
        superuser=False,
    )
    answers = reads_until(proxy, BY_USER, (3,), lambda: outcomes(proxy)["match"] >= 3)
    for rows in answers:  # the clients' answers: main's rows, whatever the shadow does
        assert ",".join(f"{i}:{a}" for i, a in rows) == expected
    simple = "SELECT count(*) FROM business_metrics"
    with connect(proxy) as conn:  # the simple protocol too (psycopg's client-side binding)
        cur = psycopg.ClientCursor(conn)

        def compared() -> bool:
            assert cur.execute(simple).fetchone() == (1,)
            return int(shadow_rows(proxy).get(fingerprint(simple), {}).get("matches", "0")) > 0

        wait_until(compared, DEADLINE, "a simple-protocol read compared")
    # asyncpg: a statement prepared by name in one unit, bound in later ones, parameters in binary format.
    binary = "SELECT count(*), max(action) FROM user_activity WHERE user_id = $1 AND action <> $2"

    def binary_compared() -> bool:
        assert asyncpg_read(proxy, binary, 6, "none")[0][0] == 50
        return int(shadow_rows(proxy).get(fingerprint(binary), {}).get("matches", "0")) > 0

    wait_until(binary_compared, DEADLINE, "a read with binary parameters compared")
    row = shadow_rows(proxy)[fingerprint(BY_USER)]
    assert int(row["matches"]) >= 3 and row["divergences"] == "0" and row["errors"] == "0", row
    assert row["statement"] == "SELECT id, action FROM user_activity WHERE user_id = $1 ORDER BY id"
    assert status(proxy)["divergences"] == "0"

    # A row changed on the target only: reads of it differ, counted under their statement's fingerprint.
    target_id = int(pg.main.psql("SELECT min(id) FROM user_activity WHERE user_id = 4", superuser=False))
    action = pg.main.psql(f"SELECT action FROM user_activity WHERE id = {target_id}", superuser=False)
    pg.analytics.psql(f"UPDATE user_activity SET action = 'tampered' WHERE id = {target_id}")
    diverged = fingerprint(BY_ID)
    divergences = "parafort_proxy_migration_divergences_total"
    answers = reads_until(
        proxy,
        BY_ID,
        (target_id,),
        lambda: proxy.metric(divergences, role="analytics", fingerprint=diverged) >= 1,
    )
    assert all(rows == [(action,)] for rows in answers)  # clients keep reading main's row
    row = shadow_rows(proxy)[diverged]
    assert (
        int(row["divergences"]) >= 1 and row["statement"] == "SELECT action FROM user_activity WHERE id = $1"
    )
    assert int(status(proxy)["divergences"]) >= 1
    # No literal of the statements, nor any row value, in the metrics, the console or the log.
    text = proxy.metrics() + repr(console(proxy, "SHOW SHADOW")) + proxy.log()
    assert "tampered" not in text and action not in text
    assert "event=migration_shadow_diverged role=analytics fingerprint=" + diverged in proxy.log()
    # The untouched statement still matches.
    before = int(shadow_rows(proxy)[fingerprint(BY_USER)]["matches"])
    reads_until(
        proxy, BY_USER, (3,), lambda: int(shadow_rows(proxy)[fingerprint(BY_USER)]["matches"]) > before
    )


def test_a_target_that_goes_away_costs_the_clients_nothing(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = streaming(start_proxy, pg, 1.0)
    reads_until(proxy, BY_USER, (5,), lambda: outcomes(proxy)["match"] >= 1)
    expected = int(pg.main.psql("SELECT count(*) FROM user_activity WHERE user_id = 5", superuser=False))
    pg.analytics.stop()
    try:
        # A bystander keeps getting main's answers while every sample fails on the target.
        answers = reads_until(proxy, BY_USER, (5,), lambda: outcomes(proxy)["error"] >= 3)
        assert all(len(rows) == expected for rows in answers)
        with connect(proxy) as conn:
            conn.execute("INSERT INTO user_activity (user_id, action) VALUES (5, 'while-target-down')")
            assert len(conn.execute(BY_USER, (5,)).fetchall()) == expected + 1
        assert status(proxy)["state"] == "streaming"
        assert "event=migration_shadow_error role=analytics error=" in proxy.log()
        assert shadow_rows(proxy)[fingerprint(BY_USER)]["last_error"] in ("ConnectionRefusedError", "OSError")
    finally:
        pg.analytics.start()
    caught_up(pg)
    # Back: the shadow connects again and compares.
    before = outcomes(proxy)["match"]
    reads_until(proxy, BY_USER, (5,), lambda: outcomes(proxy)["match"] > before)


def test_sample_zero_compares_nothing_until_a_reload_raises_it(
    pg: DevClusters, moving: None, start_proxy: StartProxy
) -> None:
    proxy = streaming(start_proxy, pg, 0.0)
    with connect(proxy) as conn:
        for user in range(10):
            conn.execute(BY_USER, (user,)).fetchall()
    # The streaming role's series are published (at 0) and nothing was sampled.
    assert f'{READS}{{outcome="match",role="analytics"}} 0.0' in proxy.metrics()
    assert set(outcomes(proxy).values()) == {0.0}
    assert shadow_rows(proxy) == {}
    assert status(proxy)["divergences"] == ""
    doc = yaml.safe_load(proxy.config_path.read_text())
    doc["migration"]["shadow_sample"] = 1.0
    proxy.config_path.write_text(yaml.safe_dump(doc))
    console(proxy, "RELOAD")
    reads_until(proxy, BY_USER, (1,), lambda: outcomes(proxy)["match"] >= 1)
    assert status(proxy)["divergences"] == "0"
