"""``parafort-proxy demo``: throwaway local clusters with a small ParaFort schema, ready to connect to."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import uvloop
import yaml

from proxy.config import Config, load_config
from proxy.dev.cluster import DevClusters, free_port
from proxy.logs import setup_logging
from proxy.server import ProxyApp, serve

# Domain tables live in their own role's cluster; main holds every table too, so a role left unconfigured
# (or one set to fallback: main) is served by main.
MAIN_TABLES = """
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    full_name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE business_entities (
    id bigserial PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES users (id),
    legal_name text NOT NULL,
    entity_type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE subscriptions (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id),
    plan text NOT NULL,
    status text NOT NULL DEFAULT 'active',
    renews_at timestamptz
);
"""
ANALYTICS_TABLES = """
CREATE TABLE user_activity (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL,
    action text NOT NULL,
    detail jsonb,
    occurred_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE business_metrics (
    id bigserial PRIMARY KEY,
    entity_id bigint NOT NULL,
    metric text NOT NULL,
    value numeric NOT NULL,
    measured_at timestamptz NOT NULL DEFAULT now()
);
"""
DOCUMENTS_TABLES = """
CREATE TABLE documents (
    id bigserial PRIMARY KEY,
    owner_id bigint NOT NULL,
    title text NOT NULL,
    storage_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE document_shares (
    id bigserial PRIMARY KEY,
    document_id bigint NOT NULL,
    shared_with bigint NOT NULL,
    permission text NOT NULL DEFAULT 'read'
);
"""
COMPLIANCE_TABLES = """
CREATE TABLE boir_filings (
    id bigserial PRIMARY KEY,
    entity_id bigint NOT NULL,
    status text NOT NULL DEFAULT 'draft',
    filed_at timestamptz
);
CREATE TABLE compliance_records (
    id bigserial PRIMARY KEY,
    entity_id bigint NOT NULL,
    requirement text NOT NULL,
    satisfied boolean NOT NULL DEFAULT false,
    checked_at timestamptz NOT NULL DEFAULT now()
);
"""
SAMPLE_ROWS = """
INSERT INTO users (email, full_name) VALUES
    ('ada@example.com', 'Ada Lovelace'), ('grace@example.com', 'Grace Hopper');
INSERT INTO business_entities (owner_id, legal_name, entity_type) VALUES
    (1, 'Analytical Engines LLC', 'llc'), (2, 'Compiler Works Inc', 'corporation');
INSERT INTO subscriptions (user_id, plan, renews_at) VALUES
    (1, 'pro', now() + interval '30 days'), (2, 'team', now() + interval '365 days');
"""

SCHEMA = {
    "main": MAIN_TABLES + ANALYTICS_TABLES + DOCUMENTS_TABLES + COMPLIANCE_TABLES + SAMPLE_ROWS,
    "analytics": ANALYTICS_TABLES,
    "documents": DOCUMENTS_TABLES,
    "compliance": COMPLIANCE_TABLES,
}

# The domain map that matches the demo schema (the tables are in schema public).
DEMO_DOMAINS = {
    "analytics": ["user_activity", "business_metrics"],
    "documents": ["documents", "document_shares"],
    "compliance": ["boir_filings", "compliance_records"],
}


def start_demo_clusters() -> DevClusters:
    """All five clusters with the ParaFort schema loaded (and replicated to the read replica)."""
    pg = DevClusters.start(setup_sql=SCHEMA)
    pg.wait_replica_caught_up()
    return pg


DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_PORT = 6432


def demo_config(pg: DevClusters, workdir: Path, port: int) -> Config:
    """The proxy's configuration for the demo clusters: every role, the demo domain map, a demo login."""
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{DEMO_USER}" "{DEMO_PASSWORD}"\n')
    userlist.chmod(0o600)
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"method": "scram-sha-256", "users_file": str(userlist)},
        "domains": DEMO_DOMAINS,
    }
    path = workdir / "proxy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path, pg.env())


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serving_text(app: ProxyApp) -> str:
    """How to use the running demo proxy: the DSN, and the health and metrics URLs of the admin listener,
    all read from the sockets the proxy has bound (the admin port is an ephemeral one)."""
    host, port = app.config.listen.host, app.port
    assert app.admin is not None
    admin_host, admin_port = app.admin.addresses[0]
    admin = f"http://{admin_host}:{admin_port}"
    dsn = f"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@{host}:{port}/demo"
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
            "\nPress Ctrl-C to stop the proxy and delete the clusters.",
        ]
    )


def run_demo() -> int:
    """Start the clusters and the proxy in front of them, print how to connect once it serves, run until
    Ctrl-C."""
    # SIGTERM before the proxy runs (it handles SIGTERM itself) still cleans up, like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    print("parafort-proxy demo: starting five local PostgreSQL clusters ...", flush=True)
    started = time.monotonic()
    pg = start_demo_clusters()
    try:
        port = DEMO_PORT if _port_free(DEMO_PORT) else free_port()
        config = demo_config(pg, pg.basedir, port)
        print(f"parafort-proxy demo: clusters up in {time.monotonic() - started:.1f}s in {pg.basedir}")
        for role, cluster in pg.clusters.items():
            print(f"  {role:<13} 127.0.0.1:{cluster.port}  (user {cluster.user})")
        setup_logging("info")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, ready=lambda app: print(serving_text(app), flush=True)))
    except KeyboardInterrupt:
        pass
    finally:
        print("\nparafort-proxy demo: stopping and cleaning up", file=sys.stderr)
        pg.close()
    return 0
