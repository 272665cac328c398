"""Parts of the process object with a state of their own: PAUSE/RESUME and the writes main took for a down
role (proxy/pause.py, proxy/fallback_writes.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.config.values import ROLES
from proxy.fallback_writes import FallbackWrites
from proxy.pause import Pauses


def test_resume_of_one_role_after_pause_of_all_leaves_the_others_paused() -> None:
    pauses = Pauses()
    assert not pauses.is_paused("main")
    pauses.pause(None)
    assert all(pauses.is_paused(role) for role in ROLES)
    pauses.resume("analytics")
    assert not pauses.is_paused("analytics")
    assert pauses.is_paused("main")
    pauses.resume(None)
    assert not any(pauses.is_paused(role) for role in ROLES)


def test_a_waiter_goes_on_when_its_role_is_resumed_not_before() -> None:
    async def scenario() -> None:
        pauses = Pauses()
        pauses.pause("analytics")
        pauses.pause("main")
        waiter = asyncio.create_task(pauses.wait_resumed("analytics"))
        await asyncio.sleep(0)
        pauses.resume("main")  # another role: the waiter looks again and keeps waiting
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiter.done()
        pauses.resume("analytics")
        await asyncio.wait_for(waiter, 5)

    asyncio.run(scenario())


def test_fallback_writes_log_once_per_table_per_outage_and_sum_up(caplog: pytest.LogCaptureFixture) -> None:
    writes = FallbackWrites()
    with caplog.at_level(logging.WARNING, logger="parafort.server"):
        writes.count((("analytics", "user_activity"),))
        writes.count((("analytics", "user_activity"), ("analytics", "business_metrics")))
        started = [r.getMessage() for r in caplog.records if "fallback_writes_started" in r.getMessage()]
        assert len(started) == 2  # one per table, not per write
        caplog.clear()
        writes.outage_over("analytics", "role is up again")
        summary = sorted(r.getMessage() for r in caplog.records)
        assert len(summary) == 2
        assert "table=user_activity writes=2" in summary[1]
        caplog.clear()
        writes.outage_over("analytics", "role is up again")  # nothing left of that outage
        writes.count((("analytics", "user_activity"),))  # a new outage: logged again
        writes.close()
        lines = [r.getMessage() for r in caplog.records]
    assert [("started" in line, "proxy stopping" in line) for line in lines] == [(True, False), (False, True)]
    assert writes.totals == {("analytics", "user_activity"): 3, ("analytics", "business_metrics"): 1}
