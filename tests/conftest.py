"""Shared fixtures: the five real PostgreSQL clusters (session-scoped) and markers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config.loader import ROLE_ENV
from proxy.dev.cluster import DevClusters
from proxy.dev.demo import SCHEMA
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

INTEGRATION = Path(__file__).parent / "integration"
DROP_MIGRATION_STATE = "DROP SCHEMA IF EXISTS parafort_migration CASCADE"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def pg() -> Iterator[DevClusters]:
    """main, read_replica (streaming from main), analytics, documents, compliance; torn down at the end."""
    clusters = DevClusters.start()
    try:
        yield clusters
    finally:
        clusters.close()


@pytest.fixture
def start_proxy(pg: DevClusters) -> Iterator[Callable[..., ProxyProcess]]:
    """Start ``parafort-proxy run`` processes on the test bed; each is stopped (by pid) after the test.

    ``start_proxy(roles=("main",), config={...}, users={...})``: only the given roles' URLs are set;
    clients log in as APP_USER / APP_PASSWORD unless ``users`` says otherwise.
    """
    started: list[ProxyProcess] = []

    def start(
        roles: tuple[str, ...] = ("main",),
        config: dict[str, Any] | None = None,
        users: dict[str, str] | None = None,
        log_level: str = "info",
    ) -> ProxyProcess:
        env = {k: v for k, v in pg.env().items() if any(ROLE_ENV[r] == k for r in roles)}
        if os.environ.get("PARAFORT_TEST_CACHE_UNNAMED") and "statements" not in (config or {}):
            # The whole suite once more with unnamed statements kept upstream (statements.cache_unnamed).
            config = {**(config or {}), "statements": {"cache_unnamed": True}}
        proc = ProxyProcess(env, config, users or {APP_USER: APP_PASSWORD}, log_level)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A proxy in front of main only, default pool settings."""
    return start_proxy()


@pytest.fixture
def dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn(APP_USER, APP_PASSWORD)


@pytest.fixture(scope="module")
def schema(pg: DevClusters) -> Iterator[None]:
    """The ParaFort demo schema on every cluster (main holds every table); dropped after the module, with any
    migration state a proxy stored in main (proxy/migration/state.py)."""
    for role, sql in SCHEMA.items():
        body = sql.split("INSERT INTO users")[0] if role == "main" else sql
        pg[role].psql(body, superuser=False)
    pg.main.psql(DROP_MIGRATION_STATE)
    pg.wait_replica_caught_up()
    yield
    for role in SCHEMA:
        if pg[role].running:
            pg[role].psql("DROP SCHEMA public CASCADE; CREATE SCHEMA public", superuser=False)
    if pg.main.running:
        pg.main.psql(DROP_MIGRATION_STATE)
