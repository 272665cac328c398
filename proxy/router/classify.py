"""Classify SQL text with pglast (the real PostgreSQL parser): session-state changes and pinning causes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

import pglast
from pglast import ast
from pglast.enums import TransactionStmtKind, VariableSetKind
from pglast.visitors import Visitor

CURSOR_OPT_HOLD = 0x0020
_SAVEPOINT_OPS = {
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: "savepoint",
    TransactionStmtKind.TRANS_STMT_RELEASE: "release",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "rollback_to",
}
# Session-level advisory locks outlive the transaction: the client must keep its upstream connection.
SESSION_LOCK_FUNCTIONS = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
)


class Flag(IntFlag):
    """What the session tracker must know about a statement."""

    NONE = 0
    SESSION_SET = 1  # a non-LOCAL SET / RESET / RESET ALL
    FORGET_PREPARED = 2  # DISCARD or DEALLOCATE: the upstream's prepared statements may be gone
    PIN = 4  # state the proxy cannot replay: keep the client on its upstream connection
    PARSE_ERROR = 8  # pglast could not parse it: PostgreSQL will report the error
    SAVEPOINT = 16  # SAVEPOINT / RELEASE / ROLLBACK TO: scopes the session changes made inside


@dataclass(frozen=True, slots=True)
class SessionChange:
    """One session-parameter change: ``name`` None means every parameter (RESET ALL / DISCARD ALL).

    ``sql`` is the statement to replay on another connection; None means "back to the default".
    """

    name: str | None
    sql: str | None
    # "set" for a parameter change; "savepoint", "release" or "rollback_to" (``name`` = the savepoint),
    # so that changes undone by ROLLBACK TO SAVEPOINT are undone in the proxy's books too.
    op: str = "set"


@dataclass(frozen=True, slots=True)
class Classification:
    """The facts about one SQL string (possibly several statements)."""

    flags: Flag
    pin_reason: str | None = None
    bits: int = field(init=False)  # ``flags`` as a plain int: enum operators are slow on the hot path

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", int(self.flags))

    @property
    def pins(self) -> bool:
        return bool(self.flags & Flag.PIN)


class _Scan(Visitor):
    """Walks one statement tree collecting pinning causes hidden in expressions."""

    def __init__(self) -> None:
        super().__init__()
        self.pin_reason: str | None = None

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        name = node.funcname[-1].sval if node.funcname else None
        if name in SESSION_LOCK_FUNCTIONS:
            self.pin_reason = "session advisory lock"
        elif name == "set_config":
            self.pin_reason = "set_config()"

    def visit_RangeVar(self, ancestors: object, node: ast.RangeVar) -> None:
        if node.relpersistence == "t":
            self.pin_reason = "temporary table"


def _statement_facts(stmt: ast.Node) -> tuple[Flag, str | None]:
    if isinstance(stmt, ast.VariableSetStmt):
        if stmt.is_local or (
            stmt.kind == VariableSetKind.VAR_SET_MULTI and stmt.name != "SESSION CHARACTERISTICS"
        ):
            return Flag.NONE, None
        return Flag.SESSION_SET, None
    if isinstance(stmt, ast.DiscardStmt):
        return Flag.SESSION_SET | Flag.FORGET_PREPARED, None
    if isinstance(stmt, ast.TransactionStmt) and stmt.kind in _SAVEPOINT_OPS:
        return Flag.SAVEPOINT, None
    if isinstance(stmt, ast.DeallocateStmt):
        return Flag.FORGET_PREPARED, None
    if isinstance(stmt, ast.ListenStmt):
        return Flag.PIN, "LISTEN"
    if isinstance(stmt, ast.PrepareStmt):
        return Flag.PIN, "SQL-level PREPARE"
    if isinstance(stmt, ast.DeclareCursorStmt) and (stmt.options or 0) & CURSOR_OPT_HOLD:
        return Flag.PIN, "cursor WITH HOLD"
    scan = _Scan()
    scan(stmt)
    return (Flag.PIN, scan.pin_reason) if scan.pin_reason else (Flag.NONE, None)


def classify(sql: str) -> Classification:
    """Classify ``sql`` (uncached). A string pglast cannot parse is flagged PARSE_ERROR, nothing else."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return Classification(Flag.PARSE_ERROR)
    flags, reason = Flag.NONE, None
    for raw in statements:
        stmt_flags, stmt_reason = _statement_facts(raw.stmt) if raw.stmt else (Flag.NONE, None)
        flags |= stmt_flags
        reason = reason or stmt_reason
    return Classification(flags, reason)


def session_changes(sql: str) -> list[SessionChange]:
    """The session-parameter changes ``sql`` makes, in order, each with the text to replay it."""
    data = sql.encode()
    changes: list[SessionChange] = []
    for raw in pglast.parse_sql(sql):
        stmt = raw.stmt
        if isinstance(stmt, ast.TransactionStmt) and stmt.kind in _SAVEPOINT_OPS:
            changes.append(SessionChange(stmt.savepoint_name, None, _SAVEPOINT_OPS[stmt.kind]))
            continue
        if isinstance(stmt, ast.DiscardStmt):
            changes.append(SessionChange(None, None))
            continue
        if not isinstance(stmt, ast.VariableSetStmt) or stmt.is_local:
            continue
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(data)
        text = data[start:end].decode()
        if stmt.kind == VariableSetKind.VAR_RESET_ALL:
            changes.append(SessionChange(None, None))
        elif stmt.kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
            changes.append(SessionChange((stmt.name or "").lower(), None))
        elif stmt.kind == VariableSetKind.VAR_SET_MULTI:
            if stmt.name == "SESSION CHARACTERISTICS":
                changes.extend(_characteristics(stmt))
        else:
            changes.append(SessionChange((stmt.name or "").lower(), text.strip()))
    return changes


def deallocate_target(sql: str) -> str | None:
    """For a string that is exactly one DEALLOCATE: the statement name ('' for ALL); else None."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.DeallocateStmt):
        return None
    stmt = statements[0].stmt
    return "" if stmt.isall else (stmt.name or "")


def _characteristics(stmt: ast.VariableSetStmt) -> list[SessionChange]:
    """SET SESSION CHARACTERISTICS AS TRANSACTION ... as the default_transaction_* settings it sets."""
    changes = []
    for item in stmt.args or ():
        if not isinstance(item, ast.DefElem) or not isinstance(item.arg, ast.A_Const):
            continue
        name = "default_" + (item.defname or "")
        val = item.arg.val
        value = val.sval if isinstance(val, ast.String) else ("on" if getattr(val, "ival", 0) else "off")
        changes.append(SessionChange(name, f"SET {name} TO '{value}'"))
    return changes


# The flags as plain ints, for the data path.
F_SESSION_SET = int(Flag.SESSION_SET)
F_FORGET_PREPARED = int(Flag.FORGET_PREPARED)
F_PIN = int(Flag.PIN)
F_SAVEPOINT = int(Flag.SAVEPOINT)


class ClassificationCache:
    """Bounded cache of classify(): the exact text first, then pglast's fingerprint (literals ignored)."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._by_bytes: OrderedDict[bytes, Classification] = OrderedDict()
        self._by_text: OrderedDict[str, Classification] = OrderedDict()
        self._by_fingerprint: OrderedDict[str, Classification] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def classify_bytes(self, sql: bytes) -> Classification:
        """classify() of UTF-8 text as it came off the wire: the raw bytes are the first cache key."""
        found = self._by_bytes.get(sql)
        if found is not None:
            self.hits += 1
            return found
        found = self.classify(sql.decode("utf-8", errors="replace"))
        self._remember(self._by_bytes, sql, found)
        return found

    def classify(self, sql: str) -> Classification:
        """Cached classify(); same result as the uncached function."""
        found = self._by_text.get(sql)
        if found is not None:
            self.hits += 1
            return found
        try:
            key = pglast.parser.fingerprint(sql)
        except pglast.parser.ParseError:
            key = None
        found = self._by_fingerprint.get(key) if key is not None else None
        if found is None:
            self.misses += 1
            found = classify(sql)
            if key is not None:
                self._remember(self._by_fingerprint, key, found)
        else:
            self.hits += 1
        self._remember(self._by_text, sql, found)
        return found

    def _remember(self, table: OrderedDict[Any, Classification], key: Any, value: Classification) -> None:
        table[key] = value
        if len(table) > self.size:
            table.popitem(last=False)
