"""Shadow reads without sockets (proxy/migration/shadow.py): the order-insensitive digest, the outcome of a
round and its confirmation, what the data path copies out of a unit, what cannot be replayed, sampling and
the bounded queue."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import struct
from dataclasses import dataclass

import pytest

from proxy.config import Config, load_config
from proxy.migration import shadow
from proxy.migration.shadow import (
    DIVERGED,
    DROPPED,
    INCONCLUSIVE,
    MATCH,
    SKIPPED,
    Result,
    Sample,
    Shadow,
    Unreplayable,
    binary_text,
    check_replayable,
    confirm,
    digest_of,
    judge,
    literals,
    sample_of,
)
from proxy.migration.state import Migration, State
from proxy.protocol import messages as m
from proxy.protocol.framing import scan_messages

ENV = {
    "DATABASE_URL": "postgresql://app:main-secret@db-main:5432/parafort_main",
    "ANALYTICS_DATABASE_URL": "postgresql://app:an-secret@db-an:5433/parafort_analytics",
}


@dataclass
class Stmt:
    sql: str
    param_oids: tuple[int, ...] = ()


def unit(data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
    msgs, _ = scan_messages(data, 0, 1 << 20)
    return data, msgs


def bind(statement: str, params: list[bytes | None], formats: tuple[int, ...] = ()) -> bytes:
    rest = struct.pack("!h", len(formats)) + (struct.pack(f"!{len(formats)}h", *formats) if formats else b"")
    rest += struct.pack("!h", len(params))
    for p in params:
        rest += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    rest += struct.pack("!h", 0)
    return m.bind_raw("", statement, rest)


def execute() -> bytes:
    return b"E" + struct.pack("!i", 9) + b"\x00" + struct.pack("!i", 0)


# -- the digest and the outcome ---------------------------------------------------------------------------
def test_digest_ignores_order_and_counts_duplicates() -> None:
    rows = [(1, "a"), (2, "b"), (2, "b"), (3, None)]
    first = digest_of(rows)
    assert all(digest_of(p) == first for p in itertools.permutations(rows))
    assert first.rows == 4
    assert digest_of(rows[:3]) != first  # one row fewer
    assert digest_of([(1, "a"), (2, "b"), (3, None), (3, None)]) != first  # a duplicate moved
    assert digest_of([(1, "a"), (2, "b"), (2, "c"), (3, None)]) != first  # one value changed
    assert digest_of([("1", "a"), (2, "b"), (2, "b"), (3, None)]) != first  # same text, another type
    assert digest_of([]) == Result(0, 0)


def test_judge_and_confirm() -> None:
    a, b = Result(2, 10), Result(2, 11)
    assert judge(a, a, a) == MATCH
    assert judge(a, b, a) == DIVERGED
    assert judge(a, a, b) == INCONCLUSIVE  # main changed during the round
    assert judge(a, b, b) == INCONCLUSIVE
    assert confirm(MATCH, DIVERGED) == MATCH  # the second round only confirms a difference
    assert confirm(DIVERGED, DIVERGED) == DIVERGED
    assert confirm(DIVERGED, MATCH) == INCONCLUSIVE
    assert confirm(DIVERGED, INCONCLUSIVE) == INCONCLUSIVE
    assert confirm(INCONCLUSIVE, DIVERGED) == INCONCLUSIVE


# -- what the data path copies ---------------------------------------------------------------------------
def test_a_simple_query_is_copied_as_text() -> None:
    buf, msgs = unit(m.query("SELECT * FROM user_activity WHERE id = 7"))
    assert sample_of("analytics", buf, msgs, {}) == Sample(
        "analytics", "SELECT * FROM user_activity WHERE id = 7"
    )


def test_an_extended_unit_with_text_parameters_is_copied_with_them() -> None:
    sql = "SELECT * FROM user_activity WHERE user_id = $1 AND action = $2"
    data = m.parse("", sql, (23,)) + bind("", [b"7", None]) + execute() + m.sync()
    found = sample_of("analytics", *unit(data), {})
    assert found == Sample("analytics", sql, (23,), (b"7", None), (False, False))
    assert literals(found, ["integer", "text"]) == ["'7'", "NULL"]
    # one format code for all
    data = m.parse("s1", sql, ()) + bind("s1", [b"7", b"x'y"], (0,)) + execute() + m.sync()
    found = sample_of("analytics", *unit(data), {})
    assert found is not None and literals(found, ["integer", "text"]) == ["'7'", "'x''y'"]
    data = m.parse("", sql, ()) + bind("", [b"\x00\x00\x00\x07", b"x"], (1, 0)) + execute() + m.sync()
    found = sample_of("analytics", *unit(data), {})
    assert found is not None and found.binary == (True, False)
    assert literals(found, ["integer", "text"]) == ["'7'", "'x'"]


def test_a_named_statement_prepared_earlier_is_found_in_the_session() -> None:
    data = bind("s1", [b"3"]) + execute() + m.sync()
    statements = {"s1": Stmt("SELECT * FROM user_activity WHERE user_id = $1", (20,))}
    found = sample_of("analytics", *unit(data), statements)
    assert found is not None
    assert (found.sql, found.param_oids, found.params) == (statements["s1"].sql, (20,), (b"3",))
    assert sample_of("analytics", *unit(m.parse("", "SELECT 1", ()) + m.sync()), {}) is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (bind("", [b"1"]) + execute() + m.sync(), "not in the unit"),  # the cached unnamed statement
        (bind("gone", [b"1"]) + execute() + m.sync(), "not in the unit"),
        (
            m.parse("", "SELECT 1", ()) + bind("", []) + execute() + bind("", []) + execute() + m.sync(),
            "several",
        ),
        (m.parse("", "SELECT $1", ()) + bind("", [b"1"], (0, 0)) + execute() + m.sync(), "malformed"),
    ],
)
def test_units_that_cannot_be_replayed_faithfully(data: bytes, why: str) -> None:
    with pytest.raises(Unreplayable, match=why):
        sample_of("analytics", *unit(data), {})


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("SELECT * FROM user_activity LIMIT 5", "LIMIT"),
        ("SELECT * FROM user_activity OFFSET 5", "LIMIT"),
        ("SELECT * FROM (SELECT id FROM user_activity LIMIT 5) s ORDER BY id", "LIMIT"),
        ("SELECT 1; SELECT 2", "several"),
        ("SELEC 1", "not parsable"),
    ],
)
def test_reads_whose_rows_depend_on_physical_order_are_not_replayed(sql: str, why: str) -> None:
    with pytest.raises(Unreplayable, match=why):
        check_replayable(sql)


def test_replayable_reads() -> None:
    check_replayable("SELECT * FROM user_activity ORDER BY id LIMIT 5")
    check_replayable("SELECT count(*) FROM user_activity WHERE user_id = $1")


def test_text_parameters_that_are_not_utf8_are_not_replayed() -> None:
    with pytest.raises(Unreplayable, match="UTF-8"):
        literals(Sample("analytics", "SELECT $1", (), (b"\xff",), (False,)), ["text"])
    with pytest.raises(Unreplayable, match="NUL"):
        literals(Sample("analytics", "SELECT $1", (), (b"a\x00",), (True,)), ["text"])


@pytest.mark.parametrize(
    ("type_name", "data", "text"),
    [
        ("smallint", struct.pack("!h", -3), "-3"),
        ("integer", struct.pack("!i", 7), "7"),
        ("bigint", struct.pack("!q", 1 << 40), str(1 << 40)),
        ("double precision", struct.pack("!d", 0.1), "0.1"),
        ("real", struct.pack("!f", float("inf")), "Infinity"),
        ("boolean", b"\x01", "t"),
        ("text", "zoë".encode(), "zoë"),
        ("character varying", b"abc", "abc"),
        ("jsonb", b'\x01{"a": 1}', '{"a": 1}'),
        ("bytea", b"\x00\xff", "\\x00ff"),
        ("uuid", bytes(range(16)), "00010203-0405-0607-0809-0a0b0c0d0e0f"),
        ("date", struct.pack("!i", 366), "2001-01-01"),
        ("timestamp without time zone", struct.pack("!q", 86_400_000_001), "2000-01-02 00:00:00.000001"),
        ("timestamp with time zone", struct.pack("!q", 0), "2000-01-01 00:00:00+00"),
        # numeric 12345.678 (dscale 3): digits 1, 2345, 6780 with weight 1
        ("numeric", struct.pack("!hhHh3h", 3, 1, 0, 3, 1, 2345, 6780), "12345.678"),
        ("numeric", struct.pack("!hhHh1h", 1, -1, 0x4000, 2, 5000), "-0.50"),
        ("numeric", struct.pack("!hhHh", 0, 0, 0, 0), "0"),
        ("numeric", struct.pack("!hhHh", 0, 0, 0xC000, 0), "NaN"),
    ],
)
def test_binary_parameters_as_text(type_name: str, data: bytes, text: str) -> None:
    assert binary_text(type_name, data) == text


def test_binary_parameters_of_other_types_are_not_replayed() -> None:
    with pytest.raises(Unreplayable, match="binary parameters of type point"):
        binary_text("point", b"\x00" * 16)
    with pytest.raises(Unreplayable, match="malformed"):
        binary_text("integer", b"\x00")


def test_describe_shows_no_literals() -> None:
    fingerprint, text = shadow.describe(
        "SELECT * FROM user_activity WHERE action = 'secret-value' AND id = 42"
    )
    assert "secret-value" not in text and "42" not in text
    assert text == "SELECT * FROM user_activity WHERE action = $1 AND id = $2"
    assert fingerprint == shadow.describe("SELECT * FROM user_activity WHERE action = 'x' AND id = 1")[0]


# -- sampling and the queue --------------------------------------------------------------------------------
def streaming(role: str) -> dict[str, Migration]:
    now = dt.datetime.now(dt.UTC)
    return {role: Migration(role, State.STREAMING, now, now)}


def test_offer_samples_the_configured_share_into_a_bounded_queue() -> None:
    async def run() -> None:
        config = load_config(None, ENV)
        share = {"value": 1.0}

        def current() -> Config:
            return config.model_copy(
                update={"migration": config.migration.model_copy(update={"shadow_sample": share["value"]})}
            )

        found = Shadow(current)
        read = unit(m.query("SELECT * FROM user_activity"))
        assert not found.active
        found.follow({"analytics": Migration("analytics", State.COPYING, *[dt.datetime.now(dt.UTC)] * 2)})
        assert not found.active  # only streaming roles are shadowed
        found.follow(streaming("analytics"))
        assert found.active and found.streaming == {"analytics"}
        found.offer(("main",), *read, {})  # not the streaming role's tables
        found.offer(("analytics", "main"), *read, {})  # tables of two roles: cannot run on the target
        assert not found._queue
        for _ in range(5):  # one statement: one sample waits at a time, the others are dropped
            found.offer(("analytics",), *read, {})
        assert [s.sql for s in found._queue] == ["SELECT * FROM user_activity"]
        assert found.counts == {("analytics", DROPPED): 4}
        for i in range(shadow.QUEUE_SIZE + 2):  # distinct statements: up to the bound
            found.offer(("analytics",), *unit(m.query(f"SELECT {i} FROM user_activity")), {})
        assert len(found._queue) == shadow.QUEUE_SIZE
        assert found.counts == {("analytics", DROPPED): 4 + 3}
        found.follow({})  # not streaming: the queue is emptied...
        found.follow(streaming("analytics"))
        found.offer(("analytics",), *read, {})  # ...and the statement can wait again
        assert len(found._queue) == 1
        found.follow({})
        found.follow(streaming("analytics"))
        share["value"] = 0.0  # a reload: nothing is sampled
        for _ in range(50):
            found.offer(("analytics",), *read, {})
        assert not found._queue
        share["value"] = 1.0
        several = m.query("SELECT 1") + m.query("SELECT 2")  # not one unit: cannot be replayed as one
        found.offer(("analytics",), *unit(several), {})
        assert found.counts[("analytics", SKIPPED)] == 1
        assert found.skips == {("analytics", "several statements"): 1}
        assert found.divergences("analytics") == 0 and found.divergences("documents") is None
        found.follow({})
        assert not found.active and not found._queue

    asyncio.run(run())


def test_a_statement_taken_from_the_queue_can_be_sampled_again() -> None:
    async def run() -> None:
        config = load_config(None, ENV)
        config = config.model_copy(
            update={"migration": config.migration.model_copy(update={"shadow_sample": 1.0})}
        )
        found = Shadow(lambda: config)
        taken: list[str] = []
        done = asyncio.Event()

        async def process(sample: Sample) -> str:
            taken.append(sample.sql)
            done.set()
            return MATCH

        found.process = process  # type: ignore[method-assign]
        found.follow(streaming("analytics"))
        found.start()
        try:
            for _ in range(2):
                done.clear()
                found.offer(("analytics",), *unit(m.query("SELECT count(*) FROM user_activity")), {})
                await asyncio.wait_for(done.wait(), 5.0)
        finally:
            await found.stop()
        assert taken == ["SELECT count(*) FROM user_activity"] * 2
        assert not found._queued and DROPPED not in {o for _, o in found.counts}

    asyncio.run(run())


def test_a_role_without_url_is_never_shadowed() -> None:
    config = load_config(None, {"DATABASE_URL": ENV["DATABASE_URL"]})
    found = Shadow(lambda: config)
    found.follow(streaming("analytics"))
    assert not found.active


def test_fingerprints_are_capped() -> None:
    config = load_config(None, ENV)
    found = Shadow(lambda: config)
    for i in range(shadow.MAX_FINGERPRINTS + 5):
        found._record("analytics", f"fp{i}", f"SELECT {i}", DIVERGED, None)
    assert len(found.stats) == shadow.MAX_FINGERPRINTS + 1
    assert found.stats[("analytics", shadow.OTHER)].outcomes == {DIVERGED: 5}
