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
few seconds does not flood the info log. A malformed request is answered 400
and logged as one INFO line (no traceback).

The server is bounded, since anyone on the machine may connect to it: a
connection that has not sent a complete request :data:`IDLE_TIMEOUT` seconds
after it opened, or after its last answer, is closed, and at most
:data:`MAX_CONNECTIONS` are open at once (a new one closes the oldest that has
not sent a request, so a probe still gets through while someone holds idle
sockets).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from lakeproxy.metrics import CONTENT_TYPE, Metrics
from lakeproxy.readiness import (
    REASON_AT_LIMIT,
    REASON_DRAINING,
    REASON_INTERNAL,
    REASON_NO_CREDENTIAL,
    REASON_NO_FDS,
    REASON_NOT_LISTENING,
    ReadinessSource,
    not_ready_reason,
)

__all__ = [
    "REASON_AT_LIMIT", "REASON_DRAINING", "REASON_INTERNAL", "REASON_NOT_LISTENING",
    "REASON_NO_CREDENTIAL", "REASON_NO_FDS", "AdminServer", "ReadinessSource",
    "not_ready_reason",
]

log = logging.getLogger("lakeproxy.admin")
access_log = logging.getLogger("lakeproxy.admin.access")

#: Seconds :meth:`AdminServer.stop` waits for in-flight admin requests.
SHUTDOWN_TIMEOUT: Final = 2.0

#: Seconds an admin connection may stay open without a complete request: from
#: its start (idle or half-sent headers) and between keep-alive requests.
IDLE_TIMEOUT: Final = 5.0

#: Admin connections open at once; one more closes the oldest (one that has
#: not sent a request yet, if any: a probe's keep-alive connection goes last).
MAX_CONNECTIONS: Final = 64

#: Seconds between two log lines about admin connections closed for the cap.
_EVICTION_LOG_INTERVAL: Final = 60.0

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

    def __init__(
        self,
        state: ReadinessSource,
        metrics: Metrics,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._guard: _ConnectionGuard | None = None
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
        app = web.Application(middlewares=[self._answering])
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
            # Between requests (and, in recent aiohttp, before the first one);
            # the guard covers the first request whatever the version.
            keepalive_timeout=self._idle_timeout,
            lingering_time=self._idle_timeout,
            logger=_HttpLog(logging.getLogger("lakeproxy.admin.http"), {}),
        )
        await runner.setup()
        if runner.server is None:  # pragma: no cover - setup() made it
            raise RuntimeError("aiohttp runner has no server")
        guard = _ConnectionGuard(runner.server, self._idle_timeout, self._max_connections)
        try:
            server = await asyncio.get_running_loop().create_server(
                guard.protocol, host, port, reuse_address=True, backlog=128,
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._server, self._guard = runner, server, guard
        self._port = _bound_port(server)
        log.info("admin server listening on %s", _format_addr(host, self._port))

    async def stop(self) -> None:
        """Stop serving and close the socket. Safe to call twice or before start."""
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        self._guard = None
        self._port = None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _answering(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[StreamResponse]]
    ) -> StreamResponse:
        """A complete request arrived: its connection's first-request deadline is off."""
        if self._guard is not None and request.transport is not None:
            self._guard.request_arrived(request.transport)
        return await handler(request)

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


def _bound_port(server: asyncio.AbstractServer) -> int:
    for sock in getattr(server, "sockets", ()) or ():
        addr = sock.getsockname()
        if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[1], int):
            return addr[1]
    raise RuntimeError("admin server bound no TCP socket")


class _ConnectionGuard:
    """Bounds the admin server's connections (see the module docstring).

    Wraps aiohttp's protocol factory; aiohttp's keep-alive timeout covers the
    time between requests, this the time before the first one (idle or
    half-sent) and the number of connections.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], timeout: float,
                 limit: int) -> None:
        self._factory = factory
        self._timeout = timeout
        self._limit = max(1, limit)
        #: Open connections, oldest first, with their first-request deadline.
        self._open: dict[asyncio.BaseTransport, asyncio.TimerHandle | None] = {}
        self._evicted = 0
        self._logged_at = -_EVICTION_LOG_INTERVAL

    def protocol(self) -> asyncio.Protocol:
        return _GuardedProtocol(self._factory(), self)

    def opened(self, transport: asyncio.BaseTransport) -> None:
        while len(self._open) >= self._limit:
            waiting = (t for t, timer in self._open.items() if timer is not None)
            oldest = next(waiting, None) or next(iter(self._open))
            self.closed(oldest)
            _abort(oldest)
            self._evicted += 1
        now = time.monotonic()
        if self._evicted and now - self._logged_at >= _EVICTION_LOG_INTERVAL:
            log.info("admin server: %d connection(s) closed to stay within %d open at once",
                     self._evicted, self._limit)
            self._evicted, self._logged_at = 0, now
        loop = asyncio.get_running_loop()
        self._open[transport] = loop.call_later(self._timeout, _abort, transport)

    def request_arrived(self, transport: asyncio.BaseTransport) -> None:
        timer = self._open.get(transport)
        if timer is not None:
            timer.cancel()
            self._open[transport] = None

    def closed(self, transport: asyncio.BaseTransport) -> None:
        timer = self._open.pop(transport, None)
        if timer is not None:
            timer.cancel()


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, registered with the guard."""

    __slots__ = ("_guard", "_inner", "_transport")

    def __init__(self, inner: asyncio.Protocol, guard: _ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guard.opened(transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        self._inner.connection_lost(exc)


class _HttpLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger: a malformed request is one INFO line, no traceback.

    aiohttp logs every request it cannot parse with ``logger.exception`` (ERROR
    and a traceback); anyone who can reach the port could fill the log that way.
    Other exceptions (a bug in a handler) stay at ERROR with their traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, HttpProcessingError):
            peer = args[0] if args else "?"
            self.info("admin: bad request from %s: %s", peer,
                      str(exc.message or exc).splitlines()[0][:200])
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)

    def process(self, msg: object, kwargs: MutableMapping[str, Any]
                ) -> tuple[object, MutableMapping[str, Any]]:
        return msg, kwargs


def _format_addr(host: str, port: int) -> str:
    try:
        is_v6 = socket.inet_pton(socket.AF_INET6, host) is not None
    except OSError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"
