"""The test bed itself: five real clusters, a streaming replica, separate credentials, stop and restart."""

from __future__ import annotations

import psycopg
import pytest

from proxy.config import load_config
from proxy.config.dsn import parse_dsn
from proxy.dev.cluster import ROLE_ENV, DevClusters, wait_until


def test_five_clusters_up_on_loopback(pg: DevClusters) -> None:
    assert sorted(pg.clusters) == sorted(ROLE_ENV)
    ports = {c.port for c in pg.clusters.values()}
    assert len(ports) == 5
    for cluster in pg.clusters.values():
        with psycopg.connect(cluster.dsn, connect_timeout=10) as conn:
            row = conn.execute("SELECT current_user, inet_server_addr()::text, inet_server_port()").fetchone()
        assert row == (cluster.user, "127.0.0.1/32", cluster.port)


def test_env_is_a_valid_config(pg: DevClusters) -> None:
    config = load_config(None, pg.env())
    for role in pg.clusters:
        upstream = config.roles.get(role)
        assert upstream is not None and upstream.configured
    assert parse_dsn(pg.env()["DATABASE_URL"]).port == pg.main.port


def test_replica_in_recovery_replays_main(pg: DevClusters) -> None:
    with psycopg.connect(pg.main.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bed_probe (id serial PRIMARY KEY, note text)")
        (row_id,) = conn.execute("INSERT INTO bed_probe (note) VALUES ('hello') RETURNING id").fetchone()  # type: ignore[misc]
    with psycopg.connect(pg.read_replica.dsn, autocommit=True) as replica:
        assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

        def replayed() -> bool:
            try:
                got = replica.execute("SELECT note FROM bed_probe WHERE id = %s", (row_id,)).fetchone()
            except psycopg.errors.UndefinedTable:
                return False
            return got == ("hello",)

        wait_until(replayed, 30, "the replica to replay the row")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            replica.execute("INSERT INTO bed_probe (note) VALUES ('nope')")


@pytest.mark.parametrize("role", ["main", "analytics", "documents", "compliance"])
def test_only_own_credentials(pg: DevClusters, role: str) -> None:
    cluster = pg[role]
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.dsn_for(cluster.user, "wrong-password"), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(cluster.dsn_for("postgres", "guess", "postgres"), connect_timeout=10)
    for other_cluster in pg.clusters.values():
        if other_cluster.user == cluster.user:
            continue
        dsn = cluster.dsn_for(other_cluster.user, other_cluster.password, other_cluster.database)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(dsn, connect_timeout=10)


def test_stop_and_restart_one_cluster(pg: DevClusters) -> None:
    analytics = pg.analytics
    port = analytics.port
    analytics.stop()
    assert not analytics.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(analytics.dsn, connect_timeout=5)
    with psycopg.connect(pg.main.dsn) as conn:  # the others are unaffected
        assert conn.execute("SELECT 1").fetchone() == (1,)
    analytics.start()
    assert analytics.port == port
    with psycopg.connect(analytics.dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (analytics.user,)
