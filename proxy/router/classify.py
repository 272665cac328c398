"""Classify SQL text with pglast (the real PostgreSQL parser): session-state changes and pinning causes."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

import pglast
from pglast import ast
from pglast.enums import ObjectType, TransactionStmtKind, VariableSetKind
from pglast.visitors import Visitor

from proxy.config.values import ROLES
from proxy.protocol.scan import literal_shape
from proxy.router.functions import BUILTIN_READ_ONLY, WRITE_FUNCTIONS

CURSOR_OPT_HOLD = 0x0020
# SQL up to this many bytes is classified in-process, on the event loop: at this size even the deepest
# shapes (``1+1+...``, ``1-1-...``, ``1::a::a``, ``- - 1``, nested parentheses, CASE, ARRAY[], calls,
# subselects) stay far below pglast's crash depth (~25,000 levels) and take at most ~50 ms (8 KB: ~100 ms).
INLINE_BYTES = 4096
# Larger SQL, up to this size, is classified in a child process (proxy/router/worker.py); beyond it, not
# at all: such a statement is UNCLASSIFIABLE and PostgreSQL (on main) answers it.
MAX_CLASSIFY_BYTES = 4 * 1024 * 1024
# What the exact-text caches may hold in keys, all tables together (the fingerprint table's keys are short).
CACHE_KEY_BYTES = 32 * 1024 * 1024
_SAVEPOINT_OPS = {
    TransactionStmtKind.TRANS_STMT_SAVEPOINT: "savepoint",
    TransactionStmtKind.TRANS_STMT_RELEASE: "release",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: "rollback_to",
}
# Two-phase commit: a prepared transaction lives on the primary (a standby can neither prepare nor end one).
_TWO_PHASE = {
    TransactionStmtKind.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED: "COMMIT PREPARED",
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED: "ROLLBACK PREPARED",
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


# Transaction control, as the data path needs to know it.
TX_BEGIN = "begin"
TX_BEGIN_READ_ONLY = "begin read only"
TX_COMMIT = "commit"
TX_ROLLBACK = "rollback"

TableName = tuple[str, str]  # (schema as written, '' when unqualified; table)


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: cheap dict keys for the router
class Classification:
    """The facts about one SQL string (possibly several statements), independent of configuration.

    ``write`` says whether it must run on a primary for reasons in the SQL itself; functions that are
    neither known read-only built-ins nor known writers are listed in ``functions`` so the policy can
    consult the configuration's ``read_only_functions``. ``tables`` are the relations referenced
    (CTE names excluded). ``tx`` is set when the whole string is one transaction-control statement
    (BEGIN, COMMIT or ROLLBACK; not one AND CHAIN, which opens the next transaction at once).
    """

    flags: Flag
    pin_reason: str | None = None
    write: bool = False
    write_reason: str | None = None
    tables: frozenset[TableName] = frozenset()
    functions: frozenset[str] = frozenset()
    tx: str | None = None
    primary_only: bool = False  # LISTEN/NOTIFY, EXECUTE, DO, CALL: a primary, and main for no tables
    statements: int = 1
    begins: str | None = None  # a multi-statement string that opens a transaction: how (TX_BEGIN...)
    begin_tag: str = "BEGIN"  # PostgreSQL's command tag for a lone BEGIN: "START TRANSACTION" for that one
    # One SELECT/INSERT/UPDATE/DELETE/MERGE with no session effect: worth keeping prepared upstream.
    plannable: bool = False
    bits: int = field(init=False)  # ``flags`` as a plain int: enum operators are slow on the hot path

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", int(self.flags))

    @property
    def pins(self) -> bool:
        return bool(self.flags & Flag.PIN)

    @property
    def parse_error(self) -> bool:
        return bool(self.flags & Flag.PARSE_ERROR)


# Optimizable statements: what PostgreSQL's plan cache saves work on.
_PLANNABLE = tuple(
    getattr(ast, name)
    for name in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
    if hasattr(ast, name)
)

# Statements that only read (or only touch session/transaction state) unless something inside writes.
_READ_STATEMENTS = (
    ast.SelectStmt,
    ast.VariableSetStmt,
    ast.VariableShowStmt,
    ast.TransactionStmt,
    ast.DiscardStmt,
    ast.DeallocateStmt,
    ast.DeclareCursorStmt,
    ast.FetchStmt,
    ast.ClosePortalStmt,
    ast.CheckPointStmt,
)
_WRITE_NODES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_DROPPED_RELATIONS = frozenset(
    {
        ObjectType.OBJECT_TABLE,
        ObjectType.OBJECT_VIEW,
        ObjectType.OBJECT_MATVIEW,
        ObjectType.OBJECT_SEQUENCE,
        ObjectType.OBJECT_FOREIGN_TABLE,
        ObjectType.OBJECT_INDEX,
    }
)


class _Scan(Visitor):
    """Walks one statement tree: relations, functions, nested writes, locking clauses, pin causes."""

    def __init__(self) -> None:
        super().__init__()
        self.pin_reason: str | None = None
        self.write_reason: str | None = None
        self.tables: set[TableName] = set()
        self.ctes: set[str] = set()
        self.functions: set[str] = set()

    def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
        parts = [p.sval or "" for p in node.funcname or () if isinstance(p, ast.String)]
        if not parts:
            return
        name = parts[-1]
        schema = parts[-2] if len(parts) > 1 else ""
        if name in SESSION_LOCK_FUNCTIONS:
            self.pin_reason = "session advisory lock"
        elif name == "set_config":
            self.pin_reason = "set_config()"
        if schema in ("", "pg_catalog"):
            if name in WRITE_FUNCTIONS:
                self.write_reason = self.write_reason or f"calls {name}()"
                return
            if name in BUILTIN_READ_ONLY:
                return
        self.functions.add(f"{schema}.{name}" if schema else name)

    def visit_RangeVar(self, ancestors: object, node: ast.RangeVar) -> None:
        if node.relpersistence == "t":
            self.pin_reason = "temporary table"
        if node.relname:
            self.tables.add((node.schemaname or "", node.relname))

    def visit_CommonTableExpr(self, ancestors: object, node: ast.CommonTableExpr) -> None:
        if node.ctename is not None:
            self.ctes.add(node.ctename)

    def visit_SelectStmt(self, ancestors: object, node: ast.SelectStmt) -> None:
        if node.lockingClause:
            self.write_reason = self.write_reason or "SELECT ... FOR UPDATE/SHARE locks rows"
        if node.intoClause is not None:
            self.write_reason = self.write_reason or "SELECT INTO creates a table"

    def _write_node(self, ancestors: object, node: ast.Node) -> None:
        self.write_reason = self.write_reason or f"{_verb(node)} modifies data"

    visit_InsertStmt = visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = _write_node

    def relation_tables(self) -> set[TableName]:
        return {t for t in self.tables if t[0] or t[1] not in self.ctes}


def _verb(node: ast.Node) -> str:
    """CreateTableAsStmt -> CREATE TABLE AS."""
    name = type(node).__name__.removesuffix("Stmt")
    return "".join(" " + c if c.isupper() and i else c for i, c in enumerate(name)).upper()


def _name(parts: list[str | None]) -> TableName:
    return (parts[-2] or "" if len(parts) > 1 else "", parts[-1] or "")


def _session_facts(stmt: ast.Node) -> tuple[Flag, str | None]:
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
    return Flag.NONE, None


class _Facts:
    """What one statement contributes to a Classification."""

    __slots__ = (
        "begin_tag",
        "flags",
        "functions",
        "pin_reason",
        "primary_only",
        "tables",
        "tx",
        "write_reason",
    )

    def __init__(self) -> None:
        self.flags = Flag.NONE
        self.pin_reason: str | None = None
        self.write_reason: str | None = None
        self.tables: set[TableName] = set()
        self.functions: set[str] = set()
        self.primary_only = False
        self.tx: str | None = None
        self.begin_tag = "BEGIN"


def _scan_into(facts: _Facts, node: ast.Node, *, count_writes: bool = True) -> None:
    scan = _Scan()
    scan(node)
    facts.tables |= scan.relation_tables()
    if count_writes:
        facts.functions |= scan.functions
        if scan.write_reason and not facts.write_reason:
            facts.write_reason = scan.write_reason
    if scan.pin_reason and count_writes:
        facts.flags |= Flag.PIN
        facts.pin_reason = facts.pin_reason or scan.pin_reason


def _statement_facts(stmt: ast.Node) -> _Facts:
    facts = _Facts()
    flags, reason = _session_facts(stmt)
    facts.flags |= flags
    facts.pin_reason = reason
    if isinstance(stmt, ast.ExplainStmt):
        analyze = any(
            isinstance(o, ast.DefElem) and o.defname == "analyze" and _truthy(o.arg)
            for o in stmt.options or ()
        )
        if stmt.query is not None:
            _scan_into(facts, stmt.query, count_writes=analyze)
        return facts
    if isinstance(stmt, ast.CopyStmt):
        if stmt.is_from:
            facts.write_reason = "COPY FROM loads data"
        if stmt.is_program:
            facts.write_reason = facts.write_reason or "COPY PROGRAM runs a program on the server"
        if stmt.relation is not None:
            _scan_into(facts, stmt.relation)
        if stmt.query is not None:
            _scan_into(facts, stmt.query)
        return facts
    if isinstance(stmt, ast.PrepareStmt):
        if stmt.query is not None:
            _scan_into(facts, stmt.query)
        return facts
    if isinstance(stmt, ast.ListenStmt | ast.NotifyStmt | ast.UnlistenStmt):
        facts.write_reason = "notifications live on the primary"
        facts.primary_only = True
        return facts
    if isinstance(stmt, ast.ExecuteStmt | ast.DoStmt | ast.CallStmt):
        facts.write_reason = f"{_verb(stmt)} may do anything"
        facts.primary_only = True
        _scan_into(facts, stmt)
        return facts
    if isinstance(stmt, ast.TransactionStmt):
        facts.tx = _tx_kind(stmt)
        if stmt.kind == TransactionStmtKind.TRANS_STMT_START:
            facts.begin_tag = "START TRANSACTION"
        if stmt.kind in _TWO_PHASE:
            facts.write_reason = f"{_TWO_PHASE[stmt.kind]}: two-phase commit runs on the primary"
            facts.primary_only = True
        return facts
    if isinstance(stmt, ast.DropStmt) and stmt.removeType in _DROPPED_RELATIONS:
        for obj in stmt.objects or ():
            parts = [p.sval for p in obj if isinstance(p, ast.String)] if isinstance(obj, tuple) else []
            if parts:
                facts.tables.add(_name(parts))
    elif isinstance(stmt, ast.CommentStmt) and stmt.objtype in _DROPPED_RELATIONS:
        obj = stmt.object
        parts = [p.sval for p in obj if isinstance(p, ast.String)] if isinstance(obj, tuple) else []
        if parts:
            facts.tables.add(_name(parts))
    _scan_into(facts, stmt)
    if not isinstance(stmt, _READ_STATEMENTS):
        facts.write_reason = facts.write_reason or f"{_verb(stmt)} changes the database"
    return facts


def _truthy(arg: object) -> bool:
    """An option's value as PostgreSQL reads it: absent means true; false/off/no/0 mean false."""
    if arg is None:
        return True
    if isinstance(arg, ast.String):
        return (arg.sval or "").lower() not in ("false", "off", "no", "0")
    if isinstance(arg, ast.Integer):
        return bool(arg.ival)
    return True


def _tx_kind(stmt: ast.TransactionStmt) -> str | None:
    kind = stmt.kind
    if kind in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START):
        for opt in stmt.options or ():
            if (
                isinstance(opt, ast.DefElem)
                and opt.defname == "transaction_read_only"
                and isinstance(opt.arg, ast.A_Const)
                and getattr(opt.arg.val, "ival", None)
            ):
                return TX_BEGIN_READ_ONLY
        return TX_BEGIN
    if stmt.chain:
        # COMMIT / ROLLBACK AND CHAIN: a transaction with the same characteristics begins at once, so it
        # is not the end the proxy answers or acts on; it runs upstream (after a deferred BEGIN, with it).
        return None
    if kind == TransactionStmtKind.TRANS_STMT_COMMIT:
        return TX_COMMIT
    if kind == TransactionStmtKind.TRANS_STMT_ROLLBACK:
        return TX_ROLLBACK
    return None


def classify(sql: str) -> Classification:
    """Classify ``sql`` (uncached). A string pglast cannot parse is flagged PARSE_ERROR and counts as a
    write, so it goes to main and the client gets PostgreSQL's own syntax error."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return Classification(Flag.PARSE_ERROR, write=True, write_reason="syntax error: main reports it")
    flags = Flag.NONE
    pin_reason = write_reason = None
    tables: set[TableName] = set()
    functions: set[str] = set()
    primary_only = False
    tx = begins = None
    begin_tag = "BEGIN"
    for raw in statements:
        if raw.stmt is None:
            continue
        facts = _statement_facts(raw.stmt)
        flags |= facts.flags
        pin_reason = pin_reason or facts.pin_reason
        write_reason = write_reason or facts.write_reason
        tables |= facts.tables
        functions |= facts.functions
        primary_only = primary_only or facts.primary_only
        tx = facts.tx if len(statements) == 1 else None
        begin_tag = facts.begin_tag
        if begins is None and len(statements) > 1 and facts.tx in (TX_BEGIN, TX_BEGIN_READ_ONLY):
            begins = facts.tx
    return Classification(
        flags,
        pin_reason,
        write=write_reason is not None,
        write_reason=write_reason,
        tables=frozenset(tables),
        functions=frozenset(functions),
        tx=tx,
        primary_only=primary_only,
        statements=len(statements),
        begins=begins,
        begin_tag=begin_tag,
        plannable=(
            len(statements) == 1
            and not flags
            and isinstance(statements[0].stmt, _PLANNABLE)
            and getattr(statements[0].stmt, "intoClause", None) is None
        ),
    )


# A statement that was not (or could not safely be) parsed: it goes where a syntax error goes, to main, which
# runs it or answers with PostgreSQL's own error (54001 for a statement nested too deeply, say).
UNCLASSIFIABLE = Classification(
    Flag.PARSE_ERROR, write=True, write_reason="too large or too deep to classify: main runs it"
)


def route_override(sql: str) -> str | None:
    """The role named by a leading ``/* route: ROLE */`` comment, or None.

    The comment is found with PostgreSQL's own scanner (pglast), never by pattern-matching SQL.
    """
    if not sql.lstrip().startswith("/*"):
        return None
    try:
        tokens = pglast.parser.scan(sql)
    except pglast.parser.ParseError:
        return None
    if not tokens or tokens[0].name != "C_COMMENT":
        return None
    text = sql[tokens[0].start : tokens[0].end + 1]  # pglast's scanner counts characters, not bytes
    body = text.removeprefix("/*").removesuffix("*/").strip()
    key, colon, value = body.partition(":")
    if not colon or key.strip().lower() != "route":
        return None
    role = value.strip().lower()
    return role if role in ROLES else None


@dataclass(frozen=True, slots=True)
class Analysis:
    """Everything the data path needs from the text of one large statement, computed away from the event
    loop (see proxy/router/worker.py): its classification, the session changes it makes (when its flags
    say it makes any), the DEALLOCATE target, and a ``/* route: */`` override."""

    info: Classification
    changes: tuple[SessionChange, ...] = ()
    deallocate: str | None = None
    override: str | None = None


UNCLASSIFIED = Analysis(UNCLASSIFIABLE)


def analyze(sql: str, cache: ClassificationCache | None = None) -> Analysis:
    """The Analysis of ``sql`` (any size: the caller runs it where a crash or a long parse harms no one)."""
    info = cache.classify(sql, remember_text=False, inline_only=False) if cache else classify(sql)
    changes: tuple[SessionChange, ...] = ()
    deallocate = None
    if info.bits & (F_SESSION_SET | F_SAVEPOINT):
        changes = tuple(session_changes(sql))
    if info.bits & F_FORGET_PREPARED:
        deallocate = deallocate_target(sql)
    return Analysis(info, changes, deallocate, route_override(sql))


def encode_analysis(a: Analysis) -> bytes:
    """An explicit encoding (JSON of plain values) for the worker's answers: never pickle across processes."""
    i = a.info
    return json.dumps(
        [
            int(i.flags), i.pin_reason, i.write, i.write_reason, sorted(i.tables), sorted(i.functions), i.tx,
            i.primary_only, i.statements, i.begins, i.plannable,
            [[c.name, c.sql, c.op] for c in a.changes], a.deallocate, a.override,
        ]
    ).encode()  # fmt: skip


def decode_analysis(data: bytes) -> Analysis:
    """The inverse of encode_analysis; ValueError (or TypeError) for anything else."""
    (flags, pin, write, why, tables, functions, tx, primary, statements, begins, plannable, changes,
     deallocate, override) = json.loads(data)  # fmt: skip
    info = Classification(
        Flag(int(flags)),
        _opt_str(pin),
        write=bool(write),
        write_reason=_opt_str(why),
        tables=frozenset((str(s), str(t)) for s, t in tables),
        functions=frozenset(str(f) for f in functions),
        tx=_opt_str(tx),
        primary_only=bool(primary),
        statements=int(statements),
        begins=_opt_str(begins),
        plannable=bool(plannable),
    )
    return Analysis(
        info,
        tuple(SessionChange(_opt_str(n), _opt_str(q), str(op)) for n, q, op in changes),
        _opt_str(deallocate),
        _opt_str(override),
    )


def _opt_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected a string or null, got {type(value).__name__}")


def merge(infos: list[Classification]) -> Classification:
    """One classification for a unit made of several statements (a batch of Parses, say)."""
    flags = Flag.NONE
    for info in infos:
        flags |= info.flags
    write = next((i for i in infos if i.write), None)
    # A unit that opens a transaction (Parse/Bind/Execute of BEGIN then more statements before one Sync, as
    # pipelining drivers send it) is routed as that transaction, like a query string "BEGIN; ...": a
    # read-write one on a primary, never on the replica where its later writes would fail.
    begins = next(
        (b for i in infos if (b := i.tx if i.tx in (TX_BEGIN, TX_BEGIN_READ_ONLY) else i.begins) is not None),
        None,
    )
    return Classification(
        flags,
        next((i.pin_reason for i in infos if i.pin_reason), None),
        write=write is not None,
        write_reason=write.write_reason if write is not None else None,
        tables=frozenset().union(*(i.tables for i in infos)),
        functions=frozenset().union(*(i.functions for i in infos)),
        tx=None,
        primary_only=any(i.primary_only for i in infos),
        statements=sum(i.statements for i in infos),
        begins=begins,
    )


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


def _literals_are_constants(text: str, sql: bytes) -> bool:
    """Whether pglast's parse of ``text`` (``sql`` decoded) has a constant (an ``A_Const``) starting at each
    literal ``literal_shape`` finds in ``sql``. Locations are byte offsets (libpg_query's), so ``sql`` must
    be the UTF-8 encoding of ``text``: not valid UTF-8, no trust. Not for the hot path: once per new shape.
    (A later text of a trusted shape with bytes that are not UTF-8 can have them only inside literals,
    whose content classify() never reads; PostgreSQL refuses such text anyway.)"""
    offsets: list[int] = []
    literal_shape(sql, offsets)
    try:
        if text.encode("utf-8") != sql:
            return False
        tree = json.loads(pglast.parser.parse_sql_json(text))
    except (pglast.parser.ParseError, UnicodeEncodeError):
        return False
    constants = set()
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            const = node.get("A_Const")
            if isinstance(const, dict):
                constants.add(const.get("location", 0))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    # A negative number is one constant from its minus sign on (-5, not - 5, in the shape's verbatim text).
    return all(
        offset in constants or (sql[offset - 1] == 0x2D and offset - 1 in constants) for offset in offsets
    )


class ClassificationCache:
    """Bounded cache of classify(): the exact text first, then its literal shape, then pglast's fingerprint.

    The shape (``literal_shape``, proxy/protocol/scan.pyx) is the text with each string and number replaced
    by a marker of its kind, so ``... WHERE aid = 12345`` and ``... WHERE aid = 678`` share one entry
    without a parse: the simple protocol's texts carry their literals. A shape is trusted only once
    pglast's parse of a text of that shape says every literal in it is a constant (an ``A_Const``, whose
    value classify() never reads): then any text of that shape lexes to the same tokens and parses to the
    same tree but for constants' values. Literals that are not constants (``EXPLAIN (ANALYZE 0)``,
    ``FETCH 5``, the 5 of ``- 5``) make the shape untrusted, and its texts go by the exact text and the
    fingerprint, as before.

    Bounded by count and by bytes: text above INLINE_BYTES is never kept (nor parsed: classify_bytes and
    classify answer UNCLASSIFIABLE for it, so no caller can parse large SQL on the event loop by accident),
    and the exact-text and shape keys together stay under ``max_key_bytes``.
    """

    def __init__(self, size: int = 10_000, max_key_bytes: int = CACHE_KEY_BYTES) -> None:
        self.size = size
        self.max_key_bytes = max_key_bytes
        self.key_bytes = 0  # the lengths of the keys held in the exact-text and shape tables
        self._by_bytes: OrderedDict[bytes, Classification] = OrderedDict()
        self._by_text: OrderedDict[str, Classification] = OrderedDict()
        # By literal shape; None for a shape whose literals are not all constants (not trusted).
        self._by_shape: OrderedDict[bytes, Classification | None] = OrderedDict()
        self._by_fingerprint: OrderedDict[str, Classification] = OrderedDict()
        # The fingerprint of each classification in the fingerprint table (a migration plan lists the
        # statements it has seen by fingerprint): Classification hashes by identity.
        self._fingerprints: dict[Classification, str] = {}
        self.hits = 0
        self.misses = 0

    def classify_bytes(self, sql: bytes) -> Classification:
        """classify() of UTF-8 text as it came off the wire: the raw bytes are the first cache key, its
        literal shape the second."""
        found = self._by_bytes.get(sql)
        if found is not None:
            self.hits += 1
            return found
        if len(sql) > INLINE_BYTES:
            return UNCLASSIFIABLE  # the data path has this classified off the loop (proxy/router/worker.py)
        shape = literal_shape(sql)
        if shape is not None:
            try:
                trusted = self._by_shape[shape]
            except KeyError:
                pass  # the first text of this shape: judged below
            else:
                if trusted is not None:
                    self.hits += 1
                    return trusted
                shape = None  # known not to be trusted
        text = sql.decode("utf-8", errors="replace")
        found = self.classify(text, remember_text=False)
        trusted = None
        if shape is not None:
            trusted = found if _literals_are_constants(text, sql) else None
            self._remember(self._by_shape, shape, trusted)
        if trusted is None:
            self._remember(self._by_bytes, sql, found)
        return found

    def classify(self, sql: str, *, remember_text: bool = True, inline_only: bool = True) -> Classification:
        """Cached classify(); same result as the uncached function. ``remember_text=False``: the caller
        keeps the result under its own key (the bytes), so the text does not take a second entry.
        ``inline_only=False`` (the worker process only): classify text of any size, keeping none of it."""
        found = self._by_text.get(sql)
        if found is not None:
            self.hits += 1
            return found
        if len(sql) * 4 > INLINE_BYTES and len(sql.encode("utf-8", "surrogateescape")) > INLINE_BYTES:
            if inline_only:
                return UNCLASSIFIABLE
            remember_text = False
        try:
            key = pglast.parser.fingerprint(sql)
        except pglast.parser.ParseError:
            key = None
        found = self._by_fingerprint.get(key) if key is not None else None
        if found is None:
            self.misses += 1
            found = classify(sql)
            if key is not None:
                self._fingerprints[found] = key
                self._remember(self._by_fingerprint, key, found)
        else:
            self.hits += 1
        if remember_text:
            self._remember(self._by_text, sql, found)
        return found

    def fingerprint_of(self, info: Classification) -> str | None:
        """pglast's fingerprint of the SQL ``info`` was made from, while the cache holds it (None for a
        classification made elsewhere: several statements merged, or one classified in the worker)."""
        return self._fingerprints.get(info)

    def _remember(self, table: OrderedDict[Any, Any], key: Any, value: Classification | None) -> None:
        sized = table is not self._by_fingerprint
        if sized:
            self.key_bytes += len(key)
        table[key] = value
        if len(table) > self.size:
            old, gone = table.popitem(last=False)
            if sized:
                self.key_bytes -= len(old)
            else:
                self._fingerprints.pop(gone, None)
        while self.key_bytes > self.max_key_bytes:
            # Over the byte budget: the oldest entry of the largest exact-text or shape table goes.
            big: OrderedDict[Any, Any] = max(self._by_bytes, self._by_text, self._by_shape, key=len)
            if not big:
                break
            old, _ = big.popitem(last=False)
            self.key_bytes -= len(old)
