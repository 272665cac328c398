"""One client connection: after its login (proxy/frontend/startup.py), batches leased to upstream connections.

The client's byte stream is cut into *batches* at Sync, Query, Flush and FunctionCall (and each COPY
message on its own). A batch is sent upstream on the connection the client holds, or on one leased for it;
the lease ends at ReadyForQuery 'I' with nothing else in flight, unless the client is pinned. Named
prepared statements are renamed to content-addressed upstream names and re-prepared where a connection
lacks them; session settings are replayed when the leased connection's differ from the client's.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import cast

import pglast

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import (
    K_BIND,
    K_DESCRIBE,
    K_EXECUTE,
    K_PARSE,
    K_SYNC,
    SWALLOW,
    Expect,
)
from proxy.context import ClientContext
from proxy.errors import (
    ADMIN_SHUTDOWN,
    CANNOT_CONNECT_NOW,
    FEATURE_NOT_SUPPORTED,
    IN_FAILED_TRANSACTION,
    INTERNAL_ERROR,
    PROTOCOL_VIOLATION,
    READ_ONLY_SQL_TRANSACTION,
    TOO_MANY_CONNECTIONS,
    ProxyError,
)
from proxy.frontend.audited import AuditTrail
from proxy.frontend.prepared import (
    SYNC_EXT,
    SYNC_Q,
    Piece,
    Statements,
)
from proxy.frontend.reads import Reads
from proxy.frontend.ryw import PARAMETER, Capture, format_lsn, min_lsn_statement
from proxy.frontend.session import (
    Session,
)
from proxy.frontend.startup import (
    AUTH,
    CLOSED,
    LOGIN,
    MAX_AUTH_MESSAGE,
    READY,
    STARTUP,
    Login,
)
from proxy.frontend.txstate import (
    BETWEEN,
    PROCEED,
    ROLLBACK_INSTEAD,
    SWITCH,
    Input,
    Lease,
    LeaseEv,
    Tx,
    TxState,
)
from proxy.protocol import messages as m
from proxy.protocol.framing import Collector, collector
from proxy.protocol.scan import extended_unit
from proxy.router.classify import (
    F_FORGET_PREPARED,
    F_PIN,
    F_SAVEPOINT,
    F_SESSION_SET,
    INLINE_BYTES,
    MAX_CLASSIFY_BYTES,
    TX_BEGIN,
    TX_BEGIN_READ_ONLY,
    TX_COMMIT,
    TX_ROLLBACK,
    UNCLASSIFIED,
    Analysis,
    Classification,
    SessionChange,
    deallocate_target,
    merge,
    session_changes,
)
from proxy.router.policy import MAIN, TX_READ_ONLY, TX_READ_WRITE, WRITE, Decision, route_override
from proxy.router.policy import REPLICA as REPLICA_ROLE
from proxy.sockets import set_nodelay

log = logging.getLogger("parafort.client")

_HEADER = struct.Struct("!BI")
_P, _B, _D, _E, _C, _S, _H, _Q, _X, _F = b"PBDECSHQXF"
_COPY = frozenset(b"dcf")
_TERMINATORS = frozenset(b"SHQF")
_BATCHED = frozenset(b"PBDECSHQF")
_QUERY_PARSE = frozenset(b"QP")
MAX_BATCH_BYTES = 256 * 1024
_OVERRIDE_START = (b"/", b" ", b"\t", b"\r", b"\n")
_REFUSAL_HINT = (
    "Each statement (and each transaction) runs on one upstream. Split the statement, or configure the "
    "domain map so these tables live together."
)
_IDLE = ord("I")

# States of TxState read on every batch, as module constants (a global is the cheapest look-up).
_SKIPPING = Input.SKIPPING
_READING = Input.READING
_LINGERING = Lease.LINGERING
_PINNED = Lease.PINNED
_HELD = Lease.HELD
_UPSTREAM_TX = Tx.UPSTREAM
_UNLINGER = LeaseEv.UNLINGER
_LENGTH = struct.Struct("!I")

_ids = itertools.count(1)


def _send_rewritten(  # noqa: PLR0917  (positional: the cheapest call, on the data path)
    server: ServerConnection,
    batch: Batch,
    view: memoryview,
    out: list[Piece],
    ents: list[Expect | int],
    run: int,
    special: bool,
) -> None:
    """The end of ``ClientConnection._send`` for a batch other than the common case: its expectations, then
    the pieces in ``out`` and the client's bytes from ``run`` on, in one write. ``special``: an expectation
    other than forwarding replies is in ``ents`` (then each is registered; else one for the final Sync or
    Query). In a batch that ends in Sync, Query or FunctionCall, the plain replies after the last special
    entry are forwarded as part of the final Sync's (or Query's) unit: no expectation of their own."""
    terminator = batch.terminator
    push = server.push
    if special or terminator not in (_S, _Q, _F):
        if terminator in (_S, _Q, _F):
            last = len(ents) - 1
            while last > 0 and isinstance(ents[last - 1], int):
                last -= 1
            ents[last:] = ents[-1:]
        else:
            server.needs_sync = True
        for entry in ents:
            if isinstance(entry, int):
                # sync_entry, inline: the last entry of most batches
                push(Expect(entry) if entry >= 0 else Expect(K_SYNC, extended=entry == SYNC_EXT))
            else:
                push(entry)
    else:
        push(Expect(K_SYNC, extended=ents[-1] == SYNC_EXT))  # sync_entry, inline
    if run == batch.start and not out:
        buf = batch.buf
        server.send(buf if batch.start == 0 and batch.end == len(buf) else view[batch.start : batch.end])
        return
    if batch.end > run:
        out.append(view[run : batch.end])
    server.send(b"".join(out))
    if special:
        server.flush_synth()


class Batch:
    """Client messages up to a terminator: offsets into the (immutable) bytes they arrived in."""

    __slots__ = ("analyses", "buf", "end", "info", "msgs", "start", "terminator")

    def __init__(self, buf: bytes, msgs: list[tuple[int, int, int]], start: int, end: int, term: int) -> None:
        self.buf = buf
        self.msgs = msgs  # (type, start, end) of each message, offsets into ``buf``
        self.start = start
        self.end = end
        self.terminator = term  # Sync, Query, Flush or FunctionCall; 0 for a part of an oversized batch
        self.info: Classification | None = None  # a lone Query's classification, once the router made it
        # Statements above INLINE_BYTES, analysed off the event loop: by their message's start offset.
        self.analyses: dict[int, Analysis] | None = None

    def queries(self) -> Iterator[str]:
        """The SQL texts in this batch (Query and Parse), for the router."""
        buf = self.buf
        for mtype, start, end in self.msgs:
            if mtype == _Q:
                yield m.decode_query(buf[start + 5 : end])
            elif mtype == _P:
                yield m.decode_parse(buf[start + 5 : end])[1]


def _count_route(
    client: ClientConnection, role: str, kind: str, batch: Batch, info: Classification | None
) -> None:
    """A unit sent to ``role`` counted by kind; while a migrating role streams, a read is offered to the
    shadow reads (proxy/migration/shadow.py keeps a sample of the reads of that role's tables)."""
    routed = client.app.routed
    routed[role, kind] = routed.get((role, kind), 0) + 1
    if kind == WRITE:
        if role == MAIN and client.reads.key is not None:
            client.reads.wrote = True  # its WAL position is captured when the unit (or its transaction) ends
    elif info is not None and client.app.migration.shadow.active:
        domains = tuple(sorted({client.app.router.domain_of(table) for table in info.tables}))
        client.app.migration.shadow.offer(domains, batch.buf, batch.msgs, client.session.statements)


class ClientConnection(asyncio.Protocol):
    """See the module docstring."""

    def __init__(self, app: ClientContext[ClientConnection]) -> None:
        self.app = app
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.phase = STARTUP
        self.user = ""
        self.database = ""
        self.params: dict[str, str] = {}
        self.session = Session({})
        self.key = (0, 0)
        self.server: ServerConnection | None = None
        self.server_role = ""  # the role of the connection held (or last held)
        self.server_pool = ""  # its pool: the role, or a replica's name
        # Transaction, lease and input state (proxy/frontend/txstate.py): a BEGIN the proxy answered, a
        # refusal inside a transaction, lingering, pinning, the batch that waits and why.
        self.tx: TxState[Batch] = TxState()
        self._stmt_info: dict[str, Classification] = {}
        self._unnamed_info: Classification | None = None
        self.buf = b""
        self._parts: Collector | None = None  # a large message being received
        self._main_rechecked: Batch | None = None  # the batch being decided again after main_reachable
        self._classifying: asyncio.Task[None] | None = None  # large statements of ``waiting`` being analysed
        self._console_task: asyncio.Task[None] | None = None  # an admin command that asks a database
        self.login = Login(self)  # startup, authentication, greeting (proxy/frontend/startup.py)
        self._paused_by: set[str] = set()
        self._write_paused = False
        self.connected_at = time.monotonic()
        self._audit = AuditTrail()  # compliance units in flight (proxy/frontend/audited.py)
        self.admin = False  # connected to the admin console (database admin.database)
        self.tls = False
        # Outcome tracking for session changes and DISCARD while a batch is in flight.
        self._error_seen = False
        self._last_tag = b""
        self._staged_in_tx = False
        self._forget_prepared = False
        self._server_dirty = False
        # The client's unnamed statement and the re-prepares its batches need (proxy/frontend/prepared.py).
        self.statements = Statements(app)
        # SET statements sent through the extended protocol take effect when their portal is executed.
        self._stmt_changes: dict[str, list[SessionChange]] = {}
        self._unnamed_changes: list[SessionChange] = []
        self._portal_changes: dict[str, list[SessionChange]] = {}
        # Read-your-writes (proxy/frontend/reads.py): scope, parafort.min_lsn, a write awaiting capture.
        self.reads: Reads[Batch] = Reads(self.id)

    @property
    def lingering(self) -> bool:
        return self.tx.lease is _LINGERING

    @property
    def pinned(self) -> str | None:
        """Why this client is pinned to its connection (None: it is not)."""
        return self.tx.pin_reason

    @property
    def waiting(self) -> Batch | None:
        """The batch waiting for an upstream connection, a classification, a replica or main."""
        return self.tx.waiting

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
        elif self.server is not None and _fast_unit(self, data):
            return
        else:
            self.buf = self.buf + data if self.buf else data
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

    def _resume_batch(self, reason: Input, dispatch: Callable[[], None]) -> None:
        """A batch that waited (classification, a replica to catch up, main's recheck) goes on: reading
        resumes, the batch is dispatched, then whatever the client sent meanwhile."""
        self.tx.go_on()
        self.resume(reason.value)
        self._guarded(dispatch)
        if self.phase != CLOSED and self.tx.waiting is None and self.buf:
            self._guarded(self._process)

    def _hold(self, batch: Batch, reason: Input) -> None:
        """``batch`` waits, reading from the client paused, until ``reason`` is settled."""
        self.tx.wait(batch, reason)
        self.pause(reason.value)

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

    def _messages(self) -> None:
        """Cut the buffered input into batches and dispatch them, until it runs out or one must wait."""
        buf = self.buf
        n = len(buf)
        pos = bstart = 0
        msgs: list[tuple[int, int, int]] = []
        limit = self.app.max_message_length
        unpack = _HEADER.unpack_from
        tx = self.tx
        # Entered READY with no batch waiting; only a dispatch changes that (checked after each one).
        while pos + 5 <= n:
            mtype, length = unpack(buf, pos)
            if length < 4 or length > limit:
                raise ProxyError(PROTOCOL_VIOLATION, f"invalid message length {length}", severity="FATAL")
            end = pos + 1 + length
            if end > n:
                break
            if mtype in _BATCHED:
                msgs.append((mtype, pos, end))
                pos = end
                if mtype in _TERMINATORS:
                    batch = Batch(buf, msgs, bstart, pos, mtype)
                elif pos - bstart > MAX_BATCH_BYTES:
                    batch = Batch(buf, msgs, bstart, pos, 0)  # send a huge pipeline in parts
                else:
                    continue
                msgs = []
                bstart = pos
                self._dispatch(batch)
                if tx.waiting is not None or self.phase != READY:
                    break
                continue
            if msgs:
                raise ProxyError(
                    PROTOCOL_VIOLATION,
                    f"unexpected message type {chr(mtype)!r} inside a batch",
                    severity="FATAL",
                )
            pos = bstart = end
            if mtype in _COPY:
                # COPY data goes straight to the upstream connection running the COPY.
                if self.server is not None and tx.input is not _SKIPPING:
                    self.server.send(buf[end - 1 - length : end])
            elif mtype == _X:
                self._shutdown()
                return
            else:
                raise ProxyError(
                    PROTOCOL_VIOLATION, f"invalid frontend message type {mtype}", severity="FATAL"
                )
        if bstart >= n:
            self.buf = b""
            return
        self.buf = rest = buf[bstart:] if bstart else buf
        if pos + 5 <= n and tx.waiting is None and self.phase == READY:
            # The loop stopped at an incomplete message (its length was checked): collect the rest.
            self._parts = collector(rest, pos - bstart)
            if self._parts is not None:
                self.buf = b""

    def _dispatch(self, batch: Batch) -> None:
        """Route one batch: answer it here, send it on the connection held, or lease one for it."""
        tx = self.tx
        if tx.input is _SKIPPING:
            # After an error the proxy reported itself, PostgreSQL's rule: ignore everything up to Sync.
            if batch.terminator == _S:
                tx.synced()
                self.write(m.ready_for_query(self._status()))
            return
        if self.admin:
            self._console(batch)
            return
        if batch.end - batch.start > INLINE_BYTES and batch.analyses is None and self._classify_later(batch):
            return
        server = self.server
        if batch.terminator == _H and len(batch.msgs) == 1 and (server is None or not server.expect):
            # A Flush with nothing in flight (psycopg's pipeline sends one after its Sync): nothing to flush.
            # Sent upstream it would hold that connection for this client until the next Sync.
            return
        single_query = len(batch.msgs) == 1 and batch.terminator == _Q
        info, override = self._unit_info(batch)
        if single_query:
            batch.info = info
            if info is not None and info.bits & F_SESSION_SET and self._min_lsn_statement(batch, server):
                return
            if tx.pin_reason is None and info is not None and info.bits & F_FORGET_PREPARED:
                reply = self._local_deallocate(batch)
                if reply is not None and (server is None or not server.expect):
                    self.write(reply + m.ready_for_query(self._status()))
                    return
        elif info is not None and info.bits & F_SESSION_SET and self._min_lsn_extended(batch, server, info):
            return
        if server is None or tx.lease is _LINGERING:
            self._dispatch_unit(batch, info, override, single_query)
        elif tx.lease is not _PINNED and server.expect and server.expect[-1].on_row:
            # Only main's WAL position after this client's write is in flight: the client is between
            # transactions, and the unit is routed afresh once that reply has ended the lease.
            self._wait(batch, MAIN)
        elif tx.stays_on_held(server.status, server.needs_sync):
            self._dispatch_held(batch, info, server)
        else:
            decision = self._decide(info, override)
            if decision.role is None:
                self._refuse(batch, decision, in_transaction=False)
            elif self.app.migration.hold.roles and self.app.migration.hold.holds(decision.domains):
                self._wait(batch, decision.role)  # routed afresh, and held, once this upstream is done
            elif (decision.role == self.server_role or info is None) and (
                decision.role != REPLICA_ROLE
                or self.reads.same_replica(self.app.consistency, self.server_pool)
            ):
                _count_route(self, self.server_role, decision.kind, batch, info)
                if decision.fallback_writes:
                    self.app.count_fallback_writes(decision.fallback_writes)
                self._send(batch, server)  # pipelined behind the unit in flight, same upstream
            else:
                self._wait(batch, decision.role)  # another upstream: once this one is done with us

    def _dispatch_held(self, batch: Batch, info: Classification | None, server: ServerConnection) -> None:
        """Inside a transaction (or pinned, or after extended messages that no Sync has ended yet, such as
        asyncpg's Parse/Describe/Flush): the unit runs on the connection held, if it can."""
        if self.tx.failed and not self._failed_tx_unit(batch, info):
            return
        router = self.app.router
        if info is not None:
            refusal, kind = router.in_transaction_cached(info, self.server_role)
            if refusal is not None:
                self._refuse(batch, refusal, in_transaction=server.status != _IDLE)
                return
            _count_route(self, self.server_role, kind, batch, info)
            if router.on_fallback:
                self._count_fallback_writes(router.fallback_writes(info))
        self._send(batch, server)

    def _dispatch_unit(
        self, batch: Batch, info: Classification | None, override: str | None, single_query: bool
    ) -> None:
        """No connection held, or one lingering between transactions: answer the unit here (transaction
        control the proxy defers), or route it and send it on a connection, leasing one if needed."""
        tx = self.tx
        if (tx.begin is not None or (info is not None and info.tx is not None)) and self._answer_control(
            batch, info, single_query
        ):
            return
        decision = self._decide(info, override)
        if decision.role is None:
            if decision.sqlstate == READ_ONLY_SQL_TRANSACTION and batch is not self._main_rechecked:
                self._recheck_main(batch)  # main down: unless it takes connections again
                return
            self._refuse(batch, decision, in_transaction=tx.begin is not None)
            return
        if self.app.migration.hold.roles and self.app.migration.hold.holds(decision.domains) is not None:
            if self.server is not None:
                self._release()  # lingering between transactions: nothing of the client's on it
            self._dispatch_after(batch, Input.HOLD, self.app.migration.hold.wait(decision.domains))
            return
        role = decision.role
        label: str | None = None
        reads = self.reads
        if role == REPLICA_ROLE and (reads.key is not None or reads.min_lsn is not None):
            routed = reads.route(self.app.consistency, batch)
            if routed is None:
                # Wait for a replica to catch up (or the scope's last write position).
                self._dispatch_after(batch, Input.CONSISTENCY, reads.wait(self.app.consistency, batch))
                return
            role, label = routed
        if decision.fallback_from:
            self._count_fallback(decision.fallback_from)
            self._count_fallback_writes(decision.fallback_writes)
        _count_route(self, role, decision.kind, batch, info)
        server = self.server
        if self.app.is_paused(role):
            # PAUSE: the new transaction waits (no timeout) until RESUME; nothing fails.
            if server is not None:
                self._release()
            self._hold(batch, Input.ACQUIRE)
            asyncio.get_running_loop().create_task(self._acquire(batch, role, self.app.pool_for(role)))
            return
        if server is not None:  # lingering between transactions
            if role == self.server_role and (label is None or label == self.server_pool):
                tx.lease_event(LeaseEv.UNLINGER)
                self.app.pools[self.server_pool].unlinger(server)
                self._send(batch, server)
                return
            self._release()
        label = label or self.app.pool_for(role)
        conn = self.app.pools[label].try_acquire()
        if conn is not None:
            self._attach(conn, role, label)
            self._send(batch, conn)
            return
        self._hold(batch, Input.ACQUIRE)
        if not self.app.pools[label].wait(functools.partial(self._handed, batch, role, label)):
            asyncio.get_running_loop().create_task(self._acquire(batch, role, label))

    def _answer_control(self, batch: Batch, info: Classification | None, single_query: bool) -> bool:
        """BEGIN waits for the statement that decides the upstream; COMMIT/ROLLBACK of a transaction that
        never reached one, and a lone Sync (or Flush) after such a BEGIN, are answered here, as is a unit
        in a failed deferred transaction. True when the unit was answered."""
        tx = self.tx
        if single_query and info is not None and info.tx is not None and tx.pin_reason is None:
            _, start, end = batch.msgs[0]
            read_only = info.tx == TX_BEGIN_READ_ONLY
            self.write(tx.transaction_control(info.tx, batch.buf[start:end], read_only))
            return True
        if info is None and tx.begin is not None and not tx.failed and len(batch.msgs) == 1:
            # A lone Sync (or Flush) after a BEGIN the proxy answered: still nothing to run anywhere.
            if batch.terminator == _S:
                self.write(m.ready_for_query(b"T"))
                return True
            if batch.terminator == _H:
                return True
        if (
            info is not None
            and info.tx in (TX_BEGIN, TX_BEGIN_READ_ONLY)
            and not single_query
            and tx.pin_reason is None
            and not tx.failed
            and self._deferred_extended_begin(batch, info)
        ):
            return True
        if (
            info is not None
            and info.tx in (TX_COMMIT, TX_ROLLBACK)
            and not single_query
            and tx.begin is not None
            and tx.pin_reason is None
            and self._deferred_extended_end(batch, info)
        ):
            return True
        if tx.failed and tx.begin is not None:
            # Refused, or answered 25P02 here; a ROLLBACK [TO SAVEPOINT] among other messages goes on.
            return not self._failed_tx_unit(batch, info)
        return False

    def _deferred_extended_end(self, batch: Batch, info: Classification) -> bool:
        """COMMIT or ROLLBACK as Parse/Bind/[Describe]/Execute alone up to Sync or Flush (JDBC ends every
        transaction so) in a transaction whose BEGIN the proxy answered and no statement has run: answered
        here, as the simple-protocol one is (COMMIT of a transaction the proxy failed reports ROLLBACK, as
        PostgreSQL does). True when the unit was answered."""
        lone = _lone_unnamed_statement(batch)
        if lone is None:
            return False
        (start, end), replies = lone
        replies.append(
            m.command_complete(self.tx.end_deferred(TX_COMMIT if info.tx == TX_COMMIT else TX_ROLLBACK))
        )
        self._unnamed_answered(batch.buf[start:end], info, [])
        if batch.terminator == _S:
            replies.append(m.ready_for_query(b"I"))
        self.write(b"".join(replies))
        return True

    def _unnamed_answered(self, raw: bytes, info: Classification, changes: list[SessionChange]) -> None:
        """The proxy answered the unnamed statement ``raw`` (a Parse) itself: it is now the client's unnamed
        statement, with its classification and session changes; a later Bind of it parses it upstream."""
        self.statements.answered_locally(raw)
        self._unnamed_info = info
        self._unnamed_changes = changes

    def _handed(
        self, batch: Batch, role: str, label: str, conn: ServerConnection | None, error: ProxyError | None
    ) -> None:
        """The pool's answer to ``wait``: a connection, a free slot to open one in, or the timeout."""
        if self.phase == CLOSED:
            if conn is not None:
                self.app.pools[label].release(conn)
            return
        if error is not None:
            self._acquire_failed(batch, error)
        elif conn is None:
            asyncio.get_running_loop().create_task(self._acquire(batch, role, label))
            return
        elif not self._acquired(batch, conn, role, label):
            return
        self.resume("acquire")
        if self.phase != CLOSED and self.buf:
            self.data_received(b"")

    # -- read-your-writes -----------------------------------------------------------------------------------
    def _dispatch_after(self, batch: Batch, reason: Input, settled: Awaitable[None]) -> None:
        """``batch`` waits for ``settled`` (a replica to catch up; a cutover's hold, proxy/migration/hold.py),
        then is dispatched afresh: routed by what is true then."""
        self._hold(batch, reason)
        asyncio.get_running_loop().create_task(self._redispatch(batch, reason, settled))

    async def _redispatch(self, batch: Batch, reason: Input, settled: Awaitable[None]) -> None:
        await settled
        if self.phase != CLOSED:
            self._resume_batch(reason, lambda: self._dispatch(batch))

    def captured(self, capture: Capture, lsn: int | None) -> None:
        """A capture's reply arrived: the client hears its position (a message boundary: the capture's
        reply was the last thing read, and nothing of a later reply has been forwarded yet)."""
        key = capture.key
        if self.phase == CLOSED:
            if key[0] == "connection":
                self.app.consistency.writes.forget(key)
            return
        if lsn is not None:
            token = max(lsn, self.app.consistency.writes.tokens.get(key, 0))
            self.write(m.parameter_status(PARAMETER, format_lsn(token)))

    def _min_lsn_statement(self, batch: Batch, server: ServerConnection | None) -> bool:
        """SET / RESET parafort.min_lsn: answered by the proxy; True when the unit was answered."""
        if self.tx.failed:
            return False
        _, start, end = batch.msgs[0]
        found = Reads.min_lsn_command(batch.buf[start + 5 : end - 1])
        if found is None:
            return False
        if server is not None and (server.status == ord("E") or (server.expect and not self.tx.lingering)):
            return False  # in a failed transaction, or replies in flight: PostgreSQL answers (a placeholder)
        self.write(self.reads.set_min_lsn(*found) + m.ready_for_query(self._status()))
        return True

    def _count_fallback(self, roles: tuple[str, ...]) -> None:
        fallbacks = self.app.fallbacks
        for role in roles:
            fallbacks[role] = fallbacks.get(role, 0) + 1

    def _count_fallback_writes(self, writes: tuple[tuple[str, str], ...]) -> None:
        if writes:
            self.app.count_fallback_writes(writes)

    def _recheck_main(self, batch: Batch) -> None:
        """Main is marked down, so this unit would be refused (25006): first let the app try one
        connect to main (shared by all clients asking meanwhile); if main is back, it runs there."""
        self._hold(batch, Input.RECHECK)
        asyncio.get_running_loop().create_task(self._after_main_recheck(batch))

    async def _after_main_recheck(self, batch: Batch) -> None:
        await self.app.main_reachable()
        if self.phase == CLOSED:
            return

        def dispatch() -> None:
            self._main_rechecked = batch  # decided again with main's new state; refused now if still down
            try:
                self._dispatch(batch)
            finally:
                self._main_rechecked = None

        self._resume_batch(Input.RECHECK, dispatch)

    def _status(self) -> bytes:
        """The transaction status to report in a ReadyForQuery the proxy makes itself."""
        server = self.server
        return self.tx.status(None if server is None else server.status)

    def _unit_info(self, batch: Batch) -> tuple[Classification | None, str | None]:
        """The classification of everything the unit executes, and a /* route: */ override if any."""
        buf = batch.buf
        classifier = self.app.classifier
        msgs = batch.msgs
        if len(msgs) == 1 and msgs[0][0] == _Q and msgs[0][2] - msgs[0][1] - 6 <= INLINE_BYTES:
            # A lone simple query (the common unit): the loop below, for one message.
            sql = buf[msgs[0][1] + 5 : msgs[0][2] - 1]
            if sql[:1] in _OVERRIDE_START and sql.lstrip().startswith(b"/*"):
                return classifier.classify_bytes(sql), route_override(sql.decode(errors="replace"))
            return classifier.classify_bytes(sql), None
        infos: list[Classification] = []
        override = None
        # Statements parsed in this unit (their Binds are classified by their Parse): the unnamed, others.
        unnamed_parsed = False
        parsed: set[str] | None = None
        for mtype, start, end in msgs:
            if mtype in _QUERY_PARSE:
                if mtype == _Q:
                    lo, hi = start + 5, end - 1
                else:
                    name_end = buf.index(0, start + 5, end)
                    lo, hi = name_end + 1, buf.index(0, name_end + 1, end)
                    if name_end == start + 5:
                        unnamed_parsed = True
                    else:
                        if parsed is None:
                            parsed = set()
                        parsed.add(buf[start + 5 : name_end].decode(errors="surrogateescape"))
                if hi - lo > INLINE_BYTES:
                    deep = batch.analyses.get(start, UNCLASSIFIED) if batch.analyses else UNCLASSIFIED
                    infos.append(deep.info)
                    override = deep.override or override
                    continue
                sql = buf[lo:hi]
                infos.append(classifier.classify_bytes(sql))
                if sql[:1] in _OVERRIDE_START and sql.lstrip().startswith(b"/*"):
                    override = route_override(sql.decode(errors="replace")) or override
            elif mtype == _B:
                if buf[start + 5] == 0 and buf[start + 6] == 0:
                    if not unnamed_parsed and self._unnamed_info is not None:
                        infos.append(self._unnamed_info)
                    continue
                _, name, _ = m.decode_bind_names(buf[start + 5 : end])
                if not (unnamed_parsed if not name else parsed is not None and name in parsed):
                    stmt = self.session.statements.get(name)
                    if stmt is not None:
                        infos.append(self._stmt_info.get(name) or classifier.classify(stmt.sql))
        if not infos:
            return None, override
        return (infos[0] if len(infos) == 1 else merge(infos)), override

    def _classify_later(self, batch: Batch) -> bool:
        """Statements above INLINE_BYTES are analysed in the classifier child (proxy/router/worker.py), never
        on the event loop. True when the batch must wait for that; reading from the client is paused
        meanwhile (as for a pool) and everyone else is served. ``batch.analyses`` is set either way."""
        worker = self.app.classifier_worker
        buf = batch.buf
        found: dict[int, Analysis] = {}
        pending: list[tuple[int, bytes, bytes]] = []  # (message start, SQL, its digest)
        for mtype, start, end in batch.msgs:
            if mtype == _Q:
                lo, hi = start + 5, end - 1
            elif mtype == _P:
                lo = buf.index(0, start + 5, end) + 1
                hi = buf.index(0, lo, end)
            else:
                if mtype == _B:
                    m.decode_bind_names(buf[start + 5 : end])  # malformed: refused now, not after the wait
                continue
            if hi - lo <= INLINE_BYTES:
                continue
            if hi - lo > MAX_CLASSIFY_BYTES:
                found[start] = UNCLASSIFIED  # not parsed at all: PostgreSQL judges it
                continue
            sql = buf[lo:hi]
            key, deep = worker.cached(sql)
            if deep is None:
                pending.append((start, sql, key))
            else:
                found[start] = deep
        batch.analyses = found
        if not pending:
            return False
        self._hold(batch, Input.CLASSIFY)
        self._classifying = asyncio.get_running_loop().create_task(self._classify(batch, found, pending))
        return True

    async def _classify(
        self, batch: Batch, found: dict[int, Analysis], pending: list[tuple[int, bytes, bytes]]
    ) -> None:
        worker = self.app.classifier_worker
        for start, sql, key in pending:
            found[start] = await worker.analyze(sql, key)  # cancelled if the client goes
        self._classifying = None
        if self.phase == CLOSED:
            return
        self._resume_batch(Input.CLASSIFY, lambda: self._dispatch(batch))

    def _decide(self, info: Classification | None, override: str | None) -> Decision:
        tx = self.tx.begin_mode
        if info is None:
            # Nothing executes (Sync, Describe of a portal, Close...): wherever the client last was.
            if tx == TX_READ_WRITE:  # a BEGIN the proxy answered: a read-write transaction opens on main
                return Decision("read", (), MAIN, "no statement, in a read-write transaction: main")
            role = self.server_role or MAIN
            return Decision("read", (), role, "no statement: stays where it is")
        if info.tx in (TX_BEGIN, TX_BEGIN_READ_ONLY) and tx is None:
            tx = TX_READ_ONLY if info.tx == TX_BEGIN_READ_ONLY else TX_READ_WRITE
        return self.app.router.decide_cached(info, override, tx)

    def _deferred_extended_begin(self, batch: Batch, info: Classification) -> bool:
        """Parse/Bind/[Describe]/Execute of BEGIN alone up to Sync (or Flush), as pipelining drivers send it:
        answered here and sent with the next unit, exactly as a simple-protocol BEGIN is, so the first real
        statement chooses the upstream. True when the unit was answered; anything else (a named statement,
        a Bind of an earlier Parse) goes upstream as it is."""
        lone = _lone_unnamed_statement(batch)
        if lone is None:
            return False
        (start, end), replies = lone
        buf = batch.buf
        if self.tx.begin is not None:
            replies.append(
                m.notice_response("WARNING", "25001", "there is already a transaction in progress")
            )
        replies.append(m.command_complete("BEGIN"))
        self.tx.defer_begin(m.query(m.decode_parse(buf[start + 5 : end])[1]), info.tx == TX_BEGIN_READ_ONLY)
        self._unnamed_answered(buf[start:end], info, [])
        if batch.terminator == _S:
            replies.append(m.ready_for_query(b"T"))
        self.write(b"".join(replies))
        return True

    def _min_lsn_extended(self, batch: Batch, server: ServerConnection | None, info: Classification) -> bool:
        """Parse/Bind/[Describe]/Execute of ``SET parafort.min_lsn`` (or RESET) alone up to Sync or Flush, as
        JDBC and psycopg's pipeline mode send it: answered here like the simple-protocol statement. True
        when the unit was answered. The same statement sent any other way (a named statement, or among
        other statements before the Sync) reaches PostgreSQL as a placeholder setting and takes effect in
        the proxy once it succeeded (``_settle``, ``Reads.settled``)."""
        if self.tx.failed or (server is not None and (server.status == ord("E") or server.expect)):
            return False
        lone = _lone_unnamed_statement(batch)
        if lone is None:
            return False
        (start, end), replies = lone
        _, sql, _ = m.decode_parse(batch.buf[start + 5 : end])
        found = min_lsn_statement(sql) if "parafort" in sql.lower() else None
        if found is None:
            return False
        error = self.reads.apply_min_lsn(found[1])
        # A later Bind of it runs it upstream, a placeholder setting that takes effect here once it succeeds.
        self._unnamed_answered(batch.buf[start:end], info, session_changes(sql))
        if error is None:
            replies.append(m.command_complete(found[0]))
        else:
            replies.append(error)
            if batch.terminator != _S:
                self.tx.skip_until_sync()  # PostgreSQL's rule after an error: up to the next Sync
        if batch.terminator == _S:
            replies.append(m.ready_for_query(self._status()))
        self.write(b"".join(replies))
        return True

    def _failed_tx_unit(self, batch: Batch, info: Classification | None) -> bool:
        """The proxy refused a statement in this transaction, so to the client it is aborted: only
        ROLLBACK (or ROLLBACK TO SAVEPOINT) proceeds; COMMIT becomes ROLLBACK, as PostgreSQL does.
        True when the unit proceeds."""
        tx = info.tx if info is not None else None
        rollback = tx == TX_ROLLBACK or (
            info is not None and bool(info.bits & F_SAVEPOINT) and _rolls_back_to(batch)
        )
        server = self.server
        commit_on_held = (
            tx == TX_COMMIT and server is not None and len(batch.msgs) == 1 and batch.terminator == _Q
        )
        verdict = self.tx.failed_unit(rollback, commit_on_held)
        if verdict is PROCEED:
            return True
        if verdict is ROLLBACK_INSTEAD and server is not None:
            server.push(Expect(K_SYNC))
            server.send(m.query("ROLLBACK"))
            return False
        error = ProxyError(
            IN_FAILED_TRANSACTION,
            "current transaction is aborted, commands ignored until end of transaction block",
        )
        self.write(m.error_from(error))
        self._after_failed_batch(batch)
        return False

    def _refuse(self, batch: Batch, decision: Decision, *, in_transaction: bool) -> None:
        """The unit cannot run (0A000: it needs two upstreams; 57P03: its role is down; 25006: main is
        down): an error, and the client carries on."""
        if decision.down is not None:
            self.app.count_down_refusal(decision.down)  # counted, not logged per statement (an outage)
        else:
            self.app.refusals += 1
            log.info("event=refused client=%s reason=%r", self.id, decision.message)
        self.write(
            m.error_from(ProxyError(decision.sqlstate or FEATURE_NOT_SUPPORTED, decision.message or ""))
        )
        self.tx.refused(in_transaction)
        self._after_failed_batch(batch)

    def _wait(self, batch: Batch, role: str) -> None:
        """Hold ``batch`` until the connection in use finishes its units, then route it to ``role``."""
        self._hold(batch, Input.SWITCH)

    def _console(self, batch: Batch) -> None:
        """The admin console: simple-query commands answered by the proxy itself."""
        if batch.terminator != _Q or len(batch.msgs) != 1:
            self.write(
                m.error_from(
                    ProxyError(FEATURE_NOT_SUPPORTED, "the admin console speaks the simple query protocol")
                )
            )
            self._after_failed_batch(batch)
            return
        _, start, end = batch.msgs[0]
        try:
            reply = self.app.console.execute(batch.buf[start + 5 : end - 1].decode(errors="replace"))
        except ProxyError as exc:
            reply = m.error_from(exc)
        log.info("event=admin_command client=%s user=%s", self.id, self.user)
        if isinstance(reply, bytes):
            self.write(reply + m.ready_for_query(b"I"))
            return
        # A command that asks a database (MIGRATE role PLAN): input waits until it has answered.
        self._hold(batch, Input.CONSOLE)
        self._console_task = asyncio.get_running_loop().create_task(self._console_answer(reply))

    async def _console_answer(self, pending: Awaitable[bytes]) -> None:
        try:
            reply = await pending
        except ProxyError as exc:
            reply = m.error_from(exc)
        except Exception:
            log.exception("event=admin_command_error client=%s", self.id)
            reply = m.error_from(ProxyError(INTERNAL_ERROR, "admin command failed (see the proxy's log)"))
        self._console_task = None
        if self.phase != CLOSED:
            self.write(reply + m.ready_for_query(b"I"))
            self._resume_batch(Input.CONSOLE, lambda: None)

    def _local_deallocate(self, batch: Batch) -> bytes | None:
        """DEALLOCATE of a protocol-level statement (psycopg does this) is the proxy's to answer: the
        upstream name differs and other clients may share the upstream statement."""
        _, start, end = batch.msgs[0]
        deep = batch.analyses.get(start) if batch.analyses else None
        if deep is not None:
            target = deep.deallocate
        else:
            target = deallocate_target(batch.buf[start + 5 : end - 1].decode(errors="replace"))
        if target is None:
            return None
        if target == "":
            self.session.statements.clear()
            return m.command_complete("DEALLOCATE ALL")
        if self.session.statements.pop(target, None) is None:
            return None  # not one of ours: let PostgreSQL say it does not exist
        return m.command_complete("DEALLOCATE")

    async def _acquire(self, batch: Batch, role: str, label: str, *, retry: bool = True) -> None:
        if self.app.is_paused(role):
            await self.app.wait_resumed(role)
            label = self.app.pool_for(role)
            if self.phase == CLOSED:
                return
        pool = self.app.pools[label]
        try:
            conn = await pool.acquire()
        except ProxyError as exc:
            if self.phase == CLOSED:
                return
            if exc.sqlstate.startswith("08") and retry:
                # Nothing was sent yet: mark the upstream suspect and, if that moves the unit elsewhere
                # (its fallback, another replica), try there once.
                self.app.health.mark_suspect(label, exc.message)
                decision = self._decide(*self._unit_info(batch))
                if decision.down is not None:
                    self.app.count_down_refusal(decision.down)
                    exc = ProxyError(CANNOT_CONNECT_NOW, decision.message or "")
                elif decision.role is not None and self.app.pool_for(decision.role) != label:
                    log.warning("event=fallback client=%s from=%s to=%s", self.id, label, decision.role)
                    self._count_fallback(decision.fallback_from or (role,))
                    self._count_fallback_writes(decision.fallback_writes)
                    await self._acquire(batch, decision.role, self.app.pool_for(decision.role), retry=False)
                    return
            self._acquire_failed(batch, exc)
        except Exception as exc:
            log.exception("event=acquire_error client=%s", self.id)
            self.tx.go_on()
            self.write(
                m.error_from(ProxyError(INTERNAL_ERROR, f"internal proxy error: {type(exc).__name__}"))
            )
            self._after_failed_batch(batch)
        else:
            if self.phase == CLOSED:
                pool.release(conn)
                return
            if not self._acquired(batch, conn, role, label):
                return
        self.resume("acquire")
        if self.phase != CLOSED and self.buf:
            self.data_received(b"")

    def _acquired(self, batch: Batch, conn: ServerConnection, role: str, label: str) -> bool:
        """Send the waiting batch on the connection just leased; False if that closed the client."""
        self.tx.go_on()
        self._attach(conn, role, label)
        try:
            self._send(batch, conn)
        except ProxyError as exc:
            self.fatal(exc)
            return False
        return True

    def _acquire_failed(self, batch: Batch, exc: ProxyError) -> None:
        tx = self.tx
        tx.go_on()
        self.write(m.error_from(exc))
        tx.refused(tx.begin is not None)
        self._after_failed_batch(batch)

    def _after_failed_batch(self, batch: Batch) -> None:
        """The batch never reached an upstream: answer as PostgreSQL would after an error."""
        if batch.terminator in (_S, _Q, _F):
            self.write(m.ready_for_query(self._status()))
        else:
            self.tx.skip_until_sync()

    # -- sending a batch upstream ---------------------------------------------------------------------------
    def _send(self, batch: Batch, server: ServerConnection) -> None:  # noqa: PLR0915  (one loop)
        """Rename statements, inject re-prepares and session replay, register expectations, send: common
        messages inline (the data path's hottest loop), the others by ``Statements`` (prepared.py)."""
        buf = batch.buf
        view = memoryview(buf)
        out: list[Piece] = []
        retry = self._before_batch(batch, server, out)
        run = batch.start  # start of the run of unchanged client bytes not yet in ``out``
        ents: list[Expect | int] = []  # plain kinds stand for Expect(kind); built only when needed
        special = details = False  # an expectation other than "forward the responses"; outcome details
        st = self.statements
        named = self.session.statements
        for mtype, start, end in batch.msgs:
            if mtype == _B:
                if buf[start + 5] or buf[start + 6] or st.unnamed_stmt is not None or (
                        server.unnamed_owner is not st.unnamed_token):  # fmt: skip
                    out.append(view[run:start])
                    run = end
                    special |= st.bind(server, buf, view, start, end, named, out, ents, retry)
                else:  # the client's own unnamed statement on this connection: the Bind as it is
                    ents.append(K_BIND)
                if self._stmt_changes or self._unnamed_changes:
                    self._bind_changes(buf, start, end)
            elif mtype == _E:
                ents.append(K_EXECUTE)
                if self._portal_changes:
                    self._execute_changes(buf, start)
            elif mtype == _S:
                ents.append(SYNC_EXT)
            elif mtype == _P:
                name_end = buf.index(0, start + 5, end)
                deep = batch.analyses.get(start) if batch.analyses else None
                sql = buf[name_end + 1 : buf.index(0, name_end + 1, end)]
                details |= self._note_sql(sql, server, buf[start + 5 : name_end], deep=deep)
                if name_end == start + 5 and (
                    deep is not None  # large statements are not kept in the shared unnamed cache
                    or not self.app.cache_unnamed
                    or (unnamed := self._unnamed_info) is None
                    or not unnamed.plannable
                ):  # unnamed statement: sent as it is, now this client's (as Statements.answered_locally)
                    st.unnamed_stmt = None
                    st.unnamed = buf[start:end]
                    st.unnamed_token = server.unnamed_owner = object()
                    ents.append(K_PARSE)
                    continue
                out.append(view[run:start])
                run = end
                special = True
                if name_end == start + 5:
                    st.parse_unnamed_cached(server, buf[start + 5 : end], out, ents)
                else:
                    name, stmt = st.parse_named(server, buf[start + 5 : end], out, ents)
                    named[name] = stmt
            elif mtype == _D and buf[start + 5] != 83:  # a portal's Describe goes as it is
                ents.append(K_DESCRIBE)
            elif mtype == _Q:
                deep = batch.analyses.get(start) if batch.analyses else None
                if (info := batch.info) is None or deep is not None or info.bits:  # else nothing to note
                    details |= self._note_sql(buf[start + 5 : end - 1], server, None, info, deep=deep)
                server.unnamed_owner = None
                ents.append(SYNC_Q)
            elif mtype == _F:
                ents.append(SYNC_Q)
            elif mtype != _H:  # a statement's Describe, a Close
                out.append(view[run:start])
                run = end
                rewrite = st.describe if mtype == _D else st.close
                special |= rewrite(server, buf, view, start, end, named, out, ents)
        terminator = batch.terminator
        if terminator in (_S, _Q):
            self._portal_changes.clear()
        if details or self.session.has_staged:
            server.track_details(True)
        if special or out or terminator not in (_S, _Q, _F):
            _send_rewritten(server, batch, view, out, ents, run, special)
        else:  # the common case: one expectation, the client's bytes as they are
            server.push(Expect(K_SYNC, extended=ents[-1] == SYNC_EXT))  # sync_entry, inline
            server.send(buf if batch.start == 0 and batch.end == len(buf) else view[batch.start : batch.end])

    def _before_batch(self, batch: Batch, server: ServerConnection, out: list[Piece]) -> Batch | None:
        """What goes upstream before a batch: the audit's note of it (compliance), the eviction of the
        least recently used statements, the client's session settings where the connection's differ, and a
        BEGIN the proxy answered earlier (the transaction starts here, on this upstream); their replies are
        swallowed. Returns the batch when nothing is in flight and no transaction open (a failed first
        statement can then be run again unseen: ``StalePlanRetry``), else None."""
        if self.server_role == "compliance" and (audit := self.app.audit) is not None:
            self._audit.note(audit, batch.buf, batch.msgs, self.session.statements, self.statements)
            server.track_details(True)
        idle = server.status == _IDLE and not server.expect
        tx = self.tx
        begin = tx.begin
        if idle and len(server.prepared) > self.app.max_statements:
            # Between transactions no portal depends on a statement: close the least recently used.
            self.statements.evict(server, out)
        session = self.session
        if server.applied != session.settings:  # else sync_sql is "" (asked inline: the common case)
            out.append(m.query(session.sync_sql(server.applied)))
            server.push(Expect(K_SYNC, SWALLOW))
            server.applied = dict(session.settings)
            server.unnamed_owner = None
        if begin is not None:
            tx.unit_sent()
            out.append(begin)
            server.push(Expect(K_SYNC, SWALLOW))
            server.unnamed_owner = None
            return None
        return batch if idle else None

    def _note_sql(
        self,
        sql: bytes,
        server: ServerConnection,
        statement: bytes | None,
        info: Classification | None = None,
        *,
        deep: Analysis | None = None,
    ) -> bool:
        """Classify ``sql`` for session tracking (``info``: its classification, when already made);
        returns whether outcome details must be tracked.

        ``statement`` is the Parse's statement name (None for a simple Query): a SET parsed there takes
        effect when a portal made from it is executed. ``deep``: the analysis of a large statement, made off
        the event loop (its SQL is never parsed here).
        """
        if statement == b"" and self._unnamed_changes:
            self._unnamed_changes = []
        if deep is not None:
            info = deep.info
        elif info is None:
            info = self.app.classifier.classify_bytes(sql)
        if statement is not None:
            if statement:
                self._stmt_info[statement.decode(errors="surrogateescape")] = info
            else:
                self._unnamed_info = info
        flags = info.bits
        if not flags:
            return False
        if flags & F_PIN and self.tx.pin_reason is None:
            self.tx.pin(info.pin_reason or "session state")
            self.app.client_pinned(self)
            log.info("event=pinned client=%s role=%s reason=%r", self.id, self.server_role, self.pinned)
        details = False
        if flags & (F_SESSION_SET | F_SAVEPOINT):
            if deep is not None:
                changes = list(deep.changes)
            else:
                changes = session_changes(sql.decode(errors="replace"))
            if statement is None:
                self._stage(changes, server)
            elif not statement:
                self._unnamed_changes = changes
            else:
                self._stmt_changes[statement.decode(errors="surrogateescape")] = changes
            details = True
        if flags & F_FORGET_PREPARED:
            if statement is None:
                self._forget_prepared = True  # settled when the query's outcome is known
                details = True
            else:
                # Through the extended protocol it may run later or never: whatever the connection
                # then holds is unknown, so it serves no one else.
                self._server_dirty = True
        return details

    def _bind_changes(self, buf: bytes, start: int, end: int) -> None:
        """Session changes a Bind's statement makes become its portal's (staged when it is executed)."""
        portal, statement, _ = m.decode_bind_names(buf[start + 5 : end])
        changes = self._unnamed_changes if not statement else self._stmt_changes.get(statement)
        if changes:
            self._portal_changes[portal] = changes

    def _execute_changes(self, buf: bytes, start: int) -> None:
        portal = buf[start + 5 : buf.index(0, start + 5)].decode(errors="surrogateescape")  # checked by Bind
        changes = self._portal_changes.get(portal)
        if changes and self.server is not None:
            self._stage(changes, self.server)

    def _stage(self, changes: list[SessionChange], server: ServerConnection) -> None:
        if not self.session.has_staged:
            self._error_seen = False
            self._staged_in_tx = server.status != _IDLE
        self.session.stage(changes)

    # -- responses (called by the upstream connection) ------------------------------------------------------
    def upstream_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def upstream_error_seen(self, fields_payload: bytes) -> None:
        self._error_seen = True
        self._audit.error(fields_payload)

    def upstream_command_tag(self, tag: bytes) -> None:
        self._last_tag = tag

    def upstream_batch_end(self) -> None:
        if self._audit.pending:
            self._audit.write(
                self.app.audit,
                user=self.user,
                address=self.peer,
                application_name=self.params.get("application_name", ""),
                role=self.server_role,
            )

    def upstream_ready(self, status: int) -> None:
        server = self.server
        if server is None:
            return
        if self.phase == CLOSED:
            if not server.expect:  # a read-your-writes capture outlived its client: the connection is free
                self._release()
            return
        if self.reads.wrote and status == _IDLE and not server.expect and self.server_role == MAIN:
            reads = self.reads
            # A write ended on main (autocommit, or its transaction's end) and nothing else is in flight:
            # read main's WAL position now, behind the reply the client already has. Its reply ends the lease.
            reads.wrote = False
            assert reads.key is not None  # set only with read-your-writes on
            Capture(self.app.consistency.writes, reads.key, server, self).send()
            return
        if status != _IDLE:
            if self.session.has_staged:
                self._staged_in_tx = True
        elif self.session.has_staged or self._forget_prepared:
            self._settle(server)
        tx = self.tx
        verdict = tx.ready(status, server.expect)
        if verdict is BETWEEN:
            if self.app.draining:
                self._release()
                self.fatal(ProxyError(ADMIN_SHUTDOWN, "terminating connection: the proxy is shutting down"))
            elif self._server_dirty and not server.cancels:
                pass  # what it holds is unknown: it serves this client only (and is closed after)
            elif self.app.pools[self.server_pool].linger(server, self._reclaim):
                tx.lease_event(LeaseEv.LINGER)
            else:
                self._release()  # a cancel still on its way parks it in the pool (Pool.release)
        elif verdict is SWITCH:
            # The next unit needs another upstream: this one is done with us now.
            batch = tx.waiting
            assert batch is not None
            tx.go_on()
            self._release()
            self.resume(Input.SWITCH.value)
            self._dispatch(batch)
            if tx.waiting is None and self.buf:
                self.data_received(b"")

    def _settle(self, server: ServerConnection) -> None:
        """A unit with session changes ended outside a transaction: did they take effect?

        In an explicit transaction they did if it ended in COMMIT (a failed transaction's COMMIT reports
        ROLLBACK); savepoints were accounted for as they ran. Outside one (a single statement or an
        implicit multi-statement transaction) they did unless an error was reported.
        """
        ok = self._last_tag == b"COMMIT" if self._staged_in_tx else not self._error_seen
        if self.session.has_staged:
            if ok:
                if self.session.has_staged_settings:
                    self.reads.settled(self.session.staged_settings())
                self.session.commit_staged(server.applied)
            else:
                self.session.discard_staged()
        if self._forget_prepared:
            if ok:
                server.prepared.clear()
                server.unnamed_owner = None
                self.session.statements.clear()
            else:
                # DISCARD / DEALLOCATE ALL may have run before the failure: what the connection holds
                # is unknown, so it must not serve anyone else.
                self._server_dirty = True
            self._forget_prepared = False
        self._error_seen = False
        self._last_tag = b""
        self._staged_in_tx = False
        server.track_details(False)

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

    # -- leases ---------------------------------------------------------------------------------------------
    def _attach(self, conn: ServerConnection, role: str, label: str) -> None:
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
        dirty = self._server_dirty
        self._server_dirty = False
        self.app.pools[self.server_pool].release(server, reusable=reusable and not dirty and server.clean)

    def _release(self) -> None:
        self._detach(reusable=True)

    # -- output and teardown --------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause(self, reason: str) -> None:
        if not self._paused_by and self.transport is not None:
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused_by:
            self._paused_by.discard(reason)
            if not self._paused_by and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

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
        if self._classifying is not None:
            self._classifying.cancel()
            self._classifying = None
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


def _lone_unnamed_statement(batch: Batch) -> tuple[tuple[int, int], list[bytes]] | None:
    """For Parse/Bind/[Describe portal]/Execute of one unnamed statement alone up to Sync or Flush: the
    Parse message's span and the replies up to the Execute's (ParseComplete, BindComplete, NoData).
    None for anything else."""
    if batch.terminator not in (_S, _H):
        return None
    buf = batch.buf
    parse: tuple[int, int] | None = None
    executed = False
    replies: list[bytes] = []
    for mtype, start, end in batch.msgs:
        if executed and mtype != batch.terminator:
            return None
        if mtype == _P:
            if buf[start + 5] != 0 or parse is not None:
                return None
            parse = (start, end)
            replies.append(m.parse_complete())
        elif mtype == _B:
            portal, name, _ = m.decode_bind_names(buf[start + 5 : end])
            if portal or name or parse is None:
                return None
            replies.append(m.bind_complete())
        elif mtype == _D:
            if buf[start + 5] != ord("P") or buf[start + 6] != 0:
                return None
            replies.append(m.no_data())
        elif mtype == _E:
            executed = True
        elif mtype != batch.terminator:
            return None
    if not executed or parse is None:
        return None
    return parse, replies


def _fast_unit(client: ClientConnection, data: bytes) -> bool:
    """The fast path: ``data`` is one whole unit that needs nothing of the proxy but its route: a simple
    Query, or an unnamed statement's [Parse] Bind [Describe portal] Execute Sync, with no setting,
    transaction control or pin in it, nothing paused, held, audited, replayed or waited for, from a client
    lingering on a connection of the role it routes to (``_dispatch_unit``), or inside a transaction on
    the connection it holds (``_dispatch_held``). It goes upstream as it is, with one expectation, exactly
    as the slow path (``_messages`` ... ``_send``) would send it, and True is returned. Anything else
    returns False having changed nothing, and takes the slow path."""
    server = client.server
    tx = client.tx
    lease = tx.lease
    if lease is not _LINGERING and (lease is not _HELD or server is None or server.status == _IDLE):
        return False
    if (
        server is None
        or client.buf
        or not 6 <= len(data) <= INLINE_BYTES
        or tx.begin is not None
        or tx.input is not _READING
        or client.phase != READY
        or client.admin
        or client.reads.key is not None
        or client.reads.min_lsn is not None
        or client.session.has_staged
        or client._unnamed_changes
        or client._stmt_changes
        or client._portal_changes
        or server.expect
    ):
        return False
    app = client.app
    role = client.server_role
    router = app.router
    try:  # whatever these raise, the slow path meets again and reports (``_guarded``)
        info = _fast_info(client, data, server)
        if info is None:
            return False
        if lease is _LINGERING:
            decision = router.decide_plain(info)
            if decision.role != role or decision.fallback_from:
                return False
            kind = decision.kind
        else:  # in a transaction on the connection held
            if tx.tx is not _UPSTREAM_TX or server.needs_sync or router.on_fallback:
                return False
            refusal, kind = router.in_transaction_cached(info, role)
            if refusal is not None:
                return False
    except Exception:
        return False
    if (
        (role == "compliance" and app.audit is not None)
        or app.migration.hold.roles
        or app.migration.shadow.active  # a read may be offered to the shadow reads: _count_route
        or app.is_paused(role)
        or len(server.prepared) > app.max_statements
        or server.applied != client.session.settings
    ):
        return False
    # What _dispatch_unit, _count_route, _send and _note_sql do for this unit, in their order.
    routed = app.routed
    routed[role, kind] = routed.get((role, kind), 0) + 1
    if lease is _LINGERING:
        tx.lease_event(_UNLINGER)
        app.pools[client.server_pool].unlinger(server)
    first = data[0]
    if first == _P:
        client._unnamed_info = info
        st = client.statements
        st.unnamed_stmt = None
        st.unnamed = data[: _LENGTH.unpack_from(data, 1)[0] + 1]
        st.unnamed_token = server.unnamed_owner = object()
    elif first == _Q:
        server.unnamed_owner = None
    server.push(Expect(K_SYNC, extended=first != _Q))
    server.send(data)
    return True


def _fast_info(client: ClientConnection, data: bytes, server: ServerConnection) -> Classification | None:
    """For ``_fast_unit``: the classification of a Query or of an unnamed statement's [Parse] Bind
    [Describe] Execute Sync that the fast path can send as it is; None for anything else."""
    app = client.app
    if data[0] == _Q:
        if _LENGTH.unpack_from(data, 1)[0] != len(data) - 1:
            return None
        sql = data[5:-1]
        info = app.classifier.classify_bytes(sql)
    else:
        if data[0] == _P and app.cache_unnamed:
            return None  # the Parse may be answered by the proxy, the Bind renamed: Statements (prepared.py)
        bind = extended_unit(data)
        if bind < 0:
            return None
        if bind:
            sql_end = data.find(0, 6, bind)
            if sql_end < 0:
                return None
            sql = data[6:sql_end]
            info = app.classifier.classify_bytes(sql)
        else:
            st = client.statements
            sql = b""
            unnamed = client._unnamed_info
            if unnamed is None or st.unnamed_stmt is not None or server.unnamed_owner is not st.unnamed_token:
                return None
            info = unnamed
    if info.bits or info.tx is not None or sql[:1] in _OVERRIDE_START:
        return None  # session state, transaction control, a pin, or a /* route: */ comment
    return info


__all__ = ["AUTH", "CLOSED", "MAX_AUTH_MESSAGE", "READY", "STARTUP", "ClientConnection"]


def _rolls_back_to(batch: Batch) -> bool:
    """Whether the unit rolls back to a savepoint (which makes a failed transaction usable again)."""
    if batch.analyses and any(
        c.op == "rollback_to" for deep in batch.analyses.values() for c in deep.changes
    ):
        return True
    for sql in batch.queries():
        if len(sql) > INLINE_BYTES:
            continue  # analysed off the event loop (above)
        try:
            if any(c.op == "rollback_to" for c in session_changes(sql)):
                return True
        except pglast.parser.ParseError:
            continue
    return False
