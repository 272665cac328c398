"""Read-your-writes, the read side: which replica may serve a read, given the tokens it must see.

A read of main's tables that the router sends to a replica needs the scope's token (proxy/frontend/ryw.py)
and the connection's own ``parafort.min_lsn``, whichever is higher. A replica whose replay position is at
or past it serves the read at once (outcome ``replica``). Otherwise the read waits up to ``max_wait`` for
one to catch up (``replica_after_wait``), then main serves it (``main_for_consistency``). A scope with a
capture pending waits for it first; a scope in doubt (failed capture, main changed) reads from main.

Replay positions come from the health probes and, while at least one read waits, from a dedicated
connection per replica polled every ``POLL_INTERVAL`` (opened on the first wait, kept for later ones).
When no read waits, nothing is polled. A token every replica has passed is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config.dsn import Dsn
from proxy.config.model import ReadYourWritesConfig
from proxy.frontend.ryw import Writes, format_lsn
from proxy.health import connect, parse_lsn

log = logging.getLogger("parafort.consistency")

POLL_INTERVAL = 0.002
POLL_SQL = "SELECT pg_last_wal_replay_lsn()::text"
REPLICA = "replica"
AFTER_WAIT = "replica_after_wait"
FUTILE_SUFFIX = " (a recent wait for it timed out: not waiting)"
FUTILE_REASON = "read-your-writes: the last write's position is not known yet" + FUTILE_SUFFIX
# After a read's wait for a replica timed out, reads that would wait go to main at once for this long: a
# replica more than max_wait behind is likely to stay so for a moment, and main always has the write (a
# write-heavy scope would otherwise pay max_wait on every read).
FUTILE_WAIT_WINDOW = 0.5
MAIN_FOR_CONSISTENCY = "main_for_consistency"
OUTCOMES = (REPLICA, AFTER_WAIT, MAIN_FOR_CONSISTENCY)
WAIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RECENT = 20  # reasons of the latest reads sent to main, for SHOW CONSISTENCY
IN_DOUBT = "read-your-writes: the position of this scope's last write is unknown"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a read may go: ``label`` a replica (None: any, as the pool chooses), or main (``main``
    with ``reason``), or it must wait (``wait``: the position it needs, None when only a capture is
    pending)."""

    label: str | None = None
    main: bool = False
    reason: str = ""
    wait: bool = False
    need: int | None = None


ANY_REPLICA = Verdict()


class Consistency:
    """Decides replica reads against tokens; polls replay positions while reads wait."""

    def __init__(
        self,
        settings: ReadYourWritesConfig,
        replicas: Callable[[], list[str]],
        usable: Callable[[str], bool],
        active: Callable[[str], int],
        dsns: dict[str, Dsn],
    ) -> None:
        self.settings = settings
        self.writes = Writes()
        self._replicas = replicas
        self._usable = usable
        self._active = active
        self._dsns = dsns
        self.replay: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.wait_count = 0
        self.recent: deque[tuple[float, str, str]] = deque(maxlen=RECENT)  # (time, scope, reason)
        self._waiters: list[tuple[int, asyncio.Future[str]]] = []
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._conns: dict[str, Any] = {}
        self._no_wait_until = 0.0  # time.monotonic() until which reads that would wait go to main at once

    @property
    def enabled(self) -> bool:
        return self.settings.scope != "off"

    # -- replay positions ---------------------------------------------------------------------------------
    def observe(self, label: str, lsn: int | None, *, sweep: bool = False) -> None:
        """A replica's replay position, from a health probe (``sweep``: also drop tokens all have passed)
        or the poller."""
        if lsn is None:
            return
        if lsn > self.replay.get(label, -1):
            self.replay[label] = lsn
        if self._waiters:
            self._wake(label, lsn)
        if sweep and self.writes.tokens:
            labels = self._replicas()
            if labels and all(lb in self.replay for lb in labels):
                self.writes.drop_reached(min(self.replay[lb] for lb in labels))

    def _wake(self, label: str, lsn: int) -> None:
        if not self._usable(label):
            return
        keep = []
        for need, fut in self._waiters:
            if fut.done():
                continue
            if need <= lsn:
                fut.set_result(label)
            else:
                keep.append((need, fut))
        self._waiters = keep

    # -- decisions ------------------------------------------------------------------------------------------
    def need(self, key: tuple[object, ...] | None, min_lsn: int | None) -> int | None:
        token = self.writes.tokens.get(key) if key is not None else None
        if min_lsn is not None and (token is None or min_lsn > token):
            return min_lsn
        return token

    def check(self, key: tuple[object, ...] | None, min_lsn: int | None) -> Verdict:
        """The decision that needs no waiting, if there is one."""
        writes = self.writes
        if key is not None:
            if writes.doubt and writes.in_doubt(key):
                return Verdict(main=True, reason=IN_DOUBT)
            if key in writes.pending:
                if self._waits_futile():
                    return Verdict(main=True, reason=FUTILE_REASON)
                return Verdict(wait=True)
        need = self.need(key, min_lsn)
        if need is None:
            return ANY_REPLICA
        return self._replica_for(need)

    def _replica_for(self, need: int) -> Verdict:
        best: str | None = None
        behind: list[tuple[str, int | None]] = []
        for label in self._replicas():
            if not self._usable(label):
                continue
            replayed = self.replay.get(label)
            if replayed is not None and replayed >= need:
                if best is None or self._active(label) < self._active(best):
                    best = label
            else:
                behind.append((label, replayed))
        if best is not None:
            return Verdict(label=best)
        if not behind:
            return Verdict(main=True, reason="read-your-writes: no replica usable")
        high = self.writes.high
        if self.writes.identity is not None and high and need > high:
            return Verdict(
                main=True,
                reason=f"read-your-writes: position {format_lsn(need)} is ahead of main's {format_lsn(high)}",
            )
        if self.settings.max_wait <= 0:
            return Verdict(main=True, reason=self._behind(need, behind))
        if self._waits_futile():
            return Verdict(main=True, reason=self._behind(need, behind) + FUTILE_SUFFIX)
        return Verdict(wait=True, need=need)

    def _waits_futile(self) -> bool:
        """A wait for a replica timed out less than FUTILE_WAIT_WINDOW ago: do not wait now."""
        return time.monotonic() < self._no_wait_until

    @staticmethod
    def _behind(need: int, behind: list[tuple[str, int | None]]) -> str:
        parts = [
            f"{label} behind token {format_lsn(need)} by "
            + ("an unknown number of bytes" if replayed is None else f"{need - replayed} bytes")
            for label, replayed in behind
        ]
        return "read-your-writes: replica " + "; ".join(parts)

    async def wait(self, key: tuple[object, ...] | None, min_lsn: int | None) -> Verdict:
        """Wait (at most ``max_wait`` in all) for the scope's pending capture, then for a replica."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_wait
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    verdict = self.check(key, min_lsn)
                    if not verdict.wait:
                        return verdict
                    if verdict.need is None:
                        assert key is not None  # only a scope has captures pending
                        await asyncio.shield(self.writes.pending_done(key))
                        continue
                    label = await self._until(verdict.need)
                    return Verdict(label=label)
        except TimeoutError:
            verdict = self.check(key, min_lsn)
            if verdict.wait and verdict.need is not None:
                self._no_wait_until = time.monotonic() + FUTILE_WAIT_WINDOW
            if verdict.wait:
                if verdict.need is None:
                    return Verdict(
                        main=True, reason="read-your-writes: the last write's position is not known yet"
                    )
                return Verdict(main=True, reason=self._behind(verdict.need, self._behind_now(verdict.need)))
            return verdict

    def _behind_now(self, need: int) -> list[tuple[str, int | None]]:
        return [(lb, self.replay.get(lb)) for lb in self._replicas() if self._usable(lb)]

    async def _until(self, need: int) -> str:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append((need, fut))
        for label in self._replicas():
            if self._usable(label) and label not in self._pollers:
                self._pollers[label] = asyncio.get_running_loop().create_task(self._poll(label))
        try:
            return await fut
        finally:
            if not fut.done():
                fut.cancel()
            self._waiters = [(n, f) for n, f in self._waiters if f is not fut]

    async def _poll(self, label: str) -> None:
        """Read the replica's replay position every POLL_INTERVAL while some read waits."""
        try:
            while any(not f.done() for _, f in self._waiters):
                conn = self._conns.get(label)
                if conn is None or conn.is_closed():
                    conn = self._conns[label] = await connect(self._dsns[label], 2, "ryw")
                self.observe(label, parse_lsn(await conn.fetchval(POLL_SQL)))
                await asyncio.sleep(POLL_INTERVAL)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("event=ryw_poll_failed upstream=%s error=%s", label, type(exc).__name__)
            conn = self._conns.pop(label, None)
            if conn is not None:
                conn.terminate()
        finally:
            self._pollers.pop(label, None)

    # -- accounting -----------------------------------------------------------------------------------------
    def count(self, outcome: str, scope: str = "", reason: str = "") -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == MAIN_FOR_CONSISTENCY:
            self.recent.append((time.time(), scope, reason))
            log.debug("event=read_to_main scope=%s reason=%r", scope, reason)

    def waited(self, seconds: float) -> None:
        self.wait_sum += seconds
        self.wait_count += 1
        self.wait_buckets[bisect_left(WAIT_BUCKETS, seconds)] += 1  # the first bound >= seconds, else +Inf

    async def stop(self) -> None:
        for task in list(self._pollers.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for conn in self._conns.values():
            conn.terminate()
        self._conns.clear()


__all__ = ["MAIN_FOR_CONSISTENCY", "OUTCOMES", "Consistency", "Verdict"]
