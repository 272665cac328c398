"""TLS towards clients (sslmode=require and verify-full; plaintext refused when required) and towards an
upstream with ssl=on and a self-signed CA, reached with sslmode=verify-full."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.dev.cluster import DevClusters
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


def test_upstream_tls_verify_full(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], certs: dict[str, Path]
) -> None:
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
    try:
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
    finally:
        for setting in ("ssl", "ssl_cert_file", "ssl_key_file"):
            cluster.psql(f"ALTER SYSTEM RESET {setting}")
        cluster.psql("SELECT pg_reload_conf()")
