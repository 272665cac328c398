"""``parafort-proxy migrate ROLE plan|start|status|cutover|rollback|finish``.

``plan`` reads the catalogs itself (no proxy needed). The other verbs act through the running proxy's admin
console (``MIGRATE role VERB``), logging in as ``--user`` or the first of ``auth.admin_users``, with the
password from ``PGPASSWORD`` or, failing that, the users file. Verbs this build cannot carry out say so in
one line and exit non-zero without touching anything.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping

from proxy.config import Config
from proxy.migration import console, plan
from proxy.migration.state import OPERATOR_VERBS
from proxy.protocol.auth import UserlistError, load_userlist

ANY_ADDRESS = ("", "0.0.0.0", "::", "*")
VERB_TIMEOUT = 600.0  # seconds the CLI waits for start, rollback or finish


class UsageError(Exception):
    """A CLI use that cannot work as configured (one line)."""


def console_target(config: Config, user: str | None, env: Mapping[str, str]) -> console.Target:
    """Where and as whom to reach the admin console of the proxy this configuration runs."""
    auth = config.auth
    who = user or (auth.admin_users[0] if auth.admin_users else None)
    if who is None:
        raise UsageError(
            "auth.admin_users is empty: migrate acts through the admin console, as one of those users"
        )
    password = env.get("PGPASSWORD")
    if password is None and auth.method != "trust":
        password = _stored_password(config, who)
    host = config.listen.host
    return console.Target(
        host="127.0.0.1" if host in ANY_ADDRESS else host,
        port=config.listen.port,
        database=config.admin.database,
        user=who,
        password=password,
        tls_cert=config.tls.cert_file if config.tls.mode == "require" else None,
    )


def _stored_password(config: Config, user: str) -> str | None:
    """The user's password as the proxy knows it: the users file's entry (plain text, or an md5 hash that
    md5 authentication accepts), or with no users file main's own login."""
    if config.auth.users_file is None:
        main = config.roles.main.dsn
        return main.password if main is not None and main.user == user else None
    try:
        users = load_userlist(str(config.auth.users_file))
    except (OSError, UserlistError) as exc:
        raise UsageError(f"auth.users_file: {exc}") from None
    return users.get(user)


def run(config: Config, role: str, verb: str, user: str | None, env: Mapping[str, str]) -> int:
    """Carry out one migrate command; returns the exit code (errors are one line on stderr)."""
    try:
        if verb == "plan":
            facts = asyncio.run(plan.gather(config, role))
            rows = plan.plan_rows(facts, None)
            sys.stdout.write(plan.render(plan.COLUMNS, [r.values() for r in rows]))
            return 0
        operator = next((v for v in OPERATOR_VERBS if v.value == verb), None)
        target = console_target(config, user, env)
        # start runs pg_dump and creates the replication: longer than a look-up on a loaded machine.
        seconds = VERB_TIMEOUT if operator is not None else console.TIMEOUT
        result = asyncio.run(console.query(target, f"MIGRATE {role} {verb.upper()}", seconds))
    except (plan.PlanError, console.ConsoleError, UsageError) as exc:
        prefix = f"migrate {role} {verb}: "
        text = str(exc)
        print(f"parafort-proxy: {text if text.startswith(prefix) else prefix + text}", file=sys.stderr)
        return 1
    sys.stdout.write(plan.render(result.columns, result.rows))
    return 0
