"""Listeners, the session registry and drain.

:class:`ProxyServer` binds every listener of every endpoint, keeps its own
``set`` of live sessions (uvloop's Server has no ``close_clients``), enforces
``max_clients`` and drains on shutdown (:func:`lakeproxy.app.serve` runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import resource
import socket
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lakeproxy.cancel import CancelRegistry
from lakeproxy.config import Config, EndpointConfig, Listener, name_sources
from lakeproxy.errors import LakeproxyError, ShuttingDown, TooManyConnections
from lakeproxy.fds import FDS_HEADROOM, free_fds
from lakeproxy.listen import Acceptor, bind_tcp, bind_unix
from lakeproxy.log import fields as log_fields
from lakeproxy.metrics import Metrics
from lakeproxy.pool import Pool
from lakeproxy.readiness import not_ready_reason
from lakeproxy.session import (
    ClientAuthenticator,
    ClientProtocol,
    Dialer,
    Session,
    SessionHooks,
    format_peer,
)
from lakeproxy.wire import sqlstate
from lakeproxy.wire.codec import encode, error_response

log = logging.getLogger("lakeproxy.server")

#: Seconds between two warnings about connections closed for the pre-login budget.
_EVICTION_LOG_INTERVAL = 60.0

#: Seconds /readyz stays 503 after an accept failed for lack of descriptors.
FD_EXHAUSTED_MEMORY = 5.0
#: Seconds between two warnings about connections refused for lack of descriptors.
_FD_LOG_INTERVAL = 10.0

#: What a client accepted with the reserve descriptor gets (then the close).
_FD_REFUSAL = encode(error_response(
    sqlstate.TOO_MANY_CONNECTIONS,
    "lakeproxy: sorry, out of file descriptors",
    hint="the proxy's open files limit is reached; retry later",
))


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
        #: Every open connection (drain closes them).
        self.sessions: set[Session] = set()
        #: Connections in their pre-login phase, oldest first (their own budget
        #: of ``max_clients``: past it, the oldest is closed).
        self._logging_in: dict[Session, None] = {}
        #: Connections past it: these count against ``max_clients``.
        self._clients: set[Session] = set()
        #: Sessions whose client left while their endpoint session is reset for reuse.
        self._resetting: set[Session] = set()
        self._evicted = 0
        self._evicted_logged_at = -_EVICTION_LOG_INTERVAL
        self.cancels: CancelRegistry[Dialer] = CancelRegistry()
        #: Parked endpoint sessions (used by endpoints with pool_mode "session").
        self.pool = Pool(
            idle_timeout=config.pool_idle_timeout, max_idle=config.pool_max_idle,
            lifetime=config.pool_lifetime, max_total=config.max_clients, metrics=metrics,
        )
        self.listening = False
        self.draining = False
        self.max_clients = config.max_clients
        self._acceptors: list[Acceptor] = []
        self._fd_exhausted_at = -FD_EXHAUSTED_MEMORY
        self._fd_refusals = 0
        self._fd_logged_at = -_FD_LOG_INTERVAL
        self._authenticator = authenticator
        self._tls_context = tls_context
        self._unix_paths: list[str] = []
        self._current: list[SessionHooks] = []
        self.bound: list[str] = []
        #: The listeners actually open (a reload does not change them; a restart does).
        self.open_listeners: list[Listener] = []
        metrics.set_live_bytes(self._live_bytes)

    # -- ReadinessSource ---------------------------------------------------

    @property
    def active_clients(self) -> int:
        """Clients past their pre-login phase (what ``max_clients`` limits)."""
        return len(self._clients)

    @property
    def logging_in(self) -> int:
        """Connections still in their pre-login phase."""
        return len(self._logging_in)

    def credentials_ready(self) -> bool:
        return all(ep.credentials_ready() for ep in self.endpoints)

    def can_accept(self) -> bool:
        """False when too few file descriptors are free to take one more client,
        or an accept failed for lack of them within the last few seconds."""
        if time.monotonic() - self._fd_exhausted_at < FD_EXHAUSTED_MEMORY:
            return False
        free = free_fds()
        return free is None or free >= FDS_HEADROOM

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
        self._current = [self._hooks(ep) for ep in self.endpoints]
        try:
            for index, ep in enumerate(self.endpoints):

                def factory(addr: object, unix: bool, index: int = index) -> ClientProtocol:
                    self.metrics.session_started()
                    # Looked up per connection, so a reload applies to new clients.
                    hooks = self._current[index]
                    # The address accept() returned: a client that reset at once
                    # has no peer name any more. Unix listeners are exempt from
                    # client TLS require (libpq never uses TLS there).
                    return ClientProtocol(hooks, self.sessions, self._session_finished,
                                          peer="unix" if unix else format_peer(addr), unix=unix)

                for listener in ep.config.listen:
                    try:
                        socks = await self._bind(listener)
                    except OSError as exc:
                        raise bind_error(f"cannot listen on {listener.describe()}", exc) from exc
                    unix = listener.kind == "unix"
                    for sock in socks:
                        self._acceptors.append(Acceptor(
                            sock, functools.partial(factory, unix=unix),
                            refusal=_FD_REFUSAL, on_exhausted=self._fd_exhausted,
                        ))
                    self.open_listeners.append(_as_bound(listener, socks))
        except BaseException:
            await self.close_listeners()
            raise
        self.listening = True

    async def _bind(self, listener: Listener) -> list[socket.socket]:
        """The listening sockets of ``listener`` (not yet accepting)."""
        if listener.kind == "unix" and listener.path is not None:
            path = listener.path  # DIR/.s.PGSQL.PORT, the name libpq looks for
            _remove_stale_socket(path)
            sock = bind_unix(path)
            # As PostgreSQL's default unix_socket_permissions; the directory guards access.
            os.chmod(path, 0o777)  # noqa: S103
            self._unix_paths.append(path)
            self.bound.append(f"unix:{path}")
            return [sock]
        socks = await bind_tcp(listener.host, listener.port)
        for sock in socks:
            host, port = sock.getsockname()[:2]
            self.bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return socks

    def _fd_exhausted(self, exc: OSError) -> None:
        """An accept failed for lack of descriptors (the client got 53300): count, log."""
        self.metrics.connection_refused("too_many")
        self.metrics.accept_fd_exhausted()
        now = time.monotonic()
        self._fd_exhausted_at = now
        self._fd_refusals += 1
        if now - self._fd_logged_at >= _FD_LOG_INTERVAL:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning(
                "refused %d connection(s): out of file descriptors (%s; open files limit %d); "
                "raise the limit (ulimit -n, LimitNOFILE=) or lower LAKEPROXY_MAX_CLIENTS",
                self._fd_refusals, exc.strerror or exc, soft,
            )
            self._fd_refusals, self._fd_logged_at = 0, now

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
        tcp = [a.sock for a in self._acceptors if a.sock.family != socket.AF_UNIX]
        return int(tcp[index].getsockname()[1])

    async def close_listeners(self) -> None:
        """Stop accepting new connections (open sessions continue)."""
        self.listening = False
        self.open_listeners = []
        acceptors, self._acceptors = self._acceptors, []
        for acceptor in acceptors:
            acceptor.close()
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
        for s in list(self._resetting):  # no client any more: not worth the grace
            s.close(abort=True)
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
            if not self.sessions and not self._resetting:
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
            client_gone=self._client_gone,
            login_timeout=self.config.login_timeout,
            enter_login=self._enter_login,
            leave_login=self._leave_login,
        )

    def _enter_login(self, session: Session) -> None:
        """Count ``session`` in the pre-login budget, closing the oldest there if full.

        Closing the oldest (not refusing the newest) means sockets that never
        finish their startup cannot lock real clients out: each only holds its
        place until newer connections arrive or LAKEPROXY_LOGIN_TIMEOUT ends it.
        """
        budget = max(1, self.max_clients)
        while len(self._logging_in) >= budget:
            oldest = next(iter(self._logging_in))
            del self._logging_in[oldest]
            oldest.evict()
            self._evicted += 1
        self._logging_in[session] = None
        now = time.monotonic()
        if self._evicted and now - self._evicted_logged_at >= _EVICTION_LOG_INTERVAL:
            log.warning(
                "%d connection(s) still logging in closed: more than %d at once "
                "(the pre-login budget, LAKEPROXY_MAX_CLIENTS)", self._evicted, budget,
            )
            self._evicted, self._evicted_logged_at = 0, now

    def _leave_login(self, session: Session) -> None:
        self._logging_in.pop(session, None)

    def _admit(self, session: Session) -> LakeproxyError | None:
        if self.draining:
            return ShuttingDown(
                "shutting down",
                client_message="lakeproxy: the proxy is shutting down",
                hint="retry in a moment",
            )
        if len(self._clients) >= self.max_clients:
            return TooManyConnections(
                "too many clients",
                client_message=(
                    f"lakeproxy: sorry, too many clients already ({self.max_clients})"
                ),
                hint=name_sources("raise LAKEPROXY_MAX_CLIENTS or use fewer connections",
                                  self.config.sources),
            )
        self._clients.add(session)
        return None

    def _client_gone(self, session: Session) -> None:
        """A session's client left while its endpoint session is reset for reuse."""
        self.sessions.discard(session)
        self._clients.discard(session)
        self._resetting.add(session)

    def _not_ready_for_ping(self) -> str | None:
        # The ping is still in its pre-login phase: not one of the counted clients.
        return not_ready_reason(self)

    def _session_finished(self, session: Session) -> None:
        self._clients.discard(session)
        self._resetting.discard(session)
        self._logging_in.pop(session, None)
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


def _as_bound(listener: Listener, socks: Sequence[socket.socket]) -> Listener:
    """``listener`` with the port the kernel picked when it asked for port 0."""
    if listener.kind != "tcp" or listener.port != 0 or not socks:
        return listener
    return dataclasses.replace(listener, port=int(socks[0].getsockname()[1]))


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
