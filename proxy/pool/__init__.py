"""Upstream connection pools, one per upstream server."""

from proxy.pool.pool import Pool, Poolable, PoolStats

__all__ = ["Pool", "PoolStats", "Poolable"]
