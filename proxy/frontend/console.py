"""A client connection to the admin console (database ``admin.database``): its simple-query commands
answered by the proxy itself (proxy/admin.py); one that must ask a database (``MIGRATE role PLAN``) answers
with an awaitable, and the client's input waits until its reply is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proxy.context import ClientContext
from proxy.errors import FEATURE_NOT_SUPPORTED, INTERNAL_ERROR, ProxyError
from proxy.frontend.startup import CLOSED
from proxy.frontend.txstate import Input
from proxy.frontend.units import Batch
from proxy.protocol import messages as m

log = logging.getLogger("parafort.client")

_Q = ord("Q")


class ConsoleClient(Protocol):
    """What ``ConsoleSession`` reads and calls of its client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    phase: int
    user: str

    @property
    def id(self) -> int: ...
    def write(self, data: bytes | bytearray) -> None: ...
    def hold(self, batch: Batch, reason: Input) -> None: ...
    def resume_batch(self, reason: Input, dispatch: Callable[[], None]) -> None: ...
    def after_failed_batch(self, batch: Batch) -> None: ...


class ConsoleSession:
    """See the module docstring. ``task``: the command that asks a database, while it runs."""

    __slots__ = ("client", "task")

    def __init__(self, client: ConsoleClient) -> None:
        self.client = client
        self.task: asyncio.Task[None] | None = None

    def command(self, batch: Batch) -> None:
        """One unit of the console's client: a simple query, answered here."""
        client = self.client
        if batch.terminator != _Q or len(batch.msgs) != 1:
            error = ProxyError(FEATURE_NOT_SUPPORTED, "the admin console speaks the simple query protocol")
            client.write(m.error_from(error))
            client.after_failed_batch(batch)
            return
        _, start, end = batch.msgs[0]
        try:
            reply = client.app.console.execute(batch.buf[start + 5 : end - 1].decode(errors="replace"))
        except ProxyError as exc:
            reply = m.error_from(exc)
        log.info("event=admin_command client=%s user=%s", client.id, client.user)
        if isinstance(reply, bytes):
            client.write(reply + m.ready_for_query(b"I"))
            return
        # A command that asks a database (MIGRATE role PLAN): input waits until it has answered.
        client.hold(batch, Input.CONSOLE)
        self.task = asyncio.get_running_loop().create_task(self._answer(reply))

    async def _answer(self, pending: Awaitable[bytes]) -> None:
        client = self.client
        try:
            reply = await pending
        except ProxyError as exc:
            reply = m.error_from(exc)
        except Exception:
            log.exception("event=admin_command_error client=%s", client.id)
            reply = m.error_from(ProxyError(INTERNAL_ERROR, "admin command failed (see the proxy's log)"))
        self.task = None
        if client.phase != CLOSED:
            client.write(reply + m.ready_for_query(b"I"))
            client.resume_batch(Input.CONSOLE, lambda: None)
