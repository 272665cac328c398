"""The admin console (psql to database admin.database, "parafort_admin", as an admin user); PAUSE / RESUME."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

ADMIN, ADMIN_PASSWORD = "ops", "ops-secret-pw"


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(
        roles=("main",),
        config={"auth": {"admin_users": [ADMIN]}},
        users={APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD},
    )


def console(proxy: ProxyProcess, command: str, user: str = ADMIN, password: str = ADMIN_PASSWORD) -> str:
    out = subprocess.run(
        ["psql", proxy.dsn(user, password, database="parafort_admin"), "-X", "-A", "-F", "|", "-c", command],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return out.stdout


def test_show_commands(proxy: ProxyProcess, pg: DevClusters) -> None:
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as conn:
        conn.execute("SELECT 1")
        pools = console(proxy, "SHOW POOLS")
        assert (
            pools.splitlines()[0]
            == "role|upstream|pool_size|total|active|idle|waiting|acquire_timeouts|paused"
        )
        assert pools.splitlines()[1].startswith("main|main|20|")
        clients = console(proxy, "SHOW CLIENTS")
        assert f"|{APP_USER}|app|" in clients and f"|{ADMIN}|parafort_admin|" in clients
        assert "main|main|" in console(proxy, "show servers;")
        assert "main|read|" in console(proxy, "SHOW STATS")
        assert console(proxy, "SHOW HEALTH").splitlines()[1].startswith("main|main|t|t|")
        config = console(proxy, "SHOW CONFIG")
        assert "roles.main.url|" in config and pg.main.password not in config and ADMIN_PASSWORD not in config
        assert console(proxy, "RELOAD").strip() == "RELOAD"
        assert "SHOW POOLS" in console(proxy, "SHOW HELP")


def test_console_refuses_non_admins_and_bad_commands(proxy: ProxyProcess) -> None:
    with pytest.raises(AssertionError, match="not allowed to use the admin console"):
        console(proxy, "SHOW POOLS", APP_USER, APP_PASSWORD)
    with pytest.raises(AssertionError, match="password authentication failed"):
        console(proxy, "SHOW POOLS", ADMIN, "wrong")
    with pytest.raises(AssertionError, match="unknown admin command"):
        console(proxy, "DROP TABLE users")


def test_pause_and_resume_main(proxy: ProxyProcess, pg: DevClusters) -> None:
    pg.main.psql("CREATE TABLE IF NOT EXISTS pause_probe (id serial PRIMARY KEY, n int)", superuser=False)
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    done: list[int] = []
    errors: list[BaseException] = []

    def insert(n: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO pause_probe (n) VALUES (%s)", (n,))
            done.append(n)
        except psycopg.Error as exc:
            errors.append(exc)

    try:
        assert console(proxy, "PAUSE main").strip() == "PAUSE"
        assert "|t\n" in console(proxy, "SHOW POOLS")
        threads = [threading.Thread(target=insert, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: console(proxy, "SHOW CLIENTS").count("|waiting|") == 4, 10, "four waiting clients")
        assert done == []
        assert console(proxy, "RESUME main").strip() == "RESUME"
        for t in threads:
            t.join(20)
        assert sorted(done) == [0, 1, 2, 3] and errors == []
        assert pg.main.psql("SELECT count(*) FROM pause_probe", superuser=False) == "4"
    finally:
        console(proxy, "RESUME")
        pg.main.psql("DROP TABLE IF EXISTS pause_probe", superuser=False)
