"""Sending one client's batch upstream: statements renamed to their upstream names and re-prepared where
the connection lacks them (``Statements``, proxy/frontend/prepared.py), the client's session settings
replayed where the connection's differ, a BEGIN the proxy answered earlier sent first, session changes
noted for their outcome (``Effects``, proxy/frontend/effects.py), what to do with each reply registered
(``Expect``, proxy/backend/expect.py), and the bytes written in one go.

These are functions of the client connection's state, called with it (the data path's hottest code: a
method call's cost, no object between): the common batch's bytes go out untouched with one expectation.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import (
    K_BIND,
    K_DESCRIBE,
    K_EXECUTE,
    K_PARSE,
    K_SYNC,
    PLAIN_QUERY,
    PLAIN_SYNC,
    SWALLOW,
    SWALLOWED_BEGIN,
    SYNTH_PARSE_COMPLETE,
    Expect,
)
from proxy.context import ClientContext
from proxy.frontend.audited import AuditTrail
from proxy.frontend.effects import Effects
from proxy.frontend.prepared import (
    FAILED,
    SYNC_EXT,
    SYNC_Q,
    Piece,
    StalePlanRetry,
    Statements,
    bind_header,
    forget_on_failure,
)
from proxy.frontend.ryw import Capture
from proxy.frontend.session import PreparedStatement, Session
from proxy.frontend.txstate import TxState
from proxy.frontend.units import Batch, Units
from proxy.protocol import messages as m
from proxy.protocol.framing import scan_messages
from proxy.router.classify import Classification

_P, _B, _D, _E, _S, _H, _Q, _F = b"PBDESHQF"
_IDLE = ord("I")
_LENGTH = struct.Struct("!I")


class SendClient(Protocol):
    """What sending reads and changes of the client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    tx: TxState[Any]
    session: Session
    statements: Statements
    effects: Effects
    units: Units
    server_role: str
    audit_trail: AuditTrail


def send(client: SendClient, batch: Batch, server: ServerConnection) -> None:
    """Send ``batch`` on ``server``: a whole unit the fast path vetted (``Batch.whole``) as it is when the
    connection needs nothing first (``_sent_whole``), anything else message by message."""
    if not (batch.whole and (info := batch.info) is not None and _sent_whole(client, batch, server, info)):
        _send_messages(client, batch, server)


def _send_messages(client: SendClient, batch: Batch, server: ServerConnection) -> None:  # noqa: PLR0915
    """Rename statements, inject re-prepares and session replay, register expectations, send: common
    messages inline (the data path's hottest loop), the others by ``Statements`` (prepared.py)."""
    buf = batch.buf
    view = memoryview(buf)
    out: list[Piece] = []
    retry = _before_batch(client, batch, server, out)
    run = batch.start  # start of the run of unchanged client bytes not yet in ``out``
    ents: list[Expect | int] = []  # plain kinds stand for Expect(kind); built only when needed
    special = details = False  # an expectation other than "forward the responses"; outcome details
    st = client.statements
    named = client.session.statements
    fx = client.effects
    for mtype, start, end in batch.msgs:
        if mtype == _B:
            if buf[start + 5] or buf[start + 6] or st.unnamed_stmt is not None or (
                    server.unnamed_owner is not st.unnamed_token):  # fmt: skip
                out.append(view[run:start])
                run = end
                special |= st.bind(server, buf, view, start, end, named, out, ents, retry)
            else:  # the client's own unnamed statement on this connection: the Bind as it is
                ents.append(K_BIND)
            if fx.stmt_changes or fx.unnamed_changes:
                fx.bind_changes(buf, start, end)
        elif mtype == _E:
            ents.append(K_EXECUTE)
            if fx.portal_changes:
                fx.execute_changes(buf, start)
        elif mtype == _S:
            ents.append(SYNC_EXT)
        elif mtype == _P:
            name_end = buf.index(0, start + 5, end)
            deep = batch.analyses.get(start) if batch.analyses else None
            sql = buf[name_end + 1 : buf.index(0, name_end + 1, end)]
            details |= fx.note_sql(sql, server, buf[start + 5 : name_end], deep=deep)
            if name_end == start + 5 and (
                deep is not None  # large statements are not kept in the shared unnamed cache
                or not client.app.cache_unnamed
                or (unnamed := client.units.unnamed_info) is None
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
                st.parse_named(server, buf[start + 5 : end], named, out, ents)
        elif mtype == _D and buf[start + 5] != 83:  # a portal's Describe goes as it is
            ents.append(K_DESCRIBE)
        elif mtype == _Q:
            deep = batch.analyses.get(start) if batch.analyses else None
            if (info := batch.info) is None or deep is not None or info.bits:  # else nothing to note
                details |= fx.note_sql(buf[start + 5 : end - 1], server, None, info, deep=deep)
            server.unnamed_owner = None  # a Query destroys the unnamed statement (the client's too: a
            unnamed_destroyed(client)  # Parse of it earlier in this batch; dispatch forgot the one before)
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
        fx.portal_changes.clear()
    if details or client.session.has_staged:
        server.track_details(True)
    if special or out or terminator not in (_S, _Q, _F):
        _send_rewritten(server, batch, view, out, ents, run, special)
    else:  # the common case: one expectation, the client's bytes as they are
        server.push(PLAIN_SYNC if ents[-1] == SYNC_EXT else PLAIN_QUERY)  # sync_entry, inline
        server.send(buf if batch.start == 0 and batch.end == len(buf) else view[batch.start : batch.end])


def unnamed_destroyed(client: SendClient) -> None:
    """The client sent a simple Query, which destroys its unnamed statement as PostgreSQL's does whether
    the query runs upstream or the proxy answers it: a later Bind of that statement fails (26000) as it
    would on one server, instead of finding a copy the proxy kept."""
    client.statements.forget_unnamed()
    client.units.unnamed_info = None
    client.effects.unnamed_changes = []


def _sent_whole(client: SendClient, batch: Batch, server: ServerConnection, info: Classification) -> bool:
    """Send a whole unit the fast path vetted when it arrived (proxy/frontend/fast.py) to ``server`` as
    ``send`` would, when the connection needs nothing first — no audit note, no statement to evict, no
    setting to replay — and keeps the unnamed statement already where it would be kept
    (``statements.cache_unnamed``; not behind a deferred BEGIN); False, nothing done, for anything else."""
    app = client.app
    if (
        server.applied != client.session.settings
        or len(server.prepared) > app.max_statements
        or (client.server_role == "compliance" and app.audit is not None)
    ):
        return False
    data = batch.buf
    if data[0] == _P and app.cache_unnamed and info.plannable:
        kept = kept_statement(client, server, data, _LENGTH.unpack_from(data, 1)[0] + 1)
        if kept is None or client.tx.begin is not None:
            return False  # to be prepared there; or the BEGIN first
        send_kept(client, server, data, kept, info)
    else:
        send_whole(client, server, data, info, begin=client.tx.unit_sent() or b"")
    return True


def kept_statement(
    client: SendClient, server: ServerConnection, data: bytes, bind: int
) -> PreparedStatement | None:
    """With ``statements.cache_unnamed``: the statement ``server`` keeps prepared for the unnamed Parse
    that ends at ``bind`` in the whole unit ``data``; None when it must be prepared there first, or in a
    failed transaction, where the Parse must reach PostgreSQL to be refused."""
    kept = client.statements.ctx.unnamed_statements.get(data[5:bind])
    if kept is None or server.status == FAILED:  # (as parse_unnamed_cached)
        return None
    return kept if kept.upstream_name in server.prepared else None


def send_whole(  # noqa: PLR0917  (positional defaults: keyword-only ones cost a dict look-up per call)
    client: SendClient,
    server: ServerConnection,
    data: bytes,
    info: Classification,
    capture: Capture | None = None,
    begin: bytes = b"",
) -> None:
    """Send a whole unit of the fast path's (a Query, or an unnamed statement's [Parse] Bind [Describe]
    Execute Sync) as it is, with one expectation for its reply; an unnamed Parse is the client's
    statement now, as ``send`` makes it. ``begin``: a BEGIN the proxy answered (``TxState.unit_sent``),
    sent first with its reply swallowed, as ``_before_batch`` sends it (then ``data`` is a Query or starts
    with its Parse). ``capture``: read-your-writes' capture, sent in the same write behind a unit that
    ends a write transaction (``Capture.send``, proxy/frontend/ryw.py)."""
    first = data[0]
    if first == _P:
        client.units.unnamed_info = info
        st = client.statements
        st.unnamed_stmt = None
        st.unnamed = data[: _LENGTH.unpack_from(data, 1)[0] + 1]
        st.unnamed_token = server.unnamed_owner = object()
    elif first == _Q:
        server.unnamed_owner = None
    if begin:
        server.push(SWALLOWED_BEGIN)
        data = begin + data
    server.push(PLAIN_QUERY if first == _Q else PLAIN_SYNC)
    if capture is None:
        server.send(data)
    else:
        capture.send(data)


def _before_batch(
    client: SendClient, batch: Batch, server: ServerConnection, out: list[Piece]
) -> Batch | None:
    """What goes upstream before a batch: the audit's note of it (compliance), the eviction of the
    least recently used statements, the client's session settings where the connection's differ, and a
    BEGIN the proxy answered earlier (the transaction starts here, on this upstream); their replies are
    swallowed. Returns the batch when nothing is in flight and no transaction open (a failed first
    statement can then be run again unseen: ``StalePlanRetry``), else None."""
    app = client.app
    if client.server_role == "compliance" and (audit := app.audit) is not None:
        client.audit_trail.note(audit, batch.buf, batch.msgs, client.session.statements, client.statements)
        server.track_details(True)
    idle = server.status == _IDLE and not server.expect
    tx = client.tx
    begin = tx.begin
    if idle and len(server.prepared) > app.max_statements:
        # Between transactions no portal depends on a statement: close the least recently used.
        client.statements.evict(server, out)
    session = client.session
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


def _send_rewritten(  # noqa: PLR0917  (positional: the cheapest call, on the data path)
    server: ServerConnection,
    batch: Batch,
    view: memoryview,
    out: list[Piece],
    ents: list[Expect | int],
    run: int,
    special: bool,
) -> None:
    """The end of ``send`` for a batch other than the common case: its expectations, then the pieces in
    ``out`` and the client's bytes from ``run`` on, in one write. ``special``: an expectation other than
    forwarding replies is in ``ents`` (then each is registered; else one for the final Sync or Query). In
    a batch that ends in Sync, Query or FunctionCall, the plain replies after the last special entry are
    forwarded as part of the final Sync's (or Query's) unit: no expectation of their own."""
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
                push(Expect(entry) if entry >= 0 else PLAIN_SYNC if entry == SYNC_EXT else PLAIN_QUERY)
            else:
                push(entry)
    else:
        push(PLAIN_SYNC if ents[-1] == SYNC_EXT else PLAIN_QUERY)  # sync_entry, inline
    if run == batch.start and not out:
        buf = batch.buf
        server.send(buf if batch.start == 0 and batch.end == len(buf) else view[batch.start : batch.end])
        return
    if batch.end > run:
        out.append(view[run : batch.end])
    server.send(b"".join(out))
    if special:
        server.flush_synth()


def send_kept(
    client: SendClient, server: ServerConnection, data: bytes, kept: PreparedStatement, info: Classification
) -> None:
    """Send a unit of the client's unnamed statement that the connection keeps prepared as ``kept``, as
    ``send`` and ``Statements`` (prepared.py) do: the Parse answered by the proxy (its ParseComplete comes
    before the upstream's reply), the Bind renamed, the rest as it is; a stale cached plan retried unseen
    when nothing else is in flight and no transaction is open."""
    st = client.statements
    events = st.ctx.statement_events
    name = kept.upstream_name
    prepared = server.prepared
    del prepared[name]  # most recently used last (as Statements.ensure)
    prepared[name] = None
    bind = 0
    if data[0] == _P:
        bind = _LENGTH.unpack_from(data, 1)[0] + 1
        client.units.unnamed_info = info
        st.unnamed_stmt = kept
        st.unnamed = None
        key = (server.role, "reused")  # count() (prepared.py), inline as in Statements.parse_unnamed_cached
        events[key] = events.get(key, 0) + 1
        server.push(SYNTH_PARSE_COMPLETE)
    size = _LENGTH.unpack_from(data, bind + 1)[0] + 1
    expect = Expect(K_BIND, on_done=forget_on_failure(server, name))
    if server.status == _IDLE:
        expect.retry = StalePlanRetry(server, kept, (bind, bind + size), SentUnit(data), events)
    server.push(expect)
    server.push(PLAIN_SYNC)
    server.send(bind_header(kept, size) + kept.name_field + data[bind + 7 :])


class SentUnit:
    """A unit the fast path sent, as the stale-plan retry reads a batch (``RetryBatch``, prepared.py): its
    messages are found only when the retry asks."""

    __slots__ = ("buf",)

    terminator = _S

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    @property
    def end(self) -> int:
        return len(self.buf)

    @property
    def msgs(self) -> list[tuple[int, int, int]]:
        return scan_messages(self.buf, 0, len(self.buf))[0]
