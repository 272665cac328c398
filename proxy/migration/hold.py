"""The cutover hold in one proxy process: new transactions that touch a migrating role's tables wait while
replication changes direction; every other transaction runs on.

``MigrationHold.hold(role)`` starts holding, ``release(role)`` ends it; the data path asks ``holds`` (one
attribute test while nothing is held) for each new unit it routes (a statement outside a transaction, or
the first of one) and, when it must wait, ``await wait(domains)`` before routing the unit afresh, so that
it goes where the new migration state sends it. A transaction already running goes on: a cutover waits for
it on PostgreSQL's table lock instead (proxy/migration/verbs.py).

The verb that holds always releases (``held`` is a context manager), so a unit never waits longer than the
verb's own bound (``migration.cutover_timeout``, plus the few statements after the switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator

log = logging.getLogger("parafort.migration")


class MigrationHold:
    def __init__(self) -> None:
        self.roles: frozenset[str] = frozenset()  # held now
        self.waiting: dict[str, int] = {}  # units waiting per held role (SHOW MIGRATION, metrics)
        self.held_total: dict[str, int] = {}  # units that waited, per role, since start
        self._released = asyncio.Event()

    def holds(self, domains: Iterable[str]) -> str | None:
        """The first held role among ``domains`` (the domains of a unit's tables), or None."""
        roles = self.roles
        if not roles:
            return None
        return next((d for d in domains if d in roles), None)

    @contextlib.contextmanager
    def held(self, role: str) -> Iterator[None]:
        """Hold ``role``'s new transactions for the duration of the block."""
        self.hold(role)
        try:
            yield
        finally:
            self.release(role)

    def hold(self, role: str) -> None:
        self.roles = self.roles | {role}
        log.warning("event=migration_hold role=%s", role)

    def release(self, role: str) -> None:
        if role not in self.roles:
            return
        self.roles = self.roles - {role}
        log.warning("event=migration_hold_released role=%s waited=%d", role, self.waiting.get(role, 0))
        event, self._released = self._released, asyncio.Event()
        event.set()

    async def wait(self, domains: Iterable[str]) -> None:
        """Wait until no role among ``domains`` is held (counted as waiting under the first held one)."""
        wanted = tuple(domains)
        role = self.holds(wanted)
        if role is not None:
            self.held_total[role] = self.held_total.get(role, 0) + 1
        while role is not None:
            self.waiting[role] = self.waiting.get(role, 0) + 1
            try:
                await self._released.wait()
            finally:
                self.waiting[role] -= 1
            role = self.holds(wanted)
