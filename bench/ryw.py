"""``python -m bench ryw``: mixed reads and writes with the replica configured, and stale reads (issue 14).

1. pgbench with a custom script per client: 1 write (an upsert of a fresh key on a main table) then 9 reads
   of that same row, autocommit statements. Targets: PostgreSQL directly (main), PgBouncer (main: it cannot
   split reads), the proxy with the streaming replica and ``routing.read_your_writes.scope`` ``off``, and
   with ``user`` and ``connection``. For the proxy cells, the share of reads that reached the replica (the
   proxy's /metrics: routed_statements_total, and replica_reads_total by outcome when the build has it,
   else "n/a").
   Main runs with ``synchronous_commit = on`` (PostgreSQL's default; the dev clusters turn it off).
2. Stale reads: with the replica's replay delayed (``recovery_min_apply_delay``, restored afterwards), a
   psycopg client INSERTs a row through the proxy and at once SELECTs it, N rounds; a round whose SELECT does
   not see the row is a stale read. Scopes ``off``, ``user`` and ``connection``.

A build without read-your-writes refuses the ``routing.read_your_writes`` setting: the ``off`` cells then run
without it (that build never waits: the same behaviour) and the ``user`` cells say "not supported by this
build".
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import report
from bench.cpu import CpuSampler
from bench.pgbench_compare import (
    DOCS_PATH,
    FAILED_RE,
    JOBS,
    PROCESSED_RE,
    guarded,
    have_pgbench,
    machine_info,
    raise_max_connections,
    results_path,
    wait_caught_up,
    write_json,
)
from bench.targets import (
    DEFAULT_PGBOUNCER,
    HOST,
    Credentials,
    DirectTarget,
    PgBouncerTarget,
    ProxyTarget,
    Site,
    Target,
    TargetError,
    Tools,
    client_env,
    make_site,
)
from proxy.dev.cluster import Cluster, DevClusters, find_bindir

TABLE = "ryw_items"
STALE_TABLE = "ryw_stale"
READS_PER_WRITE = 9
SCOPES = ("off", "user", "connection")
METRIC_PREFIX = "parafort_proxy_"
OUTCOMES = ("replica", "replica_after_wait", "main_for_consistency")
UNSUPPORTED = "not supported by this build"
TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
LATENCY_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_SAMPLE_RE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? ([-+0-9.eEinfNa]+)$")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


# -- pure helpers (tests/unit/test_bench.py) ----------------------------------------------------------------


def workload_script(reads: int = READS_PER_WRITE, table: str = TABLE) -> str:
    """The pgbench script: one write of a key owned by this client, then ``reads`` reads of that row."""
    lines = [
        "\\set id :client_id * 100000000 + random(1, 99999999)",
        f"INSERT INTO {table} (id, v) VALUES (:id, 1) ON CONFLICT (id) DO UPDATE SET v = {table}.v + 1;",
    ]
    lines += [f"SELECT v FROM {table} WHERE id = :id;"] * reads
    return "\n".join(lines) + "\n"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text format: {(sample name, labels): value}; comments and malformed lines are skipped."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line.strip())
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        out[name, frozenset(_LABEL_RE.findall(labels or ""))] = number
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples that carry ``labels``; None when the metric has no such sample."""
    want = set(labels.items())
    found = [v for (n, got), v in samples.items() if n == name and want <= got]
    return sum(found) if found else None


def read_routing(before: Samples, after: Samples) -> dict[str, Any]:
    """Reads routed during a run (the difference of two scrapes): how many, the share on the replica, and
    read-your-writes outcomes when the build counts them (else None: "n/a")."""
    routed = METRIC_PREFIX + "routed_statements_total"

    def delta(name: str, **labels: str) -> float | None:
        b, a = metric_sum(before, name, **labels), metric_sum(after, name, **labels)
        return None if a is None else a - (b or 0.0)

    reads = delta(routed, kind="read") or 0.0
    on_replica = delta(routed, role="read_replica", kind="read") or 0.0
    outcomes: dict[str, float] | None = None
    if metric_sum(after, METRIC_PREFIX + "replica_reads_total") is not None:
        outcomes = {o: delta(METRIC_PREFIX + "replica_reads_total", outcome=o) or 0.0 for o in OUTCOMES}
    return {
        "reads": reads,
        "reads_on_replica": on_replica,
        "replica_share": on_replica / reads if reads else None,
        "outcomes": outcomes,
    }


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _outcomes_cell(outcomes: Mapping[str, float] | None) -> str:
    if outcomes is None:
        return "n/a"
    total = sum(outcomes.values())
    if not total:
        return "0 reads counted"
    return ", ".join(f"{o} {100 * outcomes[o] / total:.1f} %" for o in OUTCOMES)


def markdown(doc: Mapping[str, Any]) -> str:
    """The workload table (tps, ratio to PgBouncer, reads on the replica) and the stale-read table."""
    cells = doc["cells"]
    bouncer = next((c.get("tps") for c in cells if c["target"] == "pgbouncer"), None)
    head = []
    if doc.get("started_at") and doc.get("machine"):
        head = [f"Run {doc['started_at']}. Machine: {report.machine_line(doc['machine'])}.", ""]
    lines = [
        *head,
        f"1 write : {doc['reads_per_write']} reads per client script, {doc['clients']} clients, "
        f"{doc['duration_s']} s per cell, pgbench -M {doc['mode']}; tps = scripts per second.",
        "",
        "| target | read_your_writes | tps | vs pgbouncer | pooler CPU µs/script | reads on the replica "
        "| read outcomes |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c.get("error"):
            lines.append(f"| {c['target']} | {c.get('scope') or '-'} | {c['error']} | | | | |")
            continue
        routing = c.get("routing")
        cpu = c.get("pooler_cpu_us")
        scope = (c.get("scope") or "-") + (f" ({c['note']})" if c.get("note") else "")
        lines.append(
            f"| {c['target']} | {scope} | {c['tps']:,.0f} | "
            f"{_fmt_ratio(ratio(c['tps'], bouncer))} | {'' if cpu is None else f'{cpu:,.0f}'} | "
            f"{_pct(routing['replica_share']) if routing else '-'} | "
            f"{_outcomes_cell(routing['outcomes']) if routing else '-'} |"
        )
    stale = doc.get("stale")
    if stale:
        lines += [
            "",
            f"Stale reads: INSERT then SELECT of that row at once through the proxy, {stale['rounds']} "
            f"rounds, the replica's replay delayed by {stale['delay_ms']} ms.",
            "",
            "| read_your_writes | stale reads | reads on the replica | read outcomes |",
            "|---|---|---|---|",
        ]
        for s in stale["results"]:
            if s.get("error"):
                lines.append(f"| {s['scope']} | {s['error']} | | |")
                continue
            routing = s["routing"]
            lines.append(
                f"| {s['scope']} | {s['stale']} / {s['rounds']} | {_pct(routing['replica_share'])} | "
                f"{_outcomes_cell(routing['outcomes'])} |"
            )
    return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"**{value:.2f}**"


# -- running it ------------------------------------------------------------------------------------------


@dataclass
class Options:
    clients: int = 16
    duration: int = 20
    warmup: int = 3
    mode: str = "extended"
    stale_rounds: int = 200
    delay_ms: int = 300
    pgbouncer: Path = DEFAULT_PGBOUNCER
    json_path: Path = field(default_factory=lambda: results_path("ryw"))


def add_ryw_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}clients", type=int, default=16, help="pgbench clients (default 16)")
    p.add_argument(f"--{prefix}duration", type=int, default=20, help="seconds per cell (default 20)")
    p.add_argument(f"--{prefix}stale-rounds", type=int, default=200, help="INSERT-then-SELECT rounds")
    p.add_argument(f"--{prefix}delay-ms", type=int, default=300, help="replica replay delay (stale reads)")
    p.add_argument(f"--{prefix}mode", default="extended", choices=("simple", "extended"), help="pgbench -M")


def options_from(args: argparse.Namespace, *, quick: bool, prefix: str = "") -> Options:
    def get(name: str) -> Any:
        return getattr(args, (prefix + name).replace("-", "_"))

    return Options(
        clients=get("clients"),
        duration=min(get("duration"), 8) if quick else get("duration"),
        warmup=2 if quick else 3,
        mode=get("mode"),
        stale_rounds=get("stale_rounds"),
        delay_ms=get("delay_ms"),
        pgbouncer=getattr(args, "pgbouncer", DEFAULT_PGBOUNCER),
    )


@dataclass
class Bed:
    """The clusters, credentials and script one ``ryw`` run shares."""

    opts: Options
    pg: DevClusters
    replica: Cluster
    tools: Tools
    creds: Credentials
    workdir: Path
    script: Path
    postmasters: list[int]

    def site(self, name: str) -> Site:
        """A new daemon target's own directory (``name``) with this run's login and tools."""
        return make_site(self.workdir, name, self.creds, self.tools)


def scrape(target: ProxyTarget) -> Samples:
    url = f"http://{HOST}:{target.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return parse_metrics(resp.read().decode())


def run_script(bed: Bed, port: int, seconds: int, pids: list[int]) -> dict[str, Any]:
    """pgbench with the workload script for ``seconds``: tps, latency, the pooler's CPU per script."""
    opts, creds = bed.opts, bed.creds
    cmd = [
        bed.tools.pgbench, "-h", HOST, "-p", str(port), "-U", creds.user, "-n", "-f", str(bed.script),
        "-M", opts.mode, "-c", str(opts.clients), "-j", str(min(JOBS, opts.clients)), "-T", str(seconds),
        creds.database,
    ]  # fmt: skip
    sampler = CpuSampler({"pooler": pids, "postgres": bed.postmasters})
    sampler.start()
    proc = subprocess.run(
        cmd, env=client_env(creds), capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    out: dict[str, Any] = {"exit_code": proc.returncode}
    if m := TPS_RE.search(proc.stdout):
        out["tps"] = float(m.group(1))
    if m := LATENCY_RE.search(proc.stdout):
        out["latency_ms"] = float(m.group(1))
    processed = int(m.group(1)) if (m := PROCESSED_RE.search(proc.stdout)) else 0
    failed = int(m.group(1)) if (m := FAILED_RE.search(proc.stdout)) else 0
    if proc.returncode or failed or "tps" not in out:
        tail = [creds.redact(line) for line in proc.stderr.splitlines() if line.strip()][-3:]
        out["error"] = f"pgbench exit {proc.returncode}, {failed} failed: " + " / ".join(tail)
    elif processed:
        cpu = sampler.stop(processed)
        pooler = cpu.get("pooler")
        out["pooler_cpu_us"] = round(pooler["user"] + pooler["system"], 1) if pids and pooler else None
    return out


def stale_reads(target: ProxyTarget, creds: Credentials, rounds: int, first_id: int) -> int:
    """INSERT a row through the proxy and SELECT it at once, ``rounds`` times: how many SELECTs missed it."""
    dsn = (
        f"host={HOST} port={target.port} user={creds.user} password={creds.password} "
        f"dbname={creds.database} sslmode=disable connect_timeout=10"
    )
    missed = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(first_id, first_id + rounds):
            conn.execute(f"INSERT INTO {STALE_TABLE} (id) VALUES (%s)", (i,))
            row = conn.execute(f"SELECT count(*) FROM {STALE_TABLE} WHERE id = %s", (i,)).fetchone()
            missed += row is None or row[0] != 1
    return missed


@contextlib.contextmanager
def replay_delayed(replica: Cluster, delay_ms: int) -> Iterator[None]:
    """The replica applies commits ``delay_ms`` late (recovery_min_apply_delay), until the block ends."""
    replica.psql(f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(delay_ms)}ms'")
    replica.psql("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        replica.psql("ALTER SYSTEM RESET recovery_min_apply_delay")
        replica.psql("SELECT pg_reload_conf()")


def start_proxy(bed: Bed, scope: str) -> tuple[ProxyTarget | None, str, str]:
    """The proxy with the replica and read-your-writes ``scope``: (target, note, ""), or (None,
    UNSUPPORTED, the proxy's own words)."""
    main, replica = bed.pg.main.dsn, bed.replica.dsn
    setting = {"routing": {"read_your_writes": {"scope": scope}}}
    target = ProxyTarget(bed.site(f"proxy-{scope}"), main_dsn=main, replica_dsn=replica, extra_config=setting)
    try:
        target.start()
        return target, "", ""
    except TargetError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "read_your_writes" in line), lines[0] if lines else "")[:300]
        if scope != "off":
            print(f"bench: proxy with read_your_writes.scope={scope}: {UNSUPPORTED} ({first})", flush=True)
            return None, UNSUPPORTED, bed.creds.redact(first)
    print("bench: this build refuses routing.read_your_writes: the off cell runs without it", flush=True)
    target = ProxyTarget(bed.site("proxy-plain"), main_dsn=main, replica_dsn=replica)
    target.start()
    return target, "this build has no read_your_writes: never waits", ""


def measure_target(bed: Bed, name: str, scope: str | None, target: Target) -> dict[str, Any]:
    if bed.opts.warmup:
        run_script(bed, target.port, bed.opts.warmup, [])  # not recorded
    proxy = target if isinstance(target, ProxyTarget) else None
    before = scrape(proxy) if proxy is not None else None
    result = run_script(bed, target.port, bed.opts.duration, target.pids())
    cell: dict[str, Any] = {"target": name, "scope": scope, **result}
    if proxy is not None and before is not None:
        cell["routing"] = read_routing(before, scrape(proxy))
    share = cell.get("routing", {}).get("replica_share")
    print(
        f"bench: ryw {name:<9} scope={scope or '-':<5} "
        + (f"ERROR {cell['error']}" if "error" in cell else f"tps {cell['tps']:,.1f}")
        + (f", reads on the replica {_pct(share)}" if proxy is not None else ""),
        flush=True,
    )
    return cell


def poolers(bed: Bed) -> list[tuple[str, Target]]:
    """PostgreSQL directly and PgBouncer (both on main: PgBouncer cannot split reads)."""
    pg = bed.pg
    out: list[tuple[str, Target]] = [
        ("direct", DirectTarget(pg.main.port, pg.main.psql("SHOW server_version")))
    ]
    if bed.opts.pgbouncer.exists():
        bouncer = PgBouncerTarget(
            bed.site("pgbouncer"), binary=bed.opts.pgbouncer, upstream_port=pg.main.port,
            as_postgres=pg.runner.as_postgres,
        )  # fmt: skip
        out.append(("pgbouncer", bouncer))
    return out


def proxy_cells(bed: Bed, cells: list[dict[str, Any]], stale: list[dict[str, Any]]) -> None:
    """For each scope: the workload through the proxy, then the stale-read rounds with replay delayed."""
    opts = bed.opts
    for n, scope in enumerate(SCOPES):
        proxy, note, why = start_proxy(bed, scope)
        if proxy is None:
            cells.append({"target": "proxy", "scope": scope, "error": note, "why": why})
            stale.append({"scope": scope, "error": note})
            continue
        try:
            cell = measure_target(bed, "proxy", scope, proxy)
            cells.append({**cell, "note": note} if note else cell)
            wait_caught_up(bed.pg.main, bed.replica)
            try:
                with replay_delayed(bed.replica, opts.delay_ms):
                    before = scrape(proxy)
                    missed = stale_reads(proxy, bed.creds, opts.stale_rounds, (n + 1) * 10_000_000)
                    routing = read_routing(before, scrape(proxy))
            except psycopg.Error as exc:
                error = bed.creds.redact(f"{type(exc).__name__}: {exc}".splitlines()[0])
                stale.append({"scope": scope, "error": error})
                print(f"bench: stale reads with scope={scope}: ERROR {error}", flush=True)
            else:
                stale.append(
                    {"scope": scope, "stale": missed, "rounds": opts.stale_rounds, "routing": routing}
                )
                print(f"bench: stale reads with scope={scope}: {missed} / {opts.stale_rounds}", flush=True)
        finally:
            proxy.stop()
        wait_caught_up(bed.pg.main, bed.replica)


def ryw_doc(opts: Options) -> dict[str, Any]:
    """Everything above on throwaway clusters; the results document (no password in it)."""
    tools = Tools.find(find_bindir())
    started = datetime.now(UTC).isoformat(timespec="seconds")
    cells: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    with DevClusters.start(("main",)) as pg, tempfile.TemporaryDirectory(prefix="parafort-ryw-") as tmp:
        workdir = Path(tmp)
        if pg.runner.as_postgres:
            workdir.chmod(0o711)
        creds = Credentials(pg.main.user, pg.main.password, pg.main.database)
        raise_max_connections(pg, 200)
        # PostgreSQL's default, which the dev clusters turn off for speed: without it a commit's WAL waits for
        # the WAL writer (up to wal_writer_delay, 200 ms) before the replica can even receive it, so every
        # read after a write would find the replica behind and go to main, whatever the proxy does.
        pg.main.psql("ALTER SYSTEM SET synchronous_commit = on")
        pg.main.psql("SELECT pg_reload_conf()")
        replica = pg.add_replica("read_replica")
        machine = machine_info(pg, tools)
        pg.main.psql(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, v int NOT NULL); "
            f"CREATE TABLE {STALE_TABLE} (id bigint PRIMARY KEY)",
            superuser=False,  # owned by the user the clients log in as
        )
        wait_caught_up(pg.main, replica)
        script = workdir / "ryw.sql"
        script.write_text(workload_script())
        script.chmod(0o644)
        postmasters = [c.pid for c in (pg.main, replica) if c.pid is not None]
        bed = Bed(opts, pg, replica, tools, creds, workdir, script, postmasters)
        targets = poolers(bed)
        if not any(name == "pgbouncer" for name, _ in targets):
            cells.append({"target": "pgbouncer", "scope": None, "error": f"not installed ({opts.pgbouncer})"})
        for name, target in targets:
            try:
                target.start()
                cells.append(measure_target(bed, name, None, target))
            finally:
                target.stop()
        proxy_cells(bed, cells, stale)
    return {
        "benchmark": "mixed 1 write : 9 reads with the replica, read-your-writes off and on; stale reads",
        "started_at": started,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {**asdict(opts), "pgbouncer": str(opts.pgbouncer), "json_path": str(opts.json_path)},
        "machine": machine,
        "script": workload_script(),
        "clients": opts.clients,
        "duration_s": opts.duration,
        "mode": opts.mode,
        "reads_per_write": READS_PER_WRITE,
        "cells": cells,
        "stale": {"rounds": opts.stale_rounds, "delay_ms": opts.delay_ms, "results": stale},
    }


def exit_code(doc: Mapping[str, Any]) -> int:
    """1 when a cell or a stale-read run failed (a scope this build does not have is no failure)."""
    results = [*doc["cells"], *doc["stale"]["results"]]
    return 1 if any(r.get("error") and r["error"] != UNSUPPORTED for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ryw", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_ryw_arguments(p)
    p.add_argument("--quick", action="store_true", help="8 s per cell (about 2-3 minutes in all)")
    p.add_argument("--pgbouncer", type=Path, default=DEFAULT_PGBOUNCER)
    p.add_argument("--json", type=Path, dest="json_path", default=None)
    p.add_argument("--docs", type=Path, default=DOCS_PATH, help="refresh this file's bench:ryw block")
    p.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration < 1 or args.stale_rounds < 1 or args.delay_ms < 0:
        p.error("--clients, --duration, --stale-rounds must be at least 1; --delay-ms at least 0")
    opts = options_from(args, quick=args.quick)
    if args.json_path is not None:
        opts.json_path = args.json_path
    if not have_pgbench():
        return 2

    def run() -> int:
        doc = ryw_doc(opts)
        write_json(opts.json_path, doc)
        print(f"\nbench: results written to {opts.json_path}\n")
        print(markdown(doc))
        if not args.no_docs:
            report.update_docs(args.docs, {"ryw": markdown(doc)})
            print(f"bench: {args.docs} refreshed")
        return exit_code(doc)

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["exit_code", "main", "markdown", "parse_metrics", "read_routing", "ryw_doc", "workload_script"]
