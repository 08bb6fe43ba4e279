"""Dial the Lakebase endpoint: TCP -> SSLRequest -> TLS -> login, with retries.

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
import hashlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from lakeproxy.errors import ConfigError, UpstreamConnectError, UpstreamRejected
from lakeproxy.retry import DEFAULT_POLICY, RetryPolicy, describe, is_auth_failure, is_retryable
from lakeproxy.tls import TLSTransport, start_tls
from lakeproxy.wire import sqlstate
from lakeproxy.wire.codec import (
    BackendKeyData,
    CancelRequest,
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

__all__ = [
    "SslMode",
    "TlsGroups",
    "UpstreamConnection",
    "UpstreamTarget",
    "clear_ssl_context_cache",
    "connect",
    "connect_with_retry",
    "handshake_refused",
    "make_ssl_context",
    "send_cancel",
    "tls_server_end_point",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SslMode = Literal["require", "verify-ca", "verify-full"]
SSL_MODES: Final = ("require", "verify-ca", "verify-full")
#: Upper bound for one connect attempt (TCP + TLS + login).
ATTEMPT_TIMEOUT: Final = 10.0
#: Below this many seconds before the deadline no new attempt is started.
_MIN_ATTEMPT: Final = 0.01
#: Upper bound for sending one CancelRequest.
CANCEL_TIMEOUT: Final = 5.0

_TLS_HINT: Final = (
    "check PGSSLROOTCERT (the CA that signed the endpoint's certificate) and that PGHOST is "
    "the name in the certificate; PGSSLMODE=verify-ca skips the host name check"
)
_DEADLINE_HINT: Final = (
    "the endpoint may still be waking from scale-to-zero, or be unreachable from here: "
    "check PGHOST/PGPORT and the network, or raise LAKEPROXY_CONNECT_DEADLINE"
)


# ---------------------------------------------------------------------------- target


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where the endpoint is and how to check it.

    ``host``: the name sent as SNI (Lakebase routes on it; Python's ssl sends
    no SNI for an IP literal) and checked against the certificate;
    ``hostaddr``: an IP address to dial instead of resolving ``host`` (libpq's
    PGHOSTADDR); ``sslmode``: ``require`` (encrypt only),
    ``verify-ca`` (chain) or ``verify-full`` (chain and host name).
    """

    host: str
    port: int = 5432
    hostaddr: str | None = None
    sslmode: SslMode = "verify-full"

    @property
    def dial_host(self) -> str:
        """The address TCP connects to."""
        return self.hostaddr or self.host

    def __str__(self) -> str:
        via = f" (via {self.hostaddr})" if self.hostaddr else ""
        return f"{self.host}:{self.port}{via}"


# ---------------------------------------------------------------------------- TLS contexts

_contexts: dict[tuple[str, str, str], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


#: The one key-exchange group offered to the endpoint (see _build_ssl_context).
UPSTREAM_TLS_GROUP: Final = "prime256v1"

#: Key-exchange groups a context offers: ``p256`` (:data:`UPSTREAM_TLS_GROUP`
#: only, the default) or ``default`` (OpenSSL's list, X25519 first), the
#: fallback for an endpoint that refuses P-256 (see :func:`handshake_refused`).
TlsGroups = Literal["p256", "default"]


def make_ssl_context(
    sslmode: str, sslrootcert: str = "system", *, groups: TlsGroups = "p256"
) -> ssl.SSLContext:
    """Return the client TLS context for ``(sslmode, sslrootcert)``, built once
    and shared by every later call with the same pair.

    ``sslrootcert`` is a CA bundle file, or ``system`` for the system CAs. The
    CAs are loaded into memory once: no CA directory is searched during
    handshakes (``ssl.create_default_context()`` installs a lazily searched
    directory that OpenSSL 3 re-reads on every handshake). ``require`` loads no
    CA and checks nothing but still encrypts.

    Raises:
        ConfigError: unknown ``sslmode``, or no CA could be loaded.
    """
    key = (sslmode, sslrootcert, groups)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _build_ssl_context(sslmode, sslrootcert, groups)
            _contexts[key] = ctx
        return ctx


def clear_ssl_context_cache() -> None:
    """Forget the contexts built so far (after the CA files changed, e.g. on SIGHUP)."""
    with _contexts_lock:
        _contexts.clear()


def handshake_refused(exc: BaseException | None) -> bool:
    """True when ``exc``, or an exception it was raised from, is the endpoint's
    handshake_failure alert: what a server sends when it shares no key-exchange
    group (or cipher) with the ClientHello."""
    while exc is not None:
        if (isinstance(exc, ssl.SSLError)
                and getattr(exc, "reason", None) == "SSLV3_ALERT_HANDSHAKE_FAILURE"):
            return True
        exc = exc.__cause__
    return False


def _build_ssl_context(sslmode: str, sslrootcert: str, groups: TlsGroups) -> ssl.SSLContext:
    if sslmode not in SSL_MODES:
        raise ConfigError([
            f"PGSSLMODE={sslmode!r} is not supported: use require, verify-ca or verify-full"
        ])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Offer (and send a key share for) P-256 only: the group every TLS 1.3
    # server must support (RFC 8446, 9.1), and the only one a PostgreSQL
    # server accepts with its default ssl_ecdh_curve. OpenSSL's default
    # offers X25519 first, which such a server answers with a
    # HelloRetryRequest: one more round trip and key pair per connection
    # (benchmarks/README.md, "new connections"). An endpoint that refuses it
    # gets OpenSSL's default list instead (EndpointDialer.connect).
    if groups == "p256":
        ctx.set_ecdh_curve(UPSTREAM_TLS_GROUP)
    if sslmode == "require":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.check_hostname = sslmode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED
    if sslrootcert == "system":
        _load_system_cas(ctx)
    else:
        try:
            ctx.load_verify_locations(cafile=sslrootcert)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([
                f"PGSSLROOTCERT={sslrootcert}: cannot load CA certificates: {exc}"
            ]) from None
    return ctx


def _load_system_cas(ctx: ssl.SSLContext) -> None:
    paths = ssl.get_default_verify_paths()
    if paths.cafile and os.path.isfile(paths.cafile):
        ctx.load_verify_locations(cafile=paths.cafile)
        return
    pems: list[str] = []
    if paths.capath and os.path.isdir(paths.capath):
        for entry in sorted(os.scandir(paths.capath), key=lambda e: e.name):
            if not entry.is_file():
                continue
            try:
                with open(entry.path, encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if "-----BEGIN CERTIFICATE-----" in text and text not in pems:
                pems.append(text)
    if pems:
        ctx.load_verify_locations(cadata="\n".join(pems))
        return
    raise ConfigError([
        f"PGSSLROOTCERT=system: no system CA certificates found (looked for {paths.cafile} "
        f"and {paths.capath}); set PGSSLROOTCERT to a CA bundle file"
    ])


# ---------------------------------------------------------------------------- channel binding


def _oid(dotted: str) -> bytes:
    """DER content bytes of an OBJECT IDENTIFIER."""
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([40 * parts[0] + parts[1]])
    for value in parts[2:]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


#: Certificate signature algorithm -> its hash (RFC 3279, 4055, 5758).
_SIGNATURE_HASHES: Final[Mapping[bytes, str]] = {
    _oid("1.2.840.113549.1.1.4"): "md5",  # md5WithRSAEncryption
    _oid("1.2.840.113549.1.1.5"): "sha1",
    _oid("1.2.840.113549.1.1.14"): "sha224",
    _oid("1.2.840.113549.1.1.11"): "sha256",
    _oid("1.2.840.113549.1.1.12"): "sha384",
    _oid("1.2.840.113549.1.1.13"): "sha512",
    _oid("1.2.840.10045.4.1"): "sha1",  # ecdsa-with-SHA1
    _oid("1.2.840.10045.4.3.1"): "sha224",
    _oid("1.2.840.10045.4.3.2"): "sha256",
    _oid("1.2.840.10045.4.3.3"): "sha384",
    _oid("1.2.840.10045.4.3.4"): "sha512",
    _oid("1.2.840.10040.4.3"): "sha1",  # dsa-with-sha1
    _oid("2.16.840.1.101.3.4.3.1"): "sha224",  # dsa-with-sha224
    _oid("2.16.840.1.101.3.4.3.2"): "sha256",
}
#: Hash algorithm identifiers (inside RSASSA-PSS parameters).
_HASHES: Final[Mapping[bytes, str]] = {
    _oid("1.3.14.3.2.26"): "sha1",
    _oid("2.16.840.1.101.3.4.2.4"): "sha224",
    _oid("2.16.840.1.101.3.4.2.1"): "sha256",
    _oid("2.16.840.1.101.3.4.2.2"): "sha384",
    _oid("2.16.840.1.101.3.4.2.3"): "sha512",
}
_RSASSA_PSS: Final = _oid("1.2.840.113549.1.1.10")


def _der_item(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Return ``(tag, content_start, content_end)`` of the DER item at ``pos``."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    if pos + length > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _signature_hash(der: bytes) -> str | None:
    """The hash of the certificate's signature algorithm, or None if unknown."""
    tag, start, end = _der_item(der, 0, len(der))  # Certificate ::= SEQUENCE
    if tag != 0x30:
        return None
    _, _, tbs_end = _der_item(der, start, end)  # tbsCertificate
    tag, alg_start, alg_end = _der_item(der, tbs_end, end)  # signatureAlgorithm
    if tag != 0x30:
        return None
    tag, oid_start, oid_end = _der_item(der, alg_start, alg_end)
    if tag != 0x06:
        return None
    oid = der[oid_start:oid_end]
    if oid != _RSASSA_PSS:
        return _SIGNATURE_HASHES.get(oid)
    # RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, ...}
    if oid_end >= alg_end:
        return "sha1"
    tag, p_start, p_end = _der_item(der, oid_end, alg_end)
    if tag != 0x30 or p_start >= p_end:
        return "sha1"
    tag, h_start, h_end = _der_item(der, p_start, p_end)
    if tag != 0xA0:
        return "sha1"
    tag, a_start, a_end = _der_item(der, h_start, h_end)  # AlgorithmIdentifier
    if tag != 0x30:
        return None
    tag, o_start, o_end = _der_item(der, a_start, a_end)
    return _HASHES.get(der[o_start:o_end]) if tag == 0x06 else None


def tls_server_end_point(der: bytes) -> bytes | None:
    """The tls-server-end-point channel binding of a DER certificate (RFC 5929
    section 4.1): its hash with the certificate's signature hash, SHA-256 when
    that is MD5 or SHA-1. None when the algorithm defines no binding (Ed25519,
    ...) or the certificate cannot be parsed."""
    try:
        name = _signature_hash(der)
    except ValueError:
        return None
    if name is None:
        return None
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, der).digest()


# ---------------------------------------------------------------------------- protocols


def _silence(fut: asyncio.Future[_T]) -> None:
    """Cancel a pending future, or mark a failed one's exception as retrieved."""
    if not fut.done():
        fut.cancel()
    elif not fut.cancelled():
        fut.exception()


class _SSLAnswer(asyncio.Protocol):
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


def _check_ssl_answer(target: UpstreamTarget, data: bytes) -> None:
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
            "check PGHOST/PGPORT: they must point at a Lakebase endpoint (or a PostgreSQL "
            "server with ssl=on)",
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
            "check PGHOST/PGPORT point at the Lakebase endpoint",
        )
    raise _refused(
        f"endpoint {target} sent an invalid answer to SSLRequest (first byte {first!r}); "
        "is it a PostgreSQL server?",
        "check PGHOST/PGPORT",
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
    answer: _SSLAnswer | None = None
    login = _Login(loop)
    try:
        async with asyncio.timeout_at(deadline):
            raw, answer = await loop.create_connection(
                lambda: _SSLAnswer(loop), endpoint.dial_host, endpoint.port
            )
            _set_socket_options(raw)
            phase = "SSLRequest"
            raw.write(encode(SSLRequest()))
            _check_ssl_answer(endpoint, await answer.answer)
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
            _silence(answer.answer)
        _silence(login.result)
    assert tls is not None  # noqa: S101  (set before login.result resolved)
    if isinstance(result, LoginError):
        tls.abort()
        err = result.error
        raise UpstreamRejected(result.raw_frame, err.sqlstate or sqlstate.INTERNAL_ERROR,
                               err.message)
    return UpstreamConnection(tls, result, login, endpoint)


async def connect_with_retry(
    endpoint: UpstreamTarget,
    credential_token: str,
    params: Mapping[str, str],
    *,
    deadline: float,
    ssl_context: ssl.SSLContext,
    refresh_credential: Callable[[], Awaitable[str]] | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
    protocol: tuple[int, int] = (3, 0),
) -> UpstreamConnection:
    """:func:`connect`, retried per :mod:`lakeproxy.retry` with backoff until ``deadline``.

    Each attempt gets ``min(attempt_timeout, time left)``. ``on_retry(exc)`` is
    called once per retry (for the retries metric). An auth failure (28P01 /
    28000) calls ``refresh_credential()`` once and retries at once with the
    token it returns.

    Returns:
        The logged-in connection.
    Raises:
        UpstreamRejected: the endpoint's own final login error (database does
            not exist, ...), or an auth failure when ``refresh_credential`` is
            None: forward ``raw`` to the client unchanged.
        UpstreamConnectError: 08006 when the deadline passed (the last error in
            the message) or a failure that no retry can fix (certificate,
            protocol, TLS refused); 28P01 when the fresh credential was refused too.
        Exception: whatever ``refresh_credential`` raises (e.g. CredentialError).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    token = credential_token
    refreshed = False
    retries = 0
    last: BaseException | None = None
    while True:
        now = loop.time()
        if now >= deadline:
            raise _gave_up(endpoint, last, retries, now - started)
        try:
            return await connect(
                endpoint, token, params,
                deadline=min(deadline, now + attempt_timeout),
                ssl_context=ssl_context, protocol=protocol,
            )
        except UpstreamRejected as exc:
            if is_auth_failure(exc):
                if refresh_credential is None:
                    raise
                if refreshed:
                    raise UpstreamConnectError(
                        f"endpoint rejected the fresh credential twice: {describe(exc)}",
                        retryable=False, sqlstate=sqlstate.INVALID_PASSWORD,
                        hint="check that the role (PGUSER) exists on the endpoint and that the "
                             "service principal may log in as it",
                    ) from exc
                log.info("endpoint %s refused the credential (%s); retrying once with a "
                         "fresh one", endpoint, exc.sqlstate)
                try:
                    async with asyncio.timeout_at(deadline):
                        token = await refresh_credential()
                except TimeoutError:
                    raise _gave_up(endpoint, exc, retries, loop.time() - started) from None
                refreshed = True
                last = exc
                continue
            if not is_retryable(exc):
                raise
            last = exc
        except UpstreamConnectError as exc:
            if not exc.retryable:
                raise
            last = exc
        except (OSError, ssl.SSLError, EOFError) as exc:
            if not is_retryable(exc):
                raise UpstreamConnectError(
                    f"cannot connect to endpoint {endpoint}: {describe(exc)}",
                    retryable=False, hint="check PGHOST/PGPORT/PGHOSTADDR",
                ) from exc
            last = exc
        remaining = deadline - loop.time()
        if remaining <= _MIN_ATTEMPT:
            raise _gave_up(endpoint, last, retries, loop.time() - started)
        # Never sleep away the time the next attempt needs: a compute that
        # wakes in the last seconds before the deadline still gets a try.
        delay = min(policy.delay(retries + 1), remaining / 2)
        retries += 1
        if on_retry is not None:
            on_retry(last)
        log.debug("endpoint %s not ready (%s); retry %d in %.2f s",
                  endpoint, describe(last), retries, delay)
        await asyncio.sleep(delay)


def _gave_up(endpoint: UpstreamTarget, last: BaseException | None, retries: int,
             elapsed: float) -> UpstreamConnectError:
    cause = describe(last) if last is not None else "no attempt was made in time"
    exc = UpstreamConnectError(
        f"could not connect to endpoint {endpoint} within {elapsed:.1f} s ({retries} "
        f"retr{'y' if retries == 1 else 'ies'}); last error: {cause}",
        retryable=False, hint=_DEADLINE_HINT, sqlstate=sqlstate.CONNECTION_FAILURE,
    )
    exc.__cause__ = last
    return exc


# ---------------------------------------------------------------------------- cancel


class _UntilClosed(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.closed: asyncio.Future[None] = loop.create_future()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def send_cancel(
    target: UpstreamTarget,
    ssl_context: ssl.SSLContext,
    process_id: int,
    secret: bytes,
) -> None:
    """Send a CancelRequest for ``process_id``/``secret`` over TLS (SSLRequest
    first, SNI as for :func:`connect`) and wait until the endpoint closes the
    connection, at most :data:`CANCEL_TIMEOUT` seconds. Best effort: failures
    are logged at debug, never raised."""
    loop = asyncio.get_running_loop()
    raw: asyncio.Transport | None = None
    tls: asyncio.Transport | None = None
    answer: _SSLAnswer | None = None
    until_closed = _UntilClosed(loop)
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            raw, answer = await loop.create_connection(
                lambda: _SSLAnswer(loop), target.dial_host, target.port
            )
            raw.write(encode(SSLRequest()))
            _check_ssl_answer(target, await answer.answer)
            tls = await loop.start_tls(raw, until_closed, ssl_context,
                                       server_hostname=target.host)
            if tls is None:
                return
            tls.write(encode(CancelRequest(process_id, secret)))
            await until_closed.closed
    except (OSError, ssl.SSLError, TimeoutError, UpstreamConnectError, UpstreamRejected,
            ValueError) as exc:
        log.debug("cancel request to %s failed: %s", target, describe(exc))
    finally:
        if answer is not None:
            _silence(answer.answer)
        closed = until_closed.closed.done() and not until_closed.closed.cancelled()
        _silence(until_closed.closed)
        if tls is not None:
            # A graceful TLS close could wait out the SSL shutdown timeout on an
            # endpoint that stopped answering: only after the endpoint closed.
            if closed:
                tls.close()
            else:
                tls.abort()
        elif raw is not None:
            raw.abort()
