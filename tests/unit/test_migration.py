"""Migration (issue 17), the parts without servers: the state table, routing of a held role, the statements a
move would refuse, the plan's rows and their rendering, and the CLI's refusal of verbs not implemented."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import Config, load_config
from proxy.config.loader import ROLE_ENV
from proxy.migration import state, verbs
from proxy.migration.catalog import ForeignKey, Table
from proxy.migration.joins import MAX_STATEMENTS, OTHER, MovingJoin, SeenJoins
from proxy.migration.plan import COLUMNS, PlanFacts, plan_rows, render
from proxy.migration.state import (
    SERVED_BY_MAIN,
    TRANSITIONS,
    Migration,
    State,
    TransitionError,
    Verb,
    held_by_main,
    next_state,
)
from proxy.router.classify import ClassificationCache, classify
from proxy.router.policy import MAIN, Router

DOMAINS_YAML = """
domains:
  analytics: [user_activity, business_metrics]
  documents: [documents]
  compliance: [boir_filings]
"""
NOW = dt.datetime(2026, 12, 7, 1, 0, tzinfo=dt.UTC)


def config_for(tmp: Path, configured: tuple[str, ...]) -> Config:
    path = tmp / "proxy.yaml"
    path.write_text(DOMAINS_YAML)
    env = {ROLE_ENV[r]: f"postgresql://u:p@{r}.internal/db" for r in ("main", *configured)}
    return load_config(path, env)


# -- states -------------------------------------------------------------------------------------------------
def test_transition_table() -> None:
    assert TRANSITIONS == {
        (State.PLANNED, Verb.START): State.COPYING,
        (State.COPYING, Verb.COPIED): State.STREAMING,
        (State.COPYING, Verb.ROLLBACK): State.PLANNED,
        (State.STREAMING, Verb.ROLLBACK): State.PLANNED,
        (State.STREAMING, Verb.CUTOVER): State.CUTOVER,
        (State.CUTOVER, Verb.ROLLBACK): State.STREAMING,
        (State.CUTOVER, Verb.FINISH): State.FINISHED,
    }
    assert sorted(SERVED_BY_MAIN) == sorted([State.PLANNED, State.COPYING, State.STREAMING])


def test_cutover_and_rollback_follow_the_table() -> None:
    assert next_state("analytics", State.STREAMING, Verb.CUTOVER) == State.CUTOVER
    assert next_state("analytics", State.CUTOVER, Verb.ROLLBACK) == State.STREAMING
    assert next_state("analytics", State.COPYING, Verb.ROLLBACK) == State.PLANNED
    assert next_state("analytics", State.STREAMING, Verb.ROLLBACK) == State.PLANNED
    for current in (State.PLANNED, State.COPYING, State.CUTOVER, State.FINISHED):
        with pytest.raises(TransitionError, match=f"cutover: not possible in state {current}") as info:
            next_state("analytics", current, Verb.CUTOVER)
        assert "\n" not in str(info.value)
    with pytest.raises(TransitionError, match="no migration recorded for analytics"):
        next_state("analytics", None, Verb.CUTOVER)


def test_start_and_finish_follow_the_table_and_refuse_the_rest() -> None:
    assert next_state("analytics", State.PLANNED, Verb.START) == State.COPYING
    assert next_state("analytics", State.CUTOVER, Verb.FINISH) == State.FINISHED
    for current in (State.COPYING, State.STREAMING, State.CUTOVER, State.FINISHED):
        with pytest.raises(TransitionError, match=f"start: not possible in state {current}"):
            next_state("analytics", current, Verb.START)
    for current in (State.PLANNED, State.COPYING, State.STREAMING, State.FINISHED):
        with pytest.raises(TransitionError, match=f"finish: not possible in state {current}") as info:
            next_state("analytics", current, Verb.FINISH)
        assert "finish" in str(info.value)
    with pytest.raises(TransitionError, match="rollback: not possible in state planned"):
        next_state("analytics", State.PLANNED, Verb.ROLLBACK)
    for verb in (Verb.START, Verb.ROLLBACK, Verb.FINISH):
        with pytest.raises(TransitionError, match="no migration recorded for analytics"):
            next_state("analytics", None, verb)


def test_internal_transition_and_illegal_ones() -> None:
    assert next_state("analytics", State.COPYING, Verb.COPIED) == State.STREAMING
    with pytest.raises(TransitionError, match="not possible in state planned"):
        next_state("analytics", State.PLANNED, Verb.COPIED)
    with pytest.raises(TransitionError, match="no migration recorded"):
        next_state("analytics", None, Verb.COPIED)


def test_every_transition() -> None:
    """The table is the one door: next_state follows it and refuses the rest."""
    for current in State:
        for verb in Verb:
            expected = TRANSITIONS.get((current, verb))
            if expected is None:
                with pytest.raises(TransitionError, match=f"not possible in state {current}"):
                    next_state("documents", current, verb)
            else:
                assert next_state("documents", current, verb) == expected
    with pytest.raises(TransitionError, match=r"\(possible: cutover, rollback\)"):
        next_state("documents", State.STREAMING, Verb.FINISH)


def test_held_by_main_only_configured_roles_not_cut_over() -> None:
    migrations = {
        role: Migration(role, st, NOW, NOW)
        for role, st in (
            ("analytics", State.PLANNED),
            ("documents", State.CUTOVER),
            ("compliance", State.COPYING),
        )
    }
    assert held_by_main(migrations, frozenset({"analytics", "documents"})) == {"analytics"}


def test_stored_rows_parse_and_unknown_states_are_refused() -> None:
    rows = [("analytics", "streaming", NOW, NOW, None), ("not_a_role", "planned", NOW, NOW, "")]
    assert state.parse_rows(rows) == {"analytics": Migration("analytics", State.STREAMING, NOW, NOW, "")}
    with pytest.raises(ValueError):
        state.parse_rows([("analytics", "teleporting", NOW, NOW, "")])


# -- routing of a held role, and the statements a move would refuse ----------------------------------------
JOIN = "SELECT count(*) FROM users u JOIN user_activity a ON a.user_id = u.id"


def test_held_role_routes_as_if_unconfigured(tmp_path: Path) -> None:
    config = config_for(tmp_path, ("analytics",))
    router = Router(config)
    assert router.decide(classify("INSERT INTO user_activity (user_id) VALUES (1)")).role == "analytics"
    assert router.decide(classify(JOIN)).sqlstate == "0A000"
    router.set_held(frozenset({"analytics"}))
    write = router.decide(classify("INSERT INTO user_activity (user_id) VALUES (1)"))
    assert (write.role, write.fallback_writes) == (MAIN, ())  # not a fallback write to reconcile
    assert router.decide(classify(JOIN)).role == MAIN
    assert router.decide(classify("SELECT 1"), override="analytics").role == MAIN
    assert router.check_in_transaction(classify("SELECT * FROM user_activity"), MAIN) is None
    assert not router.on_fallback
    router.set_held(frozenset())
    assert router.decide(classify(JOIN)).sqlstate == "0A000"


def test_moving_joins_for_roles_main_serves(tmp_path: Path) -> None:
    cache = ClassificationCache()
    seen = SeenJoins(cache.fingerprint_of)
    router = Router(config_for(tmp_path, ("documents",)), joins=seen)  # analytics, compliance: no URL
    join = cache.classify(JOIN)
    assert router.moving_joins(join) == (MovingJoin("analytics", ("user_activity",), ("users",)),)
    assert router.moving_joins(cache.classify("SELECT * FROM user_activity")) == ()
    assert router.moving_joins(cache.classify("SELECT * FROM users JOIN documents ON true")) == ()
    both = cache.classify("SELECT * FROM user_activity, boir_filings")
    assert [j.role for j in router.moving_joins(both)] == ["analytics", "compliance"]
    for _ in range(3):
        router.decide_cached(join, None, None)
    router.decide_cached(cache.classify(JOIN.replace("u.id", "u.id + 0")), None, None)
    router.decide_cached(join, "main", None)  # an override is routed by its comment, then too: not counted
    router.check_in_transaction(join, MAIN)
    found = seen.for_role("analytics")
    assert (found[0].key, found[0].count) == (cache.fingerprint_of(join), 4)
    assert len(found) == 2 and found[1].count == 1
    assert "refused with 0A000 once analytics serves its tables" in found[0].join.describe()
    assert seen.for_role("documents") == []


def test_seen_statements_are_bounded(tmp_path: Path) -> None:
    seen = SeenJoins(lambda info: None)
    join = MovingJoin("analytics", ("user_activity",), ("users",))
    info = classify(JOIN)
    for n in range(MAX_STATEMENTS + 10):
        seen.record(info, (MovingJoin("analytics", ("user_activity",), (f"t{n}",)),))
    seen.record(info, (join,))
    assert len(seen.seen) == MAX_STATEMENTS + 1
    assert [s.count for s in seen.for_role("analytics") if s.key == OTHER] == [11]


# -- the plan ------------------------------------------------------------------------------------------------
def test_plan_rows_and_rendering() -> None:
    facts = PlanFacts(
        "analytics",
        configured=True,
        migration=Migration("analytics", State.PLANNED, NOW, NOW),
        wal_level="replica",
        tables=[
            Table("public", "business_metrics", "business_metrics", 16384, -1),
            Table("public", "user_activity", "user_activity", 65536, 900),
        ],
        counts={"business_metrics": 0, "user_activity": None},
        foreign_keys=[
            ForeignKey(
                "ua_user",
                "user_activity",
                "users",
                "FOREIGN KEY (user_id) REFERENCES users(id)",
                "referencing",
            )
        ],
        target={"user_activity": 0},
    )
    rows = plan_rows(facts, None)
    assert [(r.kind, r.name) for r in rows] == [
        ("state", "planned"),
        ("check", "wal_level"),
        ("table", "business_metrics"),
        ("table", "user_activity"),
        ("foreign_key", "user_activity.ua_user"),
        ("note", "statements"),
    ]
    assert rows[2].detail == "analytics: no such table yet"
    assert (rows[3].rows, rows[3].bytes) == (900, 65536)
    assert rows[3].detail == "rows: estimate (count took over 10s); analytics: exists, 0 rows"
    assert "user_activity (moves) FOREIGN KEY (user_id) REFERENCES users(id) (users stays)" in rows[4].detail
    assert "wal_level = logical" in rows[1].detail
    text = render(COLUMNS, [r.values() for r in rows])
    lines = text.splitlines()
    assert lines[0].split(" | ")[:5] == ["kind       ", "name                 ", "rows", "bytes", "seen"]
    assert lines[-1] == "(6 rows)"
    assert all(len(line.split(" | ")) == 6 for line in lines[2:-1])


def test_plan_statement_rows() -> None:
    facts = PlanFacts("documents", configured=False, wal_level="logical")
    none = plan_rows(facts, [])
    assert [(r.kind, r.name) for r in none] == [
        ("state", "none"),
        ("check", "target"),
        ("check", "tables"),
        ("statement", "(none)"),
    ]
    seen = SeenJoins(lambda info: "abc123")
    seen.record(classify("SELECT 1"), (MovingJoin("documents", ("documents",), ("users",)),))
    rows = plan_rows(facts, seen.for_role("documents"))
    assert (rows[-1].kind, rows[-1].name, rows[-1].seen) == ("statement", "abc123", 1)
    assert rows[-1].detail.startswith("joins documents (moves to documents) with users (stays)")


# -- verbs: what they need before touching anything --------------------------------------------------------
def test_verbs_name_the_missing_migration_login_in_one_line(tmp_path: Path) -> None:
    config = config_for(tmp_path, ("analytics",))
    with pytest.raises(verbs.VerbError) as info:
        verbs.migration_dsns(config, "analytics", "start")
    assert info.value.sqlstate == "F0000"
    assert info.value.message == (
        "migrate analytics start: roles.main.migration_url (MIGRATION_DATABASE_URL) is not set: it needs a "
        "login to main's database that may set up logical replication (PostgreSQL 15: a superuser)"
    )
    env = {ROLE_ENV[r]: f"postgresql://u:p@{r}.internal/db" for r in ("main", "analytics")}
    env["MIGRATION_DATABASE_URL"] = "postgresql://su:pw@main.internal/db"
    config = load_config(tmp_path / "proxy.yaml", env)
    with pytest.raises(verbs.VerbError, match=r"roles.analytics.migration_url \(ANALYTICS_MIGRATION_"):
        verbs.migration_dsns(config, "analytics", "rollback")
    env["ANALYTICS_MIGRATION_DATABASE_URL"] = "postgresql://su:pw@analytics.internal/db"
    main, target = verbs.migration_dsns(load_config(tmp_path / "proxy.yaml", env), "analytics", "finish")
    assert (main.host, target.host) == ("main.internal", "analytics.internal")
    with pytest.raises(verbs.VerbError, match=r"roles\.documents\.url is not set: no database to move to"):
        verbs.migration_dsns(load_config(tmp_path / "proxy.yaml", env), "documents", "start")


# -- the CLI -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["cutover", "rollback", "finish"])
def test_cli_verbs_without_an_admin_user_exit_non_zero_with_one_line(verb: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env["DATABASE_URL"] = "postgresql://app:secret@127.0.0.1:1/app"
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", "analytics", verb],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"parafort-proxy: migrate analytics {verb}: auth.admin_users is empty: migrate acts through the "
        "admin console, as one of those users"
    ]


def test_plan_state_row_says_what_a_proxy_start_would_do() -> None:
    table = Table("public", "user_activity", "user_activity", 8192, -1)
    facts = PlanFacts("analytics", configured=True, tables=[table], counts={"user_activity": 3}, target={})
    assert plan_rows(facts, None)[0].detail == (
        "no migration recorded; rows in main, none in analytics: a proxy starting now keeps main serving "
        "them (planned)"
    )
    facts.target = {"user_activity": 7}
    assert plan_rows(facts, None)[0].detail == "no migration recorded: analytics serves its own tables"
