"""One upstream PostgreSQL connection: connect and authenticate, then pump responses to the leasing client.

While leased, every message the proxy sends upstream is matched by an entry in ``expect`` that says what
to do with its response: forward it to the client, swallow it (replies to statements the proxy injected),
or answer the client from the proxy itself (a synthesized ParseComplete/CloseComplete for a statement that
this connection already has). A client batch that needs none of that costs one entry per Sync or Query.
Only message headers are read; the bytes go to the client unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from proxy.config.dsn import Dsn
from proxy.errors import (
    CONNECTION_FAILURE,
    PROTOCOL_VIOLATION,
    SQLCLIENT_UNABLE_TO_ESTABLISH,
    ProxyError,
)
from proxy.protocol import messages as m
from proxy.protocol.auth import ClientAuth
from proxy.protocol.framing import ssl_request, startup_message
from proxy.sockets import set_nodelay

log = logging.getLogger("parafort.backend")

_HEADER = struct.Struct("!BI")
MAX_BACKEND_MESSAGE = 1 << 30
COLLECT_FROM = 64 * 1024  # a message still missing more than this is collected in chunks, joined once

# Response-unit kinds: which frontend message an expectation belongs to.
K_SYNC = 0  # Sync, Query or FunctionCall: everything up to and including ReadyForQuery
K_PARSE = 1
K_BIND = 2
K_DESCRIBE = 3
K_EXECUTE = 4
K_CLOSE = 5
K_SYNTH = 6  # no upstream message: emit ``data`` to the client when reached

# Actions.
FORWARD = 0  # the client's own message: its responses go to the client
SWALLOW = 1  # injected by the proxy: drop its responses, errors included (logged)
SWALLOW_OK = 2  # injected re-Parse: drop its success, but forward its error (the client's Bind will fail)

_END = {
    K_PARSE: frozenset(b"1E"),
    K_BIND: frozenset(b"2E"),
    K_DESCRIBE: frozenset(b"TnE"),
    K_EXECUTE: frozenset(b"CIsE"),
    K_CLOSE: frozenset(b"3E"),
}
_Z, _E, _C, _S, _N, _A, _G, _D = b"ZECSNAGD"


def _stale_plan(buf: bytes, pos: int, end: int) -> bool:
    """Whether the ErrorResponse at ``pos`` is "cached plan must not change result type" (SQLSTATE 0A000
    raised by RevalidateCachedQuery: the routine name, unlike the message, is never translated)."""
    try:
        fields = m.parse_fields(buf[pos + 5 : end])
    except ProxyError:
        return False
    return fields.get("C") == "0A000" and fields.get("R") == "RevalidateCachedQuery"


def _flush(sink: Sink, out: list[bytes | memoryview]) -> None:
    sink.upstream_data(out[0] if len(out) == 1 else b"".join(out))
    out.clear()


@dataclass(slots=True)
class Expect:
    """What to do with the response to one message sent upstream (or a synthesized reply)."""

    kind: int
    action: int = FORWARD
    data: bytes = b""  # K_SYNTH: the bytes to send
    on_done: Callable[[bool], None] | None = None  # called with ok=True/False when the unit ends
    extended: bool = False  # K_SYNC: a Sync (not a Query): a COPY FROM STDIN makes the server ignore it
    # A Bind of a statement the proxy kept prepared: if PostgreSQL reports that its cached plan changed
    # result type, this re-prepares and re-sends the rest of the batch (the client sees no error).
    retry: Retry | None = None
    # A query the proxy injected whose result it reads (read-your-writes' WAL position after a write): its
    # DataRow payloads go here, and its ReadyForQuery ends the unit for the sink as the client's own would.
    on_row: Callable[[bytes], None] | None = None

    def extended_copy(self) -> bool:
        """Whether a CopyInResponse under this entry comes from an extended-protocol Execute."""
        return self.kind != K_SYNC or self.extended


class Retry(Protocol):
    """Sends a batch again after its first statement failed in a way the proxy can repair unseen."""

    def applies(self) -> bool: ...

    def __call__(self) -> None: ...


class Sink(Protocol):
    """The leasing client, as the upstream connection sees it."""

    def upstream_data(self, data: bytes | bytearray | memoryview) -> None: ...

    def upstream_ready(self, status: int) -> None: ...

    def upstream_batch_end(self) -> None: ...

    def upstream_error_seen(self, fields_payload: bytes) -> None: ...

    def upstream_command_tag(self, tag: bytes) -> None: ...

    def upstream_lost(self, exc: ProxyError) -> None: ...

    def upstream_pause(self, paused: bool) -> None: ...


class ServerConnection(asyncio.Protocol):
    """An authenticated upstream connection of one role; see the module docstring."""

    def __init__(self, role: str, dsn: Dsn, label: str) -> None:
        self.role = role
        self.dsn = dsn
        self.label = label  # role name or replica name, for messages and metrics
        self.transport: asyncio.Transport | None = None
        self.created_at = time.monotonic()
        self.idle_since = self.created_at
        self.backend_pid = 0
        self.backend_secret = 0
        self.parameters: dict[str, str] = {}
        self.applied: dict[str, str] = {}  # session settings this connection has beyond its defaults
        # Upstream (pf_...) statement names that exist here, least recently used first.
        self.prepared: dict[str, None] = {}
        self.unnamed_owner: object | None = None  # whose unnamed statement this connection holds
        # Main's identity as read by this connection's first read-your-writes capture (proxy/frontend/ryw.py).
        self.identity: tuple[str, ...] | None = None
        self.status = ord("I")
        self.expect: deque[Expect] = deque()
        self.sink: Sink | None = None
        self._buf = b""
        # A large message being received: its chunks so far, their length, the length that completes it.
        self._parts: list[bytes] | None = None
        self._have = 0
        self._need = 0
        self._broken = False
        self._handshake: asyncio.Future[None] | None = None
        self._auth: ClientAuth | None = None
        self._track_details = False  # the sink wants ErrorResponse fields and CommandComplete tags
        self._reading_paused = False
        # Extended-protocol messages were sent with no Sync after them: after an error the server would
        # ignore everything up to a Sync, so the connection must not serve anyone else in this state.
        self.needs_sync = False
        self._tls_answer: asyncio.Future[bytes] | None = None
        # The backend's last word: an ErrorResponse (FATAL: it is exiting) that ended this connection, and
        # whether the leasing client already got it as the reply to its own message.
        self.farewell: bytes | None = None
        self.farewell_forwarded = False
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
        sslmode = (self.dsn.param("sslmode") or "prefer").lower()
        if sslmode in TLS_MODES and not self.dsn.host.startswith("/"):
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
        context = upstream_tls_context(self.dsn, sslmode)
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
        for entry in self.expect:
            if entry.on_row is not None and entry.on_done is not None:
                entry.on_done(False)  # its reply never comes
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.upstream_lost(err)

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

    def track_details(self, on: bool) -> None:
        self._track_details = on

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def push(self, entry: Expect) -> None:
        """Register the response expectation of a message about to be sent (or a synthesized reply).

        A synthesized reply at the head of the queue goes out with the first upstream reply that follows
        it (one write to the client); ``flush_synth()`` sends it at once when no upstream reply will come.
        """
        self.expect.append(entry)

    def flush_synth(self) -> None:
        """After a batch is sent: if only synthesized replies are queued, the client gets them now."""
        expect = self.expect
        if expect and expect[-1].kind == K_SYNTH and all(e.kind == K_SYNTH for e in expect):
            data = b"".join(e.data for e in expect)
            expect.clear()
            if self.sink is not None:
                self.sink.upstream_data(data)

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
            # A large message arriving: its chunks are joined once, when it is complete (linear cost).
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._parts)
            self._parts = None
        # ``buf`` is immutable bytes, so slices of it can be handed to the client's transport as they are.
        buf = self._buf + data if self._buf else data
        try:
            used = self._handshake_messages(buf) if self._handshake is not None else self._pump(buf)
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
                _sqlstate(self.farewell, 0, len(self.farewell)),
                "yes" if self.sink is not None else "no",
            )
            self.abort()
            return
        if used >= len(buf):
            self._buf = b""
            return
        self._buf = rest = buf[used:] if used else buf
        if len(rest) >= 5:
            need = 1 + _HEADER.unpack_from(rest)[1]
            if need - len(rest) > COLLECT_FROM:
                self._parts = [rest]
                self._have = len(rest)
                self._need = need
                self._buf = b""

    def _pump(self, buf: bytes) -> int:  # noqa: PLR0915  (the hot loop, one frame on purpose)
        """Route complete messages in ``buf`` per the expectation queue; returns bytes consumed.

        What goes to the client is gathered in ``out`` (runs of ``buf`` and synthesized replies, in
        order) and written once per call, or before the lease can end at ReadyForQuery.
        """
        expect = self.expect
        n = len(buf)
        pos = 0
        run = 0  # start of the current run of bytes to forward
        out: list[bytes | memoryview] = []
        view = memoryview(buf)
        unpack = _HEADER.unpack_from
        if expect and expect[0].kind == K_SYNTH:
            # Replies the proxy made for messages it did not send (a cached Parse): they come first.
            self._take_synth(out, view, 0, 0)
        while pos + 5 <= n:
            mtype, length = unpack(buf, pos)
            end = pos + 1 + length
            if length < 4 or length > MAX_BACKEND_MESSAGE:
                raise ProxyError(PROTOCOL_VIOLATION, f"invalid message length {length} from upstream")
            if end > n:
                break
            if not expect:
                # Nothing expected: only asynchronous messages may arrive (notices, notifications, status),
                # or the FATAL of a backend that ends on its own (terminated, idle-in-transaction timeout).
                if mtype == _S:
                    self._parameter_status(buf, pos, end)
                elif mtype == _E:
                    # Not forwarded here: whether the client hears of it is upstream_lost's decision.
                    if pos > run:
                        out.append(view[run:pos])
                    self.farewell = bytes(buf[pos:end])
                    run = pos = end
                    break
                elif mtype not in (_N, _A):
                    raise ProxyError(PROTOCOL_VIOLATION, f"unexpected message {chr(mtype)!r} from upstream")
                pos = end
                continue
            entry = expect[0]
            if mtype == _Z and entry.kind != K_SYNC:
                # The server skipped these messages (it was still skipping after an earlier error,
                # which a Flush-terminated batch reported): their replies never come.
                entry = self._skip_to_next_sync()
            if entry.action != FORWARD:
                # Injected by the proxy: close the run before this message and drop the message, except an
                # error of a re-prepare, which the client must see (its own Bind will be skipped).
                if pos > run:
                    out.append(view[run:pos])
                run = end
                if mtype == _S:
                    # A setting the proxy replayed: the client should see the value it now has.
                    out.append(view[pos:end])
                elif mtype == _D and entry.on_row is not None:
                    entry.on_row(bytes(buf[pos + 5 : end]))
                elif mtype == _E:
                    if entry.action == SWALLOW_OK:
                        out.append(bytes(buf[pos:end]))
                    else:
                        log.warning(
                            "event=injected_statement_failed upstream=%s sqlstate=%s",
                            self.label,
                            _sqlstate(buf, pos, end),
                        )
            if mtype == _Z:
                self.status = buf[pos + 5]
                pos = end
                expect.popleft()
                if entry.on_done is not None:
                    entry.on_done(True)
                if self.needs_sync:
                    # Cleared only when no extended messages without a Sync after them remain queued.
                    self.needs_sync = bool(expect) and expect[-1].kind != K_SYNC
                if expect and expect[0].kind == K_SYNTH:
                    run = self._take_synth(out, view, run, pos)
                if entry.action == FORWARD or entry.on_row is not None:
                    sink = self.sink
                    if sink is not None:
                        if pos > run:
                            out.append(buf if run == 0 and pos == n else view[run:pos])
                        run = pos
                        if self._track_details:
                            # Before the client sees ReadyForQuery (the audit line is written first).
                            sink.upstream_batch_end()
                        if out:
                            _flush(sink, out)
                        sink.upstream_ready(self.status)
                continue
            if mtype == _E:
                if _fatal(buf, pos, end):
                    # The backend exits after this: the client got it (unless the message was the proxy's).
                    self.farewell = bytes(buf[pos:end])
                    self.farewell_forwarded = entry.action != SWALLOW and self.sink is not None
                    pos = end
                    break
                if (
                    entry.retry is not None
                    and self._only_unit_queued()
                    and _stale_plan(buf, pos, end)
                    and entry.retry.applies()
                ):
                    # Drop this error and the ReadyForQuery of the Sync the server now skips to; the
                    # retry's replies are what the client gets.
                    if pos > run:
                        out.append(view[run:pos])
                    run = pos = end
                    retry = entry.retry
                    self._skip_to_sync(entry)
                    if expect:
                        expect[0].action = SWALLOW
                    retry()
                    continue
                if self._track_details and entry.action == FORWARD and self.sink is not None:
                    self.sink.upstream_error_seen(bytes(buf[pos + 5 : end]))
                pos = end
                if entry.kind != K_SYNC:
                    # Extended protocol: the server now skips everything up to the next Sync.
                    self._skip_to_sync(entry)
                    if expect and expect[0].kind == K_SYNTH:
                        run = self._take_synth(out, view, run, pos)
                continue
            if mtype == _S:
                self._parameter_status(buf, pos, end)
            elif mtype == _C:
                if self._track_details and entry.action == FORWARD and self.sink is not None:
                    self.sink.upstream_command_tag(bytes(buf[pos + 5 : end - 1]))
            elif mtype == _G and entry.extended_copy():
                self._copy_in_started()
                entry = expect[0]
            pos = end
            if entry.kind != K_SYNC and mtype in _END[entry.kind]:
                expect.popleft()
                if entry.on_done is not None:
                    entry.on_done(True)
                if expect and expect[0].kind == K_SYNTH:
                    run = self._take_synth(out, view, run, pos)
        if pos > run:
            out.append(view[run:pos])
        if out:
            sink = self.sink
            if sink is not None:
                _flush(sink, out)
        return pos

    def _only_unit_queued(self) -> bool:
        """Whether the expectations queued end at the first Sync (no later batch is in flight)."""
        return sum(1 for e in self.expect if e.kind == K_SYNC) == 1 and self.expect[-1].kind == K_SYNC

    def _skip_to_next_sync(self) -> Expect:
        expect = self.expect
        while expect and expect[0].kind != K_SYNC:
            dropped = expect.popleft()
            if dropped.on_done is not None:
                dropped.on_done(False)
        if not expect:
            raise ProxyError(PROTOCOL_VIOLATION, "ReadyForQuery out of turn from upstream")
        return expect[0]

    def _take_synth(self, out: list[bytes | memoryview], view: memoryview, run: int, pos: int) -> int:
        """Emit synthesized replies now at the head of the queue, after the bytes forwarded so far."""
        if pos > run:
            out.append(view[run:pos])
        expect = self.expect
        while expect and expect[0].kind == K_SYNTH:
            out.append(expect.popleft().data)
        return pos

    def _copy_in_started(self) -> None:
        """COPY FROM STDIN started by an extended-protocol Execute: the server ignores the Sync already
        sent after it, so that Sync's ReadyForQuery never comes; the Execute's unit now ends at
        CommandComplete (or an error), and the client's next Sync gets the ReadyForQuery."""
        expect = self.expect
        head = expect[0]
        if head.kind == K_SYNC:
            head.kind = K_EXECUTE
            return
        for i, entry in enumerate(expect):
            if entry.kind == K_SYNC:
                del expect[i]
                return

    def _skip_to_sync(self, failed: Expect) -> None:
        """After an error the server ignores messages up to Sync: drop their expectations too."""
        expect = self.expect
        expect.popleft()
        if failed.on_done is not None:
            failed.on_done(False)
        while expect and expect[0].kind != K_SYNC:
            dropped = expect.popleft()
            if dropped.on_done is not None:
                dropped.on_done(False)

    def _parameter_status(self, buf: bytes, pos: int, end: int) -> None:
        name, value = m.decode_parameter_status(memoryview(buf)[pos + 5 : end])
        self.parameters[name] = value

    def _handshake_messages(self, buf: bytes) -> int:
        pos = 0
        n = len(buf)
        handshake = self._handshake
        assert handshake is not None and self._auth is not None
        while pos + 5 <= n:
            mtype: int
            length: int
            mtype, length = _HEADER.unpack_from(buf, pos)
            end = pos + 1 + length
            if length < 4 or length > 1 << 20:
                raise ProxyError(PROTOCOL_VIOLATION, f"invalid message length {length} from upstream")
            if end > n:
                break
            payload = bytes(buf[pos + 5 : end])
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


TLS_MODES = frozenset({"prefer", "require", "verify-ca", "verify-full"})


def upstream_tls_context(dsn: Dsn, sslmode: str) -> ssl.SSLContext:
    """The client-side TLS context for an upstream, per libpq's sslmode semantics."""
    if sslmode in ("verify-ca", "verify-full"):
        context = ssl.create_default_context(cafile=dsn.param("sslrootcert"))
        context.check_hostname = sslmode == "verify-full"
    else:  # prefer / require: encrypted, not verified
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    cert, key = dsn.param("sslcert"), dsn.param("sslkey")
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _fatal(buf: bytes, pos: int, end: int) -> bool:
    """Whether the ErrorResponse at ``pos`` is FATAL or PANIC: the backend ends the connection after it."""
    try:
        fields = m.parse_fields(bytes(buf[pos + 5 : end]))
    except ProxyError:
        return False
    return fields.get("V", fields.get("S")) in ("FATAL", "PANIC")


def _sqlstate(buf: bytes, pos: int, end: int) -> str:
    """An error's SQLSTATE only: its message may quote values (a replayed SET's, say)."""
    try:
        fields = m.parse_fields(bytes(buf[pos + 5 : end]))
    except ProxyError:
        return "unreadable"
    return fields.get("C", "unknown")
