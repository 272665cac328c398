"""Configuration: env-only, YAML with ${VAR} expansion and env override, and every bad-config case."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.config import ConfigError, TableRef, load_config, parse_duration

MAIN = "postgresql://app:main-secret@db-main:5432/parafort_main"
FIVE = {
    "DATABASE_URL": MAIN,
    "ANALYTICS_DATABASE_URL": "postgresql://an:an-secret@db-an:5433/parafort_analytics",
    "DOCUMENTS_DATABASE_URL": "postgresql://doc:doc-secret@db-doc/parafort_documents",
    "COMPLIANCE_DATABASE_URL": "postgres://co:co-secret@db-co:6000/parafort_compliance",
    "READ_REPLICA_DATABASE_URL": "postgresql://app:rep-secret@db-rep:5432/parafort_main",
}
SECRETS = ("main-secret", "an-secret", "doc-secret", "co-secret", "rep-secret", "file-secret", "q-secret")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path | None, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    return info.value.problems


def test_env_only_five_roles_with_seed_defaults() -> None:
    config = load_config(None, FIVE)
    expected = {
        "main": (20, 30.0, None),
        # A configured domain role has no fallback unless asked for: down, it is refused (57P03).
        "analytics": (15, 45.0, None),
        "documents": (25, 60.0, None),
        "compliance": (10, 30.0, None),
        "read_replica": (30, 20.0, "main"),
    }
    for role, (size, timeout, fallback) in expected.items():
        section = config.roles.get(role)
        assert section.configured
        assert (section.pool_size, section.acquire_timeout, section.fallback) == (size, timeout, fallback)
    assert config.roles.compliance.dsn is not None
    assert config.roles.compliance.dsn.port == 6000
    assert config.roles.documents.dsn is not None
    assert config.roles.documents.dsn.port == 5432
    assert [r.name for r in config.roles.read_replica.upstreams] == ["read_replica"]
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 6432)


def test_env_only_main_leaves_optional_roles_unconfigured() -> None:
    config = load_config(None, {"DATABASE_URL": MAIN, "ANALYTICS_DATABASE_URL": ""})
    assert config.roles.main.configured
    for role in ("analytics", "documents", "compliance", "read_replica"):
        assert not config.roles.get(role).configured
    # The default domain map: schema name = domain.
    assert config.domains.domain_of("analytics", "anything") == "analytics"
    assert config.domains.domain_of("compliance", "boir_filings") == "compliance"
    assert config.domains.domain_of(None, "users") is None
    assert config.domains.domain_of("public", "user_activity") is None


def test_fallback_main_is_an_explicit_choice_per_role(tmp_path: Path) -> None:
    path = write(tmp_path, "roles: {analytics: {fallback: main}, documents: {fallback: null}}\n")
    config = load_config(path, FIVE)
    assert config.roles.analytics.fallback == "main"
    assert config.roles.documents.fallback is None
    assert config.roles.compliance.fallback is None


def test_yaml_expansion_and_env_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        listen: {host: 0.0.0.0, port: 7432}
        roles:
          main:
            url: postgresql://app:${MAIN_PW}@db-main:5432/${MAIN_DB:-parafort_main}
            pool_size: 50
            acquire_timeout: 1500ms
            idle_timeout: 5m
          analytics:
            url: postgresql://an:file-secret@file-host/an
            pool_size: 7
          documents:
            url: ${DOCS_URL:-}
          read_replica:
            replicas:
              - {name: west-1, url: "postgresql://r:file-secret@r1/parafort_main"}
              - {name: west-2, url: "postgresql://r:file-secret@r2/parafort_main", pool_size: 5}
        health: {interval: 250ms, max_replica_lag: 2m}
        routing: {read_only_functions: [my_pure_fn, "cost$$"]}
        """,
    )
    env = {"MAIN_PW": "main-secret", "ANALYTICS_DATABASE_URL": FIVE["ANALYTICS_DATABASE_URL"]}
    config = load_config(path, env)
    main_dsn = config.roles.main.dsn
    assert main_dsn is not None
    assert (main_dsn.password, main_dsn.database) == ("main-secret", "parafort_main")
    assert (config.roles.main.pool_size, config.roles.main.acquire_timeout) == (50, 1.5)
    assert config.roles.main.idle_timeout == 300.0
    # The env URL wins over the file's, the file's pool size stays.
    assert config.roles.analytics.url == FIVE["ANALYTICS_DATABASE_URL"]
    assert config.roles.analytics.pool_size == 7
    assert not config.roles.documents.configured
    replicas = config.roles.read_replica.upstreams
    assert [(r.name, r.pool_size) for r in replicas] == [("west-1", None), ("west-2", 5)]
    assert (config.health.interval, config.health.max_replica_lag) == (0.25, 120.0)
    assert config.routing.read_only_functions == ("my_pure_fn", "cost$")
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 7432)

    # READ_REPLICA_DATABASE_URL replaces the file's list of replicas.
    config = load_config(path, {**env, "READ_REPLICA_DATABASE_URL": FIVE["READ_REPLICA_DATABASE_URL"]})
    assert [r.url for r in config.roles.read_replica.upstreams] == [FIVE["READ_REPLICA_DATABASE_URL"]]


def test_domain_map_entries_and_precedence(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        domains:
          analytics: [user_activity, "analytics.*", Reports.Daily]
          documents: ['"Doc Store".*', analytics.raw_documents]
          compliance: [public.boir_filings]
        """,
    )
    domains = load_config(path, {"DATABASE_URL": MAIN}).domains
    assert domains.analytics == (
        TableRef(None, "user_activity"),
        TableRef("analytics", "*"),
        TableRef("reports", "daily"),
    )
    assert domains.domain_of(None, "user_activity") == "analytics"
    assert domains.domain_of("public", "user_activity") == "analytics"
    assert domains.domain_of("sales", "user_activity") is None  # a bare entry is public.user_activity only
    assert domains.domain_of("analytics", "events") == "analytics"
    assert domains.domain_of("analytics", "raw_documents") == "documents"  # schema.table beats schema.*
    assert domains.domain_of("Doc Store", "files") == "documents"
    assert domains.domain_of("doc store", "files") is None
    assert domains.domain_of("reports", "daily") == "analytics"
    assert domains.domain_of(None, "boir_filings") == "compliance"  # unqualified → public
    assert domains.domain_of("other", "boir_filings") is None
    # With a map, the schema-name default no longer applies.
    assert domains.domain_of("compliance", "anything") is None


def test_bare_entry_is_the_table_in_public_only(tmp_path: Path) -> None:
    """Issue 15: ``user_activity`` in the map sent reporting.user_activity to analytics too."""
    path = write(
        tmp_path,
        """
        domains:
          analytics: [user_activity, "public.business_metrics"]
          documents: [reporting.user_activity, "archive.*"]
        """,
    )
    domains = load_config(path, {"DATABASE_URL": MAIN}).domains
    assert domains.domain_of(None, "user_activity") == "analytics"  # unqualified: public (not search_path)
    assert domains.domain_of("public", "user_activity") == "analytics"
    assert domains.domain_of("reporting", "user_activity") == "documents"
    assert domains.domain_of("archive", "user_activity") == "documents"
    assert domains.domain_of("sales", "user_activity") is None
    assert domains.domain_of(None, "business_metrics") == "analytics"
    assert domains.domain_of("sales", "business_metrics") is None
    assert domains.bare_entries == {"user_activity": "analytics"}


def test_bare_entry_and_its_public_spelling_are_one_table(tmp_path: Path) -> None:
    path = write(tmp_path, "domains: {analytics: [user_activity], documents: [public.user_activity]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {"DATABASE_URL": MAIN})
    assert err.value.problems == [
        "domains: table 'public.user_activity' is in two domains: analytics and documents"
    ]


BAD_CASES = [
    pytest.param("listen: {host: 127.0.0.1, prot: 6432}\n", {}, "listen.prot: unknown key", id="unknown-key"),
    pytest.param("colour: blue\n", {}, "colour: unknown key", id="unknown-top-level-key"),
    pytest.param(
        "roles: {analytics: {pool_sise: 3}}\n",
        {},
        "roles.analytics.pool_sise: unknown key",
        id="unknown-role-key",
    ),
    pytest.param(
        "roles: {billing: {url: 'postgresql://h/db'}}\n",
        {},
        "roles.billing: unknown role (roles are main, analytics, documents, compliance, read_replica)",
        id="unknown-role",
    ),
    pytest.param(
        "roles: {analytics: {url: 'http://an:q-secret@host/db'}}\n",
        {},
        "roles.analytics.url: bad URL 'http://an:***@host/db': scheme must be postgresql:// or postgres://",
        id="bad-url-scheme",
    ),
    pytest.param(
        "",
        {"COMPLIANCE_DATABASE_URL": "postgresql://co:q-secret@host:70000/db"},
        "roles.compliance.url (from COMPLIANCE_DATABASE_URL): bad URL 'postgresql://co:***@host:70000/db':"
        " port must be a number from 1 to 65535",
        id="bad-url-port-env",
    ),
    pytest.param(
        "roles: {main: {url: 'postgresql://app:q-secret@/db'}}\n",
        {"DATABASE_URL": ""},
        "roles.main.url: bad URL 'postgresql://app:***@/db': no host",
        id="bad-url-no-host",
    ),
    pytest.param(
        "",
        {"DATABASE_URL": ""},
        "roles.main.url: missing; set DATABASE_URL or roles.main.url",
        id="missing-database-url",
    ),
    pytest.param(
        "domains: {analytics: [user_activity], documents: [USER_ACTIVITY]}\n",
        {},
        "domains: table 'user_activity' is in two domains: analytics and documents",
        id="table-in-two-domains",
    ),
    pytest.param(
        "domains: {analytics: ['a.b.c']}\n",
        {},
        "domains.analytics[0]: bad table entry 'a.b.c' (use table, schema.table or schema.*)",
        id="bad-table-entry",
    ),
    pytest.param("domains: {billing: [invoices]}\n", {}, "domains.billing: unknown key", id="unknown-domain"),
    pytest.param(
        "roles: {main: {acquire_timeout: 30 seconds}}\n",
        {},
        "roles.main.acquire_timeout: bad duration '30 seconds' (use e.g. 500ms, 30s, 5m, 1h)",
        id="bad-duration",
    ),
    pytest.param(
        "health: {interval: -1}\n",
        {},
        "health.interval: bad duration -1: must not be negative",
        id="negative-duration",
    ),
    pytest.param(
        "roles: {main: {pool_size: 0}}\n",
        {},
        "roles.main.pool_size: Input should be greater than or equal to 1",
        id="zero-pool",
    ),
    pytest.param(
        "roles: {analytics: {fallback: read_replica}}\n",
        {},
        "roles.analytics.fallback: must be main or null, not read_replica (only main holds analytics's "
        "tables)",
        id="fallback-to-replica",
    ),
    pytest.param(
        "roles: {analytics: {fallback: documents}}\n",
        {},
        "roles.analytics.fallback: must be main or null, not documents (only main holds analytics's tables)",
        id="fallback-to-another-domain",
    ),
    pytest.param(
        "roles: {documents: {fallback: elsewhere}}\n",
        {},
        "roles.documents.fallback: Input should be 'main', 'analytics', 'documents', 'compliance' or "
        "'read_replica'",
        id="fallback-not-a-role",
    ),
    pytest.param(
        "roles: {main: {url: '${NOPE}'}}\n",
        {"DATABASE_URL": ""},
        "roles.main.url: environment variable NOPE is not set",
        id="unset-variable",
    ),
    pytest.param(
        "listen: [1, 2\n",
        {},
        "YAML error at line 2, column 1: expected ',' or ']', but got '<stream end>'",
        id="yaml-syntax",
    ),
]


@pytest.mark.parametrize(("text", "env", "expected"), BAD_CASES)
def test_bad_config_gives_one_clear_line(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, text)
    found = problems(path, {"DATABASE_URL": MAIN, **env})
    assert len(found) == 1, found
    assert found[0] == (f"{path}: {expected}" if expected.startswith("YAML") else expected)
    assert not any(s in found[0] for s in SECRETS)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: {port: 0}\nhealth: {timeout: soon}\n")
    assert problems(path, {"DATABASE_URL": MAIN}) == [
        "listen.port: Input should be greater than or equal to 1",
        "health.timeout: bad duration 'soon' (use e.g. 500ms, 30s, 5m, 1h)",
    ]


def test_read_your_writes_scope_off_unquoted(tmp_path: Path) -> None:
    """``scope: off`` as a YAML file (or --proxy-set) writes it: YAML 1.1 reads ``off`` as false."""
    path = tmp_path / "proxy.yaml"
    path.write_text("routing:\n  read_your_writes:\n    scope: off\n")
    assert load_config(path, {"DATABASE_URL": MAIN}).routing.read_your_writes.scope == "off"
    path.write_text("routing:\n  read_your_writes:\n    scope: yes\n")
    with pytest.raises(ConfigError, match=r"routing\.read_your_writes\.scope: Input should be"):
        load_config(path, {"DATABASE_URL": MAIN})


def test_durations() -> None:
    assert [parse_duration(v) for v in ("500ms", "30s", "5m", "1h", "1d", 2, 0.5, "7")] == [
        0.5,
        30.0,
        300.0,
        3600.0,
        86400.0,
        2.0,
        0.5,
        7.0,
    ]


def test_check_prints_resolved_config_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in FIVE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("COMPLIANCE_DATABASE_URL", "postgresql://co@db-co/c?password=q-secret&sslmode=require")
    path = write(tmp_path, "auth: {method: md5}\n")
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "configuration is valid" in out
    assert "postgresql://app:***@db-main:5432/parafort_main" in out
    assert "password=***&sslmode=require" in out
    assert "pool_size: 25" in out
    assert "acquire_timeout: 45s" in out
    assert not [s for s in SECRETS if s in out]


def test_migration_urls_from_file_and_env_are_redacted_in_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in FIVE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MIGRATION_DATABASE_URL", "postgresql://su:mig-main-secret@db-main/parafort_main")
    path = write(
        tmp_path,
        "roles:\n  analytics:\n    migration_url: postgresql://su:mig-an-secret@db-an/an\n",
    )
    config = load_config(path, dict(FIVE, MIGRATION_DATABASE_URL="postgresql://su:mig-main-secret@m/p"))
    assert config.roles.main.migration_dsn is not None and config.roles.main.migration_dsn.user == "su"
    assert config.roles.analytics.migration_dsn is not None
    assert config.roles.analytics.migration_dsn.host == "db-an"
    assert config.roles.documents.migration_dsn is None
    assert "mig-an-secret" not in repr(config.roles.analytics)
    env = dict(FIVE, ANALYTICS_MIGRATION_DATABASE_URL="postgresql://su2:x-secret@other/an")
    overridden = load_config(path, env).roles.analytics.migration_dsn
    assert overridden is not None and overridden.host == "other"  # the environment wins over the file

    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "migration_url: postgresql://su:***@db-main/parafort_main" in out
    assert "migration_url: postgresql://su:***@db-an/an" in out
    assert "mig-main-secret" not in out and "mig-an-secret" not in out


def test_a_replica_has_no_migration_url(tmp_path: Path) -> None:
    path = write(tmp_path, "roles:\n  read_replica:\n    migration_url: postgresql://su:pw@r/db\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, FIVE)
    assert info.value.problems == [
        "roles.read_replica.migration_url: a replica is never a migration's source or target"
    ]
    bad = write(tmp_path, "roles:\n  main:\n    migration_url: mysql://su:pw-secret@r/db\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, FIVE)
    assert len(info.value.problems) == 1 and "pw-secret" not in info.value.problems[0]


def test_example_config_is_accepted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).parents[2] / "config" / "proxy.yaml"
    for key, value in FIVE.items():
        monkeypatch.setenv(key, value)
    assert main(["check", "--config", str(example)]) == 0
    out = capsys.readouterr().out
    assert "analytics.*" in out
    assert not [s for s in SECRETS if s in out]


def test_command_line_exit_code_and_stderr(tmp_path: Path) -> None:
    """Both entry points: the console script and ``python -m proxy``."""
    path = write(tmp_path, "roles: {main: {url: 'postgresql://app:q-secret@h/db', pool_size: none}}\n")
    script = Path(sys.executable).with_name("parafort-proxy")
    for argv in ([str(script)], [sys.executable, "-m", "proxy"]):
        result = subprocess.run(
            [*argv, "check", "--config", str(path)],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "parafort-proxy: config error: roles.main.pool_size: "
            "Input should be a valid integer, unable to parse string as an integer"
        ]
