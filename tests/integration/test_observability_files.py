"""The observability files in config/: the Prometheus alert rules (checked and unit-tested by promtool) and
the Grafana dashboard, held against what a live proxy exports.

promtool comes from Debian's ``prometheus`` package, which scripts/bootstrap.sh installs when it is missing; a
machine without it fails these tests rather than skipping them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.dev.cluster import wait_until
from proxy.dev.demo import DEMO_DOMAINS
from proxy.dev.testing import APP_PASSWORD, APP_USER, ProxyProcess

StartProxy = Callable[..., ProxyProcess]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "config" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "dashboard.json"

FIVE_ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
# Exported metric families that need neither a dashboard panel nor an alert rule, each with the reason. Keep
# it short: a family worth exporting is worth a panel. An entry must name a family the proxy exports (a
# stale entry fails the test too). README ("Operating it") points here.
NEEDS_NO_PANEL: dict[str, str] = {}
FAST_HEALTH = {"health": {"interval": "200ms", "timeout": "1s"}}
METRIC_NAME = re.compile(r"\bparafort_proxy_[A-Za-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's variables, replaced by something PromQL accepts so promtool can parse the dashboard's queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$role": ".*",
}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is not installed: it comes from Debian's prometheus package "
            "(run scripts/bootstrap.sh, or: apt-get install prometheus)",
            pytrace=False,
        )
    return subprocess.run(
        [exe, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def traffic(proxy: ProxyProcess) -> None:
    """A write, reads of main's and of a domain's tables, and a pinned session, through the proxy."""
    email = f"obs-{uuid.uuid4().hex}@example.com"
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, connect_timeout=10) as conn:
        conn.execute("INSERT INTO users (email, full_name) VALUES (%s, 'Observability Test')", (email,))
        conn.execute("SELECT count(*) FROM users").fetchone()
        conn.execute("SELECT count(*) FROM user_activity").fetchone()
        # A compliance table: served by main as a fallback when compliance is not configured.
        conn.execute("SELECT count(*) FROM compliance_records").fetchone()
    with psycopg.connect(proxy.dsn(APP_USER, APP_PASSWORD), autocommit=True, connect_timeout=10) as conn:
        conn.execute("LISTEN parafort_observability_test")
        conn.execute("SELECT 1").fetchone()


def families(scrape: str) -> dict[str, str]:
    """Metric family name -> type, from the ``# TYPE`` lines of a scrape."""
    out = {}
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[name] = kind
    return out


def not_exported(names: set[str], scrape: str) -> list[str]:
    """The names not exported in a scrape: each must be a family, or a histogram's _bucket/_sum/_count."""
    types = families(scrape)

    def exported(name: str) -> bool:
        if name in types:
            return types[name] != "histogram"  # a histogram's own name has no samples
        base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        return base is not None and types.get(base) == "histogram"

    return sorted(name for name in names if not exported(name))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def panel_exprs() -> list[str]:
    """Every dashboard panel target's expression."""
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(doc["panels"]) for t in p.get("targets", []) if t.get("expr")]


def dashboard_queries() -> list[str]:
    """Every panel target's expression, then the template variables' queries."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = panel_exprs()
    for var in doc.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [str(rule["expr"]) for group in doc["groups"] for rule in group["rules"]]


def names_in(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


@pytest.fixture
def five_roles(start_proxy: StartProxy, schema: None) -> ProxyProcess:
    """A proxy in front of all five roles, after a little traffic, with the replica's lag known."""
    proxy = start_proxy(roles=FIVE_ROLES, config={"domains": DEMO_DOMAINS, **FAST_HEALTH})
    traffic(proxy)
    lag = ("parafort_proxy_replica_lag_seconds{upstream=", "parafort_proxy_replica_lag_bytes{upstream=")
    wait_until(lambda: all(s in proxy.metrics() for s in lag), 20, "the replica's lag", interval=0.2)
    return proxy


def test_alert_rules_are_valid() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    out = promtool("test", "rules", str(ALERTS_TEST))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_unit_tests_that_fire_and_that_do_not() -> None:
    alerts = {rule["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fired == set(), "alerts with no firing test case"
    assert alerts - quiet == set(), "alerts with no non-firing test case"


@pytest.mark.parametrize("roles", [("main",), FIVE_ROLES], ids=["main-only", "five-roles"])
def test_live_scrape_passes_promtool_check_metrics(
    start_proxy: StartProxy, schema: None, roles: tuple[str, ...]
) -> None:
    proxy = start_proxy(roles=roles, config={"domains": DEMO_DOMAINS, **FAST_HEALTH})
    traffic(proxy)
    scrape = proxy.metrics()
    assert "parafort_proxy_routed_statements_total{" in scrape
    if "compliance" not in roles:
        assert 'parafort_proxy_fallbacks_total{role="compliance"}' in scrape
    out = promtool("check", "metrics", stdin=scrape)
    assert (out.returncode, out.stdout + out.stderr) == (0, ""), scrape


def test_fallback_alert_tells_configured_roles_by_their_upstream_up_series(
    start_proxy: StartProxy, schema: None
) -> None:
    """ParaFortProxyRoleOnFallback keeps only roles with a parafort_proxy_upstream_up series (configured
    ones): an unconfigured role counts fallbacks but must have no such series, a configured one has one."""
    proxy = start_proxy(roles=("main", "analytics"), config={"domains": DEMO_DOMAINS, **FAST_HEALTH})
    traffic(proxy)  # reads compliance_records: compliance is not configured, main serves it
    scrape = proxy.metrics()
    assert proxy.metric("parafort_proxy_fallbacks_total", role="compliance") >= 1, scrape
    up_roles = set(re.findall(r'^parafort_proxy_upstream_up\{[^}]*role="([a-z_]+)"', scrape, re.MULTILINE))
    assert up_roles == {"main", "analytics"}, scrape
    rule = next(r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
                if r["alert"] == "ParaFortProxyRoleOnFallback")  # fmt: skip
    assert "and on (job, instance, role) (parafort_proxy_upstream_up == 0)" in rule["expr"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        expr = query
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {query}"
        rules.append({"record": f"parafort_proxy:dashboard_query_{i}", "expr": expr})
    assert len(rules) >= 15
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_uses_only_exported_metrics(five_roles: ProxyProcess) -> None:
    names = names_in(dashboard_queries())
    assert len(names) >= 15, names
    assert not_exported(names, five_roles.metrics()) == []


def families_without_panel_or_alert(scrape: str) -> list[str]:
    """The families of a scrape that no panel expression and no alert rule uses (a histogram is used when
    its _bucket, _sum or _count is)."""
    used = names_in(panel_exprs()) | names_in(alert_exprs())
    used |= {name.removesuffix(s) for name in used for s in HISTOGRAM_SUFFIXES if name.endswith(s)}
    return sorted(name for name in families(scrape) if name not in used)


def test_every_exported_family_has_a_panel_or_an_alert(five_roles: ProxyProcess) -> None:
    """Issue 15: parafort_proxy_upstream_statements_total was exported but on no panel. Every family of a
    live scrape is in a dashboard panel's expression or an alert rule, or on NEEDS_NO_PANEL with a reason."""
    scrape = five_roles.metrics()
    exported = families(scrape)
    assert len(exported) >= 20, exported
    assert sorted(set(NEEDS_NO_PANEL) - set(exported)) == [], "NEEDS_NO_PANEL names families not exported"
    missing = [name for name in families_without_panel_or_alert(scrape) if name not in NEEDS_NO_PANEL]
    assert missing == [], "\n".join(
        f"metric family {name} is exported but in no panel of {DASHBOARD.relative_to(ROOT)} and no rule of "
        f"{ALERTS.relative_to(ROOT)}: add a panel (or an alert), or list it in NEEDS_NO_PANEL in "
        f"{Path(__file__).relative_to(ROOT)} with the reason"
        for name in missing
    )


def test_alert_rules_use_only_exported_metrics(five_roles: ProxyProcess) -> None:
    names = names_in(alert_exprs())
    assert len(names) >= 6, names
    assert not_exported(names, five_roles.metrics()) == []
