"""Main's function catalog as the router uses it (proxy/lookups.py, Router.catalog_read_only)."""

from __future__ import annotations

from pathlib import Path

from proxy.config import load_config
from proxy.lookups import read_only_names
from proxy.router.classify import classify
from proxy.router.policy import Router

ROWS = [
    ("public", "stable_fn", True),
    ("public", "volatile_fn", False),
    ("public", "shared", True),
    ("pg_catalog", "shared", False),  # a volatile pg_catalog overload of the same name: unqualified = write
    ("pg_catalog", "new_builtin", True),
    ("lib", "lib_fn", True),
    ("lib", "lib_volatile", False),
    ("public", "MixedCase", True),
]


def test_read_only_names_spell_calls_as_the_classifier_does() -> None:
    assert read_only_names(ROWS) == {
        "public.stable_fn",
        "stable_fn",
        "public.shared",
        "pg_catalog.new_builtin",
        "new_builtin",
        "lib.lib_fn",
        "public.MixedCase",
        "MixedCase",
    }


def test_router_reads_only_with_every_function_known_read_only(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("{}\n")
    env = {"DATABASE_URL": "postgresql://u:p@main/db", "READ_REPLICA_DATABASE_URL": "postgresql://u:p@r/db"}
    router = Router(load_config(path, env))
    cases = {
        "SELECT stable_fn()": "main",  # nothing known yet: a write
    }
    for sql, role in cases.items():
        assert router.decide(classify(sql)).role == role, sql
    router.set_catalog_read_only(read_only_names(ROWS))
    cases = {
        "SELECT stable_fn()": "read_replica",
        "SELECT public.stable_fn()": "read_replica",
        "SELECT lib.lib_fn()": "read_replica",
        'SELECT "MixedCase"()': "read_replica",
        "SELECT mixedcase()": "main",  # folds to lower case: another function
        "SELECT lib_fn()": "main",  # not in public or pg_catalog: the proxy does not follow search_path
        "SELECT lib.lib_volatile()": "main",
        "SELECT shared()": "main",
        "SELECT volatile_fn()": "main",
        "SELECT stable_fn(), volatile_fn()": "main",
        "SELECT unknown_fn()": "main",
        "SELECT nextval('s')": "main",  # the built-in writers stay writes
    }
    for sql, role in cases.items():
        assert router.decide(classify(sql)).role == role, sql
