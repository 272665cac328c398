"""One client connection: its asyncio side (the transport's callbacks, pausing, teardown), its login
(proxy/frontend/startup.py), and what its upstream connection reports beyond replies and ReadyForQuery
(errors, command tags, the audit's batch end, the connection lost).

The data path itself (batches cut, routed, sent, the lease ended) is ``ClientCore`` (proxy/frontend/core.py),
which ``ClientConnection`` subclasses, as asyncpg's asyncio adapter subclasses its protocol core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from proxy.backend.connection import ServerConnection
from proxy.context import ClientContext
from proxy.errors import (
    ADMIN_SHUTDOWN,
    INTERNAL_ERROR,
    PROTOCOL_VIOLATION,
    TOO_MANY_CONNECTIONS,
    ProxyError,
)
from proxy.frontend.core import ClientCore
from proxy.frontend.fast import fast_unit
from proxy.frontend.ryw import PARAMETER, Capture, format_lsn
from proxy.frontend.startup import (
    AUTH,
    CLOSED,
    LOGIN,
    MAX_AUTH_MESSAGE,
    READY,
    STARTUP,
    Login,
)
from proxy.frontend.txstate import Input, Lease, LeaseEv
from proxy.protocol import messages as m
from proxy.sockets import set_nodelay

log = logging.getLogger("parafort.client")

_IDLE = ord("I")
_LINGERING = Lease.LINGERING
_PINNED = Lease.PINNED
_TX_TAGS = frozenset((b"BEGIN", b"START TRANSACTION", b"COMMIT", b"ROLLBACK"))  # (upstream_command_tag)


class ClientConnection(ClientCore):
    """See the module docstring."""

    def __init__(self, app: ClientContext[ClientConnection]) -> None:
        super().__init__(app)
        self.peer = ""
        self.database = ""
        self.params: dict[str, str] = {}
        self.key = (0, 0)
        self.tls = False
        self.login = Login(self)  # startup, authentication, greeting (proxy/frontend/startup.py)
        self.connected_at = time.monotonic()

    # -- asyncio.Protocol -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        set_nodelay(transport)
        limits = self.app.config.limits
        if len(self.app.clients) >= limits.max_client_connections:
            log.warning("event=client_refused reason=too_many_clients address=%s", self.peer)
            self.write(
                m.error_from(
                    ProxyError(TOO_MANY_CONNECTIONS, "sorry, too many clients already", severity="FATAL")
                )
            )
            self.phase = CLOSED
            self.transport.close()
            self.transport = None
            return
        self.app.client_opened(self)
        # Debug only, like client_close before a login: a flood of connections that never log in must not
        # flood the log (failed logins are logged, rate-limited, by LoginFailureLog; client_login names the
        # address of those that succeed).
        log.debug("event=client_open client=%s address=%s", self.id, self.peer)
        self.login.start_timer(limits.login_timeout)

    def drain(self) -> None:
        """The proxy is shutting down: leave now if idle, else after the transaction in flight."""
        if self.phase != READY or self._idle_between_units():
            self.fatal(ProxyError(ADMIN_SHUTDOWN, "terminating connection: the proxy is shutting down"))

    def _idle_between_units(self) -> bool:
        server = self.server
        if server is None:
            return self.tx.between_units(None, False)
        return self.tx.between_units(server.status, bool(server.expect))

    def connection_lost(self, exc: Exception | None) -> None:
        self.login.disconnected()
        self._shutdown()

    def pause_writing(self) -> None:
        # The client reads slowly: stop reading from its upstream until it catches up.
        self._write_paused = True
        if self.server is not None:
            self.server.pause_reading(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.server is not None:
            self.server.pause_reading(False)

    def data_received(self, data: bytes) -> None:
        if self.phase == CLOSED:
            return
        if self._parts is not None:
            whole = self._parts.add(data)
            if whole is None:
                return
            self.buf = whole
            self._parts = None
        elif fast_unit(self, data):
            return
        else:
            self.buf = self.buf + data if self.buf else data
            if self.tx.waiting is not None:
                if data:
                    self.held_input()
                return
        self._guarded(self._process)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step of the client's input handling; whatever it raises ends this client, not the proxy."""
        try:
            step()
        except ProxyError as exc:
            self.fatal(exc)
        except (ValueError, IndexError) as exc:  # a message whose fields do not add up
            log.info("event=protocol_violation client=%s error=%s", self.id, type(exc).__name__)
            self.fatal(ProxyError(PROTOCOL_VIOLATION, "malformed message", severity="FATAL"))
        except Exception as exc:  # never let one client's surprise take the proxy down
            log.exception("event=internal_error client=%s", self.id)
            self.fatal(ProxyError(INTERNAL_ERROR, f"internal proxy error: {type(exc).__name__}"))

    def resume_batch(self, reason: Input, dispatch: Callable[[], None]) -> None:
        """A batch that waited (classification, a replica to catch up, main's recheck) goes on: reading
        resumes, the batch is dispatched, then whatever the client sent meanwhile."""
        self.tx.go_on()
        self.resume(reason.value)
        self._guarded(dispatch)
        if self.phase != CLOSED and self.tx.waiting is None and self.buf:
            self._guarded(self._process)

    # -- input ----------------------------------------------------------------------------------------------
    def _process(self) -> None:
        while self.phase != CLOSED and self.tx.waiting is None:
            phase = self.phase
            if phase == READY:
                self._messages()
                return
            if phase == STARTUP:
                if not self.login.startup_packet():
                    return
            elif phase == AUTH:
                if not self.login.auth_message():
                    return
            else:
                return  # LOGIN: the greeting resumes processing

    # -- the upstream connection held ----------------------------------------------------------------------
    def attach(self, conn: ServerConnection, role: str, label: str) -> None:
        self.tx.lease_event(LeaseEv.ATTACH)
        self.server = conn
        self.server_role = role
        self.server_pool = label
        conn.attach(self)
        if self._write_paused:
            conn.pause_reading(True)

    def _reclaim(self) -> None:
        """The pool takes back the connection this client kept between transactions."""
        server, self.server = self.server, None
        if server is not None:
            self.tx.lease_event(LeaseEv.RECLAIM)
            server.detach()

    def _detach(self, reusable: bool) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        if self.tx.lingering:
            self.app.pools[self.server_pool].unlinger(server)
        self.tx.lease_event(LeaseEv.RELEASE)
        server.detach()
        dirty = self.effects.server_dirty
        self.effects.server_dirty = False
        self.app.pools[self.server_pool].release(server, reusable=reusable and not dirty and server.clean)

    def _release(self) -> None:
        self._detach(reusable=True)

    # -- what the upstream connection reports besides replies and ReadyForQuery ----------------------------
    def upstream_error_seen(self, fields_payload: bytes) -> None:
        self.effects.error_seen = True
        self.audit_trail.error(fields_payload)

    def upstream_command_tag(self, tag: bytes) -> None:
        # A COMMIT's tag outlives the statements after it in the same unit ("COMMIT; SELECT 2": the
        # settings staged before it took effect), not another transaction's start or end.
        if tag in _TX_TAGS or self.effects.last_tag != b"COMMIT":
            self.effects.last_tag = tag

    def upstream_batch_end(self) -> None:
        if self.audit_trail.pending:
            self.audit_trail.write(
                self.app.audit,
                user=self.user,
                address=self.peer,
                application_name=self.params.get("application_name", ""),
                role=self.server_role,
            )

    def captured(self, capture: Capture, lsn: int | None) -> None:
        """A capture's reply arrived: the client hears its position, after the replies routed so far and
        before the ReadyForQuery of a COMMIT the capture was sent behind (``ReplyQueue.emit``)."""
        key = capture.key
        if self.phase == CLOSED:
            if key[0] == "connection":
                self.app.consistency.writes.forget(key)
            return
        if lsn is not None:
            token = max(lsn, self.app.consistency.writes.tokens.get(key, 0))
            capture.server.emit(m.parameter_status(PARAMETER, format_lsn(token)))

    def upstream_lost(self, exc: ProxyError) -> None:
        """The connection held went away: its backend ended (terminated, a timeout, a crash) or the
        network failed."""
        server = self.server
        if server is None:
            return
        tx = self.tx
        if tx.lease is _LINGERING or (
            tx.lease is not _PINNED and server.status == _IDLE and not server.expect
        ):
            # Between transactions, nothing of the client's on it: the next unit just takes another.
            self._detach(reusable=False)
            return
        # A transaction open, a statement in flight, or session state that lived only there: as when
        # its own PostgreSQL connection is lost, the client gets one error (the backend's FATAL, which it
        # may have had already as the reply to its statement, or 08006) and its connection ends. Carrying
        # on would run what follows outside the transaction the client believes is open.
        server.expect.clear()
        self._detach(reusable=False)
        self.session.discard_staged()
        if self.phase == CLOSED:
            return
        log.info("event=client_upstream_lost client=%s upstream=%s", self.id, server.label)
        if server.farewell is None:
            self.fatal(exc)
            return
        if not server.farewell_forwarded:
            self.write(server.farewell)
        self._shutdown()

    def upstream_pause(self, paused: bool) -> None:
        (self.pause if paused else self.resume)("upstream")

    # -- teardown -------------------------------------------------------------------------------------------
    def fatal(self, exc: ProxyError) -> None:
        """Report ``exc`` and close this client (its upstream connection is cleaned up)."""
        if self.phase != CLOSED:
            self.write(
                m.error_from(ProxyError(exc.sqlstate, exc.message, detail=exc.detail, severity="FATAL"))
            )
        self._shutdown()

    def _capture_only(self, server: ServerConnection) -> bool:
        """Whether all in flight on ``server`` is a read-your-writes capture, outside a transaction."""
        expect = server.expect
        return (
            self.tx.lease is not _PINNED
            and server.status == _IDLE
            and len(expect) == 1
            and expect[0].on_row is not None
            and not server.broken
        )

    def close_transport(self) -> None:
        """Close the client's connection at once (a cancel request served, a failed TLS handshake)."""
        self.phase = CLOSED
        if self.transport is not None:
            self.transport.close()

    def _shutdown(self) -> None:
        if self.phase == CLOSED and self.transport is None:
            return
        logged_in = self.key != (0, 0)  # set with the greeting: this client reached ReadyForQuery
        if self.phase in (AUTH, LOGIN):
            self.login.failed()
        self.phase = CLOSED
        self.login.stop_timer()
        self.units.cancel()
        self._parts = None
        server = self.server
        if server is not None and self._capture_only(server):
            pass  # the capture ends on its own; upstream_ready then releases the connection
        elif server is not None:
            if server.clean and self.tx.lease is not _PINNED:
                self._release()
            else:
                # Mid-transaction, mid-statement or pinned: never hand this connection to anyone else.
                # Cancel what runs and close it; the server rolls back when the connection ends.
                if server.expect:
                    self.app.cancel_upstream(server)
                server.sink = None
                self._detach(reusable=False)
        self.app.client_closed(self)
        log.log(
            logging.INFO if logged_in else logging.DEBUG,
            "event=client_close client=%s user=%s seconds=%.3f",
            self.id,
            self.user or "-",
            time.monotonic() - self.connected_at,
        )
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()


__all__ = ["AUTH", "CLOSED", "MAX_AUTH_MESSAGE", "READY", "STARTUP", "ClientConnection"]
