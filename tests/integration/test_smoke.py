"""Smallest end-to-end check: psql through the proxy."""

from __future__ import annotations

import subprocess

from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess


def test_psql_select(proxy: ProxyProcess) -> None:
    out = subprocess.run(
        ["psql", proxy.dsn(APP_USER, APP_PASSWORD), "-X", "-At", "-c", "SELECT 40 + 2"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "42"


def test_metrics_scrape(proxy: ProxyProcess) -> None:
    subprocess.run(
        ["psql", proxy.dsn(APP_USER, APP_PASSWORD), "-X", "-At", "-c", "SELECT 1"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    text = proxy.metrics()
    assert "parafort_proxy_client_connections" in text
    assert proxy.metric("parafort_proxy_pool_max_connections", role="main", upstream="main") == 20
    assert proxy.metric("parafort_proxy_pinned_clients") == 0
