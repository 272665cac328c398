"""Prepared statements on upstream connections: content-addressed names, re-prepares where a connection
lacks a statement, the client's unnamed statement, eviction, and the retry after a stale cached plan.

Nothing here writes to a socket: messages to send go into the caller's ``out`` (pieces joined into one
write) and their expectations into ``ents`` (registered on the connection in order). The sequence that puts
a statement on a connection, Close + Parse with their expectations, is ``prepare``, and only there.

``send`` (send.py) keeps the common messages inline (the data path's hottest loop) and hands the
ones the proxy may rewrite to ``Statements``: ``bind``, ``parse_named``, ``parse_unnamed_cached``,
``describe``, ``close``. Each is called once the caller has put the client's bytes before the message in
``out``, and appends what replaces the message (``bind``, ``describe`` and ``close``: the message itself when
it goes as it is) and its expectation.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from typing import Protocol

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import (
    FORWARD,
    K_BIND,
    K_CLOSE,
    K_DESCRIBE,
    K_PARSE,
    K_SYNTH,
    PLAIN_QUERY,
    PLAIN_SYNC,
    SWALLOW,
    SWALLOW_OK,
    SYNTH_PARSE_COMPLETE,
    Expect,
)
from proxy.frontend.session import PreparedStatement
from proxy.protocol import messages as m

log = logging.getLogger("parafort.client")

Piece = bytes | memoryview
Entry = Expect | int  # a plain kind stands for Expect(kind); SYNC_EXT / SYNC_Q for a Sync / a Query

SYNC_EXT = -1  # a Sync
SYNC_Q = -2  # a Query or FunctionCall
_P, _B, _S = b"PBS"
_DESCRIBE_EXECUTE_SYNC = frozenset(b"DES")
B_HEADER = struct.Struct("!BIB")  # a Bind's type, length and its (empty) portal name
_CLOSE_UNNAMED = m.close(b"S", "")
UNNAMED_CACHE_SIZE = 10_000  # distinct unnamed Parse payloads remembered (then forgotten all at once)
_UPSTREAM_NAME_LENGTH = 27  # "pf_" and 24 hex digits (PreparedStatement.make)
_HEX = frozenset(b"0123456789abcdef")
FAILED = ord("E")  # a transaction status: PostgreSQL refuses every Parse there (25P02)


class Context(Protocol):
    """What the bookkeeping reads from the process (settings may change on reload)."""

    @property
    def unnamed_statements(self) -> dict[bytes, PreparedStatement]: ...  # statements.cache_unnamed: shared
    @property
    def max_statements(self) -> int: ...  # statements.max_per_connection
    @property
    def statement_events(self) -> dict[tuple[str, str], int]: ...  # (role, event) -> count, for metrics


class RetryBatch(Protocol):
    """The parts of a client batch the stale-plan retry reads (a ``Batch``; a unit the fast path sent)."""

    @property
    def buf(self) -> bytes: ...
    @property
    def msgs(self) -> list[tuple[int, int, int]]: ...
    @property
    def end(self) -> int: ...
    @property
    def terminator(self) -> int: ...


def count(events: dict[tuple[str, str], int], role: str, event: str) -> None:
    key = (role, event)
    events[key] = events.get(key, 0) + 1


def sync_entry(code: int) -> Expect:
    return PLAIN_SYNC if code == SYNC_EXT else PLAIN_QUERY


def forget_on_failure(server: ServerConnection, name: str) -> Callable[[bool], None]:
    """An ``on_done`` that drops ``name`` from the connection's books if its message failed."""

    def done(ok: bool) -> None:
        if not ok:
            server.prepared.pop(name, None)

    return done


def client_names(error: bytes, named: Mapping[str, PreparedStatement]) -> bytes:
    """``error`` (an ErrorResponse from upstream) with a client's statements named as the client named them
    (``named``: its session's), not as upstream. Two names of the client's for one text share an upstream
    statement: the error names either. Any other upstream name is an unnamed statement the proxy kept for
    the client (statements.cache_unnamed: this one, or the one before it in a batch that parsed the next),
    which PostgreSQL names "". Only names of the upstream shape ("pf_" and 24 hex digits) are; a table of
    the user's named "pf_..." is left alone."""
    payload = error[5:]
    for name, stmt in named.items():
        quoted = f'"{stmt.upstream_name}"'.encode()
        if quoted in payload:
            payload = payload.replace(quoted, f'"{name}"'.encode(errors="surrogateescape"))
    start = payload.find(b'"pf_')
    while start >= 0:
        end = payload.find(b'"', start + 1)
        if end < 0:
            break
        if end - start == _UPSTREAM_NAME_LENGTH + 1 and _HEX.issuperset(payload[start + 4 : end]):
            payload = payload[:start] + b'""' + payload[end + 1 :]
            end = start + 1
        start = payload.find(b'"pf_', end + 1)
    return error[:1] + (len(payload) + 4).to_bytes(4, "big") + payload


def prepare(
    server: ServerConnection,
    stmt: PreparedStatement,
    action: int,
    out: list[Piece],
    ents: list[Entry],
    *,
    events: dict[tuple[str, str], int],
    event: str = "prepared",
    on_done: Callable[[bool], None] | None = None,
) -> None:
    """Close + Parse of ``stmt`` on ``server``, and their expectations: the Close's reply is swallowed
    (a statement whose Bind failed may still exist there; closing a missing one is no error), the Parse's
    goes by ``action`` (FORWARD: the client's own Parse; SWALLOW_OK: injected, only its error is the
    client's). The connection's books list the statement most recently used last; a failed Parse leaves
    them (``on_done``, when given, does that and more)."""
    name = stmt.upstream_name
    out.append(m.close(b"S", name))
    ents.append(Expect(K_CLOSE, SWALLOW))
    out.append(m.parse(name, stmt.sql, stmt.param_oids))
    server.prepared[name] = None
    count(events, server.role, event)
    ents.append(Expect(K_PARSE, action, on_done=on_done or forget_on_failure(server, name)))


class Statements:
    """One client's unnamed statement and the re-prepares its batches need (named statements live in the
    client's ``Session``)."""

    __slots__ = ("ctx", "refused", "unnamed", "unnamed_stmt", "unnamed_token")

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # The last unnamed statement this client parsed (its Parse message), and a token naming it on
        # upstream connections (``ServerConnection.unnamed_owner``).
        self.unnamed: bytes | None = None
        # statements.cache_unnamed: the upstream statement that stands for the client's unnamed one.
        self.unnamed_stmt: PreparedStatement | None = None
        self.unnamed_token: object | None = None
        # The last named statement whose Parse PostgreSQL refused or skipped: a Close of it in the same
        # batch, skipped too, must not bring it back (``_reinstate``).
        self.refused: PreparedStatement | None = None

    def parse_named(
        self,
        server: ServerConnection,
        payload: bytes,
        named: dict[str, PreparedStatement],
        out: list[Piece],
        ents: list[Entry],
    ) -> None:
        """A named Parse: the statement under the client's name in ``named`` (its session's), prepared
        upstream. A Close first: the client may be asking for a fresh prepare (asyncpg does after a schema
        change made the old one fail with "cached plan must not change result type"), or the connection
        may still hold a statement its books dropped after a failed Bind. When the Parse fails (or is
        skipped after an earlier error) the client's books are as they were: PostgreSQL made nothing.
        A name the client has already is PostgreSQL's error 42P05, and PostgreSQL's own: the Parse goes
        upstream under the name of the statement the client has (prepared there first if need be), where
        it is refused as on the client's own server; the error names it as the client does
        (``Sink.client_names``), and the transaction fails as it would."""
        name, sql, oids = m.decode_parse(payload)
        existing = named.get(name)
        if existing is not None:  # (even if its Parse is still in flight: it is far likelier to succeed)
            self.ensure(server, existing, out, ents)
            out.append(m.parse(existing.upstream_name, sql, oids))
            ents.append(Expect(K_PARSE))
            return
        stmt = PreparedStatement.make(sql, oids)
        upstream = stmt.upstream_name
        server.prepared.pop(upstream, None)
        named[name] = stmt

        def done(ok: bool) -> None:
            if not ok:
                server.prepared.pop(upstream, None)
                self.refused = stmt
                if named.get(name) is stmt:
                    del named[name]

        prepare(server, stmt, FORWARD, out, ents, events=self.ctx.statement_events, on_done=done)

    def parse_unnamed_cached(
        self, server: ServerConnection, payload: bytes, out: list[Piece], ents: list[Entry]
    ) -> None:
        """statements.cache_unnamed: an unnamed Parse becomes a named statement kept upstream; when the
        connection already has it, the Parse is not sent and the client gets its ParseComplete (but in a
        failed transaction, where PostgreSQL refuses it: 25P02)."""
        ctx = self.ctx
        cache = ctx.unnamed_statements
        stmt = cache.get(payload)
        if stmt is None:
            _, sql, oids = m.decode_parse(payload)
            stmt = PreparedStatement.make(sql, oids)
            if len(cache) >= UNNAMED_CACHE_SIZE:
                cache.clear()
            cache[payload] = stmt
        self.unnamed_stmt = stmt
        self.unnamed = None
        name = stmt.upstream_name
        prepared = server.prepared
        if name in prepared and server.status != FAILED:
            del prepared[name]
            prepared[name] = None
            ents.append(SYNTH_PARSE_COMPLETE)
            events = ctx.statement_events  # count(), inline (the hot path of statements.cache_unnamed)
            key = (server.role, "reused")
            events[key] = events.get(key, 0) + 1
            return
        prepare(server, stmt, FORWARD, out, ents, events=ctx.statement_events)

    def answered_locally(self, raw: bytes) -> None:
        """The client's unnamed statement is ``raw`` (a Parse the proxy answered itself, such as a deferred
        BEGIN's): a later Bind of it parses it upstream first. (An unnamed Parse sent upstream as it is
        does the same and makes the connection's ``unnamed_owner`` the new token: inline in
        ``send`` in send.py, the extended protocol's hot path.)"""
        self.unnamed_stmt = None
        self.unnamed = raw
        self.unnamed_token = object()

    def forget_unnamed(self) -> None:
        """The client's unnamed statement is gone (a simple Query destroys it): none, as for a new client,
        so a Bind of it goes to a connection whose unnamed statement is no one's and fails there (26000)."""
        self.unnamed = self.unnamed_stmt = self.unnamed_token = None

    def claim_unnamed(self, server: ServerConnection, out: list[Piece], ents: list[Entry]) -> None:
        """Before a message that uses the connection's unnamed statement: make it this client's (its Parse
        again), or none at all when the client never parsed one: never another client's statement."""
        token = self.unnamed_token
        if self.unnamed is not None:
            out.append(self.unnamed)

            def done(ok: bool) -> None:  # refused (a failed transaction) or skipped: not there after all
                if not ok and server.unnamed_owner is token:
                    server.unnamed_owner = None

            ents.append(Expect(K_PARSE, SWALLOW_OK, on_done=done))
        else:
            out.append(_CLOSE_UNNAMED)
            ents.append(Expect(K_CLOSE, SWALLOW))
        server.unnamed_owner = token

    def ensure(
        self, server: ServerConnection, stmt: PreparedStatement, out: list[Piece], ents: list[Entry]
    ) -> bool:
        """Prepare ``stmt`` on ``server`` first if it has not seen it (its reply is not the client's);
        True when it was."""
        name = stmt.upstream_name
        prepared = server.prepared
        if name in prepared:
            # Most recently used last: eviction takes the oldest first.
            del prepared[name]
            prepared[name] = None
            return False
        prepare(server, stmt, SWALLOW_OK, out, ents, events=self.ctx.statement_events)
        return True

    # -- messages that name statements, from send (send.py) ------------------------------------------------
    def bind(  # noqa: PLR0917  (positional: the cheapest call, on the data path)
        self, server: ServerConnection, buf: bytes, view: memoryview, start: int, end: int,
        named: dict[str, PreparedStatement], out: list[Piece], ents: list[Entry],
        retry: RetryBatch | None,
    ) -> bool:  # fmt: skip
        """A Bind other than one of the client's own unnamed statement on this connection, which goes as it
        is (inline in the caller). A statement the client prepared is renamed to its upstream name (and
        prepared there first if the connection lacks it); with statements.cache_unnamed, a Bind of the
        unnamed statement to the unnamed portal binds the upstream statement standing for it, and
        ``retry`` is the batch when a stale cached plan may run it again unseen (nothing else in flight,
        no transaction open); the client's unnamed statement on a connection where it is another's is
        claimed first. True when an expectation not forwarding replies was queued."""
        stmt = self.unnamed_stmt
        if stmt is not None and buf[start + 5] == 0 and buf[start + 6] == 0:  # statements.cache_unnamed
            name = stmt.upstream_name
            prepared = server.prepared
            if name in prepared:  # as ensure, inline (the hot path of statements.cache_unnamed)
                del prepared[name]
                prepared[name] = None
            else:
                prepare(server, stmt, SWALLOW_OK, out, ents, events=self.ctx.statement_events)
            # Unnamed portal, the upstream name, the client's parameters as they are (bind_header, inline).
            out.append(B_HEADER.pack(_B, end - start - 2 + len(stmt.name_field), 0))
            out.append(stmt.name_field)
            out.append(view[start + 7 : end])
            bind = Expect(K_BIND, on_done=forget_on_failure(server, stmt.upstream_name))
            if retry is not None:
                bind.retry = StalePlanRetry(server, stmt, (start, end), retry, self.ctx.statement_events)
            ents.append(bind)
            return True
        body = buf[start + 5 : end]
        _, name, _ = m.decode_bind_names(body)
        stmt, special = self._ready(server, name, named, out, ents)
        out.append(view[start:end] if stmt is None else m.rewrite_bind(body, stmt.upstream_name))
        ents.append(K_BIND)
        return special

    def _ready(
        self,
        server: ServerConnection,
        name: str,
        named: dict[str, PreparedStatement],
        out: list[Piece],
        ents: list[Entry],
    ) -> tuple[PreparedStatement | None, bool]:
        """The statement a Bind or a Describe names (``name``; the client's unnamed one when empty) if the
        client prepared it, then prepared first where the connection lacks it; else None (the message goes
        as it is), the client's unnamed statement claimed first where it is another's. With True when an
        expectation not forwarding replies was queued."""
        stmt = named.get(name) if name else self.unnamed_stmt
        if stmt is not None:
            return stmt, self.ensure(server, stmt, out, ents)
        if name or server.unnamed_owner is self.unnamed_token:
            return None, False
        self.claim_unnamed(server, out, ents)
        return None, True

    def describe(  # noqa: PLR0917  (positional: the cheapest call, on the data path)
        self, server: ServerConnection, buf: bytes, view: memoryview, start: int, end: int,
        named: dict[str, PreparedStatement], out: list[Piece], ents: list[Entry],
    ) -> bool:  # fmt: skip
        """A Describe of a statement (a portal's goes as it is, inline): renamed, and prepared first where
        the connection lacks it, as for ``bind``. True when an expectation not forwarding replies was
        queued."""
        name = m.decode_describe_close(buf[start + 5 : end])[1] if buf[start + 6] != 0 else ""
        stmt, special = self._ready(server, name, named, out, ents)
        out.append(view[start:end] if stmt is None else m.describe(b"S", stmt.upstream_name))
        ents.append(K_DESCRIBE)
        return special

    def close(  # noqa: PLR0917  (positional: the cheapest call, on the data path)
        self, server: ServerConnection, buf: bytes, view: memoryview, start: int, end: int,
        named: dict[str, PreparedStatement], out: list[Piece], ents: list[Entry],
    ) -> bool:  # fmt: skip
        """A Close: of a statement the client prepared (or its cached unnamed one) answered by the proxy,
        only the client's name forgotten (the upstream statement is content-addressed: it stays for
        reuse); any other goes as it is. True when answered, or when the Close of the client's unnamed
        statement goes with an expectation of its own (``_unnamed_back``)."""
        kind, name = m.decode_describe_close(buf[start + 5 : end])
        if kind == b"S" and (name or self.unnamed_stmt is not None):
            # Forgotten now (a Parse of the same name may follow in this batch), kept again if an earlier
            # message fails: PostgreSQL then skips the Close up to the Sync, and the statement stays.
            if name:
                closed = named.pop(name, None)
                undo = None if closed is None else self._reinstate(named, name, closed)
            else:
                closed, self.unnamed_stmt = self.unnamed_stmt, None
                undo = self._reinstate(None, "", closed)
            ents.append(Expect(K_SYNTH, data=m.close_complete(), on_done=undo))
            return True
        out.append(view[start:end])
        if kind == b"S" and self.unnamed_token is not None:  # the client's own unnamed statement: gone
            server.unnamed_owner = None  # (from whatever connection it was on: a Bind of it now fails)
            ents.append(Expect(K_CLOSE, on_done=self._unnamed_back(self.unnamed, self.unnamed_token)))
            self.unnamed = self.unnamed_token = None
            return True
        if kind == b"S":
            server.unnamed_owner = None
        ents.append(K_CLOSE)
        return False

    def _unnamed_back(self, raw: bytes | None, token: object) -> Callable[[bool], None]:
        """An ``on_done`` for a Close of the client's unnamed statement: when the server skipped it (an
        earlier message failed), the statement is the client's again, unless it has parsed another since."""

        def done(ok: bool) -> None:
            if not ok and self.unnamed_token is None and self.unnamed_stmt is None:
                self.unnamed, self.unnamed_token = raw, token

        return done

    def _reinstate(
        self, named: dict[str, PreparedStatement] | None, name: str, closed: PreparedStatement | None
    ) -> Callable[[bool], None]:
        """An ``on_done`` for a Close the proxy answered: when the server skipped it (``ok`` False), the
        client's statement is there again, unless the client has defined the name anew since."""

        def done(ok: bool) -> None:
            if ok or closed is None or closed is self.refused:
                return
            if named is None:
                if self.unnamed_stmt is None:
                    self.unnamed_stmt = closed
            else:
                named.setdefault(name, closed)

        return done

    def evict(self, server: ServerConnection, out: list[Piece]) -> None:
        """Between transactions no portal depends on a statement: close the least recently used beyond
        statements.max_per_connection."""
        prepared = server.prepared
        keep = self.ctx.max_statements
        while len(prepared) > keep:
            name = next(iter(prepared))
            del prepared[name]
            out.append(m.close(b"S", name))
            server.push(Expect(K_CLOSE, SWALLOW))
            count(self.ctx.statement_events, server.role, "evicted")


class StalePlanRetry:
    """Runs a batch again after PostgreSQL said a kept statement's cached plan changed result type (DDL
    since it was prepared): Close and Parse it afresh, then the batch's Bind and what followed it."""

    __slots__ = ("batch", "bind_end", "bind_start", "events", "server", "stmt")

    def __init__(
        self,
        server: ServerConnection,
        stmt: PreparedStatement,
        bind: tuple[int, int],
        batch: RetryBatch,
        events: dict[tuple[str, str], int],
    ) -> None:
        self.events = events
        self.server = server
        self.stmt = stmt
        self.batch = batch
        self.bind_start, self.bind_end = bind

    def applies(self) -> bool:
        """Whether the batch is [unnamed Parse] Bind (Describe|Execute)* Sync with this Bind its first
        message sent upstream: then all of it from the Bind on can be sent again."""
        batch = self.batch
        msgs = batch.msgs
        if batch.terminator != _S:
            return False
        i = 0
        if msgs[0][0] == _P:
            if batch.buf[msgs[0][1] + 5] != 0:
                return False
            i = 1
        if len(msgs) <= i or msgs[i][1] != self.bind_start:
            return False
        return all(t in _DESCRIBE_EXECUTE_SYNC for t, _, _ in msgs[i + 1 :])

    def __call__(self) -> None:
        server, stmt, buf = self.server, self.stmt, self.batch.buf
        out: list[Piece] = []
        ents: list[Entry] = []
        prepare(server, stmt, SWALLOW_OK, out, ents, events=self.events, event="prepared_again_after_ddl")
        ents.append(Expect(K_BIND, on_done=forget_on_failure(server, stmt.upstream_name)))
        ents.append(sync_entry(SYNC_EXT))  # the replies to Describe and Execute are the Sync's unit
        for entry in ents:
            assert isinstance(entry, Expect)
            server.push(entry)
        log.info("event=statement_prepared_again upstream=%s reason=result_type_changed", server.label)
        out.append(bind_header(stmt, self.bind_end - self.bind_start))
        out.append(stmt.name_field)
        out.append(buf[self.bind_start + 7 : self.batch.end])
        server.send(b"".join(out))


def bind_header(stmt: PreparedStatement, size: int) -> bytes:
    """The start of a Bind of ``stmt`` to the unnamed portal that replaces a client's Bind of its unnamed
    statement (``size``: that message's bytes, type byte included); then ``stmt.name_field``, then the
    client's parameters as they are (its message from offset 7 on)."""
    return B_HEADER.pack(_B, size - 2 + len(stmt.name_field), 0)


__all__ = [
    "SYNC_EXT",
    "SYNC_Q",
    "UNNAMED_CACHE_SIZE",
    "Context",
    "Entry",
    "Piece",
    "StalePlanRetry",
    "Statements",
    "bind_header",
    "count",
    "forget_on_failure",
    "prepare",
    "sync_entry",
]
