"""The sans-I/O upstream login, driven by scripted server frames."""

from __future__ import annotations

import hashlib

import pytest
from scramp import ScramMechanism
from scramp.core import ScramServer

from lakeproxy.wire.codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordKind,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
    decode_password,
    decode_startup,
    encode,
    error_response,
)
from lakeproxy.wire.upstream_handshake import (
    NEED_DATA,
    Event,
    LoginError,
    Ready,
    SendBytes,
    UpstreamAuthError,
    UpstreamHandshake,
    UpstreamProtocolError,
    md5_password,
)

PASSWORD = "s3cr3t-t0ken.with.dots"
USER = "role_x"
CB = hashlib.sha256(b"pretend this is a DER certificate").digest()

AFTER_OK = [
    encode(ParameterStatus("server_version", "15.8")),
    encode(ParameterStatus("client_encoding", "UTF8")),
    encode(BackendKeyData(4242, b"\x01\x02\x03\x04")),
    encode(NoticeResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hello")))),
    encode(ReadyForQuery("I")),
]


class Feeder:
    """Feeds bytes whole or one byte at a time and collects events until NEED_DATA
    or the end of the handshake. Bytes left once it ended go to ``leftover``
    (the caller's job, like any bytes read after Ready)."""

    def __init__(self, *, bytewise: bool) -> None:
        self.bytewise = bytewise
        self.leftover = b""

    def __call__(self, hs: UpstreamHandshake, data: bytes) -> list[Event]:
        events: list[Event] = []
        chunks = [data[i : i + 1] for i in range(len(data))] if self.bytewise else [data]
        for chunk in chunks:
            if hs.finished:
                self.leftover += chunk
                continue
            hs.receive_data(chunk)
            while not hs.finished:
                ev = hs.next_event()
                if ev is NEED_DATA:
                    break
                events.append(ev)
        return events


@pytest.fixture(params=["whole", "bytewise"])
def feed(request: pytest.FixtureRequest) -> Feeder:
    return Feeder(bytewise=request.param == "bytewise")


def _single_send(events: list[Event]) -> bytes:
    assert len(events) == 1
    assert isinstance(events[0], SendBytes)
    return events[0].data


def _finish(feed: Feeder,
            hs: UpstreamHandshake, extra: bytes = b"") -> Ready:
    events = feed(hs, encode(AuthenticationOk()) + b"".join(AFTER_OK) + extra)
    assert len(events) == 1, events
    ready = events[0]
    assert isinstance(ready, Ready)
    return ready


def test_startup_message_overrides_user_and_keeps_params() -> None:
    hs = UpstreamHandshake(
        USER, PASSWORD, {"user": "client_user", "database": "db1", "application_name": "psql",
                         "options": "-c search_path=x"},
    )
    msg = decode_startup(hs.start())
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (3, 0)
    assert msg.params == {"user": USER, "database": "db1", "application_name": "psql",
                          "options": "-c search_path=x"}
    with pytest.raises(RuntimeError):
        hs.start()


def test_requested_protocol_version_is_sent() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {}, protocol=(3, 2))
    msg = decode_startup(hs.start())
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (3, 2)


def test_cleartext(feed: Feeder) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {"database": "d"})
    hs.start()
    sent = _single_send(feed(hs, encode(AuthenticationCleartextPassword())))
    assert decode_password(sent, PasswordKind.PASSWORD) == PasswordMessage(PASSWORD.encode())
    ready = _finish(feed, hs, extra=b"A\x00\x00\x00\x05")
    assert ready.trailing + feed.leftover == b"A\x00\x00\x00\x05"
    if not feed.bytewise:
        assert ready.trailing == b"A\x00\x00\x00\x05"
    assert ready.auth_method == "cleartext"
    assert ready.startup_messages == AFTER_OK
    assert ready.backend_key == BackendKeyData(4242, b"\x01\x02\x03\x04")
    assert ready.parameters == {"server_version": "15.8", "client_encoding": "UTF8"}
    assert ready.protocol == (3, 0)
    with pytest.raises(RuntimeError):
        hs.next_event()


def test_trust_login_without_password_request(
    feed: Feeder,
) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    ready = _finish(feed, hs)
    assert ready.auth_method == "trust"
    assert ready.trailing == b""


def test_md5_digest_known_value() -> None:
    # PostgreSQL stores md5 passwords as 'md5' || md5(password || user); for
    # user "postgres" with password "postgres" that is this well-known value.
    stored = "3175bce1d3201d16594cebf9d7eb3f9d"
    assert hashlib.md5(b"postgrespostgres").hexdigest() == stored  # noqa: S324
    salt = b"\x9a\x17\x00\xfe"
    expected = b"md5" + hashlib.md5(stored.encode() + salt).hexdigest().encode()  # noqa: S324
    assert md5_password("postgres", "postgres", salt) == expected


def test_md5(feed: Feeder) -> None:
    hs = UpstreamHandshake("postgres", "postgres", {})
    hs.start()
    salt = b"\x01\x02\x03\x04"
    sent = _single_send(feed(hs, encode(AuthenticationMD5Password(salt))))
    msg = decode_password(sent, PasswordKind.PASSWORD)
    assert isinstance(msg, PasswordMessage)
    inner = b"3175bce1d3201d16594cebf9d7eb3f9d"
    assert msg.password == b"md5" + hashlib.md5(inner + salt).hexdigest().encode()  # noqa: S324
    assert _finish(feed, hs).auth_method == "md5"


def _scram_server(mechanism: str, password: str = PASSWORD,
                  channel_binding: bytes | None = None) -> ScramServer:
    m = ScramMechanism(mechanism)
    info = m.make_auth_info(password)
    cb = ("tls-server-end-point", channel_binding) if channel_binding is not None else None
    return m.make_server(lambda _user: info, channel_binding=cb)


def _scram_exchange(
    feed: Feeder, hs: UpstreamHandshake,
    offered: tuple[str, ...], server_mech: str, server_cb: bytes | None,
) -> str:
    """Run SASL up to (and including) the server-final; return the mechanism used."""
    server = _scram_server(server_mech, channel_binding=server_cb)
    sent = _single_send(feed(hs, encode(AuthenticationSASL(offered))))
    first = decode_password(sent, PasswordKind.SASL_INITIAL)
    assert isinstance(first, SASLInitialResponse)
    assert first.data is not None
    server.set_client_first(first.data.decode())
    sent = _single_send(
        feed(hs, encode(AuthenticationSASLContinue(server.get_server_first().encode())))
    )
    final = decode_password(sent, PasswordKind.SASL_RESPONSE)
    assert isinstance(final, SASLResponse)
    server.set_client_final(final.data.decode())
    assert feed(hs, encode(AuthenticationSASLFinal(server.get_server_final().encode()))) == []
    return first.mechanism


def test_scram_sha_256(feed: Feeder) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    mech = _scram_exchange(feed, hs, ("SCRAM-SHA-256",), "SCRAM-SHA-256", None)
    assert mech == "SCRAM-SHA-256"
    assert _finish(feed, hs).auth_method == "SCRAM-SHA-256"


def test_scram_plus_preferred_with_channel_binding(
    feed: Feeder,
) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {}, channel_binding=CB)
    hs.start()
    mech = _scram_exchange(
        feed, hs, ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"), "SCRAM-SHA-256-PLUS", CB
    )
    assert mech == "SCRAM-SHA-256-PLUS"
    assert _finish(feed, hs).auth_method == "SCRAM-SHA-256-PLUS"


def test_scram_plus_binds_the_given_hash() -> None:
    """A server holding a different certificate hash rejects the proof."""
    hs = UpstreamHandshake(USER, PASSWORD, {}, channel_binding=CB)
    hs.start()
    server = _scram_server("SCRAM-SHA-256-PLUS", channel_binding=b"\x00" * 32)
    hs.receive_data(encode(AuthenticationSASL(("SCRAM-SHA-256-PLUS",))))
    ev = hs.next_event()
    assert isinstance(ev, SendBytes)
    first = decode_password(ev.data, PasswordKind.SASL_INITIAL)
    assert isinstance(first, SASLInitialResponse)
    assert first.data is not None
    assert first.data.startswith(b"p=tls-server-end-point,,")
    server.set_client_first(first.data.decode())
    hs.receive_data(encode(AuthenticationSASLContinue(server.get_server_first().encode())))
    ev = hs.next_event()
    assert isinstance(ev, SendBytes)
    final = decode_password(ev.data, PasswordKind.SASL_RESPONSE)
    assert isinstance(final, SASLResponse)
    with pytest.raises(Exception, match="channel bindings don't match"):
        server.set_client_final(final.data.decode())


def test_scram_without_binding_data_uses_plain_and_n_flag(
    feed: Feeder,
) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    sent = _single_send(feed(hs, encode(AuthenticationSASL(("SCRAM-SHA-256-PLUS",
                                                             "SCRAM-SHA-256")))))
    first = decode_password(sent, PasswordKind.SASL_INITIAL)
    assert isinstance(first, SASLInitialResponse)
    assert first.data is not None
    assert first.mechanism == "SCRAM-SHA-256"
    assert first.data.startswith(b"n,,")


def test_scram_with_binding_data_but_server_without_plus_sends_y(
    feed: Feeder,
) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {}, channel_binding=CB)
    hs.start()
    mech = _scram_exchange(feed, hs, ("SCRAM-SHA-256",), "SCRAM-SHA-256", None)
    assert mech == "SCRAM-SHA-256"
    assert _finish(feed, hs).auth_method == "SCRAM-SHA-256"


def test_scram_plus_only_without_binding_data_is_refused() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(encode(AuthenticationSASL(("SCRAM-SHA-256-PLUS",))))
    with pytest.raises(UpstreamAuthError, match="channel binding"):
        hs.next_event()
    assert hs.finished


def test_unknown_sasl_mechanism_is_refused() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(encode(AuthenticationSASL(("OAUTHBEARER",))))
    with pytest.raises(UpstreamAuthError, match="OAUTHBEARER") as info:
        hs.next_event()
    assert info.value.sqlstate == "08001"


def test_bad_server_signature_is_refused() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    server = _scram_server("SCRAM-SHA-256")
    hs.receive_data(encode(AuthenticationSASL(("SCRAM-SHA-256",))))
    ev = hs.next_event()
    assert isinstance(ev, SendBytes)
    first = decode_password(ev.data, PasswordKind.SASL_INITIAL)
    assert isinstance(first, SASLInitialResponse)
    assert first.data is not None
    server.set_client_first(first.data.decode())
    hs.receive_data(encode(AuthenticationSASLContinue(server.get_server_first().encode())))
    assert isinstance(hs.next_event(), SendBytes)
    forged = "v=" + "A" * 43 + "="
    hs.receive_data(encode(AuthenticationSASLFinal(forged.encode())))
    with pytest.raises(UpstreamAuthError, match="did not verify") as info:
        hs.next_event()
    assert PASSWORD not in str(info.value)


def test_ok_without_scram_final_is_refused() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    server = _scram_server("SCRAM-SHA-256")
    hs.receive_data(encode(AuthenticationSASL(("SCRAM-SHA-256",))))
    ev = hs.next_event()
    assert isinstance(ev, SendBytes)
    first = decode_password(ev.data, PasswordKind.SASL_INITIAL)
    assert isinstance(first, SASLInitialResponse)
    assert first.data is not None
    server.set_client_first(first.data.decode())
    hs.receive_data(encode(AuthenticationSASLContinue(server.get_server_first().encode())))
    assert isinstance(hs.next_event(), SendBytes)
    hs.receive_data(encode(AuthenticationOk()))
    with pytest.raises(UpstreamAuthError, match="prove"):
        hs.next_event()


@pytest.mark.parametrize(
    ("code", "name"), [(2, "KerberosV5"), (7, "GSSAPI"), (9, "SSPI"), (42, "code 42")]
)
def test_other_auth_methods_are_refused_clearly(code: int, name: str) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(b"R" + (8).to_bytes(4, "big") + code.to_bytes(4, "big"))
    with pytest.raises(UpstreamAuthError, match=name) as info:
        hs.next_event()
    assert "does not support" in str(info.value) or "unknown" in str(info.value)


def test_error_response_at_start(feed: Feeder) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {"database": "nope"})
    hs.start()
    raw = encode(error_response("3D000", 'database "nope" does not exist'))
    events = feed(hs, raw)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, LoginError)
    assert ev.raw_frame == raw
    assert ev.error.sqlstate == "3D000"
    assert hs.finished


def test_error_response_mid_scram(feed: Feeder) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    server = _scram_server("SCRAM-SHA-256", password="other")
    sent = _single_send(feed(hs, encode(AuthenticationSASL(("SCRAM-SHA-256",)))))
    first = decode_password(sent, PasswordKind.SASL_INITIAL)
    assert isinstance(first, SASLInitialResponse)
    assert first.data is not None
    server.set_client_first(first.data.decode())
    _single_send(feed(hs, encode(AuthenticationSASLContinue(server.get_server_first().encode()))))
    raw = encode(error_response("28P01", 'password authentication failed for user "role_x"'))
    events = feed(hs, raw)
    assert len(events) == 1
    assert isinstance(events[0], LoginError)
    assert events[0].raw_frame == raw
    assert events[0].error.sqlstate == "28P01"


def test_error_response_after_auth_ok(
    feed: Feeder,
) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    raw = encode(error_response("53300", "sorry, too many clients already"))
    events = feed(hs, encode(AuthenticationOk()) + AFTER_OK[0] + raw)
    assert len(events) == 1
    assert isinstance(events[0], LoginError)
    assert events[0].raw_frame == raw


def test_notices_and_negotiation_before_auth(
    feed: Feeder,
) -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {"_pq_.foo": "x"}, protocol=(3, 2))
    hs.start()
    notice = encode(NoticeResponse((("S", "NOTICE"), ("M", "waking up"))))
    status = encode(ParameterStatus("in_hot_standby", "off"))
    npv = encode(NegotiateProtocolVersion(0, ("_pq_.foo",)))
    sent = _single_send(
        feed(hs, npv + notice + status + encode(AuthenticationCleartextPassword()))
    )
    assert decode_password(sent, PasswordKind.PASSWORD) == PasswordMessage(PASSWORD.encode())
    assert hs.protocol == (3, 0)
    ready = _finish(feed, hs)
    assert ready.protocol == (3, 0)
    assert ready.startup_messages == [notice, status, *AFTER_OK]
    assert ready.parameters["in_hot_standby"] == "off"


def test_negotiate_to_a_newer_version_is_a_protocol_error() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(encode(NegotiateProtocolVersion(2)))
    with pytest.raises(UpstreamProtocolError, match="NegotiateProtocolVersion"):
        hs.next_event()


def test_unexpected_message_before_auth() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(encode(ReadyForQuery("I")))
    with pytest.raises(UpstreamProtocolError, match="ReadyForQuery"):
        hs.next_event()


def test_auth_request_after_ok_is_a_protocol_error() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(encode(AuthenticationOk()) + encode(AuthenticationCleartextPassword()))
    with pytest.raises(UpstreamProtocolError, match="after AuthenticationOk"):
        hs.next_event()


def test_malformed_frame() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(b"Z\x00\x00\x00\x05Q")  # ReadyForQuery with an invalid status
    with pytest.raises(UpstreamProtocolError, match="malformed") as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"


def test_oversized_frame_is_refused_before_the_body_arrives() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    hs.start()
    hs.receive_data(b"N\x7f\xff\xff\xff")
    with pytest.raises(UpstreamProtocolError):
        hs.next_event()


def test_next_event_before_start() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {})
    with pytest.raises(RuntimeError):
        hs.next_event()


def test_password_with_nul_is_refused_without_leaking() -> None:
    secret = "abc\x00def-very-secret"
    hs = UpstreamHandshake(USER, secret, {})
    hs.start()
    hs.receive_data(encode(AuthenticationCleartextPassword()))
    with pytest.raises(UpstreamAuthError, match="NUL") as info:
        hs.next_event()
    assert "very-secret" not in str(info.value)


def test_secrets_stay_out_of_reprs() -> None:
    hs = UpstreamHandshake(USER, PASSWORD, {}, channel_binding=CB)
    assert PASSWORD not in repr(hs)
    hs.start()
    hs.receive_data(encode(AuthenticationCleartextPassword()))
    ev = hs.next_event()
    assert isinstance(ev, SendBytes)
    assert PASSWORD.encode() in ev.data
    assert PASSWORD not in repr(ev)
