"""`parafort-proxy demo`: clusters + proxy come up, psql through the printed DSN works, analytics starts in
migration state planned with its rows in main and the printed migrate commands work against it, Ctrl-C
cleans up."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from proxy.dev.cluster import wait_until
from proxy.dev.demo import ACTIVITY_ROWS, METRIC_ROWS

ACTIVITY = "SELECT id, user_id, action, detail, occurred_at FROM user_activity ORDER BY id"


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


def psql(dsn: str, sql: str) -> str:
    cmd = ["psql", dsn, "-X", "-At", "-F", "|", "-c", sql]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def run_printed(text: str, verb: str) -> str:
    """Run the ``migrate analytics VERB`` command line the demo printed, as printed; its output."""
    found = re.search(rf"^  (.* migrate analytics {verb} --config .*)$", text, re.MULTILINE)
    assert found, text
    done = subprocess.run(
        shlex.split(found.group(1), comments=True), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def rows_of(table_output: str) -> dict[str, list[str]]:
    """A migrate command's table (name | col | ...), by its second column."""
    rows = [[c.strip() for c in line.split("|")] for line in table_output.splitlines()[2:] if "|" in line]
    return {r[1]: r for r in rows}


def check_analytics_planned(text: str, dsn: str, workdir: Path) -> None:
    """Analytics starts planned: main serves its rows (the analytics database has no such tables), the
    log said so, SHOW MIGRATION says so, and the printed plan and status commands work against the demo."""
    console = re.search(r"psql '(\S+)' -c 'SHOW MIGRATION'", text)
    assert console, text
    config = workdir / "proxy.yaml"
    assert f"configuration is {config}" in text, text
    urls = {role: section["url"] for role, section in yaml.safe_load(config.read_text())["roles"].items()}
    assert config.stat().st_mode & 0o077 == 0  # it holds the clusters' passwords
    migration = [dict(zip(("role", "state", "served_by"), line.split("|")[:3], strict=True))
                 for line in psql(console.group(1), "SHOW MIGRATION").splitlines()]  # fmt: skip
    assert migration[0] == {"role": "analytics", "state": "planned", "served_by": "main"}, migration
    assert {m["role"]: m["served_by"] for m in migration[1:]} == {
        "documents": "documents",
        "compliance": "compliance",
    }
    through_proxy = psql(dsn, ACTIVITY)
    assert len(through_proxy.splitlines()) == ACTIVITY_ROWS
    assert through_proxy == psql(urls["main"], ACTIVITY)
    assert psql(urls["analytics"], "SELECT to_regclass('user_activity') IS NULL") == "t\n"
    plan = run_printed(text, "plan")
    tables = rows_of(plan)
    assert tables["planned"][0] == "state", plan
    assert tables["user_activity"][2] == str(ACTIVITY_ROWS), plan
    assert tables["business_metrics"][2] == str(METRIC_ROWS), plan
    status = run_printed(text, "status")
    assert rows_of(status)["planned"][0] == "analytics", status


def check_walkthrough(text: str, dsn: str) -> None:
    """The README's walkthrough, with the commands the demo printed: start, cutover, rollback, cutover
    again, finish; the rows follow the database that serves them."""
    assert rows_of(run_printed(text, "start"))["copying"][0] == "state"
    wait_until(lambda: "streaming" in rows_of(run_printed(text, "status")), 60, "analytics streaming")
    for verb, state, served_by in (
        ("cutover", "cutover", "analytics"),
        ("rollback", "streaming", "main|read_replica"),  # main's side: reads go to its replica
        ("cutover", "cutover", "analytics"),
    ):
        assert rows_of(run_printed(text, verb))[state][0] == "state"
        served = psql(dsn, "SELECT inet_server_port(), count(*) FROM user_activity").split("|")
        assert served[1].strip() == str(ACTIVITY_ROWS)  # the history, wherever it is served from
        assert re.search(rf"(?:{served_by})\s+127\.0\.0\.1:{served[0]}\b", text), (verb, served)
    finished = rows_of(run_printed(text, "finish"))
    assert finished["finished"][0] == "state"
    assert finished["main: user_activity"][0] in ("unguarded", "may_drop")


def test_demo_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--dir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=False,
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
            # The proxy listens once the stored state is read (or after a bounded wait for main): the log
            # line comes before the listening line in the common case, and is waited for in any case.
            planned = "event=migration_planned role=analytics"
            wait_until(lambda: planned in printed(), 60, "the demo's log to say analytics is planned")
            check_analytics_planned(printed(), dsn.group(1), workdir)
            check_walkthrough(printed(), dsn.group(1))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
            assert not (workdir / "proxy.yaml").exists(), "the demo left its configuration behind"
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
