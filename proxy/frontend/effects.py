"""What one client's statements change beyond their replies, and whether it took effect: SET / RESET and
savepoints staged in the client's ``Session`` while they run and settled by their outcome (the command tag
and whether an error was reported), DISCARD / DEALLOCATE ALL forgetting the connection's statements,
pinning, and a connection left in a state no other client may see (``server_dirty``).

A SET sent through the extended protocol takes effect when a portal made from its statement is executed:
``note_sql`` keeps its changes by statement, ``bind_changes`` hands them to the portal, ``execute_changes``
stages them.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from proxy.backend.connection import ServerConnection
from proxy.backend.expect import FORWARD
from proxy.context import ClientContext
from proxy.frontend.reads import Reads
from proxy.frontend.session import Session
from proxy.frontend.txstate import TxState
from proxy.frontend.units import Units
from proxy.protocol import messages as m
from proxy.router.classify import (
    F_FORGET_PREPARED,
    F_PIN,
    F_SAVEPOINT,
    F_SESSION_SET,
    Analysis,
    Classification,
    SessionChange,
    session_changes,
)

log = logging.getLogger("parafort.client")

_IDLE = ord("I")


class EffectsClient(Protocol):
    """What ``Effects`` reads and calls of its client connection (proxy/frontend/client.py)."""

    app: ClientContext[Any]
    tx: TxState[Any]
    session: Session
    reads: Reads[Any]
    server: ServerConnection | None
    server_role: str
    units: Units

    @property
    def id(self) -> int: ...


class Effects:
    """See the module docstring."""

    __slots__ = (
        "client",
        "error_seen",
        "forget_lone",
        "forget_prepared",
        "last_tag",
        "portal_changes",
        "server_dirty",
        "staged_in_tx",
        "stmt_changes",
        "unnamed_changes",
    )

    def __init__(self, client: EffectsClient) -> None:
        self.client = client
        # The outcome of the unit in flight with staged changes: an error, its last command tag, whether
        # the changes were staged inside a transaction, a DISCARD / DEALLOCATE ALL awaiting its outcome.
        self.error_seen = False
        self.last_tag = b""
        self.staged_in_tx = False
        self.forget_prepared = False
        self.forget_lone = False  # ... and it is the only statement of its Query
        # What the connection held now holds is unknown: it serves this client only (and is closed after).
        self.server_dirty = False
        # Session changes of the client's statements (named, unnamed) and of its portals, until executed.
        self.stmt_changes: dict[str, list[SessionChange]] = {}
        self.unnamed_changes: list[SessionChange] = []
        self.portal_changes: dict[str, list[SessionChange]] = {}

    def note_sql(
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
        if statement == b"" and self.unnamed_changes:
            self.unnamed_changes = []
        client = self.client
        if deep is not None:
            info = deep.info
        elif info is None:
            info = client.app.classifier.classify_bytes(sql)
        if statement is not None:
            if statement:
                client.units.stmt_info[statement.decode(errors="surrogateescape")] = info
            else:
                client.units.unnamed_info = info
        flags = info.bits
        if not flags:
            return False
        tx = client.tx
        if flags & F_PIN and tx.pin_reason is None:
            tx.pin(info.pin_reason or "session state")
            client.app.client_pinned(client)
            log.info("event=pinned client=%s role=%s reason=%r", client.id, client.server_role, tx.pin_reason)
        details = False
        if flags & (F_SESSION_SET | F_SAVEPOINT):
            if deep is not None:
                changes = list(deep.changes)
            else:
                changes = session_changes(sql.decode(errors="replace"))
            if statement is None:
                self.stage(changes, server)
            elif not statement:
                self.unnamed_changes = changes
            else:
                self.stmt_changes[statement.decode(errors="surrogateescape")] = changes
            details = True
        if flags & F_FORGET_PREPARED:
            if statement is None:
                self.forget_prepared = True  # settled when the query's outcome is known
                # Alone in its Query with no reply of the client's still to come before it: its own reply
                # says what it did (``settle_forget``), whatever transaction it is in (it is not
                # transactional).
                self.forget_lone = info.statements == 1 and all(e.action != FORWARD for e in server.expect)
                if self.forget_lone:
                    self.error_seen = False
                details = True
            else:
                # Through the extended protocol it may run later or never: whatever the connection
                # then holds is unknown, so it serves no one else.
                self.server_dirty = True
        return details

    def bind_changes(self, buf: bytes, start: int, end: int) -> None:
        """Session changes a Bind's statement makes become its portal's (staged when it is executed)."""
        portal, statement, _ = m.decode_bind_names(buf[start + 5 : end])
        changes = self.unnamed_changes if not statement else self.stmt_changes.get(statement)
        if changes:
            self.portal_changes[portal] = changes

    def execute_changes(self, buf: bytes, start: int) -> None:
        portal = buf[start + 5 : buf.index(0, start + 5)].decode(errors="surrogateescape")  # checked by Bind
        changes = self.portal_changes.get(portal)
        server = self.client.server
        if changes and server is not None:
            self.stage(changes, server)

    def stage(self, changes: list[SessionChange], server: ServerConnection) -> None:
        session = self.client.session
        if not session.has_staged:
            self.error_seen = False
            self.staged_in_tx = server.status != _IDLE
        session.stage(changes)

    def _forget_all(self, server: ServerConnection) -> None:
        """DISCARD / DEALLOCATE ALL took effect: no statement on the connection, none in the books."""
        server.prepared.clear()
        server.unnamed_owner = None
        self.client.session.statements.clear()

    def settle_forget(self, server: ServerConnection) -> None:
        """The reply of a lone DEALLOCATE / DISCARD ALL (``forget_lone``) has ended: without an error it
        took effect (at once: not transactional), with one it did nothing (DEALLOCATE of a name PostgreSQL
        does not know) and the connection is as it was."""
        session = self.client.session
        if not self.error_seen:
            self._forget_all(server)
        self.forget_prepared = self.forget_lone = False
        if not session.has_staged:
            self.error_seen = False
            server.track_details(False)

    def settle(self, server: ServerConnection) -> None:
        """A unit with session changes ended outside a transaction: did they take effect?

        In an explicit transaction they did if it ended in COMMIT (a failed transaction's COMMIT reports
        ROLLBACK); savepoints were accounted for as they ran. Outside one (a single statement or an
        implicit multi-statement transaction) they did unless an error was reported.
        """
        ok = self.last_tag == b"COMMIT" if self.staged_in_tx else not self.error_seen
        session = self.client.session
        if session.has_staged:
            if ok:
                if session.has_staged_settings:
                    self.client.reads.settled(session.staged_settings())
                session.commit_staged(server.applied)
            else:
                session.discard_staged()
        if self.forget_prepared:
            if ok:
                self._forget_all(server)
            else:
                # DISCARD / DEALLOCATE ALL may have run before the failure (another statement of its Query
                # or of its transaction failed: they are not transactional): what the connection holds is
                # unknown, so it must not serve anyone else.
                self.server_dirty = True
            self.forget_prepared = self.forget_lone = False
        self.error_seen = False
        self.last_tag = b""
        self.staged_in_tx = False
        server.track_details(False)
