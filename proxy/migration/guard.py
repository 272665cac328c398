"""The write guard on the copy of a migrating role's tables that replication keeps but no proxy serves:
main's copies after a cutover (reverse replication keeps them current for a rollback), the target's after a
rollback from cutover (forward replication keeps them current for the next cutover).

A statement-level trigger refuses INSERT, UPDATE, DELETE and TRUNCATE with PostgreSQL's 25006
(read_only_sql_transaction) and a message that says why. PostgreSQL's logical replication applies changes
with ``session_replication_role = replica``, under which ordinary triggers do not fire, so replication
keeps the copy current while every other writer is refused: a proxy instance that has not yet read the new
migration state, or a client that bypasses the proxy, gets an error instead of writing rows that would
never reach the database that serves the table.

Each function takes an open asyncpg connection (a migration login: it may create functions and triggers on
the tables) and runs inside the caller's transaction when it has one, so the guard appears or goes in the
same commit as the migration state it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.config.values import TableRef, table_label
from proxy.migration.naming import quote_literal
from proxy.migration.objects import qualified
from proxy.migration.state import SCHEMA

TRIGGER = "parafort_migration_guard"
FUNCTION = f"{SCHEMA}.refuse_write"

FUNCTION_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $guard$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'read_only_sql_transaction',
        MESSAGE = format(
            'table %I.%I is not served by this database while ParaFort Proxy moves the %s role''s tables: '
            'replication keeps this copy current and it takes no writes',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]),
        HINT = 'write through ParaFort Proxy: it sends the statement to the database that serves the table';
END
$guard$;
COMMENT ON FUNCTION {FUNCTION}() IS
    'ParaFort Proxy: refuses writes to a migrating table''s copy that replication keeps (25006)';
"""

GUARDED_QUERY = """
SELECT n.nspname::text, c.relname::text FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgname = $1 ORDER BY 1, 2
"""


async def install(conn: Any, tables: Iterable[TableRef], role: str) -> list[str]:
    """Guard ``tables`` in ``conn``'s database (again, harmlessly); returns their labels."""
    await conn.execute(FUNCTION_SQL)
    done = []
    for table in tables:
        await conn.execute(
            f"CREATE OR REPLACE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE"
            f" ON {qualified(table)} FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}({quote_literal(role)})"
        )
        done.append(table_label(table.schema, table.table))
    return done


async def remove(conn: Any) -> list[str]:
    """Remove every guard in ``conn``'s database (the function stays: harmless, and tiny); returns the
    labels of the tables that had one."""
    removed = []
    for schema, name in await conn.fetch(GUARDED_QUERY, TRIGGER):
        await conn.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {qualified(TableRef(schema, name))}")
        removed.append(table_label(schema, name))
    return removed
