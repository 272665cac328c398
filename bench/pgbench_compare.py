"""Side-by-side pgbench: PostgreSQL directly vs PgBouncer vs the bare forwarder (``ceiling``) vs Pgpool-II vs
the ParaFort proxy.

One throwaway primary and, when a routing target (pgpool, proxy) is measured, a streaming replica of it;
``pgbench -i`` once on the primary, a wait until the replica has replayed it, then every target is started and
each round runs every (workload, mode, clients) cell once per target. The order of the targets rotates from
round to round (A B C D, B C D A, ...) so that drift on the machine (thermal, caches, noisy neighbours)
spreads over all of them; ratios are taken within a round, then the median across rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from bench import report
from bench.cpu import CpuSampler
from bench.targets import (
    DEFAULT_PGBOUNCER,
    DEFAULT_PGPOOL,
    HOST,
    PGPOOL_CHILD_MARGIN,
    POOL_SIZE,
    CeilingTarget,
    Credentials,
    DirectTarget,
    PgBouncerTarget,
    PgpoolTarget,
    ProxyTarget,
    Target,
    TargetError,
    Tools,
    client_env,
    deep_merge,
    make_site,
    pgpool_version,
    proxy_setting,
)
from proxy.dev.cluster import Cluster, DevClusterError, DevClusters, find_bindir

ALL_TARGETS = ("direct", "pgbouncer", "ceiling", "pgpool", "proxy")
ROUTING_TARGETS = ("pgpool", "proxy")  # these need the streaming replica
MODES = ("simple", "extended", "prepared")
WORKLOADS = ("select-only", "tpcb-like")
# Without --mode: select-only in both protocols, tpcb-like (mostly writes) in the extended one.
DEFAULT_CELLS = (("select-only", "extended"), ("select-only", "simple"), ("tpcb-like", "extended"))
DEFAULT_CLIENTS = ("16", "64")
RATIOS = (
    ("proxy", "pgbouncer"),
    ("proxy", "ceiling"),
    ("proxy", "pgpool"),
    ("proxy", "direct"),
    ("ceiling", "pgbouncer"),
    ("pgbouncer", "direct"),
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
JOBS = 2  # pgbench threads: sized for a 2-core machine
SUPERUSER_RESERVED = 3  # PostgreSQL's superuser_reserved_connections default
CONNECTION_SLACK = 20  # psql checks, pgbench -i, the replica's walsender, health probes

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
LATENCY_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


class BenchError(RuntimeError):
    """The benchmark cannot run at all (a tool is missing, a target does not start)."""


# -- options ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Cell:
    """One line of the matrix: pgbench's built-in script, its query protocol and the client count."""

    workload: str
    mode: str
    clients: int

    @property
    def label(self) -> str:
        return f"{self.workload} -M {self.mode} -c {self.clients}"


@dataclass(frozen=True)
class Options:
    targets: tuple[str, ...]
    cells: tuple[Cell, ...]
    duration: int
    rounds: int
    scale: int
    warmup: int
    json_path: Path
    require_pgbouncer: bool
    require_pgpool: bool
    pgbouncer: Path
    pgpool: Path
    docs: Path | None
    quick: bool = False
    proxy_settings: tuple[str, ...] = ()

    @property
    def clients(self) -> tuple[int, ...]:
        return tuple(sorted({c.clients for c in self.cells}))


def _split(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Repeatable options that also take comma lists: ``--mode simple --mode extended,prepared``."""
    out: list[str] = []
    for value in values or default:
        for raw in value.split(","):
            item = raw.strip()
            if item and item not in out:
                out.append(item)
    return out


def build_cells(
    workloads: Sequence[str], modes: Sequence[str] | None, clients: Sequence[int]
) -> tuple[Cell, ...]:
    """The matrix: every workload x mode x clients; with no modes given, DEFAULT_CELLS' pairs."""
    if modes:
        pairs = [(w, m) for w in workloads for m in modes]
    else:
        pairs = [(w, m) for w, m in DEFAULT_CELLS if w in workloads]
    return tuple(Cell(w, m, c) for w, m in pairs for c in clients)


def add_pgbench_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--targets", action="append", metavar="LIST", help=f"{','.join(ALL_TARGETS)} (default: all)")
    add("--workload", action="append", metavar="LIST",
        help="pgbench built-in script: select-only, tpcb-like (default: both)")  # fmt: skip
    add("--mode", action="append", metavar="MODE",
        help="pgbench -M: simple, extended, prepared (default: select-only in extended and simple, "
             "tpcb-like in extended)")  # fmt: skip
    add("--clients", action="append", metavar="N", help="pgbench -c (default 16,64)")
    add("--duration", type=int, metavar="S", help="seconds per run (default 10; --quick: 4)")
    add("--rounds", type=int, metavar="R", help="rounds (default 3; --quick: 2)")
    add("--scale", type=int, default=10, metavar="N", help="pgbench -i -s (default 10)")
    add("--warmup", type=int, metavar="S", help="unmeasured seconds per target first (default 3; --quick: 2)")
    add("--quick", action="store_true", help="short runs: --duration 4 --rounds 2")
    add_output_arguments(p)
    add("--require-pgbouncer", action="store_true", help="fail instead of skipping a missing PgBouncer")
    add("--require-pgpool", action="store_true", help="fail instead of skipping a missing Pgpool-II")
    add("--pgbouncer", type=Path, default=DEFAULT_PGBOUNCER, metavar="PATH", help="PgBouncer binary")
    add("--pgpool", type=Path, default=DEFAULT_PGPOOL, metavar="PATH", help="Pgpool-II binary")
    add("--proxy-set", action="append", default=[], metavar="KEY=VALUE",
        help="extra proxy YAML setting, e.g. statements.cache_unnamed=true (repeatable)")  # fmt: skip


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--docs``, ``--no-docs``: where a benchmark's results go (see ``publish``)."""
    add = p.add_argument
    add("--json", type=Path, metavar="PATH", help="results file (default bench/results/<UTC time>-*.json)")
    add("--docs", type=Path, default=DOCS_PATH, metavar="PATH",
        help="markdown file whose bench:* blocks are refreshed (default docs/performance.md)")  # fmt: skip
    add("--no-docs", action="store_true", help="do not touch docs/performance.md")


def results_path(kind: str) -> Path:
    """bench/results/<UTC time>-KIND.json"""
    return RESULTS_DIR / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{kind}.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="pgbench: PostgreSQL direct vs PgBouncer vs a bare asyncio forwarder (ceiling) vs "
        "Pgpool-II vs our proxy (reads routed to a streaming replica). Subcommands: pgbench (default), "
        "memory, classify, all.",
        epilog="--targets, --workload, --mode and --clients are repeatable and take comma lists.",
    )
    add_pgbench_arguments(p)
    return p


def options_from(p: argparse.ArgumentParser, args: argparse.Namespace, kind: str = "pgbench") -> Options:
    targets = _split(args.targets, ALL_TARGETS)
    workloads = _split(args.workload, WORKLOADS)
    modes = _split(args.mode, []) if args.mode else None
    if bad := [t for t in targets if t not in ALL_TARGETS]:
        p.error(f"unknown target(s) {', '.join(bad)}; choose from {', '.join(ALL_TARGETS)}")
    if bad := [w for w in workloads if w not in WORKLOADS]:
        p.error(f"unknown workload(s) {', '.join(bad)}; choose from {', '.join(WORKLOADS)}")
    if bad := [m for m in modes or [] if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    try:
        clients = [int(c) for c in _split(args.clients, DEFAULT_CLIENTS)]
    except ValueError:
        p.error("--clients takes whole numbers")
    duration = args.duration if args.duration is not None else (4 if args.quick else 10)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if min(clients) < 1 or duration < 1 or rounds < 1 or args.scale < 1 or warmup < 0:
        p.error("--clients, --duration, --rounds and --scale must be at least 1, --warmup at least 0")
    for setting in args.proxy_set:
        try:
            proxy_setting(setting)
        except (ValueError, yaml.YAMLError) as exc:
            p.error(f"--proxy-set: {exc}")
    cells = build_cells(workloads, modes, clients)
    if not cells:
        p.error("no (workload, mode) pair left: give --mode with tpcb-like alone")
    return Options(
        targets=tuple(targets), cells=cells, duration=duration, rounds=rounds, scale=args.scale,
        warmup=warmup, json_path=args.json or results_path(kind),
        require_pgbouncer=args.require_pgbouncer, require_pgpool=args.require_pgpool,
        pgbouncer=args.pgbouncer, pgpool=args.pgpool, docs=None if args.no_docs else args.docs,
        quick=args.quick, proxy_settings=tuple(args.proxy_set),
    )  # fmt: skip


def parse_options(argv: Sequence[str] | None) -> Options:
    p = parser()
    return options_from(p, p.parse_args(argv))


# -- one pgbench run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One pgbench run against one target; ``error`` is None when it counts."""

    round: int
    target: str
    workload: str
    mode: str
    clients: int
    duration: int
    command: list[str]
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    exit_code: int | None = None
    error: str | None = None
    elapsed_s: float = 0.0
    started_at: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    # Microseconds of CPU per transaction by process group (bench/cpu.py): pooler, postgres, pgbench, machine.
    cpu_us_per_tx: dict[str, dict[str, float]] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cell(self) -> Cell:
        return Cell(self.workload, self.mode, self.clients)


def pgbench_command(
    tools: Tools, creds: Credentials, port: int, *, workload: str, mode: str, clients: int, seconds: int
) -> list[str]:
    """The measured command line; the password travels in PGPASSWORD, never on the command line."""
    return [
        tools.pgbench, "-h", HOST, "-p", str(port), "-U", creds.user, "-n", "-b", workload, "-M", mode,
        "-c", str(clients), "-j", str(min(JOBS, clients)), "-T", str(seconds), creds.database,
    ]  # fmt: skip


def command_template(command: Sequence[str]) -> str:
    """A pgbench/psql command line with the binary's directory, port, user and database made generic."""
    out: list[str] = []
    for i, arg in enumerate(command):
        prev = command[i - 1] if i else ""
        if i == 0:
            out.append(Path(arg).name)
        elif prev == "-p":
            out.append("$PORT")
        elif prev == "-U":
            out.append("$PGUSER")
        elif prev == "-h":
            out.append("$HOST")
        elif i == len(command) - 1 and not arg.startswith("-") and prev not in ("-b", "-M", "-T", "-s"):
            out.append("$PGDATABASE")
        else:
            out.append(arg)
    return " ".join(out)


def parse_output(run: Run, stdout: str, stderr: str, creds: Credentials) -> None:
    """Fill TPS, latency and failure counts from pgbench's report, and decide whether the run is an error."""
    if m := TPS_RE.search(stdout):
        run.tps = float(m.group(1))
    if m := LATENCY_RE.search(stdout):
        run.latency_ms = float(m.group(1))
    if m := PROCESSED_RE.search(stdout):
        run.transactions = int(m.group(1))
    if m := FAILED_RE.search(stdout):
        run.failed_transactions = int(m.group(1))
    errors = [creds.redact(line) for line in stderr.splitlines() if line.strip()]
    run.stderr_tail = errors[-10:]
    problems = []
    if run.exit_code:
        problems.append(f"pgbench exit code {run.exit_code}")
    if run.failed_transactions:
        problems.append(f"{run.failed_transactions} failed transactions")
    if run.tps is None:
        problems.append("no 'tps = ... (without initial connection time)' line")
    if problems:
        first = next((e for e in errors if "error" in e.lower()), errors[0] if errors else "")
        run.error = "; ".join(problems) + (f": {first}" if first else "")


def run_pgbench(run: Run, creds: Credentials, sampler: CpuSampler | None = None) -> Run:
    run.started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.monotonic()
    if sampler is not None:
        sampler.start()
    try:
        proc = subprocess.run(
            run.command, env=client_env(creds), capture_output=True, text=True,
            timeout=run.duration + 60, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        run.error = f"pgbench did not finish within {run.duration + 60}s (killed)"
        run.elapsed_s = round(time.monotonic() - start, 2)
        return run
    run.elapsed_s = round(time.monotonic() - start, 2)
    run.exit_code = proc.returncode
    parse_output(run, proc.stdout, proc.stderr, creds)
    if sampler is not None and run.ok and run.transactions:
        run.cpu_us_per_tx = sampler.stop(run.transactions)
    return run


# -- summary ----------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


Skips = dict[tuple[str, Cell], str]


def paired_ratios(runs: Sequence[Run], num: str, den: str, rounds: int) -> list[float]:
    """num TPS / den TPS within each round where both runs of the cell are ok (``runs``: one cell's)."""
    paired = []
    for rnd in range(1, rounds + 1):
        a = next((r for r in runs if r.round == rnd and r.target == num and r.ok), None)
        b = next((r for r in runs if r.round == rnd and r.target == den and r.ok), None)
        if a and b and a.tps and b.tps:
            paired.append(a.tps / b.tps)
    return paired


def median_cpu(runs: Sequence[Run]) -> dict[str, dict[str, float]] | None:
    """Per process group and kind (user, system, ...): the median over the runs that were sampled."""
    sampled = [r.cpu_us_per_tx for r in runs if r.cpu_us_per_tx]
    if not sampled:
        return None
    out: dict[str, dict[str, float]] = {}
    for group, kinds in sampled[0].items():
        out[group] = {
            kind: round(statistics.median(s[group][kind] for s in sampled if group in s), 1) for kind in kinds
        }
    return out


def summarize(runs: Sequence[Run], opts: Options, skipped: Skips) -> list[dict[str, Any]]:
    """Per cell: median TPS and latency per target, and the median of per-round paired ratios."""
    cells: list[dict[str, Any]] = []
    for cell in opts.cells:
        cell_runs = [r for r in runs if r.cell == cell]
        per_target: dict[str, Any] = {}
        for target in opts.targets:
            mine = [r for r in cell_runs if r.target == target]
            good = [r for r in mine if r.ok]
            tps = [r.tps for r in good if r.tps is not None]
            lat = [r.latency_ms for r in good if r.latency_ms is not None]
            per_target[target] = {
                "runs": len(mine),
                "errors": len(mine) - len(good),
                "skipped": skipped.get((target, cell)),
                "median_tps": _median(tps),
                "min_tps": min(tps) if tps else None,
                "max_tps": max(tps) if tps else None,
                "median_latency_ms": _median(lat),
                "median_cpu_us_per_tx": median_cpu(good),
            }
        ratios: dict[str, Any] = {}
        for num, den in RATIOS:
            if num not in opts.targets or den not in opts.targets:
                continue
            if skipped.get((num, cell)) or skipped.get((den, cell)):
                ratios[f"{num}/{den}"] = {"median": None, "skipped": True}
                continue
            paired = paired_ratios(cell_runs, num, den, opts.rounds)
            ratios[f"{num}/{den}"] = {
                "median": _median(paired),
                "min": min(paired) if paired else None,
                "max": max(paired) if paired else None,
                "rounds": len(paired),
                "per_round": [round(x, 4) for x in paired],
            }
        cells.append({**asdict(cell), "targets": per_target, "ratios": ratios})
    return cells


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(cells: Sequence[dict[str, Any]], opts: Options) -> None:
    print()
    print(
        f"== summary: {opts.rounds} round(s) x {opts.duration}s, pgbench -n -j {JOBS}, scale {opts.scale} =="
    )
    for cell in cells:
        print()
        print(f"workload={cell['workload']} mode={cell['mode']} clients={cell['clients']}")
        print(
            f"  {'target':<10} {'ok/runs':>7} {'median TPS':>12} {'min..max TPS':>21} {'median lat ms':>14}"
        )
        for name, t in cell["targets"].items():
            if t["skipped"]:
                print(f"  {name:<10} skipped: {t['skipped']}")
                continue
            spread = f"{_fmt(t['min_tps'], ',.0f')}..{_fmt(t['max_tps'], ',.0f')}"
            ok = f"{t['runs'] - t['errors']}/{t['runs']}"
            errors = f"  ({t['errors']} error(s))" if t["errors"] else ""
            print(
                f"  {name:<10} {ok:>7} {_fmt(t['median_tps'], ',.1f'):>12} {spread:>21} "
                f"{_fmt(t['median_latency_ms'], '.3f'):>14}{errors}"
            )
        for label, r in cell["ratios"].items():
            if r.get("skipped"):
                print(f"  {label:<17} -  (a target was skipped)")
            elif r["median"] is None:
                print(f"  {label:<17} -  (no round with both runs ok)")
            else:
                print(
                    f"  {label:<17} {r['median']:.3f}  (paired per round, median of {r['rounds']}; "
                    f"range {r['min']:.3f}..{r['max']:.3f})"
                )


# -- the whole benchmark ----------------------------------------------------------------------------------


def _version_line(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else ""


def proxy_source() -> str:
    """The checkout the measured proxy runs from: commit, plus "+ uncommitted changes" under proxy/."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "proxy"],
                               capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def machine_facts() -> dict[str, Any]:
    """What the machine is, independent of the clusters (also used by the memory benchmark)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "proxy_source": proxy_source(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_gib": mem_total,
        "loadavg_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def machine_info(pg: DevClusters, tools: Tools) -> dict[str, Any]:
    return {
        **machine_facts(),
        "postgres": pg.main.psql("SELECT version()"),
        "max_connections": int(pg.main.psql("SHOW max_connections")),
        "pgbench": _version_line([tools.pgbench, "--version"]),
    }


def initialize(pg: DevClusters, tools: Tools, creds: Credentials, scale: int) -> list[str]:
    """``pgbench -i -s scale`` as the cluster's own user over TCP; returns the command line."""
    cmd = [tools.pgbench, "-i", "-q", "-s", str(scale), "-h", HOST, "-p", str(pg.main.port), "-U", creds.user,
           creds.database]  # fmt: skip
    print(f"bench: pgbench -i -s {scale} on main (port {pg.main.port}) ...", flush=True)
    start = time.monotonic()
    proc = subprocess.run(
        cmd, env=client_env(creds), capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        raise BenchError("pgbench -i failed:\n" + creds.redact((proc.stdout + proc.stderr).strip()[-2000:]))
    print(f"bench: initialized in {time.monotonic() - start:.1f}s", flush=True)
    return cmd


# Server connections each pooling target keeps open while the others run.
HELD = {"pgbouncer": POOL_SIZE, "proxy": POOL_SIZE + 2}
# These open one server connection per client for the length of their own run only (never two at once).
PER_CLIENT = ("direct", "ceiling")


def connections_needed(opts: Options) -> int:
    """max_connections for the primary (and replica) so that every target's pool plus the largest run of a
    target without a pool (direct, ceiling) fit at once: the poolers keep their server connections open
    while the others run."""
    biggest = max(opts.clients)
    need = SUPERUSER_RESERVED + CONNECTION_SLACK
    if any(name in PER_CLIENT for name in opts.targets):
        need += biggest
    for name in opts.targets:
        if name not in PER_CLIENT:
            need += HELD.get(name, biggest + PGPOOL_CHILD_MARGIN)
    return max(200, math.ceil(need / 50) * 50)


def raise_max_connections(pg: DevClusters, wanted: int) -> int:
    """ALTER SYSTEM max_connections on main (before any replica is cloned: the copy inherits it)."""
    current = int(pg.main.psql("SHOW max_connections"))
    if wanted > current:
        print(f"bench: max_connections {current} -> {wanted} on main (restart)", flush=True)
        pg.main.psql(f"ALTER SYSTEM SET max_connections = {wanted}")
        pg.main.restart()
        return wanted
    return current


def wait_caught_up(main: Cluster, replica: Cluster, timeout: float = 300) -> float:
    """Block until ``replica`` has replayed everything main has flushed; returns the seconds waited."""
    start = time.monotonic()
    lsn = main.psql(
        "SET synchronous_commit TO on; SELECT txid_current(); SELECT pg_current_wal_flush_lsn()"
    ).splitlines()[-1]
    query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
    while replica.psql(query) != "t":
        if time.monotonic() - start > timeout:
            raise BenchError(f"the replica did not replay up to {lsn} within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - start


def make_targets(
    opts: Options,
    pg: DevClusters,
    *,
    replica: Cluster | None,
    tools: Tools,
    creds: Credentials,
    workdir: Path,
) -> list[Target]:
    targets: list[Target] = []
    for name in opts.targets:
        if name == "direct":
            targets.append(DirectTarget(pg.main.port, pg.main.psql("SHOW server_version")))
            continue
        site = make_site(workdir, name, creds, tools)
        if name == "pgbouncer":
            targets.append(
                PgBouncerTarget(site, binary=opts.pgbouncer, upstream_port=pg.main.port,
                                as_postgres=pg.runner.as_postgres)
            )  # fmt: skip
            continue
        if name == "ceiling":
            targets.append(CeilingTarget(site, upstream_port=pg.main.port))
            continue
        assert replica is not None
        if name == "pgpool":
            targets.append(
                PgpoolTarget(site, binary=opts.pgpool, primary_port=pg.main.port, replica_port=replica.port,
                             max_clients=max(opts.clients), as_postgres=pg.runner.as_postgres)
            )  # fmt: skip
        else:
            extra: dict[str, Any] = {}
            for setting in opts.proxy_settings:
                extra = deep_merge(extra, proxy_setting(setting))
            targets.append(
                ProxyTarget(site, main_dsn=pg.main.dsn, replica_dsn=replica.dsn, extra_config=extra)
            )
    return targets


@contextlib.contextmanager
def running(targets: Sequence[Target]) -> Iterator[None]:
    """Start every target in turn; stop them all on the way out, also when one fails to start."""
    try:
        for target in targets:
            print(f"bench: starting {target.name} ...", flush=True)
            try:
                target.start()
            except TargetError as exc:
                raise BenchError(f"target {target.name} failed to start: {exc}") from None
            print(
                f"bench: {target.name} ready on {HOST}:{target.port} (version {target.version})", flush=True
            )
        yield
    finally:
        for target in reversed(targets):
            target.stop()  # also those interrupted half-way through start()


def plan_skips(opts: Options, targets: Sequence[Target], max_connections: int) -> Skips:
    """(target, cell) pairs that cannot run, with the reason (printed and recorded)."""
    skipped: Skips = {}
    held = sum(t.server_connections() for t in targets)
    room = max_connections - SUPERUSER_RESERVED - held - 5
    for target in targets:
        for cell in opts.cells:
            reason = target.supports(cell.mode)
            if reason is None and target.connection_per_client and cell.clients > room:
                reason = (
                    f"{cell.clients} clients > max_connections {max_connections} - {SUPERUSER_RESERVED} "
                    f"reserved - {held} held by the other targets' pools - 5"
                )
            if reason:
                skipped[(target.name, cell)] = reason
    return skipped


def measure(opts: Options, targets: Sequence[Target], tools: Tools, creds: Credentials,
            skipped: Skips, *, postmasters: Sequence[int] = ()) -> list[Run]:  # fmt: skip
    if opts.warmup:
        for target in targets:
            # Fills the OS cache and lets the poolers open their server connections; not recorded.
            sizes = [c.clients for c in opts.cells if (target.name, c) not in skipped]
            clients = max(sizes, default=min(opts.clients))
            cmd = pgbench_command(tools, creds, target.port, workload="select-only", mode="simple",
                                  clients=clients, seconds=opts.warmup)  # fmt: skip
            warm = run_pgbench(Run(0, target.name, "select-only", "simple", clients, opts.warmup, cmd), creds)
            note = f"{warm.tps:,.0f} tps" if warm.ok and warm.tps else f"ERROR {warm.error}"
            print(f"bench: warm-up {target.name} {opts.warmup}s: {note}", flush=True)
    runs: list[Run] = []
    for rnd in range(1, opts.rounds + 1):
        shift = (rnd - 1) % len(targets)
        order = [*targets[shift:], *targets[:shift]]
        print(f"-- round {rnd}/{opts.rounds}: {' '.join(t.name for t in order)}", flush=True)
        for cell in opts.cells:
            for target in order:
                if (target.name, cell) in skipped:
                    continue
                cmd = pgbench_command(
                    tools, creds, target.port, workload=cell.workload, mode=cell.mode,
                    clients=cell.clients, seconds=opts.duration,
                )  # fmt: skip
                run = Run(rnd, target.name, cell.workload, cell.mode, cell.clients, opts.duration, cmd)
                sampler = CpuSampler({"pooler": target.pids(), "postgres": list(postmasters)})
                runs.append(run_pgbench(run, creds, sampler))
                print_run(run, opts.rounds)
    return runs


def print_run(run: Run, rounds: int) -> None:
    head = (
        f"[round {run.round}/{rounds}] {run.target:<10} {run.workload:<11} {run.mode:<8} c={run.clients:<4}"
    )
    numbers = f"tps {_fmt(run.tps, '12,.1f')}  lat {_fmt(run.latency_ms, '7.3f')} ms"
    print(f"{head} {numbers}" + (f"  ERROR: {run.error}" if run.error else ""), flush=True)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def publish(doc: dict[str, Any], args: argparse.Namespace, kind: str, markdown: str) -> None:
    """A subcommand's results: ``doc`` to ``--json`` (default bench/results/<UTC time>-KIND.json) and
    ``markdown`` into docs/performance.md's ``bench:KIND`` block (``--docs``) unless ``--no-docs``."""
    path = args.json or results_path(kind)
    write_json(path, doc)
    print(f"bench {kind}: results written to {path}")
    if not args.no_docs:
        report.update_docs(args.docs, {kind: markdown})
        print(f"bench {kind}: {args.docs} refreshed")


def drop_missing(opts: Options) -> Options:
    """Leave out a pooler that is not installed (or fail with --require-*)."""
    wanted = list(opts.targets)
    for name, binary, required, package in (
        ("pgbouncer", opts.pgbouncer, opts.require_pgbouncer, "pgbouncer"),
        ("pgpool", opts.pgpool, opts.require_pgpool, "pgpool2"),
    ):
        if name in wanted and not binary.exists():
            msg = (f"{name} not found at {binary}: run `make bench` or "
                   f"`sudo apt-get install {package}` to include it")  # fmt: skip
            if required:
                raise BenchError(msg)
            print(f"bench: {msg}; skipping the {name} target", flush=True)
            wanted.remove(name)
    if not wanted:
        raise BenchError("no target left to measure")
    return dataclasses.replace(opts, targets=tuple(wanted))


def run_benchmark(opts: Options) -> tuple[int, dict[str, Any]]:
    """The pgbench comparison: (exit code, the results document with the password redacted)."""
    opts = drop_missing(opts)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    tools = Tools.find(find_bindir())
    routing = any(t in ROUTING_TARGETS for t in opts.targets)
    print(
        "bench: starting a PostgreSQL primary" + (" and a streaming replica" if routing else ""), flush=True
    )
    with DevClusters.start(("main",)) as pg, tempfile.TemporaryDirectory(prefix="parafort-bench-") as tmp:
        workdir = Path(tmp)
        if pg.runner.as_postgres:
            # PgBouncer and Pgpool-II run as postgres and must reach their subdirectories.
            workdir.chmod(0o711)
        creds = Credentials(pg.main.user, pg.main.password, pg.main.database)
        raise_max_connections(pg, connections_needed(opts))
        replica = pg.add_replica("read_replica") if routing else None
        machine = machine_info(pg, tools)
        if "pgpool" in opts.targets:
            machine["pgpool"] = pgpool_version(opts.pgpool)
        init_cmd = initialize(pg, tools, creds, opts.scale)
        if replica is not None:
            waited = wait_caught_up(pg.main, replica)
            print(f"bench: replica caught up ({waited:.1f}s after pgbench -i)", flush=True)
        targets = make_targets(opts, pg, replica=replica, tools=tools, creds=creds, workdir=workdir)
        skipped = plan_skips(opts, targets, machine["max_connections"])
        for (name, cell), reason in skipped.items():
            print(f"bench: skipping {name} {cell.label}: {reason}", flush=True)
        postmasters = [c.pid for c in (pg.main, replica) if c is not None and c.pid is not None]
        with running(targets):
            runs = measure(opts, targets, tools, creds, skipped, postmasters=postmasters)
        machine["loadavg_at_end"] = list(os.getloadavg())
    cells = summarize(runs, opts, skipped)
    print_summary(cells, opts)
    doc = {
        "benchmark": "pgbench: direct vs pgbouncer vs ceiling vs pgpool vs proxy",
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            **asdict(opts),
            "cells": [asdict(c) for c in opts.cells],
            "json_path": str(opts.json_path),
            "pgbouncer": str(opts.pgbouncer),
            "pgpool": str(opts.pgpool),
            "docs": str(opts.docs) if opts.docs else None,
            "jobs": JOBS,
        },
        "machine": machine,
        "targets": {t.name: t.describe() for t in targets},
        "commands": {
            "init": command_template(init_cmd),
            "runs": sorted({command_template(r.command) for r in runs}),
            "password": "passed in PGPASSWORD, never on a command line",
        },
        "skipped": [{"target": n, **asdict(c), "reason": why} for (n, c), why in skipped.items()],
        "runs": [asdict(r) for r in runs],
        "summary": cells,
    }
    doc = json.loads(creds.redact(json.dumps(doc)))
    failed = [r for r in runs if not r.ok]
    if failed:
        print(
            f"bench: {len(failed)} of {len(runs)} runs had errors (see the ERROR lines above)",
            file=sys.stderr,
        )
    return (1 if failed else 0), doc


def benchmark(opts: Options) -> int:
    code, doc = run_benchmark(opts)
    write_json(opts.json_path, doc)
    print(f"\nbench: results written to {opts.json_path}")
    print()
    print(report.pgbench_markdown(doc))
    if opts.docs is not None:
        report.update_docs(opts.docs, {"pgbench": report.pgbench_markdown(doc)})
        print(f"bench: {opts.docs} refreshed")
    return code


class Terminated(BaseException):
    """SIGTERM arrived: unwind through the finally blocks that stop every process we started."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def guarded(fn: Any, *args: Any) -> int:
    """Run ``fn(*args)`` with SIGTERM turned into an unwinding exception and errors turned into exit codes."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code: int = fn(*args)
        return code
    except (BenchError, TargetError, DevClusterError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("bench: terminated; everything it started has been stopped", file=sys.stderr)
        return 143


def have_pgbench() -> bool:
    if shutil.which("pgbench") is None and not any(Path("/usr/lib/postgresql").glob("*/bin/pgbench")):
        print(
            "bench: pgbench not found: run `make bench` (installs PostgreSQL, PgBouncer and Pgpool-II)",
            file=sys.stderr,
        )
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    if not have_pgbench():
        return 2
    return guarded(benchmark, opts)
