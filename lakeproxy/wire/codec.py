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
from dataclasses import dataclass, field

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

    PASSWORD = "password"  # after AuthenticationCleartextPassword / MD5Password
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


def encode(msg: Message) -> bytes:
    """Serialise any message. Raises ValueError on a value the wire cannot carry
    (NUL inside a string, key longer than 256 bytes, ...)."""
    raise NotImplementedError


def decode_startup(frame: bytes) -> StartupPacket:
    """Decode one complete untagged packet (its 4-byte length included)."""
    raise NotImplementedError


def decode_backend(frame: bytes) -> BackendMessage:
    """Decode one complete tagged backend frame (tag + length + body)."""
    raise NotImplementedError


def decode_password(frame: bytes, expect: PasswordKind) -> FrontendAuthMessage:
    """Decode one complete 'p' frame according to what the server asked."""
    raise NotImplementedError
