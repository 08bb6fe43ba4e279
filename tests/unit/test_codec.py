"""The startup-phase codec: exact bytes both ways, real client captures, errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lakeproxy.wire import limits
from lakeproxy.wire.codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    CancelRequest,
    ErrorResponse,
    GSSENCRequest,
    Message,
    NegotiateProtocolVersion,
    NoticeResponse,
    OtherMessage,
    ParameterStatus,
    PasswordKind,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    decode_backend,
    decode_password,
    decode_startup,
    encode,
    error_response,
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

DATA = Path(__file__).resolve().parent.parent / "data" / "startup"

Decoder = Callable[[bytes], Message]


def _password(kind: PasswordKind) -> Decoder:
    def decode(frame: bytes) -> Message:
        return decode_password(frame, kind)

    return decode


PASSWORD = _password(PasswordKind.PASSWORD)
SASL_INITIAL = _password(PasswordKind.SASL_INITIAL)
SASL_RESPONSE = _password(PasswordKind.SASL_RESPONSE)


def untagged(body: bytes) -> bytes:
    """Frame ``body`` (code + payload) by hand: Int32 length including itself."""
    return (len(body) + 4).to_bytes(4, "big") + body


def tagged(tag: bytes, body: bytes) -> bytes:
    """Frame ``body`` by hand: tag byte, then Int32 length including itself."""
    return tag + (len(body) + 4).to_bytes(4, "big") + body


def i32(n: int) -> bytes:
    return n.to_bytes(4, "big", signed=True)


@dataclass(frozen=True)
class Case:
    id: str
    wire: bytes
    msg: Message
    decode: Decoder

    @property
    def tagged(self) -> bool:
        return self.decode is not decode_startup


V3_0 = b"\x00\x03\x00\x00"
V3_2 = b"\x00\x03\x00\x02"
SCRAM = b"SCRAM-SHA-256\x00"

CASES: list[Case] = [
    # ---- untagged, client -> server
    Case("ssl", b"\x00\x00\x00\x08\x04\xd2\x16\x2f", SSLRequest(), decode_startup),
    Case("gssenc", b"\x00\x00\x00\x08\x04\xd2\x16\x30", GSSENCRequest(), decode_startup),
    Case(
        "cancel-3.0",
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef",
        CancelRequest(12345, b"\xde\xad\xbe\xef"),
        decode_startup,
    ),
    Case(
        "cancel-3.2-32",
        b"\x00\x00\x00\x2c\x04\xd2\x16\x2e\x00\x00\x30\x39" + bytes(range(32)),
        CancelRequest(12345, bytes(range(32))),
        decode_startup,
    ),
    Case(
        "cancel-3.2-256",
        b"\x00\x00\x01\x0c\x04\xd2\x16\x2e\xff\xff\xff\xff" + bytes(range(256)),
        CancelRequest(0xFFFFFFFF, bytes(range(256))),
        decode_startup,
    ),
    Case(
        "startup-user",
        b"\x00\x00\x00\x14" + V3_0 + b"user\x00alice\x00\x00",
        StartupMessage(3, 0, {"user": "alice"}),
        decode_startup,
    ),
    Case(
        "startup-3.0",
        b"\x00\x00\x00\x31"
        + V3_0
        + b"user\x00alice\x00database\x00shop\x00options\x00-c x=1\x00\x00",
        StartupMessage(3, 0, {"user": "alice", "database": "shop", "options": "-c x=1"}),
        decode_startup,
    ),
    Case(
        "startup-3.2-empty-value",
        b"\x00\x00\x00\x1c" + V3_2 + b"user\x00bob\x00_pq_.foo\x00\x00\x00",
        StartupMessage(3, 2, {"user": "bob", "_pq_.foo": ""}),
        decode_startup,
    ),
    Case(
        "startup-utf8",
        b"\x00\x00\x00\x13" + V3_0 + b"user\x00zo\xc3\xab\x00\x00",
        StartupMessage(3, 0, {"user": "zo\u00eb"}),
        decode_startup,
    ),
    Case(
        "startup-3.9999",
        b"\x00\x00\x00\x10\x00\x03\x27\x0fuser\x00a\x00\x00",
        StartupMessage(3, 9999, {"user": "a"}),
        decode_startup,
    ),
    # ---- tagged 'p', client -> server
    Case("password", b"p\x00\x00\x00\x0chunter2\x00", PasswordMessage(b"hunter2"), PASSWORD),
    Case("password-empty", b"p\x00\x00\x00\x05\x00", PasswordMessage(b""), PASSWORD),
    Case(
        "password-md5",
        tagged(b"p", b"md5" + b"0123456789abcdef" * 2 + b"\x00"),
        PasswordMessage(b"md5" + b"0123456789abcdef" * 2),
        PASSWORD,
    ),
    Case(
        "sasl-initial",
        b"p\x00\x00\x00\x21" + SCRAM + b"\x00\x00\x00\x0bn,,n=,r=abc",
        SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
        SASL_INITIAL,
    ),
    Case(
        "sasl-initial-none",
        b"p\x00\x00\x00\x16" + SCRAM + b"\xff\xff\xff\xff",
        SASLInitialResponse("SCRAM-SHA-256", None),
        SASL_INITIAL,
    ),
    Case(
        "sasl-initial-empty",
        b"p\x00\x00\x00\x0aX\x00\x00\x00\x00\x00",
        SASLInitialResponse("X", b""),
        SASL_INITIAL,
    ),
    Case(
        "sasl-response",
        b"p\x00\x00\x00\x16c=biws,r=abc,p=xyz",
        SASLResponse(b"c=biws,r=abc,p=xyz"),
        SASL_RESPONSE,
    ),
    Case("sasl-response-empty", b"p\x00\x00\x00\x04", SASLResponse(b""), SASL_RESPONSE),
    # ---- tagged, server -> client
    Case("auth-ok", b"R\x00\x00\x00\x08\x00\x00\x00\x00", AuthenticationOk(), decode_backend),
    Case(
        "auth-cleartext",
        b"R\x00\x00\x00\x08\x00\x00\x00\x03",
        AuthenticationCleartextPassword(),
        decode_backend,
    ),
    Case(
        "auth-md5",
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
        AuthenticationMD5Password(b"\x01\x02\x03\x04"),
        decode_backend,
    ),
    Case(
        "auth-sasl",
        b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00" + SCRAM + b"\x00",
        AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        decode_backend,
    ),
    Case(
        "auth-sasl-one",
        b"R\x00\x00\x00\x17\x00\x00\x00\x0a" + SCRAM + b"\x00",
        AuthenticationSASL(("SCRAM-SHA-256",)),
        decode_backend,
    ),
    Case(
        "auth-sasl-continue",
        b"R\x00\x00\x00\x1f\x00\x00\x00\x0br=abc,s=c2FsdA==,i=4096",
        AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096"),
        decode_backend,
    ),
    Case(
        "auth-sasl-final",
        b"R\x00\x00\x00\x0d\x00\x00\x00\x0cv=xyz",
        AuthenticationSASLFinal(b"v=xyz"),
        decode_backend,
    ),
    Case(
        "auth-gss-other",
        b"R\x00\x00\x00\x08\x00\x00\x00\x07",
        OtherMessage(b"R", b"\x00\x00\x00\x07"),
        decode_backend,
    ),
    Case(
        "parameter-status",
        b"S\x00\x00\x00\x18server_version\x0016.4\x00",
        ParameterStatus("server_version", "16.4"),
        decode_backend,
    ),
    Case(
        "parameter-status-empty",
        tagged(b"S", b"application_name\x00\x00"),
        ParameterStatus("application_name", ""),
        decode_backend,
    ),
    Case(
        "backend-key-3.0",
        b"K\x00\x00\x00\x0c\x00\x00\x10\x92\x0a\x0b\x0c\x0d",
        BackendKeyData(4242, b"\x0a\x0b\x0c\x0d"),
        decode_backend,
    ),
    Case(
        "backend-key-3.2",
        b"K\x00\x00\x00\x28\x00\x00\x10\x92" + bytes(range(32)),
        BackendKeyData(4242, bytes(range(32))),
        decode_backend,
    ),
    Case("ready-idle", b"Z\x00\x00\x00\x05I", ReadyForQuery("I"), decode_backend),
    Case("ready-tx", b"Z\x00\x00\x00\x05T", ReadyForQuery("T"), decode_backend),
    Case("ready-failed", b"Z\x00\x00\x00\x05E", ReadyForQuery("E"), decode_backend),
    Case(
        "error",
        tagged(
            b"E",
            b'SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed for user "alice"'
            b"\x00Fauth.c\x00L326\x00Rauth_failed\x00\x00",
        ),
        ErrorResponse(
            (
                ("S", "FATAL"),
                ("V", "FATAL"),
                ("C", "28P01"),
                ("M", 'password authentication failed for user "alice"'),
                ("F", "auth.c"),
                ("L", "326"),
                ("R", "auth_failed"),
            )
        ),
        decode_backend,
    ),
    Case("error-empty", b"E\x00\x00\x00\x05\x00", ErrorResponse(()), decode_backend),
    Case(
        "error-built",
        tagged(b"E", b"SFATAL\x00VFATAL\x00C08P01\x00Mlakeproxy: bad\x00Hfix it\x00\x00"),
        error_response("08P01", "lakeproxy: bad", hint="fix it"),
        decode_backend,
    ),
    Case(
        "notice",
        b"N\x00\x00\x00\x19SWARNING\x00C01000\x00Mhi\x00\x00",
        NoticeResponse((("S", "WARNING"), ("C", "01000"), ("M", "hi"))),
        decode_backend,
    ),
    Case(
        "negotiate",
        b"v\x00\x00\x00\x15\x00\x03\x00\x00\x00\x00\x00\x01_pq_.foo\x00",
        NegotiateProtocolVersion(0, ("_pq_.foo",)),
        decode_backend,
    ),
    Case(
        "negotiate-none",
        b"v\x00\x00\x00\x0c\x00\x03\x00\x02\x00\x00\x00\x00",
        NegotiateProtocolVersion(2),
        decode_backend,
    ),
    Case(
        "other-notification",
        tagged(b"A", b"\x00\x00\x00\x01chan\x00payload\x00"),
        OtherMessage(b"A", b"\x00\x00\x00\x01chan\x00payload\x00"),
        decode_backend,
    ),
]


def _reader(case: Case) -> FrameReader:
    if case.tagged:
        return FrameReader(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
    return FrameReader(tagged=False, max_length=limits.MAX_STARTUP_PACKET)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_encode_gives_exact_bytes(case: Case) -> None:
    assert encode(case.msg) == case.wire


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_gives_message(case: Case) -> None:
    assert case.decode(case.wire) == case.msg


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_frame_reader_whole(case: Case) -> None:
    reader = _reader(case)
    reader.feed(case.wire)
    frame = reader.next_frame()
    assert frame == case.wire
    assert reader.next_frame() is None
    assert reader.buffered == 0
    assert frame is not None
    assert case.decode(frame) == case.msg


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_frame_reader_one_byte_at_a_time(case: Case) -> None:
    reader = _reader(case)
    frames: list[bytes] = []
    for i in range(len(case.wire)):
        reader.feed(case.wire[i : i + 1])
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
        if i < len(case.wire) - 1:
            assert frames == []
    assert frames == [case.wire]
    assert case.decode(frames[0]) == case.msg


def test_all_cases_back_to_back_in_one_stream() -> None:
    startup = [c for c in CASES if not c.tagged]
    rest = [c for c in CASES if c.tagged]
    stream = b"".join(c.wire for c in startup + rest)
    reader = FrameReader(tagged=False, max_length=limits.MAX_STARTUP_PACKET)
    reader.feed(stream)
    got: list[Message] = []
    for c in startup:
        frame = reader.next_frame()
        assert frame is not None
        got.append(c.decode(frame))
    reader.set_mode(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
    for c in rest:
        frame = reader.next_frame()
        assert frame is not None
        got.append(c.decode(frame))
    assert got == [c.msg for c in startup + rest]
    assert reader.next_frame() is None
    assert reader.trailing() == b""


@pytest.mark.parametrize(
    "body", [b"database\x00shop\x00\x00", b"user\x00\x00\x00", b"\x00"],
    ids=["no-user", "empty-user", "no-params"],
)
def test_startup_without_user_is_accepted(body: bytes) -> None:
    """node-postgres with $USER unset sends no user; the proxy replaces it anyway."""
    msg = decode_startup(untagged(V3_0 + body))
    assert isinstance(msg, StartupMessage)
    assert not msg.params.get("user")


def test_startup_keeps_parameter_order() -> None:
    msg = decode_startup(untagged(V3_0 + b"zeta\x001\x00user\x00u\x00alpha\x002\x00\x00"))
    assert isinstance(msg, StartupMessage)
    assert list(msg.params) == ["zeta", "user", "alpha"]


# --------------------------------------------------------------------------
# Real clients' startup packets (tests/data/startup, see its README)

CAPTURES: dict[str, tuple[tuple[int, int], dict[str, str]]] = {
    "psql": ((3, 0), {"user": "alice", "database": "shop", "application_name": "psql"}),
    "psql_prefer": ((3, 0), {"user": "alice", "database": "shop", "application_name": "psql"}),
    "psql_options": (
        (3, 0),
        {
            "user": "alice",
            "database": "shop",
            "options": "-c search_path=app,public -c statement_timeout=5s",
            "application_name": "nightly report \u00e9t\u00e9",
            "client_encoding": "UTF8",
        },
    ),
    "psycopg": (
        (3, 0),
        {"user": "alice", "database": "shop", "application_name": "psycopg-capture"},
    ),
    "psycopg_3_2": ((3, 2), {"user": "alice", "database": "shop"}),
    "asyncpg": (
        (3, 0),
        {
            "client_encoding": "'utf-8'",
            "user": "alice",
            "database": "shop",
            "application_name": "asyncpg-capture",
        },
    ),
}
SSL_FIRST = ["psql_prefer", "psycopg", "asyncpg"]


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_captured_startup(name: str) -> None:
    wire = (DATA / f"{name}.bin").read_bytes()
    (major, minor), params = CAPTURES[name]
    msg = decode_startup(wire)
    assert isinstance(msg, StartupMessage)
    assert (msg.major, msg.minor) == (major, minor)
    assert list(msg.params.items()) == list(params.items())
    assert encode(msg) == wire


@pytest.mark.parametrize("name", SSL_FIRST)
def test_captured_sslrequest_then_startup_as_one_stream(name: str) -> None:
    ssl = (DATA / f"{name}.sslrequest.bin").read_bytes()
    startup = (DATA / f"{name}.bin").read_bytes()
    assert decode_startup(ssl) == SSLRequest()
    assert encode(SSLRequest()) == ssl
    for step in (len(ssl) + len(startup), 1, 3):
        reader = FrameReader(tagged=False, max_length=limits.MAX_STARTUP_PACKET)
        stream = ssl + startup
        frames: list[bytes] = []
        for i in range(0, len(stream), step):
            reader.feed(stream[i : i + step])
            while (frame := reader.next_frame()) is not None:
                frames.append(frame)
        assert frames == [ssl, startup]


def test_every_capture_is_tested() -> None:
    names = {p.name.removesuffix(".bin") for p in DATA.glob("*.bin")}
    assert names == set(CAPTURES) | {f"{n}.sslrequest" for n in SSL_FIRST}


# --------------------------------------------------------------------------
# Decode errors: only ProtocolError, with the right SQLSTATE

BAD: list[tuple[str, bytes, Decoder, str, str]] = [
    # (id, frame, decoder, sqlstate, text in the message)
    ("startup-short", b"\x00\x00\x00\x04", decode_startup, "08P01", "invalid length"),
    ("startup-empty", b"", decode_startup, "08P01", "invalid length"),
    (
        "startup-len-mismatch",
        b"\x00\x00\x00\x09\x04\xd2\x16\x2f",
        decode_startup,
        "08P01",
        "invalid length",
    ),
    (
        "startup-len-too-small",
        b"\x00\x00\x00\x04\x04\xd2\x16\x2f",
        decode_startup,
        "08P01",
        "invalid length",
    ),
    (
        "startup-oversized",
        untagged(V3_0 + b"user\x00" + b"a" * 9990 + b"\x00\x00"),
        decode_startup,
        "08P01",
        "exceeds the 10000-byte limit",
    ),
    (
        "protocol-2",
        b"\x00\x00\x00\x08\x00\x02\x00\x00",
        decode_startup,
        "08P01",
        "unsupported frontend protocol 2.0",
    ),
    (
        "protocol-4",
        untagged(b"\x00\x04\x00\x00user\x00a\x00\x00"),
        decode_startup,
        "08P01",
        "unsupported frontend protocol 4.0",
    ),
    (
        "request-code-unknown",
        b"\x00\x00\x00\x08\x04\xd2\x16\x31",
        decode_startup,
        "08P01",
        "unsupported request code 1234.5681",
    ),
    (
        "ssl-extra",
        b"\x00\x00\x00\x09\x04\xd2\x16\x2f\x00",
        decode_startup,
        "08P01",
        "malformed SSLRequest",
    ),
    (
        "gssenc-extra",
        b"\x00\x00\x00\x0c\x04\xd2\x16\x30\x00\x00\x00\x00",
        decode_startup,
        "08P01",
        "malformed GSSENCRequest",
    ),
    (
        "cancel-no-key",
        b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\x00\x00\x30\x39",
        decode_startup,
        "08P01",
        "cancel request key",
    ),
    (
        "cancel-key-3",
        untagged(b"\x04\xd2\x16\x2e\x00\x00\x30\x39abc"),
        decode_startup,
        "08P01",
        "cancel request key",
    ),
    (
        "cancel-key-257",
        untagged(b"\x04\xd2\x16\x2e\x00\x00\x30\x39" + b"k" * 257),
        decode_startup,
        "08P01",
        "cancel request key",
    ),
    (
        "cancel-no-pid",
        b"\x00\x00\x00\x0a\x04\xd2\x16\x2e\x00\x00",
        decode_startup,
        "08P01",
        "malformed CancelRequest",
    ),
    (
        "startup-no-terminator",
        untagged(V3_0 + b"user\x00a\x00"),
        decode_startup,
        "08P01",
        "malformed StartupMessage",
    ),
    ("startup-bare-version", untagged(V3_0), decode_startup, "08P01", "malformed StartupMessage"),
    (
        "startup-value-missing",
        untagged(V3_0 + b"user\x00"),
        decode_startup,
        "08P01",
        "malformed StartupMessage",
    ),
    (
        "startup-after-terminator",
        untagged(V3_0 + b"user\x00a\x00\x00x"),
        decode_startup,
        "08P01",
        "malformed StartupMessage",
    ),
    (
        "startup-bad-utf8",
        untagged(V3_0 + b"user\x00\xff\xfe\x00\x00"),
        decode_startup,
        "08P01",
        "malformed StartupMessage",
    ),
    (
        "startup-duplicate",
        untagged(V3_0 + b"user\x00a\x00user\x00b\x00\x00"),
        decode_startup,
        "08P01",
        "duplicate startup parameter 'user'",
    ),
    # tagged, backend
    ("backend-empty", b"", decode_backend, "08P01", "incomplete"),
    ("backend-short", b"R\x00\x00\x00", decode_backend, "08P01", "incomplete"),
    ("backend-len-mismatch", b"Z\x00\x00\x00\x06I", decode_backend, "08P01", "length"),
    ("backend-len-3", b"Z\x00\x00\x00\x03", decode_backend, "08P01", "length"),
    ("auth-no-code", b"R\x00\x00\x00\x04", decode_backend, "08P01", "malformed Authentication"),
    (
        "auth-ok-extra",
        tagged(b"R", i32(0) + b"x"),
        decode_backend,
        "08P01",
        "malformed AuthenticationOk",
    ),
    (
        "auth-cleartext-extra",
        tagged(b"R", i32(3) + b"x"),
        decode_backend,
        "08P01",
        "malformed AuthenticationCleartextPassword",
    ),
    (
        "auth-md5-short-salt",
        tagged(b"R", i32(5) + b"abc"),
        decode_backend,
        "08P01",
        "malformed AuthenticationMD5Password",
    ),
    (
        "auth-md5-long-salt",
        tagged(b"R", i32(5) + b"abcde"),
        decode_backend,
        "08P01",
        "malformed AuthenticationMD5Password",
    ),
    (
        "auth-sasl-unterminated",
        tagged(b"R", i32(10) + SCRAM),
        decode_backend,
        "08P01",
        "malformed AuthenticationSASL",
    ),
    (
        "auth-sasl-bad-utf8",
        tagged(b"R", i32(10) + b"\xc3\x00\x00"),
        decode_backend,
        "08P01",
        "malformed AuthenticationSASL",
    ),
    (
        "param-one-string",
        tagged(b"S", b"name\x00"),
        decode_backend,
        "08P01",
        "malformed ParameterStatus",
    ),
    (
        "param-extra",
        tagged(b"S", b"a\x00b\x00c"),
        decode_backend,
        "08P01",
        "malformed ParameterStatus",
    ),
    ("key-short", tagged(b"K", i32(1) + b"abc"), decode_backend, "08P01", "BackendKeyData secret"),
    (
        "key-long",
        tagged(b"K", i32(1) + b"k" * 257),
        decode_backend,
        "08P01",
        "BackendKeyData secret",
    ),
    ("key-no-pid", tagged(b"K", b"\x00\x01"), decode_backend, "08P01", "malformed BackendKeyData"),
    ("ready-bad-status", b"Z\x00\x00\x00\x05X", decode_backend, "08P01", "ReadyForQuery status"),
    ("ready-two-bytes", b"Z\x00\x00\x00\x06II", decode_backend, "08P01", "malformed ReadyForQuery"),
    ("ready-empty", b"Z\x00\x00\x00\x04", decode_backend, "08P01", "malformed ReadyForQuery"),
    (
        "error-unterminated",
        tagged(b"E", b"SFATAL\x00"),
        decode_backend,
        "08P01",
        "malformed ErrorResponse",
    ),
    (
        "error-value-unterminated",
        tagged(b"E", b"SFATAL"),
        decode_backend,
        "08P01",
        "malformed ErrorResponse",
    ),
    (
        "error-after-terminator",
        tagged(b"E", b"SFATAL\x00\x00\x00"),
        decode_backend,
        "08P01",
        "malformed ErrorResponse",
    ),
    (
        "error-non-ascii-code",
        tagged(b"E", b"\xc3x\x00\x00"),
        decode_backend,
        "08P01",
        "non-ASCII field code",
    ),
    ("notice-empty", b"N\x00\x00\x00\x04", decode_backend, "08P01", "malformed NoticeResponse"),
    (
        "negotiate-count-too-big",
        tagged(b"v", i32(3 << 16) + i32(2) + b"_pq_.a\x00"),
        decode_backend,
        "08P01",
        "malformed NegotiateProtocolVersion",
    ),
    (
        "negotiate-extra",
        tagged(b"v", i32(3 << 16) + i32(0) + b"x"),
        decode_backend,
        "08P01",
        "malformed NegotiateProtocolVersion",
    ),
    (
        "negotiate-pre-3.0",  # the version field is the whole number (3 << 16 | minor)
        tagged(b"v", i32(0) + i32(0)),
        decode_backend,
        "08P01",
        "malformed NegotiateProtocolVersion: version 0.0",
    ),
    # tagged 'p', frontend
    (
        "password-wrong-tag",
        b"Q\x00\x00\x00\x05\x00",
        PASSWORD,
        "08P01",
        "expected password response, got message type 81",
    ),
    (
        "password-unterminated",
        tagged(b"p", b"hunter2"),
        PASSWORD,
        "08P01",
        "malformed PasswordMessage",
    ),
    (
        "password-after-nul",
        tagged(b"p", b"hunter2\x00x"),
        PASSWORD,
        "08P01",
        "malformed PasswordMessage",
    ),
    ("password-len-mismatch", b"p\x00\x00\x00\x09x\x00", PASSWORD, "08P01", "length"),
    (
        "sasl-initial-len-minus-2",
        tagged(b"p", SCRAM + i32(-2)),
        SASL_INITIAL,
        "08P01",
        "malformed SASLInitialResponse",
    ),
    (
        "sasl-initial-len-too-big",
        tagged(b"p", SCRAM + i32(5) + b"abc"),
        SASL_INITIAL,
        "08P01",
        "malformed SASLInitialResponse",
    ),
    (
        "sasl-initial-extra",
        tagged(b"p", SCRAM + i32(1) + b"ab"),
        SASL_INITIAL,
        "08P01",
        "malformed SASLInitialResponse",
    ),
    (
        "sasl-initial-no-len",
        tagged(b"p", SCRAM),
        SASL_INITIAL,
        "08P01",
        "malformed SASLInitialResponse",
    ),
    (
        "sasl-response-wrong-tag",
        b"E\x00\x00\x00\x04",
        SASL_RESPONSE,
        "08P01",
        "expected password response",
    ),
]


@pytest.mark.parametrize(
    ("frame", "decode", "code", "text"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_decode_error(frame: bytes, decode: Decoder, code: str, text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.sqlstate == code
    assert text in str(info.value)
    # Nothing from construct rides along (its messages may quote the bytes).
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_startup_limit_is_inclusive() -> None:
    filler = 10_000 - 4 - 4 - len(b"user\x00a\x00x\x00") - 2
    wire = untagged(V3_0 + b"user\x00a\x00x\x00" + b"v" * filler + b"\x00\x00")
    assert len(wire) == limits.MAX_STARTUP_PACKET
    msg = decode_startup(wire)
    assert isinstance(msg, StartupMessage)
    assert encode(msg) == wire
    over = StartupMessage(3, 0, {"user": "a", "x": "v" * (filler + 1)})
    with pytest.raises(ValueError, match="over the 10000-byte limit"):
        encode(over)


# --------------------------------------------------------------------------
# Encode errors: ValueError, never quoting a secret

SECRET = "s3cr3t-Pa55"

BAD_ENCODE: list[tuple[str, Message, str]] = [
    ("param-name-nul", StartupMessage(3, 0, {"user": "a", "a\x00b": "v"}), "NUL"),
    ("param-value-nul", StartupMessage(3, 0, {"user": "a\x00b"}), "NUL"),
    ("param-name-empty", StartupMessage(3, 0, {"user": "a", "": "v"}), "empty"),
    ("major-too-big", StartupMessage(0x10000, 0, {"user": "a"}), "16 bits"),
    ("minor-negative", StartupMessage(3, -1, {"user": "a"}), "16 bits"),
    ("major-request-code", StartupMessage(1234, 5679, {"user": "a"}), "reserved"),
    ("cancel-key-short", CancelRequest(1, b"abc"), "4 to 256"),
    ("cancel-key-long", CancelRequest(1, b"k" * 257), "4 to 256"),
    ("cancel-pid-negative", CancelRequest(-1, b"abcd"), "out of range"),
    ("key-short", BackendKeyData(1, b""), "4 to 256"),
    ("key-long", BackendKeyData(1, b"k" * 257), "4 to 256"),
    ("key-pid-big", BackendKeyData(1 << 32, b"abcd"), "out of range"),
    ("password-nul", PasswordMessage(SECRET.encode() + b"\x00x"), "NUL"),
    ("sasl-mechanism-nul", SASLInitialResponse("SCRAM\x00", b""), "NUL"),
    ("sasl-mechanism-empty-in-list", AuthenticationSASL(("SCRAM-SHA-256", "")), "empty"),
    ("md5-salt", AuthenticationMD5Password(b"abc"), "4 bytes"),
    ("ready-status", ReadyForQuery("X"), "'I', 'T' or 'E'"),
    ("param-status-nul", ParameterStatus("a", "b\x00"), "NUL"),
    ("negotiate-nul", NegotiateProtocolVersion(0, ("a\x00",)), "NUL"),
    ("negotiate-negative", NegotiateProtocolVersion(-1), "out of range"),
    ("error-code-long", ErrorResponse((("SS", "x"),)), "field code"),
    ("error-code-nul", ErrorResponse((("\x00", "x"),)), "field code"),
    ("error-code-non-ascii", NoticeResponse((("\u00e9", "x"),)), "field code"),
    ("error-value-nul", ErrorResponse((("M", "a\x00b"),)), "NUL"),
    ("other-tag", OtherMessage(b"ab", b""), "one byte"),
]


@pytest.mark.parametrize(
    ("msg", "text"), [b[1:] for b in BAD_ENCODE], ids=[b[0] for b in BAD_ENCODE]
)
def test_encode_error(msg: Message, text: str) -> None:
    with pytest.raises(ValueError, match=text) as info:
        encode(msg)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_encode_error_from_construct_is_plain_value_error() -> None:
    # Not caught by the codec's own checks: construct refuses, the codec says ValueError.
    with pytest.raises(ValueError, match="cannot encode SASLInitialResponse") as info:
        encode(SASLInitialResponse("SCRAM-SHA-256", SECRET))  # type: ignore[arg-type]
    assert SECRET not in str(info.value)
    assert info.value.__context__ is None


# --------------------------------------------------------------------------
# Secrets stay out of repr() and error messages

SECRET_B = SECRET.encode()

SECRET_MESSAGES: list[Message] = [
    CancelRequest(7, SECRET_B),
    PasswordMessage(SECRET_B),
    SASLInitialResponse("SCRAM-SHA-256", SECRET_B),
    SASLResponse(SECRET_B),
    AuthenticationSASLContinue(SECRET_B),
    AuthenticationSASLFinal(SECRET_B),
    BackendKeyData(7, SECRET_B),
]


@pytest.mark.parametrize("msg", SECRET_MESSAGES, ids=lambda m: type(m).__name__)
def test_secret_not_in_repr(msg: Message) -> None:
    for text in (repr(msg), str(msg)):
        assert SECRET not in text
        assert repr(SECRET_B) not in text
        assert SECRET_B.hex() not in text


def test_decoded_secret_not_in_repr() -> None:
    msg = decode_password(encode(PasswordMessage(SECRET_B)), PasswordKind.PASSWORD)
    assert msg == PasswordMessage(SECRET_B)
    assert SECRET not in repr(msg)


@pytest.mark.parametrize(
    ("frame", "decode"),
    [
        (tagged(b"p", SECRET_B), PASSWORD),  # no NUL
        (tagged(b"p", SECRET_B + b"\x00\xff"), PASSWORD),
        (tagged(b"p", SCRAM + i32(99) + SECRET_B), SASL_INITIAL),
        (tagged(b"K", i32(1) + SECRET_B * 30), decode_backend),
        (untagged(b"\x04\xd2\x16\x2e" + i32(1) + SECRET_B * 30), decode_startup),
        (untagged(V3_0 + b"user\x00" + SECRET_B + b"\xff\x00\x00"), decode_startup),
    ],
)
def test_secret_not_in_decode_error(frame: bytes, decode: Decoder) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert SECRET not in str(info.value)
    assert info.value.__context__ is None
