"""One upstream PostgreSQL connection: connect and authenticate, then pump responses to the leasing client.

This is the asyncio adapter: transport, TLS, the startup handshake, back-pressure, cancels and close. What
to do with each response while leased (forward, swallow, synthesize) is decided by its sans-IO core,
``ReplyQueue`` in expect.py, which this class extends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from typing import cast

from proxy import tls
from proxy.backend.expect import ReplyQueue, Sink, sqlstate
from proxy.config.dsn import Dsn
from proxy.errors import CONNECTION_FAILURE, PROTOCOL_VIOLATION, SQLCLIENT_UNABLE_TO_ESTABLISH, ProxyError
from proxy.protocol import messages as m
from proxy.protocol.auth import ClientAuth
from proxy.protocol.framing import Collector, collector, scan_messages, ssl_request, startup_message
from proxy.sockets import set_nodelay

log = logging.getLogger("parafort.backend")

MAX_HANDSHAKE_MESSAGE = 1 << 20  # a login reply longer than this is not PostgreSQL talking
_Z, _E, _S, _N = b"ZESN"


class ServerConnection(ReplyQueue, asyncio.Protocol):
    """An authenticated upstream connection of one role; see the module docstring."""

    # Slots (ReplyQueue's too), not an instance dict: CPython 3.11 shares a class's instance-dict keys only
    # up to 30 names, and past them every attribute access on the data path is a hash look-up (31 names
    # here cost bench hotpath's simple transaction 1,670 instructions, 0.2-0.3 us).
    __slots__ = (
        "_auth",
        "_broken",
        "_buf",
        "_cancels_done",
        "_handshake",
        "_parts",
        "_reading_paused",
        "_tls_answer",
        "applied",
        "backend_pid",
        "backend_secret",
        "cancels",
        "created_at",
        "dsn",
        "identity",
        "idle_since",
        "prepared",
        "role",
        "transport",
        "unnamed_owner",
    )

    def __init__(self, role: str, dsn: Dsn, label: str) -> None:
        super().__init__(label)
        self.role = role
        self.dsn = dsn
        self.transport: asyncio.Transport | None = None
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.backend_pid = 0
        self.backend_secret = 0
        self.applied: dict[str, str] = {}  # session settings this connection has beyond its defaults
        # Upstream (pf_...) statement names that exist here, least recently used first.
        self.prepared: dict[str, None] = {}
        self.unnamed_owner: object | None = None  # whose unnamed statement this connection holds
        # Main's identity as read by this connection's first read-your-writes capture (proxy/frontend/ryw.py).
        self.identity: tuple[str, ...] | None = None
        self._buf = b""
        self._parts: Collector | None = None  # a large message being received
        self._broken = False
        self._handshake: asyncio.Future[None] | None = None
        self._auth: ClientAuth | None = None
        self._reading_paused = False
        self._tls_answer: asyncio.Future[bytes] | None = None
        # CancelRequests sent for this backend whose cancel connection the postmaster has not closed yet:
        # until it has, the signal may still arrive, so the connection serves no other client.
        self.cancels = 0
        self._cancels_done: Callable[[], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, role: str, dsn: Dsn, label: str, deadline: float) -> ServerConnection:
        """Open, authenticate and wait for the first ReadyForQuery; ProxyError 08xxx on any failure."""
        loop = asyncio.get_running_loop()
        where = f"{label} upstream at {dsn.host}:{dsn.port}"
        try:
            async with asyncio.timeout(deadline):
                if dsn.host.startswith("/"):
                    path = f"{dsn.host}/.s.PGSQL.{dsn.port}"
                    _, conn = await loop.create_unix_connection(lambda: cls(role, dsn, label), path)
                else:
                    _, conn = await loop.create_connection(lambda: cls(role, dsn, label), dsn.host, dsn.port)
                await conn._start()
                return conn
        except TimeoutError:
            raise ProxyError(
                SQLCLIENT_UNABLE_TO_ESTABLISH, f"could not connect to {where}: timed out after {deadline:g}s"
            ) from None
        except OSError as exc:
            raise ProxyError(
                SQLCLIENT_UNABLE_TO_ESTABLISH, f"could not connect to {where}: {exc.strerror or exc}"
            ) from None

    async def _start(self) -> None:
        assert self.transport is not None
        sslmode = tls.sslmode(self.dsn)
        if sslmode in tls.TLS_MODES and not self.dsn.host.startswith("/"):
            await self._negotiate_tls(sslmode)
        params = {"user": self.dsn.user or "postgres", "database": self.dsn.database or self.dsn.user or ""}
        for key, value in self.dsn.params:
            if key in ("options", "application_name"):
                params[key] = value
        self._auth = ClientAuth(params["user"], self.dsn.password)
        self._handshake = asyncio.get_running_loop().create_future()
        self.transport.write(startup_message(params))
        try:
            await self._handshake
        except BaseException:
            self.close()
            raise

    async def _negotiate_tls(self, sslmode: str) -> None:
        """SSLRequest, then TLS per the DSN's sslmode (prefer, require, verify-ca, verify-full) as libpq."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._tls_answer = loop.create_future()
        self.transport.write(ssl_request())
        answer = await self._tls_answer
        self._tls_answer = None
        if answer != b"S":
            if sslmode == "prefer":
                return
            raise ProxyError(
                SQLCLIENT_UNABLE_TO_ESTABLISH,
                f"{self.label} upstream does not support TLS (sslmode={sslmode})",
            )
        context = tls.upstream_tls_context(self.dsn, sslmode)
        host = self.dsn.host
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                context,
                server_hostname=None if _is_ip(host) and sslmode != "verify-full" else host,
            )
        except (ssl.SSLError, OSError) as exc:
            raise ProxyError(
                SQLCLIENT_UNABLE_TO_ESTABLISH, f"TLS with the {self.label} upstream failed: {exc}"
            ) from None
        if transport is None:
            raise ProxyError(SQLCLIENT_UNABLE_TO_ESTABLISH, f"TLS with the {self.label} upstream failed")
        self.transport = transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        set_nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken = True
        self.transport = None
        err = ProxyError(
            CONNECTION_FAILURE,
            f"connection to the {self.label} upstream was lost" + (f": {exc}" if exc else ""),
        )
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(err)
        self.lost(err)

    @property
    def broken(self) -> bool:
        return self._broken

    def close(self) -> None:
        """Terminate and close; safe to call on a closed connection."""
        self._broken = True
        transport, self.transport = self.transport, None
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(m.terminate())
            transport.close()

    def abort(self) -> None:
        self._broken = True
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()

    # -- cancels --------------------------------------------------------------------------------------------
    def cancel_sent(self) -> None:
        self.cancels += 1

    def cancel_ended(self, landed: bool) -> None:
        """A CancelRequest's connection closed (``landed``: the postmaster had signalled the backend by
        then), or it failed or timed out: a cancel that may still arrive later retires the connection."""
        self.cancels -= 1
        if not landed:
            self._broken = True
        if not self.cancels and self._cancels_done is not None:
            done, self._cancels_done = self._cancels_done, None
            done()

    def when_cancels_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no cancel is in flight (the pool parks the connection until then)."""
        self._cancels_done = callback

    # -- leasing --------------------------------------------------------------------------------------------
    def attach(self, sink: Sink, track_details: bool = False) -> None:
        self.sink = sink
        self._track_details = track_details

    def detach(self) -> None:
        self.sink = None
        self._track_details = False
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_reading(self, paused: bool) -> None:
        """Back-pressure from a slow client: stop (or resume) reading this upstream's responses."""
        if self.transport is not None and paused != self._reading_paused:
            self._reading_paused = paused
            (self.transport.pause_reading if paused else self.transport.resume_reading)()

    @property
    def clean(self) -> bool:
        """Idle outside a transaction with nothing in flight: fit for another client."""
        return (
            not self._broken
            and self.status == 73
            and not self.expect
            and not self._buf
            and self._parts is None
            and not self.needs_sync
        )

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause(False)

    # -- incoming -------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._tls_answer is not None and not self._tls_answer.done():
            self._tls_answer.set_result(data[:1])  # the one-byte answer to SSLRequest
            data = data[1:]
            if not data:
                return
        if self._parts is not None:
            whole = self._parts.add(data)
            if whole is None:
                return
            data = whole
            self._parts = None
        # ``buf`` is immutable bytes, so slices of it can be handed to the client's transport as they are.
        buf = self._buf + data if self._buf else data
        try:
            if self._handshake is not None:
                used = self._handshake_messages(buf)
            elif self.whole_unit(buf):  # the fast path: the whole reply to a plain unit, as it is
                self._buf = b""
                return
            else:
                used = self.feed(buf)
        except ProxyError as exc:
            log.warning("event=upstream_protocol_error upstream=%s error=%r", self.label, exc.message)
            self.abort()
            return
        if self.farewell is not None:
            # The backend is exiting; nothing it sends is useful any more (the client's side of this is
            # ``Sink.upstream_lost``, called from connection_lost).
            log.info(
                "event=upstream_closed upstream=%s sqlstate=%s leased=%s",
                self.label,
                sqlstate(self.farewell, 0, len(self.farewell)),
                "yes" if self.sink is not None else "no",
            )
            self.abort()
            return
        if used >= len(buf):
            self._buf = b""
            return
        self._buf = rest = buf[used:] if used else buf
        if len(rest) >= 5:
            self._parts = collector(rest, 0)
            if self._parts is not None:
                self._buf = b""

    def _handshake_messages(self, buf: bytes) -> int:
        handshake = self._handshake
        assert handshake is not None and self._auth is not None
        msgs, pos = scan_messages(buf, 0, MAX_HANDSHAKE_MESSAGE)
        for mtype, start, end in msgs:
            payload = bytes(buf[start + 5 : end])
            pos = end
            if mtype == ord("R"):
                code, data = m.decode_auth(payload)
                try:
                    reply = self._auth.feed(code, data)
                except ProxyError as exc:
                    self._fail_handshake(exc)
                    return pos
                if reply and self.transport is not None:
                    self.transport.write(reply)
            elif mtype == _S:
                name, value = m.decode_parameter_status(payload)
                self.parameters[name] = value
            elif mtype == ord("K"):
                self.backend_pid, self.backend_secret = m.decode_backend_key_data(payload)
            elif mtype == _E:
                fields = m.parse_fields(payload)
                self._fail_handshake(
                    ProxyError(
                        SQLCLIENT_UNABLE_TO_ESTABLISH,
                        f"{self.label} upstream refused the connection: {fields.get('M', 'error')}",
                    )
                )
                return pos
            elif mtype == _Z:
                self.status = payload[0]
                self._handshake = None
                if not handshake.done():
                    handshake.set_result(None)
                return pos
            elif mtype == ord("v"):
                continue  # NegotiateProtocolVersion: we asked for nothing optional
            elif mtype != _N:
                self._fail_handshake(
                    ProxyError(
                        PROTOCOL_VIOLATION, f"unexpected message {chr(mtype)!r} during upstream startup"
                    )
                )
                return pos
        return pos

    def _fail_handshake(self, exc: ProxyError) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(exc)
        self._broken = True
        if self.transport is not None:
            self.transport.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
