"""What main's (and a target's) catalog says about a domain's tables: which exist, rows, sizes, foreign keys.

Queries on an asyncpg connection the caller opened; the domain map decides which tables belong to a role,
exactly as the router does (``DomainsConfig.domain_of``), so the plan and the routing never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.model import DomainsConfig
from proxy.config.values import table_label
from proxy.migration.state import SCHEMA

# Tables and partitioned tables (partitions are counted through their parent), outside PostgreSQL's own
# schemas and the proxy's. ``c.oid::regclass`` is the name quoted as SQL needs it.
TABLES_SQL = r"""
SELECT n.nspname, c.relname, c.oid::regclass::text, pg_catalog.pg_total_relation_size(c.oid),
       c.reltuples::bigint
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', $1)
  AND n.nspname NOT LIKE 'pg\_%'
ORDER BY 1, 2
"""
FOREIGN_KEYS_SQL = """
SELECT con.conname, cn.nspname, c.relname, fn.nspname, f.relname, pg_catalog.pg_get_constraintdef(con.oid)
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class f ON f.oid = con.confrelid JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
WHERE con.contype = 'f'
ORDER BY 2, 3, 1
"""
WAL_LEVEL_SQL = "SELECT pg_catalog.current_setting('wal_level')"


@dataclass(frozen=True)
class Table:
    """A table of main's catalog: schema and name as stored, the SQL name (quoted), size in bytes, and
    PostgreSQL's row estimate (-1: never analysed)."""

    schema: str
    name: str
    sql_name: str
    size: int
    estimate: int

    @property
    def label(self) -> str:
        return table_label(self.schema, self.name)


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key with one end on a moving table and the other on a table that stays."""

    name: str
    table: str  # the referencing table (label)
    references: str  # the referenced table (label)
    definition: str
    moving_side: str  # "referencing" or "referenced"


async def domain_tables(conn: Any, domains: DomainsConfig, role: str) -> list[Table]:
    """The tables of ``conn``'s database that the domain map gives to ``role``."""
    rows = await conn.fetch(TABLES_SQL, SCHEMA)
    return [
        Table(row[0], row[1], row[2], int(row[3] or 0), int(row[4] if row[4] is not None else -1))
        for row in rows
        if domains.domain_of(row[0], row[1]) == role
    ]


async def has_rows(conn: Any, table: Table, seconds: float) -> bool:
    """Whether the table holds a row (asyncpg cancels the query after ``seconds``: TimeoutError)."""
    return bool(await conn.fetchval(f"SELECT EXISTS (SELECT FROM {table.sql_name})", timeout=seconds))


async def count_rows(conn: Any, table: Table, seconds: float) -> int | None:
    """The exact row count, or None when counting takes longer than ``seconds`` (asyncpg cancels it)."""
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table.sql_name}", timeout=seconds))
    except TimeoutError:
        return None


async def crossing_foreign_keys(conn: Any, domains: DomainsConfig, role: str) -> list[ForeignKey]:
    """Foreign keys between a table of ``role`` and a table that is not: PostgreSQL cannot enforce them
    once the two live in different databases."""
    out = []
    for name, schema, table, fschema, ftable, definition in await conn.fetch(FOREIGN_KEYS_SQL):
        moving = domains.domain_of(schema, table) == role
        if moving == (domains.domain_of(fschema, ftable) == role):
            continue
        out.append(
            ForeignKey(
                name,
                table_label(schema, table),
                table_label(fschema, ftable),
                definition,
                "referencing" if moving else "referenced",
            )
        )
    return out


async def wal_level(conn: Any) -> str:
    return str(await conn.fetchval(WAL_LEVEL_SQL))
