"""Property tests: every message round-trips; garbage raises only ProtocolError."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
)
from lakeproxy.wire.errors import ProtocolError
from lakeproxy.wire.framing import FrameReader

#: Modest: the whole module runs in a few seconds.
FEW = settings(max_examples=60, deadline=None)
MORE = settings(max_examples=300, deadline=None)

# --------------------------------------------------------------------------
# Strategies

text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=12)
name = text.filter(bool)
u32 = st.integers(0, 0xFFFF_FFFF)
key = st.binary(min_size=4, max_size=256)
no_nul = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b""))
field_code = st.characters(min_codepoint=1, max_codepoint=0x7F)
fields = st.lists(st.tuples(field_code, text), max_size=6).map(tuple)
INTERPRETED_TAGS = set(b"RSKZENv")


@st.composite
def startup_messages(draw: st.DrawFn) -> StartupMessage:
    others = draw(st.dictionaries(name.filter(lambda n: n != "user"), text, max_size=5))
    items = list(others.items())
    at = draw(st.integers(0, len(items)))
    items.insert(at, ("user", draw(name)))
    return StartupMessage(3, draw(st.integers(0, 0xFFFF)), dict(items))


other_messages = st.one_of(
    st.builds(
        OtherMessage,
        st.integers(0, 255).filter(lambda t: t not in INTERPRETED_TAGS).map(lambda t: bytes([t])),
        st.binary(max_size=40),
    ),
    st.builds(
        lambda code, rest: OtherMessage(b"R", code.to_bytes(4, "big") + rest),
        u32.filter(lambda c: c not in {0, 3, 5, 10, 11, 12}),
        st.binary(max_size=20),
    ),
)

MESSAGES: dict[str, st.SearchStrategy[Message]] = {
    "SSLRequest": st.just(SSLRequest()),
    "GSSENCRequest": st.just(GSSENCRequest()),
    "CancelRequest": st.builds(CancelRequest, u32, key),
    "StartupMessage": startup_messages(),
    "PasswordMessage": st.builds(PasswordMessage, no_nul),
    "SASLInitialResponse": st.builds(SASLInitialResponse, text, st.none() | st.binary(max_size=40)),
    "SASLResponse": st.builds(SASLResponse, st.binary(max_size=40)),
    "AuthenticationOk": st.just(AuthenticationOk()),
    "AuthenticationCleartextPassword": st.just(AuthenticationCleartextPassword()),
    "AuthenticationMD5Password": st.builds(
        AuthenticationMD5Password, st.binary(min_size=4, max_size=4)
    ),
    "AuthenticationSASL": st.builds(AuthenticationSASL, st.lists(name, max_size=4).map(tuple)),
    "AuthenticationSASLContinue": st.builds(AuthenticationSASLContinue, st.binary(max_size=40)),
    "AuthenticationSASLFinal": st.builds(AuthenticationSASLFinal, st.binary(max_size=40)),
    "ParameterStatus": st.builds(ParameterStatus, text, text),
    "BackendKeyData": st.builds(BackendKeyData, u32, key),
    "ReadyForQuery": st.builds(ReadyForQuery, st.sampled_from("ITE")),
    "NegotiateProtocolVersion": st.builds(
        NegotiateProtocolVersion, st.integers(0, 0xFFFF), st.lists(text, max_size=4).map(tuple)
    ),
    "ErrorResponse": st.builds(ErrorResponse, fields),
    "NoticeResponse": st.builds(NoticeResponse, fields),
    "OtherMessage": other_messages,
}

STARTUP_TYPES = (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage)
PASSWORD_KINDS: dict[type, PasswordKind] = {
    PasswordMessage: PasswordKind.PASSWORD,
    SASLInitialResponse: PasswordKind.SASL_INITIAL,
    SASLResponse: PasswordKind.SASL_RESPONSE,
}


def decode(msg: Message, frame: bytes) -> Message:
    """Decode ``frame`` with the decoder that fits ``msg``'s type."""
    if isinstance(msg, STARTUP_TYPES):
        return decode_startup(frame)
    if type(msg) in PASSWORD_KINDS:
        return decode_password(frame, PASSWORD_KINDS[type(msg)])
    return decode_backend(frame)


def test_every_message_type_has_a_strategy() -> None:
    from lakeproxy.wire import codec

    names = {
        n
        for n, v in vars(codec).items()
        if isinstance(v, type)
        and getattr(v, "__module__", "") == codec.__name__
        and hasattr(v, "__dataclass_fields__")
    }
    assert names == set(MESSAGES)


# --------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("kind", sorted(MESSAGES))
@FEW
@given(data=st.data())
def test_round_trip(kind: str, data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[kind])
    frame = encode(msg)
    assert decode(msg, frame) == msg
    assert encode(decode(msg, frame)) == frame


backend_messages = st.one_of(
    *(
        s
        for k, s in MESSAGES.items()
        if k.startswith(
            ("Auth", "Param", "Backend", "Ready", "Negotiate", "Error", "Notice", "Other")
        )
    )
)


@MORE
@given(
    msgs=st.lists(backend_messages, max_size=8),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_frame_reader_any_split(msgs: list[Message], cuts: list[int]) -> None:
    frames = [encode(m) for m in msgs]
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    reader = FrameReader(tagged=True, max_length=limits.MAX_STARTUP_PHASE_MESSAGE)
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        reader.feed(stream[a:b])
        while (frame := reader.next_frame()) is not None:
            got.append(frame)
    assert got == frames
    assert [decode_backend(f) for f in got] == msgs
    assert reader.buffered == 0


# --------------------------------------------------------------------------
# Garbage in: ProtocolError out, nothing else


def only_protocol_error(fn: Callable[[bytes], object], frame: bytes) -> None:
    """Call ``fn(frame)``; any exception other than ProtocolError fails the test."""
    error: ProtocolError | None = None
    try:
        fn(frame)
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.sqlstate in {"08P01", "28000"}
        assert error.__context__ is None


def _untagged(body: bytes) -> bytes:
    return (len(body) + 4).to_bytes(4, "big") + body


def _tagged(tag: bytes, body: bytes) -> bytes:
    return tag + (len(body) + 4).to_bytes(4, "big") + body


#: Bodies made of protocol-looking pieces reach deeper than uniform random bytes.
pieces = st.lists(
    st.sampled_from(
        [
            b"\x00",
            b"\x00\x00",
            b"user",
            b"database",
            b"a",
            b"\xff",
            b"\xc3",
            b"\xc3\xa9",
            b"\x00\x00\x00\x04",
            b"\xff\xff\xff\xff",
            b"\xff\xff\xff\xfe",
            b"SCRAM-SHA-256",
            b"\x00\x00\x00\x0a",
            b"SFATAL",
            b"I",
        ]
    )
    | st.binary(max_size=8),
    max_size=12,
).map(b"".join)

request_codes = (
    st.sampled_from(
        [
            limits.SSL_REQUEST_CODE,
            limits.GSSENC_REQUEST_CODE,
            limits.CANCEL_REQUEST_CODE,
            limits.PROTOCOL_3_0,
            limits.PROTOCOL_3_2,
            2 << 16,
            (1234 << 16) | 5681,
        ]
    )
    | u32
)

auth_codes = st.sampled_from([0, 3, 5, 7, 10, 11, 12]) | u32


def mutations(strategy: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Valid frames with a few bytes flipped, inserted or dropped."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        frame = bytearray(encode(draw(strategy)))
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(frame)))
            op = draw(st.sampled_from(["flip", "insert", "drop"]))
            if op == "insert" or at == len(frame):
                frame.insert(at, draw(st.integers(0, 255)))
            elif op == "flip":
                frame[at] = draw(st.integers(0, 255))
            else:
                del frame[at]
        return bytes(frame)

    return mutate()


any_startup = st.one_of(
    *(MESSAGES[k] for k in ("SSLRequest", "GSSENCRequest", "CancelRequest", "StartupMessage"))
)


@MORE
@given(
    frame=st.binary(max_size=64)
    | st.builds(lambda c, b: _untagged(c.to_bytes(4, "big") + b), request_codes, pieces)
    | mutations(any_startup)
)
def test_decode_startup_garbage(frame: bytes) -> None:
    only_protocol_error(decode_startup, frame)


@MORE
@given(
    frame=st.binary(max_size=64)
    | st.builds(_tagged, st.sampled_from([b"R", b"S", b"K", b"Z", b"E", b"N", b"v", b"A"]), pieces)
    | st.builds(lambda c, b: _tagged(b"R", c.to_bytes(4, "big") + b), auth_codes, pieces)
    | mutations(backend_messages)
)
def test_decode_backend_garbage(frame: bytes) -> None:
    only_protocol_error(decode_backend, frame)


password_messages = st.one_of(
    MESSAGES["PasswordMessage"], MESSAGES["SASLInitialResponse"], MESSAGES["SASLResponse"]
)


@MORE
@given(
    kind=st.sampled_from(PasswordKind),
    frame=st.binary(max_size=64)
    | st.builds(_tagged, st.sampled_from([b"p", b"Q"]), pieces)
    | mutations(password_messages),
)
def test_decode_password_garbage(kind: PasswordKind, frame: bytes) -> None:
    only_protocol_error(lambda f: decode_password(f, kind), frame)


@MORE
@given(
    tagged=st.booleans(),
    max_length=st.integers(0, 300),
    chunks=st.lists(st.binary(max_size=40) | pieces, max_size=10),
)
def test_frame_reader_garbage(tagged: bool, max_length: int, chunks: list[bytes]) -> None:
    reader = FrameReader(tagged=tagged, max_length=max_length)
    frames: list[bytes] = []
    error: ProtocolError | None = None
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (frame := reader.next_frame()) is not None:
                frames.append(frame)
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.sqlstate == "08P01"
        return
    assert b"".join(frames) + reader.trailing() == b"".join(chunks)
    for frame in frames:
        length = int.from_bytes(frame[1:5] if tagged else frame[:4], "big")
        assert length <= max_length
        assert len(frame) == length + (1 if tagged else 0)
