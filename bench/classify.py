"""Classification cost per statement: cache hit (same bytes), other literals (the literal shape, else the
fingerprint), miss.

.venv/bin/python -m bench.classify        (or: python -m bench classify [--json PATH] [--no-docs])
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from bench import report
from bench.pgbench_compare import add_output_arguments, machine_facts, publish
from proxy.config import load_config
from proxy.router.classify import Classification, ClassificationCache, classify
from proxy.router.policy import Decision, Router

STATEMENTS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
    "INSERT INTO user_activity (user_id, action) VALUES ({}, 'login')",
    "SELECT u.email, count(*) FROM users u JOIN subscriptions s ON s.user_id = u.id"
    " WHERE u.id > {} GROUP BY 1",
    "WITH moved AS (DELETE FROM documents WHERE id = {} RETURNING *) SELECT count(*) FROM moved",
]
KEYS = ("hit_us", "other_literals_us", "miss_us", "decide_us")


def per_call_us(fn: Callable[..., object], args: Sequence[object], repeat: int = 7) -> float:
    """Median over ``repeat`` runs of the mean cost of one call, in microseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for arg in args:
            fn(arg)
        runs.append((time.perf_counter() - start) / len(args) * 1e6)
    return statistics.median(runs)


def measure() -> list[dict[str, Any]]:
    """One row per statement: microseconds per cache hit, hit with other literals, miss (parse), decision."""
    config = load_config(
        None, {"DATABASE_URL": "postgresql://u@h/db", "READ_REPLICA_DATABASE_URL": "postgresql://u@r/db"}
    )
    router = Router(config)

    def decide(info: Classification) -> Decision:
        return router.decide_cached(info, None, None)

    rows: list[dict[str, Any]] = []
    for template in STATEMENTS:
        cache = ClassificationCache(size=100_000)
        same = [template.format(1).encode()] * 2000
        cache.classify_bytes(same[0])
        hit = per_call_us(cache.classify_bytes, list(same))
        other = [template.format(i).encode() for i in range(2, 2002)]
        other_literals = per_call_us(cache.classify_bytes, other, repeat=1)
        miss = per_call_us(classify, [template.format(i) for i in range(500)], repeat=3)
        info = cache.classify_bytes(same[0])
        router.decide_cached(info, None, None)
        decided = per_call_us(decide, [info] * 2000)
        rows.append(
            {
                "statement": template.format(1),
                "hit_us": round(hit, 3),
                "other_literals_us": round(other_literals, 3),
                "miss_us": round(miss, 2),
                "decide_us": round(decided, 3),
            }
        )
    return rows


def medians(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    return {key: round(statistics.median(row[key] for row in rows), 3) for key in KEYS}


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'statement':<60} {'hit (bytes)':>12} {'other literals':>18} {'miss (parse)':>13} {'decide':>8}")
    for row in [*rows, {"statement": "median", **medians(rows)}]:
        print(
            f"{row['statement'][:58]:<60} {row['hit_us']:>10.2f}us {row['other_literals_us']:>16.2f}us "
            f"{row['miss_us']:>11.1f}us {row['decide_us']:>6.2f}us"
        )


def classify_doc() -> dict[str, Any]:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    rows = measure()
    print_rows(rows)
    return {
        "benchmark": "statement classification cost",
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "command": "python -m bench classify",
        "statements": rows,
        "medians": medians(rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench classify", description=__doc__.split("\n")[0])
    add_output_arguments(p)
    args = p.parse_args(argv)
    doc = classify_doc()
    publish(doc, args, "classify", report.classify_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
