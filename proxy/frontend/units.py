"""What one client's units execute: ``Batch`` (client messages up to a terminator, as offsets into the bytes
they arrived in) and ``Units``, the classification of a unit for the router: its statements' own, the
classification each prepared statement got when it was parsed, and statements above ``INLINE_BYTES``
analysed off the event loop in the classifier child (proxy/router/worker.py) while the batch waits.

Also the batch shapes the proxy answers itself (``lone_unnamed_statement``, ``rolls_back_to``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pglast

from proxy.context import ClientContext
from proxy.frontend.session import Session
from proxy.frontend.startup import CLOSED
from proxy.frontend.txstate import Input
from proxy.protocol import messages as m
from proxy.router import classify as c
from proxy.router.policy import route_override

_P, _B, _D, _E, _S, _H, _Q = b"PBDESHQ"
_QUERY_PARSE = frozenset(b"QP")
_OVERRIDE_START = (b"/", b" ", b"\t", b"\r", b"\n")


class Batch:
    """Client messages up to a terminator: offsets into the (immutable) bytes they arrived in."""

    __slots__ = ("analyses", "buf", "end", "info", "msgs", "start", "terminator", "whole")

    def __init__(self, buf: bytes, msgs: list[tuple[int, int, int]], start: int, end: int, term: int) -> None:
        self.buf = buf
        self.msgs = msgs  # (type, start, end) of each message, offsets into ``buf``
        self.start = start
        self.end = end
        self.terminator = term  # Sync, Query, Flush or FunctionCall; 0 for a part of an oversized batch
        self.info: c.Classification | None = None  # a lone Query's classification, once the router made it
        # A whole unit the fast path vetted and routed (proxy/frontend/fast.py), ``info`` its classification:
        # ``send`` sends its bytes as they are when the connection needs nothing first.
        self.whole = False
        # Statements above INLINE_BYTES, analysed off the event loop: by their message's start offset.
        self.analyses: dict[int, c.Analysis] | None = None

    def queries(self) -> Iterator[str]:
        """The SQL texts in this batch (Query and Parse), for the router."""
        buf = self.buf
        for mtype, start, end in self.msgs:
            if mtype == _Q:
                yield m.decode_query(buf[start + 5 : end])
            elif mtype == _P:
                yield m.decode_parse(buf[start + 5 : end])[1]


class UnitsClient(Protocol):
    """What ``Units`` reads and calls of its client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    phase: int
    session: Session

    def hold(self, batch: Batch, reason: Input) -> None: ...
    def resume_batch(self, reason: Input, dispatch: Callable[[], None]) -> None: ...
    def dispatch(self, batch: Batch) -> None: ...


class Units:
    """See the module docstring. ``stmt_info`` and ``unnamed_info`` are written where a Parse is sent
    (``Effects.note_sql``, proxy/frontend/effects.py) or answered (proxy/frontend/control.py)."""

    __slots__ = ("app", "classifying", "client", "stmt_info", "unnamed_info")

    def __init__(self, client: UnitsClient) -> None:
        self.client = client
        self.app = client.app
        self.stmt_info: dict[str, c.Classification] = {}  # the client's named statements, by name
        self.unnamed_info: c.Classification | None = None  # its unnamed statement's
        self.classifying: asyncio.Task[None] | None = None  # large statements of a waiting batch

    def info(self, batch: Batch) -> tuple[c.Classification | None, str | None]:
        """The classification of everything the unit executes, and a /* route: */ override if any."""
        buf = batch.buf
        classifier = self.app.classifier
        msgs = batch.msgs
        if len(msgs) == 1 and msgs[0][0] == _Q and msgs[0][2] - msgs[0][1] - 6 <= c.INLINE_BYTES:
            # A lone simple query (the common unit): the loop below, for one message.
            sql = buf[msgs[0][1] + 5 : msgs[0][2] - 1]
            if sql[:1] in _OVERRIDE_START and sql.lstrip().startswith(b"/*"):
                return classifier.classify_bytes(sql), route_override(sql.decode(errors="replace"))
            return classifier.classify_bytes(sql), None
        infos: list[c.Classification] = []
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
                if hi - lo > c.INLINE_BYTES:
                    deep = batch.analyses.get(start, c.UNCLASSIFIED) if batch.analyses else c.UNCLASSIFIED
                    infos.append(deep.info)
                    override = deep.override or override
                    continue
                sql = buf[lo:hi]
                infos.append(classifier.classify_bytes(sql))
                if sql[:1] in _OVERRIDE_START and sql.lstrip().startswith(b"/*"):
                    override = route_override(sql.decode(errors="replace")) or override
            elif mtype == _B:
                if buf[start + 5] == 0 and buf[start + 6] == 0:
                    if not unnamed_parsed and self.unnamed_info is not None:
                        infos.append(self.unnamed_info)
                    continue
                _, name, _ = m.decode_bind_names(buf[start + 5 : end])
                if not (unnamed_parsed if not name else parsed is not None and name in parsed):
                    stmt = self.client.session.statements.get(name)
                    if stmt is not None:
                        infos.append(self.stmt_info.get(name) or classifier.classify(stmt.sql))
        if not infos:
            return None, override
        return (infos[0] if len(infos) == 1 else c.merge(infos)), override

    def classify_later(self, batch: Batch) -> bool:
        """Statements above INLINE_BYTES are analysed in the classifier child (proxy/router/worker.py), never
        on the event loop. True when the batch must wait for that; reading from the client is paused
        meanwhile (as for a pool) and everyone else is served. ``batch.analyses`` is set either way."""
        worker = self.app.classifier_worker
        buf = batch.buf
        found: dict[int, c.Analysis] = {}
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
            if hi - lo <= c.INLINE_BYTES:
                continue
            if hi - lo > c.MAX_CLASSIFY_BYTES:
                found[start] = c.UNCLASSIFIED  # not parsed at all: PostgreSQL judges it
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
        self.client.hold(batch, Input.CLASSIFY)
        self.classifying = asyncio.get_running_loop().create_task(self._classify(batch, found, pending))
        return True

    async def _classify(
        self, batch: Batch, found: dict[int, c.Analysis], pending: list[tuple[int, bytes, bytes]]
    ) -> None:
        worker = self.app.classifier_worker
        for start, sql, key in pending:
            found[start] = await worker.analyze(sql, key)  # cancelled if the client goes
        self.classifying = None
        client = self.client
        if client.phase == CLOSED:
            return
        client.resume_batch(Input.CLASSIFY, lambda: client.dispatch(batch))

    def cancel(self) -> None:
        """The client is gone: stop analysing for it."""
        if self.classifying is not None:
            self.classifying.cancel()
            self.classifying = None


def lone_unnamed_statement(batch: Batch) -> tuple[tuple[int, int], list[bytes]] | None:
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


def rolls_back_to(batch: Batch) -> bool:
    """Whether the unit rolls back to a savepoint (which makes a failed transaction usable again)."""
    if batch.analyses and any(
        change.op == "rollback_to" for deep in batch.analyses.values() for change in deep.changes
    ):
        return True
    for sql in batch.queries():
        if len(sql) > c.INLINE_BYTES:
            continue  # analysed off the event loop (above)
        try:
            if any(change.op == "rollback_to" for change in c.session_changes(sql)):
                return True
        except pglast.parser.ParseError:
            continue
    return False
