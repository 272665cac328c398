"""Routing policy (BRIEF §3): from a statement's classification to the role that serves it.

Pure functions of the classification, the configuration and what the health interface says is usable;
no I/O. The data path calls ``Router.decide`` once per unit (a simple query, or an extended-protocol batch
up to Sync) when it holds no upstream connection, and ``Router.check_in_transaction`` for later units of
an explicit transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from proxy.config import Config
from proxy.config.values import DOMAINS, table_label
from proxy.errors import CANNOT_CONNECT_NOW, FEATURE_NOT_SUPPORTED, READ_ONLY_SQL_TRANSACTION
from proxy.migration.joins import MovingJoin, SeenJoins
from proxy.router.classify import TX_BEGIN_READ_ONLY, Classification, Flag, TableName, route_override

MAIN = "main"
REPLICA = "read_replica"
READ, WRITE = "read", "write"
TX_READ_WRITE, TX_READ_ONLY = "read_write", "read_only"
DECISION_CACHE_SIZE = 20_000


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a unit goes and why; ``role`` None means refused with ``sqlstate`` and ``message``."""

    kind: str
    domains: tuple[str, ...]
    role: str | None
    reason: str
    sqlstate: str | None = None
    message: str | None = None
    fallback_from: tuple[str, ...] = ()  # roles (down or unconfigured) whose tables main serves here
    # A write main takes for a configured role that is down (``fallback: main``): (role, table) pairs,
    # counted and logged so an operator can reconcile main's copy of those tables with the role's.
    fallback_writes: tuple[tuple[str, str], ...] = ()
    down: str | None = None  # refused (57P03): this configured role is down and has no fallback

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": self.kind,
            "domains": list(self.domains),
            "role": self.role,
            "reason": self.reason,
        }
        if self.sqlstate:
            out["error"] = {"sqlstate": self.sqlstate, "message": self.message}
        return out


class Router:
    """The policy over one configuration. ``usable(role)`` is the health interface: configured and
    healthy (for read_replica: some replica healthy and within its lag limit).

    ``held``: configured domain roles whose migration has not been cut over (proxy/migration/state.py):
    their tables are routed as if the role had no URL, so main serves them. ``joins``: where to count the
    statements that moving a role still served by main would refuse (proxy/migration/joins.py)."""

    def __init__(
        self,
        config: Config,
        usable: Callable[[str], bool] | None = None,
        catalog_read_only: frozenset[str] = frozenset(),
        held: frozenset[str] = frozenset(),
        joins: SeenJoins | None = None,
    ) -> None:
        self.config = config
        self.held = held
        self.joins = joins
        self._usable = usable or self._configured
        self.read_only_functions = frozenset(f.lower() for f in config.routing.read_only_functions)
        # Main's own STABLE / IMMUTABLE functions (proxy/lookups.py), as the classifier spells calls.
        self.catalog_read_only = catalog_read_only
        self._domains = config.domains
        # Decisions by (classification, override, tx): valid until what is usable changes (invalidate()).
        self._decisions: dict[tuple[Classification, str | None, str | None], Decision] = {}
        # The same for a unit outside a transaction with no override (the fast path's), by classification.
        self._plain: dict[Classification, Decision] = {}
        # check_in_transaction's answers and the unit's decision when it runs on the holding role (its
        # read|write), by (classification, holding role).
        self._in_tx: dict[tuple[Classification, str], tuple[Decision | None, Decision]] = {}
        self._on_fallback: bool | None = None
        self._moving: dict[Classification, tuple[MovingJoin, ...]] = {}
        self._pending = self._pending_roles()

    def invalidate(self) -> None:
        """Health changed: forget cached decisions."""
        self._decisions = {}
        self._plain = {}
        self._in_tx = {}
        self._on_fallback = None

    def set_held(self, held: frozenset[str]) -> None:
        """The migration state changed: these configured roles' tables are served by main from now on."""
        if held != self.held:
            self.held = held
            self._pending = self._pending_roles()
            self._moving = {}
            self.invalidate()

    def _pending_roles(self) -> frozenset[str]:
        """Domain roles whose tables main serves by configuration (no URL, or a migration not cut over)."""
        return frozenset(d for d in DOMAINS if not self._configured(d))

    def moving_joins(self, info: Classification) -> tuple[MovingJoin, ...]:
        """For each role main serves by configuration: the statement joins its tables with others, so it
        would be refused (0A000) once the role's own database serves them. Cached per classification."""
        found = self._moving.get(info)
        if found is None:
            found = ()
            if not info.bits & _F_PARSE_ERROR:
                by_domain = self._tables_by_domain(info.tables)
                if len(by_domain) > 1:
                    found = tuple(
                        MovingJoin(
                            role,
                            tuple(_labels(tables)),
                            tuple(_labels(t for d, ts in by_domain.items() if d != role for t in ts)),
                        )
                        for role, tables in sorted(by_domain.items())
                        if role in self._pending
                    )
            if len(self._moving) >= DECISION_CACHE_SIZE:
                self._moving = {}
            self._moving[info] = found
        return found

    def note_joins(self, info: Classification) -> None:
        """A unit of ``info`` is sent: count it where a move would refuse it (``moving_joins``), while a role
        main serves by configuration has tables. ``decide_cached`` and ``check_in_transaction`` do this
        themselves; the decisions the fast path reads (``decide_plain``, ``in_transaction_cached``) do
        not, so that a unit counts once, when it is sent."""
        if self._pending and self.joins is not None:
            joins = self.moving_joins(info)
            if joins:
                self.joins.record(info, joins)

    def set_catalog_read_only(self, names: frozenset[str]) -> None:
        """Main's catalog was (re)read: these functions are reads from now on."""
        self.catalog_read_only = names
        self.invalidate()

    @property
    def on_fallback(self) -> bool:
        """Whether a configured domain role is down and main serves its tables now (``fallback: main``)."""
        value = self._on_fallback
        if value is None:
            value = self._on_fallback = any(
                self._configured(d) and not self._usable(d) and self.effective(d) == MAIN for d in DOMAINS
            )
        return value

    def fallback_writes(self, info: Classification) -> tuple[tuple[str, str], ...]:
        """(role, table) for each table of a configured, down role that this write sends to main; the table
        named once however the SQL spells it (``user_activity`` and ``public.user_activity`` are one)."""
        if self.kind(info)[0] != WRITE:
            return ()
        writes = {
            (domain, table_label(*table))
            for domain, tables in self._tables_by_domain(info.tables).items()
            if domain != MAIN and self._configured(domain) and self.effective(domain) == MAIN
            for table in tables
        }
        return tuple(sorted(writes))

    def decide_cached(self, info: Classification, override: str | None, tx: str | None) -> Decision:
        if override is None:
            self.note_joins(info)
        return self.decide_uncounted(info, override, tx)

    def decide_uncounted(self, info: Classification, override: str | None, tx: str | None) -> Decision:
        """``decide_cached`` counting nothing (``note_joins``): for the fast path, which counts a unit
        only once it is sure to send it (proxy/frontend/fast.py)."""
        key = (info, override, tx)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions = {}
            decision = self._decisions[key] = self.decide(info, override=override, tx=tx)
        return decision

    def decide_plain(self, info: Classification) -> Decision:
        """``decide_cached(info, None, None)`` (a unit outside a transaction, with no override), cached by
        the classification alone, and counting nothing (``note_joins``)."""
        decision = self._plain.get(info)
        if decision is None:
            if len(self._plain) >= DECISION_CACHE_SIZE:
                self._plain = {}
            decision = self._plain[info] = self.decide(info)
        return decision

    def _configured(self, role: str) -> bool:
        """Configured and not held by a migration: a held role routes as if it had no URL."""
        return role not in self.held and self.config.roles.get(role).configured

    def effective(self, role: str) -> str:
        """The role that serves ``role``'s traffic now: itself, or main when it is unconfigured (its
        tables live there), held by a migration not cut over, or down with ``fallback: main``. A configured
        role without a fallback (the default) keeps its traffic while down: ``decide`` refuses it with
        57P03."""
        if role == MAIN:
            return role
        if role in self.held:
            return MAIN
        if self._usable(role):
            return role
        rc = self.config.roles.get(role)
        if rc.configured and rc.fallback is None:
            return role
        return MAIN

    def domain_of(self, table: TableName) -> str:
        schema, name = table
        return self._domains.domain_of(schema or None, name) or MAIN

    def kind(self, info: Classification) -> tuple[str, str]:
        """(read|write, why) with the configured read-only functions taken into account."""
        if info.write:
            return WRITE, info.write_reason or "writes"
        unknown = sorted(
            f for f in info.functions if f not in self.read_only_functions and f not in self.catalog_read_only
        )
        if unknown:
            return WRITE, f"calls {unknown[0]}(), not known to be read-only"
        return READ, "reads" if info.tables else "reads no table"

    def decide(self, info: Classification, *, override: str | None = None, tx: str | None = None) -> Decision:
        """The role for a unit outside a transaction (``tx`` None) or the first of one (``tx`` set)."""
        kind, why = self.kind(info)
        by_domain = self._tables_by_domain(info.tables)
        domains = tuple(sorted(by_domain))
        if tx is None and info.begins is not None:
            tx = TX_READ_ONLY if info.begins == TX_BEGIN_READ_ONLY else TX_READ_WRITE
        if info.flags & Flag.PARSE_ERROR:
            return Decision(WRITE, domains, MAIN, "not parsable: main reports PostgreSQL's syntax error")
        if override is not None:
            role = self._serving(override, kind, tx)
            if self._down(role):
                return self._down_refusal(kind, domains, role, [])
            return Decision(kind, domains, role, f"/* route: {override} */ override" + _via(override, role))
        upstreams: dict[str, list[TableName]] = {}
        for domain, tables in by_domain.items():
            upstreams.setdefault(self.effective(domain), []).extend(tables)
        down = sorted(role for role in upstreams if self._down(role))
        if down:
            return self._down_refusal(kind, domains, down[0], upstreams[down[0]])
        if len(upstreams) > 1:
            return self._refusal(kind, domains, upstreams)
        if upstreams and next(iter(upstreams)) != MAIN:
            role = next(iter(upstreams))
            return Decision(kind, domains, role, f"{_names(upstreams[role])} belong to {role}; {why}")
        fallen = tuple(d for d in domains if d != MAIN)
        note = f" ({', '.join(fallen)} served by main)" if fallen else ""
        decision = self._main_side(info, kind, why, domains, tx=tx, note=note)
        if not fallen:
            return decision
        writes = self.fallback_writes(info) if decision.role == MAIN else ()
        return replace(decision, fallback_from=fallen, fallback_writes=writes)

    def _down(self, role: str) -> bool:
        """A configured domain role that is down and has no fallback: its statements are refused."""
        return (
            role in DOMAINS
            and self._configured(role)
            and not self._usable(role)
            and self.config.roles.get(role).fallback is None
        )

    def _down_refusal(
        self, kind: str, domains: tuple[str, ...], role: str, tables: list[TableName]
    ) -> Decision:
        what = f" ({_names(tables)})" if tables else ""
        message = (
            f"the {role} upstream is down: statements on its tables{what} are refused until it is back "
            f"(roles.{role}.fallback is not main)"
        )
        return Decision(kind, domains, None, message, CANNOT_CONNECT_NOW, message, down=role)

    def _main_side(
        self,
        info: Classification,
        kind: str,
        why: str,
        domains: tuple[str, ...],
        *,
        tx: str | None,
        note: str,
    ) -> Decision:
        """Tables of main (or none, or of roles main serves now): main, or the replica for reads."""
        primary = kind == WRITE or info.primary_only or tx == TX_READ_WRITE
        if primary and not self._usable(MAIN):
            if kind == READ and not info.primary_only and self._usable(REPLICA):
                return Decision(
                    kind, domains, REPLICA, f"{why}: main is down, the replica serves reads{note}"
                )
            message = (
                "main is unavailable: the proxy serves reads from the replica only (degraded read-only "
                f"mode) and refuses this {'transaction' if tx == TX_READ_WRITE else 'write'}"
            )
            return Decision(kind, domains, None, message, READ_ONLY_SQL_TRANSACTION, message)
        if kind == WRITE or info.primary_only:
            return Decision(kind, domains, MAIN, f"{why}: writes go to main{note}")
        if tx == TX_READ_WRITE:
            return Decision(kind, domains, MAIN, f"{why} inside a read-write transaction: main{note}")
        if self._usable(REPLICA):
            return Decision(kind, domains, REPLICA, f"{why}: a read of main data goes to the replica{note}")
        return Decision(kind, domains, MAIN, f"{why}: no usable read replica, main serves reads{note}")

    def _serving(self, role: str, kind: str, tx: str | None) -> str:
        if role == REPLICA:
            return REPLICA if self._usable(REPLICA) else MAIN
        return self.effective(role)

    def _tables_by_domain(self, tables: Iterable[TableName]) -> dict[str, list[TableName]]:
        out: dict[str, list[TableName]] = {}
        for table in sorted(tables):
            out.setdefault(self.domain_of(table), []).append(table)
        return out

    def _refusal(
        self, kind: str, domains: tuple[str, ...], upstreams: dict[str, list[TableName]]
    ) -> Decision:
        parts = [f"{_names(tables)} on {role}" for role, tables in sorted(upstreams.items())]
        message = "statement needs more than one upstream: " + "; ".join(parts)
        return Decision(kind, domains, None, message, FEATURE_NOT_SUPPORTED, message)

    def in_transaction_cached(self, info: Classification, holding: str) -> tuple[Decision | None, Decision]:
        """``check_in_transaction`` (a refusal, or None), and the decision of the unit when it runs on
        ``holding`` (its read|write as ``kind``; no fallbacks), cached as ``decide_cached``'s decisions are
        (until ``invalidate``), counting nothing (``note_joins``)."""
        key = (info, holding)
        found = self._in_tx.get(key)
        if found is None:
            if len(self._in_tx) >= DECISION_CACHE_SIZE:
                self._in_tx = {}
            sent = Decision(self.kind(info)[0], (), holding, "in transaction")
            found = self._in_tx[key] = (self._in_transaction(info, holding), sent)
        return found

    def check_in_transaction(self, info: Classification, holding: str) -> Decision | None:
        """A later unit of a transaction held on ``holding``: None when it can run there, else a refusal."""
        self.note_joins(info)
        return self._in_transaction(info, holding)

    def _in_transaction(self, info: Classification, holding: str) -> Decision | None:
        if info.flags & Flag.PARSE_ERROR:
            return None  # the server reports the syntax error (and the transaction fails there)
        by_domain = self._tables_by_domain(info.tables)
        needs: dict[str, list[TableName]] = {}
        for domain, tables in by_domain.items():
            role = self.effective(domain)
            # Main's tables can be read on the replica a read-only transaction holds.
            serving = holding if role == MAIN and holding == REPLICA else role
            needs.setdefault(serving, []).extend(tables)
        others = {role: tables for role, tables in needs.items() if role != holding}
        if not others:
            return None
        kind, _ = self.kind(info)
        down = sorted(role for role in others if self._down(role))
        if down:
            return self._down_refusal(kind, tuple(sorted(by_domain)), down[0], others[down[0]])
        parts = [f"{_names(tables)} on {role}" for role, tables in sorted(others.items())]
        message = f"this transaction runs on {holding}; the statement needs " + "; ".join(parts)
        return Decision(kind, tuple(sorted(by_domain)), None, message, FEATURE_NOT_SUPPORTED, message)


_F_PARSE_ERROR = int(Flag.PARSE_ERROR)


def _labels(tables: Iterable[TableName]) -> list[str]:
    return [table_label(s or None, t) for s, t in tables]


def _names(tables: Iterable[TableName]) -> str:
    return ", ".join(f"{s}.{t}" if s else t for s, t in tables)


def _via(requested: str, role: str) -> str:
    return "" if requested == role else f" ({requested} unavailable: {role})"


__all__ = ["DOMAINS", "Decision", "Router", "route_override"]
