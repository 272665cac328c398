"""Scalar value types of the configuration: durations, table references, role names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator

ROLES = ("main", "analytics", "documents", "compliance", "read_replica")
DOMAINS = ("analytics", "documents", "compliance")
# The schema a bare domain-map entry and an unqualified table reference in SQL stand for. The proxy does not
# follow search_path: an unqualified name is taken to be public.<name>.
PUBLIC = "public"


def table_label(schema: str | None, table: str) -> str:
    """A table's one name in metrics and log lines: ``table`` for public (how unqualified SQL names it, and
    how a bare map entry is written), else ``schema.table``; as stored, without quotes."""
    return table if schema in (None, "", PUBLIC) else f"{schema}.{table}"


RoleName = Literal["main", "analytics", "documents", "compliance", "read_replica"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Turn ``500ms``, ``30s``, ``5m``, ``1h``, ``1d`` or a bare number of seconds into seconds.

    Raises ValueError for anything else, negative numbers included.
    """
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r} (use e.g. 500ms, 30s, 5m, 1h)")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"bad duration {value!r}: must not be negative")
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"bad duration {value!r} (use e.g. 500ms, 30s, 5m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """Render seconds the way a person would write them in the config file."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True, order=True)
class TableRef:
    """A domain-map entry: ``table``, ``schema.table`` or ``schema.*`` (table ``*``).

    Names are stored as PostgreSQL sees them: unquoted parts folded to lower case, quoted parts verbatim.
    """

    schema: str | None
    table: str

    @property
    def is_wildcard(self) -> bool:
        return self.table == "*"

    @property
    def qualified(self) -> TableRef:
        """The entry with its schema spelled out: a bare ``table`` is ``public.table``."""
        return self if self.schema is not None else TableRef(PUBLIC, self.table)

    def __str__(self) -> str:
        def show(name: str) -> str:
            plain = name == "*" or re.fullmatch(r"[a-z_][a-z0-9_$]*", name) is not None
            return name if plain else '"' + name.replace('"', '""') + '"'

        return show(self.table) if self.schema is None else f"{show(self.schema)}.{show(self.table)}"


_IDENT_PART = re.compile(r'\s*(?:"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)|(\*))\s*')


def parse_table_ref(value: object) -> TableRef:
    """Parse a domain-map entry; raise ValueError naming the accepted forms."""
    if isinstance(value, TableRef):
        return value
    bad = ValueError(f"bad table entry {value!r} (use table, schema.table or schema.*)")
    if not isinstance(value, str):
        raise bad
    parts: list[tuple[str, bool]] = []  # (name, is_star)
    pos = 0
    while True:
        match = _IDENT_PART.match(value, pos)
        if match is None:
            raise bad
        quoted, plain, star = match.groups()
        if quoted is not None:
            parts.append((quoted.replace('""', '"'), False))
        else:
            parts.append((plain.lower(), False) if plain is not None else ("*", star is not None))
        pos = match.end()
        if pos == len(value):
            break
        if value[pos] != ".":
            raise bad
        pos += 1
    if len(parts) > 2 or any(is_star for _, is_star in parts[:-1]):
        raise bad
    if len(parts) == 1:
        if parts[0][1]:
            raise bad
        return TableRef(None, parts[0][0])
    return TableRef(parts[0][0], parts[1][0])


TableEntry = Annotated[TableRef, BeforeValidator(parse_table_ref)]
