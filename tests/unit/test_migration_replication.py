"""The pure parts of a migration's replication: object names, quoting, the subscription's connection
string (read back by libpq's own parser through psycopg), the pg_dump filter, the preflight checks, the
sequence arithmetic and Progress.done."""

from __future__ import annotations

import pglast
import pytest
from psycopg.conninfo import conninfo_to_dict

from proxy.config.dsn import parse_dsn
from proxy.config.values import TableRef
from proxy.migration import naming
from proxy.migration.definitions import ForeignKey, dump_pattern, filter_dump
from proxy.migration.naming import (
    conninfo,
    create_publication,
    create_subscription,
    names,
    parse_tables,
    quote_ident,
    quote_literal,
    redact,
)
from proxy.migration.preflight import (
    ServerFacts,
    TableFacts,
    publisher_problems,
    subscriber_problems,
    table_problems,
)
from proxy.migration.replication import Progress, sequence_target

PASSWORDS = ["plain", "it's", "back\\slash", "quote'\\'mix", "sp ace=x", "ünï"]


def test_names_derive_from_the_role_and_are_valid_slot_names() -> None:
    n = names("analytics")
    assert n.forward == "parafort_migrate_analytics_fwd"
    assert n.reverse == "parafort_migrate_analytics_rev"
    for name in (n.forward, n.reverse):
        assert len(name) <= 63 and name.replace("_", "").isalnum() and name == name.lower()
    assert names("analytics") == n  # one function, the same answer every time


@pytest.mark.parametrize("role", ["", "Analytics", "a-b", 'x"y', "1abc", "a" * 60, "a b"])
def test_names_refuse_roles_that_cannot_name_a_slot(role: str) -> None:
    with pytest.raises(ValueError, match="cannot name replication objects"):
        names(role)


def test_quote_ident_and_literal() -> None:
    assert quote_ident("user_activity") == '"user_activity"'
    assert quote_ident('we"ird') == '"we""ird"'
    assert quote_literal("it's") == "'it''s'"
    with pytest.raises(ValueError):
        quote_ident("a\0b")


def test_parse_tables_qualifies_dedupes_and_refuses_wildcards() -> None:
    refs = parse_tables(["user_activity", "public.user_activity", 'Stats."Daily"'])
    assert refs == [TableRef("public", "user_activity"), TableRef("stats", "Daily")]
    with pytest.raises(ValueError, match="wildcard"):
        parse_tables(["stats.*"])
    with pytest.raises(ValueError, match="no tables"):
        parse_tables([])


def test_create_publication_lists_exactly_the_tables_quoted() -> None:
    sql = create_publication("parafort_migrate_analytics_fwd", parse_tables(["a", 'S."T x"']))
    assert sql == 'CREATE PUBLICATION "parafort_migrate_analytics_fwd" FOR TABLE "public"."a", "s"."T x"'
    stmt = pglast.parse_sql(sql)[0].stmt
    assert stmt.pubname == "parafort_migrate_analytics_fwd"


@pytest.mark.parametrize("password", PASSWORDS)
def test_subscription_connection_string_reads_back_through_sql_and_libpq(password: str) -> None:
    dsn = parse_dsn("postgresql://u@127.0.0.1:5433/db?sslmode=disable&application_name=x")
    dsn = type(dsn)(dsn.host, dsn.port, "u s'r", password, "d b", dsn.params)
    sql = create_subscription(
        "parafort_migrate_analytics_fwd", dsn, "parafort_migrate_analytics_fwd", copy_data=True
    )
    stmt = pglast.parse_sql(sql)[0].stmt  # PostgreSQL's own grammar
    assert stmt.subname == "parafort_migrate_analytics_fwd"
    options = {opt.defname: opt.arg.sval for opt in stmt.options}
    assert options == {"copy_data": "true", "slot_name": "parafort_migrate_analytics_fwd"}
    parsed = conninfo_to_dict(stmt.conninfo)  # libpq's own parser
    assert parsed == {
        "host": "127.0.0.1", "port": "5433", "user": "u s'r", "password": password, "dbname": "d b",
        "sslmode": "disable",
    }  # fmt: skip
    assert conninfo_to_dict(conninfo(dsn))["password"] == password


def test_conninfo_without_password_and_redact() -> None:
    dsn = parse_dsn("postgresql://app:s3cret@db.example:5432/app")
    assert "password" not in conninfo(type(dsn)(dsn.host, dsn.port, dsn.user, None, dsn.database))
    assert redact("auth failed for s3cret at s3cret", dsn) == "auth failed for *** at ***"
    assert redact("nothing", parse_dsn("postgresql://app@h/db")) == "nothing"


def test_dump_pattern_matches_one_table_literally() -> None:
    assert dump_pattern(TableRef("public", "user_activity")) == '"public"."user_activity"'
    assert dump_pattern(TableRef("s", 'a*"b')) == '"s"."a*""b"'


# A pg_dump 15 --schema-only --no-owner --no-privileges output, as it writes it (\restrict since 15.14).
DUMP = r"""--
-- PostgreSQL database dump
--

\restrict aBcD123

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);

CREATE TABLE public.events (
    id bigint NOT NULL,
    parent_id bigint NOT NULL,
    note text DEFAULT 'it''s; not a split'::text
);

CREATE SEQUENCE public.events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.events_id_seq OWNED BY public.events.id;

CREATE TABLE public.items (
    id bigint NOT NULL,
    event_id bigint
);

ALTER TABLE ONLY public.events ALTER COLUMN id SET DEFAULT nextval('public.events_id_seq'::regclass);

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id);

CREATE INDEX events_parent_idx ON public.events USING btree (parent_id);

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES public.parents(id);

ALTER TABLE ONLY public.items
    ADD CONSTRAINT items_event_id_fkey FOREIGN KEY (event_id) REFERENCES public.events(id);

--
-- PostgreSQL database dump complete
--

\unrestrict aBcD123
"""


def test_filter_dump_drops_only_foreign_keys_leaving_the_moved_set() -> None:
    defs = filter_dump(DUMP, parse_tables(["events", "items"]))
    assert defs.skipped_foreign_keys == (ForeignKey("events", "events_parent_id_fkey", "parents"),)
    text = ";\n".join(defs.statements)
    assert "events_parent_id_fkey" not in text and "restrict" not in text
    assert any("items_event_id_fkey" in s for s in defs.statements)  # within the set: kept
    assert any(s.startswith("CREATE SEQUENCE public.events_id_seq") for s in defs.statements)
    assert any("'it''s; not a split'" in s for s in defs.statements)
    # Each kept piece is exactly one statement that parses on its own.
    for statement in defs.statements:
        assert len(pglast.parse_sql(statement)) == 1
    assert len(defs.statements) == 12


def test_filter_dump_keeps_everything_when_the_referenced_table_moves_too() -> None:
    defs = filter_dump(DUMP, parse_tables(["events", "items", "parents"]))
    assert defs.skipped_foreign_keys == ()
    assert len(defs.statements) == 13


def _server(**kw: object) -> ServerFacts:
    base: dict[str, object] = dict(
        version=150018, wal_level="logical", max_replication_slots=10, slots_used=0, max_wal_senders=10,
        senders_used=1, superuser=False, replication=True, user="app", can_create=True,
    )  # fmt: skip
    base.update(kw)
    return ServerFacts(**base)  # type: ignore[arg-type]


def test_publisher_problems_say_what_to_set() -> None:
    assert publisher_problems(_server(), "main", slots_needed=3) == []
    [problem] = publisher_problems(_server(wal_level="replica"), "main", slots_needed=0)
    assert (
        "wal_level=replica" in problem
        and "ALTER SYSTEM SET wal_level = logical on main and restart" in problem
    )
    problems = publisher_problems(
        _server(max_replication_slots=2, slots_used=1, max_wal_senders=3, senders_used=2, replication=False),
        "main", slots_needed=3,
    )  # fmt: skip
    assert len(problems) == 3
    assert "max_replication_slots=2 with 1 in use" in problems[0]
    assert "max_wal_senders=3 with 2 in use" in problems[1]
    assert "ALTER ROLE app REPLICATION" in problems[2]
    assert publisher_problems(_server(replication=False, superuser=True), "main", slots_needed=1) == []


def test_subscriber_problems_by_version() -> None:
    assert subscriber_problems(_server(superuser=True), "target") == []
    assert "superusers only" in subscriber_problems(_server(), "target")[0]
    assert "pg_create_subscription" in subscriber_problems(_server(version=160004), "target")[0]
    assert subscriber_problems(_server(version=160004, create_subscription_role=True), "target") == []


def test_table_problems() -> None:
    ok = TableFacts(TableRef("public", "a"), True, "r", "d", True, True)
    assert table_problems([ok], "main", superuser=False) == []
    facts = [
        TableFacts(TableRef("public", "gone"), False),
        TableFacts(TableRef("public", "nokey"), True, "r", "d", False, True),
        TableFacts(TableRef("s", "full"), True, "r", "f", False, True),
        TableFacts(TableRef("public", "part"), True, "p", "d", True, True),
        TableFacts(TableRef("public", "theirs"), True, "r", "d", True, False),
    ]
    problems = table_problems(facts, "main", superuser=False)
    assert problems[0] == "table gone does not exist on main"
    assert "nokey" in problems[1] and "REPLICA IDENTITY FULL" in problems[1]
    assert "partitioned" in problems[2] and "not owned" in problems[3]
    assert len(problems) == 4  # s.full has REPLICA IDENTITY FULL: fine
    assert len(table_problems(facts, "main", superuser=True)) == 3


def test_sequence_target_only_moves_forward() -> None:
    assert sequence_target(None, 5, 1) is None  # main never used it
    assert sequence_target(100, None, 1) == 100
    assert sequence_target(100, 40, 1) == 100
    assert sequence_target(100, 100, 1) is None
    assert sequence_target(100, 250, 1) is None  # never back
    assert sequence_target(-100, -40, -1) == -100  # descending: past means lower
    assert sequence_target(-100, -300, -1) is None


def test_progress_done_needs_every_table_ready_and_streaming() -> None:
    assert not Progress("none").done
    assert not Progress("forward", True, 2, 1, 1, True).done
    assert not Progress("forward", True, 2, 0, 2, False).done
    assert Progress("forward", True, 2, 0, 2, True).done


def test_prefix_is_the_proxys_own() -> None:
    assert naming.PREFIX.startswith("parafort_")
