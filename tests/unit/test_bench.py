"""The benchmark harness's pure parts: the matrix, ratios, command templates, pgpool.conf, the markdown
report, and the memory benchmark's login client against the proxy's own authenticator."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pglast
import pytest

# bench/ is not an installed package (only proxy is): import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import report
from bench.ceiling import host_port
from bench.cpu import CpuSampler, ProcTimes, process_table, read_proc, tree_pids
from bench.faults import (
    Reply,
    _data_row,
    _error_fields,
    cte_chain,
    describe_reply,
    error_lines,
    format_table,
    long_sum,
    long_union,
    padded_select,
    percentile,
    signal_name,
    table_rows,
)
from bench.memory import md5_response, scram_client_final, startup_message
from bench.pgbench_compare import (
    DEFAULT_CELLS,
    Cell,
    Options,
    Run,
    build_cells,
    command_template,
    connections_needed,
    paired_ratios,
    parse_options,
    plan_skips,
    summarize,
)
from bench.ryw import markdown as ryw_markdown
from bench.ryw import parse_metrics, read_routing, workload_script
from bench.targets import (
    CeilingTarget,
    Credentials,
    DirectTarget,
    PgpoolSettings,
    Tools,
    deep_merge,
    make_site,
    pgpool_conf,
    proxy_setting,
    quote_pgpool,
)
from proxy.protocol.auth import ServerAuth, make_scram_verifier


def _opts(**kw: Any) -> Options:
    base = parse_options(["--no-docs", "--json", "/tmp/x.json"])
    return Options(**{**base.__dict__, **kw})


def test_default_matrix_is_select_only_both_protocols_and_tpcb_extended_at_16_and_64() -> None:
    opts = parse_options([])
    assert opts.targets == ("direct", "pgbouncer", "ceiling", "pgpool", "proxy")
    pairs = {(c.workload, c.mode) for c in opts.cells}
    assert pairs == set(DEFAULT_CELLS)
    assert opts.clients == (16, 64)
    assert (opts.duration, opts.rounds) == (10, 3)
    quick = parse_options(["--quick", "--targets", "direct,pgbouncer"])
    assert quick.targets == ("direct", "pgbouncer")
    assert (quick.duration, quick.rounds) == (4, 2)


def test_explicit_modes_cross_every_workload() -> None:
    cells = build_cells(["tpcb-like"], ["simple", "prepared"], [8])
    assert cells == (Cell("tpcb-like", "simple", 8), Cell("tpcb-like", "prepared", 8))
    assert build_cells(["tpcb-like"], None, [1]) == (Cell("tpcb-like", "extended", 1),)


def test_unknown_workload_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        parse_options(["--workload", "nope"])


def _run(rnd: int, target: str, tps: float | None, error: str | None = None) -> Run:
    return Run(rnd, target, "select-only", "extended", 16, 10, [], tps=tps, latency_ms=1.0, error=error)


def test_ratios_are_paired_within_rounds_and_skip_failed_runs() -> None:
    runs = [
        _run(1, "proxy", 90.0),
        _run(1, "pgbouncer", 100.0),
        _run(2, "proxy", 50.0),
        _run(2, "pgbouncer", 100.0, error="boom"),
        _run(3, "proxy", 120.0),
        _run(3, "pgbouncer", 100.0),
    ]
    assert paired_ratios(runs, "proxy", "pgbouncer", 3) == pytest.approx([0.9, 1.2])
    opts = _opts(targets=("pgbouncer", "proxy"), cells=(Cell("select-only", "extended", 16),), rounds=3)
    [cell] = summarize(runs, opts, {})
    ratio = cell["ratios"]["proxy/pgbouncer"]
    assert ratio["median"] == pytest.approx(1.05)
    assert ratio["rounds"] == 2
    assert cell["targets"]["pgbouncer"]["errors"] == 1
    assert cell["targets"]["proxy"]["median_tps"] == 90.0
    assert "proxy/pgpool" not in cell["ratios"]  # pgpool was not measured


def test_command_template_hides_port_user_database_and_binary_path() -> None:
    cmd = "/usr/lib/postgresql/15/bin/pgbench -h 127.0.0.1 -p 40001 -U parafort_main -n -b select-only"
    cmd += " -M extended -c 16 -j 2 -T 10 parafort_main"
    assert command_template(cmd.split()) == (
        "pgbench -h $HOST -p $PORT -U $PGUSER -n -b select-only -M extended -c 16 -j 2 -T 10 $PGDATABASE"
    )


def test_max_connections_leave_room_for_every_pool_and_64_direct_clients() -> None:
    need = connections_needed(_opts())
    # direct or ceiling 64 + pgbouncer 20 + proxy 22 + pgpool 72 children + reserved and slack
    assert need >= 64 + 20 + 22 + 72 + 3
    assert need % 50 == 0
    # direct and the ceiling each open one connection per client, but never both at once
    both = connections_needed(_opts(targets=("direct", "ceiling", "pgbouncer"), cells=(Cell("a", "b", 300),)))
    assert both == connections_needed(_opts(targets=("direct", "pgbouncer"), cells=(Cell("a", "b", 300),)))
    assert both == connections_needed(_opts(targets=("ceiling", "pgbouncer"), cells=(Cell("a", "b", 300),)))
    assert both >= 300 + 20 + 3


def test_ceiling_target_is_skipped_like_direct_when_its_clients_do_not_fit(tmp_path: Path) -> None:
    creds = Credentials("u", "secret", "db")
    site = make_site(tmp_path, "ceiling", creds, Tools(psql="psql", pgbench="pgbench"))
    assert (site.workdir.stat().st_mode & 0o777) == 0o700
    ceiling = CeilingTarget(site, upstream_port=5432)
    direct = DirectTarget(5432, "15.1")
    small, big = Cell("select-only", "simple", 16), Cell("select-only", "simple", 200)
    skipped = plan_skips(_opts(cells=(small, big)), [direct, ceiling], max_connections=150)
    assert set(skipped) == {("direct", big), ("ceiling", big)}
    assert "200 clients > max_connections 150" in skipped[("ceiling", big)]
    assert ceiling.server_connections() == 0  # holds nothing while the other targets run
    command = ceiling.describe()["command"]
    assert command[1:] == ["-m", "bench.ceiling", "--listen", "$PORT", "--upstream", "127.0.0.1:5432"]
    assert ceiling.describe()["version"].startswith("uvloop ")
    assert "secret" not in str(ceiling.describe())


def test_ceiling_upstream_address_parsing() -> None:
    assert host_port("127.0.0.1:5432") == ("127.0.0.1", 5432)
    assert host_port("db.example:6543") == ("db.example", 6543)
    assert host_port("[::1]:5432") == ("::1", 5432)
    for bad in ("5432", ":5432", "host:", "host:port", "host:0", "host:65536", "host:-1"):
        with pytest.raises(ValueError):
            host_port(bad)


def test_pgpool_conf_streaming_replication_reads_on_replica_and_no_secret() -> None:
    settings = PgpoolSettings(
        port=5555, pcp_port=5556, workdir=Path("/tmp/it's"), primary_port=1, replica_port=2,
        user="u", database="db", num_init_children=72,
    )  # fmt: skip
    text = pgpool_conf(settings)
    conf = dict(line.split(" = ", 1) for line in text.splitlines())
    assert conf["backend_clustering_mode"] == "'streaming_replication'"
    assert conf["load_balance_mode"] == "'on'"
    assert conf["connection_cache"] == "'on'"
    assert conf["num_init_children"] == "72"
    assert (conf["backend_port0"], conf["backend_weight0"]) == ("1", "0")
    assert (conf["backend_port1"], conf["backend_weight1"]) == ("2", "1")
    assert conf["use_watchdog"] == "'off'"
    assert conf["socket_dir"] == "'/tmp/it''s'"
    assert "password" not in text.replace("sr_check_password = ''", "")
    assert quote_pgpool(3) == "3"


def _doc() -> dict[str, Any]:
    target = {"runs": 2, "errors": 0, "skipped": None, "median_tps": 1234.5, "min_tps": 1200.0,
              "max_tps": 1300.0, "median_latency_ms": 1.5}  # fmt: skip
    return {
        "finished_at": "2026-01-01T00:00:00+00:00",
        "options": {"targets": ["direct", "proxy"], "rounds": 2, "duration": 10, "scale": 10, "jobs": 2},
        "machine": {
            "cpus_usable": 2,
            "platform": "Linux",
            "python": "3.11",
            "postgres": "PostgreSQL 15.1 on x",
        },
        "targets": {
            "proxy": {
                "version": "0.1.0",
                "main_pool_size": 20,
                "read_replica_pool_size": 20,
                "routing": "reads to the streaming replica",
            }
        },
        "summary": [
            {
                "workload": "select-only",
                "mode": "extended",
                "clients": 16,
                "targets": {"direct": target, "proxy": {**target, "median_tps": 617.0}},
                "ratios": {"proxy/direct": {"median": 0.5, "min": 0.45, "max": 0.55, "rounds": 2}},
            }
        ],
        "skipped": [],
        "commands": {"init": "pgbench -i", "runs": ["pgbench -n -b select-only"]},
    }


def test_proxy_is_compared_with_the_ceiling_and_the_ceiling_with_pgbouncer_round_by_round() -> None:
    runs = [
        Run(rnd, target, "select-only", "simple", 16, 10, [], tps=tps, latency_ms=1.0)
        for rnd, target, tps in [
            (1, "pgbouncer", 100.0), (1, "ceiling", 100.0), (1, "proxy", 60.0),
            (2, "pgbouncer", 80.0), (2, "ceiling", 96.0), (2, "proxy", 48.0),
            (3, "pgbouncer", 100.0), (3, "ceiling", 104.0), (3, "proxy", 78.0),
        ]
    ]  # fmt: skip
    cells = (Cell("select-only", "simple", 16),)
    opts = _opts(targets=("pgbouncer", "ceiling", "proxy"), cells=cells, rounds=3)
    [cell] = summarize(runs, opts, {})
    assert cell["ratios"]["proxy/ceiling"]["per_round"] == [0.6, 0.5, 0.75]
    assert cell["ratios"]["proxy/ceiling"]["median"] == pytest.approx(0.6)
    assert cell["ratios"]["ceiling/pgbouncer"]["median"] == pytest.approx(1.04)
    assert cell["ratios"]["proxy/pgbouncer"]["median"] == pytest.approx(0.6)
    assert list(cell["ratios"]) == ["proxy/pgbouncer", "proxy/ceiling", "ceiling/pgbouncer"]


def test_pgbench_markdown_puts_proxy_over_ceiling_beside_proxy_over_pgbouncer() -> None:
    doc = _doc()
    doc["options"]["targets"] = ["pgbouncer", "ceiling", "proxy"]
    doc["targets"]["ceiling"] = {"version": "uvloop 0.21.0"}
    cell = doc["summary"][0]
    cpu = {"pooler": {"user": 9.0, "system": 15.0}, "postgres": {"user": 40.0, "system": 20.0},
           "pgbench": {"user": 4.0, "system": 11.0}, "machine": {"softirq": 17.0, "idle": 6.0}}  # fmt: skip
    target = cell["targets"].pop("direct")
    cell["targets"] |= {"pgbouncer": target, "ceiling": {**target, "median_cpu_us_per_tx": cpu}}
    ratio = {"median": 0.5, "min": 0.45, "max": 0.55, "rounds": 2}
    cell["ratios"] = {"proxy/pgbouncer": ratio, "proxy/ceiling": ratio, "ceiling/pgbouncer": ratio}
    text = report.pgbench_markdown(doc)
    assert (
        "| workload | `-M` | clients | pgbouncer TPS | ceiling TPS | proxy TPS | proxy/pgbouncer "
        "| proxy/ceiling | ceiling/pgbouncer |"
    ) in text
    assert "| select-only | extended | 16 | ceiling | 1,234 | 9 + 15 | 60 | 15 | 17 | 116 | 6 |" in text
    assert "ceiling uvloop 0.21.0" in text
    assert "- ceiling: [bench/ceiling.py](../bench/ceiling.py), a bare uvloop byte forwarder" in text


def test_pgbench_markdown_has_a_row_per_cell_with_ratios_and_commands() -> None:
    text = report.pgbench_markdown(_doc())
    assert "| workload | `-M` | clients | direct TPS | proxy TPS | proxy/direct |" in text
    assert "| select-only | extended | 16 | 1,234 (1.50 ms) | 617 (1.50 ms) | **0.50** (0.45..0.55) |" in text
    assert "pgbench -n -b select-only" in text
    assert "PostgreSQL 15.1, parafort-proxy 0.1.0" in text


def test_replace_block_keeps_the_prose_around_and_appends_missing_blocks() -> None:
    text = "intro\n<!-- bench:pgbench:begin -->\nold\n<!-- bench:pgbench:end -->\noutro\n"
    out = report.replace_block(text, "pgbench", "new $1 \\1")
    assert out == "intro\n<!-- bench:pgbench:begin -->\nnew $1 \\1\n<!-- bench:pgbench:end -->\noutro\n"
    out = report.replace_block(out, "memory", "mem")
    assert out.endswith("<!-- bench:memory:begin -->\nmem\n<!-- bench:memory:end -->\n")
    assert "new $1" in out


def _messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        length = struct.unpack("!i", data[1:5])[0]
        out.append((data[:1], data[5 : 1 + length]))
        data = data[1 + length :]
    return out


def test_memory_client_scram_login_passes_the_proxys_authenticator() -> None:
    auth = ServerAuth("scram-sha-256", "u", make_scram_verifier("pw"))
    [(kind, payload)] = _messages(auth.start())
    assert kind == b"R" and struct.unpack("!i", payload[:4])[0] == 10
    bare = "n=,r=clientnonce123"
    first = f"n,,{bare}".encode()
    reply, done = auth.feed(ord("p"), b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    [(_, payload)] = _messages(reply)
    final = scram_client_final("pw", bare, payload[4:].decode())
    reply, done = auth.feed(ord("p"), final.encode())
    assert done
    assert [struct.unpack("!i", p[:4])[0] for _, p in _messages(reply)] == [12, 0]


def test_memory_client_md5_login_and_startup_packet() -> None:
    auth = ServerAuth("md5", "u", "pw")
    [(_, payload)] = _messages(auth.start())
    _reply, done = auth.feed(ord("p"), md5_response("u", "pw", payload[4:8]))
    assert done
    packet = startup_message("u", "db")
    assert struct.unpack("!ii", packet[:8]) == (len(packet), 196608)
    assert b"user\0u\0database\0db\0" in packet


def test_proxy_settings_merge_into_the_bench_config() -> None:
    extra = deep_merge(
        proxy_setting("statements.cache_unnamed=true"), proxy_setting("roles.main.pool_size=30")
    )
    base = {"roles": {"main": {"pool_size": 20}, "read_replica": {"pool_size": 20}}}
    merged = deep_merge(base, extra)
    assert merged == {
        "roles": {"main": {"pool_size": 30}, "read_replica": {"pool_size": 20}},
        "statements": {"cache_unnamed": True},
    }
    with pytest.raises(ValueError):
        proxy_setting("no-equals-sign")
    with pytest.raises(SystemExit):
        parse_options(["--proxy-set", "a..b=1"])


def test_cpu_table_shows_who_spends_each_transaction() -> None:
    doc = _doc()
    cell = doc["summary"][0]
    cell["targets"]["proxy"]["median_cpu_us_per_tx"] = {
        "pooler": {"user": 26.0, "system": 21.0},
        "postgres": {"user": 45.0, "system": 20.0},
        "pgbench": {"user": 4.0, "system": 11.0},
        "machine": {"softirq": 17.0, "idle": 16.0},
    }
    text = report.pgbench_markdown(doc)
    assert "| select-only | extended | 16 | proxy | 617 | 26 + 21 | 65 | 15 | 17 | 144 | 16 |" in text
    assert "| direct |" not in text  # no sample for direct in this document: no row
    assert "CPU per transaction" not in report.pgbench_markdown(_doc())


def test_cpu_sampler_counts_a_process_tree_and_its_reaped_children(tmp_path: Path) -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    # A parent that runs one burning child to completion (reaped: its parent's cutime), then burns itself.
    script = tmp_path / "tree.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {burn!r}], check=True)\n"
        f"{burn}"
        "sys.stdout.write('done\\n'); sys.stdout.flush()\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        sampler = CpuSampler({"pooler": [proc.pid], "postgres": []}, settle_timeout=0.5)
        sampler.start()
        assert proc.stdout is not None and proc.stdout.readline() == b"done\n"
        cpu = sampler.stop(1000)  # per "transaction": 0.6 s over 1,000 = about 600 µs
    finally:
        proc.kill()
        proc.wait()
    pooler = cpu["pooler"]["user"] + cpu["pooler"]["system"]
    assert 500 <= pooler <= 2000
    assert cpu["postgres"] == {"user": 0.0, "system": 0.0}
    assert set(cpu["machine"]) == {"softirq", "idle"}
    assert set(cpu["pgbench"]) == {"user", "system"}


def test_proc_stat_parsing_survives_parentheses_and_spaces_in_the_name(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    fields = ["S", "7"] + ["0"] * 9 + ["100", "20", "3", "4"] + ["0"] * 30
    (tmp_path / "42" / "stat").write_text("42 (evil) (name) " + " ".join(fields) + "\n")
    assert read_proc(42, tmp_path) == ProcTimes(ppid=7, user=103, system=24)
    assert read_proc(43, tmp_path) is None
    table = process_table(tmp_path)
    assert tree_pids(table, [42, 99]) == {42}


# -- python -m bench faults: its pure parts ---------------------------------------------------------------


def test_faults_hostile_statements_have_the_measured_sizes_and_parse() -> None:
    assert long_sum(30_000) == b"SELECT " + b"+".join([b"1"] * 30_000)
    assert len(long_sum(30_000)) == 60_006
    assert long_union(3) == b"SELECT 0 UNION ALL SELECT 1 UNION ALL SELECT 2"
    stmt, ctes = cte_chain(1_700_000)
    assert 1_700_000 <= len(stmt) < 1_700_100
    # c0 twice: PostgreSQL stops at the duplicate name (42712) instead of its quadratic name check.
    assert stmt.startswith(b"WITH c0 AS (SELECT 1), c0 AS (SELECT 1), c1 AS (SELECT * FROM c0), ")
    assert stmt.endswith(f"c{ctes - 2} AS (SELECT * FROM c{ctes - 3}) SELECT * FROM c{ctes - 2}".encode())
    small, n = cte_chain(200)
    [raw] = pglast.parse_sql(small.decode())
    assert len(raw.stmt.withClause.ctes) == n
    one, two = padded_select(1, 8_000_000), padded_select(2, 8_000_000)
    assert len(one) == len(two) == 8_000_000 and one != two
    assert one.startswith(b"SELECT 1 /* ") and one.endswith(b" */")


def test_faults_reply_phrases() -> None:
    assert describe_reply(Reply(ready=True)) == "ok"
    assert describe_reply(Reply(errors=[("ERROR", "54001", "stack depth")], ready=True)) == "ERROR 54001"
    assert describe_reply(Reply(closed=True)) == "connection lost"
    fatal = Reply(errors=[("FATAL", "57P01", "terminating")], closed=True)
    assert describe_reply(fatal) == "FATAL 57P01, connection closed"
    assert describe_reply(Reply(hang=True)) == "hang"
    assert describe_reply(Reply(errors=[("ERROR", "08006", "lost")], hang=True)) == "ERROR 08006, then hang"
    assert Reply(errors=[("ERROR", "57014", "x"), ("FATAL", "57P01", "y")]).sqlstates() == ["57014", "57P01"]


def test_faults_wire_parsing_and_exit_names() -> None:
    payload = b"SERROR\0VFATAL\0C57P01\0Mterminating connection\0\0"
    assert _error_fields(payload) == ("FATAL", "57P01", "terminating connection")
    row = struct.pack("!h", 3) + struct.pack("!i", 2) + b"42" + struct.pack("!i", -1) + struct.pack("!i", 0)
    assert _data_row(row) == ["42", None, ""]
    assert signal_name(-11) == "SIGSEGV"
    assert signal_name(0) == "exit 0"
    assert signal_name(None) is None


def test_faults_percentiles_and_psql_error_lines() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None
    stderr = (
        "psql:kill.sql:3: FATAL:  terminating connection due to administrator command\n"
        "psql:kill.sql:3: ERROR:  connection to the main upstream was lost\n"
        "psql:kill.sql:6: WARNING:  there is no transaction in progress\n"
        "psql:kill.sql:3: error: connection to server was lost\n"
    )
    assert len(error_lines(stderr)) == 3


def _faults_results() -> dict[str, Any]:
    died = {"proxy_alive_after": False, "proxy_exit": "SIGSEGV"}
    alive = {"proxy_alive_after": True, "proxy_exit": None}
    kill = {"rows": "2,3", "psql_exit": 0, "error_line_count": 2, "killed": True}
    return {
        "crash": {
            "sum": {"bytes": 60006, "client": "connection lost", "direct": "ERROR 54001", **died},
            "union": {"bytes": 448879, "client": "connection lost", "direct": "ERROR 54001", **died},
            "cte": {"bytes": 1700046, "bystander_max_gap_ms": 10629.7, "bystander_baseline_max_ms": 12.2,
                    "client": "ERROR 42712", "client_ms": 10703.2, **alive},
        },
        "kill": {"proxy": kill, "direct": {**kill, "rows": "", "psql_exit": 2, "error_line_count": 3}},
        "idle_tx": {"proxy": {"next": "ERROR 08006, then hang"}, "direct": {"next": "connection lost"}},
        "cancels": {"bystander_57014": 36, "bystander_statements": 3134, "bystander_other_errors": 0,
                    "canceller_57014": 67, "canceller_statements": 67},
        "rss": {"baseline_mb": 62.4, "after_statements_mb": 385.1, "after_disconnect_mb": 385.1,
                "big_message_cpu_s": 5.67, "big_message_wall_s": 13.31, "big_message_reply": "ok", **alive},
        "login_flood": {"error": "hang: no result within the 90 s deadline"},
        "main_return": {"refused_ms": 723.1, "refused_25006": 97, "other_errors": 0},
        "domain_outage": {"readable_after": 0, "acknowledged": 7773, "on_main": 7773, "on_analytics": 0,
                          "refused": 0, "refused_sqlstates": {}},
    }  # fmt: skip


def test_faults_table_has_a_row_per_finding_and_names_what_was_not_measured() -> None:
    rows = dict(table_rows(_faults_results()))
    assert rows["crash: SELECT 1+1+... (60,006 B)"] == (
        "proxy DIED (SIGSEGV); client: connection lost; direct: ERROR 54001"
    )
    assert "bystander max gap 10,629.7 ms" in rows["crash: CTE chain (1,700,046 B)"]
    assert rows["rows committed after kill (proxy)"].startswith("rows 2,3; psql exit 0; 2 error lines")
    assert rows["rows committed after kill (direct)"].startswith("rows none; psql exit 2")
    assert rows["idle-in-tx loss: next statement"] == "proxy: ERROR 08006, then hang; direct: connection lost"
    assert rows["bystander cancels"].startswith("bystanders 36 x 57014 in 3,134 statements")
    assert "client gone 385.1 MB" in rows["RSS after 40 x 8 MB statements"]
    assert rows["one 64 MB message"].startswith("proxy CPU 5.7 s")
    assert rows["login flood"] == "NOT MEASURED: hang: no result within the 90 s deadline"
    assert rows["writes refused after main is back"].startswith("723.1 ms (97 x 25006")
    assert rows["analytics down: inserts readable after"] == (
        "0 of 7773 acknowledged (main's copy 7773, analytics 0); refused 0"
    )
    after = _faults_results()
    after["domain_outage"].update(
        acknowledged=0, on_main=0, refused=447, refused_sqlstates={"57P03": 446, "08006": 1}
    )
    assert dict(table_rows(after))["analytics down: inserts readable after"].endswith(
        "refused 447 (57P03 x 446, 08006 x 1)"
    )
    assert table_rows({}) == []  # nothing ran, nothing to show
    text = format_table(table_rows(_faults_results()))
    assert text.splitlines()[0].startswith("measurement ") and text.count("\n") == len(rows) + 1


# -- python -m bench ryw -------------------------------------------------------------------------------------


def test_ryw_script_writes_one_key_of_its_own_client_then_reads_it_nine_times() -> None:
    script = workload_script()
    lines = script.splitlines()
    assert lines[0].startswith("\\set id :client_id * ")
    assert lines[1].startswith("INSERT INTO ryw_items (id, v) VALUES (:id, 1) ON CONFLICT (id)")
    assert lines[2:] == ["SELECT v FROM ryw_items WHERE id = :id;"] * 9
    for line in lines[1:]:  # each statement parses (pgbench's :id replaced by a literal)
        pglast.parse_sql(line.replace(":id", "1"))
    assert len(workload_script(reads=3).splitlines()) == 5


METRICS_BEFORE = """# HELP parafort_proxy_routed_statements_total Units routed.
# TYPE parafort_proxy_routed_statements_total counter
parafort_proxy_routed_statements_total{role="main",kind="read"} 10.0
parafort_proxy_routed_statements_total{role="main",kind="write"} 5.0
parafort_proxy_routed_statements_total{role="read_replica",kind="read"} 20.0
"""
METRICS_AFTER = """parafort_proxy_routed_statements_total{role="main",kind="read"} 40.0
parafort_proxy_routed_statements_total{role="main",kind="write"} 25.0
parafort_proxy_routed_statements_total{role="read_replica",kind="read"} 170.0
not a sample line
"""


def test_metrics_are_parsed_with_their_labels() -> None:
    samples = parse_metrics(METRICS_BEFORE + 'x_total{a="q\\"uote"} 1e3\n')
    key = ("parafort_proxy_routed_statements_total", frozenset({("role", "main"), ("kind", "read")}))
    assert samples[key] == 10.0
    assert samples["x_total", frozenset({("a", 'q\\"uote')})] == 1000.0
    assert len(samples) == 4


def test_read_routing_is_the_difference_of_two_scrapes_and_na_without_the_outcome_metric() -> None:
    routing = read_routing(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER))
    assert routing["reads"] == 180.0  # (40 - 10) on main + (170 - 20) on the replica
    assert routing["reads_on_replica"] == 150.0
    assert routing["replica_share"] == pytest.approx(150 / 180)
    assert routing["outcomes"] is None  # a build without read-your-writes: "n/a"
    after = METRICS_AFTER + "\n".join(
        f'parafort_proxy_replica_reads_total{{outcome="{o}"}} {v}'
        for o, v in (("replica", 120), ("replica_after_wait", 30), ("main_for_consistency", 30))
    )
    routing = read_routing(parse_metrics(METRICS_BEFORE), parse_metrics(after))
    assert routing["outcomes"] == {"replica": 120, "replica_after_wait": 30, "main_for_consistency": 30}
    assert read_routing({}, {})["replica_share"] is None


def test_ryw_markdown_gives_ratios_to_pgbouncer_and_says_what_is_missing() -> None:
    routing = read_routing(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER))
    doc = {
        "clients": 16, "duration_s": 20, "mode": "extended", "reads_per_write": 9,
        "cells": [
            {"target": "direct", "scope": None, "tps": 1200.0},
            {"target": "pgbouncer", "scope": None, "tps": 1000.0, "pooler_cpu_us": 50.0},
            {"target": "proxy", "scope": "off", "tps": 800.0, "pooler_cpu_us": 400.0, "routing": routing},
            {"target": "proxy", "scope": "off", "tps": 700.0, "routing": routing, "note": "no setting"},
            {"target": "proxy", "scope": "user", "error": "not supported by this build"},
        ],
        "stale": {"rounds": 200, "delay_ms": 300, "results": [
            {"scope": "off", "stale": 197, "rounds": 200, "routing": routing},
            {"scope": "user", "error": "not supported by this build"},
        ]},
    }  # fmt: skip
    text = ryw_markdown(doc)
    assert "| proxy | off | 800 | **0.80** | 400 | 83.3 % | n/a |" in text
    assert "| direct | - | 1,200 | **1.20** |" in text
    assert "| proxy | off (no setting) | 700 | **0.70** |  | 83.3 % | n/a |" in text
    assert "| proxy | user | not supported by this build |" in text
    assert "| off | 197 / 200 | 83.3 % | n/a |" in text
    assert "| user | not supported by this build |" in text
