"""Logs: one line per event, key=value or JSON, never a password or a statement's literal."""

from __future__ import annotations

import json
from collections.abc import Callable

import psycopg
import pytest

from proxy.dev.cluster import DevClusters, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess


@pytest.mark.parametrize("fmt", ["keyvalue", "json"])
def test_log_lines(fmt: str, pg: DevClusters, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(roles=("main",), config={"log": {"format": fmt}})
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True) as conn:
        conn.execute("SELECT 'a-secret-literal-42'").fetchone()
        conn.execute("SET application_name = 'another-literal-43'")
    wait_until(lambda: "client_close" in proxy.log(), 10, "the close event")
    lines = [line for line in proxy.log().splitlines() if line.strip()]
    text = "\n".join(lines)
    for secret in (APP_PASSWORD, pg.main.password, "a-secret-literal-42", "another-literal-43"):
        assert secret not in text
    if fmt == "json":
        events = [json.loads(line) for line in lines]
        assert {"client_login", "client_close", "listening"} <= {e.get("event") for e in events}
        assert all({"time", "level", "logger"} <= set(e) for e in events)
    else:
        assert all(line.startswith("time=") and " level=" in line for line in lines)
        assert any("event=client_login" in line and f"user={APP_USER}" in line for line in lines)
