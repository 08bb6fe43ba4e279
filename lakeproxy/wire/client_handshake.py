"""The proxy acting as a *server* to a local client, up to the StartupMessage.

Sans-I/O, h11-style: feed bytes with :meth:`ClientHandshake.receive_data`, pull
events with :meth:`ClientHandshake.next_event` until it returns
:data:`NEED_DATA`, and write the bytes the ``answer_*`` methods return.

Rules enforced here (PostgreSQL's postmaster and PgBouncer behave alike):

* SSLRequest and GSSENCRequest may each come once, before the StartupMessage;
  a client that sent more bytes before reading the one-byte answer is breaking
  the protocol ("received unencrypted data after SSL request").
* Startup packets are at most 10 000 bytes; protocol 2 and unknown request
  codes are refused with 08P01.
* A newer 3.x minor version or ``_pq_.`` options get a NegotiateProtocolVersion
  and the session continues at 3.0; the ``_pq_.`` options are removed.
* After the StartupMessage the handshake may go on with password messages
  (tagged frames), asked for with :meth:`expect_password`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from lakeproxy.wire import limits
from lakeproxy.wire.codec import (
    CancelRequest,
    FrontendAuthMessage,
    GSSENCRequest,
    NegotiateProtocolVersion,
    PasswordKind,
    SSLRequest,
    StartupMessage,
    decode_password,
    decode_startup,
    encode,
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA

#: Largest password/SASL message a client may send.
MAX_PASSWORD_MESSAGE: Final = 8192


@dataclass(frozen=True, slots=True)
class SSLRequested:
    """Answer with :meth:`ClientHandshake.answer_ssl`."""


@dataclass(frozen=True, slots=True)
class GSSENCRequested:
    """Answer with :meth:`ClientHandshake.answer_gssenc` (always 'N' here)."""


@dataclass(frozen=True, slots=True)
class CancelRequested:
    request: CancelRequest


@dataclass(frozen=True, slots=True)
class StartupReceived:
    """``message`` has any ``_pq_.`` options removed; ``negotiate`` is what the
    client must be sent (after authentication succeeds) when it asked for more
    than 3.0, else None."""

    message: StartupMessage
    negotiate: NegotiateProtocolVersion | None


@dataclass(frozen=True, slots=True)
class PasswordReceived:
    message: FrontendAuthMessage


Event = SSLRequested | GSSENCRequested | CancelRequested | StartupReceived | PasswordReceived


class _State(enum.Enum):
    STARTUP = "startup"  # waiting for an untagged startup packet
    ANSWER_PENDING = "answer_pending"  # SSLRequest/GSSENCRequest not answered yet
    STARTED = "started"  # StartupMessage received
    PASSWORD = "password"  # noqa: S105 - waiting for a 'p' frame
    DONE = "done"  # CancelRequest received, nothing more to read


class ClientHandshake:
    """State machine for one client's startup phase."""

    def __init__(self) -> None:
        self._reader = FrameReader(tagged=False, max_length=limits.MAX_STARTUP_PACKET)
        self._state = _State.STARTUP
        self._ssl_done = False
        self._gss_done = False
        self._password_kind = PasswordKind.PASSWORD

    @property
    def encrypted_upgrade_pending(self) -> bool:
        return self._state is _State.ANSWER_PENDING

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the client."""
        self._reader.feed(data)

    def next_event(self) -> Event | _NeedData:
        """Return the next complete event, or NEED_DATA.

        Raises:
            ProtocolError: the client broke the protocol (carries the SQLSTATE).
        """
        state = self._state
        if state is _State.STARTUP:
            frame = self._reader.next_frame()
            if frame is None:
                return NEED_DATA
            return self._startup_packet(frame)
        if state is _State.PASSWORD:
            frame = self._reader.next_frame()
            if frame is None:
                return NEED_DATA
            if frame[:1] != b"p":
                raise ProtocolError(f"expected password response, got message type {frame[:1]!r}")
            self._state = _State.STARTED
            return PasswordReceived(decode_password(frame, self._password_kind))
        # ANSWER_PENDING (the caller owes the one-byte answer), STARTED, DONE.
        return NEED_DATA

    def _startup_packet(self, frame: bytes) -> Event:
        packet = decode_startup(frame)
        if isinstance(packet, SSLRequest | GSSENCRequest):
            is_ssl = isinstance(packet, SSLRequest)
            if (self._ssl_done if is_ssl else self._gss_done):
                kind = "SSL" if is_ssl else "GSSAPI encryption"
                raise ProtocolError(f"duplicate {kind} request")
            if self._reader.buffered:
                kind = "SSL" if is_ssl else "GSSAPI encryption"
                raise ProtocolError(f"received unencrypted data after {kind} request")
            self._state = _State.ANSWER_PENDING
            if is_ssl:
                self._ssl_done = True
                return SSLRequested()
            self._gss_done = True
            return GSSENCRequested()
        if isinstance(packet, CancelRequest):
            self._state = _State.DONE
            return CancelRequested(packet)
        return self._startup_message(packet)

    def _startup_message(self, msg: StartupMessage) -> StartupReceived:
        self._state = _State.STARTED
        self._reader.set_mode(tagged=True, max_length=MAX_PASSWORD_MESSAGE)
        unrecognized = tuple(k for k in msg.params if k.startswith("_pq_."))
        negotiate = None
        if msg.minor > 0 or unrecognized:
            negotiate = NegotiateProtocolVersion(0, unrecognized)
        if unrecognized or msg.minor > 0:
            params = {k: v for k, v in msg.params.items() if not k.startswith("_pq_.")}
            msg = StartupMessage(3, 0, params)
        return StartupReceived(msg, negotiate)

    def answer_ssl(self, accept: bool) -> bytes:
        """Return the one-byte answer to an SSLRequest ('S' or 'N').

        After 'S' the caller performs the TLS handshake and then feeds the
        decrypted bytes to :meth:`receive_data`.
        """
        if self._state is not _State.ANSWER_PENDING:
            raise RuntimeError("no SSLRequest to answer")
        self._state = _State.STARTUP
        return b"S" if accept else b"N"

    def answer_gssenc(self) -> bytes:
        """GSSAPI encryption is not offered: always 'N'."""
        if self._state is not _State.ANSWER_PENDING:
            raise RuntimeError("no GSSENCRequest to answer")
        self._state = _State.STARTUP
        return b"N"

    def expect_password(self, kind: PasswordKind) -> None:
        """The caller sent an authentication request; read the next 'p' frame as ``kind``."""
        if self._state is not _State.STARTED:
            raise RuntimeError("password expected before the StartupMessage")
        self._password_kind = kind
        self._state = _State.PASSWORD

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake's last message, to be sent upstream first."""
        return self._reader.trailing()


def negotiate_bytes(negotiate: NegotiateProtocolVersion | None) -> bytes:
    """Encoded NegotiateProtocolVersion, or b'' when none is owed."""
    return encode(negotiate) if negotiate is not None else b""
