"""``python -m bench faults``: issue 13's fault and hostile-input findings, measured before and after a fix.

    .venv/bin/python -m bench faults [--source DIR] [--json OUT] [--only NAME,...]

Throwaway clusters (main and analytics, with the demo schema) and a proxy run from the source tree ``DIR``
(``python -m proxy run`` with ``PYTHONPATH=DIR`` and ``cwd=DIR``, this venv's python; default: this
checkout), so one harness measures old and new code alike. Each measurement starts its own proxy; one that
died or hangs is recorded as such and the next measurement starts a fresh one. Every measurement has a
deadline (a missed one is recorded as a hang). See bench/README.md for what each measurement does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench.memory import _message, md5_response, scram_client_final, startup_message
from bench.pgbench_compare import guarded, machine_facts, results_path, write_json
from bench.targets import HOST, Tools
from proxy.dev.cluster import Cluster, DevClusters, find_bindir, free_port
from proxy.dev.demo import DEMO_DOMAINS, SCHEMA

CHECKOUT = Path(__file__).resolve().parent.parent
APP_USER = "app"
APP_PASSWORD = "faults-app-pw"  # plain text in the proxy's users file (PBKDF2 per SCRAM login, issue 13 #7)
APP_DATABASE = "app"
CANCEL_REQUEST_CODE = 80877102
# Health probes faster than the default 2 s, so that down/up transitions happen within the run.
HEALTH = {"interval": "500ms", "timeout": "1s"}
MAIN_SCRATCH = """
CREATE TABLE faults_kill (n int NOT NULL);
CREATE TABLE faults_write (id bigserial PRIMARY KEY, note text);
"""
QUERY_DEADLINE = 30.0
CANCEL_INTERVAL = 0.005  # the cancelling client repeats its CancelRequest this often until its reply arrives
MEASUREMENTS = ("crash", "kill", "idle_tx", "cancels", "rss", "login_flood", "main_return", "domain_outage")


# -- hostile statements ------------------------------------------------------------------------------------


def long_sum(terms: int) -> bytes:
    """``SELECT 1+1+...+1`` with ``terms`` ones (30,000: 60 KB, deep enough to overflow a recursive walk)."""
    return ("SELECT " + "+".join(["1"] * terms)).encode()


def long_union(selects: int) -> bytes:
    """``SELECT 0 UNION ALL SELECT 1 ...`` with ``selects`` SELECTs."""
    return " UNION ALL ".join(f"SELECT {i}" for i in range(selects)).encode()


def cte_chain(target_bytes: int) -> tuple[bytes, int]:
    """``WITH c0 AS (SELECT 1), c0 AS (SELECT 1), c1 AS (SELECT * FROM c0), ... SELECT * FROM cN`` of at
    least ``target_bytes``; (statement, number of CTEs).

    The name c0 is given twice on purpose: PostgreSQL's analysis compares every CTE name with every other
    (quadratic: ~30 s of server CPU for 1.7 MB, with no interrupt check), but stops at the first duplicate
    and answers 42712 at once. The proxy's parse and walk of the statement cost the same either way.
    """
    parts = ["c0 AS (SELECT 1)", "c0 AS (SELECT 1)"]
    size = len("WITH ") + sum(len(p) + 2 for p in parts)
    i = 0
    while size < target_bytes:
        i += 1
        part = f"c{i} AS (SELECT * FROM c{i - 1})"
        parts.append(part)
        size += len(part) + 2
    return f"WITH {', '.join(parts)} SELECT * FROM c{i}".encode(), len(parts)


def padded_select(index: int, size: int) -> bytes:
    """A distinct ``SELECT 1 /* ... */`` statement of exactly ``size`` bytes."""
    head = f"SELECT 1 /* {index:08d} ".encode()
    tail = b" */"
    return head + b"x" * (size - len(head) - len(tail)) + tail


# -- a raw PostgreSQL client (simple protocol, hostile sizes, CancelRequest) ---------------------------


class LoginFailed(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate


@dataclass
class Reply:
    """What came back for one simple Query: its errors, rows, and how it ended."""

    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (severity, SQLSTATE, message)
    rows: list[list[str | None]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    ready: bool = False  # ReadyForQuery arrived
    closed: bool = False  # the server closed the connection
    hang: bool = False  # nothing final before the deadline
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.ready and not self.errors

    def sqlstates(self) -> list[str]:
        return [code for _sev, code, _msg in self.errors]


def describe_reply(reply: Reply) -> str:
    """One short phrase: ``ok``, ``ERROR 54001``, ``FATAL 57P01, connection closed``, ``connection lost``
    (closed without an error), ``hang`` (nothing before the deadline) or ``ERROR 08006, then hang`` (an
    error but no ReadyForQuery)."""
    parts = [f"{sev} {code}" for sev, code, _msg in reply.errors]
    if reply.hang:
        parts.append("then hang" if parts else "hang")
    elif reply.closed:
        parts.append("connection closed" if parts else "connection lost")
    elif not parts:
        parts.append("ok" if reply.ready else "no reply")
    return ", ".join(parts)


def _error_fields(payload: bytes) -> tuple[str, str, str]:
    fields = {f[:1]: f[1:].decode(errors="replace") for f in payload.split(b"\0") if f}
    severity = fields.get(b"V") or fields.get(b"S") or "ERROR"
    return severity, fields.get(b"C", "?????"), fields.get(b"M", "")


def _data_row(payload: bytes) -> list[str | None]:
    count = struct.unpack("!h", payload[:2])[0]
    pos = 2
    out: list[str | None] = []
    for _ in range(count):
        n = struct.unpack("!i", payload[pos : pos + 4])[0]
        pos += 4
        if n < 0:
            out.append(None)
        else:
            out.append(payload[pos : pos + n].decode(errors="replace"))
            pos += n
    return out


class RawClient:
    """One PostgreSQL v3 connection over asyncio streams: login (SCRAM, md5, trust), simple queries."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.reader = reader
        self.writer = writer
        self.port = port
        self.pid = 0
        self.secret = 0

    @classmethod
    async def connect(
        cls, port: int, user: str, password: str, database: str, within: float = 15.0
    ) -> RawClient:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(HOST, port)
            client = cls(reader, writer, port)
            try:
                await client._login(user, password, database, wrong_proof=False)
            except BaseException:
                client.close()
                raise
            return client

    async def _read(self) -> tuple[bytes, bytes]:
        head = await self.reader.readexactly(5)
        length = struct.unpack("!i", head[1:])[0]
        return head[:1], await self.reader.readexactly(length - 4)

    async def _login(self, user: str, password: str, database: str, *, wrong_proof: bool) -> None:
        self.writer.write(startup_message(user, database))
        client_first_bare = ""
        while True:
            kind, payload = await self._read()
            if kind == b"R":
                code = struct.unpack("!i", payload[:4])[0]
                if code == 5:
                    self.writer.write(_message(b"p", md5_response(user, password, payload[4:8])))
                elif code == 10:
                    client_first_bare = f"n=,r={secrets.token_urlsafe(18)}"
                    first = f"n,,{client_first_bare}".encode()
                    self.writer.write(
                        _message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
                    )
                elif code == 11:
                    server_first = payload[4:].decode()
                    if wrong_proof:  # a wrong password costs the client nothing: any proof will do
                        nonce = dict(p.split("=", 1) for p in server_first.split(","))["r"]
                        proof = base64.b64encode(secrets.token_bytes(32)).decode()
                        final = f"c=biws,r={nonce},p={proof}"
                    else:
                        final = scram_client_final(password, client_first_bare, server_first)
                    self.writer.write(_message(b"p", final.encode()))
                elif code not in (0, 12):
                    raise LoginFailed("-----", f"unsupported authentication request {code}")
            elif kind == b"K":
                self.pid, self.secret = struct.unpack("!ii", payload[:8])
            elif kind == b"E":
                _sev, code, message = _error_fields(payload)
                raise LoginFailed(code, message)
            elif kind == b"Z":
                return

    async def query(self, sql: str | bytes, within: float = QUERY_DEADLINE) -> Reply:
        """Send one Query message and read until ReadyForQuery, the connection's end, or the deadline."""
        body = sql.encode() if isinstance(sql, str) else sql
        reply = Reply()
        start = time.monotonic()
        try:
            async with asyncio.timeout(within):
                self.writer.write(b"Q" + struct.pack("!i", len(body) + 5) + body + b"\0")
                await self.writer.drain()
                while True:
                    kind, payload = await self._read()
                    if kind == b"E":
                        reply.errors.append(_error_fields(payload))
                    elif kind == b"D":
                        reply.rows.append(_data_row(payload))
                    elif kind == b"C":
                        reply.tags.append(payload.rstrip(b"\0").decode())
                    elif kind == b"Z":
                        reply.ready = True
                        break
        except TimeoutError:
            reply.hang = True
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            reply.closed = True
        reply.seconds = time.monotonic() - start
        return reply

    async def unsolicited(self, within: float) -> list[str]:
        """Messages that arrive within ``within`` seconds without a query (e.g. a FATAL for a lost
        backend), as ``E 57P01``-style strings, plus ``closed`` if the connection ends meanwhile."""
        out: list[str] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                try:
                    while True:
                        kind, payload = await self._read()
                        out.append(f"E {_error_fields(payload)[1]}" if kind == b"E" else kind.decode())
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    out.append("closed")
        return out

    async def cancel(self, within: float = 5.0) -> None:
        """A CancelRequest for this connection's key, on a new connection (as libpq does)."""
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(within):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                writer.write(struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, self.pid, self.secret))
                await writer.drain()
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    await reader.read()  # the server closes it once the request is read
                writer.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write(_message(b"X", b""))
            self.writer.close()


async def wrong_password_login(port: int, user: str, within: float = 10.0) -> str:
    """One login with a wrong password: the SQLSTATE it was refused with (``28P01``), or what happened."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(HOST, port)
            client = RawClient(reader, writer, port)
            try:
                await client._login(user, "not-the-password", APP_DATABASE, wrong_proof=True)
                return "accepted"
            finally:
                client.close()
    except LoginFailed as exc:
        return exc.sqlstate
    except TimeoutError:
        return "timeout"
    except (OSError, asyncio.IncompleteReadError):
        return "connection lost"


# -- the proxy, from a given source tree ----------------------------------------------------------------


def signal_name(returncode: int | None) -> str | None:
    """``None`` (running), ``SIGSEGV`` for a death by signal, else ``exit N``."""
    if returncode is None:
        return None
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-returncode).name
        return f"signal {-returncode}"
    return f"exit {returncode}"


def source_facts(source: Path) -> dict[str, Any]:
    """Which code the measured proxy runs: the tree, its commit and whether proxy/ has uncommitted changes."""
    facts: dict[str, Any] = {"dir": str(source)}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "proxy"],
                               capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        facts["commit"] = head.stdout.strip() or None
        facts["uncommitted_changes"] = bool(dirty.stdout.strip())
    return facts


def proxy_env(source: Path, role_urls: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.endswith("DATABASE_URL")}
    env.update(role_urls, PYTHONPATH=str(source), PYTHONUNBUFFERED="1")
    return env


def imported_from(source: Path) -> str:
    """Where ``import proxy`` resolves for a process started like the measured proxy."""
    proc = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"], cwd=source,
        env=proxy_env(source, {}), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"python cannot import proxy from {source}: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


class Proxy:
    """``python -m proxy run`` from ``source``, its own config and users file, stopped by pid."""

    def __init__(
        self, source: Path, workdir: Path, role_urls: dict[str, str], config: dict[str, Any]
    ) -> None:
        self.source = source
        self.workdir = Path(tempfile.mkdtemp(prefix="proxy-", dir=workdir))
        self.role_urls = role_urls
        self.port = free_port()
        self.admin_port = free_port()
        users = self.workdir / "userlist.txt"
        users.write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n')
        users.chmod(0o600)
        doc: dict[str, Any] = {
            "listen": {"host": HOST, "port": self.port},
            "admin": {"host": HOST, "port": self.admin_port},
            "auth": {"method": "scram-sha-256", "users_file": str(users)},
            "log": {"level": "info"},
            **config,
        }
        self.config_path = self.workdir / "proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.log_path = self.workdir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_by_us = False
        self.reaped = False

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path)],
                cwd=self.source, env=proxy_env(self.source, self.role_urls), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not all(_tcp_open(p) for p in (self.port, self.admin_port)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited ({signal_name(self.proc.returncode)}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"proxy not listening after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exit_status(self) -> str | None:
        return signal_name(self.proc.poll()) if self.proc is not None else None

    async def client(self, within: float = 15.0) -> RawClient:
        return await RawClient.connect(self.port, APP_USER, APP_PASSWORD, APP_DATABASE, within)

    async def answers(self, within: float = 10.0) -> bool:
        """Alive: the process runs and a new client logs in and gets ``SELECT 1`` answered in time."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            client = await self.client(within)
        except (OSError, TimeoutError, LoginFailed, asyncio.IncompleteReadError):
            return False
        try:
            return (await client.query("SELECT 1", within)).ok
        finally:
            client.close()

    def health(self) -> dict[str, Any]:
        url = f"http://{HOST}:{self.admin_port}/api/health/databases"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 503 without a healthy main: same body
            body = json.loads(exc.read())
        return body

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None or self.reaped:
            return
        self.reaped = True
        if proc.poll() is None:
            self.stopped_by_us = True
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _tcp_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


# -- small pure helpers ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def error_lines(stderr: str) -> list[str]:
    """psql's error lines (ERROR/FATAL, lost connections, its own ``psql: error``), in order."""
    keys = ("ERROR:", "FATAL:", "error:", "connection to server was lost", "server closed the connection")
    return [line.strip() for line in stderr.splitlines() if any(k in line for k in keys)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value}{unit}"


def _codes(counts: dict[str, int]) -> str:
    """`` (57P03 x 446, 08006 x 1)`` or nothing."""
    if not counts:
        return ""
    return " (" + ", ".join(f"{code} x {n}" for code, n in sorted(counts.items(), key=lambda c: -c[1])) + ")"


def _proxy_fate(part: dict[str, Any]) -> str:
    if part.get("proxy_alive_after"):
        return "proxy alive"
    return f"proxy DIED ({part.get('proxy_exit') or 'not answering'})"


Row = tuple[str, str]


def _crash_rows(crash: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for key, label in (("sum", "crash: SELECT 1+1+..."), ("union", "crash: UNION ALL chain")):
        part = crash[key]
        fate = f"{_proxy_fate(part)}; client: {part['client']}; direct: {part['direct']}"
        rows.append((f"{label} ({part['bytes']:,} B)", fate))
    cte = crash["cte"]
    gap, before = _fmt(cte["bystander_max_gap_ms"], " ms"), _fmt(cte["bystander_baseline_max_ms"], " ms")
    client = f"client: {cte['client']} in {_fmt(cte['client_ms'], ' ms')}"
    text = f"bystander max gap {gap} (before it {before}); {client}; {_proxy_fate(cte)}"
    return [*rows, (f"crash: CTE chain ({cte['bytes']:,} B)", text)]


def _kill_rows(k: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for via in ("proxy", "direct"):
        part = k[via]
        outcome = f"rows {part['rows'] or 'none'}; psql exit {part['psql_exit']}"
        errors = f"{part['error_line_count']} error lines; backend killed: {part['killed']}"
        rows.append((f"rows committed after kill ({via})", f"{outcome}; {errors}"))
    return rows


def _idle_tx_text(i: dict[str, Any]) -> str:
    return "; ".join(f"{via}: {i[via].get('summary', i[via]['next'])}" for via in ("proxy", "direct"))


def _cancels_text(c: dict[str, Any]) -> str:
    return (
        f"bystanders {c['bystander_57014']} x 57014 in {c['bystander_statements']:,} statements "
        f"({c['bystander_other_errors']} other errors); canceller {c['canceller_57014']} x 57014 "
        f"in {c['canceller_statements']}"
    )


def _rss_rows(r: dict[str, Any]) -> list[Row]:
    after = [_fmt(r[key], " MB") for key in ("baseline_mb", "after_statements_mb", "after_disconnect_mb")]
    cpu, wall = _fmt(r["big_message_cpu_s"], " s"), _fmt(r["big_message_wall_s"], " s")
    memory = "baseline {}, after {}, client gone {}".format(*after)
    return [
        ("RSS after 40 x 8 MB statements", f"{memory}; {_proxy_fate(r)}"),
        ("one 64 MB message", f"proxy CPU {cpu}, reply {r['big_message_reply']} in {wall}"),
    ]


def _login_flood_text(f: dict[str, Any]) -> str:
    quiet = f"{_fmt(f['quiet_p50_ms'])}/{_fmt(f['quiet_p99_ms'], ' ms')}"
    flood = f"{_fmt(f['flood_p50_ms'])}/{_fmt(f['flood_p99_ms'], ' ms')}"
    rate = _fmt(f["failed_logins_per_s"])
    return f"p50/p99 {quiet} quiet; {flood} at {rate} failed logins/s (target {f['target_rate']})"


def _main_return_text(m: dict[str, Any]) -> str:
    return (
        f"{_fmt(m['refused_ms'], ' ms')} ({m['refused_25006']} x 25006, {m['other_errors']} other errors) "
        "until the first write through the proxy commits"
    )


def _domain_outage_text(d: dict[str, Any]) -> str:
    where = f"main's copy {d['on_main']}, analytics {d['on_analytics']}"
    refused = f"refused {d['refused']}{_codes(d['refused_sqlstates'])}"
    return f"{d['readable_after']} of {d['acknowledged']} acknowledged ({where}); {refused}"


def _one(label: str, text: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], list[Row]]:
    return lambda res: [(label, text(res))]


# Per measurement, in the table's order: the row's label when it was not measured, and its rows.
TABLE: dict[str, tuple[str, Callable[[dict[str, Any]], list[Row]]]] = {
    "crash": ("crash", _crash_rows),
    "kill": ("rows committed after kill", _kill_rows),
    "idle_tx": ("idle-in-tx loss", _one("idle-in-tx loss: next statement", _idle_tx_text)),
    "cancels": ("bystander cancels", _one("bystander cancels", _cancels_text)),
    "rss": ("RSS after large statements", _rss_rows),
    "login_flood": ("login flood", _one("login flood: bystander SELECT 1", _login_flood_text)),
    "main_return": (
        "writes refused after main returns",
        _one("writes refused after main is back", _main_return_text),
    ),
    "domain_outage": (
        "domain outage visibility",
        _one("analytics down: inserts readable after", _domain_outage_text),
    ),
}


def table_rows(results: dict[str, dict[str, Any]]) -> list[Row]:
    """(measurement, result) rows of the summary table, one or more per measurement that ran."""
    rows: list[Row] = []
    for name, (label, build) in TABLE.items():
        res = results.get(name)
        if res is not None:
            rows += [(label, f"NOT MEASURED: {res['error']}")] if "error" in res else build(res)
    return rows


def format_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max((len(label) for label, _ in rows), default=10)
    lines = [f"{'measurement':<{width}} | result", f"{'-' * width}-+-{'-' * 40}"]
    lines += [f"{label:<{width}} | {value}" for label, value in rows]
    return "\n".join(lines)


# -- the measurements --------------------------------------------------------------------------------------


class Harness:
    def __init__(self, pg: DevClusters, source: Path, workdir: Path, tools: Tools) -> None:
        self.pg = pg
        self.source = source
        self.workdir = workdir
        self.tools = tools
        self.proxies: list[Proxy] = []  # this measurement's
        self.started: list[Proxy] = []  # every one, for close()
        self.crashes: list[dict[str, Any]] = []
        self.rng = random.Random(13)
        self.current = ""

    def close(self) -> None:
        """Stop every proxy still running (also when the run was interrupted)."""
        for proxy in self.started:
            proxy.stop()

    # helpers -------------------------------------------------------------------------------------------

    def role_urls(self, *roles: str) -> dict[str, str]:
        env = self.pg.env()
        names = {"main": "DATABASE_URL", "analytics": "ANALYTICS_DATABASE_URL"}
        return {names[r]: env[names[r]] for r in roles}

    async def start_proxy(
        self, upstreams: Iterable[str] = ("main",), config: dict[str, Any] | None = None
    ) -> Proxy:
        doc: dict[str, Any] = {"health": HEALTH, "domains": DEMO_DOMAINS, **(config or {})}
        proxy = Proxy(self.source, self.workdir, self.role_urls(*upstreams), doc)
        self.proxies.append(proxy)
        self.started.append(proxy)
        await asyncio.to_thread(proxy.start)
        return proxy

    async def fate(self, proxy: Proxy) -> dict[str, Any]:
        """Whether ``proxy`` still answers; a dead one is recorded as a crash of this measurement."""
        alive = await proxy.answers()
        out: dict[str, Any] = {"proxy_alive_after": alive, "proxy_exit": proxy.exit_status()}
        if not alive:
            self.crashes.append({"measurement": self.current, **out, "log_tail": proxy.log_tail()})
        return out

    async def direct(self, cluster: Cluster | None = None) -> RawClient:
        c = cluster or self.pg.main
        return await RawClient.connect(c.port, c.user, c.password, c.database)

    async def psql_super(self, sql: str, cluster: Cluster | None = None) -> str:
        return await asyncio.to_thread((cluster or self.pg.main).psql, sql)

    async def stop_proxies(self) -> None:
        for proxy in self.proxies:
            await asyncio.to_thread(proxy.stop)
        self.proxies.clear()

    async def restore_clusters(self) -> None:
        for role in ("main", "analytics"):
            if not self.pg[role].running:
                await asyncio.to_thread(self.pg[role].start)

    async def wait_health(self, proxy: Proxy, role: str, up: bool, within: float = 20.0) -> float:
        """Poll the health endpoint until ``role`` is reported ``up``; returns when (monotonic)."""
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(OSError, ValueError):
                if (await asyncio.to_thread(proxy.health)).get(role) is up:
                    return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxy did not report {role} {'up' if up else 'down'} in {within}s")
            await asyncio.sleep(0.05)

    # 1. crash ----------------------------------------------------------------------------------------

    async def crash(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, stmt in (("sum", long_sum(30_000)), ("union", long_union(20_000))):
            proxy = await self.start_proxy()
            client = await proxy.client()
            reply = await client.query(stmt)
            client.close()
            direct = await self.direct()
            direct_reply = await direct.query(stmt)
            direct.close()
            out[key] = {
                "bytes": len(stmt),
                "client": describe_reply(reply),
                "client_ms": _ms(reply.seconds),
                "direct": describe_reply(direct_reply),
                "direct_ms": _ms(direct_reply.seconds),
                **await self.fate(proxy),
            }
            await self.stop_proxies()
        out["cte"] = await self._cte_bystander()
        return out

    async def _cte_bystander(self) -> dict[str, Any]:
        stmt, ctes = cte_chain(1_700_000)
        proxy = await self.start_proxy()
        bystander = await proxy.client()
        client = await proxy.client()
        latencies: list[tuple[float, float]] = []  # (answered at, seconds)
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                reply = await bystander.query("SELECT 1", within=QUERY_DEADLINE)
                latencies.append((time.monotonic(), reply.seconds))
                if not reply.ok:
                    return

        task = asyncio.create_task(loop())
        await asyncio.sleep(1.0)
        sent = time.monotonic()
        reply = await client.query(stmt, within=60)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, QUERY_DEADLINE + 5)
        client.close()
        bystander.close()
        direct = await self.direct()
        direct_reply = await direct.query(stmt, within=60)
        direct.close()
        during = [s for at, s in latencies if at >= sent]
        before = [s for at, s in latencies if at < sent]
        return {
            "bytes": len(stmt),
            "ctes": ctes,
            "client": describe_reply(reply),
            "client_ms": _ms(reply.seconds),
            "direct": describe_reply(direct_reply),
            "direct_ms": _ms(direct_reply.seconds),
            "bystander_answers": len(latencies),
            "bystander_max_gap_ms": _ms(max(during, default=None)),
            "bystander_baseline_max_ms": _ms(max(before, default=None)),
            **await self.fate(proxy),
        }

    # 2. rows committed after the kill ----------------------------------------------------------------

    async def kill(self) -> dict[str, Any]:
        proxy = await self.start_proxy()
        main = self.pg.main
        out = {
            "proxy": await self._kill_once(proxy.port, APP_USER, APP_PASSWORD, APP_DATABASE),
            "direct": await self._kill_once(main.port, main.user, main.password, main.database),
        }
        out.update(await self.fate(proxy))
        return out

    async def _kill_once(self, port: int, user: str, password: str, database: str) -> dict[str, Any]:
        await self.psql_super("TRUNCATE faults_kill")
        script = self.workdir / "kill.sql"
        script.write_text(
            "BEGIN;\nINSERT INTO faults_kill VALUES (1);\nSELECT pg_sleep(3) AS faults_kill_sleep;\n"
            "INSERT INTO faults_kill VALUES (2);\nINSERT INTO faults_kill VALUES (3);\nCOMMIT;\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10", LC_ALL="C")
        proc = await asyncio.create_subprocess_exec(
            self.tools.psql, "-X", "-h", HOST, "-p", str(port), "-U", user, "-d", database,
            "-f", str(script), env=env, stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        killed = False
        try:
            deadline = time.monotonic() + 10
            find = (
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE 'SELECT pg_sleep(3) AS faults_kill_sleep%' AND pid <> pg_backend_pid()"
            )
            while not killed and time.monotonic() < deadline:
                killed = (await self.psql_super(find)) == "t"
                if not killed:
                    await asyncio.sleep(0.05)
            try:
                stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
            except TimeoutError:
                return {"killed": killed, "rows": None, "psql_exit": "hang", "error_line_count": None}
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        rows = await self.psql_super(
            "SELECT coalesce(string_agg(n::text, ',' ORDER BY n), '') FROM faults_kill"
        )
        errors = error_lines(stderr.decode(errors="replace"))
        return {
            "killed": killed,
            "rows": rows,
            "psql_exit": proc.returncode,
            "error_line_count": len(errors),
            "error_lines": [e.replace(password, "***").replace(f"{script.parent}/", "") for e in errors],
            "stdout_tail": stdout.decode(errors="replace").strip().splitlines()[-3:],
        }

    # 3. idle in transaction, upstream lost -----------------------------------------------------------

    async def idle_tx(self) -> dict[str, Any]:
        proxy = await self.start_proxy()
        out = {
            "proxy": await self._idle_once(await proxy.client()),
            "direct": await self._idle_once(await self.direct()),
        }
        out.update(await self.fate(proxy))
        return out

    async def _idle_once(self, client: RawClient) -> dict[str, Any]:
        try:
            begin = await client.query("BEGIN")
            first = await client.query("SELECT pg_backend_pid()")
            if not (begin.ok and first.ok and first.rows):
                return {"next": f"setup failed: {describe_reply(begin)} / {describe_reply(first)}"}
            backend = int(first.rows[0][0] or 0)
            await self.psql_super(f"SELECT pg_terminate_backend({backend})")
            deadline = time.monotonic() + 10
            gone = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}"
            while time.monotonic() < deadline:
                if await self.psql_super(gone) == "0":
                    break
                await asyncio.sleep(0.05)
            unsolicited = await client.unsolicited(0.5)
            reply = await client.query("SELECT 1", within=10)
            after = "n/a"
            if not reply.closed and not reply.hang:
                after = describe_reply(await client.query("SELECT 1", within=10))
            seen = describe_reply(reply)
            if unsolicited:
                seen = f"while idle {', '.join(unsolicited)}; then {seen}"
            return {
                "summary": seen,
                "unsolicited_before_it": unsolicited,
                "next": describe_reply(reply),
                "messages": [f"{s} {c}: {m}" for s, c, m in reply.errors],
                "statement_after": after,
            }
        finally:
            client.close()

    # 4. bystander cancels ----------------------------------------------------------------------------

    async def cancels(self, duration: float = 10.0, bystanders: int = 40) -> dict[str, Any]:
        proxy = await self.start_proxy(config={"roles": {"main": {"pool_size": 4}}})
        clients = await asyncio.gather(*(proxy.client() for _ in range(bystanders)))
        canceller = await proxy.client()
        end = time.monotonic() + duration
        counts: Counter[str] = Counter()

        async def bystander(c: RawClient) -> None:
            while time.monotonic() < end:
                reply = await c.query("SELECT pg_sleep(0.01)")
                counts["statements"] += 1
                codes = reply.sqlstates()
                counts["57014"] += codes.count("57014")
                counts["other"] += len(codes) - codes.count("57014") + (0 if reply.ready else 1)
                if not reply.ready:
                    return

        async def cancel_loop() -> None:
            while time.monotonic() < end:
                task = asyncio.create_task(canceller.query("SELECT pg_sleep(1)"))
                await asyncio.sleep(self.rng.uniform(0.0, 0.2))
                requests: list[asyncio.Task[None]] = []
                while not task.done():  # an impatient client: cancel again until the statement ends
                    requests.append(asyncio.create_task(canceller.cancel()))
                    await asyncio.sleep(CANCEL_INTERVAL)
                reply = await task
                await asyncio.gather(*requests)
                counts["c_requests"] += len(requests)
                counts["c_statements"] += 1
                counts["c_57014"] += reply.sqlstates().count("57014")
                if not reply.ready:
                    return

        await asyncio.gather(*(bystander(c) for c in clients), cancel_loop())
        for c in [*clients, canceller]:
            c.close()
        return {
            "bystanders": bystanders,
            "main_pool_size": 4,
            "seconds": duration,
            "bystander_statements": counts["statements"],
            "bystander_57014": counts["57014"],
            "bystander_other_errors": counts["other"],
            "canceller_statements": counts["c_statements"],
            "canceller_57014": counts["c_57014"],
            "cancel_requests": counts["c_requests"],
            "cancel_interval_ms": CANCEL_INTERVAL * 1000,
            **await self.fate(proxy),
        }

    # 5. RSS after large statements, CPU for one 64 MB message ------------------------------------------

    async def rss(self, statements: int = 40, size: int = 8_000_000, big: int = 64_000_000) -> dict[str, Any]:
        proxy = await self.start_proxy()
        await asyncio.sleep(1.0)
        out: dict[str, Any] = {"statements": statements, "statement_bytes": size, "big_message_bytes": big}
        out["baseline_mb"] = round(proxy.rss_mb(), 1)
        client = await proxy.client()
        replies: Counter[str] = Counter()
        for i in range(statements):
            reply = await client.query(padded_select(i, size), within=60)
            replies[describe_reply(reply)] += 1
            if reply.closed or reply.hang:
                break
        out["replies"] = dict(replies)
        out["after_statements_mb"] = await self._rss_or_none(proxy)
        client.close()
        out["after_disconnect_mb"] = await self._settled_rss(proxy)
        out["big_message_cpu_s"] = out["big_message_wall_s"] = None
        out["big_message_reply"] = "not sent (proxy gone)"
        if proxy.exit_status() is None:
            client = await proxy.client()
            cpu = proxy.cpu_seconds()
            reply = await client.query(padded_select(statements, big), within=120)
            client.close()
            out["big_message_reply"] = describe_reply(reply)
            out["big_message_wall_s"] = round(reply.seconds, 2)
            with contextlib.suppress(OSError):
                out["big_message_cpu_s"] = round(proxy.cpu_seconds() - cpu, 2)
        out["rss_after_big_message_mb"] = await self._rss_or_none(proxy)
        out.update(await self.fate(proxy))
        return out

    @staticmethod
    async def _rss_or_none(proxy: Proxy) -> float | None:
        try:
            return round(proxy.rss_mb(), 1)
        except (OSError, RuntimeError):
            return None

    async def _settled_rss(self, proxy: Proxy, within: float = 6.0) -> float | None:
        """VmRSS once two readings 0.5 s apart agree within 1 MB (or after ``within``)."""
        last = await self._rss_or_none(proxy)
        deadline = time.monotonic() + within
        while last is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = await self._rss_or_none(proxy)
            if now is None or abs(now - last) < 1.0:
                return now
            last = now
        return last

    # 6. login flood ------------------------------------------------------------------------------------

    async def login_flood(self, rate: int = 330, seconds: float = 6.0) -> dict[str, Any]:
        proxy = await self.start_proxy()
        bystander = await proxy.client()
        quiet = await latencies(bystander, seconds)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        worker = ctx.Process(
            target=flood_worker, args=(proxy.port, rate, seconds + 1.5, 16, queue), daemon=True
        )
        worker.start()
        try:
            await asyncio.to_thread(queue.get, True, 60)  # "started": the child is up and flooding
            await asyncio.sleep(0.5)
            flood = await latencies(bystander, seconds)
            flood_result: dict[str, Any] = (await asyncio.to_thread(queue.get, True, 60))[1]
        finally:
            await asyncio.to_thread(worker.join, 15)
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGKILL)
                await asyncio.to_thread(worker.join, 5)
        bystander.close()
        outcomes: dict[str, int] = flood_result["outcomes"]
        return {
            "target_rate": rate,
            "attempts": sum(outcomes.values()),
            "outcomes": outcomes,
            "failed_logins_per_s": round(outcomes.get("28P01", 0) / flood_result["seconds"], 1),
            "quiet_answers": len(quiet),
            "flood_answers": len(flood),
            "quiet_p50_ms": _ms(percentile(quiet, 0.5)),
            "quiet_p99_ms": _ms(percentile(quiet, 0.99)),
            "flood_p50_ms": _ms(percentile(flood, 0.5)),
            "flood_p99_ms": _ms(percentile(flood, 0.99)),
            **await self.fate(proxy),
        }

    # 7. writes refused after main returns --------------------------------------------------------------

    async def main_return(self) -> dict[str, Any]:
        proxy = await self.start_proxy()
        writer = await proxy.client()
        insert = "INSERT INTO faults_write (note) VALUES ('main-return')"
        first = await writer.query(insert)
        if not first.ok:
            raise RuntimeError(f"a write before stopping main got {describe_reply(first)}")
        await asyncio.to_thread(self.pg.main.stop)
        deadline = time.monotonic() + 20
        while True:
            reply = await writer.query(insert, within=10)
            if "25006" in reply.sqlstates():
                break
            if reply.closed:
                writer = await proxy.client()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"writes never got 25006 with main stopped (last: {describe_reply(reply)})"
                )
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.pg.main.start)
        while True:  # main accepts connections: the clock starts
            try:
                probe = await self.direct()
            except (OSError, TimeoutError, LoginFailed, asyncio.IncompleteReadError):
                await asyncio.sleep(0.01)
                continue
            ok = (await probe.query("SELECT 1", within=5)).ok
            probe.close()
            if ok:
                break
        back = time.monotonic()
        refused = Counter[str]()
        while True:
            reply = await writer.query(insert, within=10)
            if reply.ok:
                break
            for code in reply.sqlstates() or [describe_reply(reply)]:
                refused[code] += 1
            if reply.closed:
                writer = await proxy.client()
            if time.monotonic() - back > 30:
                raise TimeoutError(f"writes still refused 30 s after main came back: {dict(refused)}")
            await asyncio.sleep(0.005)
        done = time.monotonic()
        writer.close()
        return {
            "refused_ms": _ms(done - back),
            "refused_25006": refused.pop("25006", 0),
            "other_errors": sum(refused.values()),
            "other_error_codes": dict(refused),
            "health": HEALTH,
            **await self.fate(proxy),
        }

    # 8. a domain database down: are the writes it took visible afterwards? ------------------------------

    async def domain_outage(self, outage: float = 5.0) -> dict[str, Any]:
        proxy = await self.start_proxy(upstreams=("main", "analytics"))
        await self.wait_health(proxy, "analytics", up=True)
        tag = f"faults-{secrets.token_hex(4)}"
        insert = f"INSERT INTO user_activity (user_id, action) VALUES (1, '{tag}')"
        holder = [await proxy.client()]
        counts: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        stop = asyncio.Event()

        async def write_loop() -> None:
            while not stop.is_set():
                reply = await holder[0].query(insert, within=10)
                if reply.ok:
                    counts["acknowledged"] += 1
                    continue
                for code in reply.sqlstates() or [describe_reply(reply)]:
                    refused[code] += 1
                if reply.closed:
                    holder[0] = await proxy.client()
                await asyncio.sleep(0.01)

        await asyncio.to_thread(self.pg.analytics.stop)
        task = asyncio.create_task(write_loop())
        await asyncio.sleep(outage)
        stop.set()
        await asyncio.wait_for(task, 30)
        holder[0].close()
        await asyncio.to_thread(self.pg.analytics.start)
        await self.wait_health(proxy, "analytics", up=True)
        reader = await proxy.client()
        reply = await reader.query(f"SELECT count(*) FROM user_activity WHERE action = '{tag}'")
        reader.close()
        count_sql = f"SELECT count(*) FROM user_activity WHERE action = '{tag}'"
        return {
            "outage_s": outage,
            "acknowledged": counts["acknowledged"],
            "readable_after": int(reply.rows[0][0] or 0)
            if reply.ok and reply.rows
            else describe_reply(reply),
            "on_main": int(await self.psql_super(count_sql)),
            "on_analytics": int(await self.psql_super(count_sql, self.pg.analytics)),
            "refused": sum(refused.values()),
            "refused_sqlstates": dict(refused),
            **await self.fate(proxy),
        }

    # the run ---------------------------------------------------------------------------------------------

    async def run_all(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        jobs: dict[str, tuple[Callable[[], Awaitable[dict[str, Any]]], float]] = {
            "crash": (self.crash, 180),
            "kill": (self.kill, 90),
            "idle_tx": (self.idle_tx, 90),
            "cancels": (self.cancels, 90),
            "rss": (self.rss, 300),
            "login_flood": (self.login_flood, 90),
            "main_return": (self.main_return, 120),
            "domain_outage": (self.domain_outage, 120),
        }
        results: dict[str, dict[str, Any]] = {}
        for name in names:
            fn, deadline = jobs[name]
            self.current = name
            start = time.monotonic()
            try:
                result = await asyncio.wait_for(fn(), deadline)
            except TimeoutError:
                result = {"error": f"hang: no result within the {deadline} s deadline"}
            except Exception as exc:  # one failed measurement must not stop the others
                result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                for proxy in self.proxies:
                    if proxy.exit_status() is not None and not proxy.stopped_by_us:
                        self.crashes.append(
                            {"measurement": name, "proxy_exit": proxy.exit_status(), "found": "at cleanup"}
                        )
                await self.stop_proxies()
                await self.restore_clusters()
            result["measurement_s"] = round(time.monotonic() - start, 1)
            results[name] = result
            rows = table_rows({name: result})
            line = " | ".join(value if len(rows) == 1 else f"{label}: {value}" for label, value in rows)
            print(f"faults {name}: {line}", flush=True)
        return results


async def latencies(client: RawClient, seconds: float) -> list[float]:
    """``SELECT 1`` answered one after another for ``seconds``: each answer's latency."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        reply = await client.query("SELECT 1", within=QUERY_DEADLINE)
        if not reply.ok:
            raise RuntimeError(f"the bystander's SELECT 1 got {describe_reply(reply)}")
        out.append(reply.seconds)
    return out


def flood_worker(port: int, rate: float, seconds: float, concurrency: int, out: Any) -> None:
    """In a child process (so the flood's own CPU is not the bystander's): wrong-password logins at
    ``rate`` a second for ``seconds``; puts ("started", t) then ("done", {"outcomes", "seconds"})."""
    out.put(("started", time.time()))
    out.put(("done", asyncio.run(_flood(port, rate, seconds, concurrency))))


async def _flood(port: int, rate: float, seconds: float, concurrency: int) -> dict[str, Any]:
    start = time.monotonic()
    end = start + seconds
    slot = [start]
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        while True:
            at = slot[0]
            slot[0] += 1.0 / rate
            if at >= end:
                return
            if at > time.monotonic():
                await asyncio.sleep(at - time.monotonic())
            outcomes[await wrong_password_login(port, APP_USER)] += 1

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return {"outcomes": dict(outcomes), "seconds": time.monotonic() - start}


# -- command line ------------------------------------------------------------------------------------------


def run_faults(source: Path, names: Sequence[str]) -> dict[str, Any]:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    where = imported_from(source)
    if not Path(where).resolve().is_relative_to(source):
        raise RuntimeError(f"a proxy started from {source} would import {where}, not that tree's code")
    machine = machine_facts()
    machine.pop("proxy_source", None)  # that is this checkout; the measured code is "source" below
    tools = Tools.find(find_bindir())
    print(f"bench faults: proxy from {source} ({where}); starting main and analytics", flush=True)
    setup = {"main": SCHEMA["main"] + MAIN_SCRATCH, "analytics": SCHEMA["analytics"]}
    with (
        DevClusters.start(("main", "analytics"), setup_sql=setup) as pg,
        tempfile.TemporaryDirectory(prefix="parafort-faults-") as tmp,
    ):
        harness = Harness(pg, source, Path(tmp), tools)
        try:
            results = asyncio.run(harness.run_all(names))
        finally:
            harness.close()
    machine["loadavg_at_end"] = list(os.getloadavg())
    return {
        "benchmark": "faults (issue 13)",
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {**source_facts(source), "imports": where},
        "machine": machine,
        "proxy_crashes": harness.crashes,
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, default=CHECKOUT, metavar="DIR",
                   help="source tree to run the proxy from (default: this checkout)")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="results file (default bench/results/)")
    p.add_argument("--only", metavar="NAME,...", help=f"a subset of: {','.join(MEASUREMENTS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(MEASUREMENTS)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(MEASUREMENTS))
    if unknown:
        p.error(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    source = args.source.resolve()
    if not (source / "proxy" / "__main__.py").is_file():
        p.error(f"{source} is not a source tree with proxy/__main__.py")

    def run() -> int:
        doc = run_faults(source, names)
        path = args.json or results_path("faults")
        write_json(path, doc)
        src = doc["source"]
        print(f"\nbench faults: proxy source {src['dir']} @ {src.get('commit')}"
              f"{' + uncommitted changes' if src.get('uncommitted_changes') else ''}")  # fmt: skip
        print(format_table(table_rows(doc["results"])))
        for crash in doc["proxy_crashes"]:
            print(f"proxy crash in {crash['measurement']}: {crash.get('proxy_exit') or 'not answering'}")
        print(f"bench faults: results written to {path}")
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
