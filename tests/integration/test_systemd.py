"""systemd integration: the notify protocol seen by a fake NOTIFY_SOCKET, the unit file, and its sandbox.

The proxy is started here (not through ProxyProcess, which waits for the port itself) so that the notify
listener knows the port before the process runs and can test it the instant READY=1 arrives.
"""

from __future__ import annotations

import configparser
import itertools
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psycopg
import pytest
import yaml

from proxy.config.loader import ROLE_ENV
from proxy.dev.cluster import DevClusters, free_port, wait_until
from proxy.dev.testing import APP_PASSWORD, APP_USER

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "parafort-proxy.service"
ENV_EXAMPLE = ROOT / "systemd" / "parafort-proxy.env.example"


class NotifyListener(threading.Thread):
    """A fake systemd: receives notify datagrams on a unix socket, each with its arrival time.

    On READY=1 it connects to the proxy's port at once, in this thread, before reading anything else:
    ``ready_connect`` says whether the listener was accepting when READY=1 arrived.
    """

    def __init__(self, path: Path, port: int) -> None:
        super().__init__(daemon=True)
        assert len(str(path)) < 100, f"unix socket path too long: {path}"
        self.path = path
        self.port = port
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []  # (time.monotonic(), one KEY=value line)
        self.ready_connect: bool | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def run(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            lines = data.decode().splitlines()
            if "READY=1" in lines and self.ready_connect is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    self.ready_connect = True
                except OSError:
                    self.ready_connect = False
            with self._lock:
                self.messages.extend((now, line) for line in lines)

    def times(self, line: str) -> list[float]:
        with self._lock:
            return [t for t, got in self.messages if got == line]

    def lines(self) -> list[str]:
        with self._lock:
            return [got for _, got in self.messages]

    def wait_for(self, line: str, timeout: float, count: int = 1) -> list[float]:
        wait_until(lambda: len(self.times(line)) >= count, timeout, f"{count} x {line!r} on NOTIFY_SOCKET")
        return self.times(line)

    def close(self) -> None:
        self._closed.set()
        self.join(5)
        self.sock.close()


class Proxy:
    """``python -m proxy run`` with the given extra environment, optionally behind a wrapper command."""

    def __init__(
        self, workdir: Path, pg: DevClusters, port: int, env: Mapping[str, str], wrapper: list[str]
    ) -> None:
        self.port = port
        self.admin_port = free_port()
        users = workdir / "userlist.txt"
        users.write_text(f'"{APP_USER}" "{APP_PASSWORD}"\n')
        config = workdir / "proxy.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": self.port},
                    "admin": {"host": "127.0.0.1", "port": self.admin_port},
                    "auth": {"users_file": str(users)},
                }
            )
        )
        full_env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
        full_env = {k: v for k, v in full_env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        full_env |= {"DATABASE_URL": pg.env()["DATABASE_URL"], **env}
        self.log_path = workdir / "proxy.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "proxy", "run", "--config", str(config), "--log-level", "info"]
        self.proc = subprocess.Popen(
            [*wrapper, *command], env=full_env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    def dsn(self) -> str:
        return f"postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.port}/app?sslmode=disable"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


StartProxy = Callable[..., tuple[Proxy, NotifyListener]]


@pytest.fixture
def start(pg: DevClusters, tmp_path: Path) -> Iterator[StartProxy]:
    """``start(env={...}, wrapper=[...])``: a proxy whose NOTIFY_SOCKET is a listener in tmp_path."""
    started: list[tuple[Proxy, NotifyListener]] = []

    def go(
        env: Mapping[str, str] | None = None, wrapper: list[str] | None = None
    ) -> tuple[Proxy, NotifyListener]:
        workdir = tmp_path / f"p{len(started)}"
        workdir.mkdir()
        port = free_port()
        listener = NotifyListener(workdir / "notify.sock", port)
        listener.start()
        proxy = Proxy(workdir, pg, port, {"NOTIFY_SOCKET": str(listener.path), **(env or {})}, wrapper or [])
        started.append((proxy, listener))
        return proxy, listener

    yield go
    for proxy, listener in started:
        proxy.stop()
        listener.close()


def _ready(proxy: Proxy, listener: NotifyListener) -> float:
    try:
        return listener.wait_for("READY=1", 20)[0]
    except TimeoutError:
        raise AssertionError(f"no READY=1; exit code {proxy.proc.poll()}; log:\n{proxy.log()}") from None


# -- the notify protocol --------------------------------------------------------------------------------
def test_ready_only_once_listening_and_stopping_on_sigterm(start: StartProxy) -> None:
    proxy, listener = start()
    _ready(proxy, listener)
    assert listener.ready_connect is True, "READY=1 arrived before the port accepted"
    assert f"STATUS=serving on 127.0.0.1:{proxy.port}" in listener.lines()
    assert "STOPPING=1" not in listener.lines()
    assert "WATCHDOG=1" not in listener.lines()  # no WATCHDOG_USEC: no pings

    sent = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    (stopping,) = listener.wait_for("STOPPING=1", 10)
    assert stopping >= sent
    assert proxy.proc.wait(30) == 0, proxy.log()
    assert listener.times("READY=1") == [listener.times("READY=1")[0]]  # exactly one READY=1


def test_watchdog_pings_at_the_configured_rate(start: StartProxy) -> None:
    """WATCHDOG_USEC=1 s: a ping every 0.5 s. A functional check of the rate, not a timing benchmark."""
    proxy, listener = start(env={"WATCHDOG_USEC": "1000000"})
    ready = _ready(proxy, listener)
    pings = listener.wait_for("WATCHDOG=1", 2.5 - (time.monotonic() - ready), count=3)
    assert pings[0] >= ready
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.25 <= statistics.median(gaps) <= 1.0, gaps

    proxy.proc.send_signal(signal.SIGTERM)
    (stopping,) = listener.wait_for("STOPPING=1", 10)
    assert proxy.proc.wait(30) == 0, proxy.log()
    assert all(t <= stopping for t in listener.times("WATCHDOG=1")), "pinged after STOPPING=1"


def test_no_watchdog_for_another_process(start: StartProxy) -> None:
    """WATCHDOG_PID names another process (inherited variables): the proxy must not ping.

    An enabled watchdog pings at once after READY=1, and datagrams on one socket keep their order, so a
    ping would be seen before STOPPING=1 however soon SIGTERM follows.
    """
    proxy, listener = start(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    _ready(proxy, listener)
    proxy.proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", 10)
    assert proxy.proc.wait(30) == 0
    assert "WATCHDOG=1" not in listener.lines()


# -- the unit file --------------------------------------------------------------------------------------
def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_file_sets_what_the_brief_asks() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].split()[1:] == ["run", "--config", "/etc/parafort-proxy/proxy.yaml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["EnvironmentFile"].startswith("-/etc/parafort-proxy/")
    assert service["WatchdogSec"] == "30s"
    assert int(service["LimitNOFILE"]) >= 65536
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "MemoryDenyWriteExecute"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""


def test_env_example_names_the_five_urls_without_secrets() -> None:
    values = dict(re.findall(r"^([A-Z_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert set(values) == set(ROLE_ENV.values())
    for name, url in values.items():
        assert urllib.parse.urlsplit(url).password == "CHANGE-ME", name  # placeholders only


def _run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, cwd=cwd)


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze missing: scripts/bootstrap.sh installs Debian's systemd package")
    return found


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's real parafort-proxy script.

    `verify` checks that the ExecStart binary exists and is executable; the shipped unit names the installed
    path (/usr/local/bin/parafort-proxy), which a test machine does not have. Nothing else changes.
    """
    script = Path(sys.executable).parent / "parafort-proxy"
    assert script.exists(), script
    copy = tmp_path / "parafort-proxy.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/parafort-proxy", str(script)))
    return copy


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit, offline (no systemd as PID 1 needed): no error, no warning."""
    result = _run(_systemd_analyze(), "verify", str(_unit_copy(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_security_stays_ok(tmp_path: Path) -> None:
    """The offline exposure score (0 best .. 10 worst; 1.2 when written) stays at or under 2.0: a guard
    against hardening lost in an edit."""
    analyze = _systemd_analyze()
    result = _run(
        analyze, "security", "--offline=true", "--threshold=20", str(_unit_copy(tmp_path)), cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# -- the sandbox: the unit's seccomp rules, reproduced here, do not break the proxy -----------------------
SECCOMP_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM, as SystemCallErrorNumber=EPERM
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
ARG2 = 16 + 2 * 8  # offsetof(struct seccomp_data, args[2]), low 32 bits (little endian)

WRAPPER = """
import ctypes, os, sys
prog = bytes.fromhex(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
fprog = Fprog(len(prog) // 8, prog)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
os.execv(sys.argv[2], sys.argv[2:])
"""


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


LD_ABS, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06


def _syscall_numbers() -> dict[str, int]:
    header = Path(f"/usr/include/{platform.machine()}-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        header = Path("/usr/include/asm-generic/unistd.h")
    if not header.exists():
        pytest.skip("no kernel headers (linux-libc-dev) to map syscall names to numbers")
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)\b", header.read_text())}


def _filter_group(analyze: str, group: str, seen: set[str] | None = None) -> set[str]:
    """The syscall names of a systemd group such as @system-service, nested groups expanded."""
    seen = set() if seen is None else seen
    out = _run(analyze, "syscall-filter", group)
    assert out.returncode == 0, out.stderr
    names: set[str] = set()
    for raw in out.stdout.splitlines()[1:]:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if line not in seen:
                seen.add(line)
                names |= _filter_group(analyze, line, seen)
        else:
            names.add(line)
    return names


def _seccomp_program(unit: configparser.SectionProxy, numbers: dict[str, int]) -> bytes:
    """A classic-BPF seccomp filter doing what systemd does for this unit's settings.

    MemoryDenyWriteExecute=yes (as systemd's seccomp rules): mmap with PROT_WRITE|PROT_EXEC, mprotect and
    pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC fail with EPERM. SystemCallFilter= lines: the first
    one an allow list, the ~ ones removed from it; anything else fails with SystemCallErrorNumber=EPERM.
    SystemCallArchitectures=native: another architecture's calls fail.
    """
    prog = [_bpf(LD_ABS, 4), _bpf(JEQ, SECCOMP_ARCH[platform.machine()], 1, 0), _bpf(RET, SECCOMP_RET_EPERM)]
    prog.append(_bpf(LD_ABS, 0))  # A = syscall number
    if unit.get("MemoryDenyWriteExecute") == "yes":
        rules = [("mmap", PROT_WRITE | PROT_EXEC), ("mprotect", PROT_EXEC), ("pkey_mprotect", PROT_EXEC)]
        rules.append(("shmat", SHM_EXEC))
        for name, mask in rules:
            if name in numbers:  # not nr: skip the 5 instructions of this rule
                prog += [_bpf(JEQ, numbers[name], 0, 5), _bpf(LD_ABS, ARG2), _bpf(AND, mask)]
                prog += [_bpf(JEQ, mask, 0, 1), _bpf(RET, SECCOMP_RET_EPERM), _bpf(RET, SECCOMP_RET_ALLOW)]
    filters = [line for line in _unit_values("SystemCallFilter") if line]
    if not filters:
        return b"".join([*prog, _bpf(RET, SECCOMP_RET_ALLOW)])
    assert not filters[0].startswith("~"), "expected an allow list first"
    analyze = _systemd_analyze()
    allowed: set[str] = {"execve", "exit", "exit_group", "rt_sigreturn"}  # always allowed by systemd
    for item in filters[0].split():
        allowed |= _filter_group(analyze, item) if item.startswith("@") else {item}
    for line in filters[1:]:
        for item in line.removeprefix("~").split():
            allowed -= _filter_group(analyze, item) if item.startswith("@") else {item}
    for nr in sorted(numbers[name] for name in allowed if name in numbers):
        prog += [_bpf(JEQ, nr, 0, 1), _bpf(RET, SECCOMP_RET_ALLOW)]
    return b"".join([*prog, _bpf(RET, SECCOMP_RET_EPERM)])


def _unit_values(key: str) -> list[str]:
    """Every value of a key in [Service], in order (configparser keeps only the last of repeated keys)."""
    values, section = [], ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(f"{key}="):
            values.append(line.partition("=")[2].strip())
    return values


@pytest.fixture
def sandbox() -> list[str]:
    """A command prefix that execs the rest under the unit's seccomp rules (see _seccomp_program)."""
    if platform.machine() not in SECCOMP_ARCH:
        pytest.skip(f"no seccomp emulation for {platform.machine()}")
    prog = _seccomp_program(_unit()["Service"], _syscall_numbers())
    return [sys.executable, "-c", WRAPPER, prog.hex()]


def test_the_sandbox_is_in_force(sandbox: list[str]) -> None:
    """The emulation bites: a writable+executable mapping is refused inside it, allowed outside."""
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    assert _run(sys.executable, "-c", probe).returncode == 0
    inside = _run(*sandbox, sys.executable, "-c", probe)
    assert inside.returncode != 0
    assert "PermissionError" in inside.stderr, inside.stderr
    if len(_unit_values("SystemCallFilter")) > 1:  # @privileged is denied: setuid() must fail
        setuid = "import os; os.setuid(os.getuid())"
        inside = _run(*sandbox, sys.executable, "-c", setuid)
        assert "PermissionError" in inside.stderr, inside.stderr


def test_proxy_serves_inside_the_units_sandbox(start: StartProxy, sandbox: list[str]) -> None:
    """MemoryDenyWriteExecute (and SystemCallFilter when set) do not break CPython, uvloop, asyncpg,
    pglast or the admin HTTP listener: statements through the proxy, /metrics, a reload, a clean stop."""
    proxy, listener = start(env={"WATCHDOG_USEC": "1000000"}, wrapper=sandbox)
    _ready(proxy, listener)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        conn.execute("CREATE TEMP TABLE sandbox_probe (id int)")
        conn.execute("INSERT INTO sandbox_probe SELECT generate_series(1, 100)")
        assert conn.execute("SELECT count(*) FROM sandbox_probe WHERE id > 50").fetchone() == (50,)
    url = f"http://127.0.0.1:{proxy.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "event=reloaded" in proxy.log(), 10, "the reload")
    listener.wait_for("WATCHDOG=1", 5, count=2)
    proxy.proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", 10)
    assert proxy.proc.wait(30) == 0, proxy.log()
    assert "Traceback" not in proxy.log(), proxy.log()
