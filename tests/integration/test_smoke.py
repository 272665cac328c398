"""Smallest end-to-end check: psql through the proxy."""

from __future__ import annotations

import subprocess

from proxy.testing import APP_PASSWORD, APP_USER, ProxyProcess


def test_psql_select(proxy: ProxyProcess) -> None:
    out = subprocess.run(
        ["psql", proxy.dsn(APP_USER, APP_PASSWORD), "-X", "-At", "-c", "SELECT 40 + 2"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "42"
