"""Per-client session state that must follow the client from one pooled upstream connection to the next."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from proxy.router.classify import SessionChange

# Startup parameters that are not session settings (or that the upstream's own DSN decides).
NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings on)."""
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """A SQL identifier, quoted only when needed."""
    if name.replace("_", "a").replace(".", "a").isalnum() and name.islower() and not name[0].isdigit():
        return name
    return '"' + name.replace('"', '""') + '"'


def startup_values(params: dict[str, str]) -> dict[str, str]:
    """The settings a client asked for at startup (parameters and ``options=-c name=value``), by name;
    the proxy's own (``parafort.*``, see ``proxy_settings``) are not PostgreSQL's."""
    return {k: v for k, v in _startup_values(params).items() if not k.startswith(PROXY_PREFIX)}


def proxy_settings(params: dict[str, str]) -> dict[str, str]:
    """The proxy's own settings a client passed at startup (``parafort.min_lsn``), by name."""
    return {k: v for k, v in _startup_values(params).items() if k.startswith(PROXY_PREFIX)}


PROXY_PREFIX = "parafort."


def _startup_values(params: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in params.items():
        if name not in NOT_SETTINGS:
            values[name.lower()] = value
    options = params.get("options", "").split()
    for i, opt in enumerate(options):
        if opt == "-c":
            pair = options[i + 1] if i + 1 < len(options) else ""
        elif opt.startswith(("--", "-c")):
            pair = opt[2:]
        else:
            pair = ""
        name, eq, value = pair.partition("=")
        if eq and name:
            values[name.replace("-", "_").lower()] = value.replace(chr(92) + " ", " ")
    return values


def startup_settings(params: dict[str, str]) -> dict[str, str]:
    """The client's startup settings as replayable SET statements, by name."""
    return {
        name: f"SET {quote_ident(name)} TO {quote_literal(value)}"
        for name, value in startup_values(params).items()
    }


@dataclass(frozen=True, slots=True)
class PreparedStatement:
    """A protocol-level prepared statement: its SQL, parameter types, and the name used upstream.

    The upstream name is derived from the content, so identical statements from different clients share
    one server-side statement, and different statements never collide.
    """

    sql: str
    param_oids: tuple[int, ...]
    upstream_name: str
    name_field: bytes = b""  # the upstream name as a NUL-terminated protocol string

    @classmethod
    def make(cls, sql: str, param_oids: tuple[int, ...]) -> PreparedStatement:
        digest = hashlib.blake2b(sql.encode("utf-8", "surrogateescape"), digest_size=12)
        digest.update(repr(param_oids).encode())
        name = "pf_" + digest.hexdigest()
        return cls(sql, param_oids, name, name.encode() + b"\0")


@dataclass
class Session:
    """What the client believes its session is: settings, prepared statements, reported parameters.

    ``settings`` maps a parameter name to the SET statement that gives it the client's value; the key
    ``version`` changes whenever settings do, so an upstream connection can tell cheaply whether it
    already matches.
    """

    baseline: dict[str, str]
    settings: dict[str, str] = field(default_factory=dict)
    statements: dict[str, PreparedStatement] = field(default_factory=dict)
    version: int = 0
    # Changes made by statements whose outcome is not known yet (``stage``); empty between them, which the
    # data path reads as a plain attribute (``has_staged`` is the same question as a property).
    staged: list[SessionChange] = field(default_factory=list)
    # The value of each reported parameter (ParameterStatus) as the client last heard it: at login, then
    # from its upstreams. A setting the proxy replays is reported to it only where it hears something new.
    heard: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.settings = dict(self.baseline)

    def stage(self, changes: list[SessionChange]) -> None:
        """Remember changes made by a statement whose outcome is not known yet.

        Savepoint operations scope them: ROLLBACK TO drops what was staged after its savepoint, RELEASE
        folds the savepoint into its parent (so it can no longer be rolled back to).
        """
        pending = self.staged
        for change in changes:
            if change.op in ("set", "savepoint"):
                pending.append(change)
            else:
                mark = _last_savepoint(pending, change.name)
                if mark is None:
                    continue  # a savepoint from before the proxy was tracking: nothing staged after it
                if change.op == "rollback_to":
                    del pending[mark + 1 :]
                else:  # release: this savepoint and the ones nested in it go away, their changes stay
                    pending[:] = [c for i, c in enumerate(pending) if i < mark or c.op == "set"]

    def discard_staged(self) -> None:
        """The statement failed or its transaction rolled back: its changes never happened."""
        self.staged.clear()

    @property
    def has_staged(self) -> bool:
        return bool(self.staged)

    @property
    def has_staged_settings(self) -> bool:
        return any(c.op == "set" for c in self.staged)

    def staged_settings(self) -> list[SessionChange]:
        """The parameter changes staged so far, in order (savepoints already accounted for)."""
        return [c for c in self.staged if c.op == "set"]

    def commit_staged(self, upstream: dict[str, str]) -> None:
        """The changes took effect (the statement succeeded outside, or its transaction committed).

        ``upstream`` is the applied-settings map of the connection that ran them; it is updated too (an
        upstream connection's defaults are the server's, not this client's startup parameters).
        """
        if not self.staged:
            return
        for change in self.staged:
            if change.op != "set":
                continue
            if change.name is None:
                self.settings = dict(self.baseline)
                upstream.clear()
            elif change.sql is None:
                if change.name in self.baseline:
                    self.settings[change.name] = self.baseline[change.name]
                else:
                    self.settings.pop(change.name, None)
                upstream.pop(change.name, None)
            else:
                self.settings[change.name] = change.sql
                upstream[change.name] = change.sql
        self.staged.clear()
        self.version += 1

    def sync_sql(self, upstream: dict[str, str]) -> str:
        """SQL that turns an upstream connection's applied settings into this session's ('' if equal)."""
        if upstream == self.settings:
            return ""
        parts = [f"RESET {quote_ident(name)}" for name in upstream if name not in self.settings]
        parts += [sql for name, sql in self.settings.items() if upstream.get(name) != sql]
        return "; ".join(parts)


def _last_savepoint(pending: list[SessionChange], name: str | None) -> int | None:
    for i in range(len(pending) - 1, -1, -1):
        if pending[i].op == "savepoint" and pending[i].name == name:
            return i
    return None
