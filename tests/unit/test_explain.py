"""`parafort-proxy explain`: the decision and its reason, without any database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).parent.parent.parent / "config" / "proxy.yaml"
ENV = {
    "DATABASE_URL": "postgresql://app:secret-main@main.internal/app",
    "ANALYTICS_DATABASE_URL": "postgresql://app:secret-an@analytics.internal/app",
    "READ_REPLICA_DATABASE_URL": "postgresql://app:secret-rr@replica.internal/app",
}


def explain(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")} | ENV
    return subprocess.run(
        [sys.executable, "-m", "proxy", "explain", "--config", str(CONFIG), *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_json_keys_and_values() -> None:
    out = explain("--json", "INSERT INTO user_activity (user_id, action) VALUES (1, 'x')")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert {"kind", "domains", "role", "reason"} <= set(decision)
    assert (
        decision["kind"] == "write"
        and decision["domains"] == ["analytics"]
        and decision["role"] == "analytics"
    )


def test_refusal_and_fallback_are_explained() -> None:
    refused = json.loads(explain("--json", "SELECT * FROM users JOIN user_activity USING (id)").stdout)
    assert refused["role"] is None and refused["error"]["sqlstate"] == "0A000"
    assert "users" in refused["reason"] and "user_activity" in refused["reason"]
    # documents is not configured here: its tables are main's, and a read of them goes to the replica.
    fallen = json.loads(explain("--json", "SELECT * FROM documents").stdout)
    assert fallen["role"] == "read_replica" and "served by main" in fallen["reason"]


def test_text_output_and_transactions() -> None:
    out = explain("--transaction", "read_write", "SELECT * FROM users")
    assert out.returncode == 0
    assert "role:    main" in out.stdout and "kind:    read" in out.stdout
    assert "secret" not in out.stdout + out.stderr
