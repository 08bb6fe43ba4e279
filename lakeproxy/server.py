"""Listeners, the session registry, drain and signals.

:class:`ProxyServer` binds every listener of every endpoint, keeps its own
``set`` of live sessions (uvloop's Server has no ``close_clients``), enforces
``max_clients`` and drains on shutdown. :func:`serve` is ``lakeproxy run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lakeproxy.cancel import CancelRegistry
from lakeproxy.config import Config, EndpointConfig, Listener
from lakeproxy.errors import LakeproxyError, ShuttingDown, TooManyConnections
from lakeproxy.log import fields as log_fields
from lakeproxy.metrics import Metrics
from lakeproxy.pool import Pool
from lakeproxy.readiness import not_ready_reason
from lakeproxy.session import ClientAuthenticator, ClientProtocol, Dialer, Session, SessionHooks

log = logging.getLogger("lakeproxy.server")


@dataclass(slots=True)
class Endpoint:
    """One configured endpoint at run time: its config and how to reach it."""

    config: EndpointConfig
    dialer: Dialer
    credentials_ready: Callable[[], bool]


class ProxyServer:
    """All listeners of one lakeproxy process. Implements readiness.ReadinessSource."""

    def __init__(
        self,
        config: Config,
        endpoints: Sequence[Endpoint],
        *,
        metrics: Metrics,
        authenticator: Callable[[], ClientAuthenticator] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.endpoints = list(endpoints)
        self.metrics = metrics
        self.sessions: set[Session] = set()
        self.cancels: CancelRegistry[Dialer] = CancelRegistry()
        #: Parked endpoint sessions (used by endpoints with pool_mode "session").
        self.pool = Pool(
            idle_timeout=config.pool_idle_timeout, max_idle=config.pool_max_idle,
            lifetime=config.pool_lifetime, max_total=config.max_clients, metrics=metrics,
        )
        self.listening = False
        self.draining = False
        self.max_clients = config.max_clients
        self._servers: list[asyncio.Server] = []
        self._authenticator = authenticator
        self._tls_context = tls_context
        self._unix_paths: list[str] = []
        self._current: list[SessionHooks] = []
        self.bound: list[str] = []
        metrics.set_live_bytes(self._live_bytes)

    # -- ReadinessSource ---------------------------------------------------

    @property
    def active_clients(self) -> int:
        return len(self.sessions)

    def credentials_ready(self) -> bool:
        return all(ep.credentials_ready() for ep in self.endpoints)

    def _live_bytes(self) -> tuple[int, int]:
        """Bytes spliced so far by sessions not yet counted as finished (read per scrape)."""
        up = down = 0
        for s in self.sessions:
            if s.splice is not None:
                up += s.splice.bytes_up
                down += s.splice.bytes_down
        return up, down

    # -- start / stop -------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener; raises OSError if one cannot be bound."""
        loop = asyncio.get_running_loop()
        self._current = [self._hooks(ep) for ep in self.endpoints]
        try:
            for index, ep in enumerate(self.endpoints):

                def factory(index: int = index) -> ClientProtocol:
                    self.metrics.session_started()
                    # Looked up per connection, so a reload applies to new clients.
                    hooks = self._current[index]
                    return ClientProtocol(hooks, self.sessions, self._session_finished)

                for listener in ep.config.listen:
                    try:
                        server = await self._bind(loop, listener, factory)
                    except OSError as exc:
                        raise bind_error(f"cannot listen on {listener.describe()}", exc) from exc
                    self._servers.append(server)
        except BaseException:
            await self.close_listeners()
            raise
        self.listening = True

    async def _bind(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: Listener,
        factory: Callable[[], ClientProtocol],
    ) -> asyncio.Server:
        if listener.kind == "unix" and listener.path is not None:
            path = listener.path  # DIR/.s.PGSQL.PORT, the name libpq looks for
            _remove_stale_socket(path)
            server = await loop.create_unix_server(factory, path=path, backlog=1024)
            # As PostgreSQL's default unix_socket_permissions; the directory guards access.
            os.chmod(path, 0o777)  # noqa: S103
            self._unix_paths.append(path)
            self.bound.append(f"unix:{path}")
            return server
        server = await loop.create_server(
            factory, host=listener.host, port=listener.port, backlog=1024, reuse_address=True
        )
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return server

    def reconfigure(
        self,
        config: Config,
        endpoints: Sequence[Endpoint],
        *,
        authenticator: Callable[[], ClientAuthenticator] | None,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        """Apply a reloaded configuration to new connections (listeners stay).

        Raises:
            ValueError: the number of endpoints changed (that needs a restart).
        """
        if len(endpoints) != len(self.endpoints):
            raise ValueError("the number of endpoints changed; restart to apply that")
        self.config = config
        self.endpoints = list(endpoints)
        self.max_clients = config.max_clients
        self._authenticator = authenticator
        self._tls_context = tls_context
        self._current = [self._hooks(ep) for ep in self.endpoints]
        self.pool.configure(
            idle_timeout=config.pool_idle_timeout, max_idle=config.pool_max_idle,
            lifetime=config.pool_lifetime, max_total=config.max_clients,
        )
        # Parked sessions of a replaced dialer (endpoint or identity changed), or of
        # an endpoint whose reuse was turned off, are closed now.
        pooled = {id(ep.dialer) for ep in self.endpoints if ep.config.pool_mode == "session"}
        dropped = self.pool.drop(lambda key: id(key[0]) in pooled, "reload")
        if dropped:
            log.info("reload: closed %d parked endpoint session(s)", dropped)

    def bound_port(self, index: int = 0) -> int:
        """Port of the ``index``-th TCP listener (useful when configured with port 0)."""
        tcp = [s for srv in self._servers for s in srv.sockets if s.family != socket.AF_UNIX]
        return int(tcp[index].getsockname()[1])

    async def close_listeners(self) -> None:
        """Stop accepting new connections (open sessions continue)."""
        self.listening = False
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()

    async def drain(self, grace: float) -> int:
        """Stop accepting, wait up to ``grace`` s for sessions, then end the rest.

        Returns how many sessions had to be closed at the deadline.
        """
        self.draining = True
        await self.close_listeners()
        parked = self.pool.close_all()
        if parked:
            log.info("shutting down: closed %d parked endpoint session(s)", parked)
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a set
            await asyncio.sleep(0.05)
        left = list(self.sessions)
        for s in left:
            s.close(abort=True)
        if left:
            log.info("shutdown grace over: closed %d open session(s)", len(left))
        # Give aborted sessions a moment to run their finally blocks.
        for _ in range(40):
            if not self.sessions:
                break
            await asyncio.sleep(0.025)
        return len(left)

    # -- sessions -----------------------------------------------------------

    def _hooks(self, ep: Endpoint) -> SessionHooks:
        cfg = ep.config
        m = self.metrics
        return SessionHooks(
            dialer=ep.dialer,
            role=cfg.user,
            default_database=cfg.database,
            connect_deadline=self.config.connect_deadline,
            cancels=self.cancels,
            admit=self._admit,
            not_ready=self._not_ready_for_ping,
            tls_context=self._tls_context,
            tls_required=self.config.client_tls == "require",
            authenticator=self._authenticator,
            on_upstream_connected=m.upstream_connected,
            pool=self.pool if cfg.pool_mode == "session" else None,
        )

    def _admit(self) -> LakeproxyError | None:
        if self.draining:
            return ShuttingDown(
                "shutting down",
                client_message="lakeproxy: the proxy is shutting down",
                hint="retry in a moment",
            )
        if len(self.sessions) > self.max_clients:
            return TooManyConnections(
                "too many clients",
                client_message=(
                    f"lakeproxy: sorry, too many clients already ({self.max_clients})"
                ),
                hint="raise LAKEPROXY_MAX_CLIENTS or use fewer connections",
            )
        return None

    def _not_ready_for_ping(self) -> str | None:
        # The ping's own connection is one of self.sessions: count it out.
        return not_ready_reason(self, asking=1)

    def _session_finished(self, session: Session) -> None:
        r = session.record
        self.metrics.session_finished(r.outcome, r.bytes_up, r.bytes_down)
        duration = time.monotonic() - r.started
        level = (logging.ERROR if r.outcome == "internal"
                 else logging.DEBUG if r.outcome == "probe"  # one every few seconds
                 else logging.INFO)
        values: dict[str, object] = {
            "client": r.client,
            "database": r.database,
            "duration_s": round(duration, 3),
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "closed_by": r.closed_by,
            "outcome": r.outcome,
        }
        if r.sqlstate:
            values["sqlstate"] = r.sqlstate
        if r.error:
            values["error"] = r.error
        if r.reused is not None:  # session reuse: where the endpoint session came from, went
            values["reused"] = r.reused
        if r.endpoint_session:
            values["endpoint_session"] = r.endpoint_session
            values["endpoint_session_reason"] = r.endpoint_session_reason
        log.log(level, "session end", extra=log_fields(**values))


class _SocketPathInUse(OSError):
    """The unix socket path is taken (see :func:`_remove_stale_socket`)."""


def bind_error(what: str, exc: OSError) -> OSError:
    """``what: reason`` as an OSError whose text is that one line (errno kept)."""
    if isinstance(exc, _SocketPathInUse) or not exc.errno:
        reason = exc.strerror or str(exc)
    else:
        reason = os.strerror(exc.errno)  # uvloop's own text repeats the address
    err = OSError(f"{what}: {reason}")
    err.errno = exc.errno
    return err


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file a previous run left behind.

    Raises:
        _SocketPathInUse: EADDRINUSE when a server still answers there, EEXIST
        when the path is not a socket (neither is removed).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise _SocketPathInUse(errno.EEXIST, "the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            pass  # nobody answers: stale
        else:
            raise _SocketPathInUse(errno.EADDRINUSE, "another server is listening there")
    os.unlink(path)
