"""One client's read-your-writes, the read side: its scope, the WAL position its reads need
(``parafort.min_lsn``), whether a write on main awaits its capture, and where a read the router sends to a
replica may run (proxy/consistency.py decides against the scope's tokens; proxy/frontend/ryw.py captures).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Generic, TypeVar

from proxy.consistency import AFTER_WAIT, MAIN_FOR_CONSISTENCY, REPLICA, Consistency, Verdict
from proxy.errors import INVALID_PARAMETER_VALUE, ProxyError
from proxy.frontend.ryw import MIN_LSN, min_lsn_statement, parse_min_lsn
from proxy.protocol import messages as m
from proxy.router.classify import SessionChange
from proxy.router.policy import MAIN
from proxy.router.policy import REPLICA as REPLICA_ROLE

B = TypeVar("B")
log = logging.getLogger("parafort.client")


class Reads(Generic[B]):
    """See the module docstring. ``B`` is the caller's batch type (held, never looked into)."""

    __slots__ = ("client_id", "forced", "key", "min_lsn", "startup_min_lsn", "wrote")

    def __init__(self, client_id: int) -> None:
        self.client_id = client_id
        self.key: tuple[object, ...] | None = None  # the scope's key (None: read-your-writes off)
        self.min_lsn: int | None = None  # the position this connection's reads need at least
        self.startup_min_lsn: int | None = None  # the startup parameter's: RESET goes back to it
        self.wrote = False  # a write on main ended here: its WAL position is captured when the unit ends
        self.forced: tuple[B, Verdict] | None = None  # a verdict reached after waiting, and for which batch

    def scope_name(self) -> str:
        key = self.key
        if key is None:
            return f"connection {self.client_id} (parafort.min_lsn)"
        return " ".join(str(part) for part in key)

    def route(self, consistency: Consistency, batch: B) -> tuple[str, str | None] | None:
        """A read the router sends to a replica: the replica that has replayed what it must see (its
        pool label; None: any), or main; None when the batch must wait for that (``wait``)."""
        forced = self.forced
        if forced is not None and forced[0] is batch:
            self.forced = None
            verdict, outcome = forced[1], AFTER_WAIT
        else:
            verdict, outcome = consistency.check(self.key, self.min_lsn), REPLICA
            if verdict.wait:
                return None
        if verdict.main:
            consistency.count(MAIN_FOR_CONSISTENCY, self.scope_name(), verdict.reason)
            return MAIN, None
        consistency.count(outcome)
        return REPLICA_ROLE, verdict.label

    def replica_now(self, consistency: Consistency, pool: str) -> bool:
        """The fast path's ``route`` for a read of a client lingering on a replica connection (``pool``: its
        label): True when the read may run there at once, counted as ``route`` counts it; False, with
        nothing counted, for anything else (a wait, main, another replica), which ``route`` then decides."""
        verdict = self.replica_at_once(consistency)
        if verdict is None or verdict.label not in (None, pool):
            return False
        consistency.count(REPLICA)
        return True

    def replica_at_once(self, consistency: Consistency) -> Verdict | None:
        """The fast path's ``route`` for a read of a client holding no connection: the verdict (a replica,
        ``label`` None for any) when it may run on a replica at once, counted by the caller as ``route``
        counts it; None, with nothing counted, for a wait or main (``route`` decides those)."""
        if self.forced is not None:
            return None
        verdict = consistency.check(self.key, self.min_lsn)
        return None if verdict.wait or verdict.main else verdict

    async def wait(self, consistency: Consistency, batch: B) -> None:
        """Wait for what ``batch`` needs; the verdict is ``route``'s when the batch is routed again."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        verdict = await consistency.wait(self.key, self.min_lsn)
        consistency.waited(loop.time() - started)
        self.forced = (batch, verdict)

    def same_replica(self, consistency: Consistency, pool: str) -> bool:
        """A read pipelined behind another on the replica connection held (``pool``: its label): may it
        run there too?"""
        if self.key is None and self.min_lsn is None:
            return True
        verdict = consistency.check(self.key, self.min_lsn)
        return not verdict.main and not verdict.wait and verdict.label in (None, pool)

    @staticmethod
    def min_lsn_command(sql: bytes) -> tuple[str, str | None] | None:
        """SET / RESET parafort.min_lsn in a simple query: (its command tag, the value; None for RESET)."""
        if b"parafort" not in sql.lower():
            return None
        return min_lsn_statement(sql.decode(errors="replace"))

    def set_min_lsn(self, tag: str, value: str | None) -> bytes:
        """Carry out SET / RESET parafort.min_lsn: the reply, before its ReadyForQuery."""
        return self.apply_min_lsn(value) or m.command_complete(tag)

    def apply_min_lsn(self, value: str | None) -> bytes | None:
        """SET (``value``) or RESET (None: back to the startup value) of parafort.min_lsn; an ErrorResponse
        for a value that is not a WAL position (nothing changes then)."""
        if value is None:
            self.min_lsn = self.startup_min_lsn
            return None
        try:
            self.min_lsn = parse_min_lsn(value)
        except ValueError:
            return m.error_from(
                ProxyError(
                    INVALID_PARAMETER_VALUE,
                    f'invalid value for parameter "parafort.min_lsn": "{value}"',
                    hint="A WAL position as PostgreSQL prints one, such as 0/3000060.",
                )
            )
        return None

    def settled(self, changes: Iterable[SessionChange]) -> None:
        """SET / RESET parafort.min_lsn that PostgreSQL ran (as a placeholder setting: a named statement, or
        among other statements) and that took effect: the routing follows it. RESET ALL and DISCARD ALL go
        back to the startup value; a value that is not a WAL position is ignored (PostgreSQL took it)."""
        for change in changes:
            if change.name is None or (change.name == MIN_LSN and change.sql is None):
                self.min_lsn = self.startup_min_lsn
            elif change.name == MIN_LSN and change.sql is not None:
                found = min_lsn_statement(change.sql)
                if found is not None and self.apply_min_lsn(found[1]) is not None:
                    log.warning(
                        "event=min_lsn_ignored client=%s reason=%r",
                        self.client_id,
                        "parafort.min_lsn sent with other statements is not a WAL position",
                    )


__all__ = ["Reads"]
