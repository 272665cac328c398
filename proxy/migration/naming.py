"""Names and SQL text for a migration's replication objects: no I/O, tested without servers.

One migration per role. Replication runs in one direction at a time:

- **forward** (from ``start`` until cutover, and again after a rollback): a publication on main, a
  subscription on the target, its slot on main;
- **reverse** (after cutover, for the rollback window): a publication on the target, a subscription on main,
  its slot on the target.

Every name comes from :func:`names`, so a restart, a second proxy or ``finish`` finds the same objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.config.dsn import Dsn
from proxy.config.values import PUBLIC, TableRef, parse_table_ref

PREFIX = "parafort_migrate_"
# Slot names allow lower-case letters, digits and underscores only; identifiers are at most 63 bytes.
_ROLE = re.compile(r"[a-z][a-z0-9_]*")
MAX_IDENTIFIER = 63
# The key words of a libpq connection string that a subscription's CONNECTION may carry from a Dsn's
# query parameters (the rest are the proxy's own or meaningless to a server-side connection).
CONNINFO_PARAMS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "target_session_attrs")


@dataclass(frozen=True)
class Names:
    """The replication objects of one role's migration (valid, unquoted identifiers)."""

    forward: str  # publication on main = subscription on the target = its slot on main
    reverse: str  # publication on the target = subscription on main = its slot on the target


def names(role: str) -> Names:
    """The object names for ``role``'s migration; ValueError for a role that cannot make a valid name."""
    longest = PREFIX + role + "_fwd"
    if not _ROLE.fullmatch(role) or len(longest.encode()) > MAX_IDENTIFIER:
        raise ValueError(f"role {role!r} cannot name replication objects (lower-case letters, digits, _)")
    return Names(forward=f"{PREFIX}{role}_fwd", reverse=f"{PREFIX}{role}_rev")


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (quotes doubled); ValueError for NUL."""
    if "\0" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a SQL string literal (standard_conforming_strings on: only quotes are doubled)."""
    if "\0" in value:
        raise ValueError("literal contains NUL")
    return "'" + value.replace("'", "''") + "'"


def qualified(table: TableRef) -> str:
    """``"schema"."table"`` for a parsed table entry (a bare name is in public)."""
    ref = table.qualified
    return f"{quote_ident(ref.schema or PUBLIC)}.{quote_ident(ref.table)}"


def parse_tables(tables: Iterable[str | TableRef]) -> list[TableRef]:
    """The tables of a migration, schema spelled out, in order, without duplicates; ValueError for a
    wildcard or an unparsable entry (a wildcard must be resolved against the catalog first)."""
    seen: dict[TableRef, None] = {}
    for entry in tables:
        ref = parse_table_ref(entry).qualified
        if ref.is_wildcard:
            raise ValueError(f"table entry {entry!s} is a wildcard; list the tables")
        seen.setdefault(ref, None)
    if not seen:
        raise ValueError("no tables to migrate")
    return list(seen)


def conninfo(dsn: Dsn) -> str:
    """A libpq key/value connection string for a subscription's CONNECTION (it holds the password: never
    log it). Values are single-quoted with backslash escapes, as libpq reads them."""

    def value(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    parts = [("host", dsn.host), ("port", str(dsn.port))]
    if dsn.user:
        parts.append(("user", dsn.user))
    if dsn.password is not None:
        parts.append(("password", dsn.password))
    if dsn.database:
        parts.append(("dbname", dsn.database))
    parts += [(key, val) for key in CONNINFO_PARAMS if (val := dsn.param(key)) is not None]
    return " ".join(f"{key}={value(val)}" for key, val in parts)


def create_publication(name: str, tables: Sequence[TableRef]) -> str:
    return f"CREATE PUBLICATION {quote_ident(name)} FOR TABLE {', '.join(qualified(t) for t in tables)}"


def set_publication_tables(name: str, tables: Sequence[TableRef]) -> str:
    return f"ALTER PUBLICATION {quote_ident(name)} SET TABLE {', '.join(qualified(t) for t in tables)}"


def create_subscription(name: str, publisher: Dsn, publication: str, *, copy_data: bool) -> str:
    """CREATE SUBSCRIPTION ``name`` (its slot on the publisher has the same name). Holds the password."""
    return (
        f"CREATE SUBSCRIPTION {quote_ident(name)} CONNECTION {quote_literal(conninfo(publisher))} "
        f"PUBLICATION {quote_ident(publication)} "
        f"WITH (copy_data = {'true' if copy_data else 'false'}, slot_name = {quote_literal(name)})"
    )


def redact(text: str, *dsns: Dsn) -> str:
    """``text`` with every password of ``dsns`` replaced by ``***`` (for errors and logs)."""
    for dsn in dsns:
        if dsn.password:
            text = text.replace(dsn.password, "***")
    return text
