"""The units one client connection answers itself instead of sending them upstream: transaction control
the proxy defers (a BEGIN waits for the statement that decides the upstream; COMMIT / ROLLBACK of a
transaction that never reached one), a failed transaction's units, ``SET parafort.min_lsn``, DEALLOCATE of
a protocol-level statement, and refusals. Each function returns whether it answered the unit; the
transaction's state changes through the client's ``TxState`` (proxy/frontend/txstate.py).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import K_SYNC, Expect
from proxy.context import ClientContext
from proxy.errors import FEATURE_NOT_SUPPORTED, IN_FAILED_TRANSACTION, ProxyError
from proxy.frontend.effects import Effects
from proxy.frontend.prepared import Statements
from proxy.frontend.reads import Reads
from proxy.frontend.ryw import min_lsn_statement as parse_min_lsn_statement
from proxy.frontend.session import Session
from proxy.frontend.txstate import PROCEED, ROLLBACK_INSTEAD, TxState
from proxy.frontend.units import Batch, Units, lone_unnamed_statement, rolls_back_to
from proxy.protocol import messages as m
from proxy.router import classify as c
from proxy.router.policy import Decision

log = logging.getLogger("parafort.client")

_S, _H, _Q = b"SHQ"


class ControlClient(Protocol):
    """What these answers read and call of the client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    tx: TxState[Any]
    reads: Reads[Any]
    statements: Statements
    session: Session
    units: Units
    effects: Effects
    server: ServerConnection | None

    @property
    def id(self) -> int: ...
    def write(self, data: bytes | bytearray) -> None: ...
    def ready_status(self) -> bytes: ...
    def after_failed_batch(self, batch: Batch) -> None: ...


def answer_control(
    client: ControlClient, batch: Batch, info: c.Classification | None, single_query: bool
) -> bool:
    """BEGIN waits for the statement that decides the upstream; COMMIT/ROLLBACK of a transaction that
    never reached one, and a lone Sync (or Flush) after such a BEGIN, are answered here, as is a unit
    in a failed deferred transaction. True when the unit was answered."""
    tx = client.tx
    if single_query and info is not None and info.tx is not None and tx.pin_reason is None:
        _, start, end = batch.msgs[0]
        read_only = info.tx == c.TX_BEGIN_READ_ONLY
        client.write(tx.transaction_control(info.tx, batch.buf[start:end], read_only, info.begin_tag))
        return True
    if info is None and tx.begin is not None and not tx.failed and len(batch.msgs) == 1:
        # A lone Sync (or Flush) after a BEGIN the proxy answered: still nothing to run anywhere.
        if batch.terminator == _S:
            client.write(m.ready_for_query(b"T"))
            return True
        if batch.terminator == _H:
            return True
    if (
        info is not None
        and info.tx in (c.TX_BEGIN, c.TX_BEGIN_READ_ONLY)
        and not single_query
        and tx.pin_reason is None
        and not tx.failed
        and _deferred_extended_begin(client, batch, info)
    ):
        return True
    if (
        info is not None
        and info.tx in (c.TX_COMMIT, c.TX_ROLLBACK)
        and not single_query
        and tx.begin is not None
        and tx.pin_reason is None
        and _deferred_extended_end(client, batch, info)
    ):
        return True
    if tx.failed and tx.begin is not None:
        # Refused, or answered 25P02 here; a ROLLBACK [TO SAVEPOINT] among other messages goes on.
        return not failed_tx_unit(client, batch, info)
    return False


def _deferred_extended_begin(client: ControlClient, batch: Batch, info: c.Classification) -> bool:
    """Parse/Bind/[Describe]/Execute of BEGIN alone up to Sync (or Flush), as pipelining drivers send it:
    answered here and sent with the next unit, exactly as a simple-protocol BEGIN is, so the first real
    statement chooses the upstream. True when the unit was answered; anything else (a named statement,
    a Bind of an earlier Parse) goes upstream as it is."""
    lone = lone_unnamed_statement(batch)
    if lone is None:
        return False
    (start, end), replies = lone
    buf = batch.buf
    if client.tx.begin is not None:
        replies.append(m.notice_response("WARNING", "25001", "there is already a transaction in progress"))
    replies.append(m.command_complete(info.begin_tag))
    client.tx.defer_begin(m.query(m.decode_parse(buf[start + 5 : end])[1]), info.tx == c.TX_BEGIN_READ_ONLY)
    unnamed_answered(client, buf[start:end], info, [])
    if batch.terminator == _S:
        replies.append(m.ready_for_query(b"T"))
    client.write(b"".join(replies))
    return True


def _deferred_extended_end(client: ControlClient, batch: Batch, info: c.Classification) -> bool:
    """COMMIT or ROLLBACK as Parse/Bind/[Describe]/Execute alone up to Sync or Flush (JDBC ends every
    transaction so) in a transaction whose BEGIN the proxy answered and no statement has run: answered
    here, as the simple-protocol one is (COMMIT of a transaction the proxy failed reports ROLLBACK, as
    PostgreSQL does). True when the unit was answered."""
    lone = lone_unnamed_statement(batch)
    if lone is None:
        return False
    (start, end), replies = lone
    ended = client.tx.end_deferred(c.TX_COMMIT if info.tx == c.TX_COMMIT else c.TX_ROLLBACK)
    replies.append(m.command_complete(ended))
    unnamed_answered(client, batch.buf[start:end], info, [])
    if batch.terminator == _S:
        replies.append(m.ready_for_query(b"I"))
    client.write(b"".join(replies))
    return True


def unnamed_answered(
    client: ControlClient, raw: bytes, info: c.Classification, changes: list[c.SessionChange]
) -> None:
    """The proxy answered the unnamed statement ``raw`` (a Parse) itself: it is now the client's unnamed
    statement, with its classification and session changes; a later Bind of it parses it upstream."""
    client.statements.answered_locally(raw)
    client.units.unnamed_info = info
    client.effects.unnamed_changes = changes


def min_lsn_statement(client: ControlClient, batch: Batch, server: ServerConnection | None) -> bool:
    """SET / RESET parafort.min_lsn: answered by the proxy; True when the unit was answered."""
    if client.tx.failed:
        return False
    _, start, end = batch.msgs[0]
    found = Reads.min_lsn_command(batch.buf[start + 5 : end - 1])
    if found is None:
        return False
    if server is not None and (server.status == ord("E") or (server.expect and not client.tx.lingering)):
        return False  # in a failed transaction, or replies in flight: PostgreSQL answers (a placeholder)
    client.write(client.reads.set_min_lsn(*found) + m.ready_for_query(client.ready_status()))
    return True


def min_lsn_extended(
    client: ControlClient, batch: Batch, server: ServerConnection | None, info: c.Classification
) -> bool:
    """Parse/Bind/[Describe]/Execute of ``SET parafort.min_lsn`` (or RESET) alone up to Sync or Flush, as
    JDBC and psycopg's pipeline mode send it: answered here like the simple-protocol statement. True
    when the unit was answered. The same statement sent any other way (a named statement, or among
    other statements before the Sync) reaches PostgreSQL as a placeholder setting and takes effect in
    the proxy once it succeeded (``Effects.settle``, ``Reads.settled``)."""
    if client.tx.failed or (server is not None and (server.status == ord("E") or server.expect)):
        return False
    lone = lone_unnamed_statement(batch)
    if lone is None:
        return False
    (start, end), replies = lone
    _, sql, _ = m.decode_parse(batch.buf[start + 5 : end])
    found = parse_min_lsn_statement(sql) if "parafort" in sql.lower() else None
    if found is None:
        return False
    error = client.reads.apply_min_lsn(found[1])
    # A later Bind of it runs it upstream, a placeholder setting that takes effect here once it succeeds.
    unnamed_answered(client, batch.buf[start:end], info, c.session_changes(sql))
    if error is None:
        replies.append(m.command_complete(found[0]))
    else:
        replies.append(error)
        if batch.terminator != _S:
            client.tx.skip_until_sync()  # PostgreSQL's rule after an error: up to the next Sync
    if batch.terminator == _S:
        replies.append(m.ready_for_query(client.ready_status()))
    client.write(b"".join(replies))
    return True


def failed_tx_unit(client: ControlClient, batch: Batch, info: c.Classification | None) -> bool:
    """The proxy refused a statement in this transaction, so to the client it is aborted: only
    ROLLBACK (or ROLLBACK TO SAVEPOINT) proceeds; COMMIT becomes ROLLBACK, as PostgreSQL does.
    True when the unit proceeds."""
    tx = info.tx if info is not None else None
    rollback = tx == c.TX_ROLLBACK or (
        info is not None and bool(info.bits & c.F_SAVEPOINT) and rolls_back_to(batch)
    )
    server = client.server
    commit_on_held = (
        tx == c.TX_COMMIT and server is not None and len(batch.msgs) == 1 and batch.terminator == _Q
    )
    verdict = client.tx.failed_unit(rollback, commit_on_held)
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
    client.write(m.error_from(error))
    client.after_failed_batch(batch)
    return False


def local_deallocate(client: ControlClient, batch: Batch) -> bytes | None:
    """DEALLOCATE of a protocol-level statement (psycopg does this) is the proxy's to answer: the
    upstream name differs and other clients may share the upstream statement."""
    _, start, end = batch.msgs[0]
    deep = batch.analyses.get(start) if batch.analyses else None
    if deep is not None:
        target = deep.deallocate
    else:
        target = c.deallocate_target(batch.buf[start + 5 : end - 1].decode(errors="replace"))
    if target is None:
        return None
    statements = client.session.statements
    if target == "":
        statements.clear()
        return m.command_complete("DEALLOCATE ALL")
    if statements.pop(target, None) is None:
        return None  # not one of ours: let PostgreSQL say it does not exist
    return m.command_complete("DEALLOCATE")


def refuse(client: ControlClient, batch: Batch, decision: Decision, *, in_transaction: bool) -> None:
    """The unit cannot run (0A000: it needs two upstreams; 57P03: its role is down; 25006: main is
    down): an error, and the client carries on."""
    if decision.down is not None:
        client.app.count_down_refusal(decision.down)  # counted, not logged per statement (an outage)
    else:
        client.app.refusals += 1
        log.info("event=refused client=%s reason=%r", client.id, decision.message)
    client.write(m.error_from(ProxyError(decision.sqlstate or FEATURE_NOT_SUPPORTED, decision.message or "")))
    client.tx.refused(in_transaction)
    client.after_failed_batch(batch)
