"""Classification cost per statement: cache hit (same bytes), fingerprint hit (other literals), miss.

.venv/bin/python -m bench.classify
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

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


def per_call_us(fn: Callable[..., object], args: Sequence[object], repeat: int = 7) -> float:
    """Median over ``repeat`` runs of the mean cost of one call, in microseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for arg in args:
            fn(arg)
        runs.append((time.perf_counter() - start) / len(args) * 1e6)
    return statistics.median(runs)


def main() -> None:
    config = load_config(
        None, {"DATABASE_URL": "postgresql://u@h/db", "READ_REPLICA_DATABASE_URL": "postgresql://u@r/db"}
    )
    router = Router(config)

    def decide(info: Classification) -> Decision:
        return router.decide_cached(info, None, None)

    print(
        f"{'statement':<60} {'hit (bytes)':>12} {'hit (fingerprint)':>18} {'miss (parse)':>13} {'decide':>8}"
    )
    for template in STATEMENTS:
        cache = ClassificationCache(size=100_000)
        same = [template.format(1).encode()] * 2000
        cache.classify_bytes(same[0])
        hit = per_call_us(cache.classify_bytes, list(same))
        other = [template.format(i).encode() for i in range(2, 2002)]
        fp = per_call_us(cache.classify_bytes, other, repeat=1)
        miss = per_call_us(classify, [template.format(i) for i in range(500)], repeat=3)
        info = cache.classify_bytes(same[0])
        router.decide_cached(info, None, None)
        decided = per_call_us(decide, [info] * 2000)
        label = template.format(1)[:58]
        print(f"{label:<60} {hit:>10.2f}us {fp:>16.2f}us {miss:>11.1f}us {decided:>6.2f}us")


if __name__ == "__main__":
    main()
