"""Listeners, the session registry, drain and signals.

:class:`ProxyServer` binds every listener of every endpoint, keeps its own
``set`` of live sessions (uvloop's Server has no ``close_clients``), enforces
``max_clients`` and drains on shutdown. :func:`serve` is ``lakeproxy run``.

Listeners are accepted on by :class:`_Acceptor`, not ``loop.create_server``:
``accept()`` is the only call that still knows the address of a client that
reset its connection at once (``getpeername()`` then fails with ENOTCONN, and
uvloop's transports read the peer name lazily, after ``accept()``), and the
session log must name the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
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
from lakeproxy.readiness import not_ready_reason
from lakeproxy.session import (
    ClientAuthenticator,
    ClientProtocol,
    Dialer,
    Session,
    SessionHooks,
    format_peer,
)

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
        self.listening = False
        self.draining = False
        self.max_clients = config.max_clients
        self._servers: list[_Acceptor] = []
        self._authenticator = authenticator
        self._tls_context = tls_context
        self._unix_paths: list[str] = []
        self._accept_error_logged = -math.inf
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

                def factory(peer: str, unix: bool, index: int = index) -> ClientProtocol:
                    self.metrics.session_started()
                    # Looked up per connection, so a reload applies to new clients.
                    hooks = self._current[index]
                    return ClientProtocol(hooks, self.sessions, self._session_finished,
                                          peer=peer, unix=unix)

                for listener in ep.config.listen:
                    try:
                        acceptors = await self._bind(loop, listener, factory)
                    except OSError as exc:
                        raise bind_error(f"cannot listen on {listener.describe()}", exc) from exc
                    self._servers.extend(acceptors)
        except BaseException:
            await self.close_listeners()
            raise
        self.listening = True

    async def _bind(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: Listener,
        factory: _Factory,
    ) -> list[_Acceptor]:
        if listener.kind == "unix" and listener.path is not None:
            path = listener.path  # DIR/.s.PGSQL.PORT, the name libpq looks for
            _remove_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                # As PostgreSQL's default unix_socket_permissions; the directory guards access.
                os.chmod(path, 0o777)  # noqa: S103
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            self._unix_paths.append(path)
            self.bound.append(f"unix:{path}")
            return [_Acceptor(loop, sock, factory, self._accept_failed)]
        socks = await _tcp_sockets(loop, listener.host, listener.port)
        for sock in socks:
            host, port = sock.getsockname()[:2]
            self.bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return [_Acceptor(loop, sock, factory, self._accept_failed) for sock in socks]

    def _accept_failed(self, exc: OSError) -> None:
        """``accept()`` failed (e.g. EMFILE: out of file descriptors); the acceptor
        pauses briefly so that a persistent error does not spin the loop."""
        now = time.monotonic()
        if now - self._accept_error_logged >= 1.0:  # at most one line a second
            self._accept_error_logged = now
            log.warning("cannot accept a connection: %s", os.strerror(exc.errno or 0) or exc)

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

    def bound_port(self, index: int = 0) -> int:
        """Port of the ``index``-th TCP listener (useful when configured with port 0)."""
        tcp = [a.sock for a in self._servers if a.sock.family != socket.AF_UNIX]
        return int(tcp[index].getsockname()[1])

    async def close_listeners(self) -> None:
        """Stop accepting new connections (open sessions continue)."""
        self.listening = False
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        # Connections accepted just before become sessions (and are drained) too.
        for server in servers:
            await server.wait_handed_over()
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
        log.log(level, "session end", extra=log_fields(**values))


#: Listen backlog of every listener.
_BACKLOG = 1024
#: Connections accepted per wake-up of a listener before other work runs.
_ACCEPT_BATCH = 64
#: After an accept() error (EMFILE, ENFILE, ENOBUFS, ...), seconds before trying again.
_ACCEPT_ERROR_PAUSE = 0.1

#: Builds the protocol for a connection accepted from ``peer`` (``unix``: on a unix socket).
_Factory = Callable[[str, bool], ClientProtocol]


class _Acceptor:
    """Accepts connections on one listening socket and hands each to the loop.

    ``accept()`` gives the client's address even when the client has already
    reset the connection; it is passed to the protocol factory with the
    connection, so every session can be logged with it.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: _Factory,
        on_error: Callable[[OSError], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self._factory = factory
        self._on_error = on_error
        self._unix = sock.family == socket.AF_UNIX
        self._pending: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # reset while queued (some systems): next one
                continue
            except OSError as exc:
                self._on_error(exc)
                self._pause()
                return
            self._hand_over(conn, addr)

    def _hand_over(self, conn: socket.socket, addr: object) -> None:
        conn.setblocking(False)
        if self._unix:
            peer = "unix"
        else:
            with contextlib.suppress(OSError):  # already reset: the session sees that
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = format_peer(addr)
        task = self.loop.create_task(self._start(conn, peer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _start(self, conn: socket.socket, peer: str) -> None:
        unix = self._unix
        try:
            await self.loop.connect_accepted_socket(lambda: self._factory(peer, unix), sock=conn)
        except OSError as exc:  # the socket went away before the transport was made (rare)
            log.debug("accepted connection from %s lost before it started: %s", peer, exc)
            conn.close()

    def _pause(self) -> None:
        if self._closed:
            return
        self.loop.remove_reader(self.sock.fileno())
        self._retry = self.loop.call_later(_ACCEPT_ERROR_PAUSE, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    async def wait_handed_over(self) -> None:
        """Until every connection accepted so far has its protocol (and session)."""
        if self._pending:
            await asyncio.wait(list(self._pending))

    def close(self) -> None:
        """Stop accepting and close the listening socket (accepted connections stay)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def _tcp_sockets(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> list[socket.socket]:
    """Listening sockets for ``host``:``port``, one per address the name resolves
    to (as ``loop.create_server`` binds them: SO_REUSEADDR, IPv6 sockets v6-only).

    Raises OSError (the first address that cannot be bound).
    """
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(_BACKLOG)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


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
