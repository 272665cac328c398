"""Per-client session state: startup parameters, staged SETs, and the SQL that syncs a connection."""

from __future__ import annotations

from proxy.frontend.session import PreparedStatement, Session, startup_settings
from proxy.router.classify import session_changes


def test_startup_settings_and_options() -> None:
    settings = startup_settings(
        {
            "user": "u",
            "database": "d",
            "application_name": "app's",
            "options": "-c search_path=a,b --statement-timeout=5s -c work_mem=64MB",
        }
    )
    assert settings == {
        "application_name": "SET application_name TO 'app''s'",
        "search_path": "SET search_path TO 'a,b'",
        "statement_timeout": "SET statement_timeout TO '5s'",
        "work_mem": "SET work_mem TO '64MB'",
    }


def test_commit_and_sync() -> None:
    session = Session(startup_settings({"application_name": "a"}))
    upstream: dict[str, str] = {}
    assert session.sync_sql(upstream) == "SET application_name TO 'a'"
    upstream = dict(session.settings)
    assert session.sync_sql(upstream) == ""
    session.stage(session_changes("SET search_path = x"))
    session.commit_staged(upstream)
    assert session.settings["search_path"] == "SET search_path = x"
    assert upstream["search_path"] == "SET search_path = x"
    # Another connection that never saw the SET gets it replayed; one with a stranger's SET gets a RESET.
    assert session.sync_sql(
        {"application_name": "SET application_name TO 'a'", "work_mem": "SET work_mem = 1"}
    ) == ("RESET work_mem; SET search_path = x")


def test_reset_all_goes_back_to_startup_values() -> None:
    session = Session(startup_settings({"application_name": "a"}))
    upstream = dict(session.settings)
    session.stage(session_changes("SET application_name = 'b'; SET search_path = x"))
    session.commit_staged(upstream)
    session.stage(session_changes("RESET ALL"))
    session.commit_staged(upstream)
    assert session.settings == {"application_name": "SET application_name TO 'a'"}
    assert upstream == {}  # RESET ALL on the upstream restores the server's defaults
    assert session.sync_sql(upstream) == "SET application_name TO 'a'"


def test_discarded_changes_never_apply() -> None:
    session = Session({})
    session.stage(session_changes("SET search_path = x"))
    session.discard_staged()
    assert not session.has_staged
    assert session.settings == {}


def test_prepared_statement_names_are_content_addressed() -> None:
    a = PreparedStatement.make("SELECT $1", (23,))
    assert a == PreparedStatement.make("SELECT $1", (23,))
    assert a.upstream_name != PreparedStatement.make("SELECT $1", (25,)).upstream_name
    assert a.upstream_name != PreparedStatement.make("SELECT $1 ", (23,)).upstream_name
    assert a.upstream_name.startswith("pf_") and len(a.upstream_name) < 64


def test_savepoints_scope_staged_changes() -> None:
    session = Session({})
    upstream: dict[str, str] = {}
    session.stage(session_changes("SET search_path = a"))
    session.stage(session_changes("SAVEPOINT s1"))
    session.stage(session_changes("SET work_mem = '8MB'"))
    session.stage(session_changes("ROLLBACK TO SAVEPOINT s1"))  # undoes work_mem only
    session.stage(session_changes("SAVEPOINT s2"))
    session.stage(session_changes("SET timezone = 'UTC'"))
    session.stage(session_changes("RELEASE SAVEPOINT s2"))  # keeps timezone
    session.stage(session_changes("ROLLBACK TO s1"))  # ...until the outer savepoint is rolled back to
    session.stage(session_changes("SET statement_timeout = 5"))
    session.commit_staged(upstream)
    assert set(session.settings) == {"search_path", "statement_timeout"}
    assert upstream == session.settings


def test_rollback_to_unknown_savepoint_is_ignored() -> None:
    session = Session({})
    session.stage(session_changes("SET search_path = a; ROLLBACK TO SAVEPOINT before_tracking"))
    session.commit_staged({})
    assert "search_path" in session.settings
