"""Markdown for docs/performance.md: the tables between ``<!-- bench:NAME:begin -->`` and ``...:end -->``.

Pure functions of the results documents the benchmarks write to bench/results/*.json, so a table can be
re-rendered from an old results file, and unit-tested without running anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TARGET_ORDER = ("direct", "pgbouncer", "ceiling", "pgpool", "proxy")
RATIO_ORDER = (
    "proxy/pgbouncer",
    "proxy/ceiling",
    "proxy/pgpool",
    "proxy/direct",
    "ceiling/pgbouncer",
    "pgbouncer/direct",
)
VERSION_LABELS = {
    "pgbouncer": "PgBouncer",
    "ceiling": "ceiling",
    "pgpool": "Pgpool-II",
    "proxy": "parafort-proxy",
}
SECTIONS = ("pgbench", "pgbench-cache-unnamed", "ryw", "memory", "classify")


def begin_marker(name: str) -> str:
    return f"<!-- bench:{name}:begin -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def _tps_cell(t: Mapping[str, Any] | None) -> str:
    if t is None:
        return ""
    if t.get("skipped"):
        return "skipped"
    if t.get("median_tps") is None:
        return "error"
    text = f"{t['median_tps']:,.0f} ({t['median_latency_ms']:.2f} ms)"
    return text + (f" ⚠ {t['errors']} err" if t.get("errors") else "")


def _ratio_cell(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return ""
    if r.get("skipped") or r.get("median") is None:
        return "-"
    if r.get("rounds", 0) > 1:
        return f"**{r['median']:.2f}** ({r['min']:.2f}..{r['max']:.2f})"
    return f"**{r['median']:.2f}**"


def machine_line(machine: Mapping[str, Any]) -> str:
    cpus = machine.get("cpus_usable") or machine.get("cpu_count")
    model = f" ({machine['cpu_model']})" if machine.get("cpu_model") else ""
    mem = f", {machine['mem_total_gib']} GiB RAM" if machine.get("mem_total_gib") else ""
    load = machine.get("loadavg_at_start")
    load_text = f", load average at start {load[0]:.2f}" if load else ""
    platform = machine.get("platform", "?")
    source = f"; proxy from git {machine['proxy_source']}" if machine.get("proxy_source") else ""
    return f"{cpus} CPUs{model}{mem}, {platform}, Python {machine.get('python', '?')}{load_text}{source}"


def pgbench_markdown(doc: Mapping[str, Any]) -> str:
    """The pgbench comparison: one row per cell, TPS (latency) per target and the paired ratios."""
    opts = doc["options"]
    machine = doc["machine"]
    targets = [t for t in TARGET_ORDER if t in opts["targets"]]
    ratios = [r for r in RATIO_ORDER if all(part in targets for part in r.split("/"))]
    postgres = str(machine.get("postgres", "")).split(" on ")[0]
    versions = [postgres]
    for name, label in VERSION_LABELS.items():
        if name in doc.get("targets", {}):
            versions.append(f"{label} {doc['targets'][name].get('version', '?')}")
    quick = " (`--quick`)" if opts.get("quick") else ""
    lines = [
        f"Run {doc['finished_at']}{quick}: {opts['rounds']} round(s) x {opts['duration']} s per run, "
        f"pgbench scale {opts['scale']}, `-j {opts.get('jobs', 2)}`.  ",
        f"Machine: {machine_line(machine)}.  ",
        f"Software: {', '.join(versions)}; {machine.get('pgbench', 'pgbench')}.",
        "",
        "Median TPS (median average latency) per target; ratios: median of per-round paired ratios "
        "(min..max over rounds).",
        "",
        "| workload | `-M` | clients | " + " | ".join(f"{t} TPS" for t in targets) + " | "
        + " | ".join(ratios) + " |",
        "|---|---|---:|" + "---:|" * (len(targets) + len(ratios)),
    ]  # fmt: skip
    for cell in doc["summary"]:
        row = [cell["workload"], cell["mode"], str(cell["clients"])]
        row += [_tps_cell(cell["targets"].get(t)) for t in targets]
        row += [_ratio_cell(cell["ratios"].get(r)) for r in ratios]
        lines.append("| " + " | ".join(row) + " |")
    lines += cpu_markdown(doc, targets)
    if doc.get("skipped"):
        lines += ["", "Skipped:"]
        lines += [
            f"- {s['target']} {s['workload']} -M {s['mode']} -c {s['clients']}: {s['reason']}"
            for s in doc["skipped"]
        ]
    lines += ["", "Commands (the password in `PGPASSWORD`; `$PORT` is each target's ephemeral port):", ""]
    lines += ["```sh", doc["commands"]["init"], *doc["commands"]["runs"], "```"]
    described = doc.get("targets", {})
    facts = []
    for name in targets:
        d = described.get(name, {})
        if name == "direct":
            facts.append("- direct: the primary itself")
        elif name == "pgbouncer":
            facts.append(
                f"- pgbouncer: pool_mode = {d.get('pool_mode')}, default_pool_size = "
                f"{d.get('default_pool_size')}, primary only"
            )
        elif name == "ceiling":
            facts.append(
                "- ceiling: [bench/ceiling.py](../bench/ceiling.py), a bare uvloop byte forwarder to the "
                "primary, one server connection per client, no parsing (the primary authenticates)"
            )
        elif name == "pgpool":
            facts.append(
                f"- pgpool: {d.get('mode')}, reads to the replica (backend_weight 0 / 1), "
                f"num_init_children = {d.get('num_init_children')}, max_pool = {d.get('max_pool')}, "
                "connection_cache = on"
            )
        elif name == "proxy":
            facts.append(
                f"- proxy: transaction pooling, main pool {d.get('main_pool_size')}, read_replica pool "
                f"{d.get('read_replica_pool_size')}, {d.get('routing')}"
                + "".join(f", `{setting}`" for setting in opts.get("proxy_settings") or ())
            )
    if facts:
        lines += ["", *facts]
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _tps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def cpu_markdown(doc: Mapping[str, Any], targets: Sequence[str]) -> list[str]:
    """Who spends the CPU of a transaction, per cell and target (empty when no run was sampled)."""
    rows: list[str] = []
    for cell in doc["summary"]:
        for name in targets:
            t = cell["targets"].get(name) or {}
            cpu = t.get("median_cpu_us_per_tx")
            if not cpu:
                continue
            pooler = cpu.get("pooler", {})
            parts = [
                pooler.get("user", 0) + pooler.get("system", 0),
                sum(cpu.get("postgres", {}).values()),
                sum(cpu.get("pgbench", {}).values()),
                cpu.get("machine", {}).get("softirq", 0),
            ]
            rows.append(
                f"| {cell['workload']} | {cell['mode']} | {cell['clients']} | {name} | "
                f"{_tps(t.get('median_tps'))} | "
                + (f"{_us(pooler.get('user'))} + {_us(pooler.get('system'))}" if name != "direct" else "-")
                + f" | {_us(parts[1])} | {_us(parts[2])} | {_us(parts[3])} | {_us(sum(parts))} | "
                f"{_us(cpu.get('machine', {}).get('idle'))} |"
            )
    if not rows:
        return []
    return [
        "",
        "CPU per transaction, in µs (median over rounds; `/proc` sampled around each run, "
        "[bench/cpu.py](../bench/cpu.py)): the pooler's user + system time, all of PostgreSQL's processes "
        "(primary and replica), pgbench's, the kernel's softirq time (loopback TCP delivery), their sum, "
        "and the machine's idle time (all CPUs).",
        "",
        "| workload | `-M` | clients | target | TPS | pooler user + sys | PostgreSQL | pgbench | softirq "
        "| busy total | idle |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def memory_markdown(doc: Mapping[str, Any]) -> str:
    """The idle-clients memory benchmark: RSS before and with N idle logged-in clients."""
    r = doc["result"]
    verdict = "yes" if r.get("within_target") else "**no**"
    if r.get("failed_logins"):
        verdict += f" ({r['failed_logins']} logins failed)"
    lines = [
        f"Run {doc['finished_at']}. Machine: {machine_line(doc['machine'])}.",
        "",
        "| idle clients | client auth | baseline RSS | RSS with the clients | per client | peak RSS (VmHWM) "
        f"| target ≤ {r['target_mb']:.0f} MB |",
        "|---:|---|---:|---:|---:|---:|---|",
        f"| {r['connected']:,} of {r['clients']:,} | {r['auth']} | {r['baseline_rss_mb']:.1f} MB | "
        f"{r['rss_mb']:.1f} MB | {r['per_client_kib']:.1f} KiB | {r['hwm_mb']:.1f} MB | {verdict} |",
        "",
        f"Logins took {r['login_seconds']:.1f} s at a concurrency of {r['concurrency']} (open-files limit of "
        f"the proxy: {r.get('proxy_nofile', '?')}). Command: `{doc['command']}`.",
    ]
    return "\n".join(lines)


def classify_markdown(doc: Mapping[str, Any]) -> str:
    """Classification cost per statement and the medians over the statements, in microseconds."""
    lines = [
        f"Run {doc['finished_at']}. Machine: {machine_line(doc['machine'])}.",
        "",
        "| statement | cache hit (same bytes) | hit, other literals | miss (parse) | routing decision |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in doc["statements"]:
        label = row["statement"].replace("|", "\\|")
        lines.append(
            f"| `{label}` | {row['hit_us']:.2f} µs | {row['other_literals_us']:.2f} µs | "
            f"{row['miss_us']:.1f} µs | {row['decide_us']:.2f} µs |"
        )
    m = doc["medians"]
    lines.append(
        f"| **median** | **{m['hit_us']:.2f} µs** | **{m['other_literals_us']:.2f} µs** | "
        f"**{m['miss_us']:.1f} µs** | **{m['decide_us']:.2f} µs** |"
    )
    lines += ["", f"Command: `{doc['command']}`."]
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``body`` (appended when missing)."""
    begin, end = begin_marker(name), end_marker(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip() + f"\n\n## Results: {name}\n\n{block}\n"


def update_docs(path: Path, blocks: Mapping[str, str]) -> None:
    """Refresh the named blocks of ``path`` in place (creating the file when missing)."""
    text = path.read_text() if path.exists() else "# Performance\n"
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    tmp.replace(path)
