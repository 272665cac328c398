"""Read-your-writes without servers: positions, tokens per scope, main's identity, and the routing verdict."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from proxy.config.model import ReadYourWritesConfig
from proxy.consistency import Consistency
from proxy.frontend.ryw import (
    Writes,
    decode_row,
    format_lsn,
    min_lsn_statement,
    parse_min_lsn,
)
from proxy.health import parse_lsn
from proxy.protocol import messages as m

USER = ("user", "app")
OTHER = ("user", "other")
IDENTITY = ("7000000000000000001", "00000001", "2026-12-06 22:00:00+00")


def test_lsn_text_round_trips() -> None:
    for text in ("0/0", "0/3000060", "16/B374D848", "FFFFFFFF/FFFFFFFF"):
        lsn = parse_lsn(text)
        assert lsn is not None
        assert format_lsn(lsn) == text
    assert parse_min_lsn(" 0/10 ") == 16
    for bad in ("", "10", "x/1", "0/", "1/2/3", "100000000/0"):
        with pytest.raises(ValueError):
            parse_min_lsn(bad)


def test_data_row_columns() -> None:
    payload = m.data_row(["0/3000060", None, "1"])[5:]
    assert decode_row(payload) == ["0/3000060", None, "1"]


def test_min_lsn_statements() -> None:
    assert min_lsn_statement("SET parafort.min_lsn = '0/3000060'") == ("SET", "0/3000060")
    assert min_lsn_statement("set PARAFORT.MIN_LSN to '1/2'") == ("SET", "1/2")
    assert min_lsn_statement("RESET parafort.min_lsn") == ("RESET", None)
    assert min_lsn_statement("SET parafort.min_lsn TO DEFAULT") == ("SET", None)
    assert min_lsn_statement("SET search_path = public") is None
    assert min_lsn_statement("SET parafort.min_lsn = '0/1'; SELECT 1") is None
    assert min_lsn_statement("SET parafort.min_lsn =") is None


def test_config_scope_and_max_wait() -> None:
    assert ReadYourWritesConfig().scope == "user"
    assert ReadYourWritesConfig().max_wait == pytest.approx(0.010)
    assert ReadYourWritesConfig(max_wait="0").max_wait == 0  # type: ignore[arg-type]
    assert ReadYourWritesConfig(max_wait="250ms").max_wait == pytest.approx(0.25)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ReadYourWritesConfig(scope="session")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ReadYourWritesConfig(max_wait="-1s")  # type: ignore[arg-type]


def test_tokens_advance_per_scope_and_pending_ends() -> None:
    writes = Writes()
    writes.begin(USER)
    assert USER in writes.pending
    writes.end(USER, 100, IDENTITY)
    assert USER not in writes.pending
    writes.begin(USER)
    writes.begin(USER)
    writes.end(USER, 300, IDENTITY)
    writes.end(USER, 200, IDENTITY)  # replies of two connections arrive out of order: the token stays
    assert writes.tokens == {USER: 300}
    writes.begin(OTHER)
    writes.end(OTHER, 150, IDENTITY)
    writes.drop_reached(200)
    assert writes.tokens == {USER: 300}


def test_a_failed_capture_puts_the_scope_in_doubt() -> None:
    writes = Writes()
    writes.begin(USER)
    writes.end(USER, None, None)
    assert writes.in_doubt(USER)
    assert USER not in writes.tokens
    writes.begin(USER)
    writes.end(USER, 500, IDENTITY)  # the next captured write clears the doubt
    assert not writes.in_doubt(USER)


def test_a_new_main_puts_every_older_token_in_doubt() -> None:
    writes = Writes()
    writes.begin(USER)
    writes.end(USER, 1000, IDENTITY)
    writes.begin(OTHER)
    writes.end(OTHER, 900, (IDENTITY[0], "00000002", IDENTITY[2]))  # promoted: a new timeline
    assert writes.identity_changes == 1
    assert writes.in_doubt(USER)
    assert writes.tokens == {OTHER: 900}


def consistency(replay: dict[str, int], max_wait: float = 0.010) -> Consistency:
    c = Consistency(
        ReadYourWritesConfig(max_wait=max_wait),
        lambda: ["r1", "r2"],
        lambda label: True,
        lambda label: 0,
        {},
    )
    for label, lsn in replay.items():
        c.observe(label, lsn)
    return c


def test_verdicts() -> None:
    c = consistency({"r1": 100, "r2": 300})
    assert c.check(USER, None).label is None  # no token: any replica
    c.writes.begin(USER)
    assert c.check(USER, None).wait  # its capture is pending
    c.writes.end(USER, 200, IDENTITY)
    assert c.check(USER, None).label == "r2"  # the replica that has replayed it
    assert c.check(OTHER, 250).label == "r2"  # parafort.min_lsn
    verdict = c.check(USER, 301)
    assert verdict.main  # ahead of every position main is known to have reached
    assert "ahead of main" in verdict.reason
    c.writes.begin(USER)
    c.writes.end(USER, 400, IDENTITY)
    assert c.check(USER, None).wait  # main has it; a replica may catch up within max_wait
    none = consistency({"r1": 100}, max_wait=0)
    none.writes.begin(USER)
    none.writes.end(USER, 200, IDENTITY)
    verdict = none.check(USER, None)
    assert verdict.main
    assert "r1 behind token 0/C8 by 100 bytes" in verdict.reason


def test_a_wait_ends_when_a_replica_catches_up_or_at_max_wait() -> None:
    async def scenario() -> None:
        c = consistency({"r1": 100, "r2": 100}, max_wait=5.0)
        c._pollers["r1"] = c._pollers["r2"] = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        c.writes.begin(USER)
        c.writes.end(USER, 200, IDENTITY)
        waiting = asyncio.ensure_future(c.wait(USER, None))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        c.observe("r2", 250)
        assert (await waiting).label == "r2"
        short = consistency({"r1": 100}, max_wait=0.02)
        short._pollers["r1"] = short._pollers["r2"] = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        short.writes.begin(USER)
        short.writes.end(USER, 200, IDENTITY)
        verdict = await short.wait(USER, None)
        assert verdict.main
        assert "behind token" in verdict.reason

    asyncio.run(scenario())


def test_after_a_timed_out_wait_reads_go_to_main_without_waiting() -> None:
    """A write-heavy scope whose replica stays more than max_wait behind pays max_wait once per
    FUTILE_WAIT_WINDOW, not on every read; a read whose token a replica has reached still goes there."""

    async def scenario() -> None:
        c = consistency({"r1": 100, "r2": 100}, max_wait=0.02)
        c._pollers["r1"] = c._pollers["r2"] = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        c.writes.begin(USER)
        c.writes.end(USER, 200, IDENTITY)
        assert c.check(USER, None).wait  # nothing timed out yet: the read may wait
        assert (await c.wait(USER, None)).main  # the replica never got there
        verdict = c.check(USER, None)
        assert verdict.main and not verdict.wait  # within the window: main at once
        assert "timed out" in verdict.reason
        c.writes.begin(USER)
        assert c.check(USER, None).main  # a capture pending: main has the write, no need to wait for it
        c.writes.end(USER, 300, IDENTITY)
        assert c.check(OTHER, 100).label in ("r1", "r2")  # reached: still served by a replica
        c._no_wait_until = 0.0  # the window is over
        assert c.check(USER, None).wait

    asyncio.run(scenario())


def test_tokens_all_replicas_passed_are_dropped() -> None:
    c = consistency({})
    c.writes.begin(USER)
    c.writes.end(USER, 200, IDENTITY)
    c.observe("r1", 300, sweep=True)
    assert c.writes.tokens  # r2's position is unknown
    c.observe("r2", 250, sweep=True)
    assert not c.writes.tokens
