"""Throwaway local PostgreSQL clusters for the demo, the tests and the benchmarks.

``DevClusters`` starts, in a temporary directory, one cluster per role — main, a streaming replica of main
(pg_basebackup -R), analytics, documents, compliance — each on an ephemeral loopback port with its own login
role and a random SCRAM password, plus a superuser login (``parafort_super``: PostgreSQL 15 lets only
superusers create a migration's subscriptions). When run as root the servers run as the ``postgres`` OS
user. Everything is stopped and deleted on ``close()`` (also at interpreter exit, as a safety net).

    with DevClusters.start() as pg:
        os.environ.update(pg.env())          # DATABASE_URL, ANALYTICS_DATABASE_URL, ...
        pg.analytics.stop(); pg.analytics.start()
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Never

from proxy.config.loader import ROLE_ENV
from proxy.config.values import ROLES

PRIMARIES = ("main", "analytics", "documents", "compliance")
SUPERUSER = "parafort_super"

# Speed over durability: these clusters hold nothing worth keeping.
SERVER_SETTINGS = """
# parafort devcluster settings
listen_addresses = '127.0.0.1'
max_connections = 200
max_prepared_transactions = 10
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
# logical: a migration (proxy/migration) publishes tables from one cluster and subscribes on another.
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
password_encryption = 'scram-sha-256'
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
dynamic_shared_memory_type = posix
"""

# Local (unix socket) connections are for the harness itself; TCP needs each role's own SCRAM password.
HBA = """
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  scram-sha-256
host    replication  all   127.0.0.1/32  scram-sha-256
"""


class DevClusterError(RuntimeError):
    """A cluster could not be created, started or stopped; the message carries its log's tail."""


def find_bindir() -> Path:
    """The PostgreSQL server binaries: $PARAFORT_PG_BINDIR, Debian's newest, or initdb on PATH."""
    env = os.environ.get("PARAFORT_PG_BINDIR")
    candidates = [env] if env else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    for cand in candidates:
        if cand and (Path(cand) / "initdb").exists():
            return Path(cand)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise DevClusterError(
        "PostgreSQL server binaries not found (initdb); install the postgresql package "
        "(scripts/bootstrap.sh does) or set PARAFORT_PG_BINDIR"
    )


_GIVEN: set[int] = set()  # the ports free_port() has answered in this process


def free_port() -> int:
    """An unused loopback TCP port (the kernel's choice), never one this process was given lately: two
    calls in a row may otherwise get the same port (a proxy's listener and admin port, once in a CI run),
    and the proxy refuses that configuration."""
    if len(_GIVEN) > 10_000:
        _GIVEN.clear()  # the ephemeral range is ~28,000 ports: long-gone tests' ports may come back
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass
class _Runner:
    """Runs server programs as the ``postgres`` OS user when we are root (PostgreSQL refuses root)."""

    bindir: Path
    workdir: Path
    as_postgres: bool = field(default_factory=lambda: os.geteuid() == 0)

    def run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.as_postgres:
            kwargs["user"] = "postgres"
            kwargs["group"] = "postgres"
            kwargs["extra_groups"] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            [str(self.bindir / program), *args],
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def check(self, program: str, *args: str, what: str, timeout: float = 120) -> str:
        proc = self.run(program, *args, timeout=timeout)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise DevClusterError(f"{what} failed: " + "\n".join(out))
        return proc.stdout

    def chown(self, path: Path) -> None:
        if self.as_postgres:
            shutil.chown(path, "postgres", "postgres")


@dataclass
class Cluster:
    """One PostgreSQL server: its role name, port, login role and database."""

    name: str
    datadir: Path
    sockdir: Path
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    runner: _Runner = field(repr=False)
    logfile: Path = field(init=False)
    super_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)

    def __post_init__(self) -> None:
        self.logfile = self.datadir.parent / f"{self.name}.log"

    @property
    def dsn(self) -> str:
        """The TCP DSN with this cluster's own login role and password."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def super_dsn(self) -> str:
        """The TCP DSN of the superuser login (``SUPERUSER``) in this cluster's database."""
        return self.dsn_for(SUPERUSER, self.super_password)

    def dsn_for(self, user: str, password: str, database: str | None = None) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database or self.database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, from postmaster.pid, or None when not running."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def start(self, timeout: float = 60) -> None:
        """Start (or restart after stop) on the same port; returns once it accepts connections."""
        opts = f"-p {self.port} -k {self.sockdir}"
        proc = self.runner.run(
            "pg_ctl", "start", "-w", "-t", str(int(timeout)), "-D", str(self.datadir),
            "-l", str(self.logfile), "-o", opts, timeout=timeout + 10,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DevClusterError(f"starting {self.name} on port {self.port} failed:\n{self.log_tail()}")

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server (mode: smart, fast or immediate); falls back to SIGKILL of the postmaster."""
        if not self.running:
            return
        pid = self.pid
        proc = self.runner.run(
            "pg_ctl", "stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(self.datadir),
            timeout=timeout + 10,
        )  # fmt: skip
        if proc.returncode != 0 and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def psql(self, sql: str, *, database: str | None = None, superuser: bool = True) -> str:
        """Run SQL through psql over the unix socket (trusted), as superuser or as this cluster's role."""
        cmd = [
            str(self.runner.bindir / "psql") if (self.runner.bindir / "psql").exists() else "psql",
            "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.sockdir), "-p", str(self.port),
            "-U", "postgres" if superuser else self.user,
            "-d", database or self.database, "-c", sql,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
        if proc.returncode != 0:
            raise DevClusterError(f"psql on {self.name} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class _RoleCluster:
    """``DevClusters.<role>``: that role's cluster (``clusters[role]``), read only."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.role = name

    def __get__(self, pg: DevClusters, owner: type | None = None) -> Cluster:
        return pg.clusters[self.role]

    def __set__(self, pg: DevClusters, value: Never) -> None:
        raise AttributeError(f"DevClusters.{self.role} is read only")


class DevClusters:
    """The five role clusters in one temporary directory. Use ``DevClusters.start()`` as a context manager."""

    def __init__(self, basedir: Path, runner: _Runner, clusters: dict[str, Cluster]) -> None:
        self.basedir = basedir
        self.runner = runner
        self.clusters = clusters
        self.extra: dict[str, Cluster] = {}  # more replicas, for tests of several
        self._closed = False

    @classmethod
    def start(
        cls,
        roles: tuple[str, ...] = ROLES,
        *,
        setup_sql: Mapping[str, str] | None = None,
        base: str | None = None,
    ) -> DevClusters:
        """Create and start clusters for ``roles`` (read_replica needs main); runs ``setup_sql[role]``
        as the role's own user in its database (on main before the replica is cloned)."""
        unknown = set(roles) - set(ROLES)
        if unknown or ("read_replica" in roles and "main" not in roles):
            raise ValueError(f"bad roles {roles!r}")
        bindir = find_bindir()
        basedir = Path(tempfile.mkdtemp(prefix="parafort-pg-", dir=base))
        runner = _Runner(bindir, basedir)
        if runner.as_postgres:
            basedir.chmod(0o755)
        runner.chown(basedir)
        sockdir = basedir / "sock"
        sockdir.mkdir()
        runner.chown(sockdir)
        self = cls(basedir, runner, {})
        _LIVE.add(self)
        try:
            self._create(roles, sockdir, setup_sql or {})
        except BaseException:
            self.close()
            raise
        return self

    def _create(self, roles: tuple[str, ...], sockdir: Path, setup_sql: Mapping[str, str]) -> None:
        template = self.basedir / "template"
        self.runner.check(
            "initdb", "-D", str(template), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", what="initdb",
        )  # fmt: skip
        with (template / "postgresql.conf").open("a") as conf:
            conf.write(SERVER_SETTINGS)
        (template / "pg_hba.conf").write_text(HBA)
        primaries = [r for r in roles if r in PRIMARIES]
        for role in primaries:
            datadir = self.basedir / role
            # cp -a keeps the owner (postgres) and modes that the server checks.
            subprocess.run(["cp", "-a", str(template), str(datadir)], check=True, timeout=60)
            self.clusters[role] = self._new_cluster(role, datadir, sockdir, f"parafort_{role}")
        shutil.rmtree(template, ignore_errors=True)

        def bring_up(cluster: Cluster) -> None:
            self._start_on_free_port(cluster)
            pw = cluster.password.replace("'", "''")
            cluster.psql(f"CREATE ROLE {cluster.user} LOGIN PASSWORD '{pw}'", database="postgres")
            spw = cluster.super_password.replace("'", "''")
            cluster.psql(f"CREATE ROLE {SUPERUSER} LOGIN SUPERUSER PASSWORD '{spw}'", database="postgres")
            cluster.psql(f"CREATE DATABASE {cluster.database} OWNER {cluster.user}", database="postgres")
            if setup_sql.get(cluster.name):
                cluster.psql(setup_sql[cluster.name], superuser=False)

        with ThreadPoolExecutor(max_workers=len(primaries) or 1) as ex:
            for fut in [ex.submit(bring_up, self.clusters[r]) for r in primaries]:
                fut.result()
        if "read_replica" in roles:
            self._clone_replica(sockdir)

    def _new_cluster(self, role: str, datadir: Path, sockdir: Path, database: str) -> Cluster:
        return Cluster(
            name=role, datadir=datadir, sockdir=sockdir, port=free_port(), user=f"parafort_{role}",
            password=secrets.token_urlsafe(18), database=database, runner=self.runner,
        )  # fmt: skip

    def _start_on_free_port(self, cluster: Cluster) -> None:
        """Start on an ephemeral port; if another process took the port meanwhile, try another."""
        for attempt in range(4):
            try:
                cluster.start()
                return
            except DevClusterError:
                tail = cluster.log_tail()
                if attempt == 3 or ("could not bind" not in tail and "already in use" not in tail):
                    raise
                cluster.port = free_port()

    def _clone_replica(self, sockdir: Path) -> None:
        self.clusters["read_replica"] = self._new_replica("read_replica", sockdir)

    def _new_replica(self, name: str, sockdir: Path) -> Cluster:
        main = self.clusters["main"]
        datadir = self.basedir / name
        self.runner.check(
            "pg_basebackup", "-D", str(datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            "-h", str(sockdir), "-p", str(main.port), "-U", "postgres", what="pg_basebackup of main",
        )  # fmt: skip
        replica = Cluster(
            name=name, datadir=datadir, sockdir=sockdir, port=free_port(), user=main.user,
            password=main.password, database=main.database, runner=self.runner,
            super_password=main.super_password,
        )  # fmt: skip
        self._start_on_free_port(replica)
        return replica

    def add_replica(self, name: str) -> Cluster:
        """Another streaming replica of main (not one of the five roles: ``env()`` leaves it out)."""
        if name in self.clusters or name in self.extra:
            raise ValueError(f"cluster {name!r} exists")
        replica = self._new_replica(name, self.main.sockdir)
        self.extra[name] = replica
        return replica

    def remove_replica(self, name: str) -> None:
        replica = self.extra.pop(name)
        replica.stop(mode="immediate")
        shutil.rmtree(replica.datadir, ignore_errors=True)

    # -- access ---------------------------------------------------------------------------------------------
    def __getitem__(self, role: str) -> Cluster:
        return self.clusters[role]

    main = _RoleCluster()
    read_replica = _RoleCluster()
    analytics = _RoleCluster()
    documents = _RoleCluster()
    compliance = _RoleCluster()

    def env(self) -> dict[str, str]:
        """The seed's environment variables pointing at these clusters."""
        return {ROLE_ENV[role]: c.dsn for role, c in self.clusters.items()}

    def wait_replica_caught_up(self, timeout: float = 30) -> None:
        """Block until the replica has replayed everything main has written so far."""
        # A synchronous commit of a transaction that wrote WAL flushes all WAL written so far (commits made
        # with synchronous_commit off included); the flush position, read after it, is then our target. A
        # transaction that only took an xid (txid_current()) writes no WAL and flushes nothing.
        lsn = self.main.psql(
            "SET synchronous_commit TO on; BEGIN; SELECT pg_logical_emit_message(true, 'parafort', 'sync');"
            " COMMIT; SELECT pg_current_wal_flush_lsn()"
        ).splitlines()[-1]
        deadline = time.monotonic() + timeout
        query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        while self.read_replica.psql(query) != "t":
            if time.monotonic() > deadline:
                raise DevClusterError(f"replica did not replay up to {lsn} within {timeout}s")
            time.sleep(0.05)

    # -- teardown -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every server (replica first) and delete the directory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        order = [
            *self.extra.values(),
            *sorted(self.clusters.values(), key=lambda c: c.name != "read_replica"),
        ]
        for cluster in order:
            with contextlib.suppress(Exception):
                cluster.stop(mode="immediate", timeout=20)
        shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> DevClusters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LIVE: set[DevClusters] = set()


@atexit.register
def _close_all() -> None:
    for clusters in list(_LIVE):
        clusters.close()


@contextlib.contextmanager
def dev_clusters(roles: tuple[str, ...] = ROLES, **kwargs: Any) -> Iterator[DevClusters]:
    pg = DevClusters.start(roles, **kwargs)
    try:
        yield pg
    finally:
        pg.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true, or raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
