"""The ``parafort-proxy`` command line: parse arguments and dispatch to a subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.config import Config, ConfigError, load_config
from proxy.config.render import render_config
from proxy.config.values import DOMAINS
from proxy.logs import setup_logging
from proxy.protocol.auth import UserlistError

MIGRATE_VERBS = ("plan", "start", "status", "cutover", "rollback", "finish")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parafort-proxy",
        description="PostgreSQL connection-routing proxy.",
    )
    parser.add_argument("--version", action="version", version=f"parafort-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="validate the configuration and print it resolved, secrets redacted")
    check.add_argument("--config", type=Path, help="YAML configuration file (default: environment only)")
    run = sub.add_parser("run", help="run the proxy (foreground; SIGTERM or Ctrl-C stops it)")
    run.add_argument("--config", type=Path, help="YAML configuration file (default: environment only)")
    run.add_argument(
        "--log-level", default=os.environ.get("PARAFORT_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"], help="log level (default: the config's log.level)",
    )  # fmt: skip
    explain = sub.add_parser(
        "explain", help="show where a statement would be routed, and why (no database needed)"
    )
    explain.add_argument("--config", type=Path, help="YAML configuration file (default: environment only)")
    explain.add_argument("--json", action="store_true", help="print JSON: kind, domains, role, reason")
    explain.add_argument(
        "--transaction",
        choices=["read_write", "read_only"],
        help="as the first statement of such a transaction",
    )
    explain.add_argument("sql", help="the SQL text")
    demo = sub.add_parser(
        "demo", help="start throwaway local PostgreSQL clusters with a ParaFort schema; Ctrl-C cleans up"
    )
    demo.add_argument(
        "--dir",
        type=Path,
        help="where the demo writes its configuration, removed on exit (default: parafort-demo in the "
        "temporary directory, e.g. /tmp/parafort-demo)",
    )
    migrate = sub.add_parser(
        "migrate",
        help="move a domain role's tables from main to its own database (plan works with no proxy running)",
    )
    migrate.add_argument("role", choices=DOMAINS, help="the domain role whose tables move")
    migrate.add_argument(
        "verb", choices=MIGRATE_VERBS, help="plan: from the catalogs; the others: through the running proxy"
    )
    migrate.add_argument("--config", type=Path, help="YAML configuration file (default: environment only)")
    migrate.add_argument("--user", help="admin console user (default: the first of auth.admin_users)")
    return parser


def _load(path: Path | None) -> Config | None:
    """The configuration, or None after printing one line per problem."""
    try:
        return load_config(path, os.environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"parafort-proxy: config error: {problem}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Print the resolved configuration (main() has validated it: one line per problem and exit 1 if bad).

    Then, when the domain map has bare entries, compare them with main's catalog (warnings on stderr; exit 0
    either way): a table of the same name in another schema is not in the domain. If main cannot be
    reached within a few seconds, a note says the comparison was skipped.
    """
    sys.stdout.write(render_config(config))
    sys.stdout.flush()
    from proxy.config.catalog import run_catalog_check  # noqa: PLC0415  (asyncpg only when checking)

    report = run_catalog_check(config)
    if report.skipped is not None:
        print(
            f"parafort-proxy: note: domain map not checked against main's catalog: {report.skipped}",
            file=sys.stderr,
        )
    for warning in report.warnings:
        print(f"parafort-proxy: warning: {warning}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from proxy.server import run  # noqa: PLC0415

    setup_logging(args.log_level or config.log.level, config.log.format)
    try:
        return run(config, args.config)
    except OSError as exc:
        print(
            f"parafort-proxy: cannot listen on {config.listen.host}:{config.listen.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    except UserlistError as exc:
        print(f"parafort-proxy: config error: auth.users_file: {exc}", file=sys.stderr)
        return 1


def cmd_explain(args: argparse.Namespace, config: Config) -> int:
    """Routing decision for one SQL string, as configured (every configured role assumed healthy)."""
    from proxy.router.classify import classify  # noqa: PLC0415
    from proxy.router.policy import Router, route_override  # noqa: PLC0415

    decision = Router(config).decide(
        classify(args.sql), override=route_override(args.sql), tx=args.transaction
    )
    if args.json:
        out = decision.as_json()
        if decision.role == "read_replica":
            out["consistency"] = _ryw_note(config)
        print(json.dumps(out))
    else:
        print(f"kind:    {decision.kind}")
        print(f"domains: {', '.join(decision.domains) or '(no tables)'}")
        print(f"role:    {decision.role or 'refused'}")
        print(f"reason:  {decision.reason}")
        if decision.role == "read_replica":
            print(f"consistency: {_ryw_note(config)}")
        if decision.sqlstate:
            print(f"error:   {decision.sqlstate} {decision.message}")
    return 0


def _ryw_note(config: Config) -> str:
    """What read-your-writes does to a read the router sends to a replica."""
    ryw = config.routing.read_your_writes
    if ryw.scope == "off":
        return "read-your-writes off: the replica serves it even right after a write"
    whose = {"user": "the same proxy user", "connection": "this connection", "global": "any client"}
    whose_writes = whose[ryw.scope]
    wait = f"waits up to {ryw.max_wait * 1000:g}ms for one" if ryw.max_wait > 0 else "does not wait"
    return (
        f"read-your-writes (scope {ryw.scope}): after a write by {whose_writes} (or with SET "
        f"parafort.min_lsn) it goes to a replica that has replayed that write, {wait}, else to main "
        "(main_for_consistency; SHOW CONSISTENCY on the admin console says why)"
    )


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    """``migrate ROLE VERB``: plan from the catalogs, the rest through the running proxy's admin console."""
    from proxy.migration.cli import run as run_migrate  # noqa: PLC0415  (asyncpg only when migrating)

    return run_migrate(config, args.role, args.verb, args.user, os.environ)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.dev.demo import DEMO_DIR, run_demo  # noqa: PLC0415  (not needed by the daemon)

    return run_demo(args.dir or DEMO_DIR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and ``python -m proxy``; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return cmd_demo(args)
    config = _load(args.config)  # every other command starts from the configuration
    if config is None:
        return 1
    commands = {"check": cmd_check, "run": cmd_run, "explain": cmd_explain, "migrate": cmd_migrate}
    return commands[args.command](args, config)


if __name__ == "__main__":
    sys.exit(main())
