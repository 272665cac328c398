"""Session-state and pinning facts from pglast, and the classification cache."""

from __future__ import annotations

from dataclasses import astuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.router.classify import (
    TX_BEGIN,
    TX_BEGIN_READ_ONLY,
    TX_COMMIT,
    TX_ROLLBACK,
    ClassificationCache,
    Flag,
    SessionChange,
    classify,
    deallocate_target,
    merge,
    route_override,
    session_changes,
)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("LISTEN jobs", "LISTEN"),
        ("PREPARE q AS SELECT 1", "SQL-level PREPARE"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor WITH HOLD"),
        ("CREATE TEMP TABLE t (x int)", "temporary table"),
        ("CREATE TEMPORARY TABLE t AS SELECT 1", "temporary table"),
        ("SELECT pg_advisory_lock(42)", "session advisory lock"),
        ("SELECT pg_try_advisory_lock(1, 2)", "session advisory lock"),
        ("SELECT set_config('search_path', 'x', false)", "set_config()"),
        ("SELECT 1; LISTEN jobs", "LISTEN"),
    ],
)
def test_pinning(sql: str, reason: str) -> None:
    info = classify(sql)
    assert info.pins
    assert info.pin_reason == reason


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SELECT pg_advisory_xact_lock(42)",  # transaction-scoped: released at commit, no pin
        "DECLARE c CURSOR FOR SELECT 1",
        "CREATE TABLE t (x int)",
        "SET LOCAL search_path = x",
        "UNLISTEN *",
    ],
)
def test_no_pin(sql: str) -> None:
    assert not classify(sql).pins


def test_session_set_flags() -> None:
    assert classify("SET search_path = a").flags & Flag.SESSION_SET
    assert classify("RESET ALL").flags & Flag.SESSION_SET
    assert classify("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").flags & Flag.SESSION_SET
    assert not classify("SET LOCAL search_path = a").flags & Flag.SESSION_SET
    assert not classify("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").flags & Flag.SESSION_SET
    assert classify("DISCARD ALL").flags & Flag.FORGET_PREPARED
    assert classify("DEALLOCATE ALL").flags & Flag.FORGET_PREPARED
    assert classify("SELEC 1").flags == Flag.PARSE_ERROR


def test_session_changes_replayable_text() -> None:
    changes = session_changes(
        "SET search_path = a, b; set local x.y = 1; RESET work_mem; SET TIME ZONE 'UTC'; RESET ALL"
    )
    assert changes == [
        SessionChange("search_path", "SET search_path = a, b"),
        SessionChange("work_mem", None),
        SessionChange("timezone", "SET TIME ZONE 'UTC'"),
        SessionChange(None, None),
    ]


def test_session_characteristics_become_settings() -> None:
    changes = session_changes(
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"
    )
    assert changes == [
        SessionChange("default_transaction_isolation", "SET default_transaction_isolation TO 'serializable'"),
        SessionChange("default_transaction_read_only", "SET default_transaction_read_only TO 'on'"),
    ]


def test_route_override_in_a_comment_with_non_ascii_text() -> None:
    """pglast's scanner gives character offsets: the comment is cut from the text, not from its bytes."""
    assert route_override("/* route: analytics */ SELECT 1") == "analytics"
    assert route_override("/* route: main\u00a0*/ SELECT 'é'") == "main"  # NBSP: whitespace to str.strip
    assert route_override("/* ü route: main */ SELECT 1") is None


def test_deallocate_target() -> None:
    assert deallocate_target("DEALLOCATE _pg3_0") == "_pg3_0"
    assert deallocate_target('DEALLOCATE PREPARE "Mixed"') == "Mixed"
    assert deallocate_target("DEALLOCATE ALL") == ""
    assert deallocate_target("DEALLOCATE a; SELECT 1") is None
    assert deallocate_target("SELECT 1") is None


def test_cache_hits_by_text_bytes_and_fingerprint() -> None:
    cache = ClassificationCache(size=10)
    first = cache.classify("SELECT pg_advisory_lock(1)")
    assert cache.misses == 1
    assert cache.classify("SELECT pg_advisory_lock(1)") is first
    assert cache.classify("select   pg_advisory_lock(2)") == first  # same fingerprint, other literal
    assert cache.misses == 1
    assert cache.classify_bytes(b"SELECT pg_advisory_lock(1)") == first
    assert cache.classify_bytes(b"SELECT pg_advisory_lock(1)") == first
    assert cache.hits == 4


def test_cache_shares_one_entry_per_literal_shape() -> None:
    """pgbench's simple-protocol statement carries its literal: a new text each time, one entry, no parse."""
    cache = ClassificationCache()
    first = cache.classify_bytes(b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;")
    assert cache.misses == 1
    for aid in (1, 77, 99_999):
        sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % aid
        assert cache.classify_bytes(sql) is first
    assert cache.hits == 3
    assert cache.misses == 1
    assert not cache._by_bytes  # the texts themselves are not kept
    update = b"UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;"
    # -4: one constant, from its minus sign
    assert cache.classify_bytes(update % (-4, 5)) is cache.classify_bytes(update % (-4000, 7))
    assert cache.classify_bytes(b"SELECT 'a', 'b''s'") is cache.classify_bytes(b"SELECT 'c', ''")
    # UTF-8 text: offsets are bytes, as pglast's locations are
    town = "SELECT * FROM clients WHERE ville = '{}' AND n = {}"
    first = cache.classify_bytes(town.format("Zürich", 1).encode())
    assert cache.classify_bytes(town.format("Genève à côté", 22).encode()) is first
    misses = cache.misses
    assert cache.classify_bytes(town.format("x", 3).encode().replace(b"x", b"\xff")) is first
    assert cache.misses == misses


def test_text_that_is_not_utf8_makes_no_trusted_shape() -> None:
    cache = ClassificationCache()
    cache.classify_bytes(b"SELECT * FROM t WHERE a = '\xff' AND b = 1")
    assert list(cache._by_shape.values()) == [None]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"),  # a read, then a write
        ("EXPLAIN (ANALYZE 'off') DELETE FROM t", "EXPLAIN (ANALYZE 'on') DELETE FROM t"),
        ("FETCH 5 FROM c", "FETCH 6 FROM c"),
        ("SELECT - 5", "SELECT - 6"),  # the constant starts at the minus sign, not at the digits
    ],
)
def test_a_shape_whose_literals_are_not_all_constants_is_not_shared(first: str, second: str) -> None:
    cache = ClassificationCache()
    assert astuple(cache.classify_bytes(first.encode())) == astuple(classify(first))
    assert astuple(cache.classify_bytes(second.encode())) == astuple(classify(second))
    assert list(cache._by_shape.values()) == [None]  # judged once, not trusted
    assert len(cache._by_bytes) == 2


_TEMPLATES = [
    "SELECT * FROM t WHERE a = {} LIMIT {}",
    "EXPLAIN (ANALYZE {}) DELETE FROM t WHERE a = {}",
    "EXPLAIN (ANALYZE {}, COSTS {}) SELECT 1",
    "FETCH {} FROM c; SELECT {}",
    "SELECT set_config({}, {}, false)",
    "BEGIN; UPDATE t SET a = a + {} WHERE b = {}",
    "BEGIN TRANSACTION READ ONLY; SELECT {}::int, {}",
    "SET statement_timeout = {}; SELECT {}",
    "COPY t FROM STDIN WITH (HEADER {}, DELIMITER {})",
    "SELECT nextval({}), {}",
    "VALUES ({}), ({})",
    "CREATE TABLE x (a varchar({}), b numeric({}, 2))",
    "SELECT pg_advisory_lock({}), pg_advisory_xact_lock({})",
    "DECLARE c CURSOR FOR SELECT {} FROM t LIMIT {}",
    "SELECT * FROM t WHERE a = -{} OR b = - {}",
    "SELECT interval {} , {} FROM s.t",
    'SELECT "tàble".nom, {} FROM "tàble" WHERE ville = {}',
]
_LITERALS = st.sampled_from(
    [
        "0",
        "1",
        "2",
        "-1",
        "7",
        "123456789",
        "1.5",
        ".5",
        "1e3",
        "'on'",
        "'off'",
        "'0'",
        "'1'",
        "'x'",
        "''",
        "'search_path'",
        "'t'",
        "true",
        "false",
        "on",
        "null",
        "a",
        "'Zürich'",
        "'日本'",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_TEMPLATES), _LITERALS, _LITERALS), min_size=1, max_size=12))
def test_the_cache_answers_what_classify_answers(statements: list[tuple[str, str, str]]) -> None:
    """Whatever the cache shares by shape or fingerprint, each text's answer is that text's own."""
    cache = ClassificationCache()
    for template, a, b in statements:
        text = template.format(a, b)
        assert astuple(cache.classify_bytes(text.encode())) == astuple(classify(text)), text


def test_cache_is_bounded() -> None:
    cache = ClassificationCache(size=5)
    for i in range(50):
        cache.classify(f"SELECT {i} FROM t{i}")
    assert len(cache._by_text) <= 5
    assert len(cache._by_fingerprint) <= 5


@pytest.mark.parametrize(
    ("first", "begins"),
    [
        ("BEGIN", TX_BEGIN),
        ("BEGIN READ WRITE", TX_BEGIN),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", TX_BEGIN),
        ("BEGIN READ ONLY", TX_BEGIN_READ_ONLY),
        ("SELECT 1", None),
    ],
)
def test_a_batch_that_opens_a_transaction_says_how(first: str, begins: str | None) -> None:
    """Parse/Bind/Execute of BEGIN then a SELECT before one Sync (pipelining drivers): the merged unit
    opens a transaction, like the query string "BEGIN; SELECT ...", so the router puts a read-write one on
    a primary."""
    unit = merge([classify(first), classify("SELECT * FROM t WHERE id = 1")])
    assert unit.begins == begins
    assert unit.tx is None
    assert unit.begins == classify(f"{first}; SELECT * FROM t WHERE id = 1").begins


@pytest.mark.parametrize(
    ("sql", "tx"),
    [
        ("COMMIT", TX_COMMIT),
        ("END", TX_COMMIT),
        ("COMMIT AND NO CHAIN", TX_COMMIT),
        ("ROLLBACK", TX_ROLLBACK),
        ("ABORT", TX_ROLLBACK),
        ("COMMIT AND CHAIN", None),
        ("END AND CHAIN", None),
        ("ROLLBACK AND CHAIN", None),
    ],
)
def test_and_chain_is_not_the_end_of_a_transaction(sql: str, tx: str | None) -> None:
    """AND CHAIN opens the next transaction at once: not an end the proxy may answer or act on."""
    assert classify(sql).tx == tx
