"""TLS towards clients (sslmode=require and verify-full; plaintext refused when required) and towards an
upstream with ssl=on and a self-signed CA, reached with sslmode=verify-full; the proxy's own connections
(health probes, look-ups) to a server that takes only TLS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.dev.cluster import Cluster, DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess


def make_certs(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, made with the openssl CLI."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=parafort test CA",
            "-keyout", str(ca_key), "-out", str(ca_crt))  # fmt: skip
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    key.chmod(0o600)
    return {"ca": ca_crt, "cert": crt, "key": key}


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    return make_certs(tmp_path)


def test_client_tls(start_proxy: Callable[..., ProxyProcess], certs: dict[str, Path]) -> None:
    proxy = start_proxy(
        config={"tls": {"mode": "require", "cert_file": str(certs["cert"]), "key_file": str(certs["key"])}}
    )
    base = f"postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{proxy.port}/app"
    with psycopg.connect(base + "?sslmode=require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(f"{base}?sslmode=verify-full&sslrootcert={certs['ca']}") as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
    with pytest.raises(psycopg.OperationalError, match="TLS is required"):
        psycopg.connect(base + "?sslmode=disable", connect_timeout=10)


@pytest.fixture
def tls_compliance(pg: DevClusters, certs: dict[str, Path]) -> Iterator[Cluster]:
    """The compliance cluster with ssl=on and the test CA's server certificate; reset afterwards."""
    cluster = pg.compliance
    for name in ("cert", "key"):
        target = cluster.datadir / f"tls_server.{name}"
        shutil.copy(certs[name], target)
        if cluster.runner.as_postgres:
            shutil.chown(target, "postgres", "postgres")
        target.chmod(0o600)
    for setting in ("ssl = on", "ssl_cert_file = 'tls_server.cert'", "ssl_key_file = 'tls_server.key'"):
        cluster.psql(f"ALTER SYSTEM SET {setting}")
    cluster.psql("SELECT pg_reload_conf()")
    hba = cluster.datadir / "pg_hba.conf"
    before = hba.read_text()
    try:
        yield cluster
    finally:
        hba.write_text(before)
        for setting in ("ssl", "ssl_cert_file", "ssl_key_file"):
            cluster.psql(f"ALTER SYSTEM RESET {setting}")
        cluster.psql("SELECT pg_reload_conf()")


def test_upstream_tls_verify_full(
    tls_compliance: Cluster, start_proxy: Callable[..., ProxyProcess], certs: dict[str, Path]
) -> None:
    cluster = tls_compliance
    url = f"{cluster.dsn}?sslmode=verify-full&sslrootcert={certs['ca']}"
    # roles=(): no DATABASE_URL in the environment, so the file's URL (with its sslmode) is main's.
    proxy = start_proxy(roles=(), config={"roles": {"main": {"url": url}}})
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
    # The wrong CA: the proxy refuses the upstream, the client gets a clear 08 error.
    other_dir = certs["ca"].parent / "other"
    other_dir.mkdir()
    other = make_certs(other_dir)
    bad_url = f"{cluster.dsn}?sslmode=verify-full&sslrootcert={other['ca']}"
    bad = start_proxy(roles=(), config={"roles": {"main": {"url": bad_url}}})
    with pytest.raises(psycopg.OperationalError, match="TLS with the main upstream failed"):
        psycopg.connect(bad.dsn(APP_USER, APP_PASSWORD), connect_timeout=10)


@pytest.mark.parametrize("sslmode", ["require", "prefer"])
def test_health_probes_and_lookups_honour_the_urls_sslmode(
    tls_compliance: Cluster, start_proxy: Callable[..., ProxyProcess], sslmode: str
) -> None:
    """A server that accepts only TLS connections (pg_hba hostssl): the proxy's own connections (health
    probes, main's catalog look-ups) reach it as its data path does, so main is up without any client."""
    cluster = tls_compliance
    (cluster.datadir / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
    )
    cluster.psql("SELECT pg_reload_conf()")
    health = {"interval": "200ms", "failures_before_down": 1, "successes_before_up": 1}
    url = f"{cluster.dsn}?sslmode={sslmode}"
    proxy = start_proxy(roles=(), config={"roles": {"main": {"url": url}}, "health": health})

    def probed_up() -> bool:
        metrics = proxy.metrics()
        probed = 'parafort_proxy_probe_duration_seconds{role="main",upstream="main"}' in metrics
        return probed and proxy.metric("parafort_proxy_upstream_up", role="main", upstream="main") == 1

    wait_until(probed_up, 20, "main up by its health probes alone")
    assert "no encryption" not in proxy.log()
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == (True,)
