"""``check``'s look at main's catalog: bare domain-map entries whose table name also exists in another schema.

A bare entry (``user_activity``) means ``public.user_activity`` only. A table of the same name in another
schema (``reporting.user_activity``) is main's unless an entry of its own says otherwise, which may not be
what the operator meant: ``check`` says so. It also says which configured domain roles main keeps serving
because of a migration (proxy/migration/): a new URL for tables whose rows are only in main starts in
``planned``. It needs main reachable; when it is not, it says the check was
skipped and nothing else changes (``check`` still validates the file offline).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from proxy.config.model import Config, DomainsConfig
from proxy.config.values import DOMAINS, PUBLIC, TableRef
from proxy.health import describe_error

CATALOG_TIMEOUT = 3.0  # seconds for connecting to main and running the one query

# Relations an SQL table reference can name (tables, partitioned tables, views, materialized views, foreign
# tables), outside public and PostgreSQL's own schemas, whose name is one of the bare entries.
SAME_NAME_QUERY = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[])
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname <> $2
  AND n.nspname <> 'information_schema'
  AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class CatalogReport:
    """What ``check`` prints after the configuration: warnings, or why the catalog was not read."""

    warnings: tuple[str, ...] = ()
    skipped: str | None = None


def same_name_warnings(domains: DomainsConfig, found: list[tuple[str, str]]) -> list[str]:
    """One warning per (schema, table) of main's catalog that shares a bare entry's name and belongs to no
    domain (an entry such as ``schema.table`` or ``schema.*`` covering it makes the intent explicit)."""
    bare = domains.bare_entries
    out = []
    for schema, table in found:
        domain = bare.get(table)
        if domain is None or schema == PUBLIC or domains.domain_of(schema, table) is not None:
            continue
        other = str(TableRef(schema, table))
        out.append(
            f"domains.{domain}: the bare entry {str(TableRef(None, table))!r} means "
            f"{str(TableRef(PUBLIC, table))!r} only; main also has {other!r}, which is routed to main. "
            f"Add {other!r} to domains.{domain} if it belongs there, or write "
            f"{str(TableRef(PUBLIC, table))!r} to say the entry is meant for public only."
        )
    return out


async def _read_catalog(config: Config, names: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(tables of main sharing a bare entry's name, migration notes) from one connection to main."""
    from proxy.migration.monitor import migration_notes  # noqa: PLC0415  (config must not import migration)

    url = config.roles.main.url
    assert url is not None  # the model requires main
    conn = await asyncpg.connect(
        url,
        timeout=CATALOG_TIMEOUT,
        statement_cache_size=0,
        server_settings={"application_name": "parafort-proxy-check"},
    )
    try:
        rows = await conn.fetch(SAME_NAME_QUERY, names, PUBLIC, timeout=CATALOG_TIMEOUT) if names else []
        notes = await migration_notes(conn, config)
    finally:
        await conn.close(timeout=CATALOG_TIMEOUT)
    return [(row[0], row[1]) for row in rows], notes


async def check_catalog(config: Config) -> CatalogReport:
    """Compare the bare entries of the domain map with main's catalog, and say which configured domain roles
    main keeps serving because of a migration (nothing to do without bare entries or configured roles)."""
    names = sorted(config.domains.bare_entries)
    if not names and not any(config.roles.get(d).configured for d in DOMAINS):
        return CatalogReport()
    dsn = config.roles.main.dsn
    assert dsn is not None
    try:
        async with asyncio.timeout(CATALOG_TIMEOUT * 3):
            found, notes = await _read_catalog(config, names)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = describe_error(exc, dsn, CATALOG_TIMEOUT)
        return CatalogReport(skipped=f"main is not reachable ({reason})")
    return CatalogReport(warnings=(*same_name_warnings(config.domains, found), *notes))


def run_catalog_check(config: Config) -> CatalogReport:
    return asyncio.run(check_catalog(config))
