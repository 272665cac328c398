"""The admin console, PgBouncer style: ``psql`` to the virtual database ``parafort`` as an admin user.

    SHOW POOLS | CLIENTS | SERVERS | STATS | HEALTH | CONFIG | CONSISTENCY | MIGRATION | SHADOW | HELP
    RELOAD
    PAUSE [role]      new transactions for the role (or every role) wait; nothing fails
    RESUME [role]
    MIGRATE role PLAN | STATUS | START | CUTOVER | ROLLBACK | FINISH   moving a domain to its own database

Commands are this console's own small language (keywords and a role name), not SQL.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from proxy.config.render import config_as_dict
from proxy.config.values import DOMAINS, ROLES
from proxy.consistency import OUTCOMES
from proxy.context import AdminContext
from proxy.errors import FEATURE_NOT_SUPPORTED, ProxyError
from proxy.frontend.ryw import format_lsn
from proxy.migration import plan, shadow, verbs
from proxy.migration.state import MEANING, OPERATOR_VERBS, Verb
from proxy.protocol import messages as m

SYNTAX_ERROR = "42601"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
TEXT, INT8, BOOL, FLOAT8 = 25, 20, 16, 701
Row = Sequence[object]
Reply = bytes | Awaitable[bytes]  # awaitable: a command that asks a database (the client waits for it)
MIGRATION_COLUMNS = [("role", TEXT), ("state", TEXT), ("served_by", TEXT), ("started_at", TEXT)]
MIGRATION_COLUMNS += [("updated_at", TEXT), ("lag_bytes", INT8), ("divergences", INT8)]
MIGRATION_COLUMNS += [("held_transactions", INT8), ("detail", TEXT)]
PLAN_TYPES = {"rows": INT8, "bytes": INT8, "seen": INT8}


def _table(columns: Sequence[tuple[str, int]], rows: Sequence[Row], tag: str = "SHOW") -> bytes:
    out = bytearray(m.row_description(columns))
    for row in rows:
        out += m.data_row([None if v is None else _text(v) for v in row])
    out += m.command_complete(f"{tag} {len(rows)}" if tag == "SHOW" else tag)
    return bytes(out)


def _stamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class AdminConsole:
    """Answers one console command with the protocol bytes of its result (ReadyForQuery excluded)."""

    def __init__(self, app: AdminContext) -> None:
        self.app = app
        self.commands: dict[str, Callable[[list[str]], Reply]] = {
            "SHOW": self.show,
            "RELOAD": self.reload,
            "PAUSE": self.pause,
            "RESUME": self.resume,
            "MIGRATE": self.migrate,
        }

    def execute(self, text: str) -> Reply:
        words = text.replace(";", " ").split()
        if not words:
            return m.empty_query_response()
        command = self.commands.get(words[0].upper())
        if command is None:
            raise ProxyError(SYNTAX_ERROR, f"unknown admin command {words[0]!r}", hint="try SHOW HELP")
        return command([w.upper() for w in words[1:]] if words[0].upper() == "SHOW" else words[1:])

    # -- SHOW --------------------------------------------------------------------------------------------
    def show(self, args: list[str]) -> bytes:
        what = args[0] if args else "HELP"
        handler = getattr(self, f"show_{what.lower()}", None)
        if handler is None:
            raise ProxyError(SYNTAX_ERROR, f"unknown SHOW target {what!r}", hint="try SHOW HELP")
        result: bytes = handler()
        return result

    def show_help(self) -> bytes:
        rows = [(line,) for line in (__doc__ or "").strip().splitlines()[2:9] if line.strip()]
        return _table([("command", TEXT)], rows)

    def show_pools(self) -> bytes:
        app = self.app
        rows = []
        for label, pool in app.pools.items():
            role = app.pool_roles[label]
            s = pool.stats
            rows.append(
                (role, label, s.max, s.total, s.active, s.idle, s.waiting, pool.timeouts, app.is_paused(role))
            )
        cols = [("role", TEXT), ("upstream", TEXT), ("pool_size", INT8), ("total", INT8), ("active", INT8)]
        cols += [("idle", INT8), ("waiting", INT8), ("acquire_timeouts", INT8), ("paused", BOOL)]
        return _table(cols, rows)

    def show_clients(self) -> bytes:
        rows = []
        now = time.monotonic()
        for c in sorted(self.app.clients, key=lambda c: c.id):
            state = "waiting" if c.waiting is not None else ("active" if c.server is not None else "idle")
            rows.append(
                (
                    c.id,
                    c.user,
                    c.database,
                    c.peer,
                    state,
                    c.server_role or None,
                    c.pinned,
                    now - c.connected_at,
                )
            )
        cols = [("id", INT8), ("user", TEXT), ("database", TEXT), ("address", TEXT), ("state", TEXT)]
        cols += [("role", TEXT), ("pinned", TEXT), ("connected_seconds", FLOAT8)]
        return _table(cols, rows)

    def show_servers(self) -> bytes:
        rows: list[Row] = []
        now = time.monotonic()
        for c in self.app.clients:
            s = c.server
            if s is not None:
                state = "lingering" if c.lingering else "active"
                rows.append((s.label, s.role, s.backend_pid, state, c.id, now - s.created_at))
        for pool in self.app.pools.values():
            for s in pool.idle_connections():
                rows.append((s.label, s.role, s.backend_pid, "idle", None, now - s.created_at))
        cols = [("upstream", TEXT), ("role", TEXT), ("backend_pid", INT8), ("state", TEXT), ("client", INT8)]
        cols += [("age_seconds", FLOAT8)]
        return _table(cols, sorted(rows, key=lambda r: (str(r[0]), str(r[3]))))  # by upstream, state

    def show_stats(self) -> bytes:
        app = self.app
        rows: list[Row] = [(role, kind, n) for (role, kind), n in sorted(app.routed.items())]
        rows += [(role, "fallback", n) for role, n in sorted(app.fallbacks.items())]
        writes = sorted(app.fallback_writes.items())
        rows += [(role, f"fallback_writes:{table}", n) for (role, table), n in writes]
        rows += [(role, "down_refusal", n) for role, n in sorted(app.down_refusals.items())]
        rows.append(("*", "cross_upstream_refusal", app.refusals))
        rows.append(("*", "classification_cache_hit", app.classifier.hits))
        rows.append(("*", "classification_cache_miss", app.classifier.misses))
        return _table([("role", TEXT), ("counter", TEXT), ("value", INT8)], rows)

    def show_health(self) -> bytes:
        rows = [
            (h.label, h.role, h.up, h.usable, h.lag_seconds, h.lag_bytes, h.last_error)
            for h in self.app.health.snapshot().values()
        ]
        cols = [("upstream", TEXT), ("role", TEXT), ("up", BOOL), ("usable", BOOL)]
        cols += [("lag_seconds", FLOAT8), ("lag_bytes", INT8), ("last_error", TEXT)]
        return _table(cols, rows)

    def show_consistency(self) -> bytes:
        """Read-your-writes: settings, tokens, replay positions, outcomes, why recent reads went to main."""
        c = self.app.consistency
        settings = c.settings
        rows: list[Row] = [
            ("scope", settings.scope, None),
            ("max_wait", f"{settings.max_wait * 1000:g}ms", None),
            ("tokens", str(len(c.writes.tokens)), None),
            ("captures_pending", str(sum(c.writes.pending.values())), None),
            ("scopes_in_doubt", str(len(c.writes.doubt)), "their reads go to main"),
            ("captures", str(c.writes.captures), None),
            ("capture_failures", str(c.writes.capture_failures), None),
            ("main_changes", str(c.writes.identity_changes), "tokens of an older main put in doubt"),
        ]
        rows += [(f"replay_lsn:{label}", format_lsn(lsn), None) for label, lsn in sorted(c.replay.items())]
        rows += [(f"reads:{outcome}", str(c.outcomes.get(outcome, 0)), None) for outcome in OUTCOMES]
        for at, scope, reason in reversed(c.recent):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
            rows.append((f"to_main:{stamp}", scope, reason))
        return _table([("name", TEXT), ("value", TEXT), ("reason", TEXT)], rows)

    def show_config(self) -> bytes:
        rows: list[Row] = []

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
            else:
                rows.append((prefix, "" if value is None else str(value)))

        walk("", config_as_dict(self.app.config))  # secrets are redacted there
        return _table([("key", TEXT), ("value", TEXT)], rows)

    def show_migration(self, only: str | None = None) -> bytes:
        """A row per domain role: its stored migration state, who serves its tables, and while copying or
        streaming the replication's lag (main's WAL position minus what the subscription confirmed, as
        read at the last poll). ``held_transactions``: new transactions on the role's tables waiting now
        for a cutover or a rollback from one. ``divergences``: the shadow reads' divergences since start
        (NULL: none of its reads sampled; SHOW SHADOW lists them by statement)."""
        app = self.app
        monitor = app.migration
        rows: list[Row] = []
        for role in DOMAINS:
            if only is not None and role != only:
                continue
            mig = monitor.migrations.get(role)
            configured = app.config.roles.get(role).configured
            served_by = "main" if role in monitor.held or not configured else role
            if monitor.error is not None:
                detail = f"state not read from main: {monitor.error}"
            elif not monitor.loaded:
                detail = "state not read from main yet"
            elif mig is not None:
                detail = MEANING[mig.state] + self._progress_note(role)
            else:
                detail = "no migration recorded" + ("" if configured else " (no URL: main serves its tables)")
            when = (_stamp(mig.started_at), _stamp(mig.updated_at)) if mig else (None, None)
            found = monitor.progress.get(role) if mig is not None and mig.state in verbs.FOLLOWED else None
            lag = found.lag_bytes if found is not None else None
            hold = monitor.hold
            if role in hold.roles:
                detail = f"holding new transactions on its tables (a cutover or rollback runs); {detail}"
            held = hold.waiting.get(role, 0) if role in hold.roles else 0
            diverged = monitor.shadow.divergences(role)
            row = (role, mig.state.value if mig else "none", served_by, *when, lag, diverged, held, detail)
            rows.append(row)
        return _table(MIGRATION_COLUMNS, rows)

    def show_shadow(self) -> bytes:
        """Shadow reads (proxy/migration/shadow.py): a row per role and statement fingerprint sampled, with
        the statement normalized (no literals) and what its samples came to; then a row per role for the
        samples never compared: dropped (the queue was full or held the same statement) and skipped, by
        why they cannot be replayed."""
        found = self.app.migration.shadow
        rows: list[Row] = []
        for s in found.for_role():
            counts = s.outcomes
            rows.append(
                (
                    s.role,
                    s.fingerprint,
                    s.statement,
                    s.samples,
                    counts.get(shadow.MATCH, 0),
                    counts.get(shadow.DIVERGED, 0),
                    counts.get(shadow.INCONCLUSIVE, 0),
                    counts.get(shadow.ERROR, 0),
                    s.last_error,
                    _stamp(dt.datetime.fromtimestamp(s.last_seen, dt.UTC)),
                )
            )
        for (role, outcome), n in sorted(found.counts.items()):
            if outcome == shadow.DROPPED:
                rows.append((role, f"({outcome})", None, n, None, None, None, None, None, None))
        for (role, why), n in sorted(found.skips.items()):
            rows.append((role, f"(skipped: {why})", None, n, None, None, None, None, None, None))
        cols = [("role", TEXT), ("fingerprint", TEXT), ("statement", TEXT), ("samples", INT8)]
        cols += [("matches", INT8), ("divergences", INT8), ("inconclusive", INT8), ("errors", INT8)]
        cols += [("last_error", TEXT), ("last_seen", TEXT)]
        return _table(cols, rows)

    def _progress_note(self, role: str) -> str:
        monitor = self.app.migration
        mig = monitor.migrations.get(role)
        if mig is None or mig.state not in verbs.FOLLOWED:
            return ""
        error = monitor.progress_error.get(role)
        if error is not None:
            return f"; replication not read: {error}"
        found = monitor.progress.get(role)
        if found is None:
            return ""
        if found.direction == "none":
            return "; no replication found (run: migrate start again, or rollback)"
        stream = "streaming" if found.streaming else "apply worker not connected"
        return f"; tables copied: {found.tables_ready}/{found.tables_total}, {stream}"

    # -- MIGRATE role VERB -------------------------------------------------------------------------------
    def migrate(self, args: list[str]) -> Reply:
        if len(args) != 2:
            raise ProxyError(SYNTAX_ERROR, "usage: MIGRATE role PLAN|STATUS|START|CUTOVER|ROLLBACK|FINISH")
        role, verb = args[0].lower(), args[1].lower()
        if role not in DOMAINS:
            raise ProxyError(
                FEATURE_NOT_SUPPORTED, f"unknown domain role {args[0]!r}: one of {', '.join(DOMAINS)}"
            )
        if verb == "plan":
            return self._plan(role)
        if verb == "status":
            return self._status(role)
        found = next((v for v in OPERATOR_VERBS if v.value == verb), None)
        if found is None:
            raise ProxyError(SYNTAX_ERROR, f"unknown MIGRATE verb {args[1]!r}", hint="try SHOW HELP")
        return self._act(role, found)

    async def _status(self, role: str) -> bytes:
        await self.app.migration.follow(role)  # fresh progress (and copying -> streaming when done)
        return self.show_migration(role)

    async def _act(self, role: str, verb: Verb) -> bytes:
        """START, ROLLBACK, FINISH (proxy/migration/verbs.py): checked against the state stored in main,
        not this instance's last read of it."""
        try:
            rows = await verbs.carry_out(self.app.config, role, verb, self.app.migration)
        except verbs.VerbError as exc:
            raise ProxyError(exc.sqlstate, exc.message) from None
        finally:
            self.app.migration.refresh()
        return _table([(name, TEXT) for name in verbs.COLUMNS], [r.values() for r in rows], f"MIGRATE {verb}")

    async def _plan(self, role: str) -> bytes:
        try:
            facts = await plan.gather(self.app.config, role)
        except plan.PlanError as exc:
            raise ProxyError("08006", f"migrate {role} plan: {exc}") from None
        rows = plan.plan_rows(facts, self.app.joins.for_role(role))
        columns = [(name, PLAN_TYPES.get(name, TEXT)) for name in plan.COLUMNS]
        return _table(columns, [r.values() for r in rows])

    # -- actions -----------------------------------------------------------------------------------------
    def reload(self, args: list[str]) -> bytes:
        if not self.app.reload(os.environ):
            raise ProxyError("F0000", "reload failed: the previous configuration keeps serving (see the log)")
        return m.command_complete("RELOAD")

    def pause(self, args: list[str]) -> bytes:
        role = self._role(args)
        self.app.pause(role)
        return m.command_complete("PAUSE")

    def resume(self, args: list[str]) -> bytes:
        role = self._role(args)
        self.app.resume(role)
        return m.command_complete("RESUME")

    @staticmethod
    def _role(args: list[str]) -> str | None:
        if not args:
            return None
        role = args[0].lower()
        if role not in ROLES:
            raise ProxyError(FEATURE_NOT_SUPPORTED, f"unknown role {args[0]!r}: one of {', '.join(ROLES)}")
        return role
