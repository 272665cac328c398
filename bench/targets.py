"""Benchmark targets: what pgbench connects to — PostgreSQL itself, PgBouncer, the bare forwarder
(``ceiling``), Pgpool-II or our proxy.

Every target listens on 127.0.0.1 and accepts the main cluster's own user and password over SCRAM. The daemons
(PgBouncer, the forwarder, Pgpool-II, the proxy) are started and stopped by the harness: readiness is a real
``SELECT 1`` through the target (and, for the routing targets, a read that lands on the replica), shutdown is
a signal to the pid with a deadline, then SIGKILL of the daemon's process group.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from proxy import __version__ as proxy_version
from proxy.dev.cluster import free_port, wait_until

HOST = "127.0.0.1"
# The checkout bench/ lives in: the forwarder runs as ``python -m bench.ceiling`` from there (not installed).
CHECKOUT = Path(__file__).resolve().parent.parent
# Our proxy's main pool size (config/proxy.yaml); PgBouncer gets the same number of server connections.
POOL_SIZE = 20
# PgBouncer understands protocol-level prepared statements in transaction pooling from this version on.
PGBOUNCER_PREPARED_MIN = (1, 21)
DEFAULT_PGBOUNCER = Path("/usr/sbin/pgbouncer")
DEFAULT_PGPOOL = Path("/usr/sbin/pgpool")
# Pgpool-II pre-forks one child per concurrent client: this many more children than the largest client count.
PGPOOL_CHILD_MARGIN = 8
# A read that lands on a hot standby answers 'on': proof that a routing target sends reads to the replica.
# (Not pg_is_in_recovery(), volatile, nor pg_settings, a catalog view: Pgpool-II sends those to the primary.)
ON_REPLICA_SQL = "SELECT current_setting('in_hot_standby')"


class TargetError(RuntimeError):
    """A target could not be started; the message names it and carries its log's tail."""


@dataclass(frozen=True)
class Credentials:
    """The one login every target accepts: the main cluster's user, password and database."""

    user: str
    password: str = field(repr=False)
    database: str

    def redact(self, text: str) -> str:
        """``text`` with the password replaced, for anything printed or written to the results."""
        return text.replace(self.password, "********") if self.password else text


@dataclass(frozen=True)
class Tools:
    """The PostgreSQL client programs, from the server's bindir when it has them (same major version)."""

    psql: str
    pgbench: str

    @classmethod
    def find(cls, bindir: Path) -> Tools:
        def pick(name: str) -> str:
            cand = bindir / name
            if cand.exists():
                return str(cand)
            found = shutil.which(name)
            if found is None:
                raise TargetError(f"{name} not found (install the postgresql-client package: make bench)")
            return found

        return cls(psql=pick("psql"), pgbench=pick("pgbench"))


def client_env(creds: Credentials) -> dict[str, str]:
    """Environment for psql/pgbench: no inherited PG* settings, the password only here, SSL off, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=creds.password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="5", LC_ALL="C")
    return env


def tcp_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def scalar(tools: Tools, creds: Credentials, port: int, sql: str) -> tuple[str | None, str | None]:
    """Run one query through HOST:port with psql: (its output, None) or (None, psql's error, redacted)."""
    cmd = [
        tools.psql, "-X", "-q", "-A", "-t", "-h", HOST, "-p", str(port), "-U", creds.user,
        "-d", creds.database, "-c", sql,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, env=client_env(creds), capture_output=True, text=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        return None, "psql timed out"
    if proc.returncode == 0:
        return proc.stdout.strip(), None
    return None, creds.redact((proc.stderr or proc.stdout).strip() or f"psql exited with {proc.returncode}")


def select_one(tools: Tools, creds: Credentials, port: int) -> str | None:
    """Run ``SELECT 1`` through HOST:port; None on success, else psql's error (password redacted)."""
    out, error = scalar(tools, creds, port, "SELECT 1")
    if error is not None:
        return error
    return None if out == "1" else f"SELECT 1 returned {out!r}"


def tail(path: Path, creds: Credentials, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return creds.redact("\n".join(text.strip().splitlines()[-lines:])) or "(no output)"


def quote_userlist(value: str) -> str:
    """A PgBouncer userlist.txt field: double quotes, embedded quotes doubled."""
    return '"' + value.replace('"', '""') + '"'


def quote_libpq(value: str) -> str:
    """A value in a libpq-style ``key=value`` connect string (PgBouncer's [databases] entries)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_userlist(path: Path, creds: Credentials, secret: str | None = None) -> None:
    """userlist.txt with the password (or ``secret``: an md5 hash or SCRAM verifier of it), mode 0600."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f"{quote_userlist(creds.user)} {quote_userlist(secret or creds.password)}\n")


@dataclass(frozen=True)
class Site:
    """Where a daemon target runs and how the harness reaches it: its private directory, the login every
    target accepts, the client programs that check it is ready."""

    workdir: Path
    creds: Credentials
    tools: Tools


def make_site(parent: Path, name: str, creds: Credentials, tools: Tools) -> Site:
    """A daemon target's Site: its own directory ``parent/name``, mode 0700 (it holds the password)."""
    workdir = parent / name
    workdir.mkdir(mode=0o700)
    return Site(workdir, creds, tools)


class Target(ABC):
    """Something pgbench connects to on HOST:port."""

    name: str
    port: int = 0
    version: str = ""
    # Whether every client costs a server connection on the primary for the length of its run (no pool).
    connection_per_client = False

    @abstractmethod
    def start(self) -> None:
        """Start and return once a ``SELECT 1`` through the target succeeds; raise TargetError otherwise."""

    @abstractmethod
    def stop(self) -> None:
        """Stop whatever ``start`` started. Safe to call twice and after a failed start."""

    def supports(self, mode: str) -> str | None:
        """None when pgbench ``-M mode`` is meaningful through this target, else the reason it is not."""
        return None

    def server_connections(self) -> int:
        """Connections this target may keep open to the primary while another target runs."""
        return 0

    def pids(self) -> list[int]:
        """Root pids of the processes that do this target's work (their trees are what CPU sampling
        counts as the pooler); none for a target that is PostgreSQL itself."""
        return []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "host": HOST, "port": self.port, "version": self.version}


class DirectTarget(Target):
    """The PostgreSQL cluster itself (started and stopped by DevClusters, not here)."""

    name = "direct"
    connection_per_client = True

    def __init__(self, port: int, server_version: str) -> None:
        self.port = port
        self.version = server_version

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class DaemonTarget(Target):
    """A listener process between pgbench and PostgreSQL, run by the harness on an ephemeral port."""

    ready_timeout = 30.0
    stop_timeout = 10.0
    port_attempts = 3
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    # Whether reads through this target must land on the replica before it counts as ready.
    routes_reads = False

    def __init__(self, site: Site) -> None:
        self.workdir = site.workdir
        self.creds = site.creds
        self.tools = site.tools
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = site.workdir / f"{self.name}.log"

    @abstractmethod
    def prepare(self) -> list[str]:
        """Write the configuration for ``self.port``; return the command line."""

    @abstractmethod
    def env(self) -> dict[str, str]: ...

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def start(self) -> None:
        for attempt in range(1, self.port_attempts + 1):
            self.port = free_port()
            argv = self.prepare()
            with self.logfile.open("wb") as log:
                self.proc = subprocess.Popen(
                    argv, cwd=self.workdir, env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, **self.popen_kwargs(),
                )  # fmt: skip
            try:
                self._wait_ready()
                return
            except TargetError:
                self.stop()
                log_text = tail(self.logfile, self.creds, 200)
                if attempt < self.port_attempts and re.search(r"already in use|Errno 98", log_text):
                    continue  # somebody took the ephemeral port between free_port() and bind()
                raise

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None
        last = ["no TCP listener yet"]

        def ready() -> bool:
            if proc.poll() is not None:
                raise TargetError(
                    f"{self.name} exited with code {proc.returncode} before accepting connections; "
                    f"its output ends with:\n{tail(self.logfile, self.creds)}"
                )
            if not tcp_open(HOST, self.port):
                return False
            error = select_one(self.tools, self.creds, self.port)
            if error is not None:
                last[0] = error
            return error is None

        try:
            wait_until(ready, self.ready_timeout, f"{self.name} on {HOST}:{self.port}", interval=0.1)
        except TimeoutError as exc:
            raise TargetError(
                f"{exc} (last attempt: {last[0]}); its output ends with:\n{tail(self.logfile, self.creds)}"
            ) from None
        if self.routes_reads:
            self._wait_reads_on_replica()

    def _wait_reads_on_replica(self) -> None:
        """Routing is on once a plain read through the target is answered by the hot standby."""
        last: list[str | None] = [None]

        def on_replica() -> bool:
            out, error = scalar(self.tools, self.creds, self.port, ON_REPLICA_SQL)
            last[0] = error or out
            return out == "on"

        try:
            wait_until(
                on_replica, self.ready_timeout, f"reads through {self.name} to reach the replica", 0.25
            )
        except TimeoutError as exc:
            raise TargetError(
                f"{exc} (in_hot_standby through it: {last[0]!r}); its output ends with:\n"
                f"{tail(self.logfile, self.creds)}"
            ) from None

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"bench: {self.name} (pid {proc.pid}) ignored {self.stop_signal.name} for "
                    f"{self.stop_timeout}s; killing"
                )
                proc.kill()
                proc.wait(timeout=10)
        # start_new_session made the daemon its own process group: reap any helper it left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def output_tail(self, lines: int = 20) -> str:
        return tail(self.logfile, self.creds, lines)


def pgbouncer_version(binary: Path) -> tuple[str, tuple[int, ...]]:
    """PgBouncer's version string and numeric tuple, from ``pgbouncer --version`` ("PgBouncer 1.18.0")."""
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"PgBouncer\s+(\d+(?:\.\d+)+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or match is None:
        raise TargetError(f"{binary} --version failed: {(proc.stdout + proc.stderr).strip()[:300]}")
    version = match.group(1)
    return version, tuple(int(part) for part in version.split("."))


class PostgresUserDaemon(DaemonTarget):
    """A C daemon run as the ``postgres`` OS user when we are root (neither pooler runs as root), with
    none of our PG* settings and the C locale."""

    def __init__(self, site: Site, *, binary: Path, as_postgres: bool) -> None:
        super().__init__(site)
        self.binary = binary
        self.as_postgres = as_postgres

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        if self.as_postgres:
            return {"user": "postgres", "group": "postgres", "extra_groups": []}
        return {}


class PgBouncerTarget(PostgresUserDaemon):
    """PgBouncer in transaction pooling mode, as the ``postgres`` OS user when we are root."""

    name = "pgbouncer"

    def __init__(self, site: Site, *, binary: Path, upstream_port: int, as_postgres: bool) -> None:
        super().__init__(site, binary=binary, as_postgres=as_postgres)
        self.upstream_port = upstream_port
        self.version, self.version_tuple = pgbouncer_version(binary)
        self.ini = self.workdir / "pgbouncer.ini"
        self.userlist = self.workdir / "userlist.txt"

    @property
    def prepared_statements(self) -> bool:
        return self.version_tuple[:2] >= PGBOUNCER_PREPARED_MIN

    def supports(self, mode: str) -> str | None:
        if mode == "prepared" and not self.prepared_statements:
            wanted = ".".join(map(str, PGBOUNCER_PREPARED_MIN))
            return (
                f"PgBouncer {self.version} has no protocol-level prepared statements in transaction "
                f"pooling (needs >= {wanted} with max_prepared_statements)"
            )
        return None

    def ini_text(self) -> str:
        c = self.creds
        upstream = (
            f"host={HOST} port={self.upstream_port} dbname={quote_libpq(c.database)} "
            f"user={quote_libpq(c.user)} password={quote_libpq(c.password)}"
        )
        lines = [
            "[databases]",
            f"{c.database} = {upstream}",
            "",
            "[pgbouncer]",
            f"listen_addr = {HOST}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.userlist}",
            "pool_mode = transaction",
            f"default_pool_size = {POOL_SIZE}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = 1000",
            "client_tls_sslmode = disable",
            "server_tls_sslmode = disable",
            "ignore_startup_parameters = extra_float_digits",
            "log_connections = 0",
            "log_disconnections = 0",
            "logfile =",
            "pidfile =",
        ]
        if self.prepared_statements:
            lines.append("max_prepared_statements = 200")
        return "\n".join(lines) + "\n"

    def prepare(self) -> list[str]:
        write_userlist(self.userlist, self.creds)
        self.ini.touch(mode=0o600)
        self.ini.chmod(0o600)
        self.ini.write_text(self.ini_text())
        if self.as_postgres:
            # PgBouncer refuses to run as root; the postgres OS user must read its files (and nobody else).
            for path in (self.workdir, self.ini, self.userlist):
                shutil.chown(path, "postgres", "postgres")
        return [str(self.binary), str(self.ini)]

    def server_connections(self) -> int:
        return POOL_SIZE

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "pool_mode": "transaction",
            "default_pool_size": POOL_SIZE,
            "max_prepared_statements": 200 if self.prepared_statements else None,
            "run_as": "postgres" if self.as_postgres else "current user",
        }


class CeilingTarget(DaemonTarget):
    """The bare forwarder (bench/ceiling.py) in front of the primary: one asyncio hop with no parsing, one
    upstream connection per client; the primary itself authenticates every client."""

    name = "ceiling"
    connection_per_client = True

    def __init__(self, site: Site, *, upstream_port: int) -> None:
        super().__init__(site)
        self.upstream_port = upstream_port
        self.version = f"uvloop {importlib.metadata.version('uvloop')}"

    def command(self, port: int | str) -> list[str]:
        upstream = f"{HOST}:{self.upstream_port}"
        return [sys.executable, "-m", "bench.ceiling", "--listen", str(port), "--upstream", upstream]

    def prepare(self) -> list[str]:
        return self.command(self.port)

    def env(self) -> dict[str, str]:
        # bench/ is not installed: the child imports it from this checkout (its cwd is the temp directory).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        inherited = os.environ.get("PYTHONPATH")
        path = f"{CHECKOUT}{os.pathsep}{inherited}" if inherited else str(CHECKOUT)
        env.update(PYTHONPATH=path, PYTHONUNBUFFERED="1")
        return env

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "upstream": "primary",
            "forwarding": "bytes both ways, untouched (startup and authentication too), no parsing",
            "server_connections": "one per client, opened when the client connects",
            "command": self.command("$PORT"),
        }


def pgpool_version(binary: Path) -> str:
    """Pgpool-II's version, from ``pgpool --version`` ("pgpool-II version 4.3.5 (tamahomeboshi)")."""
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"version\s+(\d+(?:\.\d+)+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or match is None:
        raise TargetError(f"{binary} --version failed: {(proc.stdout + proc.stderr).strip()[:300]}")
    return match.group(1)


def quote_pgpool(value: str | int) -> str:
    """A pgpool.conf value: integers bare, strings in single quotes with embedded quotes doubled."""
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class PgpoolSettings:
    """What differs between Pgpool-II runs; everything else in pgpool.conf is fixed (see pgpool_conf)."""

    port: int
    pcp_port: int
    workdir: Path
    primary_port: int
    replica_port: int
    user: str
    database: str
    num_init_children: int
    # backend_weight: 0 on the primary sends every load-balanced read to the replica, as the proxy does.
    primary_weight: int = 0
    replica_weight: int = 1


def pgpool_conf(s: PgpoolSettings) -> str:
    """pgpool.conf for streaming-replication load balancing: backend0 = primary, backend1 = replica.

    No watchdog, no health checks or failover (a benchmark must not detach a node), PCP only on a unix
    socket in the work directory, the pid file, sockets and pgpool_status there too, logs on stderr. The
    password is not here: pool_passwd holds it (pgpool needs it in clear text to do SCRAM to the backends).
    """
    settings: list[tuple[str, str | int]] = [
        ("backend_clustering_mode", "streaming_replication"),
        ("listen_addresses", HOST),
        ("port", s.port),
        ("socket_dir", str(s.workdir)),
        ("pcp_listen_addresses", ""),
        ("pcp_port", s.pcp_port),
        ("pcp_socket_dir", str(s.workdir)),
        ("wd_ipc_socket_dir", str(s.workdir)),
        ("use_watchdog", "off"),
        ("pid_file_name", str(s.workdir / "pgpool.pid")),
        ("logdir", str(s.workdir)),
        ("log_destination", "stderr"),
        ("logging_collector", "off"),
        ("log_min_messages", "warning"),
        ("log_connections", "off"),
        ("log_statement", "off"),
        ("log_per_node_statement", "off"),
        ("backend_hostname0", HOST),
        ("backend_port0", s.primary_port),
        ("backend_weight0", s.primary_weight),
        ("backend_flag0", "DISALLOW_TO_FAILOVER"),
        ("backend_application_name0", "primary"),
        ("backend_hostname1", HOST),
        ("backend_port1", s.replica_port),
        ("backend_weight1", s.replica_weight),
        ("backend_flag1", "DISALLOW_TO_FAILOVER"),
        ("backend_application_name1", "replica"),
        ("enable_pool_hba", "on"),
        ("pool_passwd", str(s.workdir / "pool_passwd")),
        ("allow_clear_text_frontend_auth", "off"),
        ("ssl", "off"),
        ("num_init_children", s.num_init_children),
        ("max_pool", 1),
        ("reserved_connections", 0),
        ("child_life_time", 0),
        ("child_max_connections", 0),
        ("connection_life_time", 0),
        ("client_idle_limit", 0),
        ("connection_cache", "on"),
        ("load_balance_mode", "on"),
        ("statement_level_load_balance", "off"),
        ("disable_load_balance_on_write", "transaction"),
        ("sr_check_period", 0),
        ("sr_check_user", s.user),
        ("sr_check_password", ""),  # empty: taken from pool_passwd
        ("sr_check_database", s.database),
        ("delay_threshold", 0),
        ("health_check_period", 0),
        ("failover_on_backend_error", "off"),
        ("failover_on_backend_shutdown", "off"),
        ("search_primary_node_timeout", 10),
        ("auto_failback", "off"),
        ("memory_cache_enabled", "off"),
        ("memqcache_oiddir", str(s.workdir / "oiddir")),
    ]
    return "".join(f"{key} = {quote_pgpool(value)}\n" for key, value in settings)


# Clients log in with SCRAM (pool_passwd's clear-text entry serves as the verifier's source).
PGPOOL_HBA = "host all all 127.0.0.1/32 scram-sha-256\n"


class PgpoolTarget(PostgresUserDaemon):
    """Pgpool-II in streaming-replication load-balancing mode (as the ``postgres`` OS user when root)."""

    name = "pgpool"
    ready_timeout = 45.0
    stop_signal = signal.SIGINT  # pgpool's fast shutdown (SIGTERM waits for clients to leave)
    routes_reads = True

    def __init__(
        self,
        site: Site,
        *,
        binary: Path,
        primary_port: int,
        replica_port: int,
        max_clients: int,
        as_postgres: bool,
    ) -> None:
        super().__init__(site, binary=binary, as_postgres=as_postgres)
        self.primary_port = primary_port
        self.replica_port = replica_port
        self.num_init_children = max_clients + PGPOOL_CHILD_MARGIN
        self.version = pgpool_version(binary)
        self.conf = self.workdir / "pgpool.conf"
        self.hba = self.workdir / "pool_hba.conf"
        self.pcp = self.workdir / "pcp.conf"
        self.passwd = self.workdir / "pool_passwd"
        self.settings: PgpoolSettings | None = None

    def prepare(self) -> list[str]:
        if ":" in self.creds.user or ":" in self.creds.password or "\n" in self.creds.password:
            raise TargetError("pool_passwd cannot hold a user or password with ':' or a newline")
        pcp_port = free_port()
        while pcp_port == self.port:
            pcp_port = free_port()
        self.settings = PgpoolSettings(
            port=self.port, pcp_port=pcp_port, workdir=self.workdir, primary_port=self.primary_port,
            replica_port=self.replica_port, user=self.creds.user, database=self.creds.database,
            num_init_children=self.num_init_children,
        )  # fmt: skip
        (self.workdir / "oiddir").mkdir(exist_ok=True)
        for path, text in (
            (self.conf, pgpool_conf(self.settings)),
            (self.hba, PGPOOL_HBA),
            (self.pcp, ""),
            (self.passwd, f"{self.creds.user}:TEXT{self.creds.password}\n"),
        ):
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(text)
        # A pgpool_status left by an earlier attempt would mark a backend down.
        (self.workdir / "pgpool_status").unlink(missing_ok=True)
        if self.as_postgres:
            for path in (self.workdir, self.workdir / "oiddir", self.conf, self.hba, self.pcp, self.passwd):
                shutil.chown(path, "postgres", "postgres")
        return [str(self.binary), "-n", "-f", str(self.conf), "-a", str(self.hba), "-F", str(self.pcp)]

    def server_connections(self) -> int:
        return self.num_init_children  # max_pool = 1: one cached connection per child and backend

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mode": "streaming_replication, load_balance_mode = on",
            "backends": {"0": "primary (weight 0: writes only)", "1": "replica (weight 1: every read)"},
            "num_init_children": self.num_init_children,
            "max_pool": 1,
            "connection_cache": True,
            "auth": "scram-sha-256 clients (pool_hba.conf), pool_passwd clear-text entry for the backends",
            "run_as": "postgres" if self.as_postgres else "current user",
        }


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def proxy_setting(text: str) -> dict[str, Any]:
    """``statements.cache_unnamed=true`` -> ``{"statements": {"cache_unnamed": True}}`` (value as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"expected KEY.PATH=VALUE, got {text!r}")
    value: Any = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    assert isinstance(value, dict)
    return value


def raise_nofile() -> None:
    """In the child before exec: the soft open-files limit up to the hard one (10,000 idle clients)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ProxyTarget(DaemonTarget):
    """Our daemon: ``python -m proxy run --config <yaml>`` with DATABASE_URL pointing at main and, when given,
    READ_REPLICA_DATABASE_URL at the streaming replica (reads are then routed there)."""

    name = "proxy"

    def __init__(
        self,
        site: Site,
        *,
        main_dsn: str,
        replica_dsn: str | None = None,
        extra_config: dict[str, Any] | None = None,
        nofile: bool = False,
        userlist_secret: str | None = None,
    ) -> None:
        super().__init__(site)
        self.main_dsn = main_dsn
        self.replica_dsn = replica_dsn
        self.routes_reads = replica_dsn is not None
        self.extra_config = extra_config or {}
        self.nofile = nofile
        self.userlist_secret = userlist_secret
        self.version = proxy_version
        self.config = self.workdir / "proxy.yaml"
        self.userlist = self.workdir / "userlist.txt"
        self.admin_port = 0

    def config_data(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "listen": {"host": HOST, "port": self.port},
            "admin": {"host": HOST, "port": self.admin_port},
            "auth": {"method": "scram-sha-256", "users_file": str(self.userlist)},
            "roles": {"main": {"pool_size": POOL_SIZE}},
        }
        if self.replica_dsn is not None:
            doc["roles"]["read_replica"] = {"pool_size": POOL_SIZE}
        return deep_merge(doc, self.extra_config)

    def prepare(self) -> list[str]:
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        write_userlist(self.userlist, self.creds, self.userlist_secret)
        self.config.write_text(yaml.safe_dump(self.config_data(), sort_keys=False))
        return [sys.executable, "-m", "proxy", "run", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        # Only main (and the replica) are configured: no other role URL nor PG* setting leaks in from ours.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.endswith("DATABASE_URL")
        }
        env.update(DATABASE_URL=self.main_dsn, PYTHONUNBUFFERED="1")
        if self.replica_dsn is not None:
            env["READ_REPLICA_DATABASE_URL"] = self.replica_dsn
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        return {"preexec_fn": raise_nofile} if self.nofile else {}

    def server_connections(self) -> int:
        return POOL_SIZE + 2  # the main pool and the health monitor's probe

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "admin_port": self.admin_port,
            "main_pool_size": POOL_SIZE,
            "read_replica_pool_size": POOL_SIZE if self.replica_dsn is not None else None,
            "routing": "reads to the streaming replica" if self.replica_dsn is not None else "main only",
            "config": {k: v for k, v in self.config_data().items() if k not in ("listen", "admin", "auth")},
            "command": [sys.executable, "-m", "proxy", "run", "--config", "<proxy.yaml>"],
        }
