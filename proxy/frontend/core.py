"""The data path of one client connection, after its login: the client's bytes cut into batches, each
answered here, sent on the connection the client holds, or leased one; the lease ends at ReadyForQuery 'I'
with nothing else in flight, unless the client is pinned.

``ClientCore`` is the core of ``ClientConnection`` (proxy/frontend/client.py), which subclasses it with the
asyncio side (transport callbacks, login, teardown), as asyncpg's protocol core is separate from its asyncio
adapter. A whole unit that needs nothing but its route skips all this (``fast_unit``, fast.py). What
runs per transaction on the slow path is here and in send.py (functions of the client's state): methods of
the client itself, reading its own attributes, so that a transaction pays no hop through another object but
``Units.info`` and a look at ``Effects``. The other concerns are objects the client holds: ``Units`` (what a
unit executes, units.py), ``Effects`` (its session changes and their outcome, effects.py), ``Leasing``
(waiting for a connection, main or a replica, leases.py), ``ConsoleSession`` (the admin console,
console.py), the transaction and lease state ``TxState`` (txstate.py); and the answers the proxy gives
itself (control.py).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Callable
from typing import Any

from proxy.backend.connection import ServerConnection
from proxy.context import ClientContext
from proxy.errors import ADMIN_SHUTDOWN, PROTOCOL_VIOLATION, READ_ONLY_SQL_TRANSACTION, ProxyError
from proxy.frontend import control
from proxy.frontend.audited import AuditTrail
from proxy.frontend.console import ConsoleSession
from proxy.frontend.effects import Effects
from proxy.frontend.leases import Leasing, count_fallback, count_fallback_writes
from proxy.frontend.prepared import Statements, client_names
from proxy.frontend.reads import Reads
from proxy.frontend.ryw import Capture
from proxy.frontend.send import send, unnamed_destroyed
from proxy.frontend.session import Session
from proxy.frontend.startup import CLOSED, READY, STARTUP
from proxy.frontend.txstate import BETWEEN, SWITCH, Input, Lease, LeaseEv, TxState
from proxy.frontend.units import Batch, Units
from proxy.protocol import messages as m
from proxy.protocol.framing import Collector, collector
from proxy.router import classify as c
from proxy.router.policy import MAIN, TX_READ_ONLY, TX_READ_WRITE, WRITE, Decision
from proxy.router.policy import REPLICA as REPLICA_ROLE

_HEADER = struct.Struct("!BI")
_S, _H, _Q, _X, _F = b"SHQXF"
_ENDS = (c.TX_COMMIT, c.TX_ROLLBACK)  # lone, not AND CHAIN (classify.py): the transaction certainly ends
_COPY = frozenset(b"dcf")
_TERMINATORS = frozenset(b"SHQF")
_BATCHED = frozenset(b"PBDECSHQF")
MAX_BATCH_BYTES = 256 * 1024
_IDLE = ord("I")

# States of TxState read on every batch, as module constants (a global is the cheapest look-up).
_SKIPPING = Input.SKIPPING
_LINGERING = Lease.LINGERING
_PINNED = Lease.PINNED
_LINGER = LeaseEv.LINGER

_ids = itertools.count(1)


def _count_route(
    client: ClientCore, role: str, kind: str, batch: Batch, info: c.Classification | None
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


class ClientCore(asyncio.Protocol):
    """See the module docstring."""

    # ClientConnection's (client.py): its upstream connection attached and let go, a batch that waited
    # resumed, a read-your-writes capture's reply, the end of this client (after an error or not).
    attach: Callable[[ServerConnection, str, str], None]
    _release: Callable[[], None]
    _reclaim: Callable[[], None]
    resume_batch: Callable[[Input, Callable[[], None]], None]
    captured: Callable[[Capture, int | None], None]
    fatal: Callable[[ProxyError], None]
    _shutdown: Callable[[], None]

    def __init__(self, app: ClientContext[Any]) -> None:
        self.app = app
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.phase = STARTUP
        self.user = ""
        self.admin = False  # connected to the admin console (database admin.database)
        self.console: ConsoleSession | None = None  # its commands, once it sent one
        self.session = Session({})
        self.server: ServerConnection | None = None
        self.server_role = ""  # the role of the connection held (or last held)
        self.server_pool = ""  # its pool: the role, or a replica's name
        # Transaction, lease and input state (proxy/frontend/txstate.py): a BEGIN the proxy answered, a
        # refusal inside a transaction, lingering, pinning, the batch that waits and why.
        self.tx: TxState[Batch] = TxState()
        self.buf = b""
        self._parts: Collector | None = None  # a large message being received
        self._paused_by: set[str] = set()
        self._write_paused = False
        self.audit_trail = AuditTrail()  # compliance units in flight (proxy/frontend/audited.py)
        # The client's unnamed statement and the re-prepares its batches need (proxy/frontend/prepared.py).
        self.statements = Statements(app)
        self.units = Units(self)  # what its units execute, classified (proxy/frontend/units.py)
        self.effects = Effects(self)  # their session changes and outcome (proxy/frontend/effects.py)
        self.leasing = Leasing(self)  # waiting for a connection, main, a replica (proxy/frontend/leases.py)
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
                self.dispatch(batch)
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

    def dispatch(self, batch: Batch) -> None:
        """Route one batch: answer it here, send it on the connection held, or lease one for it."""
        tx = self.tx
        if tx.input is _SKIPPING:
            # After an error the proxy reported itself, PostgreSQL's rule: ignore everything up to Sync.
            if batch.terminator == _S:
                tx.synced()
                self.write(m.ready_for_query(self.ready_status()))
            return
        if self.admin:
            if self.console is None:
                self.console = ConsoleSession(self)
            self.console.command(batch)
            return
        if batch.terminator == _Q:
            unnamed_destroyed(self)
        units = self.units
        if (
            batch.end - batch.start > c.INLINE_BYTES
            and batch.analyses is None
            and units.classify_later(batch)
        ):
            return
        server = self.server
        if batch.terminator == _H and len(batch.msgs) == 1 and (server is None or not server.expect):
            # A Flush with nothing in flight (psycopg's pipeline sends one after its Sync): nothing to flush.
            # Sent upstream it would hold that connection for this client until the next Sync.
            return
        single_query = len(batch.msgs) == 1 and batch.terminator == _Q
        info, override = units.info(batch)
        if single_query:
            batch.info = info
            if (
                info is not None
                and info.bits & c.F_SESSION_SET
                and control.min_lsn_statement(self, batch, server)
            ):
                return
            if (  # (in a failed transaction PostgreSQL refuses it: 25P02, from upstream)
                tx.pin_reason is None
                and info is not None
                and info.bits & c.F_FORGET_PREPARED
                and self.ready_status() != b"E"
            ):
                reply = control.local_deallocate(self, batch)
                if reply is not None and (server is None or not server.expect):
                    self.write(reply + m.ready_for_query(self.ready_status()))
                    return
        elif (
            info is not None
            and info.bits & c.F_SESSION_SET
            and control.min_lsn_extended(self, batch, server, info)
        ):
            return
        if server is None or tx.lease is _LINGERING:
            self._dispatch_unit(batch, info, override, single_query)
        elif tx.lease is not _PINNED and server.expect and server.expect[-1].on_row:
            # Only main's WAL position after this client's write is in flight: the client is between
            # transactions, and the unit is routed afresh once that reply has ended the lease.
            self.hold(batch, Input.SWITCH)
        elif tx.stays_on_held(server.status, server.needs_sync):
            self._dispatch_held(batch, info, server)
        else:
            decision = self.decide(info, override)
            if decision.role is None:
                control.refuse(self, batch, decision, in_transaction=False)
            elif self.app.migration.hold.roles and self.app.migration.hold.holds(decision.domains):
                self.hold(batch, Input.SWITCH)  # routed afresh, and held, once this upstream is done
            elif (decision.role == self.server_role or info is None) and (
                decision.role != REPLICA_ROLE
                or self.reads.same_replica(self.app.consistency, self.server_pool)
            ):
                _count_route(self, self.server_role, decision.kind, batch, info)
                if decision.fallback_writes:
                    self.app.count_fallback_writes(decision.fallback_writes)
                send(self, batch, server)  # pipelined behind the unit in flight, same upstream
            else:
                self.hold(batch, Input.SWITCH)  # another upstream: once this one is done with us

    def _dispatch_held(self, batch: Batch, info: c.Classification | None, server: ServerConnection) -> None:
        """Inside a transaction (or pinned, or after extended messages that no Sync has ended yet, such as
        asyncpg's Parse/Describe/Flush): the unit runs on the connection held, if it can."""
        if self.tx.failed and not control.failed_tx_unit(self, batch, info):
            return
        router = self.app.router
        if info is not None:
            router.note_joins(info)
            refusal, sent = router.in_transaction_cached(info, self.server_role)
            if refusal is not None:
                control.refuse(self, batch, refusal, in_transaction=server.status != _IDLE)
                return
            _count_route(self, self.server_role, sent.kind, batch, info)
            if router.on_fallback:
                count_fallback_writes(self.app, router.fallback_writes(info))
        send(self, batch, server)
        if batch.terminator in (_S, _Q) and self.capture_behind(info):
            self.new_capture(server).send()  # the fast path sends both in one write (fast.py)

    def _dispatch_unit(
        self, batch: Batch, info: c.Classification | None, override: str | None, single_query: bool
    ) -> None:
        """No connection held, or one lingering between transactions: answer the unit here (transaction
        control the proxy defers), or route it and send it on a connection, leasing one if needed."""
        tx = self.tx
        if (tx.begin is not None or (info is not None and info.tx is not None)) and control.answer_control(
            self, batch, info, single_query
        ):
            return
        decision = self.decide(info, override)
        leasing = self.leasing
        if decision.role is None:
            if decision.sqlstate == READ_ONLY_SQL_TRANSACTION and batch is not leasing.main_rechecked:
                leasing.recheck_main(batch)  # main down: unless it takes connections again
                return
            control.refuse(self, batch, decision, in_transaction=tx.begin is not None)
            return
        if self.app.migration.hold.roles and self.app.migration.hold.holds(decision.domains) is not None:
            if self.server is not None:
                self._release()  # lingering between transactions: nothing of the client's on it
            leasing.dispatch_after(batch, Input.HOLD, self.app.migration.hold.wait(decision.domains))
            return
        role = decision.role
        label: str | None = None
        reads = self.reads
        if role == REPLICA_ROLE and (reads.key is not None or reads.min_lsn is not None):
            routed = reads.route(self.app.consistency, batch)
            if routed is None:
                # Wait for a replica to catch up (or the scope's last write position).
                leasing.dispatch_after(batch, Input.CONSISTENCY, reads.wait(self.app.consistency, batch))
                return
            role, label = routed
        if decision.fallback_from:
            count_fallback(self.app, decision.fallback_from)
            count_fallback_writes(self.app, decision.fallback_writes)
        _count_route(self, role, decision.kind, batch, info)
        server = self.server
        if self.app.is_paused(role):
            if server is not None:
                self._release()
            leasing.wait_resumed(batch, role)
            return
        if server is not None:  # lingering between transactions
            if role == self.server_role and (label is None or label == self.server_pool):
                tx.lease_event(LeaseEv.UNLINGER)
                self.app.pools[self.server_pool].unlinger(server)
                send(self, batch, server)
                return
            self._release()
        label = label or self.app.pool_for(role)
        conn = self.app.pools[label].try_acquire()
        if conn is not None:
            self.attach(conn, role, label)
            send(self, batch, conn)
            return
        leasing.wait_for_pool(batch, role, label)

    def decide(self, info: c.Classification | None, override: str | None) -> Decision:
        tx = self.tx.begin_mode
        if info is None:
            # Nothing executes (Sync, Describe of a portal, Close...): wherever the client last was.
            if tx == TX_READ_WRITE:  # a BEGIN the proxy answered: a read-write transaction opens on main
                return Decision("read", (), MAIN, "no statement, in a read-write transaction: main")
            role = self.server_role or MAIN
            return Decision("read", (), role, "no statement: stays where it is")
        if info.tx in (c.TX_BEGIN, c.TX_BEGIN_READ_ONLY) and tx is None:
            tx = TX_READ_ONLY if info.tx == c.TX_BEGIN_READ_ONLY else TX_READ_WRITE
        return self.app.router.decide_cached(info, override, tx)

    def ready_status(self) -> bytes:
        """The transaction status to report in a ReadyForQuery the proxy makes itself."""
        server = self.server
        return self.tx.status(None if server is None else server.status)

    def hold(self, batch: Batch, reason: Input) -> None:
        """``batch`` waits until ``reason`` is settled. Reading from the client pauses only if it sends more
        meanwhile (``held_input``): a client waiting for its reply sends nothing, and a pause and resume
        of every waiting transaction cost the event loop two changes of its epoll set (at 64 pgbench
        clients on 20 connections, every transaction)."""
        self.tx.wait(batch, reason)

    def held_input(self) -> None:
        """The client sent more while a batch waits: kept in ``buf``, reading paused for the wait's reason
        (its end resumes reading, then processes ``buf``)."""
        self.pause(self.tx.input.value)

    def after_failed_batch(self, batch: Batch) -> None:
        """The batch never reached an upstream: answer as PostgreSQL would after an error."""
        if batch.terminator in (_S, _Q, _F):
            self.write(m.ready_for_query(self.ready_status()))
        else:
            self.tx.skip_until_sync()

    # -- responses (called by the upstream connection) ------------------------------------------------------
    @property
    def heard(self) -> dict[str, str]:
        return self.session.heard

    def client_names(self, error: bytes) -> bytes:
        return client_names(error, self.session.statements)

    def upstream_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def upstream_ready(self, status: int) -> None:
        server = self.server
        if server is None:
            return
        if self.phase == CLOSED:
            if not server.expect:  # a read-your-writes capture outlived its client: the connection is free
                self._release()
            return
        if self.reads.wrote and status == _IDLE and not server.expect and self.server_role == MAIN:
            # A write ended on main (autocommit, or its transaction's end) and nothing else is in flight:
            # read main's WAL position now, behind the reply the client already has. Its reply ends the lease.
            self.new_capture(server).send()
            return
        effects = self.effects
        if effects.forget_lone:
            effects.settle_forget(server)
        if status != _IDLE:
            if self.session.staged:
                effects.staged_in_tx = True
        elif self.session.staged or effects.forget_prepared:
            effects.settle(server)
        tx = self.tx
        verdict = tx.ready(status, server.expect)
        if verdict is BETWEEN:
            if self.app.draining:
                self._release()
                self.fatal(ProxyError(ADMIN_SHUTDOWN, "terminating connection: the proxy is shutting down"))
            elif effects.server_dirty and not server.cancels:
                pass  # what it holds is unknown: it serves this client only (and is closed after)
            elif self.app.pools[self.server_pool].linger(server, self._reclaim):
                tx.lease_event(_LINGER)
            else:
                self._release()  # a cancel still on its way parks it in the pool (Pool.release)
        elif verdict is SWITCH:
            # The next unit needs another upstream: this one is done with us now.
            batch = tx.waiting
            assert batch is not None
            tx.go_on()
            self._release()
            self.resume(Input.SWITCH.value)
            self.dispatch(batch)
            if tx.waiting is None and self.buf:
                self.data_received(b"")

    def capture_behind(self, info: c.Classification | None) -> bool:
        """Whether read-your-writes' capture goes right behind this unit: the lone COMMIT or ROLLBACK (not
        AND CHAIN: classify.py) of a transaction that wrote on main, which certainly ends it."""
        return self.reads.wrote and info is not None and info.tx in _ENDS and self.server_role == MAIN

    def new_capture(self, server: ServerConnection) -> Capture:
        """Read-your-writes' capture of main's position after this client's write, on ``server`` (the
        caller sends it: after the write's reply, or behind its COMMIT, ``Capture.send``)."""
        reads = self.reads
        reads.wrote = False
        assert reads.key is not None  # set only with read-your-writes on
        return Capture(self.app.consistency.writes, reads.key, server, self)

    # -- output ---------------------------------------------------------------------------------------------
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
