"""A Lakebase-like TLS Postgres front door in front of a local PgCluster.

What a client sees, in order (modelled on Neon's proxy, which Lakebase's
serverless front door is built from):

1. TLS is mandatory: a StartupMessage without ``SSLRequest`` gets FATAL 08P01
   ``connection is insecure (try using sslmode=require)``. ``SSLRequest`` gets
   ``S`` and a TLS handshake (certificate from the emulator CA, SAN = endpoint
   host and 127.0.0.1); ``GSSENCRequest`` gets ``N``.
2. Routing is by SNI: the SNI must name one of the hosts served (see
   :class:`Route`), or the startup ``options`` must carry ``endpoint=<id>``,
   the host's first label (Neon's fallback for clients without SNI; it is
   removed before the options reach PostgreSQL). Otherwise FATAL XX000
   ``Endpoint ID is not specified...``; an SNI naming another host gets XX000
   ``endpoint "<id>" does not exist``.

   Each host leads to a server: the endpoint's ``host`` and
   ``read_write_pooled_host`` and the instance's ``read_write_dns`` to the
   primary PgCluster; ``read_only_host``, ``read_only_pooled_host`` and
   ``read_only_dns`` to a hot standby of it (started on the first read-only
   login, unless the Emulator started it already). The pooled hosts reach
   the same servers directly: the emulator does not pool (Lakebase's pooler
   is PgBouncer in transaction mode; see the README).
3. AuthenticationCleartextPassword; the password must be a database credential
   :meth:`FakeWorkspace.is_valid_credential` accepts for the startup ``user``,
   else FATAL 28P01 ``password authentication failed for user "<user>"``.
4. The state: a disabled endpoint (``FakeWorkspace.disabled``) answers its
   hosts' logins with FATAL XX000 ``Couldn't connect to compute node`` (a
   connection cannot enable it; the real wording is not documented); an
   instance not AVAILABLE answers with FATAL 57P03, PostgreSQL's own
   ``the database system is starting up`` (or ``... is not accepting
   connections`` when STOPPED or DELETING). Instances do not scale to zero.
   The endpoint's compute: when suspended, the login starts a wake of ``wake_time``
   seconds. Logins in the first ``wake_error_time`` seconds of a wake get FATAL
   XX000 ``Couldn't connect to compute node``; later ones wait for the wake.
   Only an authenticated login wakes the compute (a TCP probe, a failed login
   or the workspace API never do).
5. The front door logs in to the PgCluster over TCP (trust) with the client's
   startup parameters, relays every message of that login (AuthenticationOk,
   ParameterStatus, BackendKeyData, ReadyForQuery, or the server's own
   ErrorResponse) and then relays bytes both ways until either side closes.

CancelRequest (plain or inside TLS) is forwarded as is to the primary and,
when it runs, the standby (the key matches on one of them): the BackendKeyData
a client gets is the server's own.

Scale to zero: ``idle_suspend`` seconds after the last session ends the compute
suspends; :meth:`FrontDoor.suspend` suspends at once, ending open sessions with
PostgreSQL's own FATAL 57P01 (``pg_terminate_backend`` on their backends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from lakeproxy.emulator.api import FakeWorkspace
from lakeproxy.emulator.certs import TlsFiles
from lakeproxy.emulator.pgcluster import PgCluster
from lakeproxy.wire import codec, limits
from lakeproxy.wire import sqlstate as S
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

__all__ = ["FrontDoor", "Route", "State"]

log = logging.getLogger("lakeproxy.emulator.frontdoor")

State = Literal["ACTIVE", "SUSPENDED", "WAKING"]

MSG_INSECURE: Final = "connection is insecure (try using sslmode=require)"
MSG_NO_SNI: Final = (
    "Endpoint ID is not specified. Either please upgrade the postgres client library "
    "(libpq) for SNI support or pass the endpoint ID (first part of the domain name) as a "
    "parameter: '?options=endpoint%3D<endpoint-id>'."
)
MSG_COMPUTE: Final = "Couldn't connect to compute node"
MSG_STARTING: Final = "the database system is starting up"
MSG_NOT_ACCEPTING: Final = "the database system is not accepting connections"
#: Each message a client owes during the handshake must arrive within this.
HANDSHAKE_TIMEOUT: Final = 30.0
_MAX_PASSWORD: Final = 65_535
_CHUNK: Final = 65_536


@dataclass(frozen=True, slots=True)
class Route:
    """Where one host name leads: the autoscaling ``endpoint`` (its compute
    scales to zero and may be disabled) or the provisioned ``instance`` (its
    state), served by the ``primary`` or the read-only ``standby`` server."""

    resource: Literal["endpoint", "instance"]
    server: Literal["primary", "standby"]


class _Reject(Exception):
    """Send this ErrorResponse (FATAL) to the client and close."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class _Closed(Exception):
    """The peer went away."""


@dataclass(slots=True)
class _Session:
    """A login that reached the compute."""

    task: asyncio.Task[None]
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    route: Route = Route("endpoint", "primary")
    pg: PgCluster | None = None
    pid: int | None = None
    upstream: asyncio.StreamWriter | None = None
    client: asyncio.StreamWriter | None = None


async def _read_frame(reader: asyncio.StreamReader, frames: FrameReader) -> bytes:
    """Return the next complete frame. Raises _Closed on EOF, ProtocolError on
    a bad length."""
    while (frame := frames.next_frame()) is None:
        data = await reader.read(_CHUNK)
        if not data:
            raise _Closed
        frames.feed(data)
    return frame


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.is_closing():
        writer.close()


class FrontDoor:
    """The TLS front door of one emulated Lakebase endpoint."""

    def __init__(
        self,
        *,
        workspace: FakeWorkspace,
        pg: PgCluster,
        tls: TlsFiles,
        endpoint_host: str,
        idle_suspend: float | None = None,
        wake_time: float = 0.0,
        wake_error_time: float = 0.0,
        routes: Mapping[str, Route] | None = None,
        standby: Callable[[], Awaitable[PgCluster]] | None = None,
    ) -> None:
        self.workspace = workspace
        self.pg = pg
        self.endpoint_host = endpoint_host
        self.endpoint_id = endpoint_host.split(".", 1)[0]
        #: host name (lower case) -> Route; the endpoint host alone by default
        self.routes: dict[str, Route] = {
            h.lower(): r for h, r in (routes or {endpoint_host: Route("endpoint", "primary")}
                                      ).items()}
        self._by_id = {h.split(".", 1)[0]: r for h, r in self.routes.items()}
        self._standby = standby
        self._standby_pg: PgCluster | None = None
        self.idle_suspend = idle_suspend
        self.wake_time = wake_time
        self.wake_error_time = wake_error_time
        self.state: State = "ACTIVE"
        #: wakes started; TCP connections accepted (any kind).
        self.wakes = 0
        self.connections = 0
        #: logins that reached the compute; current sessions.
        self.logins = 0
        #: password messages received (a credential reached the front door).
        self.passwords = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._ctx = tls.server_context()
        self._sni: weakref.WeakKeyDictionary[ssl.SSLObject, str | None] = (
            weakref.WeakKeyDictionary())
        self._ctx.sni_callback = self._on_sni
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: dict[asyncio.Task[None], _Session] = {}
        self._wake_started = 0.0
        self._woken: asyncio.Event | None = None
        self._wake_task: asyncio.Task[None] | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._suspend_task: asyncio.Task[None] | None = None

    @property
    def sessions(self) -> int:
        """Open sessions (on the endpoint's compute and on the instance)."""
        return len(self._sessions)

    def _compute_busy(self) -> bool:
        return any(s.route.resource == "endpoint" for s in self._sessions.values())

    def _on_sni(self, obj: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                ctx: ssl.SSLContext) -> None:
        if isinstance(obj, ssl.SSLObject):
            self._sni[obj] = name

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and serve; ``port=0`` picks a free port (see :attr:`port`)."""
        self._server = await asyncio.start_server(self._accept, host, port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self._arm_idle()

    async def stop(self) -> None:
        """Stop listening and end every connection (idempotent)."""
        self._disarm_idle()
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in (self._wake_task, self._suspend_task, *self._tasks):
            if task is not None:
                task.cancel()
        pending = [t for t in (self._wake_task, self._suspend_task, *self._tasks) if t]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._tasks.clear()

    # ------------------------------------------------------------------ compute

    def _arm_idle(self) -> None:
        self._disarm_idle()
        if self.idle_suspend is not None and self.state == "ACTIVE" and not self._compute_busy():
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self.idle_suspend, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _idle_expired(self) -> None:
        self._idle_handle = None
        if not self._compute_busy() and self.state == "ACTIVE":
            self._suspend_task = asyncio.get_running_loop().create_task(self.suspend())

    async def suspend(self) -> None:
        """Suspend the compute now. Open sessions end with PostgreSQL's FATAL
        57P01 (their backends are terminated); returns once they are closed."""
        self._disarm_idle()
        if self._wake_task is not None:
            self._wake_task.cancel()
            self._wake_task = None
        self.state = "SUSPENDED"
        if self._woken is not None:  # logins waiting for a wake start a new one
            self._woken.set()
        sessions = [s for s in self._sessions.values() if s.route.resource == "endpoint"]
        for pg in {id(s.pg): s.pg for s in sessions if s.pg is not None}.values():
            pids = [s.pid for s in sessions if s.pid is not None and s.pg is pg]
            if not pids:
                continue
            ids = ",".join(str(p) for p in pids)
            sql = f"SELECT pg_terminate_backend(pid, 5000) FROM unnest(ARRAY[{ids}]) AS pid"  # noqa: S608
            try:
                await asyncio.to_thread(pg.psql, sql)
            except Exception:  # the cluster may be gone; close the sessions anyway
                log.exception("pg_terminate_backend failed")
        for s in sessions:
            if s.pid is None:  # still logging in: cut it
                _close(s.client)
                _close(s.upstream)
        if sessions:  # wait for the relays, not for the clients' TLS close
            waits = {asyncio.ensure_future(s.ended.wait()): s for s in sessions}
            _, late = await asyncio.wait(waits, timeout=10)
            for w in late:
                w.cancel()
                waits[w].task.cancel()

    def resume(self) -> None:
        """Make the compute active at once, without a wake (for test set-up)."""
        if self._wake_task is not None:
            self._wake_task.cancel()
            self._wake_task = None
        self.state = "ACTIVE"
        if self._woken is not None:
            self._woken.set()
        if not self._compute_busy():
            self._arm_idle()

    async def _wake(self, woken: asyncio.Event) -> None:
        try:
            await asyncio.sleep(self.wake_time)
            self.state = "ACTIVE"
            woken.set()
        finally:
            self._wake_task = None

    async def _reach_compute(self) -> None:
        """Return once the compute is active. Raises _Reject (XX000) during a
        wake's error window."""
        if self.state == "SUSPENDED":
            self.wakes += 1
            self.state = "WAKING"
            self._wake_started = time.monotonic()
            self._woken = asyncio.Event()
            self._wake_task = asyncio.get_running_loop().create_task(self._wake(self._woken))
        if self.state == "WAKING":
            if time.monotonic() - self._wake_started < self.wake_error_time:
                raise _Reject(S.INTERNAL_ERROR, MSG_COMPUTE)
            assert self._woken is not None  # noqa: S101  (set together with WAKING)
            await self._woken.wait()
        if self.state != "ACTIVE":  # suspended again while we waited
            await self._reach_compute()

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._serve(reader, writer, task)
        except _Reject as rej:
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                writer.write(codec.encode(codec.error_response(rej.sqlstate, rej.message)))
                await writer.drain()
        except ProtocolError as exc:
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                writer.write(codec.encode(codec.error_response(exc.sqlstate, str(exc))))
                await writer.drain()
        except (_Closed, ConnectionError, ssl.SSLError, OSError, TimeoutError,
                asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("front door connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     task: asyncio.Task[None]) -> None:
        frames = FrameReader(tagged=False, max_length=limits.MAX_STARTUP_PACKET)
        tls = False
        sni: str | None = None
        while True:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                packet = codec.decode_startup(await _read_frame(reader, frames))
            if isinstance(packet, codec.CancelRequest):
                await self._forward_cancel(packet)
                return
            if isinstance(packet, codec.GSSENCRequest):
                writer.write(b"N")
                continue
            if isinstance(packet, codec.SSLRequest):
                if tls:
                    raise _Reject(S.PROTOCOL_VIOLATION, "SSL request inside TLS")
                if frames.buffered:
                    raise _Reject(S.PROTOCOL_VIOLATION,
                                  "received unencrypted data after SSL request")
                writer.write(b"S")
                await writer.drain()
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await writer.start_tls(self._ctx)
                obj = writer.get_extra_info("ssl_object")
                sni = self._sni.pop(obj, None) if isinstance(obj, ssl.SSLObject) else None
                tls = True
                continue
            break
        if not tls:
            raise _Reject(S.PROTOCOL_VIOLATION, MSG_INSECURE)
        startup, route = self._route(packet, sni)
        user = startup.params.get("user", "")
        if not user:  # as PostgreSQL's ProcessStartupPacket
            raise _Reject(S.INVALID_AUTHORIZATION_SPECIFICATION,
                          "no PostgreSQL user name specified in startup packet")
        await self._authenticate(reader, writer, frames, user)
        if route.resource == "endpoint":
            if self.workspace.disabled:
                raise _Reject(S.INTERNAL_ERROR, MSG_COMPUTE)
            await self._reach_compute()
        else:
            state = self.workspace.instance_state
            if state != "AVAILABLE":
                starting = state in ("STARTING", "UPDATING", "UPGRADING", "FAILING_OVER")
                raise _Reject(S.CANNOT_CONNECT_NOW, MSG_STARTING if starting
                              else MSG_NOT_ACCEPTING)
        pg = self.pg if route.server == "primary" else await self._standby_cluster()
        session = _Session(task=task, client=writer, route=route, pg=pg)
        self._sessions[task] = session
        if route.resource == "endpoint":
            self._disarm_idle()
        self.logins += 1
        try:
            await self._relay(reader, writer, frames, startup, session)
        finally:
            session.ended.set()
            self._sessions.pop(task, None)
            if not self._compute_busy():
                self._arm_idle()

    async def _standby_cluster(self) -> PgCluster:
        if self._standby is None:
            raise _Reject(S.INTERNAL_ERROR, "emulator: no read-only server configured")
        try:
            self._standby_pg = await self._standby()
        except Exception as exc:
            log.exception("emulator: the standby could not be started")
            raise _Reject(S.INTERNAL_ERROR, MSG_COMPUTE) from exc
        return self._standby_pg

    def _route(self, startup: codec.StartupMessage, sni: str | None
               ) -> tuple[codec.StartupMessage, Route]:
        """Check SNI / ``options=endpoint=``; return the startup to send upstream
        and where it goes."""
        options = startup.params.get("options", "")
        words = options.split()
        named = [w.split("=", 1)[1] for w in words if w.startswith("endpoint=")]
        route: Route | None = None
        if sni is not None:
            route = self.routes.get(sni.lower())
            if route is None:
                label = sni.split(".", 1)[0]
                raise _Reject(S.INTERNAL_ERROR, f'endpoint "{label}" does not exist')
        if sni is None and not named:
            raise _Reject(S.INTERNAL_ERROR, MSG_NO_SNI)
        if named:
            by_id = self._by_id.get(named[0])
            if by_id is None or (route is not None and by_id != route):
                raise _Reject(S.INTERNAL_ERROR, f'endpoint "{named[0]}" does not exist')
            route = by_id
        assert route is not None  # noqa: S101  (SNI or options named it)
        if not named:
            return startup, route
        params = dict(startup.params)
        kept = " ".join(w for w in words if not w.startswith("endpoint="))
        if kept:
            params["options"] = kept
        else:
            del params["options"]
        return codec.StartupMessage(startup.major, startup.minor, params), route

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            frames: FrameReader, user: str) -> None:
        """Ask for a cleartext password and check it. Raises _Reject (28P01)."""
        writer.write(codec.encode(codec.AuthenticationCleartextPassword()))
        await writer.drain()
        frames.set_mode(tagged=True, max_length=_MAX_PASSWORD)
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            frame = await _read_frame(reader, frames)
        if frame[:1] != b"p":
            raise _Reject(S.PROTOCOL_VIOLATION, "expected a password message")
        self.passwords += 1
        msg = codec.decode_password(frame, codec.PasswordKind.PASSWORD)
        assert isinstance(msg, codec.PasswordMessage)  # noqa: S101  (PASSWORD kind)
        password = msg.password.decode("utf-8", "replace")
        if not self.workspace.is_valid_credential(user, password):
            raise _Reject(S.INVALID_PASSWORD, f'password authentication failed for user "{user}"')

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     frames: FrameReader, startup: codec.StartupMessage,
                     session: _Session) -> None:
        """Log in to the cluster, relay its login messages, then splice."""
        pg = session.pg or self.pg
        try:
            up_reader, up_writer = await asyncio.open_connection(pg.host, pg.port)
        except OSError as exc:
            raise _Reject(S.INTERNAL_ERROR, MSG_COMPUTE) from exc
        session.upstream = up_writer
        try:
            up_writer.write(codec.encode(startup))
            up_frames = FrameReader(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
            while True:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    frame = await _read_frame(up_reader, up_frames)
                tag = frame[:1]
                if tag == b"R" and frame[5:9] != b"\x00\x00\x00\x00":
                    raise _Reject(S.INTERNAL_ERROR,
                                  "emulator: the local cluster asked for a password "
                                  "(its pg_hba.conf must trust 127.0.0.1)")
                if tag == b"K":
                    key = codec.decode_backend(frame)
                    if isinstance(key, codec.BackendKeyData):
                        session.pid = key.process_id
                writer.write(frame)
                if tag in (b"Z", b"E"):
                    break
            await writer.drain()
            if tag == b"E":
                return
            if session.route.resource == "endpoint" and self.state == "SUSPENDED":
                # suspended while logging in: end it like PG would
                raise _Reject(S.ADMIN_SHUTDOWN, "terminating connection due to administrator "
                              "command")
            if leftover := up_frames.trailing():
                writer.write(leftover)
            if early := frames.trailing():
                up_writer.write(early)
            down = asyncio.ensure_future(_pipe(up_reader, writer))
            up = asyncio.ensure_future(_pipe(reader, up_writer))
            try:
                await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (down, up):
                    t.cancel()
                await asyncio.gather(down, up, return_exceptions=True)
                with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                    if not writer.is_closing():
                        await writer.drain()
        finally:
            up_writer.close()

    async def _forward_cancel(self, packet: codec.CancelRequest) -> None:
        """Send the CancelRequest to each server and close, as PostgreSQL does."""
        standby = self._standby_pg
        servers = [self.pg] + ([standby] if standby is not None and standby.running else [])
        await asyncio.gather(*(self._cancel_on(pg, packet) for pg in servers))

    async def _cancel_on(self, pg: PgCluster, packet: codec.CancelRequest) -> None:
        try:
            _, w = await asyncio.open_connection(pg.host, pg.port)
        except OSError:
            return
        try:
            w.write(codec.encode(packet))
            await w.drain()
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
