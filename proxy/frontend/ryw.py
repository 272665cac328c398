"""Read-your-writes, the write side: WAL positions of main captured after writes, kept per scope.

When a unit that wrote on main ends outside a transaction (an autocommit write, or the COMMIT of a
transaction that wrote) with nothing else in flight, the client connection sends ``CAPTURE_SQL`` on the
same upstream connection, right after forwarding the client's ReadyForQuery (``Capture``) — or, behind a
lone COMMIT or ROLLBACK the fast path sends (proxy/frontend/fast.py), in the same write: its reply is
swallowed, its WAL position becomes the scope's *token*, and the lease ends only after it. The client
never waits for it. Until the capture's reply arrives the scope has a *capture pending*: a read of that
scope waits for it rather than trust an older token. A failed capture (the connection lost) puts the scope
*in doubt*: its reads go to main for ``DOUBT_SECONDS`` or until its next write is captured.

A token carries main's identity (system identifier, timeline, postmaster start), read on the first
capture of each main connection: when it changes (a failover, a restore from a backup, a restart), every
older token is put in doubt, since positions of another history say nothing about this one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import pglast
from pglast import ast
from pglast.enums import VariableSetKind

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import K_SYNC, SWALLOW, Expect
from proxy.health import parse_lsn
from proxy.protocol import messages as m

log = logging.getLogger("parafort.ryw")

# The first capture on a main connection also reads main's identity; later ones only the position.
CAPTURE_SQL = "SELECT pg_current_wal_insert_lsn()"
IDENTITY_SQL = (
    "SELECT pg_current_wal_insert_lsn(), (SELECT system_identifier FROM pg_control_system()), "
    "substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8), pg_postmaster_start_time()"
)
CAPTURE_QUERY = m.query(CAPTURE_SQL)
IDENTITY_QUERY = m.query(IDENTITY_SQL)
DOUBT_SECONDS = 30.0  # a scope whose token is unknown or untrusted reads from main this long at most
PARAMETER = "parafort.write_lsn"
MIN_LSN = "parafort.min_lsn"

Key = tuple[object, ...]
Identity = tuple[str, ...]


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL's ``pg_lsn`` prints it: ``X/Y`` in upper-case hex."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def decode_row(payload: bytes) -> list[str | None]:
    """The text columns of a DataRow payload."""
    count = int.from_bytes(payload[:2], "big")
    pos = 2
    out: list[str | None] = []
    for _ in range(count):
        size = int.from_bytes(payload[pos : pos + 4], "big", signed=True)
        pos += 4
        if size < 0:
            out.append(None)
            continue
        out.append(payload[pos : pos + size].decode())
        pos += size
    return out


def parse_min_lsn(value: str) -> int:
    """A ``parafort.min_lsn`` value (``X/Y``, as ``pg_lsn`` prints it); ValueError if it is not one."""
    lsn = parse_lsn(value.strip())
    if lsn is None:
        raise ValueError(value)
    return lsn


def min_lsn_statement(sql: str) -> tuple[str, str | None] | None:
    """For exactly one ``SET [SESSION] parafort.min_lsn = '...'`` / ``RESET parafort.min_lsn``: its
    command tag and value (None: reset); None for any other SQL."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    if len(statements) != 1:
        return None
    stmt = statements[0].stmt
    if not isinstance(stmt, ast.VariableSetStmt) or (stmt.name or "").lower() != MIN_LSN:
        return None
    if stmt.kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
        return ("RESET" if stmt.kind == VariableSetKind.VAR_RESET else "SET"), None
    if stmt.kind != VariableSetKind.VAR_SET_VALUE or not stmt.args or len(stmt.args) != 1:
        return "SET", ""
    arg = stmt.args[0]
    val = getattr(arg, "val", None)
    text = getattr(val, "sval", None)
    return "SET", text if isinstance(text, str) else str(getattr(val, "ival", ""))


class Writes:
    """Tokens (main's WAL position after a scope's latest write), pending captures and doubts, by scope."""

    def __init__(self) -> None:
        self.tokens: dict[Key, int] = {}
        self.pending: dict[Key, int] = {}  # captures whose reply has not arrived, by scope
        self._pending_done: dict[Key, asyncio.Future[None]] = {}
        self.doubt: dict[Key, float] = {}  # scope -> monotonic time until which its reads go to main
        self.identity: Identity | None = None
        self.high = 0  # the highest position captured under ``identity``
        self.captures = 0
        self.capture_failures = 0
        self.identity_changes = 0

    # -- capture lifecycle ----------------------------------------------------------------------------
    def begin(self, key: Key) -> None:
        """A write's reply reached the client; its position is on its way."""
        self.pending[key] = self.pending.get(key, 0) + 1

    def end(self, key: Key, lsn: int | None, identity: Identity | None) -> None:
        """The capture's reply arrived (``lsn``), or it failed (None)."""
        if lsn is None:
            self.capture_failures += 1
            self.tokens.pop(key, None)
            self.doubt[key] = time.monotonic() + DOUBT_SECONDS
            log.info("event=ryw_capture_failed reads_to=main seconds=%g", DOUBT_SECONDS)
        else:
            self.captures += 1
            if identity is not None and identity != self.identity:
                self._new_identity(identity)
            self.high = max(self.high, lsn)
            self.doubt.pop(key, None)
            if self.tokens.get(key, -1) < lsn:
                self.tokens[key] = lsn
        left = self.pending.get(key, 1) - 1
        if left > 0:
            self.pending[key] = left
            return
        self.pending.pop(key, None)
        done = self._pending_done.pop(key, None)
        if done is not None and not done.done():
            done.set_result(None)

    def _new_identity(self, identity: Identity) -> None:
        if self.identity is not None:
            self.identity_changes += 1
            until = time.monotonic() + DOUBT_SECONDS
            for key in self.tokens:
                self.doubt[key] = until
            self.tokens.clear()
            log.warning(
                "event=ryw_main_changed reason=%r tokens_in_doubt=%d seconds=%g",
                "system identifier, timeline or start time of main changed",
                len(self.doubt),
                DOUBT_SECONDS,
            )
        self.identity = identity
        self.high = 0

    def pending_done(self, key: Key) -> asyncio.Future[None]:
        """A future that completes when the scope has no capture pending."""
        fut = self._pending_done.get(key)
        if fut is None:
            fut = self._pending_done[key] = asyncio.get_running_loop().create_future()
        return fut

    # -- what a read needs ----------------------------------------------------------------------------
    def in_doubt(self, key: Key) -> bool:
        until = self.doubt.get(key)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self.doubt[key]
        return False

    def drop_reached(self, replayed: int) -> None:
        """Forget every token that ``replayed`` (the least replay position of all replicas) has passed."""
        if self.tokens:
            for key in [k for k, lsn in self.tokens.items() if lsn <= replayed]:
                del self.tokens[key]

    def forget(self, key: Key) -> None:
        """A connection scope's connection closed."""
        self.tokens.pop(key, None)
        self.doubt.pop(key, None)


class Capture:
    """One capture in flight: registered behind a write unit on its main connection (see the module)."""

    __slots__ = ("client", "identity", "key", "lsn", "released", "server", "writes")

    def __init__(self, writes: Writes, key: Key, server: ServerConnection, client: CaptureSink) -> None:
        self.writes = writes
        self.key = key
        self.server = server
        self.client: CaptureSink | None = client
        self.lsn: int | None = None
        self.identity: Identity | None = None
        self.released = False

    def send(self, behind: bytes = b"") -> None:
        """Send the capture query on the connection: the scope has a capture pending until its reply
        arrives. Nothing else is in flight on it, or only ``behind``, the client's unit that certainly
        ends its write transaction (a lone COMMIT or ROLLBACK, its expectation pushed already): then the
        capture goes in the same write, and PostgreSQL runs it as soon as that unit has ended."""
        server = self.server
        self.writes.begin(self.key)
        server.unnamed_owner = None  # a simple Query: PostgreSQL drops the unnamed statement
        server.push(Expect(K_SYNC, SWALLOW, on_done=self._done, on_row=self._row))
        query = CAPTURE_QUERY if server.identity is not None else IDENTITY_QUERY
        server.send(behind + query if behind else query)

    def _row(self, payload: bytes) -> None:
        try:
            cols = decode_row(payload)
            self.lsn = parse_lsn(cols[0])
            if len(cols) == 4 and None not in cols:
                self.identity = tuple(c for c in cols[1:] if c is not None)
        except (ValueError, IndexError, UnicodeDecodeError):
            self.lsn = None

    def _done(self, ok: bool) -> None:
        if self.released:
            return
        self.released = True
        lsn = self.lsn if ok else None
        server = self.server
        if lsn is not None and self.identity is not None:
            server.identity = self.identity
        self.writes.end(self.key, lsn, server.identity if lsn is not None else None)
        client, self.client = self.client, None
        if client is not None:
            client.captured(self, lsn)


class CaptureSink(Protocol):
    """What a Capture tells the client connection that sent it (see ClientConnection.captured)."""

    def captured(self, capture: Capture, lsn: int | None) -> None: ...


__all__ = ["Capture", "CaptureSink", "Writes", "decode_row", "format_lsn"]
