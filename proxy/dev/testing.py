"""Run a real ``parafort-proxy run`` process for tests, demos and benchmarks, and stop it by pid; and an
in-memory transport for driving the connections in-process (``MemoryTransport``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.dev.cluster import free_port, wait_until

# The client login that test proxies accept (their users file); upstreams use each role's own DSN.
APP_USER = "app"
APP_PASSWORD = "app-secret-pw"


class ProxyProcess:
    """A proxy subprocess with its own YAML config in a temporary directory."""

    def __init__(
        self,
        env: Mapping[str, str],
        config: Mapping[str, Any] | None = None,
        users: Mapping[str, str] | None = None,
        log_level: str = "info",
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="parafort-proxy-"))
        self.port = free_port()
        self.admin_port = free_port()
        doc: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "admin": {"host": "127.0.0.1", "port": self.admin_port},
        }
        for key, value in (config or {}).items():
            doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
        if users is not None:
            userlist = self.dir / "userlist.txt"
            userlist.write_text("".join(f'"{u}" "{p}"\n' for u, p in users.items()))
            doc.setdefault("auth", {})["users_file"] = str(userlist)
        self.config_path = self.dir / "proxy.yaml"
        self.config_path.write_text(yaml.safe_dump(doc))
        self.log_path = self.dir / "proxy.log"
        clean_env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
        clean_env.update(env)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "run",
                "--config",
                str(self.config_path),
                "--log-level",
                log_level,
            ],
            env=clean_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._accepting, 20, "the proxy to listen")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"proxy did not start:\n{self.log()}") from None

    def _accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
        # The client listener opens before the admin one: ready means both accept.
        for port in (self.port, self.admin_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
        return True

    def dsn(self, user: str, password: str, database: str = "app", **params: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}?sslmode=disable{extra}"

    def metrics(self) -> str:
        """The text of a live scrape of the admin listener's /metrics."""
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text: str = resp.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0.0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            sample, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if sample == name and got == want:
                return float(value)
        return 0.0

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


class MemoryTransport:
    """What a connection writes goes to a list; the rest of the transport API does nothing. Drives a
    ClientConnection or ServerConnection in-process (``bench hotpath``, tests/unit/test_fast_path.py)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default
