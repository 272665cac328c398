"""psql and pgbench through the proxy: multi-statement input, files, \\copy, pgbench in all modes."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config.loader import ROLE_ENV
from proxy.dev.cluster import DevClusters
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess


def _client_env(**extra: str) -> dict[str, str]:
    """The environment for psql/pgbench: no stray PG* variables from the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _psql(proxy: ProxyProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = ["psql", proxy.dsn(APP_USER, APP_PASSWORD), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=_client_env(), check=False
    )
    assert proc.returncode == 0, f"psql {args!r} failed ({proc.returncode}):\n{proc.stderr}\n{proxy.log()}"
    return proc


# -- psql ----------------------------------------------------------------------------------------------------


def test_psql_multi_statement_command(proxy: ProxyProcess, pg: DevClusters) -> None:
    table = "psql_multi_cmd"
    try:
        out = _psql(
            proxy,
            "-c",
            f"CREATE TABLE {table} (id int PRIMARY KEY, v text); "
            f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two'), (3, 'three'); "
            f"SELECT count(*) FROM {table}; "
            f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}",
            "-c",
            f"UPDATE {table} SET v = upper(v) WHERE id >= 2; "
            f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}",
        )
        # psql 15 prints the result of every statement of a multi-statement -c string.
        assert out.stdout.splitlines() == ["3", "one,two,three", "one,TWO,THREE"]
        assert pg.main.psql(f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}") == "one,TWO,THREE"
    finally:
        pg.main.psql(f"DROP TABLE IF EXISTS {table}")


def test_psql_script_file(proxy: ProxyProcess, pg: DevClusters, tmp_path: Path) -> None:
    table = "psql_script_file"
    script = tmp_path / "script.sql"
    script.write_text(
        f"""
CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO {table} SELECT g, g * 10 FROM generate_series(1, 5) AS g;
SELECT sum(v) FROM {table};
BEGIN;
UPDATE {table} SET v = v + 1 WHERE id <= 2;
SELECT sum(v) FROM {table};
COMMIT;
BEGIN;
DELETE FROM {table};
SELECT count(*) FROM {table};
ROLLBACK;
SELECT count(*), sum(v) FROM {table};
"""
    )
    try:
        out = _psql(proxy, "-f", str(script))
        assert out.stdout.splitlines() == ["150", "152", "0", "5|152"]
        assert pg.main.psql(f"SELECT count(*), sum(v) FROM {table}") == "5|152"
    finally:
        pg.main.psql(f"DROP TABLE IF EXISTS {table}")


def test_psql_copy_in_and_out(proxy: ProxyProcess, pg: DevClusters, tmp_path: Path) -> None:
    table = "psql_copy_in_out"
    rows = [
        (i, f"name {i}", f'note with, comma and "quote" {i}' if i % 7 == 0 else f"plain {i}")
        for i in range(1, 2001)
    ]
    src = tmp_path / "in.csv"
    src.write_text("".join(f'{i},{name},"{note.replace(chr(34), chr(34) * 2)}"\n' for i, name, note in rows))
    dst = tmp_path / "out.csv"
    try:
        pg.main.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL, note text NOT NULL)")
        pg.main.psql(f"GRANT ALL ON {table} TO {pg.main.user}")
        _psql(proxy, "-c", f"\\copy {table} FROM '{src}' WITH (FORMAT csv)")
        assert (
            pg.main.psql(f"SELECT count(*), sum(id) FROM {table}") == f"{len(rows)}|{sum(r[0] for r in rows)}"
        )
        assert pg.main.psql(f"SELECT note FROM {table} WHERE id = 14") == 'note with, comma and "quote" 14'
        _psql(
            proxy,
            "-c",
            f"\\copy (SELECT id, name, note FROM {table} ORDER BY id) TO '{dst}' WITH (FORMAT csv)",
        )
        assert dst.read_text() == "".join(
            f"{i},{name},{chr(34) + note.replace(chr(34), chr(34) * 2) + chr(34) if ',' in note else note}\n"
            for i, name, note in rows
        )
        # The connection is still fine for ordinary statements after COPY in both directions.
        out = _psql(
            proxy,
            "-c",
            f"\\copy {table} TO '{tmp_path / 'plain.txt'}'",
            "-c",
            f"SELECT count(*) FROM {table}",
        )
        assert out.stdout.strip() == str(len(rows))
        assert len((tmp_path / "plain.txt").read_text().splitlines()) == len(rows)
    finally:
        pg.main.psql(f"DROP TABLE IF EXISTS {table}")


# -- pgbench -------------------------------------------------------------------------------------------------


def _pgbench(proxy: ProxyProcess, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", APP_USER, *args, "app"]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_client_env(PGPASSWORD=APP_PASSWORD, PGSSLMODE="disable"),
        check=False,
    )


@pytest.fixture(scope="module")
def pgbench_proxy(pg: DevClusters) -> Iterator[ProxyProcess]:
    """One proxy on main for this module, with the pgbench tables initialized through it (scale 1)."""
    env = {ROLE_ENV["main"]: pg.env()[ROLE_ENV["main"]]}
    proxy = ProxyProcess(env, None, {APP_USER: APP_PASSWORD}, "info")
    try:
        init = _pgbench(proxy, "-i", "-s", "1", "-q")
        assert init.returncode == 0, f"pgbench -i failed:\n{init.stdout}\n{init.stderr}\n{proxy.log()}"
        assert pg.main.psql("SELECT count(*) FROM pgbench_accounts") == "100000"
        assert pg.main.psql("SELECT count(*) FROM pgbench_branches") == "1"
        yield proxy
    finally:
        try:
            pg.main.psql(
                "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"
            )
        finally:
            proxy.stop()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_modes(pgbench_proxy: ProxyProcess, pg: DevClusters, mode: str) -> None:
    clients, per_client = 16, 200
    history_before = int(pg.main.psql("SELECT count(*) FROM pgbench_history"))
    run = _pgbench(pgbench_proxy, "-n", "-M", mode, "-c", str(clients), "-j", "2", "-t", str(per_client))
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    assert f"number of transactions actually processed: {clients * per_client}/{clients * per_client}" in (
        run.stdout
    ), report
    failed = re.search(r"number of failed transactions: (\d+)", run.stdout)
    assert failed is not None and failed.group(1) == "0", report
    assert "error" not in run.stderr.lower(), report
    # Every transaction of the tpcb-like script inserted exactly one history row.
    history_after = int(pg.main.psql("SELECT count(*) FROM pgbench_history"))
    assert history_after - history_before == clients * per_client
    # The balances stay consistent: the sum over branches equals the sum over history.
    assert (
        pg.main.psql(
            "SELECT (SELECT sum(bbalance) FROM pgbench_branches) "
            "= (SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
        )
        == "t"
    )
