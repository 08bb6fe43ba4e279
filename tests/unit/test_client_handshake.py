"""The client-side handshake state machine, driven with exact bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    CancelRequest,
    GSSENCRequest,
    NegotiateProtocolVersion,
    PasswordKind,
    PasswordMessage,
    SASLInitialResponse,
    SSLRequest,
    StartupMessage,
    encode,
)
from lakeproxy.wire.errors import ProtocolError

DATA = Path(__file__).parent.parent / "data" / "startup"
STARTUP = encode(StartupMessage(3, 0, {"user": "alice", "database": "db"}))


def _events(hs: ClientHandshake, data: bytes, *, bytewise: bool = False) -> list[Event]:
    out: list[Event] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        hs.receive_data(chunk)
        while (ev := hs.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


@pytest.mark.parametrize("bytewise", [False, True])
def test_plain_startup(bytewise: bool) -> None:
    hs = ClientHandshake()
    events = _events(hs, STARTUP, bytewise=bytewise)
    assert events == [StartupReceived(StartupMessage(3, 0, {"user": "alice", "database": "db"}),
                                      None)]
    assert hs.trailing_data() == b""


def test_ssl_request_then_startup() -> None:
    hs = ClientHandshake()
    assert _events(hs, encode(SSLRequest())) == [SSLRequested()]
    assert hs.answer_ssl(False) == b"N"
    [ev] = _events(hs, STARTUP)
    assert isinstance(ev, StartupReceived)


def test_gssenc_then_ssl_then_startup() -> None:
    hs = ClientHandshake()
    assert _events(hs, encode(GSSENCRequest())) == [GSSENCRequested()]
    assert hs.answer_gssenc() == b"N"
    assert _events(hs, encode(SSLRequest())) == [SSLRequested()]
    assert hs.answer_ssl(True) == b"S"
    [ev] = _events(hs, STARTUP)
    assert isinstance(ev, StartupReceived)


@pytest.mark.parametrize("request_msg", [SSLRequest(), GSSENCRequest()])
def test_early_bytes_after_encryption_request_are_a_violation(
    request_msg: SSLRequest | GSSENCRequest,
) -> None:
    hs = ClientHandshake()
    hs.receive_data(encode(request_msg) + STARTUP)
    with pytest.raises(ProtocolError, match="unencrypted data after") as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"


def test_second_ssl_request_is_a_violation() -> None:
    hs = ClientHandshake()
    _events(hs, encode(SSLRequest()))
    hs.answer_ssl(True)
    hs.receive_data(encode(SSLRequest()))
    with pytest.raises(ProtocolError, match="duplicate SSL"):
        hs.next_event()


def test_cancel_request() -> None:
    hs = ClientHandshake()
    req = CancelRequest(4242, b"\x01\x02\x03\x04")
    assert _events(hs, encode(req)) == [CancelRequested(req)]


@pytest.mark.parametrize("minor", [2, 9999])
def test_newer_minor_and_pq_options_are_negotiated_down(minor: int) -> None:
    hs = ClientHandshake()
    msg = StartupMessage(3, minor, {"user": "u", "_pq_.compression": "on", "database": "d"})
    [ev] = _events(hs, encode(msg))
    assert isinstance(ev, StartupReceived)
    assert ev.message == StartupMessage(3, 0, {"user": "u", "database": "d"})
    assert ev.negotiate == NegotiateProtocolVersion(0, ("_pq_.compression",))
    expected = encode(NegotiateProtocolVersion(0, ("_pq_.compression",)))
    assert negotiate_bytes(ev.negotiate) == expected


def test_protocol_2_is_refused() -> None:
    hs = ClientHandshake()
    packet = (16).to_bytes(4, "big") + (2 << 16).to_bytes(4, "big") + b"user\x00u\x00"
    hs.receive_data(packet[: 8] + b"\x00" * 8)
    with pytest.raises(ProtocolError) as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"


def test_oversized_startup_is_refused_before_the_body_arrives() -> None:
    hs = ClientHandshake()
    hs.receive_data((20_000).to_bytes(4, "big") + (3 << 16).to_bytes(4, "big"))
    with pytest.raises(ProtocolError) as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"


def test_password_after_startup_and_trailing_bytes_kept() -> None:
    hs = ClientHandshake()
    _events(hs, STARTUP)
    hs.expect_password(PasswordKind.PASSWORD)
    pw = encode(PasswordMessage(b"secret"))
    query = b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert _events(hs, pw + query) == [PasswordReceived(PasswordMessage(b"secret"))]
    assert hs.trailing_data() == query


def test_sasl_initial_response() -> None:
    hs = ClientHandshake()
    _events(hs, STARTUP)
    hs.expect_password(PasswordKind.SASL_INITIAL)
    msg = SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert _events(hs, encode(msg), bytewise=True) == [PasswordReceived(msg)]


def test_non_password_message_when_password_expected() -> None:
    hs = ClientHandshake()
    _events(hs, STARTUP)
    hs.expect_password(PasswordKind.PASSWORD)
    hs.receive_data(b"Q\x00\x00\x00\x0dSELECT 1\x00")
    with pytest.raises(ProtocolError, match="expected password"):
        hs.next_event()


@pytest.mark.parametrize("name", ["psql.bin", "psycopg.bin", "asyncpg.bin", "psycopg_3_2.bin"])
def test_real_client_captures(name: str) -> None:
    hs = ClientHandshake()
    [ev] = _events(hs, (DATA / name).read_bytes(), bytewise=True)
    assert isinstance(ev, StartupReceived)
    assert ev.message.major == 3
    assert ev.message.minor == 0
    assert "user" in ev.message.params
    assert (ev.negotiate is not None) == name.endswith("3_2.bin")
