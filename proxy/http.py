"""The admin HTTP listener (loopback by default), served by aiohttp: /metrics, health, liveness, readiness."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.context import HttpContext
from proxy.metrics import make_registry, render

log = logging.getLogger("parafort.http")

# The seed's JSON keys for the roles (its camelCase for the read replica).
SEED_KEYS = {
    "main": "main",
    "analytics": "analytics",
    "documents": "documents",
    "compliance": "compliance",
    "read_replica": "readReplica",
}


class AdminServer:
    """Serves the admin endpoints of one ProxyApp."""

    def __init__(self, app: HttpContext) -> None:
        self.app = app
        self.registry = make_registry(app)
        self._runner: web.AppRunner | None = None

    def _routes(self) -> web.Application:
        web_app = web.Application()
        web_app.router.add_get("/metrics", self.metrics)
        web_app.router.add_get("/live", self.live)
        web_app.router.add_get("/ready", self.ready)
        web_app.router.add_get("/api/health/databases", self.health_databases)
        web_app.router.add_get("/api/health/connections", self.health_connections)
        return web_app

    async def metrics(self, request: web.Request) -> web.Response:
        body = render(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 while main takes traffic; 503 with the reason otherwise (for load balancers and systemd)."""
        health = self.app.health
        if health.usable("main"):
            return web.json_response({"status": "ready"})
        error = health.snapshot()["main"].last_error or "failed its health probes"
        return web.json_response({"status": "not ready", "reason": f"main is down: {error}"}, status=503)

    async def health_databases(self, request: web.Request) -> web.Response:
        """The seed's ``{"main": true, ..., "readReplica": false}``: configured and healthy; 503 without
        a healthy main. ``readReplica`` is true when at least one replica takes reads."""
        health = self.app.health
        body = {
            SEED_KEYS[role]: health.usable(role) for role in ("main", "analytics", "documents", "compliance")
        }
        body["readReplica"] = any(health.usable(label) for label in health.replica_labels())
        return web.json_response(body, status=200 if body["main"] else 503)

    async def health_connections(self, request: web.Request) -> web.Response:
        """Per configured role, the seed's ``totalConnections``/``idleConnections``/``waitingConnections``
        (a role with several replicas sums their pools)."""
        body: dict[str, dict[str, int]] = {}
        for label, pool in self.app.pools.items():
            stats = pool.stats
            entry = body.setdefault(
                SEED_KEYS[self.app.pool_roles[label]],
                {"totalConnections": 0, "idleConnections": 0, "waitingConnections": 0},
            )
            entry["totalConnections"] += stats.total
            entry["idleConnections"] += stats.idle
            entry["waitingConnections"] += stats.waiting
        return web.json_response(body)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self._routes(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        log.info("event=admin_listening address=%s:%d", host, port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs the listener is bound to (empty before start)."""
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
