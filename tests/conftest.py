"""Shared fixtures: the five real PostgreSQL clusters (session-scoped) and markers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.devcluster import DevClusters

INTEGRATION = Path(__file__).parent / "integration"


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
