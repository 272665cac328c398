"""One client's way to its first ReadyForQuery: the startup packet (TLS, cancel requests), authentication,
the greeting, the login timeout, and the failed-login count.

``Login`` carries the client through the phases STARTUP (or TLS_HANDSHAKE) -> AUTH -> LOGIN -> READY; the
client (proxy/frontend/client.py) feeds it input until READY and then cuts batches itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from typing import Any, Protocol, cast

from proxy.context import ClientContext
from proxy.errors import (
    FEATURE_NOT_SUPPORTED,
    INVALID_AUTHORIZATION,
    INVALID_PARAMETER_VALUE,
    PROTOCOL_VIOLATION,
    ProxyError,
)
from proxy.frontend.login_failures import (
    ABORTED,
    ADMIN_NOT_ALLOWED,
    CLIENT_DISCONNECTED,
    INVALID_PARAMETER,
    LOGIN_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
)
from proxy.frontend.reads import Reads
from proxy.frontend.ryw import parse_min_lsn
from proxy.frontend.session import Session, proxy_settings, startup_settings, startup_values
from proxy.lookups import InvalidStartupParameter
from proxy.protocol import messages as m
from proxy.protocol.auth import MALFORMED_AUTH_MESSAGE, ServerAuth
from proxy.protocol.framing import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage, read_startup


class LoginClient(Protocol):
    """What ``Login`` reads and sets of its client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    phase: int
    user: str
    database: str
    params: dict[str, str]
    peer: str
    buf: bytes
    tls: bool
    admin: bool
    key: tuple[int, int]
    session: Session
    reads: Reads[Any]
    transport: asyncio.Transport | None

    @property
    def id(self) -> int: ...
    def write(self, data: bytes | bytearray) -> None: ...
    def fatal(self, exc: ProxyError) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def close_transport(self) -> None: ...


log = logging.getLogger("parafort.client")

_HEADER = struct.Struct("!BI")
MAX_AUTH_MESSAGE = 8192

# Connection phases.
STARTUP, AUTH, LOGIN, READY, CLOSED, TLS_HANDSHAKE = range(6)


class Login:
    """See the module docstring. Only the client's own ``Login`` touches its login state."""

    __slots__ = ("auth", "client", "failure", "timer")

    def __init__(self, client: LoginClient) -> None:
        self.client = client
        self.auth: ServerAuth | None = None
        self.failure: str | None = None  # why the login failed, when ServerAuth does not say
        self.timer: asyncio.TimerHandle | None = None

    def start_timer(self, timeout: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(timeout, self.timed_out)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def timed_out(self) -> None:
        client = self.client
        if client.phase in (AUTH, LOGIN):
            self.failure = LOGIN_TIMEOUT  # logged (rate-limited) as a failed login, with the user
        elif client.phase in (STARTUP, TLS_HANDSHAKE):
            log.warning("event=login_timeout client=%s address=%s", client.id, client.peer)
        if client.phase in (STARTUP, AUTH, LOGIN, TLS_HANDSHAKE):
            timeout = client.app.config.limits.login_timeout
            client.fatal(
                ProxyError(PROTOCOL_VIOLATION, f"login not completed within {timeout:g}s", severity="FATAL")
            )

    def disconnected(self) -> None:
        if self.client.phase in (AUTH, LOGIN) and self.failure is None:
            self.failure = CLIENT_DISCONNECTED

    def failed(self) -> None:
        """Count and (rate-limited) log a login that ends before ReadyForQuery; never with a secret."""
        client = self.client
        auth_failure = self.auth.failure if self.auth is not None else None
        reason = self.failure or auth_failure or ABORTED
        client.app.login_failures.failed(client.user, client.peer, reason, client.id)

    async def start_tls(self) -> None:
        """Upgrade the connection to TLS after answering 'S'; the startup packet follows encrypted."""
        client = self.client
        transport = client.transport
        context = client.app.ssl_context
        if transport is None or context is None:
            return
        try:
            loop = asyncio.get_running_loop()
            tls_transport = await loop.start_tls(
                transport, cast(asyncio.BaseProtocol, client), context, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("event=tls_handshake_failed client=%s error=%r", client.id, type(exc).__name__)
            client.close_transport()
            return
        if tls_transport is None or client.phase == CLOSED:
            return
        client.transport = tls_transport
        client.tls = True
        client.phase = STARTUP
        if client.buf:
            client.data_received(b"")

    def startup_packet(self) -> bool:
        """Handle one startup-phase packet from the client's buffer; False when more input is needed (or
        the connection is done with it: TLS under way, a cancel request served)."""
        client = self.client
        app = client.app
        packet, used = read_startup(client.buf)
        if packet is None:
            return False
        client.buf = client.buf[used:]
        if isinstance(packet, SSLRequest) and app.ssl_context is not None and not client.tls:
            if client.buf:
                raise ProxyError(
                    PROTOCOL_VIOLATION, "data after SSLRequest before the handshake", severity="FATAL"
                )
            client.write(b"S")
            client.phase = TLS_HANDSHAKE
            asyncio.get_running_loop().create_task(self.start_tls())
            return False
        if isinstance(packet, SSLRequest | GSSENCRequest):
            client.write(b"N")
            return True
        if isinstance(packet, CancelRequest):
            app.cancel(packet.pid, packet.secret)
            client.close_transport()
            return False
        assert isinstance(packet, StartupMessage)
        self._check_startup(packet)
        self.auth = app.server_auth(client.user)
        client.phase = AUTH
        first = self.auth.start()
        client.write(first)
        if self.auth.done:
            self.authenticated()
        return True

    def _check_startup(self, packet: StartupMessage) -> None:
        client = self.client
        if client.app.config.tls.mode == "require" and not client.tls:
            raise ProxyError(
                INVALID_AUTHORIZATION,
                "TLS is required: connect with sslmode=require or stronger",
                severity="FATAL",
            )
        if not packet.is_v3:
            raise ProxyError(
                FEATURE_NOT_SUPPORTED,
                f"unsupported frontend protocol {packet.major}.{packet.minor}: server supports 3.0",
                severity="FATAL",
            )
        client.params = dict(packet.params)
        client.user = client.params.get("user", "")
        if not client.user:
            raise ProxyError(
                INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet", severity="FATAL"
            )
        client.database = client.params.get("database") or client.user
        if client.params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise ProxyError(
                FEATURE_NOT_SUPPORTED,
                "replication connections are not supported through parafort-proxy; connect to the server",
                severity="FATAL",
            )

    def auth_message(self) -> bool:
        """Feed one complete password message to the authenticator; False when more input is needed."""
        client = self.client
        assert self.auth is not None
        buf = client.buf
        if len(buf) < 5:
            return False
        mtype, length = _HEADER.unpack_from(buf, 0)
        if length < 4 or length > MAX_AUTH_MESSAGE:
            self.failure = MALFORMED_AUTH_MESSAGE
            raise ProxyError(PROTOCOL_VIOLATION, f"invalid message length {length}", severity="FATAL")
        if len(buf) < 1 + length:
            return False
        client.buf = buf[1 + length :]
        reply, done = self.auth.feed(mtype, buf[5 : 1 + length])
        client.write(reply)  # on success it ends with AuthenticationOk
        if done:
            self.authenticated()
        return True

    def authenticated(self) -> None:
        client = self.client
        app = client.app
        if client.database == app.config.admin.database:
            if not app.admin_allowed(client.user):
                self.failure = ADMIN_NOT_ALLOWED
                raise ProxyError(
                    INVALID_AUTHORIZATION,
                    f'user "{client.user}" is not allowed to use the admin console (auth.admin_users)',
                    severity="FATAL",
                )
            client.admin = True
        client.phase = LOGIN
        self.auth = None
        own = proxy_settings(client.params)
        if "parafort.min_lsn" in own:
            value = own["parafort.min_lsn"]
            try:
                client.reads.min_lsn = client.reads.startup_min_lsn = parse_min_lsn(value)
            except ValueError:
                self.failure = INVALID_PARAMETER
                raise ProxyError(
                    INVALID_PARAMETER_VALUE,
                    f'invalid value for parameter "parafort.min_lsn": "{value}"',
                    severity="FATAL",
                ) from None
        # Without a replica there is nothing to wait for: no capture at all.
        scope = app.config.routing.read_your_writes.scope if app.replica_pools else "off"
        if scope == "user":
            client.reads.key = ("user", client.user)
        elif scope == "connection":
            client.reads.key = ("connection", client.id)
        elif scope == "global":
            client.reads.key = ("global",)
        client.session = Session(startup_settings(client.params))
        asyncio.get_running_loop().create_task(self.greet())

    async def greet(self) -> None:
        client = self.client
        app = client.app
        try:
            reported = await app.startup_parameters(startup_values(client.params))
        except ProxyError as exc:
            bad = isinstance(exc, InvalidStartupParameter)
            self.failure = INVALID_PARAMETER if bad else UPSTREAM_UNAVAILABLE
            client.fatal(ProxyError(exc.sqlstate, exc.message, detail=exc.detail, severity="FATAL"))
            return
        if client.phase == CLOSED:
            return
        out = bytearray()
        client.session.heard = dict(reported)
        for name, value in reported.items():
            out += m.parameter_status(name, value)
        client.key = app.register_cancel_key(client)
        out += m.backend_key_data(*client.key)
        out += m.ready_for_query(b"I")
        client.write(out)
        client.phase = READY
        self.stop_timer()
        log.info(
            "event=client_login client=%s user=%s database=%s address=%s",
            client.id,
            client.user,
            client.database,
            client.peer,
        )
        if client.buf:
            client.data_received(b"")


__all__ = ["AUTH", "CLOSED", "LOGIN", "MAX_AUTH_MESSAGE", "READY", "STARTUP", "TLS_HANDSHAKE", "Login"]
