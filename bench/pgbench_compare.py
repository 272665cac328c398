"""Side-by-side pgbench: PostgreSQL directly vs PgBouncer (transaction pooling) vs the ParaFort proxy.

One throwaway main cluster, ``pgbench -i`` once, then every target is started and each round runs the
select-only built-in script (``pgbench -n -S``) once per target for every (mode, clients) cell. The order of
the targets rotates from round to round (A B C, B C A, C A B, ...) so that drift on the machine (thermal,
caches, noisy neighbours) spreads over all of them; ratios are taken within a round, then the median across
rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
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

from bench.targets import (
    DEFAULT_PGBOUNCER,
    HOST,
    Credentials,
    DirectTarget,
    PgBouncerTarget,
    ProxyTarget,
    Target,
    TargetError,
    Tools,
    client_env,
)
from proxy.devcluster import DevClusterError, DevClusters, find_bindir

ALL_TARGETS = ("direct", "pgbouncer", "proxy")
MODES = ("simple", "extended", "prepared")
RATIOS = (("proxy", "pgbouncer"), ("proxy", "direct"), ("pgbouncer", "direct"))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
JOBS = 2  # pgbench threads: sized for a 2-core machine
# Connections the direct target must leave free: PgBouncer's and the proxy's pools stay open while it runs.
DIRECT_RESERVE = 50

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
LATENCY_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


class BenchError(RuntimeError):
    """The benchmark cannot run at all (a tool is missing, a target does not start)."""


# -- options ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    targets: tuple[str, ...]
    modes: tuple[str, ...]
    clients: tuple[int, ...]
    duration: int
    rounds: int
    scale: int
    warmup: int
    json_path: Path
    require_pgbouncer: bool
    pgbouncer: Path


def _split(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """Repeatable options that also take comma lists: ``--mode simple --mode extended,prepared``."""
    out: list[str] = []
    for value in values or default:
        for raw in value.split(","):
            item = raw.strip()
            if item and item not in out:
                out.append(item)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="pgbench select-only: PostgreSQL direct vs PgBouncer (transaction pooling) vs our proxy.",
        epilog="--targets, --mode and --clients are repeatable and take comma lists.",
    )
    add = p.add_argument
    add("--targets", action="append", metavar="LIST", help="direct,pgbouncer,proxy (default: all three)")
    add("--mode", action="append", metavar="MODE", help="pgbench -M: simple, extended (default), prepared")
    add("--clients", action="append", metavar="N", help="pgbench -c (default 16)")
    add("--duration", type=int, metavar="S", help="seconds per run (default 15; --quick: 5)")
    add("--rounds", type=int, metavar="R", help="rounds (default 3; --quick: 2)")
    add("--scale", type=int, default=10, metavar="N", help="pgbench -i -s (default 10)")
    add("--warmup", type=int, metavar="S", help="unmeasured seconds per target first (default 3; --quick: 2)")
    add("--quick", action="store_true", help="short run: --duration 5 --rounds 2")
    add(
        "--json",
        type=Path,
        metavar="PATH",
        help="results file (default bench/results/<UTC time>-pgbench.json)",
    )
    add("--require-pgbouncer", action="store_true", help="fail instead of skipping a missing PgBouncer")
    add("--pgbouncer", type=Path, default=DEFAULT_PGBOUNCER, metavar="PATH", help="PgBouncer binary")
    return p


def parse_options(argv: Sequence[str] | None) -> Options:
    p = parser()
    args = p.parse_args(argv)
    targets = _split(args.targets, ALL_TARGETS)
    modes = _split(args.mode, ["extended"])
    if bad := [t for t in targets if t not in ALL_TARGETS]:
        p.error(f"unknown target(s) {', '.join(bad)}; choose from {', '.join(ALL_TARGETS)}")
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    try:
        clients = [int(c) for c in _split(args.clients, ["16"])]
    except ValueError:
        p.error("--clients takes whole numbers")
    duration = args.duration if args.duration is not None else (5 if args.quick else 15)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if min(clients) < 1 or duration < 1 or rounds < 1 or args.scale < 1 or warmup < 0:
        p.error("--clients, --duration, --rounds and --scale must be at least 1, --warmup at least 0")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Options(
        targets=tuple(targets), modes=tuple(modes), clients=tuple(clients), duration=duration,
        rounds=rounds, scale=args.scale, warmup=warmup,
        json_path=args.json or RESULTS_DIR / f"{stamp}-pgbench.json",
        require_pgbouncer=args.require_pgbouncer, pgbouncer=args.pgbouncer,
    )  # fmt: skip


# -- one pgbench run --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One pgbench run against one target; ``error`` is None when it counts."""

    round: int
    target: str
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

    @property
    def ok(self) -> bool:
        return self.error is None


def pgbench_command(
    tools: Tools, creds: Credentials, port: int, *, mode: str, clients: int, seconds: int
) -> list[str]:
    """The measured command line; the password travels in PGPASSWORD, never on the command line."""
    return [
        tools.pgbench, "-h", HOST, "-p", str(port), "-U", creds.user, "-n", "-S", "-M", mode,
        "-c", str(clients), "-j", str(min(JOBS, clients)), "-T", str(seconds), creds.database,
    ]  # fmt: skip


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


def run_pgbench(run: Run, creds: Credentials) -> Run:
    run.started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.monotonic()
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
    return run


# -- summary ----------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    runs: Sequence[Run], opts: Options, skipped: dict[tuple[str, str, int], str]
) -> list[dict[str, Any]]:
    """Per (mode, clients): median TPS and latency per target, and the median of per-round paired ratios."""
    cells: list[dict[str, Any]] = []
    for mode in opts.modes:
        for clients in opts.clients:
            cell_runs = [r for r in runs if r.mode == mode and r.clients == clients]
            per_target: dict[str, Any] = {}
            for target in opts.targets:
                mine = [r for r in cell_runs if r.target == target]
                good = [r for r in mine if r.ok]
                tps = [r.tps for r in good if r.tps is not None]
                lat = [r.latency_ms for r in good if r.latency_ms is not None]
                per_target[target] = {
                    "runs": len(mine),
                    "errors": len(mine) - len(good),
                    "skipped": skipped.get((target, mode, clients)),
                    "median_tps": _median(tps),
                    "min_tps": min(tps) if tps else None,
                    "max_tps": max(tps) if tps else None,
                    "median_latency_ms": _median(lat),
                }
            ratios: dict[str, Any] = {}
            for num, den in RATIOS:
                if num not in opts.targets or den not in opts.targets:
                    continue
                if skipped.get((num, mode, clients)) or skipped.get((den, mode, clients)):
                    ratios[f"{num}/{den}"] = {"median": None, "skipped": True}
                    continue
                paired = []
                for rnd in range(1, opts.rounds + 1):
                    a = next((r for r in cell_runs if r.round == rnd and r.target == num and r.ok), None)
                    b = next((r for r in cell_runs if r.round == rnd and r.target == den and r.ok), None)
                    if a and b and a.tps and b.tps:
                        paired.append(a.tps / b.tps)
                ratios[f"{num}/{den}"] = {
                    "median": _median(paired),
                    "min": min(paired) if paired else None,
                    "max": max(paired) if paired else None,
                    "rounds": len(paired),
                    "per_round": [round(x, 4) for x in paired],
                }
            cells.append({"mode": mode, "clients": clients, "targets": per_target, "ratios": ratios})
    return cells


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(cells: Sequence[dict[str, Any]], opts: Options) -> None:
    print()
    print(
        f"== summary: {opts.rounds} round(s) x {opts.duration}s, "
        f"pgbench -n -S -j {JOBS}, scale {opts.scale} =="
    )
    for cell in cells:
        print()
        print(f"mode={cell['mode']} clients={cell['clients']}")
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


def machine_info(pg: DevClusters, tools: Tools) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
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


def make_targets(
    opts: Options, pg: DevClusters, tools: Tools, creds: Credentials, workdir: Path
) -> list[Target]:
    targets: list[Target] = []
    for name in opts.targets:
        if name == "direct":
            targets.append(DirectTarget(pg.main.port, pg.main.psql("SHOW server_version")))
            continue
        sub = workdir / name
        sub.mkdir(mode=0o700)
        if name == "pgbouncer":
            targets.append(
                PgBouncerTarget(sub, creds, tools, binary=opts.pgbouncer, upstream_port=pg.main.port,
                                as_postgres=pg.runner.as_postgres)
            )  # fmt: skip
        else:
            targets.append(ProxyTarget(sub, creds, tools, main_dsn=pg.main.dsn))
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


def plan_skips(
    opts: Options, targets: Sequence[Target], max_connections: int
) -> dict[tuple[str, str, int], str]:
    """(target, mode, clients) cells that cannot run, with the reason (printed and recorded)."""
    skipped: dict[tuple[str, str, int], str] = {}
    for target in targets:
        for mode in opts.modes:
            for clients in opts.clients:
                reason = target.supports(mode)
                if reason is None and target.name == "direct" and clients > max_connections - DIRECT_RESERVE:
                    reason = (
                        f"{clients} clients > max_connections {max_connections} - {DIRECT_RESERVE} reserved"
                    )
                if reason:
                    skipped[(target.name, mode, clients)] = reason
    return skipped


def measure(opts: Options, targets: Sequence[Target], tools: Tools, creds: Credentials,
            skipped: dict[tuple[str, str, int], str]) -> list[Run]:  # fmt: skip
    if opts.warmup:
        for target in targets:
            # Fills the OS cache and lets the poolers open their server connections; not recorded.
            cmd = pgbench_command(
                tools, creds, target.port, mode="simple", clients=max(opts.clients), seconds=opts.warmup
            )
            warm = run_pgbench(Run(0, target.name, "simple", max(opts.clients), opts.warmup, cmd), creds)
            note = f"{warm.tps:,.0f} tps" if warm.ok and warm.tps else f"ERROR {warm.error}"
            print(f"bench: warm-up {target.name} {opts.warmup}s: {note}", flush=True)
    runs: list[Run] = []
    for rnd in range(1, opts.rounds + 1):
        shift = (rnd - 1) % len(targets)
        order = [*targets[shift:], *targets[:shift]]
        print(f"-- round {rnd}/{opts.rounds}: {' '.join(t.name for t in order)}", flush=True)
        for mode in opts.modes:
            for clients in opts.clients:
                for target in order:
                    if (target.name, mode, clients) in skipped:
                        continue
                    cmd = pgbench_command(
                        tools, creds, target.port, mode=mode, clients=clients, seconds=opts.duration
                    )
                    run = run_pgbench(Run(rnd, target.name, mode, clients, opts.duration, cmd), creds)
                    runs.append(run)
                    print_run(run, opts.rounds)
    return runs


def print_run(run: Run, rounds: int) -> None:
    head = f"[round {run.round}/{rounds}] {run.target:<10} {run.mode:<8} c={run.clients:<4}"
    numbers = f"tps {_fmt(run.tps, '12,.1f')}  lat {_fmt(run.latency_ms, '7.3f')} ms"
    print(f"{head} {numbers}" + (f"  ERROR: {run.error}" if run.error else ""), flush=True)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def benchmark(opts: Options) -> int:
    targets_wanted = list(opts.targets)
    if "pgbouncer" in targets_wanted and not opts.pgbouncer.exists():
        msg = (f"PgBouncer not found at {opts.pgbouncer}: run `make bench` or "
               "`sudo apt-get install pgbouncer` to include it")  # fmt: skip
        if opts.require_pgbouncer:
            raise BenchError(msg)
        print(f"bench: {msg}; skipping the pgbouncer target", flush=True)
        targets_wanted.remove("pgbouncer")
        if not targets_wanted:
            raise BenchError("no target left to measure")
        opts = dataclasses.replace(opts, targets=tuple(targets_wanted))
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    tools = Tools.find(find_bindir())
    print("bench: starting a PostgreSQL main cluster ...", flush=True)
    with DevClusters.start(("main",)) as pg, tempfile.TemporaryDirectory(prefix="parafort-bench-") as tmp:
        workdir = Path(tmp)
        if pg.runner.as_postgres:
            workdir.chmod(0o711)  # PgBouncer runs as postgres and must reach its own subdirectory
        creds = Credentials(pg.main.user, pg.main.password, pg.main.database)
        machine = machine_info(pg, tools)
        init_cmd = initialize(pg, tools, creds, opts.scale)
        targets = make_targets(opts, pg, tools, creds, workdir)
        skipped = plan_skips(opts, targets, machine["max_connections"])
        for (name, mode, clients), reason in skipped.items():
            print(f"bench: skipping {name} -M {mode} -c {clients}: {reason}", flush=True)
        with running(targets):
            runs = measure(opts, targets, tools, creds, skipped)
        machine["loadavg_at_end"] = list(os.getloadavg())
    cells = summarize(runs, opts, skipped)
    print_summary(cells, opts)
    doc = {
        "benchmark": "pgbench select-only: direct vs pgbouncer vs proxy",
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            **asdict(opts),
            "json_path": str(opts.json_path),
            "pgbouncer": str(opts.pgbouncer),
            "jobs": JOBS,
        },
        "machine": machine,
        "targets": {t.name: t.describe() for t in targets},
        "commands": {
            "init": init_cmd,
            "runs": sorted({" ".join(r.command) for r in runs}),
            "password": "passed in PGPASSWORD, never on a command line",
        },
        "skipped": [
            {"target": n, "mode": m, "clients": c, "reason": why} for (n, m, c), why in skipped.items()
        ],
        "runs": [asdict(r) for r in runs],
        "summary": cells,
    }
    text = creds.redact(json.dumps(doc))
    write_json(opts.json_path, json.loads(text))
    print(f"\nbench: results written to {opts.json_path}")
    failed = [r for r in runs if not r.ok]
    if failed:
        print(
            f"bench: {len(failed)} of {len(runs)} runs had errors (see the ERROR lines above)",
            file=sys.stderr,
        )
        return 1
    return 0


class Terminated(BaseException):
    """SIGTERM arrived: unwind through the finally blocks that stop every process we started."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if shutil.which("pgbench") is None and not any(Path("/usr/lib/postgresql").glob("*/bin/pgbench")):
        print(
            "bench: pgbench not found: run `make bench` (installs PostgreSQL and PgBouncer)", file=sys.stderr
        )
        return 2
    try:
        return benchmark(opts)
    except (BenchError, TargetError, DevClusterError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("bench: terminated; everything it started has been stopped", file=sys.stderr)
        return 143
