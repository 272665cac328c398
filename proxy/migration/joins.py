"""Statements seen since start that a move would break: they join a table of a role main still serves
(not configured, or migrating) with a table that stays, so once that role's own database serves its tables
the router refuses them with 0A000. Counted per (role, statement fingerprint), for the migration plan.

The router finds them (``Router.moving_joins``, cached per classification) and calls ``record`` once per unit
it routes; nothing here parses SQL or touches the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.router.classify import Classification

MAX_STATEMENTS = 1000  # distinct (role, fingerprint) kept; beyond it, counted per role as "other statements"
OTHER = "(other statements)"


@dataclass(frozen=True, slots=True)
class MovingJoin:
    """One role whose move would refuse a statement: its tables in it, and the tables that stay."""

    role: str
    moving: tuple[str, ...]
    staying: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"joins {', '.join(self.moving)} (moves to {self.role}) with {', '.join(self.staying)} (stays): "
            f"refused with 0A000 once {self.role} serves its tables"
        )


@dataclass
class Seen:
    """A statement (by fingerprint) and how often it ran."""

    key: str
    join: MovingJoin
    count: int = 0


class SeenJoins:
    """The statements seen, by role; ``fingerprint_of`` names a classification (None: unknown)."""

    def __init__(self, fingerprint_of: Callable[[Classification], str | None]) -> None:
        self.fingerprint_of = fingerprint_of
        self.seen: dict[tuple[str, str], Seen] = {}

    def record(self, info: Classification, joins: tuple[MovingJoin, ...]) -> None:
        fingerprint = self.fingerprint_of(info)
        for join in joins:
            key = fingerprint or "tables:" + ",".join(sorted(join.moving + join.staying))
            entry = self.seen.get((join.role, key))
            if entry is None:
                if len(self.seen) >= MAX_STATEMENTS:
                    key = OTHER
                    entry = self.seen.get((join.role, key))
                if entry is None:
                    entry = self.seen[(join.role, key)] = Seen(key, join)
            entry.count += 1

    def for_role(self, role: str) -> list[Seen]:
        """The role's statements, most frequent first."""
        found = [s for (r, _), s in self.seen.items() if r == role]
        return sorted(found, key=lambda s: (-s.count, s.key))
