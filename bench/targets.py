"""Benchmark targets: what pgbench connects to — PostgreSQL itself, PgBouncer, or the ParaFort proxy.

Every target listens on 127.0.0.1 and accepts the main cluster's own user and password over SCRAM. The daemons
(PgBouncer, the proxy) are started and stopped by the harness: readiness is a real ``SELECT 1`` through the
target, shutdown is SIGTERM to the pid with a deadline, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy import __version__ as proxy_version
from proxy.devcluster import free_port, wait_until

HOST = "127.0.0.1"
# Our proxy's main pool size (config/proxy.yaml); PgBouncer gets the same number of server connections.
POOL_SIZE = 20
# PgBouncer understands protocol-level prepared statements in transaction pooling from this version on.
PGBOUNCER_PREPARED_MIN = (1, 21)
DEFAULT_PGBOUNCER = Path("/usr/sbin/pgbouncer")


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


def select_one(tools: Tools, creds: Credentials, port: int) -> str | None:
    """Run ``SELECT 1`` through HOST:port; None on success, else psql's error (password redacted)."""
    cmd = [
        tools.psql, "-X", "-q", "-A", "-t", "-h", HOST, "-p", str(port), "-U", creds.user,
        "-d", creds.database, "-c", "SELECT 1",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, env=client_env(creds), capture_output=True, text=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        return "psql timed out"
    if proc.returncode == 0 and proc.stdout.strip() == "1":
        return None
    return creds.redact((proc.stderr or proc.stdout).strip() or f"psql exited with {proc.returncode}")


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


def write_userlist(path: Path, creds: Credentials) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(f"{quote_userlist(creds.user)} {quote_userlist(creds.password)}\n")


class Target(ABC):
    """Something pgbench connects to on HOST:port."""

    name: str
    port: int = 0
    version: str = ""

    @abstractmethod
    def start(self) -> None:
        """Start and return once a ``SELECT 1`` through the target succeeds; raise TargetError otherwise."""

    @abstractmethod
    def stop(self) -> None:
        """Stop whatever ``start`` started. Safe to call twice and after a failed start."""

    def supports(self, mode: str) -> str | None:
        """None when pgbench ``-M mode`` is meaningful through this target, else the reason it is not."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "host": HOST, "port": self.port, "version": self.version}


class DirectTarget(Target):
    """The PostgreSQL cluster itself (started and stopped by DevClusters, not here)."""

    name = "direct"

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

    def __init__(self, workdir: Path, creds: Credentials, tools: Tools) -> None:
        self.workdir = workdir
        self.creds = creds
        self.tools = tools
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = workdir / f"{self.name}.log"

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

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"bench: {self.name} (pid {proc.pid}) ignored SIGTERM for {self.stop_timeout}s; killing"
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


class PgBouncerTarget(DaemonTarget):
    """PgBouncer in transaction pooling mode, as the ``postgres`` OS user when we are root."""

    name = "pgbouncer"

    def __init__(
        self,
        workdir: Path,
        creds: Credentials,
        tools: Tools,
        *,
        binary: Path,
        upstream_port: int,
        as_postgres: bool,
    ) -> None:
        super().__init__(workdir, creds, tools)
        self.binary = binary
        self.upstream_port = upstream_port
        self.as_postgres = as_postgres
        self.version, self.version_tuple = pgbouncer_version(binary)
        self.ini = workdir / "pgbouncer.ini"
        self.userlist = workdir / "userlist.txt"

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

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        if self.as_postgres:
            return {"user": "postgres", "group": "postgres", "extra_groups": []}
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "pool_mode": "transaction",
            "default_pool_size": POOL_SIZE,
            "max_prepared_statements": 200 if self.prepared_statements else None,
            "run_as": "postgres" if self.as_postgres else "current user",
        }


class ProxyTarget(DaemonTarget):
    """Our daemon: ``python -m proxy run --config <yaml>`` with DATABASE_URL pointing at main."""

    name = "proxy"

    def __init__(self, workdir: Path, creds: Credentials, tools: Tools, *, main_dsn: str) -> None:
        super().__init__(workdir, creds, tools)
        self.main_dsn = main_dsn
        self.version = proxy_version
        self.config = workdir / "proxy.yaml"
        self.userlist = workdir / "userlist.txt"
        self.admin_port = 0

    def config_data(self) -> dict[str, Any]:
        return {
            "listen": {"host": HOST, "port": self.port},
            "admin": {"host": HOST, "port": self.admin_port},
            "auth": {"method": "scram-sha-256", "users_file": str(self.userlist)},
        }

    def prepare(self) -> list[str]:
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        write_userlist(self.userlist, self.creds)
        self.config.write_text(yaml.safe_dump(self.config_data(), sort_keys=False))
        return [sys.executable, "-m", "proxy", "run", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        # Only main is configured: no other role URL (nor PG* setting) leaks in from our environment.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("PG") and not k.endswith("DATABASE_URL")
        }
        env.update(DATABASE_URL=self.main_dsn, PYTHONUNBUFFERED="1")
        return env

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "admin_port": self.admin_port,
            "main_pool_size": POOL_SIZE,
            "command": [sys.executable, "-m", "proxy", "run", "--config", "<proxy.yaml>"],
        }
