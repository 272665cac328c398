"""What must hold before a migration creates anything: server settings, privileges, the tables.

The facts are read with one query per side (``server_facts``, ``table_facts``); the checks are pure
functions of them that return the problems as sentences an operator can act on (what to set, and where).
Nothing is created while any check fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config.values import PUBLIC, TableRef, table_label

PG16 = 160000  # pg_create_subscription exists; CREATE SUBSCRIPTION no longer needs a superuser

SERVER_QUERY = """
SELECT current_setting('server_version_num')::int, current_setting('wal_level'),
       current_setting('max_replication_slots')::int, (SELECT count(*) FROM pg_replication_slots)::int,
       current_setting('max_wal_senders')::int, (SELECT count(*) FROM pg_stat_replication)::int,
       r.rolsuper, r.rolreplication, current_user::text,
       has_database_privilege(current_database(), 'CREATE')
FROM pg_roles r WHERE r.rolname = current_user
"""
CREATE_SUBSCRIPTION_ROLE_QUERY = "SELECT pg_has_role(current_user, 'pg_create_subscription', 'MEMBER')"
# Per requested table, in order: does it exist, its kind and replica identity, a primary key, whether the
# current user has its owner's privileges.
TABLES_QUERY = """
SELECT c.oid IS NOT NULL, c.relkind::text, c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       coalesce(pg_has_role(c.relowner, 'USAGE'), false)
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(schema, name, ord)
LEFT JOIN pg_namespace n ON n.nspname = t.schema
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name AND c.relkind IN ('r', 'p')
ORDER BY t.ord
"""


@dataclass(frozen=True)
class ServerFacts:
    """One server's settings and the connecting user's privileges."""

    version: int
    wal_level: str
    max_replication_slots: int
    slots_used: int
    max_wal_senders: int
    senders_used: int
    superuser: bool
    replication: bool
    user: str
    can_create: bool  # CREATE on the database (publications)
    create_subscription_role: bool = False  # member of pg_create_subscription (16+)


@dataclass(frozen=True)
class TableFacts:
    """One requested table as a server has it."""

    table: TableRef
    exists: bool
    kind: str | None = None  # relkind: r (table) or p (partitioned)
    replica_identity: str | None = None  # relreplident: d (default: the primary key), i, f or n
    has_primary_key: bool = False
    owned: bool = False  # the current user has the owner's privileges

    @property
    def label(self) -> str:
        return table_label(self.table.schema, self.table.table)


async def server_facts(conn: Any) -> ServerFacts:
    row = await conn.fetchrow(SERVER_QUERY)
    facts = ServerFacts(*row)
    if facts.version >= PG16:
        member = bool(await conn.fetchval(CREATE_SUBSCRIPTION_ROLE_QUERY))
        facts = dataclasses.replace(facts, create_subscription_role=member)
    return facts


async def table_facts(conn: Any, tables: Sequence[TableRef]) -> list[TableFacts]:
    schemas = [t.schema or PUBLIC for t in tables]
    rows = await conn.fetch(TABLES_QUERY, schemas, [t.table for t in tables])
    return [
        TableFacts(table, bool(r[0]), r[1], r[2], bool(r[3]), bool(r[4]))
        if r[0]
        else TableFacts(table, False)
        for table, r in zip(tables, rows, strict=True)
    ]


def publisher_problems(facts: ServerFacts, side: str, *, slots_needed: int) -> list[str]:
    """Why ``side`` (main, or the target for reverse replication) cannot publish; ``slots_needed`` new
    replication slots and WAL senders (0 when the subscription exists already)."""
    problems = []
    if facts.wal_level != "logical":
        problems.append(
            f"{side} has wal_level={facts.wal_level}; logical replication needs wal_level=logical: run "
            f"ALTER SYSTEM SET wal_level = logical on {side} and restart it"
        )
    free_slots = facts.max_replication_slots - facts.slots_used
    if free_slots < slots_needed:
        problems.append(
            f"{side} has max_replication_slots={facts.max_replication_slots} with {facts.slots_used} in use; "
            f"the migration needs {slots_needed} free: raise it (ALTER SYSTEM SET max_replication_slots, "
            "restart)"
        )
    free_senders = facts.max_wal_senders - facts.senders_used
    if free_senders < slots_needed:
        problems.append(
            f"{side} has max_wal_senders={facts.max_wal_senders} with {facts.senders_used} in use; the "
            f"migration needs {slots_needed} free: raise it (ALTER SYSTEM SET max_wal_senders, restart)"
        )
    if not (facts.superuser or facts.replication):
        problems.append(
            f"{side}'s user {facts.user} may not replicate: ALTER ROLE {facts.user} REPLICATION "
            "(or connect as a superuser)"
        )
    if not (facts.superuser or facts.can_create):
        problems.append(
            f"{side}'s user {facts.user} may not create a publication (needs CREATE on the database)"
        )
    return problems


def subscriber_problems(facts: ServerFacts, side: str) -> list[str]:
    """Why ``side`` (the target, or main for reverse replication) cannot create a subscription."""
    if facts.superuser:
        return []
    if facts.version < PG16:
        return [
            f"{side}'s user {facts.user} may not create a subscription: PostgreSQL "
            f"{facts.version // 10000} allows that to superusers only; connect as a superuser"
        ]
    if not (facts.create_subscription_role and facts.can_create):
        return [
            f"{side}'s user {facts.user} may not create a subscription: GRANT pg_create_subscription TO "
            f"{facts.user} and CREATE on the database (or connect as a superuser)"
        ]
    return []


def table_problems(tables: Sequence[TableFacts], side: str, superuser: bool) -> list[str]:
    """Why these tables of ``side`` (the publisher) cannot be published."""
    problems = []
    for t in tables:
        if not t.exists:
            problems.append(f"table {t.label} does not exist on {side}")
        elif t.kind != "r":
            problems.append(
                f"table {t.label} on {side} is partitioned; moving partitioned tables is not supported"
            )
        elif t.replica_identity == "n" or (t.replica_identity == "d" and not t.has_primary_key):
            # Once published, its UPDATEs and DELETEs would fail on the publisher.
            problems.append(
                f"table {t.label} on {side} has no primary key or replica identity: add a primary key, or "
                f"ALTER TABLE {t.label} REPLICA IDENTITY FULL"
            )
        elif not (superuser or t.owned):
            problems.append(f"table {t.label} on {side} is not owned by the connecting user")
    return problems
