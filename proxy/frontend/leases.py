"""How one client's unit waits before it runs: for a pooled connection (handed over by the pool's callback,
or a task when one must be opened or the role is PAUSEd; a connect failure marks the upstream suspect and
tries once where the unit is routed then), for main's recheck when main is marked down, and for a replica
to catch up or a cutover's hold to end (then the unit is dispatched afresh). Reading from the client
pauses if it sends more while it waits (``hold``); the client's ``TxState`` (proxy/frontend/txstate.py)
records why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proxy.backend.connection import ServerConnection
from proxy.context import ClientContext
from proxy.errors import CANNOT_CONNECT_NOW, INTERNAL_ERROR, ProxyError
from proxy.frontend.send import SendClient, send
from proxy.frontend.startup import CLOSED
from proxy.frontend.txstate import Input, TxState
from proxy.frontend.units import Batch, Units
from proxy.protocol import messages as m
from proxy.router.classify import Classification
from proxy.router.policy import Decision

log = logging.getLogger("parafort.client")


class LeasingClient(SendClient, Protocol):
    """What ``Leasing`` reads and calls of its client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    phase: int
    buf: bytes
    tx: TxState[Any]
    units: Units

    @property
    def id(self) -> int: ...
    def write(self, data: bytes | bytearray) -> None: ...
    def fatal(self, exc: ProxyError) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def hold(self, batch: Batch, reason: Input) -> None: ...
    def resume(self, reason: str) -> None: ...
    def resume_batch(self, reason: Input, dispatch: Callable[[], None]) -> None: ...
    def dispatch(self, batch: Batch) -> None: ...
    def after_failed_batch(self, batch: Batch) -> None: ...
    def attach(self, conn: ServerConnection, role: str, label: str) -> None: ...
    def decide(self, info: Classification | None, override: str | None) -> Decision: ...


class Leasing:
    """See the module docstring. ``main_rechecked``: the batch being decided again after main's recheck."""

    __slots__ = ("client", "main_rechecked")

    def __init__(self, client: LeasingClient) -> None:
        self.client = client
        self.main_rechecked: Batch | None = None

    def wait_for_pool(self, batch: Batch, role: str, label: str) -> None:
        """No idle connection in ``label``'s pool: wait in its FIFO (a callback), or as a task when a
        connection must be opened."""
        self.client.hold(batch, Input.ACQUIRE)
        if not self.client.app.pools[label].wait(functools.partial(self._handed, batch, role, label)):
            asyncio.get_running_loop().create_task(self._acquire(batch, role, label))

    def wait_resumed(self, batch: Batch, role: str) -> None:
        """PAUSE: the new transaction waits (no timeout) until RESUME; nothing fails."""
        self.client.hold(batch, Input.ACQUIRE)
        asyncio.get_running_loop().create_task(self._acquire(batch, role, self.client.app.pool_for(role)))

    def _handed(
        self, batch: Batch, role: str, label: str, conn: ServerConnection | None, error: ProxyError | None
    ) -> bool:
        """The pool's answer to ``wait``: a connection, a free slot to open one in, or the timeout. False
        when the client has gone: the pool gives the connection (or the slot) to its next waiter."""
        client = self.client
        if client.phase == CLOSED:
            return False
        if error is not None:
            self._acquire_failed(batch, error)
        elif conn is None:
            asyncio.get_running_loop().create_task(self._acquire(batch, role, label))
            return True
        elif not self._acquired(batch, conn, role, label):
            return True
        self._settled()
        return True

    async def _acquire(self, batch: Batch, role: str, label: str, *, retry: bool = True) -> None:
        client = self.client
        app = client.app
        if app.is_paused(role):
            await app.wait_resumed(role)
            label = app.pool_for(role)
            if client.phase == CLOSED:
                return
        pool = app.pools[label]
        try:
            conn = await pool.acquire()
        except ProxyError as exc:
            if client.phase == CLOSED:
                return
            if exc.sqlstate.startswith("08") and retry:
                # Nothing was sent yet: mark the upstream suspect and, if that moves the unit elsewhere
                # (its fallback, another replica), try there once.
                app.health.mark_suspect(label, exc.message)
                decision = client.decide(*client.units.info(batch))
                if decision.down is not None:
                    app.count_down_refusal(decision.down)
                    exc = ProxyError(CANNOT_CONNECT_NOW, decision.message or "")
                elif decision.role is not None and app.pool_for(decision.role) != label:
                    log.warning("event=fallback client=%s from=%s to=%s", client.id, label, decision.role)
                    count_fallback(app, decision.fallback_from or (role,))
                    count_fallback_writes(app, decision.fallback_writes)
                    await self._acquire(batch, decision.role, app.pool_for(decision.role), retry=False)
                    return
            self._acquire_failed(batch, exc)
        except Exception as exc:
            log.exception("event=acquire_error client=%s", client.id)
            client.tx.go_on()
            client.write(
                m.error_from(ProxyError(INTERNAL_ERROR, f"internal proxy error: {type(exc).__name__}"))
            )
            client.after_failed_batch(batch)
        else:
            if client.phase == CLOSED:
                pool.release(conn)
                return
            if not self._acquired(batch, conn, role, label):
                return
        self._settled()

    def _settled(self) -> None:
        """The wait for a connection is over (the batch sent, or answered with an error): reading resumes,
        then what the client sent meanwhile."""
        client = self.client
        client.resume("acquire")
        if client.phase != CLOSED and client.buf:
            client.data_received(b"")

    def _acquired(self, batch: Batch, conn: ServerConnection, role: str, label: str) -> bool:
        """Send the waiting batch on the connection just leased; False if that closed the client."""
        self.client.tx.go_on()
        return self.send_on(batch, conn, role, label)

    def send_on(self, batch: Batch, conn: ServerConnection, role: str, label: str) -> bool:
        """Attach ``conn`` (of ``role``, in pool ``label``) and send ``batch`` on it; False if that closed
        the client."""
        client = self.client
        client.attach(conn, role, label)
        try:
            send(client, batch, conn)
        except ProxyError as exc:
            client.fatal(exc)
            return False
        return True

    def _acquire_failed(self, batch: Batch, exc: ProxyError) -> None:
        client = self.client
        tx = client.tx
        tx.go_on()
        client.write(m.error_from(exc))
        tx.refused(tx.begin is not None)
        client.after_failed_batch(batch)

    def dispatch_after(self, batch: Batch, reason: Input, settled: Awaitable[None]) -> None:
        """``batch`` waits for ``settled`` (a replica to catch up; a cutover's hold, proxy/migration/hold.py),
        then is dispatched afresh: routed by what is true then."""
        self.client.hold(batch, reason)
        asyncio.get_running_loop().create_task(self._redispatch(batch, reason, settled))

    async def _redispatch(self, batch: Batch, reason: Input, settled: Awaitable[None]) -> None:
        await settled
        client = self.client
        if client.phase != CLOSED:
            client.resume_batch(reason, lambda: client.dispatch(batch))

    def recheck_main(self, batch: Batch) -> None:
        """Main is marked down, so this unit would be refused (25006): first let the app try one
        connect to main (shared by all clients asking meanwhile); if main is back, it runs there."""
        self.client.hold(batch, Input.RECHECK)
        asyncio.get_running_loop().create_task(self._after_main_recheck(batch))

    async def _after_main_recheck(self, batch: Batch) -> None:
        client = self.client
        await client.app.main_reachable()
        if client.phase == CLOSED:
            return

        def dispatch() -> None:
            self.main_rechecked = batch  # decided again with main's new state; refused now if still down
            try:
                client.dispatch(batch)
            finally:
                self.main_rechecked = None

        client.resume_batch(Input.RECHECK, dispatch)


def count_fallback(app: ClientContext[Any], roles: tuple[str, ...]) -> None:
    fallbacks = app.fallbacks
    for role in roles:
        fallbacks[role] = fallbacks.get(role, 0) + 1


def count_fallback_writes(app: ClientContext[Any], writes: tuple[tuple[str, str], ...]) -> None:
    if writes:
        app.count_fallback_writes(writes)
