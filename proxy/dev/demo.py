"""``parafort-proxy demo``: throwaway local clusters with a small ParaFort schema, ready to connect to.

The demo starts where the seed's phase 2 starts: analytics' rows are in main and the analytics database is
new and empty, so the proxy puts analytics in migration state ``planned`` (main serves its tables) and the
``migrate`` commands it prints move them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
import yaml

from proxy.config import Config, load_config
from proxy.dev.cluster import DevClusters, free_port
from proxy.logs import setup_logging
from proxy.server import ProxyApp, serve

# Domain tables live in their own role's cluster; main holds every table too, so a role left unconfigured
# (or one set to fallback: main) is served by main. Each domain's tables and their columns, after an
# ``id bigserial PRIMARY KEY`` that every table has (the demo's domain map, DEMO_DOMAINS, names the same).
_STAMP = "timestamptz NOT NULL DEFAULT now()"
TABLES: dict[str, dict[str, str]] = {
    "main": {
        "users": f"email text NOT NULL UNIQUE, full_name text NOT NULL, created_at {_STAMP}",
        "business_entities": "owner_id bigint NOT NULL REFERENCES users (id), legal_name text NOT NULL, "
        f"entity_type text NOT NULL, created_at {_STAMP}",
        "subscriptions": "user_id bigint NOT NULL REFERENCES users (id), plan text NOT NULL, "
        "status text NOT NULL DEFAULT 'active', renews_at timestamptz",
    },
    "analytics": {
        "user_activity": f"user_id bigint NOT NULL, action text NOT NULL, detail jsonb, occurred_at {_STAMP}",
        "business_metrics": "entity_id bigint NOT NULL, metric text NOT NULL, value numeric NOT NULL, "
        f"measured_at {_STAMP}",
    },
    "documents": {
        "documents": "owner_id bigint NOT NULL, title text NOT NULL, storage_key text NOT NULL, "
        f"created_at {_STAMP}",
        "document_shares": "document_id bigint NOT NULL, shared_with bigint NOT NULL, "
        "permission text NOT NULL DEFAULT 'read'",
    },
    "compliance": {
        "boir_filings": "entity_id bigint NOT NULL, status text NOT NULL DEFAULT 'draft', "
        "filed_at timestamptz",
        "compliance_records": "entity_id bigint NOT NULL, requirement text NOT NULL, "
        f"satisfied boolean NOT NULL DEFAULT false, checked_at {_STAMP}",
    },
}


def create_tables(domain: str) -> str:
    """The CREATE TABLE statements of ``domain``'s tables."""
    return "".join(
        f"CREATE TABLE {table} (id bigserial PRIMARY KEY, {columns});\n"
        for table, columns in TABLES[domain].items()
    )


MAIN_TABLES = create_tables("main")
ANALYTICS_TABLES = create_tables("analytics")
DOCUMENTS_TABLES = create_tables("documents")
COMPLIANCE_TABLES = create_tables("compliance")
SAMPLE_ROWS = """
INSERT INTO users (email, full_name) VALUES
    ('ada@example.com', 'Ada Lovelace'), ('grace@example.com', 'Grace Hopper');
INSERT INTO business_entities (owner_id, legal_name, entity_type) VALUES
    (1, 'Analytical Engines LLC', 'llc'), (2, 'Compiler Works Inc', 'corporation');
INSERT INTO subscriptions (user_id, plan, renews_at) VALUES
    (1, 'pro', now() + interval '30 days'), (2, 'team', now() + interval '365 days');
"""

# The tests' schema (tests/conftest.py, bench/faults.py): every domain's tables in its own cluster too.
SCHEMA = {
    "main": MAIN_TABLES + ANALYTICS_TABLES + DOCUMENTS_TABLES + COMPLIANCE_TABLES + SAMPLE_ROWS,
    "analytics": ANALYTICS_TABLES,
    "documents": DOCUMENTS_TABLES,
    "compliance": COMPLIANCE_TABLES,
}

# The analytics history the demo starts with, in main (the seed's phase 1): two users' activity over a few
# weeks and two entities' monthly metrics over two years. Computed, not random: every demo holds the same
# rows (ACTIVITY_ROWS and METRIC_ROWS of them).
ACTIVITY_ROWS = 360
METRIC_ROWS = 144  # 2 entities x 3 metrics x 24 months
ANALYTICS_HISTORY = f"""
INSERT INTO user_activity (user_id, action, detail, occurred_at)
SELECT 1 + g % 2,
       (ARRAY['login', 'view_dashboard', 'create_entity', 'upload_document', 'file_boir', 'update_profile',
              'logout'])[1 + (g * 37) % 7],
       jsonb_build_object('client', (ARRAY['web', 'ios', 'android'])[1 + g % 3],
                          'ip', '203.0.113.' || (1 + g % 50)),
       timestamptz '2026-09-01 08:00:00+00' + g * interval '97 minutes'
FROM generate_series(1, {ACTIVITY_ROWS}) AS g;
INSERT INTO business_metrics (entity_id, metric, value, measured_at)
SELECT e, m.metric,
       CASE m.metric
           WHEN 'monthly_revenue_usd' THEN 1200 + e * 300 + month * 85 + (month * 37 % 11) * 10
           WHEN 'active_seats' THEN 3 + e * 2 + month / 3
           ELSE 10 * month + e * 7
       END,
       timestamptz '2025-01-01 00:00:00+00' + month * interval '1 month'
FROM generate_series(1, 2) AS e,
     (VALUES ('monthly_revenue_usd'), ('active_seats'), ('documents_stored')) AS m (metric),
     generate_series(0, 23) AS month;
"""

# The demo's schema: main as in the tests plus the analytics history; the analytics database exists (its
# cluster creates it) but holds no tables yet; documents and compliance serve their tables themselves.
DEMO_SCHEMA = {
    "main": SCHEMA["main"] + ANALYTICS_HISTORY,
    "documents": DOCUMENTS_TABLES,
    "compliance": COMPLIANCE_TABLES,
}

# The domain map that matches the demo schema (the tables are in schema public).
DEMO_DOMAINS = {domain: list(tables) for domain, tables in TABLES.items() if domain != "main"}


def start_demo_clusters() -> DevClusters:
    """All five clusters with the demo's schema loaded (and main's replicated to the read replica)."""
    pg = DevClusters.start(setup_sql=DEMO_SCHEMA)
    pg.wait_replica_caught_up()
    return pg


DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_ADMIN = "admin"  # the admin console's login, which `parafort-proxy migrate` uses too
DEMO_ADMIN_PASSWORD = "admin"
DEMO_PORT = 6432
# Where the demo writes its configuration (and users file) unless told otherwise: one path that the
# printed commands, and a walkthrough, can name. Removed when the demo stops.
DEMO_DIR = Path(tempfile.gettempdir()) / "parafort-demo"
CONFIG_NAME = "proxy.yaml"


class DemoDirBusy(Exception):
    """Another running demo uses the directory."""


@contextlib.contextmanager
def demo_dir(path: Path) -> Iterator[Path]:
    """Hold ``path`` (created, mode 0700) for one demo: an exclusive lock on a file in it, so a second
    demo is refused rather than overwriting the first one's configuration; its files removed on exit."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    with (path / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoDirBusy(f"another demo is running with its configuration in {path}") from None
        try:
            yield path
        finally:
            for name in (CONFIG_NAME, "userlist.txt"):
                with contextlib.suppress(FileNotFoundError):
                    (path / name).unlink()


def _private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (it holds the clusters' passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def demo_config(pg: DevClusters, workdir: Path, port: int) -> Config:
    """The proxy's configuration for the demo clusters, written to ``workdir/proxy.yaml`` whole (every
    role's URL in the file, not the environment), so ``parafort-proxy migrate ... --config`` reads the same
    configuration as the running demo: every role, the demo domain map, a demo login and an admin login,
    and the migration logins of main and analytics (the clusters' superuser)."""
    userlist = workdir / "userlist.txt"
    _private(userlist, f'"{DEMO_USER}" "{DEMO_PASSWORD}"\n"{DEMO_ADMIN}" "{DEMO_ADMIN_PASSWORD}"\n')
    roles: dict[str, dict[str, Any]] = {role: {"url": cluster.dsn} for role, cluster in pg.clusters.items()}
    for role in ("main", "analytics"):
        roles[role]["migration_url"] = pg[role].super_dsn
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"method": "scram-sha-256", "users_file": str(userlist), "admin_users": [DEMO_ADMIN]},
        "domains": DEMO_DOMAINS,
        "roles": roles,
    }
    path = workdir / CONFIG_NAME
    _private(path, yaml.safe_dump(doc, sort_keys=False))
    return load_config(path, {})


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def proxy_command() -> str:
    """How this process was started, as a shell command to run ``parafort-proxy`` again: the console
    script as invoked (``make demo`` runs .venv/bin/parafort-proxy), else this interpreter's ``-m proxy``."""
    script = Path(sys.argv[0])
    if script.name == "parafort-proxy":
        return shlex.quote(sys.argv[0])
    return f"{shlex.quote(sys.executable)} -m proxy"


def serving_text(app: ProxyApp, config_path: Path) -> str:
    """How to use the running demo proxy: the DSN, the health and metrics URLs of the admin listener (all
    read from the sockets the proxy has bound: the admin port is an ephemeral one), and the migration of
    analytics' rows out of main with the configuration file the demo wrote."""
    host, port = app.config.listen.host, app.port
    assert app.admin is not None
    admin_host, admin_port = app.admin.addresses[0]
    admin = f"http://{admin_host}:{admin_port}"
    dsn = f"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/demo"
    console = f"postgresql://{DEMO_ADMIN}:{DEMO_ADMIN_PASSWORD}@{host}:{port}/{app.config.admin.database}"
    migrate = f"{proxy_command()} migrate analytics"
    config = shlex.quote(str(config_path))
    return "\n".join(
        [
            f"\nThe proxy listens on {host}:{port}. Connect with:\n\n  psql '{dsn}'\n",
            "Try:",
            f"  psql '{dsn}' -c 'SELECT * FROM users'",
            f"  psql '{dsn}' -c \"INSERT INTO user_activity (user_id, action) VALUES (1, 'login')\"",
            f"  psql '{dsn}' -c 'SELECT inet_server_port(), pg_is_in_recovery()'",
            "\nHealth and metrics (the admin listener, on an ephemeral port):",
            f"  curl {admin}/api/health/databases",
            f"  curl {admin}/api/health/connections",
            f"  curl {admin}/metrics",
            f"\nAnalytics starts in migration state planned: its {ACTIVITY_ROWS + METRIC_ROWS} rows "
            "(user_activity, business_metrics) are in main,",
            "its own database is new and empty, and main serves those tables until they are moved.",
            f"The demo's configuration is {config_path}. Try:",
            f"  {migrate} plan --config {config}",
            f"  {migrate} start --config {config}",
            f"  {migrate} status --config {config}    # until streaming",
            f"  {migrate} cutover --config {config}   # analytics serves them; main's copy follows",
            f"  {migrate} rollback --config {config}  # main serves them again (until finish)",
            f"  {migrate} finish --config {config}    # after a cutover: replication removed",
            f"  psql '{console}' -c 'SHOW MIGRATION'",
            "\nPress Ctrl-C to stop the proxy and delete the clusters.",
        ]
    )


def run_demo(workdir: Path = DEMO_DIR) -> int:
    """Start the clusters and the proxy in front of them, print how to connect once it serves, run until
    Ctrl-C. The configuration is written to ``workdir`` (held by this demo while it runs)."""
    # SIGTERM before the proxy runs (it handles SIGTERM itself) still cleans up, like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with demo_dir(workdir) as held:
            _run_demo(held)
    except DemoDirBusy as exc:
        print(f"parafort-proxy demo: {exc}; stop it, or pass --dir", file=sys.stderr)
        return 1
    except OSError as exc:  # the directory cannot be made ours (another user's, say)
        print(f"parafort-proxy demo: {workdir}: {exc.strerror}; pass --dir", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _run_demo(workdir: Path) -> None:
    print("parafort-proxy demo: starting five local PostgreSQL clusters ...", flush=True)
    started = time.monotonic()
    pg = start_demo_clusters()
    try:
        port = DEMO_PORT if _port_free(DEMO_PORT) else free_port()
        config = demo_config(pg, workdir, port)
        print(f"parafort-proxy demo: clusters up in {time.monotonic() - started:.1f}s in {pg.basedir}")
        for role, cluster in pg.clusters.items():
            print(f"  {role:<13} 127.0.0.1:{cluster.port}  (user {cluster.user})")
        setup_logging("info")
        path = workdir / CONFIG_NAME
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, ready=lambda app: print(serving_text(app, path), flush=True)))
    finally:
        print("\nparafort-proxy demo: stopping and cleaning up", file=sys.stderr)
        pg.close()
