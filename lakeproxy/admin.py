"""The admin HTTP server (``LAKEPROXY_ADMIN_LISTEN``): probes and metrics.

- ``GET /healthz``: 200 ``ok`` while the process serves.
- ``GET /readyz``: 200 ``{"status": "ready"}``, or 503
  ``{"status": "not ready", "reason": ...}``.
- ``GET /metrics``: the Prometheus text format.

The probes only *read* state the proxy already holds: ``/readyz`` is
:func:`lakeproxy.readiness.not_ready_reason`, the same rule a ``pg_isready``
ping on a client listener gets. They never dial the endpoint and never call the
credential API: a probe must not wake a scaled-to-zero compute, nor keep one awake.

Requests are logged at DEBUG only (``lakeproxy.admin.access``), so a probe every
few seconds does not flood the info log.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from lakeproxy.metrics import CONTENT_TYPE, Metrics
from lakeproxy.readiness import (
    REASON_AT_LIMIT,
    REASON_DRAINING,
    REASON_INTERNAL,
    REASON_NO_CREDENTIAL,
    REASON_NOT_LISTENING,
    ReadinessSource,
    not_ready_reason,
)

__all__ = [
    "REASON_AT_LIMIT", "REASON_DRAINING", "REASON_INTERNAL", "REASON_NOT_LISTENING",
    "REASON_NO_CREDENTIAL", "AdminServer", "ReadinessSource", "not_ready_reason",
]

log = logging.getLogger("lakeproxy.admin")
access_log = logging.getLogger("lakeproxy.admin.access")

#: Seconds :meth:`AdminServer.stop` waits for in-flight admin requests.
SHUTDOWN_TIMEOUT: Final = 2.0

_NO_STORE: Final = {"Cache-Control": "no-store"}


class _DebugAccessLogger(AbstractAccessLogger):
    """One DEBUG line per admin request; nothing at INFO."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s %s -> %d in %.1f ms",
            request.remote, request.method, request.path, response.status, time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


class AdminServer:
    """aiohttp server for ``/healthz``, ``/readyz`` and ``/metrics``.

    Usage::

        admin = AdminServer(proxy, metrics)
        await admin.start("127.0.0.1", 0)
        ...  # admin.port is the bound port
        await admin.stop()
    """

    def __init__(self, state: ReadinessSource, metrics: Metrics) -> None:
        self._state = state
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when 0 was asked for).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._port is None:
            raise RuntimeError("admin server is not started")
        return self._port

    def build_app(self) -> web.Application:
        """Return the aiohttp application (for tests that drive it directly)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        return app

    async def start(self, host: str, port: int) -> None:
        """Bind ``host:port`` and serve until :meth:`stop`.

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound (in use, not local, ...).
        """
        if self._runner is not None:
            raise RuntimeError("admin server already started")
        runner = web.AppRunner(
            self.build_app(),
            access_log=access_log,
            access_log_class=_DebugAccessLogger,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = _bound_port(runner)
        log.info("admin server listening on %s", _format_addr(host, self._port))

    async def stop(self) -> None:
        """Stop serving and close the socket. Safe to call twice or before start."""
        runner, self._runner = self._runner, None
        self._port = None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers=_NO_STORE)

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = not_ready_reason(self._state)
        if reason is None:
            return _json(200, {"status": "ready"})
        return _json(503, {"status": "not ready", "reason": reason})

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(),
            headers={"Content-Type": CONTENT_TYPE, **_NO_STORE},
        )


def _json(status: int, body: dict[str, str]) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body) + "\n",
        content_type="application/json",
        headers=_NO_STORE,
    )


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[1], int):
            return addr[1]
    raise RuntimeError("admin server bound no TCP socket")


def _format_addr(host: str, port: int) -> str:
    try:
        is_v6 = socket.inet_pton(socket.AF_INET6, host) is not None
    except OSError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"
