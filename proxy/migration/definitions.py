"""The moving tables' definitions, from main's own ``pg_dump --schema-only``, made fit for the target.

``dump`` runs PostgreSQL's pg_dump for exactly the moving tables (with the sequences they own, their
indexes, constraints and triggers; no owners, no grants, no tablespaces). ``filter_dump`` (pure) parses its
output with pglast and drops the foreign keys that would point at a table outside the moved set: those
cannot cross databases, and are reported instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pglast
from pglast.enums import AlterTableType, ConstrType

from proxy.config.dsn import Dsn
from proxy.config.values import PUBLIC, TableRef, table_label
from proxy.migration.naming import conninfo, redact

DUMP_TIMEOUT = 120.0  # seconds for pg_dump of a handful of table definitions
# psql meta-commands pg_dump writes around its output since 15.14 / 16.10 / 17.6 (CVE-2025-8714).
_META = ("\\restrict ", "\\unrestrict ")


class DefinitionError(Exception):
    """pg_dump failed or its output could not be used; the message is safe to show (no password)."""


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of a moving table that points outside the moved set: not created on the target."""

    table: str  # table_label of the referencing (moving) table
    name: str  # the constraint's name
    references: str  # table_label of the referenced table (staying on main)

    def __str__(self) -> str:
        return f"{self.table}.{self.name} -> {self.references}"


@dataclass(frozen=True)
class Definitions:
    """What to run on the target (in order, each one statement) and what was left out."""

    statements: tuple[str, ...]
    skipped_foreign_keys: tuple[ForeignKey, ...]


def filter_dump(text: str, moving: Sequence[TableRef]) -> Definitions:
    """pg_dump's plain-text output as separate statements, without foreign keys to tables outside
    ``moving`` (schema-qualified refs). Raises DefinitionError if the text does not parse."""
    lines = [line for line in text.splitlines() if not line.startswith(_META)]
    sql = "\n".join(lines)
    try:
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError as exc:
        raise DefinitionError(f"pg_dump's output does not parse: {exc}") from None
    moved = {(ref.schema or PUBLIC, ref.table) for ref in moving}
    keep: list[str] = []
    skipped: list[ForeignKey] = []
    for raw in stmts:
        fk = _outside_foreign_key(raw.stmt, moved)
        if fk is not None:
            skipped.append(fk)
            continue
        start = raw.stmt_location or 0
        keep.append(sql[start : start + raw.stmt_len] if raw.stmt_len else sql[start:])
    return Definitions(tuple(s.strip() for s in keep if s.strip()), tuple(skipped))


def _outside_foreign_key(stmt: object, moved: set[tuple[str, str]]) -> ForeignKey | None:
    """The foreign key ``stmt`` adds if it is ``ALTER TABLE ... ADD CONSTRAINT ... FOREIGN KEY`` to a
    table outside ``moved`` (pg_dump writes each such constraint as a statement of its own)."""
    if not isinstance(stmt, pglast.ast.AlterTableStmt) or not stmt.cmds:
        return None
    for cmd in stmt.cmds:
        constraint = getattr(cmd, "def_", None)
        if (
            cmd.subtype == AlterTableType.AT_AddConstraint
            and isinstance(constraint, pglast.ast.Constraint)
            and constraint.contype == ConstrType.CONSTR_FOREIGN
        ):
            target, table = constraint.pktable, stmt.relation
            if target is None or table is None or target.relname is None or table.relname is None:
                continue
            referenced = (target.schemaname or PUBLIC, target.relname)
            if referenced not in moved:
                return ForeignKey(
                    table=table_label(table.schemaname, table.relname),
                    name=constraint.conname or "",
                    references=table_label(*referenced),
                )
    return None


def pg_tool(name: str) -> str:
    """The path of a PostgreSQL client program: $PARAFORT_PG_BINDIR's, else the one on PATH."""
    bindir = os.environ.get("PARAFORT_PG_BINDIR")
    if bindir and (Path(bindir) / name).exists():
        return str(Path(bindir) / name)
    found = shutil.which(name)
    if found is None:
        raise DefinitionError(
            f"{name} not found: install PostgreSQL's client programs or set PARAFORT_PG_BINDIR"
        )
    return found


def dump_pattern(ref: TableRef) -> str:
    """A pg_dump ``-t`` pattern that matches exactly this table (quoted: no wildcards, no case folding)."""

    def part(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    return f"{part(ref.schema or PUBLIC)}.{part(ref.table)}"


async def dump(main: Dsn, tables: Sequence[TableRef]) -> str:
    """``pg_dump --schema-only`` of exactly ``tables`` on main (the password goes by environment, never on
    the command line or in a message). Raises DefinitionError."""
    args = [
        pg_tool("pg_dump"), "--schema-only", "--no-owner", "--no-privileges", "--no-tablespaces",
        "--no-security-labels", "--strict-names",
        "--dbname", conninfo(dataclasses.replace(main, password=None)),
    ]  # fmt: skip
    for ref in tables:
        args += ["--table", dump_pattern(ref)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if main.password is not None:
        env["PGPASSWORD"] = main.password
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DUMP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise DefinitionError(
            f"pg_dump of main's table definitions took more than {DUMP_TIMEOUT:g}s"
        ) from None
    if proc.returncode != 0:
        message = " ".join(err.decode(errors="replace").split())[:500]
        raise DefinitionError(redact(f"pg_dump of main's table definitions failed: {message}", main))
    return out.decode()
