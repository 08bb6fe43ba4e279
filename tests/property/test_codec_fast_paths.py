"""decode_backend's plain-bytes fast path agrees with the construct schemas.

The fast path reads the messages of every login (ParameterStatus,
BackendKeyData, ReadyForQuery, AuthenticationOk); for any frame it either
returns what the schemas return, or leaves the frame to them.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lakeproxy.wire import codec
from lakeproxy.wire import messages as m
from lakeproxy.wire.codec import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    BackendKeyData,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    StartupMessage,
    decode_backend,
    encode,
)
from lakeproxy.wire.errors import ProtocolError

MANY = settings(max_examples=400, deadline=None)


def _frame(tag: bytes, body: bytes) -> bytes:
    return tag + (len(body) + 4).to_bytes(4, "big") + body


def _slow(frame: bytes) -> object:
    """What the construct schemas alone make of ``frame`` (the code before the fast path)."""
    tag = frame[:1]
    try:
        if tag == b"S":
            return ParameterStatus(*m.PARAMETER_STATUS.parse(frame))
        if tag == b"Z":
            status = m.READY_FOR_QUERY.parse(frame).decode("latin1")
            return ReadyForQuery(status) if status in "ITE" and len(status) == 1 else "error"
        if tag == b"K":
            pid, key = m.BACKEND_KEY_DATA.parse(frame)
            return BackendKeyData(pid, key) if 4 <= len(key) <= 256 else "error"
        if frame[5:9] == b"\x00\x00\x00\x03":
            m.AUTH_CLEARTEXT_PASSWORD.parse(frame)
            return AuthenticationCleartextPassword()
        m.AUTH_OK.parse(frame)
        return AuthenticationOk()
    except (ProtocolError, UnicodeDecodeError):
        return "error"


def _fast(frame: bytes) -> object:
    try:
        return decode_backend(frame)
    except (ProtocolError, UnicodeDecodeError):
        return "error"


bodies = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda a, b: a + b"\x00" + b + b"\x00", st.binary(max_size=12),
              st.binary(max_size=12)),
    st.builds(lambda a, b: a.encode() + b"\x00" + b.encode() + b"\x00", st.text(max_size=8),
              st.text(max_size=8)),
)


@MANY
@given(tag=st.sampled_from([b"S", b"Z", b"K", b"R"]), body=bodies | st.just(b"\x00\x00\x00\x03"))
def test_fast_path_matches_the_schemas(tag: bytes, body: bytes) -> None:
    frame = _frame(tag, body)
    if tag == b"R" and len(body) >= 4 and body[:4] not in (b"\0\0\0\0", b"\0\0\0\3"):
        return  # other authentication requests never take the fast path
    fast = codec._decode_common(tag, frame)
    if fast is not None:
        assert fast == _slow(frame)
    assert _fast(frame) == _slow(frame)


def test_common_login_frames_take_the_fast_path() -> None:
    for frame, want in [
        (_frame(b"S", b"TimeZone\x00UTC\x00"), ParameterStatus("TimeZone", "UTC")),
        (_frame(b"S", b"application_name\x00\x00"), ParameterStatus("application_name", "")),
        (_frame(b"Z", b"I"), ReadyForQuery("I")),
        (_frame(b"K", b"\x00\x00\x00\x07abcd"), BackendKeyData(7, b"abcd")),
        (_frame(b"R", b"\x00\x00\x00\x00"), AuthenticationOk()),
    ]:
        assert codec._decode_common(frame[:1], frame) == want
        assert decode_backend(frame) == want
    # not exactly well formed: left to the schemas, which refuse it
    for frame in [_frame(b"S", b"a\x00b\x00c\x00"), _frame(b"Z", b"X"), _frame(b"K", b"\x00")]:
        assert codec._decode_common(frame[:1], frame) is None


names = st.text(min_size=1, max_size=10).filter(lambda t: "\x00" not in t)
values = st.text(max_size=10).filter(lambda t: "\x00" not in t)


@MANY
@given(params=st.dictionaries(names, values, max_size=6), minor=st.sampled_from([0, 2]))
def test_startup_encoding_matches_the_schema(params: dict[str, str], minor: int) -> None:
    msg = StartupMessage(3, minor, params)
    want = m.STARTUP_MESSAGE.build(((3 << 16) | minor, list(params.items())))
    assert encode(msg) == want


@MANY
@given(password=st.binary(max_size=40).filter(lambda b: b"\x00" not in b))
def test_password_encoding_matches_the_schema(password: bytes) -> None:
    assert encode(PasswordMessage(password)) == m.PASSWORD_MESSAGE.build(password)


def _startup_frame(version: int, body: bytes) -> bytes:
    return (len(body) + 8).to_bytes(4, "big") + version.to_bytes(4, "big") + body


def _startup_slow(frame: bytes) -> object:
    """The StartupMessage schema alone (the code before the fast path)."""
    try:
        _, pairs = m.STARTUP_MESSAGE.parse(frame)
        return codec._startup_params(pairs)
    except ProtocolError:
        return "error"


def _startup_fast(frame: bytes) -> object:
    pairs = codec._startup_pairs(frame)
    if pairs is None:
        return None
    try:
        return codec._startup_params(pairs)
    except ProtocolError:
        return "error"


cstrings = st.one_of(
    st.binary(max_size=6).filter(lambda b: b"\x00" not in b),
    st.text(max_size=6).filter(lambda t: "\x00" not in t).map(str.encode),
)


def _joined(parts: list[bytes]) -> bytes:
    return b"".join(p + b"\x00" for p in parts)


startup_bodies = st.one_of(
    st.binary(max_size=40),
    st.lists(cstrings, max_size=7).map(_joined),
    st.lists(cstrings, max_size=7).map(lambda parts: _joined(parts) + b"\x00"),
)


@MANY
@given(body=startup_bodies)
def test_startup_fast_path_matches_the_schema(body: bytes) -> None:
    frame = _startup_frame(3 << 16, body)
    fast = _startup_fast(frame)
    if fast is not None:
        assert fast == _startup_slow(frame)
    try:
        got: object = codec.decode_startup(frame)
    except ProtocolError as exc:
        got = "error" if exc.sqlstate == "08P01" else exc.sqlstate
    slow = _startup_slow(frame)
    # A startup without "user" decodes like any other (the proxy replaces the user).
    want: object = StartupMessage(3, 0, slow) if isinstance(slow, dict) else slow
    assert got == want


def test_common_startup_takes_the_fast_path() -> None:
    params = {"user": "u", "database": "d", "application_name": "", "client_encoding": "UTF8"}
    frame = encode(StartupMessage(3, 0, params))
    assert codec._startup_pairs(frame) == list(params.items())
    assert codec.decode_startup(frame) == StartupMessage(3, 0, params)
    for bad in [frame[:8], frame[:-1], _startup_frame(3 << 16, b"\x00x\x00y\x00\x00"),
                _startup_frame(3 << 16, b"a\x00\xff\x00\x00")]:
        assert codec._startup_pairs(bad) is None


def test_constant_and_key_encodings_match_the_schemas() -> None:
    from lakeproxy.wire.codec import GSSENCRequest, SSLRequest

    assert encode(SSLRequest()) == m.SSL_REQUEST.build(None)
    assert encode(GSSENCRequest()) == m.GSSENC_REQUEST.build(None)
    assert encode(AuthenticationOk()) == m.AUTH_OK.build(None)
    assert encode(AuthenticationCleartextPassword()) == m.AUTH_CLEARTEXT_PASSWORD.build(None)
    for pid, key in [(0, b"abcd"), (2**32 - 1, bytes(range(32))), (7, b"k" * 256)]:
        assert encode(BackendKeyData(pid, key)) == m.BACKEND_KEY_DATA.build((pid, key))
