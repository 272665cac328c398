"""Migration notices between proxy instances: PostgreSQL's LISTEN/NOTIFY on main, channel
``parafort_migration``.

The instance that carries out a cutover (or a rollback from one) tells the others, so that they hold the
same transactions and switch at the same moment instead of at their next poll of the stored state:

- ``hold <role> <seconds> <sender>`` before it locks the tables: hold new transactions on the role's tables
  (for at most ``seconds``, in case the sender dies mid-way);
- ``changed <role> 0 <sender>``, sent inside the transaction that stores the new state (PostgreSQL delivers
  it when that commits): read the stored state, route by it, release the hold;
- ``release <role> 0 <sender>`` when the switch failed or timed out: nothing changed, release the hold.

An instance whose listening connection is down misses them and reads the state at its next poll; until
then the write guard (proxy/migration/guard.py) refuses its writes to the copy no longer served.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.config.dsn import Dsn
from proxy.config.values import DOMAINS
from proxy.health import close, connect, describe_error

log = logging.getLogger("parafort.migration")

CHANNEL = "parafort_migration"
KINDS = ("hold", "changed", "release")
CONNECT_TIMEOUT = 5.0
NOTIFY_SQL = "SELECT pg_catalog.pg_notify($1, $2)"


@dataclass(frozen=True)
class Notice:
    kind: str
    role: str
    seconds: float
    sender: str

    def encode(self) -> str:
        return f"{self.kind} {self.role} {self.seconds:g} {self.sender}"


def decode(payload: str) -> Notice | None:
    """The notice in ``payload``, or None for anything else (ignored: any login may NOTIFY)."""
    parts = payload.split(" ")
    if len(parts) != 4 or parts[0] not in KINDS or parts[1] not in DOMAINS:
        return None
    try:
        seconds = float(parts[2])
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return Notice(parts[0], parts[1], seconds, parts[3])


async def send(conn: Any, notice: Notice) -> None:
    """Send ``notice`` on ``conn`` (delivered when its transaction commits, at once outside one)."""
    await conn.execute(NOTIFY_SQL, CHANNEL, notice.encode())


class Listener:
    """One connection to main listening on the channel; ``ensure`` (re)connects it."""

    def __init__(self, on_notice: Callable[[Notice], None]) -> None:
        self.on_notice = on_notice
        self._conn: Any = None
        self.error: str | None = None  # why the last connect failed (logged once per failure spell)

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def ensure(self, dsn: Dsn) -> None:
        if self.listening:
            return
        try:
            conn = await connect(dsn, CONNECT_TIMEOUT, "migration-notices")
            await conn.add_listener(CHANNEL, self._received)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = describe_error(exc, dsn, CONNECT_TIMEOUT)
            if self.error is None:
                log.warning("event=migration_notices_unavailable error=%r", error)
            self.error = error
            return
        if self.error is not None:
            log.info("event=migration_notices_listening")
        self.error = None
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        with contextlib.suppress(OSError, TimeoutError, asyncpg.InterfaceError):
            await close(conn)

    def _received(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        notice = decode(payload)
        if notice is not None:
            self.on_notice(notice)
