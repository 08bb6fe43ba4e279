"""One login: TCP -> SSLRequest -> TLS -> StartupMessage and password exchange.

Shape follows asyncpg's connect path: a tiny protocol reads exactly the one-byte
answer to SSLRequest, then :func:`lakeproxy.tls.start_tls` upgrades the same
transport (TLS by hand over memory BIOs, on asyncio and uvloop: cheaper per
message than ``loop.start_tls``, see lakeproxy/tls.py), then
:class:`~lakeproxy.wire.upstream_handshake.UpstreamHandshake` logs in over the TLS
transport; its StartupMessage leaves in the same TCP write as the TLS Finished.
The result, :class:`UpstreamConnection`, holds the TLS transport with reading
paused, ready to be handed to the splice with :meth:`UpstreamConnection.take_over`.

Deadlines are absolute times on the running loop's clock (``loop.time()``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Mapping
from typing import Final, TypeVar

from lakeproxy.errors import UpstreamConnectError, UpstreamRejected
from lakeproxy.tls import TLSTransport, start_tls
from lakeproxy.upstream.binding import tls_server_end_point
from lakeproxy.upstream.target import UpstreamTarget
from lakeproxy.wire import sqlstate
from lakeproxy.wire.codec import (
    BackendKeyData,
    ErrorResponse,
    SSLRequest,
    decode_backend,
    encode,
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.upstream_handshake import (
    NEED_DATA,
    LoginError,
    Ready,
    SendBytes,
    UpstreamAuthError,
    UpstreamHandshake,
)

log = logging.getLogger("lakeproxy.upstream")
_T = TypeVar("_T")

_TLS_HINT: Final = (
    "check LAKEBASE_SSLROOTCERT (the CA that signed the endpoint's certificate) and that "
    "LAKEBASE_HOST is the name in the certificate; sslmode verify-ca (LAKEBASE_SSLMODE) skips "
    "the host name check"
)


# ---------------------------------------------------------------------------- protocols


def silence(fut: asyncio.Future[_T]) -> None:
    """Cancel a pending future, or mark a failed one's exception as retrieved."""
    if not fut.done():
        fut.cancel()
    elif not fut.cancelled():
        fut.exception()


class SSLAnswer(asyncio.Protocol):
    """Reads the one-byte answer to SSLRequest on the raw transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self.extra = 0  # bytes received after the answer chunk

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            self.extra += len(data)
        else:
            self.answer.set_result(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            err = ConnectionResetError("the endpoint closed the connection before answering "
                                       "SSLRequest")
            err.__cause__ = exc
            self.answer.set_exception(err)


class _Login(asyncio.Protocol):
    """Drives UpstreamHandshake over the TLS transport until Ready or LoginError.

    Reading is paused as soon as Ready arrives; anything delivered after that
    (should be nothing) is held for :meth:`UpstreamConnection.take_over`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.result: asyncio.Future[Ready | LoginError] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.handshake: UpstreamHandshake | None = None
        self.held = bytearray()
        self.lost = False
        self.lost_exc: Exception | None = None

    def begin(self, transport: asyncio.Transport, handshake: UpstreamHandshake) -> None:
        self.transport = transport
        self.handshake = handshake
        transport.write(handshake.start())

    def fail(self, exc: BaseException) -> None:
        """End the login with ``exc`` (raised by ``await result``)."""
        if not self.result.done():
            self.result.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self.result.done():
            self.held += data
            return
        hs, transport = self.handshake, self.transport
        if hs is None or transport is None:
            self.result.set_exception(ProtocolError(
                "the endpoint sent data before the StartupMessage"
            ))
            return
        hs.receive_data(data)
        try:
            while True:
                event = hs.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, SendBytes):
                    transport.write(event.data)
                    continue
                if isinstance(event, Ready):
                    transport.pause_reading()
                self.result.set_result(event)
                return
        except ProtocolError as exc:
            self.result.set_exception(exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if not self.result.done():
            err = ConnectionResetError("the endpoint closed the connection during login")
            err.__cause__ = exc
            self.result.set_exception(err)


# ---------------------------------------------------------------------------- connection


class UpstreamConnection:
    """A logged-in TLS connection to the endpoint.

    Reading is paused. ``startup_messages`` are the endpoint's raw frames after
    AuthenticationOk up to and including the first ReadyForQuery, to relay;
    ``backend_key`` its cancel key. Hand the transport over with
    :meth:`take_over`, then ``transport.resume_reading()``.
    """

    __slots__ = (
        "_login",
        "_taken",
        "_trailing",
        "auth_method",
        "backend_key",
        "parameters",
        "protocol",
        "startup_messages",
        "target",
        "transport",
    )

    def __init__(
        self, transport: asyncio.Transport, ready: Ready, login: _Login, target: UpstreamTarget
    ) -> None:
        self.transport = transport
        self.target = target
        self.startup_messages: tuple[bytes, ...] = tuple(ready.startup_messages)
        self.backend_key: BackendKeyData | None = ready.backend_key
        self.parameters: Mapping[str, str] = ready.parameters
        self.protocol = ready.protocol
        self.auth_method = ready.auth_method
        self._login = login
        self._trailing = ready.trailing
        self._taken = False

    def __repr__(self) -> str:
        pid = self.backend_key.process_id if self.backend_key else None
        return (f"<UpstreamConnection {self.target} pid={pid} auth={self.auth_method} "
                f"taken={self._taken}>")

    @property
    def trailing(self) -> bytes:
        """Bytes received after the first ReadyForQuery, so far (before take-over)."""
        return self._trailing + bytes(self._login.held)

    def take_over(self, protocol: asyncio.BaseProtocol) -> bytes:
        """Make ``protocol`` the transport's protocol and return the bytes that
        arrived after the first ReadyForQuery: the new owner handles them first,
        in order, before anything it reads. Reading stays paused until the
        caller calls ``transport.resume_reading()``. ``connection_made`` is not
        called. If the endpoint already closed the connection, ``protocol``
        gets ``connection_lost`` soon after.

        Raises:
            RuntimeError: called twice.
        """
        if self._taken:
            raise RuntimeError("the upstream connection was already taken over")
        self._taken = True
        data = self.trailing
        self._login.held.clear()
        self.transport.set_protocol(protocol)
        if self._login.lost and isinstance(protocol, asyncio.Protocol):
            asyncio.get_running_loop().call_soon(protocol.connection_lost, self._login.lost_exc)
        return data

    def close(self) -> None:
        """Close the connection (flushes what was written)."""
        self.transport.close()

    def abort(self) -> None:
        """Close the connection at once."""
        self.transport.abort()


def _abort(transport: asyncio.Transport | None) -> None:
    if transport is not None and not transport.is_closing():
        transport.abort()


def _set_socket_options(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:  # not TCP (tests may dial a unix socket); nothing to tune
        pass


def _refused(message: str, hint: str | None = None, *,
             code: str = sqlstate.CONNECTION_FAILURE) -> UpstreamConnectError:
    return UpstreamConnectError(message, retryable=False, hint=hint, sqlstate=code)


def check_ssl_answer(target: UpstreamTarget, data: bytes) -> None:
    """Accept exactly b"S"; raise for anything else."""
    if data == b"S":
        return
    first = data[:1]
    if first == b"S":
        raise _refused(
            f"endpoint {target}: {len(data) - 1} unexpected byte(s) after 'S' in the answer "
            "to SSLRequest (refusing them: they could have been injected before TLS)"
        )
    if first == b"N":
        raise _refused(
            f"endpoint {target} refused TLS (answered 'N' to SSLRequest); lakeproxy only "
            "connects to the endpoint over TLS",
            "check LAKEBASE_HOST/LAKEBASE_PORT: they must point at a Lakebase endpoint (or a "
            "PostgreSQL server with ssl=on)",
        )
    if first == b"E":
        # Sent before TLS, so anyone on the path could have written it: never
        # relay it to the client nor let it pick a SQLSTATE (CVE-2024-10977).
        try:
            msg = decode_backend(data)
        except ProtocolError:
            msg = None
        if isinstance(msg, ErrorResponse):
            log.debug("endpoint %s answered SSLRequest with an error: %s %s",
                      target, msg.sqlstate, msg.message)
        raise _refused(
            f"endpoint {target} answered SSLRequest with an error before TLS (not relayed: "
            "it could have been forged)",
            "check LAKEBASE_HOST/LAKEBASE_PORT point at the Lakebase endpoint",
        )
    raise _refused(
        f"endpoint {target} sent an invalid answer to SSLRequest (first byte {first!r}); "
        "is it a PostgreSQL server?",
        "check LAKEBASE_HOST/LAKEBASE_PORT",
    )


# ---------------------------------------------------------------------------- connect


async def connect(
    endpoint: UpstreamTarget,
    credential_token: str,
    params: Mapping[str, str],
    *,
    deadline: float,
    ssl_context: ssl.SSLContext,
    protocol: tuple[int, int] = (3, 0),
) -> UpstreamConnection:
    """One attempt: TCP to ``endpoint.dial_host``, SSLRequest, TLS (SNI and
    certificate name ``endpoint.host``), then log in as ``params["user"]`` with
    ``credential_token`` as the password. ``params`` is the StartupMessage
    (``user`` required; ``database``, ``application_name``, ``options``, ...).

    ``deadline`` is absolute, on the loop's clock. Cancel-safe: on any failure
    or cancellation the connection is aborted.

    Returns:
        The logged-in connection (reading paused).
    Raises:
        UpstreamRejected: the endpoint sent an ErrorResponse (``raw`` as received).
        UpstreamConnectError: TLS refused or certificate verification failed,
            a protocol error, an unsupported auth method (never retryable).
        TimeoutError: the deadline passed (the message names the phase).
        OSError, ssl.SSLError: network and TLS failures (see lakeproxy.retry).
        ValueError: ``params`` has no "user".
    """
    user = params.get("user")
    if not user:
        raise ValueError("params must include the role as 'user'")
    loop = asyncio.get_running_loop()
    phase = "TCP connect"
    raw: asyncio.Transport | None = None
    tls: asyncio.Transport | None = None
    answer: SSLAnswer | None = None
    login = _Login(loop)
    try:
        async with asyncio.timeout_at(deadline):
            raw, answer = await loop.create_connection(
                lambda: SSLAnswer(loop), endpoint.dial_host, endpoint.port
            )
            _set_socket_options(raw)
            phase = "SSLRequest"
            raw.write(encode(SSLRequest()))
            check_ssl_answer(endpoint, await answer.answer)
            phase = "TLS handshake"
            extra = answer  # checked before anything is sent inside TLS

            def begin_login(t: TLSTransport) -> None:
                # Runs as the handshake completes: the StartupMessage leaves
                # with our Finished, in one TCP write (TLS 1.3).
                if extra.extra:
                    return  # refused below, before any credential is sent
                try:
                    der = t.ssl_object.getpeercert(binary_form=True)
                    binding = tls_server_end_point(der) if der else None
                    login.begin(t, UpstreamHandshake(
                        user, credential_token, params, protocol=protocol,
                        channel_binding=binding,
                    ))
                except Exception as exc:  # raised from login.result below
                    login.fail(exc)

            tls = await start_tls(
                raw, login, ssl_context, server_hostname=endpoint.host,
                on_handshake=begin_login,
            )
            if answer.extra:
                raise _refused(
                    f"endpoint {endpoint}: unexpected bytes after 'S' in the answer to "
                    "SSLRequest (refusing them: they could have been injected before TLS)"
                )
            phase = "login"
            result = await login.result
    except TimeoutError as exc:
        _abort(tls)
        _abort(raw)
        if exc.errno is not None:  # the OS timed out the TCP connect
            raise
        raise TimeoutError(f"timed out during {phase} with {endpoint}") from None
    except ssl.SSLCertVerificationError as exc:
        _abort(tls)
        _abort(raw)
        raise _refused(
            f"endpoint {endpoint}: TLS certificate verification failed "
            f"(sslmode={endpoint.sslmode}): {exc.verify_message or exc.reason}",
            _TLS_HINT,
        ) from exc
    except UpstreamAuthError as exc:
        _abort(tls)
        raise _refused(f"endpoint {endpoint}: {exc}", None,
                       code=sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION) from exc
    except ProtocolError as exc:
        _abort(tls)
        raise _refused(f"endpoint {endpoint}: {exc}") from exc
    except BaseException:
        _abort(tls)
        _abort(raw)
        raise
    finally:
        if answer is not None:
            silence(answer.answer)
        silence(login.result)
    assert tls is not None  # noqa: S101  (set before login.result resolved)
    if isinstance(result, LoginError):
        tls.abort()
        err = result.error
        raise UpstreamRejected(result.raw_frame, err.sqlstate or sqlstate.INTERNAL_ERROR,
                               err.message)
    return UpstreamConnection(tls, result, login, endpoint)
