"""The migration plan: what moving a role's tables to its own database would move and what it would break.

``gather`` reads the catalogs (main's, and the role's target when it has a URL) on connections of its own;
``plan_rows`` turns those facts, and the statements a running proxy has seen (proxy/migration/joins.py),
into rows; ``render`` prints rows as an aligned text table. The CLI (no proxy needed) and the admin
console's ``MIGRATE role PLAN`` give the same rows; only the console has statements to list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.config import Config
from proxy.config.dsn import Dsn
from proxy.health import close, connect, describe_error
from proxy.migration import catalog, state
from proxy.migration.catalog import ForeignKey, Table
from proxy.migration.joins import OTHER, Seen
from proxy.migration.state import MEANING, Migration

CONNECT_TIMEOUT = 5.0
COUNT_TIMEOUT = 10.0  # per table: a longer count(*) shows PostgreSQL's estimate instead
CATALOG_TIMEOUT = 10.0  # each catalog query
COLUMNS = ("kind", "name", "rows", "bytes", "seen", "detail")
ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PlanError(Exception):
    """Main could not be read: the plan cannot be made (the message is one loggable line)."""


@dataclass(frozen=True)
class PlanRow:
    kind: str  # state, check, table, foreign_key, statement, note
    name: str
    rows: int | None = None
    bytes: int | None = None
    seen: int | None = None
    detail: str = ""

    def values(self) -> tuple[object, ...]:
        return (self.kind, self.name, self.rows, self.bytes, self.seen, self.detail)


@dataclass
class PlanFacts:
    """What the catalogs say about moving ``role``."""

    role: str
    configured: bool
    migration: Migration | None = None
    wal_level: str | None = None
    tables: list[Table] = field(default_factory=list)
    counts: dict[str, int | None] = field(default_factory=dict)  # label -> exact rows (None: too slow)
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    target: dict[str, int | None] | None = None  # label -> rows on the target (None: too slow); None: unread
    target_error: str | None = None


async def _open(dsn: Dsn) -> Any:
    return await connect(dsn, CONNECT_TIMEOUT, "plan")


async def gather(config: Config, role: str) -> PlanFacts:
    """Read main's catalog (and the target's, when the role has a URL); PlanError if main cannot be read.
    A target that cannot be read is reported in the facts (``target_error``), not raised."""
    main = config.roles.main.dsn
    assert main is not None
    rc = config.roles.get(role)
    facts = PlanFacts(role, rc.configured)
    try:
        conn = await _open(main)
    except ERRORS as exc:
        raise PlanError(f"main is not reachable: {describe_error(exc, main, CONNECT_TIMEOUT)}") from None
    try:
        async with asyncio.timeout(CATALOG_TIMEOUT * 3):
            facts.wal_level = await catalog.wal_level(conn)
            facts.migration = (await state.load(conn)).get(role)
            facts.tables = await catalog.domain_tables(conn, config.domains, role)
            facts.foreign_keys = await catalog.crossing_foreign_keys(conn, config.domains, role)
        for table in facts.tables:
            facts.counts[table.label] = await catalog.count_rows(conn, table, COUNT_TIMEOUT)
    except ERRORS as exc:
        why = describe_error(exc, main, CATALOG_TIMEOUT)
        raise PlanError(f"reading main's catalog failed: {why}") from None
    finally:
        await close(conn)
    if rc.dsn is not None:
        await _gather_target(config, rc.dsn, facts)
    return facts


async def _gather_target(config: Config, dsn: Dsn, facts: PlanFacts) -> None:
    try:
        conn = await _open(dsn)
    except ERRORS as exc:
        facts.target_error = describe_error(exc, dsn, CONNECT_TIMEOUT)
        return
    try:
        async with asyncio.timeout(CATALOG_TIMEOUT):
            present = await catalog.domain_tables(conn, config.domains, facts.role)
        facts.target = {t.label: await catalog.count_rows(conn, t, COUNT_TIMEOUT) for t in present}
    except ERRORS as exc:
        facts.target_error = describe_error(exc, dsn, CATALOG_TIMEOUT)
    finally:
        await close(conn)


def plan_rows(facts: PlanFacts, seen: Sequence[Seen] | None) -> list[PlanRow]:
    """The plan's rows: state, checks, tables, foreign keys, statements (``seen`` None: no running proxy's
    statements to list, a note says where to find them)."""
    role = facts.role
    rows = [_state_row(facts)]
    if facts.wal_level is not None and facts.wal_level != "logical":
        rows.append(
            PlanRow(
                "check",
                "wal_level",
                detail=f"main has wal_level={facts.wal_level}: copying by logical replication needs "
                "wal_level = logical in main's postgresql.conf (and a restart of main)",
            )
        )
    if not facts.configured:
        rows.append(PlanRow("check", "target", detail=f"roles.{role}.url is not set: no database to move to"))
    elif facts.target_error is not None:
        rows.append(PlanRow("check", "target", detail=f"{role} is not readable: {facts.target_error}"))
    if not facts.tables:
        rows.append(PlanRow("check", "tables", detail=f"no table of main belongs to {role} (domain map)"))
    for table in facts.tables:
        rows.append(_table_row(facts, table))
    for fk in facts.foreign_keys:
        where = "moves" if fk.moving_side == "referencing" else "stays"
        rows.append(
            PlanRow(
                "foreign_key",
                f"{fk.table}.{fk.name}",
                detail=f"{fk.table} ({where}) {fk.definition} ({fk.references} "
                f"{'stays' if where == 'moves' else 'moves'}): PostgreSQL cannot enforce it across databases",
            )
        )
    rows.extend(_statement_rows(role, seen))
    return rows


def _state_row(facts: PlanFacts) -> PlanRow:
    mig = facts.migration
    if mig is not None:
        return PlanRow("state", mig.state.value, detail=MEANING[mig.state])
    if facts.configured:
        role = facts.role
        in_main = any(n for n in facts.counts.values()) or any(t.estimate > 0 for t in facts.tables)
        in_target = facts.target is None or any(n != 0 for n in facts.target.values())
        if in_main and not in_target:  # what the proxy's start does (proxy/migration/monitor.py)
            why = f"rows in main, none in {role}: a proxy starting now keeps main serving them (planned)"
            return PlanRow("state", "none", detail=f"no migration recorded; {why}")
        return PlanRow("state", "none", detail=f"no migration recorded: {role} serves its own tables")
    return PlanRow(
        "state", "none", detail=f"no migration recorded: main serves {facts.role}'s tables (no URL)"
    )


def _table_row(facts: PlanFacts, table: Table) -> PlanRow:
    rows = facts.counts.get(table.label)
    notes = []
    if rows is None:  # counting took too long: PostgreSQL's estimate, if the table was ever analysed
        rows = table.estimate if table.estimate >= 0 else None
        what = "estimate" if rows is not None else "unknown"
        notes.append(f"rows: {what} (count took over {COUNT_TIMEOUT:g}s)")
    if facts.target is not None:
        if table.label not in facts.target:
            notes.append(f"{facts.role}: no such table yet")
        else:
            there = facts.target[table.label]
            notes.append(f"{facts.role}: exists, {'?' if there is None else there} rows")
    return PlanRow("table", table.label, rows, table.size, detail="; ".join(notes))


def _statement_rows(role: str, seen: Sequence[Seen] | None) -> list[PlanRow]:
    if seen is None:
        return [
            PlanRow(
                "note",
                "statements",
                detail=f"the statements a move would refuse are listed by a running proxy: MIGRATE {role} "
                "PLAN in its admin console",
            )
        ]
    if not seen:
        return [
            PlanRow(
                "statement",
                "(none)",
                seen=0,
                detail=f"no statement seen since start joins a table of {role} with one that stays",
            )
        ]
    out = []
    for s in seen:
        detail = "further distinct statements (not kept one by one)" if s.key == OTHER else s.join.describe()
        out.append(PlanRow("statement", s.key, seen=s.count, detail=detail))
    return out


def render(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned text table (as psql prints one), NULL as empty, with a row count at the end."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(out) + "\n"
