"""lakeproxy acting as a Postgres *client*: the login to the endpoint, without I/O.

The caller opens TLS itself (SSLRequest and the TLS handshake are transport
work), then drives this machine h11-style::

    hs = UpstreamHandshake(user, password, params, channel_binding=cb)
    transport.write(hs.start())
    # for every chunk read from the endpoint:
    hs.receive_data(chunk)
    while (event := hs.next_event()) is not NEED_DATA:
        SendBytes    -> write event.data to the endpoint
        Ready        -> login done: relay event.startup_messages, splice from here
        LoginError   -> the endpoint refused: event.raw_frame is its ErrorResponse

Authentication methods: cleartext password, MD5, SCRAM-SHA-256 and
SCRAM-SHA-256-PLUS (tls-server-end-point channel binding, RFC 5929 / RFC 5802),
using ``scramp``'s client. Any other method (KerberosV5, GSSAPI, SSPI, ...)
raises :class:`UpstreamAuthError`.
Protocol: https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP

Never imports asyncio, sockets or ssl. The password never reaches a repr or an
exception message.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from scramp import ScramClient, ScramException

from lakeproxy.wire import limits, sqlstate
from lakeproxy.wire.codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    OtherMessage,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
    decode_backend,
    encode,
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

__all__ = [
    "NEED_DATA",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "Event",
    "LoginError",
    "NeedData",
    "Ready",
    "SendBytes",
    "UpstreamAuthError",
    "UpstreamHandshake",
    "UpstreamProtocolError",
]

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS: Final = "SCRAM-SHA-256-PLUS"
#: The channel binding type PostgreSQL implements (RFC 5929 section 4).
CHANNEL_BINDING_TYPE: Final = "tls-server-end-point"

#: Authentication request codes we refuse, by name, for a clear message
#: (src/include/libpq/protocol.h / pqcomm.h).
_OTHER_AUTH_METHODS: Final[Mapping[int, str]] = {
    2: "KerberosV5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI (continue)",
    9: "SSPI",
}
_SUPPORTED: Final = "cleartext password, MD5, SCRAM-SHA-256 and SCRAM-SHA-256-PLUS"


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`: feed more bytes with ``receive_data``."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class SendBytes:
    """Bytes to write to the endpoint (may carry a password: not in the repr)."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoginError:
    """The endpoint sent an ErrorResponse; the login is over.

    ``raw_frame`` is the frame exactly as received, to forward unchanged.
    """

    raw_frame: bytes
    error: ErrorResponse


@dataclass(frozen=True, slots=True)
class Ready:
    """The login succeeded and the endpoint sent its first ReadyForQuery.

    ``startup_messages``: the raw frames the endpoint sent after
    AuthenticationOk, in order, up to and including that ReadyForQuery
    (ParameterStatus, BackendKeyData, NoticeResponse, ...), preceded by any
    ParameterStatus/NoticeResponse it sent before AuthenticationOk.
    ``trailing``: bytes received after the ReadyForQuery (rare: an early
    NotificationResponse); whoever takes over the connection handles them first.
    ``protocol``: the version in force (lowered by NegotiateProtocolVersion).
    ``auth_method``: "trust", "cleartext", "md5", "SCRAM-SHA-256" or
    "SCRAM-SHA-256-PLUS".
    """

    startup_messages: list[bytes]
    backend_key: BackendKeyData | None
    trailing: bytes
    parameters: dict[str, str]
    protocol: tuple[int, int]
    auth_method: str


Event = SendBytes | LoginError | Ready


class UpstreamProtocolError(ProtocolError):
    """The endpoint broke the protocol during login (08P01 unless stated)."""


class UpstreamAuthError(UpstreamProtocolError):
    """Authentication could not proceed on our side: an unsupported method, a
    SCRAM exchange that failed (e.g. the server could not prove it knows the
    password), or a password the wire cannot carry. Never retried. 08001."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)


class _State(enum.Enum):
    CREATED = "created"  # start() not called yet
    AUTH = "auth"  # waiting for an authentication request
    SASL_CONTINUE = "sasl_continue"  # sent SASLInitialResponse
    SASL_FINAL = "sasl_final"  # sent SASLResponse (client-final)
    SASL_OK = "sasl_ok"  # verified server-final; waiting for AuthenticationOk
    STARTUP = "startup"  # after AuthenticationOk, until ReadyForQuery
    DONE = "done"  # Ready emitted
    FAILED = "failed"  # LoginError emitted or an exception raised


def md5_password(password: str, user: str, salt: bytes) -> bytes:
    """PostgreSQL's MD5 response: ``'md5' + md5(md5(password + user).hex + salt).hex``.

    ``user`` is the role name sent in the StartupMessage.
    """
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode("ascii")  # noqa: S324
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")  # noqa: S324


class UpstreamHandshake:
    """The client side of a Postgres login, as a state machine.

    ``params`` are the StartupMessage parameters (database, application_name,
    options, ...), passed in order; ``user`` always replaces any "user" there.
    ``protocol`` is the version requested. ``channel_binding`` is the
    tls-server-end-point hash of the endpoint's certificate; with it,
    SCRAM-SHA-256-PLUS is used whenever the endpoint offers it.
    """

    __slots__ = (
        "_auth_method",
        "_backend_key",
        "_channel_binding",
        "_frames",
        "_parameters",
        "_params",
        "_password",
        "_protocol",
        "_reader",
        "_scram",
        "_state",
        "_user",
    )

    def __init__(
        self,
        user: str,
        password: str,
        params: Mapping[str, str],
        *,
        protocol: tuple[int, int] = (3, 0),
        channel_binding: bytes | None = None,
    ) -> None:
        if protocol[0] != 3:
            raise ValueError(f"unsupported protocol version {protocol[0]}.{protocol[1]}")
        self._user = user
        self._password = password
        self._params: dict[str, str] = {"user": user}
        self._params.update((k, v) for k, v in params.items() if k != "user")
        self._protocol = protocol
        self._channel_binding = channel_binding or None
        self._reader = FrameReader(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
        self._state = _State.CREATED
        self._scram: ScramClient | None = None
        self._frames: list[bytes] = []
        self._parameters: dict[str, str] = {}
        self._backend_key: BackendKeyData | None = None
        self._auth_method = "trust"

    def __repr__(self) -> str:
        return (
            f"<UpstreamHandshake user={self._user!r} state={self._state.value} "
            f"protocol={self._protocol[0]}.{self._protocol[1]}>"
        )

    @property
    def protocol(self) -> tuple[int, int]:
        """The protocol version in force (lowered by NegotiateProtocolVersion)."""
        return self._protocol

    @property
    def finished(self) -> bool:
        """True once Ready or LoginError was returned, or an error raised."""
        return self._state in (_State.DONE, _State.FAILED)

    def start(self) -> bytes:
        """Return the StartupMessage to send first.

        Raises:
            RuntimeError: called twice.
            UpstreamAuthError: a parameter holds a NUL byte.
        """
        if self._state is not _State.CREATED:
            raise RuntimeError("start() was already called")
        self._state = _State.AUTH
        major, minor = self._protocol
        try:
            return encode(StartupMessage(major, minor, dict(self._params)))
        except ValueError as exc:
            self._state = _State.FAILED
            raise UpstreamAuthError(f"cannot send the startup parameters: {exc}") from None

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the endpoint (any chunking). EOF is the
        caller's business: this machine never sees it."""
        self._reader.feed(data)

    def trailing_data(self) -> bytes:
        """Return and clear bytes buffered but not consumed (after Ready, these
        are already in ``Ready.trailing``)."""
        return self._reader.trailing()

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """Return the next event, or NEED_DATA when more bytes are needed.

        Raises:
            RuntimeError: before ``start()`` or after the handshake finished.
            UpstreamAuthError: an unsupported method or a failed SCRAM exchange.
            UpstreamProtocolError: a malformed or unexpected message.
        """
        if self._state is _State.CREATED:
            raise RuntimeError("call start() first")
        if self.finished:
            raise RuntimeError("the handshake is finished")
        try:
            frame = self._reader.next_frame()
            if frame is None:
                return NEED_DATA
            event = self._handle(frame)
        except ProtocolError as exc:
            self._state = _State.FAILED
            if isinstance(exc, UpstreamProtocolError):
                raise
            raise UpstreamProtocolError(
                f"the endpoint sent a malformed message during login: {exc}"
            ) from None
        if event is None:
            return self.next_event()
        return event

    # ------------------------------------------------------------------ internals

    def _handle(self, frame: bytes) -> Event | None:
        msg = self._decode(frame)
        if isinstance(msg, ErrorResponse):
            self._state = _State.FAILED
            return LoginError(frame, msg)
        if isinstance(msg, ParameterStatus):
            self._parameters[msg.name] = msg.value
            self._frames.append(frame)
            return None
        if isinstance(msg, NoticeResponse):
            self._frames.append(frame)
            return None
        if self._state is _State.STARTUP:
            return self._handle_startup(frame, msg)
        if isinstance(msg, NegotiateProtocolVersion):
            self._negotiate(msg)
            return None
        return self._handle_auth(msg)

    def _decode(self, frame: bytes) -> BackendMessage:
        if frame[:1] == b"R" and len(frame) >= 9:
            code = int.from_bytes(frame[5:9], "big")
            if code in _OTHER_AUTH_METHODS:
                raise UpstreamAuthError(
                    f"the endpoint asked for {_OTHER_AUTH_METHODS[code]} authentication, which "
                    f"lakeproxy does not support (it supports {_SUPPORTED})"
                )
        return decode_backend(frame)

    def _negotiate(self, msg: NegotiateProtocolVersion) -> None:
        # Sent before the authentication request when we asked for a newer minor
        # version or for _pq_ options it does not know; never raises the version.
        if self._state is not _State.AUTH or msg.newest_minor > self._protocol[1]:
            raise UpstreamProtocolError(
                f"unexpected NegotiateProtocolVersion (3.{msg.newest_minor}) from the endpoint"
            )
        self._protocol = (3, msg.newest_minor)

    def _handle_auth(self, msg: BackendMessage) -> Event | None:
        state = self._state
        if isinstance(msg, AuthenticationOk):
            if state is _State.AUTH or state is _State.SASL_OK:
                self._state = _State.STARTUP
                return None
            raise UpstreamAuthError(
                "the endpoint accepted the login without completing SCRAM authentication "
                "(it did not prove that it knows the password)"
            )
        if state is _State.AUTH:
            if isinstance(msg, AuthenticationCleartextPassword):
                self._auth_method = "cleartext"
                return self._send_password(self._password.encode())
            if isinstance(msg, AuthenticationMD5Password):
                self._auth_method = "md5"
                return self._send_password(md5_password(self._password, self._user, msg.salt))
            if isinstance(msg, AuthenticationSASL):
                return self._sasl_start(msg.mechanisms)
            if isinstance(msg, OtherMessage) and msg.tag == b"R":
                code = int.from_bytes(msg.body[:4], "big")
                raise UpstreamAuthError(
                    f"the endpoint asked for an unknown authentication method (code {code}); "
                    f"lakeproxy supports {_SUPPORTED}"
                )
        elif state is _State.SASL_CONTINUE and isinstance(msg, AuthenticationSASLContinue):
            return self._sasl_continue(msg.data)
        elif state is _State.SASL_FINAL and isinstance(msg, AuthenticationSASLFinal):
            self._sasl_final(msg.data)
            return None
        raise UpstreamProtocolError(
            f"unexpected {type(msg).__name__} from the endpoint during authentication "
            f"(state {state.value})"
        )

    def _handle_startup(self, frame: bytes, msg: BackendMessage) -> Event | None:
        if isinstance(
            msg,
            AuthenticationOk
            | AuthenticationCleartextPassword
            | AuthenticationMD5Password
            | AuthenticationSASL
            | AuthenticationSASLContinue
            | AuthenticationSASLFinal
            | NegotiateProtocolVersion,
        ) or (isinstance(msg, OtherMessage) and msg.tag == b"R"):
            raise UpstreamProtocolError(
                f"unexpected {type(msg).__name__} from the endpoint after AuthenticationOk"
            )
        self._frames.append(frame)
        if isinstance(msg, BackendKeyData):
            self._backend_key = msg
            return None
        if isinstance(msg, ReadyForQuery):
            self._state = _State.DONE
            return Ready(
                startup_messages=list(self._frames),
                backend_key=self._backend_key,
                trailing=self._reader.trailing(),
                parameters=dict(self._parameters),
                protocol=self._protocol,
                auth_method=self._auth_method,
            )
        return None

    def _send_password(self, password: bytes) -> SendBytes:
        try:
            data = encode(PasswordMessage(password))
        except ValueError:
            raise UpstreamAuthError(
                "the credential cannot be sent as a password (it contains a NUL byte)"
            ) from None
        return SendBytes(data)

    def _sasl_start(self, offered: tuple[str, ...]) -> SendBytes:
        usable = [m for m in offered if m in (SCRAM_SHA_256, SCRAM_SHA_256_PLUS)]
        if self._channel_binding is None:
            usable = [m for m in usable if m != SCRAM_SHA_256_PLUS]
        if not usable:
            if SCRAM_SHA_256_PLUS in offered:
                raise UpstreamAuthError(
                    "the endpoint requires SCRAM-SHA-256-PLUS (channel binding) but the "
                    "certificate hash of this TLS connection is not available"
                )
            raise UpstreamAuthError(
                f"the endpoint offered SASL mechanisms {', '.join(offered) or '(none)'}; "
                f"lakeproxy supports {_SUPPORTED}"
            )
        binding = (
            (CHANNEL_BINDING_TYPE, self._channel_binding)
            if self._channel_binding is not None
            else None
        )
        # PostgreSQL ignores the SCRAM user name (it uses the startup "user");
        # scramp refuses an empty one, so send the role, or "*" if SASLprep rejects it.
        client: ScramClient | None = None
        error: Exception = ScramException("no user name")
        for name in (self._user, "*"):
            try:
                client = ScramClient(usable, name, self._password, channel_binding=binding)
                break
            except ScramException as exc:
                error = exc
        if client is None:
            raise UpstreamAuthError(
                f"cannot start SCRAM authentication: {_scram_reason(error)}"
            ) from None
        self._scram = client
        self._auth_method = client.mechanism_name
        first = client.get_client_first().encode()
        self._state = _State.SASL_CONTINUE
        return SendBytes(encode(SASLInitialResponse(client.mechanism_name, first)))

    def _sasl_continue(self, data: bytes) -> SendBytes:
        client = self._scram
        assert client is not None  # noqa: S101  (the state implies it)
        try:
            client.set_server_first(data.decode())
            final = client.get_client_final().encode()
        except (ScramException, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(
                f"SCRAM authentication failed: bad server-first-message: {_scram_reason(exc)}"
            ) from None
        self._state = _State.SASL_FINAL
        return SendBytes(encode(SASLResponse(final)))

    def _sasl_final(self, data: bytes) -> None:
        client = self._scram
        assert client is not None  # noqa: S101  (the state implies it)
        try:
            client.set_server_final(data.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(
                "SCRAM authentication failed: the endpoint's final message did not verify "
                f"({_scram_reason(exc)})"
            ) from None
        self._scram = None
        self._state = _State.SASL_OK


def _scram_reason(exc: Exception) -> str:
    """A short reason from a scramp/codec error (never contains the password)."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text[:200]
