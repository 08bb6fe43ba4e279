"""Typed messages of the startup phase and their encode/decode functions.

Public API (stable; other modules code against it):

* frozen dataclasses, one per message;
* ``encode(msg) -> bytes`` for every message (frontend and backend);
* ``decode_startup(frame) -> StartupPacket`` for an untagged packet
  (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage);
* ``decode_backend(frame) -> BackendMessage`` for a complete tagged frame
  sent by a server during the startup phase (unknown tags -> ``OtherMessage``);
* ``decode_password(frame, expect) -> PasswordMessage | SASLInitialResponse |
  SASLResponse`` for a client's 'p' frame, disambiguated by what the server asked;
* :class:`FrameReader` (in :mod:`lakeproxy.wire.framing`) cuts frames out of a
  byte stream.

All decode functions raise only :class:`lakeproxy.wire.errors.ProtocolError`.
construct ``Container`` and ``ConstructError`` never leave this package.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, assert_never

from lakeproxy.wire import limits
from lakeproxy.wire import messages as m
from lakeproxy.wire.errors import ProtocolError

# --------------------------------------------------------------------------
# Frontend (client -> server), untagged startup packets


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256 bytes."""

    process_id: int
    secret: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """``params`` keeps the client's order. ``user`` is required on decode."""

    major: int
    minor: int
    params: dict[str, str]


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage

# --------------------------------------------------------------------------
# Frontend, tagged 'p' (its meaning depends on what the server asked for)


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """Cleartext or MD5 password (without the trailing NUL)."""

    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None = field(repr=False)  # None encodes as length -1


@dataclass(frozen=True, slots=True)
class SASLResponse:
    data: bytes = field(repr=False)


class PasswordKind(enum.Enum):
    """What the server asked for, which fixes how a 'p' frame is read."""

    PASSWORD = "password"  # noqa: S105  # after AuthenticationCleartextPassword / MD5
    SASL_INITIAL = "sasl_initial"  # after AuthenticationSASL
    SASL_RESPONSE = "sasl_response"  # after AuthenticationSASLContinue


FrontendAuthMessage = PasswordMessage | SASLInitialResponse | SASLResponse

# --------------------------------------------------------------------------
# Backend (server -> client), tagged


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    salt: bytes  # exactly 4 bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    process_id: int
    secret: bytes = field(repr=False)  # 4 bytes in 3.0, up to 256 in 3.2


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # 'I', 'T' or 'E'


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """``fields`` are (code, value) pairs in wire order, e.g. ('S', 'FATAL')."""

    fields: tuple[tuple[str, str], ...]

    def get(self, code: str, default: str = "") -> str:
        for k, v in self.fields:
            if k == code:
                return v
        return default

    @property
    def severity(self) -> str:
        return self.get("V") or self.get("S")

    @property
    def sqlstate(self) -> str:
        return self.get("C")

    @property
    def message(self) -> str:
        return self.get("M")


@dataclass(frozen=True, slots=True)
class NoticeResponse:
    fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class OtherMessage:
    """A well-framed backend message this codec does not interpret."""

    tag: bytes  # one byte
    body: bytes


BackendMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | NegotiateProtocolVersion
    | ErrorResponse
    | NoticeResponse
    | OtherMessage
)

Message = StartupPacket | FrontendAuthMessage | BackendMessage


def error_response(
    sqlstate: str, message: str, *, severity: str = "FATAL", hint: str | None = None,
    detail: str | None = None,
) -> ErrorResponse:
    """Build an ErrorResponse with the usual fields (S, V, C, M, then D/H)."""
    fields: list[tuple[str, str]] = [("S", severity), ("V", severity), ("C", sqlstate),
                                     ("M", message)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return ErrorResponse(tuple(fields))


# --------------------------------------------------------------------------
# Encoding

_U32_MAX: Final = 0xFFFF_FFFF
_MINOR_MAX: Final = 0xFFFF
_MIN_KEY: Final = 4
_READY_STATUSES: Final = frozenset({"I", "T", "E"})


def _check_text(what: str, value: str) -> None:
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL byte")


def _check_u32(what: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{what} is out of range for an unsigned Int32")


def _check_key(what: str, key: bytes) -> None:
    if not _MIN_KEY <= len(key) <= limits.MAX_CANCEL_KEY:
        raise ValueError(f"{what} must be {_MIN_KEY} to {limits.MAX_CANCEL_KEY} bytes long")


def _check_fields(fields: Iterable[tuple[str, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for code, value in fields:
        if len(code) != 1 or not "\x01" <= code <= "\x7f":
            raise ValueError("a field code must be one ASCII character other than NUL")
        _check_text("a field value", value)
        out.append((ord(code), value))
    return out


def _encode_startup(msg: StartupMessage) -> bytes:
    if not (0 <= msg.major <= 0xFFFF and 0 <= msg.minor <= 0xFFFF):
        raise ValueError("protocol version numbers must fit in 16 bits")
    if msg.major == limits.SSL_REQUEST_CODE >> 16:
        raise ValueError(f"protocol major version {msg.major} is reserved for request codes")
    for name, value in msg.params.items():
        if not name:
            raise ValueError("a startup parameter name must not be empty")
        _check_text("a startup parameter name", name)
        _check_text(f"startup parameter {name!r}", value)
    # Built with plain byte operations (the same bytes as STARTUP_MESSAGE.build,
    # a tenth of the CPU: this runs for every upstream login).
    body = b"".join(
        [b"%s\x00%s\x00" % (k.encode("utf8"), v.encode("utf8")) for k, v in msg.params.items()]
    )
    size = len(body) + 9
    data = b"".join([
        size.to_bytes(4, "big"), ((msg.major << 16) | msg.minor).to_bytes(4, "big"), body, b"\x00"
    ])
    if len(data) > limits.MAX_STARTUP_PACKET:
        raise ValueError(
            f"startup packet would be {len(data)} bytes, over the "
            f"{limits.MAX_STARTUP_PACKET}-byte limit"
        )
    return data


#: Messages without fields, built once by their schemas (~20 µs per build).
_SSL_REQUEST: Final = m.SSL_REQUEST.build(None)
_GSSENC_REQUEST: Final = m.GSSENC_REQUEST.build(None)
_AUTH_OK: Final = m.AUTH_OK.build(None)
_AUTH_CLEARTEXT_PASSWORD: Final = m.AUTH_CLEARTEXT_PASSWORD.build(None)


def encode(msg: Message) -> bytes:
    """Serialise any message as one complete frame.

    Returns:
        The frame's bytes, length (and tag byte, if any) included.

    Raises:
        ValueError: on a value the wire cannot carry (NUL inside a string, an
            empty startup parameter name, a key outside 4..256 bytes, an integer
            out of range, a startup packet over 10000 bytes, ...). The message
            never quotes a secret.
    """
    match msg:
        case SSLRequest():
            return _SSL_REQUEST
        case GSSENCRequest():
            return _GSSENC_REQUEST
        case CancelRequest(process_id=pid, secret=key):
            _check_u32("process_id", pid)
            _check_key("CancelRequest secret", key)
            return m.CANCEL_REQUEST.build((pid, key))
        case StartupMessage():
            return _encode_startup(msg)
        case PasswordMessage(password=password):
            if b"\x00" in password:
                raise ValueError("password contains a NUL byte")
            # = PASSWORD_MESSAGE.build(password), without construct (every login)
            return b"p" + (len(password) + 5).to_bytes(4, "big") + bytes(password) + b"\x00"
        case SASLInitialResponse(mechanism=mechanism, data=data):
            _check_text("SASL mechanism", mechanism)
            return m.SASL_INITIAL_RESPONSE.build((mechanism, data))
        case SASLResponse(data=data):
            return m.SASL_RESPONSE.build(data)
        case AuthenticationOk():
            return _AUTH_OK
        case AuthenticationCleartextPassword():
            return _AUTH_CLEARTEXT_PASSWORD
        case AuthenticationMD5Password(salt=salt):
            if len(salt) != 4:
                raise ValueError("MD5 salt must be exactly 4 bytes")
            return m.AUTH_MD5_PASSWORD.build(salt)
        case AuthenticationSASL(mechanisms=mechanisms):
            for mech in mechanisms:
                if not mech:
                    raise ValueError("a SASL mechanism name must not be empty")
                _check_text("SASL mechanism", mech)
            return m.AUTH_SASL.build(list(mechanisms))
        case AuthenticationSASLContinue(data=data):
            return m.AUTH_SASL_CONTINUE.build(data)
        case AuthenticationSASLFinal(data=data):
            return m.AUTH_SASL_FINAL.build(data)
        case ParameterStatus(name=name, value=value):
            _check_text("parameter name", name)
            _check_text(f"parameter {name!r}", value)
            return m.PARAMETER_STATUS.build((name, value))
        case BackendKeyData(process_id=pid, secret=key):
            _check_u32("process_id", pid)
            _check_key("BackendKeyData secret", key)
            # = BACKEND_KEY_DATA.build((pid, key)), without construct (every login)
            return b"K" + (len(key) + 8).to_bytes(4, "big") + pid.to_bytes(4, "big") + bytes(key)
        case ReadyForQuery(status=status):
            if status not in _READY_STATUSES:
                raise ValueError("ReadyForQuery status must be 'I', 'T' or 'E'")
            return m.READY_FOR_QUERY.build(status.encode("ascii"))
        case NegotiateProtocolVersion(newest_minor=newest, unrecognized=options):
            if not 0 <= newest <= _MINOR_MAX:
                raise ValueError("newest_minor is out of range for a protocol minor version")
            for option in options:
                _check_text("protocol option name", option)
            # On the wire: the whole version number, 3.x (libpq refuses "pre-3.0").
            version = (limits.PROTOCOL_3_0 >> 16) << 16 | newest
            return m.NEGOTIATE_PROTOCOL_VERSION.build((version, list(options)))
        case ErrorResponse(fields=fields):
            return m.ERROR_RESPONSE.build(_check_fields(fields))
        case NoticeResponse(fields=fields):
            return m.NOTICE_RESPONSE.build(_check_fields(fields))
        case OtherMessage(tag=tag, body=body):
            if len(tag) != 1:
                raise ValueError("a message tag is exactly one byte")
            return m.ANY_TAGGED.build((tag, body))
        case _:
            assert_never(msg)


# --------------------------------------------------------------------------
# Decoding


def _startup_params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise ProtocolError(f"duplicate startup parameter {name!r}")
        params[name] = value
    return params


def _startup_pairs(frame: bytes) -> list[tuple[str, str]] | None:
    """A well-formed StartupMessage's parameters, read with plain byte
    operations: construct's RepeatUntil took ~170 µs of CPU per client login
    (benchmarks/README.md). None for anything not exactly well formed
    (including invalid UTF-8): the construct schema then decides, and raises."""
    if type(frame) is not bytes or len(frame) < 9 or frame[-1:] != b"\x00":
        return None
    # name NUL value NUL ... name NUL value NUL, then the terminating NUL
    parts = frame[8:-1].split(b"\x00")
    if parts.pop() != b"" or len(parts) % 2:
        return None
    try:
        texts = [p.decode("utf8") for p in parts]
    except UnicodeDecodeError:
        return None
    names, values = texts[0::2], texts[1::2]
    if "" in names:  # an empty name ends the list early: bytes would follow it
        return None
    return list(zip(names, values, strict=True))


def decode_startup(frame: bytes) -> StartupPacket:
    """Decode one complete untagged packet (its 4-byte length included).

    Returns:
        SSLRequest, GSSENCRequest, CancelRequest or StartupMessage (protocol 3.x,
        any minor version: negotiating it down is the handshake's job).

    Raises:
        ProtocolError: 08P01 for a malformed packet, a length field that does not
            match the frame, a packet over 10000 bytes, protocol 2.x or any other
            unsupported major version, an unknown request code, a cancel key
            outside 4..256 bytes, a duplicate parameter or invalid UTF-8;
            28000 when the StartupMessage names no ``user``.
    """
    if len(frame) < 8:
        raise ProtocolError("invalid length of startup packet")
    length = int.from_bytes(frame[:4], "big")
    if length > limits.MAX_STARTUP_PACKET:
        raise ProtocolError(
            f"startup packet of {length} bytes exceeds the {limits.MAX_STARTUP_PACKET}-byte limit"
        )
    if length != len(frame):
        raise ProtocolError("invalid length of startup packet")
    code = int.from_bytes(frame[4:8], "big")
    if code == limits.SSL_REQUEST_CODE:
        m.SSL_REQUEST.parse(frame)
        return SSLRequest()
    if code == limits.GSSENC_REQUEST_CODE:
        m.GSSENC_REQUEST.parse(frame)
        return GSSENCRequest()
    if code == limits.CANCEL_REQUEST_CODE:
        pid, key = m.CANCEL_REQUEST.parse(frame)
        if not _MIN_KEY <= len(key) <= limits.MAX_CANCEL_KEY:
            raise ProtocolError("invalid length of cancel request key")
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major == limits.SSL_REQUEST_CODE >> 16:
        raise ProtocolError(f"unsupported request code {major}.{minor}")
    if major != limits.PROTOCOL_3_0 >> 16:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2"
        )
    pairs = _startup_pairs(frame)
    if pairs is None:
        _, pairs = m.STARTUP_MESSAGE.parse(frame)
    # No "user" is not an error here: node-postgres with $USER unset sends none,
    # and the proxy replaces the user name anyway. A server that needs one (the
    # emulator's front door, PostgreSQL) says so itself.
    return StartupMessage(major, minor, _startup_params(pairs))


def _fields(pairs: list[tuple[int, str]]) -> tuple[tuple[str, str], ...]:
    if any(code > 0x7F for code, _ in pairs):
        raise ProtocolError("non-ASCII field code in error or notice message")
    return tuple((chr(code), value) for code, value in pairs)


def _decode_authentication(frame: bytes) -> BackendMessage:
    if len(frame) < 9:
        raise ProtocolError("malformed Authentication message")
    code = int.from_bytes(frame[5:9], "big")
    if code == limits.AUTH_OK:
        m.AUTH_OK.parse(frame)
        return AuthenticationOk()
    if code == limits.AUTH_CLEARTEXT_PASSWORD:
        m.AUTH_CLEARTEXT_PASSWORD.parse(frame)
        return AuthenticationCleartextPassword()
    if code == limits.AUTH_MD5_PASSWORD:
        return AuthenticationMD5Password(m.AUTH_MD5_PASSWORD.parse(frame))
    if code == limits.AUTH_SASL:
        return AuthenticationSASL(tuple(m.AUTH_SASL.parse(frame)))
    if code == limits.AUTH_SASL_CONTINUE:
        return AuthenticationSASLContinue(m.AUTH_SASL_CONTINUE.parse(frame))
    if code == limits.AUTH_SASL_FINAL:
        return AuthenticationSASLFinal(m.AUTH_SASL_FINAL.parse(frame))
    # GSS, SSPI, Kerberos, ...: well framed, but not ours to interpret.
    return OtherMessage(b"R", frame[5:])


def _check_tagged_length(frame: bytes) -> None:
    if len(frame) < 5:
        raise ProtocolError("incomplete message")
    if int.from_bytes(frame[1:5], "big") != len(frame) - 1:
        raise ProtocolError("message length does not match the frame")


def _decode_common(tag: bytes, frame: bytes) -> BackendMessage | None:
    """The well-formed messages every login receives (a dozen ParameterStatus,
    BackendKeyData, ReadyForQuery, AuthenticationOk, the cleartext password
    request), read with plain byte
    operations: construct took ~0.8 ms of CPU per upstream login (a fifth of
    lakeproxy's cost per new connection, benchmarks/README.md). Returns None
    for anything else, or anything not exactly well formed: the construct
    schemas then decide (and raise their errors)."""
    if type(frame) is not bytes:
        return None
    if tag == b"S":
        body = frame[5:]
        if body[-1:] == b"\x00" and body.count(b"\x00") == 2:
            name, value, _ = body.split(b"\x00")
            try:
                return ParameterStatus(name.decode("utf8"), value.decode("utf8"))
            except UnicodeDecodeError:
                return None
        return None
    if tag == b"Z":
        if len(frame) == 6:
            status = chr(frame[5])
            if status in _READY_STATUSES:
                return ReadyForQuery(status)
        return None
    if tag == b"K":
        if _MIN_KEY <= len(frame) - 9 <= limits.MAX_CANCEL_KEY:
            return BackendKeyData(int.from_bytes(frame[5:9], "big"), frame[9:])
        return None
    if tag == b"R" and len(frame) == 9:
        code = frame[5:9]
        if code == _AUTH_OK_CODE:
            return AuthenticationOk()
        if code == _AUTH_CLEARTEXT_CODE:
            return AuthenticationCleartextPassword()
    return None


_AUTH_OK_CODE: Final = limits.AUTH_OK.to_bytes(4, "big")
_AUTH_CLEARTEXT_CODE: Final = limits.AUTH_CLEARTEXT_PASSWORD.to_bytes(4, "big")


def decode_backend(frame: bytes) -> BackendMessage:
    """Decode one complete tagged backend frame (tag + length + body).

    Returns:
        The message; ``OtherMessage(tag, body)`` for a tag (or an Authentication
        request code, e.g. GSS = 7) this codec does not interpret.

    Raises:
        ProtocolError: 08P01 when the frame is malformed, its length field does
            not match, a BackendKeyData secret is outside 4..256 bytes, a
            ReadyForQuery status is not I/T/E, or a string is not UTF-8.
    """
    _check_tagged_length(frame)
    tag = frame[:1]
    fast = _decode_common(tag, frame)
    if fast is not None:
        return fast
    if tag == b"R":
        return _decode_authentication(frame)
    if tag == b"S":
        return ParameterStatus(*m.PARAMETER_STATUS.parse(frame))
    if tag == b"K":
        pid, key = m.BACKEND_KEY_DATA.parse(frame)
        if not _MIN_KEY <= len(key) <= limits.MAX_CANCEL_KEY:
            raise ProtocolError("invalid length of BackendKeyData secret key")
        return BackendKeyData(pid, key)
    if tag == b"Z":
        status = m.READY_FOR_QUERY.parse(frame).decode("latin1")
        if status not in _READY_STATUSES:
            raise ProtocolError("invalid ReadyForQuery status")
        return ReadyForQuery(status)
    if tag == b"E":
        return ErrorResponse(_fields(m.ERROR_RESPONSE.parse(frame)))
    if tag == b"N":
        return NoticeResponse(_fields(m.NOTICE_RESPONSE.parse(frame)))
    if tag == b"v":
        version, options = m.NEGOTIATE_PROTOCOL_VERSION.parse(frame)
        if version >> 16 != limits.PROTOCOL_3_0 >> 16:
            raise ProtocolError(
                f"malformed NegotiateProtocolVersion: version {version >> 16}.{version & 0xFFFF}"
            )
        return NegotiateProtocolVersion(version & _MINOR_MAX, tuple(options))
    tag, body = m.ANY_TAGGED.parse(frame)
    return OtherMessage(tag, body)


def decode_password(frame: bytes, expect: PasswordKind) -> FrontendAuthMessage:
    """Decode one complete 'p' frame according to what the server asked.

    Returns:
        PasswordMessage, SASLInitialResponse or SASLResponse, per ``expect``.

    Raises:
        ProtocolError: 08P01 when the tag is not 'p', the length field does not
            match, or the body does not have the expected layout.
    """
    _check_tagged_length(frame)
    if frame[:1] != b"p":
        raise ProtocolError(f"expected password response, got message type {frame[0]}")
    match expect:
        case PasswordKind.PASSWORD:
            return PasswordMessage(m.PASSWORD_MESSAGE.parse(frame))
        case PasswordKind.SASL_INITIAL:
            mechanism, data = m.SASL_INITIAL_RESPONSE.parse(frame)
            return SASLInitialResponse(mechanism, data)
        case PasswordKind.SASL_RESPONSE:
            return SASLResponse(m.SASL_RESPONSE.parse(frame))
        case _:
            assert_never(expect)
