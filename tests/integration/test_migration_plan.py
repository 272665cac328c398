"""Moving a domain to its own database, first part (issue 17): the stored migration state, a new URL for a
role whose tables hold rows in main, the plan (CLI and admin console), status and the state metric."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pglast
import psycopg
import pytest
import yaml

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess
from proxy.migration.plan import COLUMNS

StartProxy = Callable[..., ProxyProcess]
ADMIN, ADMIN_PASSWORD = "ops", "ops-secret-pw"
ROLES = ("main", "analytics", "documents", "read_replica")
JOIN = "SELECT u.email, count(*) FROM users u JOIN user_activity a ON a.user_id = u.id GROUP BY u.email"


@pytest.fixture
def history(pg: DevClusters, schema: None) -> Iterator[None]:
    """Analytics rows in main (the seed's phase 1), none in analytics; no stored migration state. Undone
    afterwards, so other tests' proxies serve analytics from its own database again."""
    main = pg.main
    main.psql("DROP SCHEMA IF EXISTS parafort_migration CASCADE")
    main.psql(
        "INSERT INTO users (id, email, full_name) VALUES (1, 'ada@example.com', 'Ada') "
        "ON CONFLICT DO NOTHING; "
        "INSERT INTO user_activity (user_id, action) VALUES (1, 'login'), (1, 'view'), (1, 'logout')",
        superuser=False,
    )
    pg.wait_replica_caught_up()  # reads of main's side may run on the replica
    try:
        yield
    finally:
        main.psql("DROP SCHEMA IF EXISTS parafort_migration CASCADE")
        main.psql("TRUNCATE user_activity, business_metrics", superuser=False)
        pg.analytics.psql("TRUNCATE user_activity, business_metrics", superuser=False)


def start(start_proxy: StartProxy) -> ProxyProcess:
    return start_proxy(
        roles=ROLES,
        config={"domains": DEMO_DOMAINS, "auth": {"admin_users": [ADMIN]}, "health": {"interval": "300ms"}},
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )


def cli(
    pg: DevClusters, *args: str, config: Path | None = None, tmp: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL") and k != "PGPASSWORD"}
    env.update({k: v for k, v in pg.env().items() if not k.startswith(("COMPLIANCE",))})
    if config is None:
        assert tmp is not None
        config = tmp / "proxy.yaml"
        config.write_text(yaml.safe_dump({"domains": DEMO_DOMAINS}))
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args, "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip


def console(proxy: ProxyProcess, command: str) -> list[dict[str, str]]:
    out = subprocess.run(
        ["psql", proxy.dsn(ADMIN, ADMIN_PASSWORD, database="parafort_admin"), "-X", "-A", "-F", "|",
         "-c", command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0].split("|")
    return [dict(zip(header, line.split("|"), strict=True)) for line in lines[1:-1]]


def connect(proxy: ProxyProcess) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True)


def count(pg: DevClusters, role: str, sql: str) -> int:
    return int(pg[role].psql(sql, superuser=False))


def test_plan_lists_tables_rows_and_crossing_foreign_keys_without_a_proxy(
    pg: DevClusters, history: None, tmp_path: Path
) -> None:
    main = pg.main
    main.psql(
        "ALTER TABLE user_activity ADD CONSTRAINT ua_user FOREIGN KEY (user_id) REFERENCES users (id)",
        superuser=False,
    )
    try:
        out = cli(pg, "migrate", "analytics", "plan", tmp=tmp_path)
    finally:
        main.psql("ALTER TABLE user_activity DROP CONSTRAINT ua_user", superuser=False)
    assert out.returncode == 0, out.stderr
    rows = {tuple(c.strip() for c in line.split(" | ")[:2]): line for line in out.stdout.splitlines()}
    assert [c.strip() for c in rows[("kind", "name")].split(" | ")] == list(COLUMNS)
    assert "no migration recorded" in rows[("state", "none")]
    activity = [c.strip() for c in rows[("table", "user_activity")].split(" | ")]
    assert activity[2] == "3" and int(activity[3]) > 0 and activity[5] == "analytics: exists, 0 rows"
    assert [c.strip() for c in rows[("table", "business_metrics")].split(" | ")][2] == "0"
    fk = rows[("foreign_key", "user_activity.ua_user")]
    assert "FOREIGN KEY (user_id) REFERENCES users(id)" in fk and "PostgreSQL cannot enforce it" in fk
    assert "MIGRATE analytics PLAN in its admin console" in rows[("note", "statements")]
    assert ("table", "users") not in rows  # main's own tables stay
    # Nothing was written: plan only reads.
    assert main.psql("SELECT to_regclass('parafort_migration.migrations') IS NULL") == "t"


def test_new_url_with_rows_in_main_starts_planned_and_survives_a_restart(
    pg: DevClusters, history: None, start_proxy: StartProxy, tmp_path: Path
) -> None:
    check = cli(pg, "check", tmp=tmp_path)
    assert check.returncode == 0, check.stderr
    planned = [line for line in check.stderr.splitlines() if "migration state planned" in line]
    assert planned == [
        "parafort-proxy: warning: analytics has a URL, but its tables hold rows in main (user_activity) and "
        "none in analytics: main keeps serving them (migration state planned) until they are moved; see: "
        "parafort-proxy migrate analytics plan"
    ]

    proxy = start(start_proxy)
    assert sum("event=migration_planned role=analytics" in line for line in proxy.log().splitlines()) == 1
    with connect(proxy) as conn:
        assert conn.execute("SELECT count(*) FROM user_activity").fetchone() == (3,)  # history still there
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'while-planned')")
        conn.execute("INSERT INTO documents (owner_id, title, storage_key) VALUES (1, 'plan-doc', 'k')")
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'while-planned'") == 1
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity") == 0
    assert count(pg, "documents", "SELECT count(*) FROM documents WHERE title = 'plan-doc'") == 1
    status = {row["role"]: row for row in console(proxy, "SHOW MIGRATION")}
    assert (status["analytics"]["state"], status["analytics"]["served_by"]) == ("planned", "main")
    assert status["analytics"]["lag_bytes"] == status["analytics"]["divergences"] == ""
    assert (status["documents"]["state"], status["documents"]["served_by"]) == ("none", "documents")
    assert (status["compliance"]["state"], status["compliance"]["served_by"]) == ("none", "main")
    assert proxy.metric("parafort_proxy_migration_state", role="analytics", state="planned") == 1
    assert proxy.metric("parafort_proxy_migration_state", role="analytics", state="none") == 0
    assert proxy.metric("parafort_proxy_migration_state", role="documents", state="none") == 1

    # The CLI, through the running proxy's console: status, and a verb this proxy cannot carry out.
    out = cli(pg, "migrate", "analytics", "status", config=proxy.config_path)
    assert out.returncode == 0, out.stderr
    cells = [c.strip() for c in out.stdout.splitlines()[2].split(" | ")]
    assert cells[:3] == ["analytics", "planned", "main"]
    out = cli(pg, "migrate", "analytics", "cutover", config=proxy.config_path)
    assert (out.returncode, out.stdout) == (1, "")
    assert "roles.main.migration_url (MIGRATION_DATABASE_URL) is not set" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    with pytest.raises(
        AssertionError, match=r"roles\.main\.migration_url \(MIGRATION_DATABASE_URL\) is not set"
    ):
        console(proxy, "MIGRATE analytics START")  # this proxy has no migration logins

    # Restarted with main's copy emptied: the stored state, not the rows, keeps main serving analytics.
    proxy.stop()
    pg.main.psql("DELETE FROM user_activity", superuser=False)
    again = start(start_proxy)
    log = again.log()
    assert "event=migration_planned" not in log
    assert "event=migration_state role=analytics state=planned served_by=main" in log
    with connect(again) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'after-restart')")
    assert count(pg, "main", "SELECT count(*) FROM user_activity WHERE action = 'after-restart'") == 1
    check = cli(pg, "check", tmp=tmp_path)
    assert "its migration is in state planned" in check.stderr, check.stderr

    # Another instance (here: psql) changes the stored state; the running proxy follows at its next poll.
    pg.main.psql("DELETE FROM parafort_migration.migrations WHERE role = 'analytics'")
    wait_until(
        lambda: console(again, "MIGRATE analytics STATUS")[0]["served_by"] == "analytics", 20, "the next poll"
    )
    with connect(again) as conn:
        conn.execute("INSERT INTO user_activity (user_id, action) VALUES (1, 'after-delete')")
    assert count(pg, "analytics", "SELECT count(*) FROM user_activity WHERE action = 'after-delete'") == 1


def test_join_of_moving_and_staying_tables_is_listed_by_plan_and_not_refused_meanwhile(
    pg: DevClusters, history: None, start_proxy: StartProxy, tmp_path: Path
) -> None:
    proxy = start(start_proxy)
    with connect(proxy) as conn:
        for _ in range(3):
            # Not refused: main's side (main or its replica) runs it.
            assert conn.execute(JOIN).fetchall() == [("ada@example.com", 3)]
        conn.execute("SELECT count(*) FROM user_activity").fetchone()  # one table: nothing to refuse
    rows = console(proxy, "MIGRATE analytics PLAN")
    statements = [r for r in rows if r["kind"] == "statement"]
    assert len(statements) == 1, rows
    assert statements[0]["name"] == pglast.parser.fingerprint(JOIN)
    assert statements[0]["seen"] == "3"
    assert statements[0]["detail"] == (
        "joins user_activity (moves to analytics) with users (stays): refused with 0A000 once analytics "
        "serves its tables"
    )
    # The same catalog rows as the CLI's plan (made with no proxy).
    out = cli(pg, "migrate", "analytics", "plan", tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    # bytes left out: a table's size may change between two reads (free space map, visibility map).
    cli_rows = [[c.strip() for c in line.split(" | ")] for line in out.stdout.splitlines()[2:-1]]
    cli_rows = [r[:3] + r[4:] for r in cli_rows if r[0] != "note"]
    console_rows = [[v for k, v in r.items() if k != "bytes"] for r in rows if r["kind"] != "statement"]
    assert cli_rows == console_rows
    assert [r["name"] for r in rows if r["kind"] == "table"] == ["business_metrics", "user_activity"]
    with pytest.raises(AssertionError, match="unknown domain role"):
        console(proxy, "MIGRATE main PLAN")


def test_a_role_whose_own_database_holds_rows_is_in_service_whatever_main_holds(
    pg: DevClusters, history: None, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """Rows in main's copy (a fallback outage's writes, say) do not take a role in service back to main."""
    pg.analytics.psql("INSERT INTO user_activity (user_id, action) VALUES (1, 'in-service')", superuser=False)
    check = cli(pg, "check", tmp=tmp_path)
    assert check.returncode == 0 and "migration" not in check.stderr, check.stderr
    proxy = start(start_proxy)
    with connect(proxy) as conn:
        assert conn.execute("SELECT action FROM user_activity").fetchall() == [("in-service",)]
    assert "event=migration_" not in proxy.log()
    status = {row["role"]: row for row in console(proxy, "SHOW MIGRATION")}
    assert (status["analytics"]["state"], status["analytics"]["served_by"]) == ("none", "analytics")
    assert pg.main.psql("SELECT to_regclass('parafort_migration.migrations') IS NULL") == "t"
