"""The cutover hold (proxy/migration/hold.py) and the notices between instances (notices.py), without
sockets."""

from __future__ import annotations

import asyncio

import pytest

from proxy.migration.hold import MigrationHold
from proxy.migration.notices import Notice, decode


def test_holds_names_the_first_held_domain_and_nothing_when_idle() -> None:
    hold = MigrationHold()
    assert not hold.roles and hold.holds(("main", "analytics")) is None
    hold.hold("analytics")
    assert hold.roles and hold.holds(("main", "analytics")) == "analytics"
    assert hold.holds(("main", "documents")) is None
    hold.release("analytics")
    assert not hold.roles
    hold.release("analytics")  # twice: harmless


def test_units_wait_until_released_and_are_counted() -> None:
    async def scenario() -> None:
        hold = MigrationHold()
        hold.hold("analytics")
        waiter = asyncio.ensure_future(hold.wait(("analytics",)))
        other = asyncio.ensure_future(hold.wait(("main",)))  # not held: does not wait
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert other.done() and not waiter.done()
        assert hold.waiting == {"analytics": 1}
        hold.release("analytics")
        await asyncio.wait_for(waiter, 5)
        assert hold.waiting == {"analytics": 0} and hold.held_total == {"analytics": 1}

    asyncio.run(scenario())


def test_a_unit_on_two_held_roles_waits_for_both() -> None:
    async def scenario() -> None:
        hold = MigrationHold()
        hold.hold("analytics")
        hold.hold("documents")
        waiter = asyncio.ensure_future(hold.wait(("analytics", "documents")))
        await asyncio.sleep(0)
        hold.release("analytics")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not waiter.done() and hold.waiting.get("documents") == 1
        hold.release("documents")
        await asyncio.wait_for(waiter, 5)
        assert hold.held_total == {"analytics": 1}  # counted once, under the first role it waited for

    asyncio.run(scenario())


def test_held_releases_on_error() -> None:
    hold = MigrationHold()
    with pytest.raises(RuntimeError), hold.held("compliance"):
        assert hold.roles == {"compliance"}
        raise RuntimeError("switch failed")
    assert not hold.roles


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("hold analytics 40 abc123", Notice("hold", "analytics", 40.0, "abc123")),
        ("changed documents 0 x", Notice("changed", "documents", 0.0, "x")),
        ("release compliance 0 x", Notice("release", "compliance", 0.0, "x")),
        ("hold main 40 x", None),  # main never moves
        ("hold analytics nan x", None),
        ("hold analytics -1 x", None),
        ("hold analytics inf x", None),
        ("drop analytics 0 x", None),
        ("hold analytics 40", None),
        ("", None),
        ("hold  analytics 40 x", None),
    ],
)
def test_notices_decode_only_what_the_proxy_sends(payload: str, expected: Notice | None) -> None:
    assert decode(payload) == expected
    if expected is not None:
        assert decode(expected.encode()) == expected
