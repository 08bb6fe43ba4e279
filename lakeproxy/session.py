"""One client connection: handshake -> credential -> upstream login -> splice.

The accepted socket is driven by :class:`ClientProtocol` (callbacks, no
streams) so that once the endpoint has accepted the login the same transport can
be handed to :mod:`lakeproxy.splice` without copying or re-buffering. Every
failure before the splice reaches the client as a FATAL ``ErrorResponse`` with a
SQLSTATE (or, for the endpoint's own login errors, the endpoint's frame
unchanged), never as a bare closed socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from lakeproxy.boundaries import TrackedSplice
from lakeproxy.cancel import CancelRegistry, CancelTarget
from lakeproxy.config import DEFAULT_LOGIN_TIMEOUT
from lakeproxy.errors import (
    ClientNotAllowed,
    ClientProtocolError,
    LakeproxyError,
    ShuttingDown,
    TooManyConnections,
    UpstreamRejected,
)
from lakeproxy.metrics import Outcome
from lakeproxy.pool import Lease, Pool, pool_key, poolable
from lakeproxy.splice import Splice, SpliceResult
from lakeproxy.wire import sqlstate
from lakeproxy.wire.client_handshake import (
    NEED_DATA,
    CancelRequested,
    ClientHandshake,
    Event,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
    negotiate_bytes,
)
from lakeproxy.wire.codec import (
    AuthenticationOk,
    AuthenticationSASL,
    BackendKeyData,
    ErrorResponse,
    PasswordKind,
    decode_backend,
    encode,
    error_response,
)
from lakeproxy.wire.errors import ProtocolError

log = logging.getLogger("lakeproxy.session")

#: Each message a client owes before its session starts must arrive within this.
LOGIN_MESSAGE_TIMEOUT: Final = 10.0


#: While the endpoint is dialed, how often the client's socket is checked for a hang-up.
HANG_UP_POLL: Final = 0.25
#: poll() events that mean the peer closed (FIN: POLLRDHUP, Linux) or reset the connection.
_HANG_UP_EVENTS: Final = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)

#: Pauses before dialing again after closing a parked session for room (53300).
_ROOM_RETRIES: Final = (0.05, 0.1, 0.2, 0.4, 0.8)

#: A TLS handshake record starts with this byte. A client using direct TLS (libpq
#: 17+ ``sslnegotiation=direct``) opens with its ClientHello instead of an
#: SSLRequest; a startup packet never starts with it (its length would be > 10000).
TLS_HANDSHAKE_RECORD: Final = 0x16

_TLS_RECORD: Final = bytes((TLS_HANDSHAKE_RECORD,))

#: The ALPN protocol a direct TLS client must offer (as PostgreSQL 17 requires).
ALPN_POSTGRESQL: Final = "postgresql"

#: libpq's fallback application name in pg_isready's startup (PQping), see
#: src/bin/scripts/pg_isready.c: ``fallback_application_name = progname``.
PING_APPLICATION_NAME: Final = "pg_isready"

#: The SASL mechanism offered to a ready ping (RFC 7677).
SCRAM_SHA_256: Final = "SCRAM-SHA-256"


class Upstream(Protocol):
    """A logged-in endpoint connection, ready to splice."""

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def startup_messages(self) -> Sequence[bytes]:
        """Raw frames after AuthenticationOk, up to and including ReadyForQuery."""
        ...

    @property
    def trailing(self) -> bytes:
        """Bytes the endpoint sent after that ReadyForQuery."""
        ...


class Dialer(Protocol):
    """Opens logged-in connections to one endpoint (credential, TLS, retries)."""

    async def connect(self, params: Mapping[str, str], *, deadline: float) -> Upstream:
        """Log in with ``params`` (user already replaced; no ``user`` means the
        dialer's default role, the signed-in identity) before ``deadline``.

        Raises:
            LakeproxyError: with the SQLSTATE the client must see
            (UpstreamRejected carries the endpoint's own ErrorResponse).
        """
        ...

    async def cancel(self, process_id: int, secret: bytes) -> None:
        """Forward a CancelRequest with the endpoint's own key (best effort)."""
        ...


class ClientAuthenticator(Protocol):
    """Server-side client authentication (LAKEPROXY_CLIENT_PASSWORD)."""

    def start(self) -> tuple[bytes, PasswordKind]:
        """First authentication request to send and how to read the reply."""
        ...

    def step(self, message: PasswordReceived) -> tuple[bytes, PasswordKind | None]:
        """Bytes to send next; None as the kind when authentication is complete.

        Raises:
            LakeproxyError: wrong password (28P01) or a malformed exchange.
        """
        ...


@dataclass(slots=True)
class SessionHooks:
    """What a session needs from the server that owns it."""

    dialer: Dialer
    #: None: the dialer logs in as the signed-in identity
    role: str | None
    default_database: str
    connect_deadline: float
    cancels: CancelRegistry[Dialer]
    #: After the pre-login phase: None when the client may proceed (it then
    #: counts against max_clients), else the error to send.
    admit: Callable[[Session], LakeproxyError | None]
    #: Why the proxy is not ready for new clients (the /readyz rule), None when it
    #: is; asked by a pg_isready ping (still in its pre-login phase, so not counted).
    not_ready: Callable[[], str | None]
    tls_context: ssl.SSLContext | None = None
    tls_required: bool = False
    authenticator: Callable[[], ClientAuthenticator] | None = None
    on_upstream_connected: Callable[[float], None] = lambda seconds: None
    #: Session reuse for this endpoint (None: pool_mode off, a pure splice).
    pool: Pool | None = None
    #: The client left and its endpoint session is being reset for the pool:
    #: from now on it is no client (max_clients, readiness, drain).
    client_gone: Callable[[Session], None] = lambda session: None
    #: The whole pre-login phase (SSL/GSS negotiation, startup, password) must
    #: end within this many seconds of the accept.
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    #: Called when the pre-login phase starts and when it ends (the pre-login
    #: budget: the server may :meth:`Session.evict` the oldest in that phase).
    enter_login: Callable[[Session], None] = lambda session: None
    leave_login: Callable[[Session], None] = lambda session: None


@dataclass(slots=True)
class SessionRecord:
    """What one finished connection did, for the log line and the metrics."""

    client: str
    database: str = ""
    outcome: Outcome = "ok"
    sqlstate: str = ""
    closed_by: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    started: float = field(default_factory=time.monotonic)
    error: str = ""
    #: Session reuse: whether the endpoint session came from the pool, and how it
    #: ended ("parked" or "closed", and why); empty with pool_mode off.
    reused: bool | None = None
    endpoint_session: str = ""
    endpoint_session_reason: str = ""


class _ClientGone(Exception):
    pass


class _DirectTLS:
    """The client opened with a TLS ClientHello (direct TLS) instead of a startup packet."""


class _BufferedReceiver(Protocol):
    """The part of asyncio's and uvloop's SSLProtocol used to hand it bytes already read."""

    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...


class ClientProtocol(asyncio.Protocol):
    """Owns the accepted transport until the splice takes it over."""

    def __init__(
        self,
        hooks: SessionHooks,
        registry: set[Session],
        on_finished: Callable[[Session], None],
        *,
        peer: str | None = None,
        unix: bool = False,
    ) -> None:
        self._hooks = hooks
        #: The client's address as accept() gave it (None: ask the transport).
        self.peer = peer
        #: Accepted on a unix-socket listener (never subject to client TLS ``require``).
        self.unix = unix
        self._registry = registry
        self._on_finished = on_finished
        self.handshake = ClientHandshake()
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.gone = False
        self.protocol_error: ProtocolError | None = None
        self._got_data = False
        #: The bytes of a direct TLS ClientHello, read before the TLS layer took over.
        self.direct_tls: bytearray | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        session = self.session = Session(self, self.transport, self._hooks)
        self._registry.add(session)
        task = asyncio.get_running_loop().create_task(session.run())
        session.task = task

        def done(_: asyncio.Task[None]) -> None:
            self._registry.discard(session)
            self._on_finished(session)

        task.add_done_callback(done)

    def data_received(self, data: bytes) -> None:
        if self.direct_tls is not None:  # the rest of a ClientHello
            self.direct_tls += data
            return
        if not self._got_data:
            self._got_data = True
            if data[:1] == _TLS_RECORD and self._hooks.tls_context is not None:
                self.direct_tls = bytearray(data)
                self._wake()
                return
        try:
            self.handshake.receive_data(data)
        except ProtocolError as exc:  # the framing refused a length
            self.protocol_error = exc
        self._wake()

    def eof_received(self) -> bool:
        self.gone = True
        self._wake()
        # Keep a plain transport open: an ErrorResponse may still be owed. (A TLS
        # transport closes anyway and warns when asked not to.)
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def hung_up(self) -> bool:
        """True once the client sent EOF or the connection was lost."""
        return self.gone

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gone = True
        self._wake()
        session = self.session
        if session is not None and session.connecting and session.task is not None:
            # No upstream session may outlive its client: stop the login.
            session.task.cancel()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def take_direct_tls(self) -> bytes:
        """The ClientHello bytes read so far (call once TLS owns the transport)."""
        data, self.direct_tls = bytes(self.direct_tls or b""), None
        return data

    async def next_event(self, deadline: float) -> Event | _DirectTLS:
        """The next handshake event; raises on timeout, EOF or a protocol error."""
        while True:
            if self.protocol_error is not None:
                raise self.protocol_error
            if self.direct_tls is not None:
                return _DirectTLS()
            ev = self.handshake.next_event()
            if ev is not NEED_DATA:
                return ev
            if self.gone:
                raise _ClientGone
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._waiter
            finally:
                self._waiter = None


class Session:
    """The coroutine side of one client connection."""

    def __init__(
        self, conn: ClientProtocol, transport: asyncio.Transport, hooks: SessionHooks
    ) -> None:
        self.conn = conn
        self.hooks = hooks
        self.transport = transport
        peer = conn.peer
        if peer is None:
            peer = format_peer(self.transport.get_extra_info("peername"))
        self.record = SessionRecord(client=peer)
        self.task: asyncio.Task[None] | None = None
        self.connecting = False
        self.splice: Splice | None = None
        self.resetting = False
        self.evicted = False
        #: Armed for the pre-login phase (LAKEPROXY_LOGIN_TIMEOUT), then disarmed.
        self._login_deadline = asyncio.timeout(None)

    # -- public, for the server -------------------------------------------

    def close(self, *, abort: bool = False) -> None:
        """End this session from the proxy's side (shutdown)."""
        if self.resetting and self.task is not None:
            self.task.cancel()  # the client is gone; its endpoint session is being reset
        elif self.splice is not None:
            if abort:
                self.splice.abort()
            else:
                self.splice.close()
        elif self.task is not None:
            self.task.cancel()

    def evict(self) -> None:
        """Close a connection still in its pre-login phase (the pre-login budget is
        full and a newer one came): no reply, outcome ``too_many``."""
        self.evicted = True
        if self.task is not None:
            self.task.cancel()

    # -- the session ------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run_once()
        finally:
            # Ended: drop the references that tie this session to its protocol
            # and splice, so the transports and the TLS session (with its
            # buffers) are freed now, not at the next full garbage collection.
            self.splice = None
            self.conn.session = None

    async def _run_once(self) -> None:
        try:
            async with self._login_deadline:  # TimeoutError when it expires
                await self._run()
        except _ClientGone:
            if not self.record.sqlstate:  # else what the client was told stands
                self.record.outcome = "client_error"
            self.record.error = self.record.error or "client hung up"
            self.transport.abort()
        except TimeoutError:
            self.record.outcome = "client_error"
            self.record.error = "login timeout"
            self.transport.abort()
        except ProtocolError as exc:
            if not exc.reply:  # as PostgreSQL: logged (session end), no answer
                self.record.outcome = "client_error"
                self.record.error = str(exc)
                self.transport.close()
                return
            self._fail(ClientProtocolError(str(exc), sqlstate=exc.sqlstate))
        except LakeproxyError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            if self.evicted:
                self.record.outcome = "too_many"
                self.record.error = "pre-login budget full: closed the oldest still logging in"
            elif not self.conn.gone:
                self._fail(ShuttingDown("lakeproxy: terminating connection: proxy shutting down"))
            else:
                self.record.outcome = "client_error"
                self.record.error = self.record.error or "client hung up"
            self.transport.abort()
        except (ssl.SSLError, ConnectionError) as exc:
            # Only the client's TLS handshake raises these here (garbage after 'S',
            # a cut ClientHello, a reset): the client's fault, and no one to tell.
            self.record.outcome = "client_error"
            self.record.error = type(exc).__name__
            self.transport.abort()
        except Exception as exc:
            if self.conn.hung_up():
                # e.g. uvloop raising on a write to a transport the client just reset
                self.record.outcome = "client_error"
                self.record.error = type(exc).__name__
                self.transport.abort()
                return
            log.exception("session %s: internal error", self.record.client)
            self._fail(LakeproxyError(f"internal error: {type(exc).__name__}"))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self.conn
        hooks = self.hooks
        tls_on = False
        hooks.enter_login(self)
        self._login_deadline.reschedule(loop.time() + hooks.login_timeout)
        while True:
            ev = await conn.next_event(loop.time() + LOGIN_MESSAGE_TIMEOUT)
            if isinstance(ev, _DirectTLS):
                if hooks.tls_context is None:  # pragma: no cover - only seen with TLS set
                    raise ClientProtocolError("unexpected TLS handshake")
                await self._start_tls(hooks.tls_context, direct=True)
                tls_on = True
                continue
            if isinstance(ev, SSLRequested):
                ctx = None if tls_on else hooks.tls_context
                self.transport.write(conn.handshake.answer_ssl(ctx is not None))
                if ctx is not None:
                    await self._start_tls(ctx)
                    tls_on = True
                continue
            if isinstance(ev, GSSENCRequested):
                self.transport.write(conn.handshake.answer_gssenc())
                continue
            if isinstance(ev, CancelRequested):
                self.record.outcome = "cancel"
                self._end_login()
                await self._forward_cancel(ev)
                return
            if isinstance(ev, StartupReceived):
                if ev.message.params.get("application_name") == PING_APPLICATION_NAME:
                    self._answer_ping(ev)
                    return
                break
            raise ClientProtocolError(f"unexpected {type(ev).__name__} before startup")
        # libpq never uses TLS on a unix socket: require applies to TCP only.
        if hooks.tls_required and not tls_on and not conn.unix:
            # The client's error (outcome client_error, logged at INFO), not ours.
            raise ClientNotAllowed(
                "plaintext client refused: LAKEPROXY_CLIENT_TLS=require",
                client_message="lakeproxy: this proxy requires an encrypted connection",
                hint="connect with sslmode=require (or stronger)",
            )
        startup = ev.message
        database = startup.params.get("database") or hooks.default_database
        self.record.database = database
        if startup.params.get("replication") not in (None, "", "false", "0", "off", "no"):
            log.debug("session %s: replication connection", self.record.client)
        self.transport.write(negotiate_bytes(ev.negotiate))
        if hooks.authenticator is not None:
            await self._authenticate_client(hooks.authenticator())
        self._end_login()
        refused = hooks.admit(self)
        if refused is not None:
            raise refused
        # Everything else the client sent stays in the kernel until the splice.
        self.transport.pause_reading()

        params = dict(startup.params)
        if hooks.role is not None:
            params["user"] = hooks.role
        else:
            params.pop("user", None)  # the dialer fills in the signed-in identity
        params["database"] = database
        if conn.hung_up():  # before we paused reading: mint and dial for no one
            raise _ClientGone
        key: tuple[object, ...] | None = None
        pool = hooks.pool
        if pool is not None and poolable(params):
            key = pool_key(hooks.dialer, params, (startup.major, startup.minor))
            lease = await pool.take(key)
            self.record.reused = lease is not None
            if lease is not None:
                # Reading is paused: the poll sees an EOF that conn.gone would not.
                if conn.hung_up() or _hung_up(self.transport):
                    pool.restore(lease)
                    raise _ClientGone
                await self._relay_startup(lease, lease)
                return
        self.connecting = True
        started = loop.time()
        try:
            deadline = started + hooks.connect_deadline
            if key is None:
                upstream = await self._dial(params, deadline=deadline)
            else:
                upstream = await self._dial_making_room(params, deadline=deadline)
        finally:
            self.connecting = False
        hooks.on_upstream_connected(loop.time() - started)
        if conn.hung_up() or _hung_up(self.transport):
            upstream.transport.abort()
            raise _ClientGone
        new_lease = None
        if key is not None:
            # Its trailing bytes go to this client (below), never to a later one.
            new_lease = Lease.from_login(upstream.transport, key, upstream.startup_messages)
        await self._relay_startup(upstream, new_lease)

    async def _dial_making_room(self, params: dict[str, str], *, deadline: float) -> Upstream:
        """Dial; when the endpoint refuses for too many connections (53300) while
        sessions of ours are parked there, close the longest-parked one and try
        again: a parked session must never cost a client its login."""
        pool = self.hooks.pool
        for delay in _ROOM_RETRIES:
            try:
                return await self._dial(params, deadline=deadline)
            except UpstreamRejected as exc:
                loop = asyncio.get_running_loop()
                if (exc.sqlstate != sqlstate.TOO_MANY_CONNECTIONS or pool is None
                        or loop.time() + delay >= deadline or not pool.evict(self.hooks.dialer)):
                    raise
                log.info("session %s: endpoint at its connection limit; closed a parked "
                         "session to make room", self.record.client)
            # The endpoint frees the slot once the closed backend has exited.
            await asyncio.sleep(delay)
        return await self._dial(params, deadline=deadline)

    def _answer_ping(self, ev: StartupReceived) -> None:
        """Answer a ``pg_isready`` ping here: no credential, no dial.

        libpq's PQping reports "accepting connections" as soon as the server
        asks for authentication, and "rejecting connections" on SQLSTATE 57P03
        (any other error counts as up). Ready (the /readyz rule): a SCRAM
        request, then close; SCRAM rather than a password request, so a client
        with a password set sends nothing secret. Not ready: FATAL 57P03 with
        the reason. Asked before client TLS and password policy, so every ping
        gets the real answer.
        """
        r = self.record
        r.outcome = "probe"
        r.database = ev.message.params.get("database", "")
        reason = self.hooks.not_ready()
        out = negotiate_bytes(ev.negotiate)
        if reason is None:
            out += encode(AuthenticationSASL((SCRAM_SHA_256,)))
        else:
            r.sqlstate = sqlstate.CANNOT_CONNECT_NOW
            r.error = reason
            out += encode(error_response(
                sqlstate.CANNOT_CONNECT_NOW,
                f"lakeproxy: not accepting connections: {reason}",
                hint="GET /readyz on the admin server says the same",
            ))
        self.transport.write(out)
        self.transport.close()

    def _end_login(self) -> None:
        """The pre-login phase is over: its deadline and its budget no longer apply."""
        self._login_deadline.reschedule(None)
        self.hooks.leave_login(self)

    async def _dial(self, params: dict[str, str], *, deadline: float) -> Upstream:
        """Dial the endpoint; give up as soon as the client hangs up.

        Reading is paused, so the client's EOF or reset would go unseen until
        the login completed (a cold start takes seconds): its socket is polled
        instead. Raises _ClientGone, or what the dialer raises.
        """
        task = asyncio.ensure_future(self.hooks.dialer.connect(params, deadline=deadline))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=HANG_UP_POLL)
                if not task.done() and _hung_up(self.transport):
                    raise _ClientGone
            return task.result()
        except BaseException:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None:
                # Logged in just as we were cancelled: nobody will use it.
                task.result().transport.abort()
            raise

    async def _start_tls(self, ctx: ssl.SSLContext, *, direct: bool = False) -> None:
        """Upgrade the client connection to TLS (after 'S', or ``direct``: the
        ClientHello has been read already). Raises _ClientGone, ClientProtocolError."""
        loop = asyncio.get_running_loop()
        old = self.transport
        starting = loop.start_tls(
            old, self.conn, ctx, server_side=True, ssl_handshake_timeout=LOGIN_MESSAGE_TIMEOUT,
        )
        if not direct:
            new = await starting
        else:
            task = asyncio.ensure_future(starting)
            try:
                # start_tls swaps the transport's protocol before it first waits and
                # resumes reading only a loop iteration later: in between, hand the
                # TLS protocol the bytes already read (asyncio's and uvloop's both
                # buffer them until the handshake starts).
                for _ in range(100):
                    if task.done() or old.get_protocol() is not self.conn:
                        break
                    await asyncio.sleep(0)
                tls_protocol = old.get_protocol()
                if tls_protocol is not self.conn:
                    _feed(cast(_BufferedReceiver, tls_protocol), self.conn.take_direct_tls())
                new = await task
            except BaseException:
                task.cancel()
                raise
        if new is None:
            raise _ClientGone
        self.transport = new
        self.conn.transport = new
        if direct:
            obj = new.get_extra_info("ssl_object")
            alpn = obj.selected_alpn_protocol() if isinstance(obj, ssl.SSLObject) else None
            if alpn != ALPN_POSTGRESQL:
                raise ClientProtocolError(
                    "received direct TLS connection request without ALPN protocol "
                    f"negotiation extension ({ALPN_POSTGRESQL!r})"
                )

    async def _authenticate_client(self, auth: ClientAuthenticator) -> None:
        loop = asyncio.get_running_loop()
        out, first = auth.start()
        self.transport.write(out)
        kind: PasswordKind | None = first
        while kind is not None:
            self.conn.handshake.expect_password(kind)
            ev = await self.conn.next_event(loop.time() + LOGIN_MESSAGE_TIMEOUT)
            if not isinstance(ev, PasswordReceived):
                raise ClientProtocolError("expected a password message")
            out, kind = auth.step(ev)
            if out:
                self.transport.write(out)

    async def _relay_startup(self, upstream: Upstream, lease: Lease | None = None) -> None:
        """Show the client its login, then splice (tracked when ``lease`` may be parked)."""
        hooks = self.hooks
        out = [encode(AuthenticationOk())]
        key: tuple[int, bytes] | None = None
        try:
            for frame in upstream.startup_messages:
                if frame[:1] == b"K":
                    msg = decode_backend(frame)
                    if not isinstance(msg, BackendKeyData):  # pragma: no cover - 'K' decodes so
                        raise TypeError("BackendKeyData expected")
                    ours = hooks.cancels.register(
                        CancelTarget(hooks.dialer, msg.process_id, msg.secret)
                    )
                    key = (msg.process_id, ours)
                    frame = encode(BackendKeyData(msg.process_id, ours))
                out.append(frame)
            if self.transport.is_closing():
                raise _ClientGone
            self.transport.write(b"".join(out))
            splice = (
                Splice(self.transport, upstream.transport) if lease is None
                else TrackedSplice(self.transport, upstream.transport)
            )
            self.splice = splice
        except BaseException:
            upstream.transport.abort()
            if key is not None:
                hooks.cancels.unregister(*key)
            raise
        try:
            splice.start(
                client_leftover=self.conn.handshake.trailing_data(),
                upstream_leftover=upstream.trailing,
            )
            result = await splice.wait()
        finally:
            if key is not None:
                hooks.cancels.unregister(*key)
        self._record_splice(result)
        if lease is not None and isinstance(splice, TrackedSplice):
            await self._park(splice, lease)

    async def _park(self, splice: TrackedSplice, lease: Lease) -> None:
        """After a pooled session: reset and park the endpoint session, or count it closed."""
        pool = self.hooks.pool
        r = self.record
        r.endpoint_session = "closed"
        if pool is None:  # pragma: no cover - a lease implies a pool
            return
        if not splice.parkable:
            r.endpoint_session_reason = "unclean"
            pool.count_unclean()
            return
        if splice.upstream_lost():
            lease.transport.abort()
            r.endpoint_session_reason = "dead"
            pool.count_discard("dead")
            return
        self.resetting = True
        # The client is gone: it no longer counts as one (max_clients, readiness,
        # drain), while the reset takes its round trip.
        self.hooks.client_gone(self)
        try:
            parked, reason = await pool.reset_and_park(lease, splice.status)
        except asyncio.CancelledError:
            r.endpoint_session_reason = "shutdown"  # the drain's deadline; the client was done
            return
        finally:
            self.resetting = False
        r.endpoint_session = "parked" if parked else "closed"
        r.endpoint_session_reason = reason

    def _record_splice(self, result: SpliceResult) -> None:
        r = self.record
        r.closed_by = result.closed_by
        r.bytes_up = result.bytes_up
        r.bytes_down = result.bytes_down
        if result.error is not None:
            r.error = type(result.error).__name__
        r.outcome = "ok"

    async def _forward_cancel(self, ev: CancelRequested) -> None:
        """Forward a client's CancelRequest, then close its connection.

        libpq's PQcancel, and so psql, psycopg and asyncpg, read the close of the
        cancel connection as "delivered" and send their next statement at once.
        PostgreSQL closes it only after it has signalled the backend, so the
        close waits here until the forward is done: the endpoint closed its
        cancel connection, or the forward failed or timed out (``send_cancel``'s
        bound). A key lakeproxy did not hand out is dropped at once.
        """
        req = ev.request
        target = self.hooks.cancels.lookup(req.process_id, req.secret)
        if target is None:
            self.transport.close()
            log.info("cancel request for unknown key (pid %d) dropped", req.process_id)
            return
        try:
            with contextlib.suppress(Exception):
                await target.endpoint.cancel(target.process_id, target.secret)
        finally:
            self.transport.close()

    def _fail(self, exc: LakeproxyError) -> None:
        r = self.record
        r.sqlstate = exc.sqlstate
        r.outcome = _outcome(exc)
        r.error = str(exc)
        if self.transport.is_closing():
            return
        raw = exc.raw if isinstance(exc, UpstreamRejected) else encode(_client_error(exc))
        self.transport.write(raw)
        self.transport.close()


def _feed(protocol: _BufferedReceiver, data: bytes) -> None:
    """Give ``protocol`` bytes as if its transport had just read them."""
    view = memoryview(data)
    while view:
        buf = protocol.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


def _hung_up(transport: asyncio.Transport) -> bool:
    """True when the peer closed or reset the connection (checked without reading)."""
    if transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), _HANG_UP_EVENTS)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # already closed
        return True


def _client_error(exc: LakeproxyError) -> ErrorResponse:
    msg = exc.client_message
    if not msg.startswith("lakeproxy:"):
        msg = f"lakeproxy: {msg}"
    return error_response(exc.sqlstate, msg, hint=exc.hint)


def _outcome(exc: LakeproxyError) -> Outcome:
    if isinstance(exc, UpstreamRejected):
        return "rejected"
    if isinstance(exc, TooManyConnections):
        return "too_many"
    if isinstance(exc, ShuttingDown):
        return "shutdown"
    return _OUTCOME_BY_KIND[exc.kind]


_OUTCOME_BY_KIND: Final[dict[str, Outcome]] = {
    "client": "client_error",
    "credential": "credential_error",
    "upstream": "upstream_error",
    "capacity": "too_many",
    "config": "internal",
    "internal": "internal",
}


def format_peer(peer: object) -> str:
    """``host:port`` (``[v6]:port``) of a socket address, else ``unix``."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(peer, str) and peer:
        return peer
    return "unix"
