"""PAUSE and RESUME from the admin console: which roles' new transactions wait, and the wait itself.

A client about to lease a connection for a paused role waits in ``Pauses.wait_resumed`` (reading from it
paused meanwhile); transactions already running go on. ``ProxyApp`` hands these methods to the console and
to client connections as its own (proxy/context.py).
"""

from __future__ import annotations

import asyncio
import logging

from proxy.config.values import ROLES

log = logging.getLogger("parafort.server")  # the lines the process has always logged


class Pauses:
    """The paused roles: a role's name, or ``"*"`` for every role."""

    def __init__(self) -> None:
        self.paused: set[str] = set()
        self._resumed = asyncio.Event()  # set (and replaced) at each RESUME

    def is_paused(self, role: str) -> bool:
        return bool(self.paused) and ("*" in self.paused or role in self.paused)

    def pause(self, role: str | None) -> None:
        """PAUSE [role]: new transactions of ``role`` (None: of every role) wait."""
        self.paused.add(role or "*")
        log.warning("event=paused role=%s", role or "*")

    def resume(self, role: str | None) -> None:
        """RESUME [role]: ``role`` (None: every role) goes on; after PAUSE of every role, RESUME of one
        leaves the others paused."""
        if role is None:
            self.paused.clear()
        elif "*" in self.paused:
            self.paused = set(ROLES) - {role}
        else:
            self.paused.discard(role)
        log.warning("event=resumed role=%s", role or "*")
        event, self._resumed = self._resumed, asyncio.Event()
        event.set()

    async def wait_resumed(self, role: str) -> None:
        while self.is_paused(role):
            await self._resumed.wait()
