"""`parafort-proxy demo`: clusters + proxy come up, psql through the printed DSN works, Ctrl-C cleans up."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from proxy.dev.cluster import wait_until


def http_status(url: str) -> int:
    """The status of a GET of ``url`` (an HTTP error status too); 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_demo_end_to_end() -> None:
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo"], stdout=out, stderr=subprocess.STDOUT, text=False
        )
        try:

            def printed() -> str:
                out.seek(0)
                return out.read().decode(errors="replace")

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"demo exited early:\n{printed()}")
                return "Press Ctrl-C" in printed()

            wait_until(ready, 90, "the demo to start")
            text = printed()
            dsn = re.search(r"psql '(postgresql://[^']+)'", text)
            basedir = re.search(r"clusters up in [0-9.]+s in (\S+)", text)
            assert dsn and basedir, text
            # The health and metrics URLs it prints are the ones the admin listener serves (issue 15).
            urls = re.findall(r"curl (http://\S+)", text)
            assert [u.rsplit("/", 1)[1] for u in urls] == ["databases", "connections", "metrics"], text
            wait_until(lambda: [http_status(u) for u in urls] == [200] * 3, 30, f"{urls} to answer 200")
            with urllib.request.urlopen(urls[-1], timeout=10) as resp:
                assert "parafort_proxy_upstream_up{" in resp.read().decode()
            rows = subprocess.run(
                ["psql", dsn.group(1), "-X", "-At", "-c", "SELECT email FROM users ORDER BY id"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            assert rows.stdout.split() == ["ada@example.com", "grace@example.com"]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
            deadline = time.monotonic() + 10
            while Path(basedir.group(1)).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not Path(basedir.group(1)).exists(), "the demo left its clusters behind"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the demo cleans up its clusters on SIGTERM too
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
