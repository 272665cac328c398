"""Main coming back: before a write is refused because main is marked down, one data-path connect.

The health checker marks main up only after ``health.successes_before_up`` probes; a write the router is
about to refuse (25006) first asks ``MainRecheck.reachable``, so writes resume as soon as main accepts
connections. One attempt at a time, shared by every client asking meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy.backend.connection import ServerConnection
from proxy.config.model import HealthConfig
from proxy.errors import ProxyError
from proxy.health import HealthMonitor
from proxy.pool import Pool

log = logging.getLogger("parafort.server")  # the lines the process has always logged


class MainRecheck:
    """One shared connect attempt into main's pool at a time; ``settings`` read at each attempt (reload)."""

    def __init__(
        self, health: HealthMonitor, pool: Pool[ServerConnection], settings: Callable[[], HealthConfig]
    ) -> None:
        self.health = health
        self.pool = pool
        self.settings = settings
        self._attempt: asyncio.Future[bool] | None = None
        self._cooldown_until = 0.0

    async def reachable(self) -> bool:
        """A write is about to be refused because main is marked down: try one data-path connect to main
        first. One attempt at a time, shared by every client asking meanwhile, bounded by
        ``health.timeout``; success marks main up at once (the connection stays idle in main's pool),
        so writes resume as soon as main accepts connections, not after ``successes_before_up``
        probes. After an attempt that timed out (main unreachable, not refusing) writes are refused
        without one until the next probe interval."""
        if self.health.usable("main"):
            return True
        loop = asyncio.get_running_loop()
        attempt = self._attempt
        if attempt is None:
            if loop.time() < self._cooldown_until:
                return False
            attempt = self._attempt = loop.create_task(self._connect())
        return await asyncio.shield(attempt)

    async def _connect(self) -> bool:
        loop = asyncio.get_running_loop()
        settings = self.settings()
        try:
            async with asyncio.timeout(settings.timeout):
                opened = await self.pool.open_idle()
        except TimeoutError:
            self._cooldown_until = loop.time() + self.settings().interval
            return False
        except ProxyError as exc:
            log.debug("event=main_recheck_failed error=%r", exc.message)
            return False
        except Exception:  # never leave the clients waiting on this attempt stuck
            log.exception("event=main_recheck_error")
            return False
        finally:
            self._attempt = None
        if opened:
            self.health.mark_connected("main")
        return self.health.usable("main")
