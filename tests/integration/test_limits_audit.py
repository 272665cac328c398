"""Client limits (max connections, login timeout, message length) and the compliance audit log."""

from __future__ import annotations

import json
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess


def test_too_many_clients(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(config={"limits": {"max_client_connections": 3}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(dsn, connect_timeout=10)
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()
    wait_until(lambda: proxy.metric("parafort_proxy_client_connections") == 0, 10, "the clients to leave")
    with psycopg.connect(dsn) as conn:  # room again
        assert conn.execute("SELECT 2").fetchone() == (2,)


def read_error(sock: socket.socket) -> dict[str, str]:
    """The first ErrorResponse on ``sock`` as {field code: value}."""
    data = b""
    while len(data) < 5 or len(data) < 1 + struct.unpack("!I", data[1:5])[0]:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data[:1] == b"E", data
    fields = {}
    for part in data[5 : 1 + struct.unpack("!I", data[1:5])[0]].split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def test_login_timeout_and_oversized_messages(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(config={"limits": {"login_timeout": "1s", "max_message_length": 2048}})
    dsn = proxy.dsn(APP_USER, APP_PASSWORD)
    with psycopg.connect(dsn, autocommit=True) as good:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as silent:
            fields = read_error(silent)  # sends nothing: dropped after the login timeout
            assert fields["S"] == "FATAL" and "login not completed" in fields["M"]
            assert silent.recv(100) == b""
        with pytest.raises(psycopg.OperationalError), psycopg.connect(dsn, autocommit=True) as big:
            big.execute("SELECT '" + "x" * 4096 + "'")
        assert good.execute("SELECT 1").fetchone() == (1,)
    assert "event=login_timeout" in proxy.log()


def test_audit_log_has_compliance_statements_without_literals(
    pg: DevClusters, start_proxy: Callable[..., ProxyProcess], schema: None, tmp_path: Path
) -> None:
    audit = tmp_path / "audit" / "audit.jsonl"
    proxy = start_proxy(
        roles=("main", "compliance"), config={"domains": DEMO_DOMAINS, "audit": {"path": str(audit)}}
    )
    with psycopg.connect(
        proxy.dsn(APP_USER, APP_PASSWORD, application_name="auditor"), autocommit=True
    ) as conn:
        conn.execute("INSERT INTO boir_filings (entity_id, status) VALUES (4242, 'very-secret-status')")
        conn.execute(
            "SELECT * FROM compliance_records WHERE requirement = %s", ("hidden-requirement",)
        ).fetchall()
        conn.execute("INSERT INTO users (email, full_name) VALUES ('audit@example.com', 'Not Audited')")
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("SELECT no_such_column FROM boir_filings WHERE entity_id = 777")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    text = audit.read_text()
    for literal in ("4242", "very-secret-status", "hidden-requirement", "777", "audit@example.com", "users"):
        assert literal not in text
    assert len(records) == 3
    assert all(r["role"] == "compliance" and r["user"] == APP_USER for r in records)
    assert all(
        r["application_name"] == "auditor" and r["client_address"].startswith("127.0.0.1:") for r in records
    )
    assert records[0]["statement"] == "INSERT INTO boir_filings (entity_id, status) VALUES ($1, $2)"
    assert [r["outcome"] for r in records] == ["ok", "ok", "error 42703"]
    # logrotate: move the file away, SIGHUP, new lines go to a new file
    audit.rename(audit.with_suffix(".1"))
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.metric("parafort_proxy_config_reloads_total") == 1, 10, "the reload")
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM boir_filings").fetchone()
    assert len(audit.read_text().splitlines()) == 1
