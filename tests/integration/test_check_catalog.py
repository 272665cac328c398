"""`parafort-proxy check` against main's real catalog (issue 15): a bare domain-map entry means the table in
public only, and check warns when main has a table of the same name in another schema."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.dev.cluster import DevClusters, free_port
from proxy.dev.demo import DEMO_DOMAINS


@pytest.fixture
def reporting_user_activity(pg: DevClusters, schema: None) -> Iterator[None]:
    """reporting.user_activity on main, next to public.user_activity (a bare entry of the demo map)."""
    main = pg["main"]
    main.psql("CREATE SCHEMA reporting; CREATE TABLE reporting.user_activity (id bigint)", superuser=False)
    try:
        yield
    finally:
        main.psql("DROP SCHEMA reporting CASCADE", superuser=False)


def check(tmp_path: Path, main_url: str, domains: dict[str, list[str]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "proxy.yaml"
    doc: dict[str, Any] = {"domains": domains}
    path.write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env["DATABASE_URL"] = main_url
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_warns_when_a_bare_entry_names_a_table_in_another_schema(
    pg: DevClusters, reporting_user_activity: None, tmp_path: Path
) -> None:
    out = check(tmp_path, pg.env()["DATABASE_URL"], DEMO_DOMAINS)
    assert out.returncode == 0, out.stderr
    assert "configuration is valid" in out.stdout
    assert out.stderr.splitlines() == [
        "parafort-proxy: warning: domains.analytics: the bare entry 'user_activity' means "
        "'public.user_activity' only; main also has 'reporting.user_activity', which is routed to main. "
        "Add 'reporting.user_activity' to domains.analytics if it belongs there, or write "
        "'public.user_activity' to say the entry is meant for public only."
    ]


@pytest.mark.parametrize(
    "entry",
    ["public.user_activity", "reporting.user_activity", "reporting.*"],
    ids=["public", "table", "star"],
)
def test_check_is_quiet_when_the_map_says_which_schema(
    pg: DevClusters, reporting_user_activity: None, tmp_path: Path, entry: str
) -> None:
    domains = {**DEMO_DOMAINS, "analytics": ["public.user_activity", "business_metrics"]}
    if entry != "public.user_activity":
        domains["documents"] = [*DEMO_DOMAINS["documents"], entry]
    out = check(tmp_path, pg.env()["DATABASE_URL"], domains)
    assert (out.returncode, out.stderr) == (0, "")


def test_check_says_the_catalog_check_was_skipped_when_main_is_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://app:q-secret@127.0.0.1:{free_port()}/app"  # nothing listens there
    out = check(tmp_path, url, DEMO_DOMAINS)
    assert out.returncode == 0, out.stderr
    assert "configuration is valid" in out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(
        "parafort-proxy: note: domain map not checked against main's catalog: main is not reachable (cannot "
        "connect to 127.0.0.1:"
    ), lines
    assert "q-secret" not in out.stdout + out.stderr
