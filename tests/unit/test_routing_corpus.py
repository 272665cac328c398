"""The routing corpus (tests/data/routing_corpus.yaml): every case's kind, domains and role or refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, load_config
from proxy.config.loader import ROLE_ENV
from proxy.router.classify import classify
from proxy.router.policy import Router, route_override

CORPUS = Path(__file__).parent.parent / "data" / "routing_corpus.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load(CORPUS.read_text())
CONFIG_YAML = """
domains:
  analytics: [user_activity, business_metrics, "analytics.*"]
  documents: [documents, document_shares, "documents.*"]
  compliance: [boir_filings, compliance_records, "compliance.*"]
routing:
  read_only_functions: [safe_report]
"""


def config_for(tmp: Path, unconfigured: list[str], fallback: list[str] | None = None) -> Config:
    path = tmp / "proxy.yaml"
    roles = "".join(f"  {role}: {{fallback: main}}\n" for role in fallback or [])
    path.write_text(CONFIG_YAML + (f"roles:\n{roles}" if roles else ""))
    env = {var: f"postgresql://u:p@{role.replace('_', '-')}.internal/db" for role, var in ROLE_ENV.items()}
    for role in unconfigured:
        env.pop(ROLE_ENV[role])
    return load_config(path, env)


def test_corpus_is_big_and_unique() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 150
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_case(case: dict[str, Any], tmp_path: Path) -> None:
    config = config_for(tmp_path, case.get("unconfigured", []), case.get("fallback"))
    down = set(case.get("down", []))
    router = Router(config, lambda role: config.roles.get(role).configured and role not in down)
    sql = case["sql"]
    info = classify(sql)
    decision = router.decide(info, override=route_override(sql), tx=case.get("tx"))
    assert info.parse_error == bool(case.get("parse_error")), decision
    got = {"kind": decision.kind, "domains": list(decision.domains)}
    want = {"kind": case["kind"], "domains": case["domains"]}
    if "error" in case:
        got["error"] = decision.sqlstate
        want["error"] = str(case["error"])
    else:
        got["role"] = decision.role
        want["role"] = case["role"]
    assert got == want, f"{sql}\n  reason: {decision.reason}"


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("INSERT INTO user_activity (user_id) VALUES (1)", [("analytics", "user_activity")]),
        ("INSERT INTO public.user_activity (user_id) VALUES (1)", [("analytics", "user_activity")]),
        (
            "INSERT INTO user_activity SELECT * FROM public.user_activity",
            [("analytics", "user_activity")],
        ),
        ("INSERT INTO analytics.events (id) VALUES (1)", [("analytics", "analytics.events")]),
        ("INSERT INTO reporting.user_activity (user_id) VALUES (1)", []),  # main's own table (issue 15)
    ],
)
def test_fallback_writes_name_a_table_once_however_sql_spells_it(
    tmp_path: Path, sql: str, writes: list[tuple[str, str]]
) -> None:
    """parafort_proxy_fallback_writes_total{table} is the table's one name: an unqualified reference and
    public.<name> are the same table (so the zero series published for a mapped table is the one counted)."""
    path = tmp_path / "proxy.yaml"
    path.write_text(CONFIG_YAML + "roles: {analytics: {fallback: main}}\n")
    env = {var: f"postgresql://u:p@{role.replace('_', '-')}.internal/db" for role, var in ROLE_ENV.items()}
    config = load_config(path, env)
    router = Router(config, lambda role: role != "analytics")  # analytics configured and down
    assert list(router.fallback_writes(classify(sql))) == writes
