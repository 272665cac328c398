"""Writes main took for a configured domain role that was down (``fallback: main``): rows an operator
must reconcile into the role's own database once it is back.

Counted per (role, table) for the metric and ``SHOW STATS``; logged per outage: the first write of each
table when it happens, and one summary line per table when the role is up again (or the proxy stops), never
one line per write.
"""

from __future__ import annotations

import logging

log = logging.getLogger("parafort.server")  # the lines the process has always logged


class FallbackWrites:
    """The totals since start (``totals``) and the counts of the outages under way."""

    def __init__(self) -> None:
        self.totals: dict[tuple[str, str], int] = {}  # (role, table) -> writes, since start
        self._outage: dict[str, dict[str, int]] = {}  # role -> table -> writes, in its current outage

    def count(self, writes: tuple[tuple[str, str], ...]) -> None:
        """Writes main took for a down role's tables (one per (role, table) of a statement)."""
        for key in writes:
            self.totals[key] = self.totals.get(key, 0) + 1
            role, table = key
            tables = self._outage.setdefault(role, {})
            n = tables.get(table, 0)
            if n == 0:
                log.warning(
                    "event=fallback_writes_started role=%s table=%s served_by=main note=%r",
                    role,
                    table,
                    "rows written now land in main's copy and are not visible through the proxy once "
                    f"{role} is back, until reconciled",
                )
            tables[table] = n + 1

    def outage_over(self, role: str, why: str) -> None:
        """``role``'s outage ended (``why``): its counts are logged, one line per table, and start again."""
        for table, n in sorted(self._outage.pop(role, {}).items()):
            log.warning(
                "event=fallback_writes_summary role=%s table=%s writes=%d served_by=main reason=%r",
                role,
                table,
                n,
                f"{why}: reconcile main's copy of {table} into {role}",
            )

    def close(self) -> None:
        """The proxy stops: every outage under way is summed up."""
        for role in list(self._outage):
            self.outage_over(role, "proxy stopping")
