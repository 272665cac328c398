"""The admin HTTP listener (loopback by default), served by aiohttp: /metrics and liveness."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.metrics import make_registry, render

if TYPE_CHECKING:
    from proxy.server import ProxyApp

log = logging.getLogger("parafort.http")


class AdminServer:
    """Serves the admin endpoints of one ProxyApp."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        self.registry = make_registry(app)
        self._runner: web.AppRunner | None = None

    def _routes(self) -> web.Application:
        web_app = web.Application()
        web_app.router.add_get("/metrics", self.metrics)
        web_app.router.add_get("/live", self.live)
        return web_app

    async def metrics(self, request: web.Request) -> web.Response:
        body = render(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self._routes(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        log.info("event=admin_listening address=%s:%d", host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
